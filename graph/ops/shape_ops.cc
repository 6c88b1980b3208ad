// Operators that only move elements: Flatten, Reshape, Concat and transpose,
// with MXNet's parameters.
//
// Reshape's `shape` takes MXNet's special values (all supported):
//    0  copy this dimension of the input;
//   -1  infer this dimension from the others (at most one);
//   -2  copy all remaining input dimensions;
//   -3  the product of the next two input dimensions;
//   -4  split the next input dimension into the two values that follow
//       (one of them may be -1).
// With reverse=True the special values are matched right to left, as
// MXNet does. The legacy target_shape / keep_highest parameters are
// accepted only at their defaults.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <optional>

#include "absl/strings/str_join.h"
#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

// dst = src (or dst += src) for n floats on ctx; src may be dst (in place).
void Copy(Context ctx, OpReq req, const float* src, float* dst, int64_t n) {
  if (req == OpReq::kNull || (req == OpReq::kWrite && src == dst)) return;
  if (ctx.is_cpu() && req == OpReq::kWrite) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  kernel::Launch<kernel::CopyKernel>("copy", ctx, n, {dst, src, req == OpReq::kAdd});
}

void CopyForward(const OpContext& ctx, const ParsedParams&, const std::vector<TBlob>& in,
                 const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                 const std::vector<TBlob>&) {
  Copy(ctx.ctx, req[0], in[0].data, out[0].data, out[0].Size());
}

void CopyBackward(const OpContext& ctx, const ParsedParams&, const std::vector<TBlob>& out_grad,
                  const std::vector<TBlob>&, const std::vector<TBlob>&,
                  const std::vector<OpReq>& req, const std::vector<TBlob>& in_grad,
                  const std::vector<TBlob>&) {
  Copy(ctx.ctx, req[0], out_grad[0].data, in_grad[0].data, in_grad[0].Size());
}

int64_t KnownProduct(const Shape& s, int begin, int end) {
  int64_t p = 1;
  for (int d = begin; d < end; ++d) p *= s[d];
  return p;
}

// If `data` has exactly one unknown dimension and `size` (its total size)
// is known, fills that dimension in.
absl::Status FillOneUnknown(ShapeList* in, int64_t size) {
  Shape data = (*in)[0];
  int unknown = -1;
  int64_t known = 1;
  for (int d = 0; d < data.ndim(); ++d) {
    if (data[d] != 0) {
      known *= data[d];
    } else if (unknown >= 0) {
      return absl::OkStatus();  // two unknowns: nothing to say
    } else {
      unknown = d;
    }
  }
  if (unknown < 0 || size == 0 || size % known != 0) return absl::OkStatus();
  data[unknown] = size / known;
  return MergeShape(in, 0, data, "input data");
}

OpDef MakeCopyOp() {
  OpDef op;
  op.forward = CopyForward;
  op.backward = CopyBackward;
  op.gpu = true;
  op.inplace = {{0, 0}};
  op.backward_uses_inputs = false;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  return op;
}

// ---- Flatten: (N, d1, d2, ...) -> (N, d1 * d2 * ...).

absl::Status FlattenInfer(const ParsedParams&, ShapeList* in, ShapeList* out, ShapeList*) {
  const Shape& data = (*in)[0];
  if (data.ndim() == 0) return absl::OkStatus();
  MX_RETURN_IF_ERROR(MergeShape(out, 0, Shape{data[0], KnownProduct(data, 1, data.ndim())},
                                "output"));
  const Shape& o = (*out)[0];
  if (o.ndim() == 2 && IsKnown(o)) return FillOneUnknown(in, o.Size());
  return absl::OkStatus();
}

OpDef MakeFlatten() {
  OpDef op = MakeCopyOp();
  op.name = "Flatten";
  op.infer_shape = FlattenInfer;
  return op;
}

// ---- Reshape.

