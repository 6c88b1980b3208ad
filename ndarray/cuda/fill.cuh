// Internal: CUDA kernels of the NDArray runtime, callable from host code
// compiled without nvcc.
#ifndef MX_NDARRAY_CUDA_FILL_CUH_
#define MX_NDARRAY_CUDA_FILL_CUH_

#include <cstddef>

namespace mx::internal::cuda {
// Launches a fill of n floats on the current device's default stream and
// returns the cudaError_t of the launch as an int.
int LaunchFill(float* dst, float value, size_t n);
}  // namespace mx::internal::cuda

#endif  // MX_NDARRAY_CUDA_FILL_CUH_
