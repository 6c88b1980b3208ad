// Cases for the operators that only move elements: Flatten, Reshape, Concat
// and transpose.
#include <string>
#include <vector>

#include "tests/graph/op_harness.h"

namespace mx::testing {
namespace {

// Flatten and Reshape keep the elements in order.
OpCase SameOrder(const char* name, const char* op, Params params, Shape data) {
  OpCase c;
  c.name = name;
  c.op = op;
  c.params = std::move(params);
  c.inputs = {data};
  c.reference = [](const HostArrays& in, const HostArrays&) { return HostArrays{in[0]}; };
  return c;
}

MX_OP_CASE(SameOrder("Flatten", "Flatten", {}, Shape{2, 3, 4}));
MX_OP_CASE(SameOrder("Flatten_4d", "Flatten", {}, Shape{2, 3, 2, 2}));
MX_OP_CASE(SameOrder("Reshape", "Reshape", {{"shape", Shape{3, -1}}}, Shape{2, 3, 2}));
MX_OP_CASE(SameOrder("Reshape_keep_first", "Reshape", {{"shape", Shape{0, -1}}},
                     Shape{2, 3, 4}));
MX_OP_CASE(SameOrder("Reshape_merge_copy_rest", "Reshape", {{"shape", Shape{-3, -2}}},
                     Shape{2, 3, 4, 5}));
MX_OP_CASE(SameOrder("Reshape_split", "Reshape", {{"shape", "(-4, 2, -1, -2)"}},
                     Shape{6, 4, 5}));
MX_OP_CASE(SameOrder("Reshape_reverse", "Reshape",
                     {{"shape", Shape{-1, 0}}, {"reverse", true}}, Shape{2, 5, 4}));

// Row-major strides of s.
std::vector<int64_t> Strides(const Shape& s) {
  std::vector<int64_t> st(s.ndim(), 1);
  for (int d = s.ndim() - 2; d >= 0; --d) st[d] = st[d + 1] * s[d + 1];
  return st;
}

// Index of flat element `flat` of shape s.
std::vector<int64_t> Unravel(int64_t flat, const Shape& s) {
  std::vector<int64_t> idx(s.ndim());
  for (int d = s.ndim() - 1; d >= 0; --d) {
    idx[d] = flat % s[d];
    flat /= s[d];
  }
  return idx;
}

OpCase Concat(const char* name, std::vector<Shape> inputs, int dim) {
  OpCase c;
  c.name = name;
  c.op = "Concat";
  c.params = {{"num_args", static_cast<int>(inputs.size())}};
  if (dim != 1) c.params.push_back({"dim", dim});
  c.inputs = inputs;
  c.reference = [inputs, dim](const HostArrays& in, const HostArrays&) {
    const int ndim = inputs[0].ndim();
    const int axis = dim < 0 ? dim + ndim : dim;
    Shape out = inputs[0];
    out[axis] = 0;
    for (const Shape& s : inputs) out[axis] += s[axis];
    std::vector<float> o(out.Size());
    const std::vector<int64_t> st = Strides(out);
    int64_t start = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      for (int64_t k = 0; k < inputs[i].Size(); ++k) {
        std::vector<int64_t> idx = Unravel(k, inputs[i]);
        idx[axis] += start;
        int64_t flat = 0;
        for (int d = 0; d < ndim; ++d) flat += idx[d] * st[d];
        o[flat] = in[i][k];
      }
      start += inputs[i][axis];
    }
    return HostArrays{o};
  };
  return c;
}

MX_OP_CASE(Concat("Concat", {Shape{2, 3, 4}, Shape{2, 1, 4}, Shape{2, 2, 4}}, 1));
MX_OP_CASE(Concat("Concat_dim0", {Shape{2, 3}, Shape{4, 3}}, 0));
MX_OP_CASE(Concat("Concat_last_negative", {Shape{2, 2, 3}, Shape{2, 2, 1}}, -1));

// axes: empty reverses.
OpCase Transpose(const char* name, Shape data, std::vector<int> axes) {
  OpCase c;
  c.name = name;
  c.op = "transpose";
  if (!axes.empty()) {
    Shape a;
    for (int x : axes) a.push_back(x);
    c.params = {{"axes", a}};
  } else {
    for (int d = data.ndim() - 1; d >= 0; --d) axes.push_back(d);
  }
  c.inputs = {data};
  c.reference = [data, axes](const HostArrays& in, const HostArrays&) {
    const int ndim = data.ndim();
    Shape out;
    for (int i = 0; i < ndim; ++i) out.push_back(data[axes[i]]);
    const std::vector<int64_t> st = Strides(data);
    std::vector<float> o(out.Size());
    for (int64_t k = 0; k < out.Size(); ++k) {
      std::vector<int64_t> idx = Unravel(k, out);
      int64_t flat = 0;
      for (int i = 0; i < ndim; ++i) flat += idx[i] * st[axes[i]];
      o[k] = in[0][flat];
    }
    return HostArrays{o};
  };
  return c;
}

MX_OP_CASE(Transpose("transpose", Shape{2, 3, 4}, {}));
MX_OP_CASE(Transpose("transpose_2d", Shape{3, 5}, {1, 0}));
MX_OP_CASE(Transpose("transpose_nchw_to_nhwc", Shape{2, 3, 2, 4}, {0, 2, 3, 1}));

}  // namespace
}  // namespace mx::testing
