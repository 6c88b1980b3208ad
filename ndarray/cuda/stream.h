// Internal: the CUDA streams on which each GPU runs mx's kernels, library
// calls (cuBLAS, cuDNN, NCCL) and copies, in engine order. Compiled only
// with CUDA.
#ifndef MX_NDARRAY_CUDA_STREAM_H_
#define MX_NDARRAY_CUDA_STREAM_H_

#include <cuda_runtime.h>

namespace mx::internal::cuda {

// A GPU's streams: kernels and library calls run on its compute stream;
// copies into it (from the host or a peer) on its copy-in stream, copies
// out to the host on its copy-out stream (DeviceApi::CopyAsync), so that
// both directions overlap computation and each other.
enum class StreamKind { kCompute = 0, kCopyIn = 1, kCopyOut = 2 };
inline constexpr int kStreamKinds = 3;

// gpu(device)'s stream of `kind`, created on first use (non-blocking: it
// does not wait for the legacy default stream, and the engine orders work
// on it against everything else). Thread-safe. nullptr if creation failed;
// work then goes to the default stream and fails there with the same error.
cudaStream_t Stream(int device, StreamKind kind);

inline cudaStream_t ComputeStream(int device) { return Stream(device, StreamKind::kCompute); }

}  // namespace mx::internal::cuda

#endif  // MX_NDARRAY_CUDA_STREAM_H_
