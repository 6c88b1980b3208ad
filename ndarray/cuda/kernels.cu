// The GPU launchers of the kernel layer: the kernels of ndarray/kernel.h,
// compiled for the device from the same source the CPU runs, and
// instantiated for every entry of ndarray/kernel_list.inc.
#include <cuda_runtime.h>

#include "ndarray/cuda/stream.h"
#include "ndarray/kernel.h"
#include "ndarray/nn_kernels.h"
#include "ndarray/sparse_kernels.h"
#include "ndarray/update_kernels.h"

namespace mx::kernel {

namespace {

constexpr int kThreads = 256;

// Enough blocks to cover n with kThreads each, capped: the grid-stride loop
// covers the rest.
unsigned Capped(int64_t blocks) {
  return static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
}

unsigned Blocks(int64_t n) { return Capped((n + kThreads - 1) / kThreads); }

const char* ErrorText(cudaError_t err) {
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename K>
__global__ void MapKernel(int64_t n, typename K::Params p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    K::MapRange(i, i + 1, p);
  }
}

// The block's values combined (a tree in shared memory of kThreads
// doubles); the result is valid in thread 0. Every thread must call it; it
// leaves shared free for reuse.
template <typename R>
__device__ double BlockCombine(double value, double* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = R::Combine(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// Reduces parts of the axis: block b (grid-stride) takes output o =
// b / parts and the k-range of part b % parts; its threads reduce strided
// elements of that range, then combine in shared memory. With kFinal (parts
// == 1) it writes the finalized output (added to out with add), otherwise
// the partial result, which CombineKernel finishes.
template <typename R, bool kFinal>
__global__ void ReduceKernel(const float* in, float* out, double* partial, int64_t outputs,
                             int64_t n, int64_t inner, int64_t parts, bool add) {
  __shared__ double shared[kThreads];
  const int64_t per_part = (n + parts - 1) / parts;
  for (int64_t b = blockIdx.x; b < outputs * parts; b += gridDim.x) {
    const int64_t o = b / parts, part = b % parts;
    const float* base = in + (o / inner) * n * inner + o % inner;
    const int64_t end = (part + 1) * per_part < n ? (part + 1) * per_part : n;
    // Four independent accumulators keep four loads in flight per thread.
    double acc[4] = {R::Init(), R::Init(), R::Init(), R::Init()};
    int64_t k = part * per_part + threadIdx.x;
    const int64_t step = blockDim.x;
    for (; k + 3 * step < end; k += 4 * step) {
      const float x0 = base[k * inner], x1 = base[(k + step) * inner],
                  x2 = base[(k + 2 * step) * inner], x3 = base[(k + 3 * step) * inner];
      acc[0] = R::Reduce(acc[0], x0);
      acc[1] = R::Reduce(acc[1], x1);
      acc[2] = R::Reduce(acc[2], x2);
      acc[3] = R::Reduce(acc[3], x3);
    }
    for (; k < end; k += step) acc[0] = R::Reduce(acc[0], base[k * inner]);
    const double total = BlockCombine<R>(
        R::Combine(R::Combine(acc[0], acc[1]), R::Combine(acc[2], acc[3])), shared);
    if (threadIdx.x == 0) {
      if (kFinal) {
        const float v = R::Finalize(total, n);
        out[o] = add ? out[o] + v : v;
      } else {
        partial[b] = total;
      }
    }
  }
}

// out[o] = the parts of output o combined and finalized: one block per
// output (grid-stride), its threads combining strided parts, then a tree in
// shared memory. (One thread per output, reading thousands of partials one
// after another, took milliseconds for a full reduction.)
template <typename R>
__global__ void CombineKernel(const double* partial, float* out, int64_t outputs, int64_t n,
                              int64_t parts, bool add) {
  __shared__ double shared[kThreads];
  for (int64_t o = blockIdx.x; o < outputs; o += gridDim.x) {
    double acc = R::Init();
    for (int64_t p = threadIdx.x; p < parts; p += blockDim.x) {
      acc = R::Combine(acc, partial[o * parts + p]);
    }
    const double total = BlockCombine<R>(acc, shared);
    if (threadIdx.x == 0) {
      const float v = R::Finalize(total, n);
      out[o] = add ? out[o] + v : v;
    }
  }
}

// Forgets a failure an earlier call on this thread left behind that did
// not break the device (an allocation refused, say): the runtime keeps it
// until read, and cudaGetLastError after a launch would blame the launch.
// A fault that did break the device comes back from every later call.
void ClearLastError() { cudaGetLastError(); }

// Parts per output: enough blocks to fill the GPU when there are few
// outputs, each part at least 4096 elements long.
int64_t Parts(int64_t outputs, int64_t n) {
  constexpr int64_t kWantBlocks = 4096, kMinPart = 4096;
  if (outputs >= kWantBlocks) return 1;
  int64_t parts = (kWantBlocks + outputs - 1) / outputs;
  const int64_t by_length = (n + kMinPart - 1) / kMinPart;
  if (parts > by_length) parts = by_length;
  return parts < 1 ? 1 : parts;
}

}  // namespace

template <typename K>
const char* GpuLaunch(int device, int64_t n, const typename K::Params& params) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return ErrorText(err);
  ClearLastError();
  MapKernel<K><<<Blocks(n), kThreads, 0, internal::cuda::ComputeStream(device)>>>(n, params);
  return ErrorText(cudaGetLastError());
}

template <typename R>
const char* GpuReduce(int device, const float* in, float* out, int64_t outer, int64_t n,
                      int64_t inner, bool add) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return ErrorText(err);
  ClearLastError();
  cudaStream_t stream = internal::cuda::ComputeStream(device);
  const int64_t outputs = outer * inner, parts = Parts(outputs, n);
  if (parts == 1) {
    ReduceKernel<R, true><<<Capped(outputs), kThreads, 0, stream>>>(in, out, nullptr, outputs, n,
                                                                      inner, 1, add);
    return ErrorText(cudaGetLastError());
  }
  // The partial results live in stream-ordered memory, freed after use.
  double* partial = nullptr;
  err = internal::cuda::MallocScratch(reinterpret_cast<void**>(&partial),
                                      sizeof(double) * outputs * parts, device, stream);
  if (err != cudaSuccess) return ErrorText(err);
  ReduceKernel<R, false><<<Capped(outputs * parts), kThreads, 0, stream>>>(
      in, nullptr, partial, outputs, n, inner, parts, add);
  CombineKernel<R><<<Capped(outputs), kThreads, 0, stream>>>(partial, out, outputs, n, parts, add);
  err = cudaGetLastError();
  cudaFreeAsync(partial, stream);
  return ErrorText(err);
}

#define MX_KERNEL(K) template const char* GpuLaunch<K>(int, int64_t, const K::Params&);
#define MX_REDUCER(R) \
  template const char* GpuReduce<R>(int, const float*, float*, int64_t, int64_t, int64_t, bool);
#include "ndarray/kernel_list.inc"
#undef MX_KERNEL
#undef MX_REDUCER

}  // namespace mx::kernel
