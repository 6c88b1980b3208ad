// Tensor arithmetic, as MXNet's: dot, the sum and mean reductions, and
// binary operators with NumPy broadcasting.
//
// dot(lhs, rhs) follows MXNet's rule for any number of dimensions: lhs is a
// matrix of (everything but the last axis) x (last axis), or with
// transpose_a the transpose of (first axis) x (everything else); rhs is
// (first axis) x (everything else), or with transpose_b the transpose of
// (everything but the last axis) x (last axis). The output has the free
// axes of lhs then those of rhs; two vectors give shape (1,).
//
// sum and mean reduce over `axis` (every axis when empty), or over every
// other axis with exclude; keepdims keeps reduced axes as size 1. A full
// reduction without keepdims has shape (1,), as in MXNet.
//
// broadcast_add/sub/mul/div: shapes are right-aligned and every dimension
// pair must be equal or contain a 1; each gradient is summed back to its
// input's shape.
#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

// ---- dot

Shape Slice(const Shape& s, int begin, int end) {
  return Shape(s.begin() + begin, s.begin() + end);
}

// The matrix view of one operand: its free axes (the output's share of
// the shape) and the contracted axis.
struct Operand {
  Shape free;
  int contracted;  // axis index in the operand's shape
};

Operand Lhs(const Shape& s, bool trans) {
  const int nd = s.ndim();
  if (trans) return {nd > 1 ? Slice(s, 1, nd) : Shape(), 0};
  return {nd > 1 ? Slice(s, 0, nd - 1) : Shape(), nd - 1};
}

Operand Rhs(const Shape& s, bool trans) {
  const int nd = s.ndim();
  if (trans) return {nd > 1 ? Slice(s, 0, nd - 1) : Shape(), nd - 1};
  return {nd > 1 ? Slice(s, 1, nd) : Shape(), 0};
}

absl::Status DotInfer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                      ShapeList*) {
  Shape& l = (*in)[0];
  Shape& r = (*in)[1];
  if (l.ndim() == 0 || r.ndim() == 0) return absl::OkStatus();
  const bool ta = p.GetBool("transpose_a"), tb = p.GetBool("transpose_b");
  if (l.ndim() == 1 && r.ndim() == 1 && (ta || tb)) {
    return absl::InvalidArgumentError("cannot transpose vectors");
  }
  const Operand a = Lhs(l, ta), b = Rhs(r, tb);
  int64_t& ka = l[a.contracted];
  int64_t& kb = r[b.contracted];
  if (ka == 0) ka = kb;
  if (kb == 0) kb = ka;
  if (ka != kb) {
    return absl::InvalidArgumentError(absl::StrCat(
        "lhs of shape ", l.ToString(), " and rhs of shape ", r.ToString(),
        " do not match for dot", ta ? " (transpose_a)" : "",
        tb ? " (transpose_b)" : ""));
  }
  Shape o = a.free;
  for (int64_t d : b.free) o.push_back(d);
  if (o.ndim() == 0) o = Shape{1};
  return MergeShape(out, 0, o, "output");
}

struct DotDims {
  int64_t m, n, k;
};

DotDims GetDotDims(const ParsedParams& p, const Shape& l, const Shape& r) {
  const Operand a = Lhs(l, p.GetBool("transpose_a"));
  const Operand b = Rhs(r, p.GetBool("transpose_b"));
  return {a.free.Size(), b.free.Size(), l[a.contracted]};
}

void DotForward(const OpContext& ctx, const ParsedParams& p,
                const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  const DotDims d = GetDotDims(p, in[0].shape, in[1].shape);
  Gemm(ctx.ctx, req[0], p.GetBool("transpose_a"), p.GetBool("transpose_b"), d.m, d.n,
       d.k, 1.0f, in[0].data, in[1].data, out[0].data);
}