// The output shape for `spec` applied to `data` (unknown dimensions stay
// 0), following MXNet's InferReshapeShape.
absl::StatusOr<Shape> ReshapeTarget(const Shape& spec_shape, const Shape& data, bool reverse) {
  std::vector<int64_t> spec(spec_shape.begin(), spec_shape.end());
  std::vector<int64_t> src(data.begin(), data.end());
  if (reverse) {
    std::reverse(spec.begin(), spec.end());
    std::reverse(src.begin(), src.end());
  }
  auto too_few = [&](int64_t value) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shape=", spec_shape.ToString(), ": the value ", value,
        " refers to more dimensions than input data of shape ", data.ToString(), " has"));
  };
  std::vector<int64_t> dst;
  size_t next = 0;    // next input dimension
  int inferred = -1;  // index in dst of the -1
  // Unknown input dimensions copied as they are (by 0 or -2): they cancel
  // out when the -1 is inferred.
  int copied_unknowns = 0;
  for (size_t i = 0; i < spec.size(); ++i) {
    const int64_t v = spec[i];
    if (v > 0) {
      dst.push_back(v);
      ++next;
    } else if (v == 0) {
      if (next >= src.size()) return too_few(v);
      copied_unknowns += src[next] == 0;
      dst.push_back(src[next++]);
    } else if (v == -1) {
      if (inferred >= 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "shape=", spec_shape.ToString(), " has more than one -1"));
      }
      inferred = static_cast<int>(dst.size());
      dst.push_back(1);
      ++next;
    } else if (v == -2) {
      while (next < src.size()) {
        copied_unknowns += src[next] == 0;
        dst.push_back(src[next++]);
      }
    } else if (v == -3) {
      if (next + 1 >= src.size()) return too_few(v);
      dst.push_back(src[next] * src[next + 1]);
      next += 2;
    } else if (v == -4) {
      if (i + 2 >= spec.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "shape=", spec_shape.ToString(), ": -4 must be followed by two values"));
      }
      if (next >= src.size()) return too_few(v);
      const int64_t whole = src[next++];
      int64_t a = spec[++i], b = spec[++i];
      if (a < -1 || b < -1 || a == 0 || b == 0 || (a == -1 && b == -1)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "shape=", spec_shape.ToString(), ": the two values after -4 (", a, ", ", b,
            ") must be positive, or one of them -1"));
      }
      if (a == -1) a = whole != 0 && whole % b == 0 ? whole / b : 0;
      if (b == -1) b = whole != 0 && whole % a == 0 ? whole / a : 0;
      if (whole != 0 && a * b != whole) {
        return absl::InvalidArgumentError(absl::StrCat(
            "shape=", spec_shape.ToString(), ": -4 cannot split dimension ", whole,
            " of input data ", data.ToString(), " into (", spec[i - 1], ", ", spec[i], ")"));
      }
      dst.push_back(a);
      dst.push_back(b);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape=", spec_shape.ToString(), ": ", v,
          " is not a dimension nor one of the special values 0, -1, -2, -3, -4"));
    }
  }
  if (inferred >= 0) {
    // known / rest over the known dimensions, when the unknown ones are
    // exactly the copied ones.
    int64_t known = 1, rest = 1;
    int unknowns = 0;
    for (int64_t d : src) {
      if (d == 0) ++unknowns;
      known *= d == 0 ? 1 : d;
    }
    for (size_t d = 0; d < dst.size(); ++d) {
      if (static_cast<int>(d) != inferred) rest *= dst[d] == 0 ? 1 : dst[d];
    }
    dst[inferred] = 0;
    if (unknowns == copied_unknowns) {
      if (known % rest != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "shape=", spec_shape.ToString(), ": input data of shape ", data.ToString(), " (",
            known, " elements) does not divide into dimensions of product ", rest));
      }
      dst[inferred] = known / rest;
    }
  }
  if (reverse) std::reverse(dst.begin(), dst.end());
  return Shape(dst.begin(), dst.end());
}

// MXNet 0.8's legacy form, used when `shape` is empty: target_shape, whose
// one 0 (if exactly one) is inferred from the input's size, and
// keep_highest, which takes the first dimension from the input. (Files of
// that time write every parameter: a target_shape of (0,0) beside a shape,
// which then wins, as in MXNet.) Unknown until the input's shape is.
absl::StatusOr<std::optional<Shape>> LegacyReshapeTarget(Shape target, bool keep_highest,
                                                         const Shape& data) {
  if (!IsKnown(data)) return std::optional<Shape>();
  if (keep_highest) target[0] = data[0];
  const int first = keep_highest ? 1 : 0;
  const int zeros = static_cast<int>(std::count(target.begin() + first, target.end(), 0));
  if (zeros == 1) {
    const int at =
        static_cast<int>(std::find(target.begin() + first, target.end(), 0) - target.begin());
    target[at] = 1;
    target[at] = target.Size() > 0 ? data.Size() / target.Size() : 0;
  }
  if (target.Size() != data.Size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "target_shape=", target.ToString(),
        " (the legacy form of shape) does not fit input data of shape ", data.ToString()));
  }
  return std::optional<Shape>(target);
}

