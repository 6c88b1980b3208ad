// The GPU launchers of the kernel layer: the kernels of ndarray/kernel.h,
// compiled for the device from the same source the CPU runs, and
// instantiated for every entry of ndarray/kernel_list.inc.
#include <cuda_runtime.h>

#include "ndarray/cuda/stream.h"
#include "ndarray/kernel.h"

namespace mx::kernel {

namespace {

constexpr int kThreads = 256;

// Enough blocks to cover n with kThreads each, capped: the grid-stride loop
// covers the rest.
unsigned Blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
}

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

// One block per output element (grid-stride over outputs): its threads
// reduce strided parts of the axis, then combine in shared memory.
template <typename R>
__global__ void ReduceKernel(const float* in, float* out, int64_t outer, int64_t n,
                             int64_t inner) {
  __shared__ double partial[kThreads];
  for (int64_t o = blockIdx.x; o < outer * inner; o += gridDim.x) {
    const float* base = in + (o / inner) * n * inner + o % inner;
    double acc = R::Init();
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) acc = R::Reduce(acc, base[k * inner]);
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        partial[threadIdx.x] = R::Combine(partial[threadIdx.x], partial[threadIdx.x + s]);
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) out[o] = R::Finalize(partial[0], n);
    __syncthreads();
  }
}

}  // namespace

template <typename K>
const char* GpuLaunch(int device, int64_t n, const typename K::Params& params) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return ErrorText(err);
  MapKernel<K><<<Blocks(n), kThreads, 0, internal::cuda::ComputeStream(device)>>>(n, params);
  return ErrorText(cudaGetLastError());
}

template <typename R>
const char* GpuReduce(int device, const float* in, float* out, int64_t outer, int64_t n,
                      int64_t inner) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return ErrorText(err);
  const int64_t outputs = outer * inner;
  const unsigned blocks = static_cast<unsigned>(outputs < (1 << 20) ? outputs : (1 << 20));
  ReduceKernel<R><<<blocks, kThreads, 0, internal::cuda::ComputeStream(device)>>>(
      in, out, outer, n, inner);
  return ErrorText(cudaGetLastError());
}

#define MX_KERNEL(K) template const char* GpuLaunch<K>(int, int64_t, const K::Params&);
#define MX_REDUCER(R) \
  template const char* GpuReduce<R>(int, const float*, float*, int64_t, int64_t, int64_t);
#include "ndarray/kernel_list.inc"
#undef MX_KERNEL
#undef MX_REDUCER

}  // namespace mx::kernel