void DotBackward(const OpContext& ctx, const ParsedParams& p,
                 const std::vector<TBlob>& out_grad,
                 const std::vector<TBlob>& in, const std::vector<TBlob>&,
                 const std::vector<OpReq>& req,
                 const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  const bool ta = p.GetBool("transpose_a"), tb = p.GetBool("transpose_b");
  const DotDims d = GetDotDims(p, in[0].shape, in[1].shape);
  const float* g = out_grad[0].data;  // m x n
  const float* a = in[0].data;
  const float* b = in[1].data;
  // C = op(A) op(B): d op(A) = G op(B)^T, d op(B) = op(A)^T G, stored
  // transposed back where the operand was transposed.
  if (ta) {
    Gemm(ctx.ctx, req[0], tb, true, d.k, d.m, d.n, 1.0f, b, g, in_grad[0].data);
  } else {
    Gemm(ctx.ctx, req[0], false, !tb, d.m, d.k, d.n, 1.0f, g, b, in_grad[0].data);
  }
  if (tb) {
    Gemm(ctx.ctx, req[1], true, ta, d.n, d.k, d.m, 1.0f, g, a, in_grad[1].data);
  } else {
    Gemm(ctx.ctx, req[1], !ta, false, d.k, d.n, d.m, 1.0f, a, g, in_grad[1].data);
  }
}

OpDef MakeDot() {
  OpDef op;
  op.name = "dot";
  op.params = {{"transpose_a", ParamSpec::Type::kBool, "False"},
               {"transpose_b", ParamSpec::Type::kBool, "False"},
               // Accepted for MXNet symbol files; storage is always dense.
               {"forward_stype", ParamSpec::Type::kString, "None", false,
                {"None", "default", "row_sparse", "csr"}}};
  op.arguments = Names({"lhs", "rhs"});
  op.infer_shape = DotInfer;
  op.forward = DotForward;
  op.backward = DotBackward;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.gpu = true;
  op.uses_all_cores = true;  // matrix products
  return op;
}

MX_REGISTER_OP(MakeDot());

// ---- sum, mean

// Which axes of a `ndim`-dimensional input are reduced; errors name the
// offending axis.
absl::StatusOr<std::vector<bool>> ReducedAxes(const ParsedParams& p, int ndim) {
  const Shape axes = p.GetShape("axis");
  std::vector<bool> reduced(ndim, axes.ndim() == 0);
  if (axes.ndim() == 0) return reduced;
  for (int64_t axis : axes) {
    const int64_t a = axis < 0 ? axis + ndim : axis;
    if (a < 0 || a >= ndim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "axis ", axis, " is out of range for ", ndim, "-dimensional data"));
    }
    if (reduced[a]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "axis ", axis, " appears twice in axis=", axes.ToString()));
    }
    reduced[a] = true;
  }
  if (p.GetBool("exclude")) reduced.flip();
  return reduced;
}

// The input's shape with reduced axes set to 1: the output's layout.
Shape KeptShape(const Shape& data, const std::vector<bool>& reduced) {
  Shape s = data;
  for (int d = 0; d < data.ndim(); ++d) {
    if (reduced[d]) s[d] = 1;
  }
  return s;
}

absl::Status ReduceInfer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                         ShapeList*) {
  const Shape& data = (*in)[0];
  if (data.ndim() == 0) return absl::OkStatus();
  MX_RETURN_IF_ERROR(AtMostKernelDims(data.ndim(), "a reduction over axes"));
  MX_ASSIGN_OR_RETURN(std::vector<bool> reduced, ReducedAxes(p, data.ndim()));
  Shape o;
  if (p.GetBool("keepdims")) {
    o = KeptShape(data, reduced);
  } else {
    for (int d = 0; d < data.ndim(); ++d) {
      if (!reduced[d]) o.push_back(data[d]);
    }
    if (o.ndim() == 0) o = Shape{1};
  }
  return MergeShape(out, 0, o, "output");
}

// Reductions run over the input with offsets into the kept-shape output:
// the output broadcast over the input's shape.
kernel::BroadcastIndex OutputIndex(const ParsedParams& p, const Shape& data) {
  absl::StatusOr<std::vector<bool>> reduced = ReducedAxes(p, data.ndim());
  MX_CHECK(reduced.ok());  // checked by shape inference
  const Shape kept = KeptShape(data, *reduced);
  return kernel::MakeBroadcastIndex("sum/mean", data, kept, kept);
}