absl::Status ReshapeInfer(const ParsedParams& p, ShapeList* in, ShapeList* out, ShapeList*) {
  const Shape spec = p.GetShape("shape");
  const Shape& data = (*in)[0];
  if (spec.ndim() == 0 && p.GetShape("target_shape").ndim() != 0) {
    MX_ASSIGN_OR_RETURN(
        std::optional<Shape> o,
        LegacyReshapeTarget(p.GetShape("target_shape"), p.GetBool("keep_highest"), data));
    if (o.has_value()) MX_RETURN_IF_ERROR(MergeShape(out, 0, *o, "output"));
    return absl::OkStatus();
  }
  if (spec.ndim() == 0) {
    return absl::InvalidArgumentError("parameter shape is missing or empty");
  }
  if (data.ndim() == 0) {
    // Without -2, -3, -4 or 0 the output dimensions are the given ones.
    bool plain = std::all_of(spec.begin(), spec.end(), [](int64_t v) { return v > 0 || v == -1; });
    if (!plain) return absl::OkStatus();
    Shape o = spec;
    for (int d = 0; d < o.ndim(); ++d) o[d] = std::max<int64_t>(o[d], 0);
    MX_RETURN_IF_ERROR(MergeShape(out, 0, o, "output"));
  } else {
    MX_ASSIGN_OR_RETURN(Shape o, ReshapeTarget(spec, data, p.GetBool("reverse")));
    if (IsKnown(data) && IsKnown(o) && o.Size() != data.Size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape=", spec.ToString(), " turns input data of shape ", data.ToString(), " (",
          data.Size(), " elements) into ", o.ToString(), " (", o.Size(), " elements)"));
    }
    MX_RETURN_IF_ERROR(MergeShape(out, 0, o, "output"));
  }
  const Shape& o = (*out)[0];
  if (IsKnown(o)) return FillOneUnknown(in, o.Size());
  return absl::OkStatus();
}

OpDef MakeReshape() {
  OpDef op = MakeCopyOp();
  op.name = "Reshape";
  op.params = {{"shape", ParamSpec::Type::kShape, "()"},
               {"reverse", ParamSpec::Type::kBool, "False"},
               {"target_shape", ParamSpec::Type::kShape, "()"},
               {"keep_highest", ParamSpec::Type::kBool, "False"}};
  op.infer_shape = ReshapeInfer;
  return op;
}

// ---- Concat: arguments arg0 .. arg{num_args - 1} joined along `dim`.

// Every Concat argument name up to this many inputs is a required input;
// OpDef::required_inputs is a fixed list, so larger concatenations would
// get automatic variables for missing inputs.
constexpr int kMaxRequiredConcatArgs = 256;
constexpr int64_t kMaxConcatArgs = 1 << 16;

std::vector<std::string> ArgNames(int64_t n) {
  std::vector<std::string> names;
  for (int64_t i = 0; i < n; ++i) names.push_back(absl::StrCat("arg", i));
  return names;
}

// dim normalized against ndim, or an error.
absl::StatusOr<int> Axis(int64_t dim, int ndim, const char* param) {
  if (dim < -ndim || dim >= ndim) {
    return absl::InvalidArgumentError(absl::StrCat("parameter ", param, "=", dim,
                                                   " is out of range for ", ndim,
                                                   "-dimensional inputs"));
  }
  return static_cast<int>(dim < 0 ? dim + ndim : dim);
}

