// Running the kernels of ndarray/kernel.h on a context, and the host-side
// helpers that set them up (broadcast indices, reductions, the mapping of
// row-major products onto column-major BLAS).
//
// Launch and Reduce run synchronously on the CPU; on a GPU they enqueue work
// on the device's compute stream and return, and the engine completes the
// operation once the stream has run it (internal::PushKernel). Launch errors
// throw mx::Error naming the kernel and the context.
#ifndef MX_NDARRAY_LAUNCH_H_
#define MX_NDARRAY_LAUNCH_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "ndarray/base.h"
#include "ndarray/context.h"
#include "ndarray/engine.h"
#include "ndarray/kernel.h"
#include "ndarray/parallel.h"

namespace mx::kernel {

// Pushes fn to the engine as an operation on ctx that reads `reads` and
// writes `writes`. fn may throw; the error is stored on `writes`. On a CPU
// fn is the whole operation; on gpu(i) fn enqueues work on the device's
// compute stream (Launch, Reduce, GpuSgemm) and the operation completes once
// the stream has run it, with any error the device reports then.
void Push(const char* name, Context ctx, std::vector<VarHandle> reads,
          std::vector<VarHandle> writes, std::function<void()> fn, int priority = 0,
          FnProperty prop = FnProperty::kNormal);

// Throws mx::Error(kInternal) "<name> on <ctx>: <error>" unless error is null.
void ThrowIfLaunchFailed(const char* error, const char* name, Context ctx);

// On the CPU, Launch splits kernels over this many elements or more into
// ranges on the CPU pool (ParallelRanges): a large element-wise operation
// (LeNet's first Activation: 1.15M elements) usually stands alone between
// two products, with nothing beside it for the other cores to run.
inline constexpr int64_t kSplitElements = int64_t{1} << 16;

// Runs kernel K over [0, n) on ctx. On the CPU, with `split` and from
// kSplitElements elements on (n * index_cost: the elements each index
// touches, 1 for element-wise kernels), as ranges on the CPU pool, else as
// one call on this thread. Indices are independent, so the result is the
// same either way.
template <typename K>
void Launch(const char* name, Context ctx, int64_t n, const typename K::Params& params,
            bool split = true, int64_t index_cost = 1) {
  if (n <= 0) return;
  if (ctx.is_gpu()) {
    ThrowIfLaunchFailed(GpuLaunch<K>(ctx.device_id, n, params), name, ctx);
    return;
  }
  // Each call reads a copy of the parameters of its own: through a
  // reference, every store of the kernel might change them (a float field
  // such as BinaryGradKernel's s), so the compiler reloads them in the loop
  // and does not vectorize it (that kernel ran 2x slower split).
  const int64_t cost = std::max<int64_t>(index_cost, 1);
  if (!split || n * cost < kSplitElements) {
    const typename K::Params local = params;
    K::MapRange(0, n, local);
    return;
  }
  ParallelRanges(n, (kSplitElements / 2 + cost - 1) / cost, [&](int64_t begin, int64_t end) {
    const typename K::Params local = params;
    K::MapRange(begin, end, local);
  });
}

// out[o * inner + i] = R over k of in[(o * n + k) * inner + i], for an input
// viewed as (outer, n, inner); with add, the result is added to out. On the
// CPU the loop runs k outside and i inside, so rows are read in order and
// the accumulation vectorizes.
template <typename R>
void Reduce(const char* name, Context ctx, const float* in, float* out, int64_t outer,
            int64_t n, int64_t inner, bool add = false) {
  if (outer * inner == 0) return;
  if (ctx.is_gpu()) {
    ThrowIfLaunchFailed(GpuReduce<R>(ctx.device_id, in, out, outer, n, inner, add), name, ctx);
    return;
  }
  std::vector<double> acc(inner);
  for (int64_t o = 0; o < outer; ++o) {
    for (double& a : acc) a = R::Init();
    const float* block = in + o * n * inner;
    for (int64_t k = 0; k < n; ++k) {
      const float* row = block + k * inner;
      for (int64_t i = 0; i < inner; ++i) acc[i] = R::Reduce(acc[i], row[i]);
    }
    float* row = out + o * inner;
    for (int64_t i = 0; i < inner; ++i) {
      const float v = R::Finalize(acc[i], n);
      row[i] = add ? row[i] + v : v;
    }
  }
}

// The shape of `a op b` under NumPy broadcasting; throws mx::Error naming op
// and both shapes when they do not broadcast.
Shape BroadcastShape(const char* op, const Shape& a, const Shape& b);

// Element strides of an array of shape `in` read through the broadcast shape
// `out` (right-aligned; 0 where `in` has size 1 and `out` does not).
std::vector<int64_t> BroadcastStrides(const Shape& in, const Shape& out);

// The index of out = a op b for the kernels. Throws mx::Error naming op when
// out has more than kMaxBroadcastDims dimensions.
BroadcastIndex MakeBroadcastIndex(const char* op, const Shape& out, const Shape& a,
                                  const Shape& b);

// The two indices of ReduceBroadcastKernel (ndarray/nn_kernels.h) for an
// operand of shape `operand` broadcast to `full`, beside an `other` operand
// (also broadcast to full; pass `operand` when there is none). `outer` runs
// over the operand's elements, `inner` over the positions of `full` that one
// of them is broadcast to; in both, sa steps through a contiguous array of
// shape full and sb through `other`. Throws mx::Error naming op beyond
// kMaxBroadcastDims dimensions.
void MakeReductionIndices(const char* op, const Shape& full, const Shape& operand,
                          const Shape& other, BroadcastIndex* outer, BroadcastIndex* inner);

// C = alpha * op(A) * op(B) + beta * C in row-major storage, stated as the
// column-major call that computes it (BLAS libraries such as cuBLAS are
// column-major): a row-major matrix is the column-major transpose, so the
// call computes Cᵀ = op(B)ᵀ op(A)ᵀ with the operands swapped and the same
// transpose flags. The CPU tests check this mapping through cblas.
struct ColMajorGemm {
  bool trans_first, trans_second;
  int64_t m, n, k;  // of the column-major call
  const float* first;
  int64_t ld_first;
  const float* second;
  int64_t ld_second;
  float* c;
  int64_t ldc;
};
ColMajorGemm RowMajorAsColMajor(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                                const float* a, int64_t lda, const float* b, int64_t ldb,
                                float* c, int64_t ldc);

// C = alpha * op(A) * op(B) + beta * C on ctx, row-major, C contiguous
// (m x n), beta 0 or 1: oneDNN's sgemm on the CPU pool (Sgemm, ndarray/parallel.h)
// or cuBLAS on the GPU's compute stream. Any of m, n, k may be 0 (k == 0
// leaves beta * C). The one product of NDArray's Dot and the operators.
void Gemm(const char* name, Context ctx, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
          float beta, float* c);

// Runs the product on gpu(device)'s compute stream through cuBLAS; nullptr
// or the error's text. Defined in ndarray/cuda (or no_cuda.cc).
const char* GpuSgemm(int device, const ColMajorGemm& call, float alpha, float beta);

// One NCCL collective over the GPUs of a GpuCollectives call (rank i is its
// devices[i]): kReduceSum sums every rank's sends[i] into recv on rank
// `root`; kBroadcast copies send (on rank `root`) into every rank's
// recvs[i]; kAllReduceSum sums every rank's sends[i] into every rank's
// recvs[i] (gpu_bench's baseline: NCCL's own all-reduce). n floats each.
struct GpuCollective {
  enum Kind { kReduceSum, kBroadcast, kAllReduceSum };
  Kind kind = kReduceSum;
  int root = 0;
  int64_t n = 0;
  std::vector<const float*> sends;  // kReduceSum, kAllReduceSum: one per rank
  float* recv = nullptr;            // kReduceSum: on the root
  const float* send = nullptr;      // kBroadcast: on the root
  std::vector<float*> recvs;        // kBroadcast, kAllReduceSum: one per rank
};

// Enqueues `calls` on the compute streams of `devices` (distinct GPUs) as
// one NCCL group, through one communicator per device set (made at the set's
// first call). Calls from every thread are serialized, so that all devices
// see them in the same order, as NCCL requires. NCCL is loaded with dlopen
// at the first call. nullptr or the error's text. Defined in ndarray/cuda
// (or no_cuda.cc).
const char* GpuCollectives(const std::vector<int>& devices,
                           const std::vector<GpuCollective>& calls);

// Pushes `calls` over `devices` (GpuCollectives) to the engine as one
// operation on ctx (one of the devices) that reads `reads` and writes
// `writes`; it completes once every device's stream has run its part, and
// an error (NCCL's, or a device's) is stored on `writes`, named `name`.
void PushCollectives(const char* name, Context ctx, std::vector<int> devices,
                     std::vector<GpuCollective> calls, std::vector<VarHandle> reads,
                     std::vector<VarHandle> writes, int priority = 0);

}  // namespace mx::kernel

#endif  // MX_NDARRAY_LAUNCH_H_
