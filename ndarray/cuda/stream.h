// Internal: the CUDA stream on which each GPU runs mx's kernels and library
// calls (cuBLAS, cuDNN, NCCL), in engine order. Copies run on the GPU's
// copy streams (cuda_device.cc, DeviceApi::CopyAsync). Compiled only with
// CUDA.
#ifndef MX_NDARRAY_CUDA_STREAM_H_
#define MX_NDARRAY_CUDA_STREAM_H_

#include <cuda_runtime.h>

namespace mx::internal::cuda {

// The most GPUs mx uses in a process (DeviceApi::DeviceCount caps the count
// found): what per-device tables (streams, library handles) hold.
constexpr int kMaxDevices = 64;

// gpu(device)'s compute stream, created on first use (non-blocking: it does
// not wait for the legacy default stream, and the engine orders work on it
// against everything else). Thread-safe. nullptr if creation failed; work
// then goes to the default stream and fails there with the same error.
cudaStream_t ComputeStream(int device);

// cudaMallocAsync of scratch memory on gpu(device)'s `stream`; when the
// device is full, the blocks Storage keeps pooled there are given back
// (internal::PooledMemoryReleaser) and it tries once more.
cudaError_t MallocScratch(void** p, size_t bytes, int device, cudaStream_t stream);

}  // namespace mx::internal::cuda

#endif  // MX_NDARRAY_CUDA_STREAM_H_
