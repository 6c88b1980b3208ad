// Internal: the memory operations of one kind of device.
//
// The CPU implementation is always present; the GPU one exists only in builds
// with CUDA (ndarray/cuda/), so no CUDA header reaches this file or any public
// header. All functions are thread-safe.
#ifndef MX_NDARRAY_DEVICE_H_
#define MX_NDARRAY_DEVICE_H_

#include <atomic>
#include <cstddef>
#include <functional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ndarray/context.h"

namespace mx::internal {

class DeviceApi {
 public:
  virtual ~DeviceApi() = default;
  // Number of devices of this kind.
  virtual int DeviceCount() = 0;
  // Allocates bytes on device `id`, aligned to at least 64 bytes.
  // ResourceExhausted when the device is out of memory.
  virtual absl::StatusOr<void*> Alloc(int id, size_t bytes) = 0;
  virtual void Free(int id, void* ptr) = 0;
  // Copies bytes between two contexts, at least one of which is this device
  // kind (or both host). Blocks until the copy is complete.
  virtual absl::Status Copy(void* dst, Context dst_ctx, const void* src,
                            Context src_ctx, size_t bytes) = 0;
  // Copies as Copy does, and calls done exactly once, from any thread, when
  // the copy is complete: OK or the error. A GPU runs it on a stream: a copy
  // within one GPU on that GPU's compute stream, one into a GPU (from the
  // host or another GPU) on the destination's copy-in stream, one out to the
  // host on the source's copy-out stream, so copies overlap computation and
  // each other. It returns once the copy is enqueued where the host side is
  // pinned (cpu_pinned) and the bytes have left pageable host memory
  // otherwise (the driver stages them). The CPU copies at once. done must
  // not call into the device.
  virtual void CopyAsync(void* dst, Context dst_ctx, const void* src, Context src_ctx, size_t bytes,
                         std::function<void(absl::Status)> done) = 0;
  // Calls done exactly once, from any thread, when all work enqueued so far
  // on device id's compute stream has run: OK, or the error the device
  // reported. done must not call into the device. The CPU has no stream and
  // calls done at once.
  virtual void WhenStreamDone(int id, std::function<void(absl::Status)> done) = 0;
};

// A GPU's streams (ndarray/cuda/stream.h): kernels and library calls run on
// its compute stream; copies into it (from the host or a peer) on its
// copy-in stream, copies out to the host on its copy-out stream, so that
// both directions overlap computation and each other.
enum class StreamKind { kCompute = 0, kCopyIn = 1, kCopyOut = 2 };
inline constexpr int kStreamKinds = 3;

// Where DeviceApi::CopyAsync runs a copy from src_ctx to dst_ctx, at least
// one of them a GPU: on the destination GPU (copy-in stream, or compute
// stream within one GPU), else on the source GPU (copy-out stream).
struct CopyPlace {
  int device;
  StreamKind stream;
};
inline CopyPlace CopyPlaceFor(Context dst_ctx, Context src_ctx) {
  if (!dst_ctx.is_gpu()) return {src_ctx.device_id, StreamKind::kCopyOut};
  if (dst_ctx == src_ctx) return {dst_ctx.device_id, StreamKind::kCompute};
  return {dst_ctx.device_id, StreamKind::kCopyIn};
}

// The host implementation.
DeviceApi* CpuDeviceApi();
// The CUDA implementation, or nullptr in a build without CUDA.
DeviceApi* GpuDeviceApi();
// Page-locked host memory through CUDA (cudaHostAlloc), or nullptr in a
// build without CUDA. Needs a usable GPU.
DeviceApi* PinnedHostApi();
// The implementation for ctx's device type (nullptr for an unbuilt GPU;
// the host's for cpu_pinned where no GPU is usable).
DeviceApi* DeviceApiFor(Context ctx);

// What gives the blocks Storage keeps pooled on a context back to its
// device (Storage::Get() installs it; nullptr before). Memory taken outside
// Storage, in stream-ordered scratch (internal::cuda::MallocScratch),
// calls it when the device is full and tries once more, as a failed
// Storage::Alloc does: pooled blocks counted as taken made cuDNN settle for
// slower algorithms, and reductions fail, with gigabytes free in the pool.
inline std::atomic<void (*)(Context)>& PooledMemoryReleaser() {
  static std::atomic<void (*)(Context)> release{nullptr};
  return release;
}

}  // namespace mx::internal

#endif  // MX_NDARRAY_DEVICE_H_
