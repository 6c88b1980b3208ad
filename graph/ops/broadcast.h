// Internal: row-major iteration over a shape while tracking offsets into
// arrays broadcast over it (NumPy rules), for the broadcast_* operators, the
// reductions and Dropout's shared masks.
#ifndef MX_GRAPH_OPS_BROADCAST_H_
#define MX_GRAPH_OPS_BROADCAST_H_

#include <cstdint>
#include <vector>

#include "ndarray/base.h"

namespace mx::ops {

// Strides of an array of shape `shape` read as if it had shape `full`:
// `shape` is right-aligned against `full` (missing leading dimensions count
// as 1), and a dimension of size 1 where `full` is larger gets stride 0.
// Requires every dimension of `shape` to be 1 or equal to `full`'s.
inline std::vector<int64_t> BroadcastStrides(const Shape& shape,
                                             const Shape& full) {
  const int nd = full.ndim();
  const int pad = nd - shape.ndim();
  std::vector<int64_t> strides(nd, 0);
  int64_t s = 1;
  for (int d = nd - 1; d >= pad; --d) {
    const int64_t dim = shape[d - pad];
    strides[d] = dim == 1 && full[d] != 1 ? 0 : s;
    s *= dim;
  }
  return strides;
}

// Calls f(i, a, b) for every element i of `full` in row-major order, where
// a and b are the offsets given by strides `sa` and `sb` (one per
// dimension of `full`).
template <typename F>
void ForEachBroadcast(const Shape& full, const std::vector<int64_t>& sa,
                      const std::vector<int64_t>& sb, F f) {
  const int nd = full.ndim();
  const int64_t n = full.Size();
  std::vector<int64_t> coord(nd, 0);
  int64_t a = 0, b = 0;
  for (int64_t i = 0; i < n; ++i) {
    f(i, a, b);
    for (int d = nd - 1; d >= 0; --d) {
      if (++coord[d] < full[d]) {
        a += sa[d];
        b += sb[d];
        break;
      }
      a -= sa[d] * (full[d] - 1);
      b -= sb[d] * (full[d] - 1);
      coord[d] = 0;
    }
  }
}

}  // namespace mx::ops

#endif  // MX_GRAPH_OPS_BROADCAST_H_