absl::Status ConcatInfer(const ParsedParams& p, ShapeList* in, ShapeList* out, ShapeList*) {
  const int64_t n = in->size();
  // The rank comes from the output or the first input that knows it.
  std::string ref_name = "output";
  Shape ref = (*out)[0];
  for (int64_t i = 0; i < n && ref.ndim() == 0; ++i) {
    ref_name = absl::StrCat("input arg", i);
    ref = (*in)[i];
  }
  const int ndim = ref.ndim();
  for (int64_t i = 0; i < n; ++i) {
    const Shape& s = (*in)[i];
    if (s.ndim() != 0 && s.ndim() != ndim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input arg", i, " has shape ", s.ToString(), " but ", ref_name, " has shape ",
          ref.ToString(), ": Concat needs the same number of dimensions everywhere"));
    }
  }
  if (ndim == 0) return absl::OkStatus();
  MX_ASSIGN_OR_RETURN(int axis, Axis(p.GetInt("dim"), ndim, "dim"));
  // The shape every input and the output share, with the axis unknown.
  ShapeList common(1);
  auto merge = [&](const Shape& s, const std::string& what) -> absl::Status {
    if (s.ndim() == 0) return absl::OkStatus();
    Shape t = s;
    t[axis] = 0;
    Shape before = common[0];
    if (!MergeShape(&common, 0, t, what).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has shape ", s.ToString(), " but the other inputs and output give ",
          before.ToString(), " (with dimension ", axis,
          " unknown): the shapes of Concat's inputs must agree except in dim=", axis));
    }
    return absl::OkStatus();
  };
  for (int64_t i = 0; i < n; ++i) {
    MX_RETURN_IF_ERROR(merge((*in)[i], absl::StrCat("input arg", i)));
  }
  MX_RETURN_IF_ERROR(merge((*out)[0], "output"));
  int64_t sum = 0;
  int unknown = -1, unknowns = 0;
  for (int64_t i = 0; i < n; ++i) {
    Shape s = common[0];
    const Shape& given = (*in)[i];
    s[axis] = given.ndim() != 0 ? given[axis] : 0;
    MX_RETURN_IF_ERROR(MergeShape(in, i, s, absl::StrCat("input arg", i)));
    if (s[axis] == 0) {
      unknown = static_cast<int>(i);
      ++unknowns;
    }
    sum += s[axis];
  }
  Shape o = common[0];
  o[axis] = unknowns == 0 ? sum : 0;
  MX_RETURN_IF_ERROR(MergeShape(out, 0, o, "output"));
  const int64_t total = (*out)[0][axis];
  if (unknowns == 1 && total != 0) {
    if (total <= sum) {
      return absl::InvalidArgumentError(absl::StrCat(
          "output has shape ", (*out)[0].ToString(), " but the known inputs already sum to ",
          sum, " along dim=", axis));
    }
    Shape s = (*in)[unknown];
    s[axis] = total - sum;
    MX_RETURN_IF_ERROR(MergeShape(in, unknown, s, absl::StrCat("input arg", unknown)));
  }
  return absl::OkStatus();
}

// Calls f(i, offset, block, row, outer): input i's rows of `block` floats
// (dimensions from `dim` on) lie at `offset` in the output's `outer` rows
// of `row` floats.
template <typename F>
void ForEachConcatInput(const ParsedParams& p, const std::vector<TBlob>& in, const Shape& o, F f) {
  const int axis = *Axis(p.GetInt("dim"), o.ndim(), "dim");
  const int64_t outer = KnownProduct(o, 0, axis);
  const int64_t inner = KnownProduct(o, axis + 1, o.ndim());
  const int64_t row = o[axis] * inner;
  int64_t offset = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const int64_t block = in[i].shape[axis] * inner;
    f(i, offset, block, row, outer);
    offset += block;
  }
}

OpDef MakeConcat() {
  OpDef op;
  op.name = "Concat";
  // At most kMaxConcatArgs: the argument names are made from it before a
  // graph's inputs are counted (a symbol file's num_args=10^12 was a
  // trillion names).
  op.params = {{"num_args", ParamSpec::Type::kInt, "", true, {}, 1, kMaxConcatArgs},
               {"dim", ParamSpec::Type::kInt, "1"}};
  op.arguments = [](const ParsedParams& p) { return ArgNames(p.GetInt("num_args")); };
  op.required_inputs = ArgNames(kMaxRequiredConcatArgs);
  op.infer_shape = ConcatInfer;
  op.forward = [](const OpContext& ctx, const ParsedParams& p, const std::vector<TBlob>& in,
                  const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                  const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    ForEachConcatInput(p, in, out[0].shape,
                       [&](size_t i, int64_t offset, int64_t block, int64_t row, int64_t outer) {
                         kernel::Launch<kernel::StridedCopyKernel>(
                             "Concat", ctx.ctx, outer * block,
                             {out[0].data + offset, in[i].data, block, row, block,
                              req[0] == OpReq::kAdd});
                       });
  };
  op.backward = [](const OpContext& ctx, const ParsedParams& p,
                   const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
                   const std::vector<TBlob>&, const std::vector<OpReq>& req,
                   const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    ForEachConcatInput(p, in, out_grad[0].shape,
                       [&](size_t i, int64_t offset, int64_t block, int64_t row, int64_t outer) {
                         if (req[i] == OpReq::kNull) return;
                         kernel::Launch<kernel::StridedCopyKernel>(
                             "Concat", ctx.ctx, outer * block,
                             {in_grad[i].data, out_grad[0].data + offset, block, block, row,
                              req[i] == OpReq::kAdd});
                       });
  };
  op.gpu = true;
  // Backward reads only the shapes of the inputs.
  op.backward_uses_inputs = false;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  return op;
}

// ---- transpose: out.shape[i] = data.shape[axes[i]].