// A reduction over one contiguous run of axes, as kernel::Reduce views its
// input: (outer, n, inner), n the reduced elements per output.
struct OneRun {
  int64_t outer = 1, n = 1, inner = 1;
};
std::optional<OneRun> AsOneRun(const Shape& data, const std::vector<bool>& reduced) {
  int first = -1, last = -1;
  for (int d = 0; d < data.ndim(); ++d) {
    if (!reduced[d]) continue;
    if (first >= 0 && last != d - 1) return std::nullopt;  // a gap: not one run
    if (first < 0) first = d;
    last = d;
  }
  if (first < 0) return std::nullopt;
  OneRun run;
  for (int d = 0; d < data.ndim(); ++d) {
    (d < first ? run.outer : d <= last ? run.n : run.inner) *= data[d];
  }
  return run;
}

// mean's factor, 1 / (elements per output), or 1 for sum.
float MeanScale(bool mean, int64_t outputs, int64_t inputs) {
  return mean ? static_cast<float>(static_cast<double>(outputs) / std::max<int64_t>(inputs, 1))
              : 1.0f;
}

OpDef MakeReduce(const char* name, bool mean) {
  OpDef op;
  op.name = name;
  op.params = {{"axis", ParamSpec::Type::kShape, "()"},
               {"keepdims", ParamSpec::Type::kBool, "False"},
               {"exclude", ParamSpec::Type::kBool, "False"}};
  op.infer_shape = ReduceInfer;
  op.backward_uses_inputs = false;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.gpu = true;
  // Each output element sums its input elements (ReduceBroadcastKernel with
  // op::Add, whose GradA is its g); the gradient spreads back (GatherKernel).
  op.forward = [mean](const OpContext& ctx, const ParsedParams& p,
                      const std::vector<TBlob>& in, const std::vector<OpReq>& req,
                      const std::vector<TBlob>& out, const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    const std::vector<bool> reduced = *ReducedAxes(p, in[0].shape.ndim());
    // On a GPU, one run of axes goes to kernel::Reduce, which spreads each
    // output's elements over many threads: the kernel below gives each
    // output one thread, which leaves a GPU idle on a large sum.
    const std::optional<OneRun> run =
        ctx.ctx.is_gpu() ? AsOneRun(in[0].shape, reduced) : std::nullopt;
    if (run.has_value() && run->n > 0) {
      const bool add = req[0] == OpReq::kAdd;
      if (mean) {
        kernel::Reduce<kernel::MeanReducer>("mean", ctx.ctx, in[0].data, out[0].data, run->outer,
                                            run->n, run->inner, add);
      } else {
        kernel::Reduce<kernel::SumReducer>("sum", ctx.ctx, in[0].data, out[0].data, run->outer,
                                           run->n, run->inner, add);
      }
      return;
    }
    const Shape kept = KeptShape(in[0].shape, reduced);
    kernel::ReduceBroadcastKernel<kernel::op::Add>::Params params{};
    kernel::MakeReductionIndices("sum/mean", in[0].shape, kept, kept, &params.outer,
                                 &params.inner);
    params.out = out[0].data;
    params.g = in[0].data;
    params.scale = MeanScale(mean, out[0].Size(), in[0].Size());
    params.for_a = true;
    params.add = req[0] == OpReq::kAdd;
    kernel::Launch<kernel::ReduceBroadcastKernel<kernel::op::Add>>("sum/mean", ctx.ctx,
                                                                  out[0].Size(), params);
  };
  op.backward = [mean](const OpContext& ctx, const ParsedParams& p,
                       const std::vector<TBlob>& out_grad,
                       const std::vector<TBlob>& in, const std::vector<TBlob>&,
                       const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad,
                       const std::vector<TBlob>&) {
    if (req[0] == OpReq::kNull) return;
    kernel::Launch<kernel::GatherKernel>(
        "sum/mean", ctx.ctx, in[0].Size(),
        {in_grad[0].data, out_grad[0].data, OutputIndex(p, in[0].shape), req[0] == OpReq::kAdd,
         MeanScale(mean, out_grad[0].Size(), in[0].Size())});
  };
  return op;
}

MX_REGISTER_OP(MakeReduce("sum", false));
MX_REGISTER_OP(MakeReduce("mean", true));

// ---- broadcast_add, broadcast_sub, broadcast_mul, broadcast_div: the
// broadcasting kernel and arithmetic functors of ndarray/kernel.h.

