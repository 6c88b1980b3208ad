#include "ndarray/cuda/fill.cuh"

#include <cuda_runtime.h>

namespace mx::internal::cuda {

namespace {
__global__ void FillKernel(float* dst, float value, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    dst[i] = value;
  }
}
}  // namespace

int LaunchFill(float* dst, float value, size_t n) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  size_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  FillKernel<<<static_cast<unsigned>(blocks), kThreads>>>(dst, value, n);
  return cudaGetLastError();
}

}  // namespace mx::internal::cuda