// The permutation for `ndim` dimensions: axes normalized, or all reversed
// when axes is empty.
absl::StatusOr<std::vector<int>> Permutation(const ParsedParams& p, int ndim) {
  const Shape axes = p.GetShape("axes");
  std::vector<int> perm(ndim);
  if (axes.ndim() == 0) {
    for (int i = 0; i < ndim; ++i) perm[i] = ndim - 1 - i;
    return perm;
  }
  if (axes.ndim() != ndim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parameter axes=", axes.ToString(), " has ", axes.ndim(),
        " entries but input data has ", ndim, " dimensions"));
  }
  std::vector<bool> seen(ndim, false);
  for (int i = 0; i < ndim; ++i) {
    MX_ASSIGN_OR_RETURN(perm[i], Axis(axes[i], ndim, "axes"));
    if (seen[perm[i]]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter axes=", axes.ToString(), " is not a permutation of the ", ndim,
          " dimensions"));
    }
    seen[perm[i]] = true;
  }
  return perm;
}

absl::Status TransposeInfer(const ParsedParams& p, ShapeList* in, ShapeList* out, ShapeList*) {
  const int ndim = (*in)[0].ndim() != 0 ? (*in)[0].ndim() : (*out)[0].ndim();
  if (ndim == 0) return absl::OkStatus();
  MX_RETURN_IF_ERROR(AtMostKernelDims(ndim, "transpose"));
  MX_ASSIGN_OR_RETURN(std::vector<int> perm, Permutation(p, ndim));
  Shape o(perm.begin(), perm.end()), d(perm.begin(), perm.end());
  for (int i = 0; i < ndim; ++i) {
    o[i] = (*in)[0].ndim() != 0 ? (*in)[0][perm[i]] : 0;
    d[perm[i]] = (*out)[0].ndim() != 0 ? (*out)[0][i] : 0;
  }
  MX_RETURN_IF_ERROR(MergeShape(out, 0, o, "output"));
  return MergeShape(in, 0, d, "input data");
}

// dst (=|+=) src transposed: the output's dimension i is the input's
// dimension perm[i].
void Transpose(Context ctx, OpReq req, const float* src, const Shape& src_shape,
               const std::vector<int>& perm, float* dst) {
  if (req == OpReq::kNull) return;
  const int ndim = src_shape.ndim();
  Shape out_shape = src_shape;
  std::vector<int64_t> src_stride(ndim, 1);
  for (int d = ndim - 2; d >= 0; --d) src_stride[d] = src_stride[d + 1] * src_shape[d + 1];
  for (int i = 0; i < ndim; ++i) out_shape[i] = src_shape[perm[i]];
  kernel::BroadcastIndex ix = kernel::MakeBroadcastIndex("transpose", out_shape, out_shape,
                                                         out_shape);
  for (int i = 0; i < ndim; ++i) ix.sa[i] = out_shape[i] == 1 ? 0 : src_stride[perm[i]];
  kernel::Launch<kernel::GatherKernel>("transpose", ctx, src_shape.Size(),
                                       {dst, src, ix, req == OpReq::kAdd});
}

OpDef MakeTranspose() {
  OpDef op;
  op.name = "transpose";
  op.params = {{"axes", ParamSpec::Type::kShape, "()"}};
  op.infer_shape = TransposeInfer;
  op.forward = [](const OpContext& ctx, const ParsedParams& p, const std::vector<TBlob>& in,
                  const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                  const std::vector<TBlob>&) {
    Transpose(ctx.ctx, req[0], in[0].data, in[0].shape, *Permutation(p, in[0].shape.ndim()),
              out[0].data);
  };
  op.backward = [](const OpContext& ctx, const ParsedParams& p,
                   const std::vector<TBlob>& out_grad, const std::vector<TBlob>&,
                   const std::vector<TBlob>&, const std::vector<OpReq>& req,
                   const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    std::vector<int> perm = *Permutation(p, out_grad[0].shape.ndim());
    std::vector<int> inverse(perm.size());
    for (size_t i = 0; i < perm.size(); ++i) inverse[perm[i]] = static_cast<int>(i);
    Transpose(ctx.ctx, req[0], out_grad[0].data, out_grad[0].shape, inverse, in_grad[0].data);
  };
  op.backward_uses_inputs = false;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.gpu = true;
  return op;
}

MX_REGISTER_OP(MakeFlatten());
MX_REGISTER_OP(MakeReshape());
MX_REGISTER_OP(MakeConcat());
MX_REGISTER_OP(MakeTranspose());

}  // namespace
}  // namespace mx::ops
