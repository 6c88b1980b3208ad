// Cases for dot, sum, mean and the broadcast_* operators.
#include <cmath>
#include <string>
#include <vector>

#include "tests/graph/op_harness.h"

namespace mx::testing {
namespace {

// ---- dot

// Element (i, j) of a row-major rows x cols matrix, or of its transpose.
float At(const std::vector<float>& m, int64_t cols, bool trans, int64_t i, int64_t j) {
  return trans ? m[j * cols + i] : m[i * cols + j];
}

// lhs and rhs as stored matrices (rows x cols, before any transpose).
OpCase Dot(const char* name, Shape lhs, Shape rhs, bool ta, bool tb, int64_t l_rows,
           int64_t r_rows) {
  OpCase c;
  c.name = name;
  c.op = "dot";
  c.params = {{"transpose_a", ta}, {"transpose_b", tb}};
  c.inputs = {lhs, rhs};
  const int64_t l_cols = lhs.Size() / l_rows, r_cols = rhs.Size() / r_rows;
  const int64_t m = ta ? l_cols : l_rows, k = ta ? l_rows : l_cols;
  const int64_t n = tb ? r_rows : r_cols;
  c.reference = [=](const HostArrays& in, const HostArrays&) {
    std::vector<float> out(m * n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t q = 0; q < k; ++q) {
          acc += double(At(in[0], l_cols, ta, i, q)) * At(in[1], r_cols, tb, q, j);
        }
        out[i * n + j] = static_cast<float>(acc);
      }
    }
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(Dot("dot", Shape{3, 4}, Shape{4, 5}, false, false, 3, 4));
MX_OP_CASE(Dot("dot_transpose_a", Shape{4, 3}, Shape{4, 5}, true, false, 4, 4));
MX_OP_CASE(Dot("dot_transpose_b", Shape{3, 4}, Shape{5, 4}, false, true, 3, 5));
MX_OP_CASE(Dot("dot_transpose_both", Shape{4, 3}, Shape{2, 4}, true, true, 4, 2));
MX_OP_CASE(Dot("dot_vectors", Shape{6}, Shape{6}, false, false, 1, 6));
MX_OP_CASE(Dot("dot_3d_lhs", Shape{2, 3, 4}, Shape{4, 2}, false, false, 6, 4));
MX_OP_CASE(Dot("dot_3d_rhs_transposed", Shape{3, 4}, Shape{2, 3, 4}, false, true, 3, 6));

// ---- sum, mean

// Unravels flat index i of shape s.
std::vector<int64_t> Coords(const Shape& s, int64_t i) {
  std::vector<int64_t> c(s.ndim());
  for (int d = s.ndim() - 1; d >= 0; --d) {
    c[d] = i % s[d];
    i /= s[d];
  }
  return c;
}

// Reduction over the axes flagged in `reduced`; the output is in row-major
// order of the kept axes.
OpCase Reduce(const char* name, const char* op, Shape data, Params params,
              std::vector<bool> reduced) {
  OpCase c;
  c.name = name;
  c.op = op;
  c.params = std::move(params);
  c.inputs = {data};
  const bool mean = std::string(op) == "mean";
  c.reference = [=](const HostArrays& in, const HostArrays&) {
    int64_t out_size = 1;
    for (int d = 0; d < data.ndim(); ++d) out_size *= reduced[d] ? 1 : data[d];
    std::vector<double> acc(out_size, 0.0);
    for (int64_t i = 0; i < data.Size(); ++i) {
      std::vector<int64_t> co = Coords(data, i);
      int64_t o = 0;
      for (int d = 0; d < data.ndim(); ++d) {
        if (!reduced[d]) o = o * data[d] + co[d];
      }
      acc[o] += in[0][i];
    }
    std::vector<float> out(out_size);
    const double count = static_cast<double>(data.Size()) / out_size;
    for (int64_t o = 0; o < out_size; ++o) {
      out[o] = static_cast<float>(mean ? acc[o] / count : acc[o]);
    }
    return HostArrays{out};
  };
  return c;
}

MX_OP_CASE(Reduce("sum_all", "sum", Shape{3, 4}, {}, {true, true}));
MX_OP_CASE(Reduce("sum_axis1_keepdims", "sum", Shape{2, 3, 4},
                  {{"axis", Shape{1}}, {"keepdims", true}}, {false, true, false}));
MX_OP_CASE(Reduce("sum_negative_axes", "sum", Shape{2, 3, 4}, {{"axis", Shape{0, -1}}},
                  {true, false, true}));
MX_OP_CASE(Reduce("sum_exclude", "sum", Shape{2, 3, 4},
                  {{"axis", Shape{1}}, {"exclude", true}}, {true, false, true}));
MX_OP_CASE(Reduce("mean_all_keepdims", "mean", Shape{3, 4}, {{"keepdims", true}},
                  {true, true}));
MX_OP_CASE(Reduce("mean_axis0", "mean", Shape{4, 3}, {{"axis", Shape{0}}}, {true, false}));
MX_OP_CASE(Reduce("mean_axes_1_2", "mean", Shape{2, 3, 2, 2}, {{"axis", Shape{1, 2}}},
                  {false, true, true, false}));

// ---- broadcast_*

OpCase Broadcast(const char* name, const char* op, Shape lhs, Shape rhs, Shape out_shape,
                 float (*f)(float, float)) {
  OpCase c;
  c.name = name;
  c.op = op;
  c.inputs = {lhs, rhs};
  c.init = [](int, std::vector<float>* v) {
    for (float& x : *v) x = x >= 0 ? x + 0.5f : x - 0.5f;  // away from 0 for div
  };
  c.reference = [=](const HostArrays& in, const HostArrays&) {
    // Index of an output coordinate in an operand right-aligned against it.
    auto index = [&](const Shape& s, const std::vector<int64_t>& co) {
      const int pad = out_shape.ndim() - s.ndim();
      int64_t k = 0;
      for (int d = 0; d < s.ndim(); ++d) k = k * s[d] + (s[d] == 1 ? 0 : co[d + pad]);
      return k;
    };
    std::vector<float> out(out_shape.Size());
    for (int64_t i = 0; i < out_shape.Size(); ++i) {
      std::vector<int64_t> co = Coords(out_shape, i);
      out[i] = f(in[0][index(lhs, co)], in[1][index(rhs, co)]);
    }
    return HostArrays{out};
  };
  return c;
}

float Add(float a, float b) { return a + b; }
float Sub(float a, float b) { return a - b; }
float Mul(float a, float b) { return a * b; }
float Div(float a, float b) { return a / b; }

MX_OP_CASE(Broadcast("broadcast_add", "broadcast_add", Shape{2, 3}, Shape{1, 3}, Shape{2, 3}, Add));
MX_OP_CASE(Broadcast("broadcast_add_same_shape", "broadcast_add", Shape{2, 3}, Shape{2, 3},
                     Shape{2, 3}, Add));
MX_OP_CASE(Broadcast("broadcast_sub_both_ways", "broadcast_sub", Shape{2, 1, 4}, Shape{3, 1},
                     Shape{2, 3, 4}, Sub));
MX_OP_CASE(Broadcast("broadcast_mul_fewer_dims", "broadcast_mul", Shape{3, 4}, Shape{4},
                     Shape{3, 4}, Mul));
MX_OP_CASE(Broadcast("broadcast_mul_column", "broadcast_mul", Shape{3, 1}, Shape{3, 4},
                     Shape{3, 4}, Mul));
MX_OP_CASE(Broadcast("broadcast_div", "broadcast_div", Shape{2, 3, 2}, Shape{1, 3, 1},
                     Shape{2, 3, 2}, Div));
MX_OP_CASE(Broadcast("broadcast_div_lhs_broadcast", "broadcast_div", Shape{1, 3}, Shape{2, 3},
                     Shape{2, 3}, Div));

}  // namespace
}  // namespace mx::testing
