// Row kernels of row-sparse arrays (ndarray/row_sparse.h), in the kernel
// layer's form (ndarray/kernel.h): one element of a (rows x dim) block per
// index. `pos` maps each row of the compact operand to a row of the other
// (positions, not ids); they are unique, so no two indices write one
// element. This header includes no CUDA or abseil header.
#ifndef MX_NDARRAY_SPARSE_KERNELS_H_
#define MX_NDARRAY_SPARSE_KERNELS_H_

#include "ndarray/kernel.h"

namespace mx::kernel {

// What the three row kernels below take: rows of `dim` floats moved
// between src and dst at the positions pos.
struct RowsParams {
  float* dst;
  const float* src;
  const int64_t* pos;
  int64_t dim;
};

// dst[pos[r], c] += src[r, c] for r < n / dim: a row-sparse array (or a
// sum's next term) added into dense rows.
struct ScatterAddRowsKernel {
  using Params = RowsParams;
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / p.dim, c = i - r * p.dim;
      p.dst[p.pos[r] * p.dim + c] += p.src[i];
    }
  }
};

// dst[pos[r], c] = src[r, c]: rows written into dense rows.
struct ScatterRowsKernel {
  using Params = RowsParams;
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / p.dim, c = i - r * p.dim;
      p.dst[p.pos[r] * p.dim + c] = p.src[i];
    }
  }
};

// dst[r, c] = pos[r] >= 0 ? src[pos[r], c] : 0: rows gathered from a dense
// or compact array (a missing row reads as zero).
struct GatherRowsKernel {
  using Params = RowsParams;
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / p.dim, c = i - r * p.dim;
      p.dst[i] = p.pos[r] >= 0 ? p.src[p.pos[r] * p.dim + c] : 0.f;
    }
  }
};

// dst[r, c] = a[r, c] * b[pos[r], c]: a row-sparse array times the same rows
// of a dense one.
struct MulRowsKernel {
  struct Params {
    float* dst;
    const float* a;
    const float* b;
    const int64_t* pos;
    int64_t dim;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / p.dim, c = i - r * p.dim;
      p.dst[i] = p.a[i] * p.b[p.pos[r] * p.dim + c];
    }
  }
};

// out[i] = low + (high - low) * u with u drawn for element `offset + i` of
// a table (UniformKernel's numbers, shifted to a range of the table).
struct UniformAtKernel {
  struct Params {
    float* out;
    uint64_t seed;
    int64_t offset;
    float low, high;
  };
  MX_XINLINE static void MapRange(int64_t begin, int64_t end, const Params& p) {
    const float scale = p.high - p.low;
    for (int64_t i = begin; i < end; ++i) {
      p.out[i] = p.low + scale * UnitFloat(PhiloxAt(p.seed, p.offset + i).v[0]);
    }
  }
};

}  // namespace mx::kernel

#endif  // MX_NDARRAY_SPARSE_KERNELS_H_
