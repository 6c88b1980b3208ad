// Internal: the geometry of a 2-D sliding window over NCHW data, shared by
// Convolution and Pooling.
#ifndef MX_GRAPH_OPS_WINDOW2D_H_
#define MX_GRAPH_OPS_WINDOW2D_H_

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "graph/op.h"

namespace mx::ops {

// Kernel size, stride, zero padding (each side) and dilation along (y, x).
struct Window2D {
  int64_t kernel[2] = {1, 1};
  int64_t stride[2] = {1, 1};
  int64_t pad[2] = {0, 0};
  int64_t dilate[2] = {1, 1};

  // Input rows (d = 0) or columns (d = 1) one kernel application spans.
  int64_t Extent(int d) const { return dilate[d] * (kernel[d] - 1) + 1; }
};

// Reads the 2-D tuple parameter `name` into dst[0..1]. An empty tuple "()"
// (MXNet's way of saying "default") leaves dst unchanged. Every value must
// be at least `min`. Errors name the parameter; the caller adds the
// operator.
inline absl::Status Get2D(const ParsedParams& p, const std::string& name,
                          int64_t min, int64_t dst[2]) {
  Shape s = p.GetShape(name);
  if (s.ndim() == 0) return absl::OkStatus();
  if (s.ndim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parameter ", name, "=", s.ToString(), " has ", s.ndim(),
        " dimensions; only 2-D windows (y, x) are supported"));
  }
  for (int d = 0; d < 2; ++d) {
    if (s[d] < min) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter ", name, "=", s.ToString(), " must be at least ", min,
          " in every dimension"));
    }
    dst[d] = s[d];
  }
  return absl::OkStatus();
}

// Output extent of a window sliding over `in` (which must be known and at
// least the window's extent after padding) along dimension d; `ceil` rounds
// partial final steps up (MXNet's pooling_convention=full).
inline int64_t WindowOutput(const Window2D& w, int d, int64_t in, bool ceil) {
  const int64_t span = in + 2 * w.pad[d] - w.Extent(d);
  return 1 + (ceil ? (span + w.stride[d] - 1) / w.stride[d] : span / w.stride[d]);
}

// The output positions o in [*lo, *hi) (clipped to [0, out)) whose input
// position o * stride + offset lies inside [0, size); the others read
// padding.
inline void ValidRange(int64_t offset, int64_t stride, int64_t size, int64_t out,
                       int64_t* lo, int64_t* hi) {
  *lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  *hi = size - 1 - offset >= 0 ? (size - 1 - offset) / stride + 1 : 0;
  *lo = std::min(*lo, out);
  *hi = std::clamp(*hi, *lo, out);
}

}  // namespace mx::ops

#endif  // MX_GRAPH_OPS_WINDOW2D_H_