absl::Status BroadcastInfer(const ParsedParams&, ShapeList* in, ShapeList* out,
                            ShapeList*) {
  const Shape& l = (*in)[0];
  const Shape& r = (*in)[1];
  if (l.ndim() == 0 || r.ndim() == 0) return absl::OkStatus();
  const int nd = std::max(l.ndim(), r.ndim());
  MX_RETURN_IF_ERROR(AtMostKernelDims(nd, "broadcasting"));
  Shape o;
  for (int d = 0; d < nd; ++d) {
    const int dl = d - (nd - l.ndim()), dr = d - (nd - r.ndim());
    const int64_t a = dl >= 0 ? l[dl] : 1;
    const int64_t b = dr >= 0 ? r[dr] : 1;
    if (a == b || b == 1) {
      o.push_back(a);
    } else if (a == 1) {
      o.push_back(b);
    } else if (a == 0 || b == 0) {
      // An unknown size against a known one above 1: the unknown one is
      // 1 or equal, so the output has the known size.
      o.push_back(std::max(a, b));
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "lhs of shape ", l.ToString(), " and rhs of shape ", r.ToString(),
          " cannot be broadcast together"));
    }
  }
  return MergeShape(out, 0, o, "output");
}

template <typename F>
OpDef MakeBroadcast(const char* name) {
  OpDef op;
  op.name = name;
  op.arguments = Names({"lhs", "rhs"});
  op.infer_shape = BroadcastInfer;
  // Only an input of the output's size can share its memory, and such an
  // input is read at the output's own offsets.
  op.inplace = {{0, 0}, {1, 0}};
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.backward_uses_inputs = F::kGradUsesInputs;
  op.gpu = true;
  op.forward = [name](const OpContext& ctx, const ParsedParams&, const std::vector<TBlob>& in,
                      const std::vector<OpReq>& req, const std::vector<TBlob>& out,
                      const std::vector<TBlob>&) {
    const Shape& full = out[0].shape;
    const kernel::BroadcastIndex ix =
        kernel::MakeBroadcastIndex(name, full, in[0].shape, in[1].shape);
    if (req[0] == OpReq::kWrite) {
      kernel::Launch<kernel::BroadcastKernel<F>>(name, ctx.ctx, full.Size(),
                                                 {out[0].data, in[0].data, in[1].data, ix});
    } else if (req[0] == OpReq::kAdd) {
      kernel::Launch<kernel::BroadcastPutKernel<F>>(
          name, ctx.ctx, full.Size(), {out[0].data, in[0].data, in[1].data, ix, true});
    }
  };
  // Each input's gradient sums the output's over the axes it was broadcast
  // along: one index per element of the input.
  op.backward = [name](const OpContext& ctx, const ParsedParams&,
                       const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
                       const std::vector<TBlob>&, const std::vector<OpReq>& req,
                       const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
    const Shape& full = out_grad[0].shape;
    for (int side = 0; side < 2; ++side) {
      if (req[side] == OpReq::kNull) continue;
      const int other = 1 - side;
      typename kernel::ReduceBroadcastKernel<F>::Params params{};
      kernel::MakeReductionIndices(name, full, in[side].shape, in[other].shape, &params.outer,
                                   &params.inner);
      params.out = in_grad[side].data;
      params.g = out_grad[0].data;
      params.self = F::kGradUsesInputs ? in[side].data : nullptr;
      params.other = F::kGradUsesInputs ? in[other].data : nullptr;
      params.scale = 1.0f;
      params.for_a = side == 0;
      params.add = req[side] == OpReq::kAdd;
      kernel::Launch<kernel::ReduceBroadcastKernel<F>>(name, ctx.ctx, in[side].Size(), params);
    }
  };
  return op;
}

MX_REGISTER_OP(MakeBroadcast<kernel::op::Add>("broadcast_add"));
MX_REGISTER_OP(MakeBroadcast<kernel::op::Sub>("broadcast_sub"));
MX_REGISTER_OP(MakeBroadcast<kernel::op::Mul>("broadcast_mul"));
MX_REGISTER_OP(MakeBroadcast<kernel::op::Div>("broadcast_div"));

}  // namespace
}  // namespace mx::ops
