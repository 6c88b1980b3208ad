// The GPU DeviceApi over the CUDA runtime, page-locked host memory, each
// device's streams and the threads that report when a stream has run its
// work. Compiled only with CUDA.
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "ndarray/base.h"
#include "ndarray/cuda/stream.h"
#include "ndarray/device.h"

namespace mx::internal {

namespace {

using cuda::kMaxDevices;

// gpu(device)'s stream of `kind` (StreamKind, ndarray/device.h), created on
// first use, non-blocking as the compute stream is (stream.h).
cudaStream_t Stream(int device, StreamKind kind);

std::string Where(const char* what, int id) { return absl::StrCat(what, " on gpu(", id, ")"); }

absl::Status CudaStatus(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return absl::OkStatus();
  absl::StatusCode code = err == cudaErrorMemoryAllocation
                              ? absl::StatusCode::kResourceExhausted
                              : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

// Completes the requests to be told when one stream of one device has run
// its work (WhenStreamDone, CopyAsync), in the order they were made: each
// is an event recorded on the stream, which one thread
// waits for before calling the request's callback. It polls the event,
// spinning for kSpin and then sleeping kNap between polls, and blocks in
// the driver only after kPoll: a blocking wait alone wakes up hundreds of
// microseconds late (measured on an H200: a 4096^3 product ran at 0.84 of
// cuBLAS, a 64M-element add at 0.6 of memcpy bandwidth), and spinning
// throughout would hold a core while long kernels run. One thread per
// stream, so that a copy's completion is not reported behind a long
// kernel's.
class StreamWatcher {
 public:
  StreamWatcher(int device, cudaStream_t stream) : device_(device), stream_(stream) {
    std::thread([this] { Run(); }).detach();
  }

  void Watch(std::function<void(absl::Status)> done) {
    cudaEvent_t event = nullptr;
    absl::Status s = CudaStatus(cudaSetDevice(device_), Where("cudaSetDevice", device_));
    if (s.ok()) s = TakeEvent(&event);
    if (s.ok()) s = CudaStatus(cudaEventRecord(event, stream_), Where("cudaEventRecord", device_));
    if (!s.ok()) {
      if (event != nullptr) GiveEvent(event);
      done(s);
      return;
    }
    absl::MutexLock lock(&mu_);
    queue_.push_back({event, std::move(done)});
  }

 private:
  struct Request {
    cudaEvent_t event;
    std::function<void(absl::Status)> done;
  };

  void Run() {
    cudaSetDevice(device_);
    for (;;) {
      Request r;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](std::deque<Request>* q) { return !q->empty(); }, &queue_));
        r = std::move(queue_.front());
        queue_.pop_front();
      }
      absl::Status s = CudaStatus(Wait(r.event), Where("GPU work", device_));
      GiveEvent(r.event);
      r.done(s);
    }
  }

  static cudaError_t Wait(cudaEvent_t event) {
    constexpr absl::Duration kSpin = absl::Microseconds(200), kNap = absl::Microseconds(20),
                             kPoll = absl::Milliseconds(100);
    const absl::Time start = absl::Now();
    for (;;) {
      const cudaError_t err = cudaEventQuery(event);
      if (err != cudaErrorNotReady) return err;
      const absl::Duration waited = absl::Now() - start;
      if (waited > kPoll) return cudaEventSynchronize(event);
      if (waited > kSpin) {
        absl::SleepFor(kNap);
      } else {
        std::this_thread::yield();
      }
    }
  }

  absl::Status TakeEvent(cudaEvent_t* event) {
    {
      absl::MutexLock lock(&mu_);
      if (!free_events_.empty()) {
        *event = free_events_.back();
        free_events_.pop_back();
        return absl::OkStatus();
      }
    }
    return CudaStatus(
        cudaEventCreateWithFlags(event, cudaEventDisableTiming | cudaEventBlockingSync),
        Where("cudaEventCreate", device_));
  }

  void GiveEvent(cudaEvent_t event) {
    absl::MutexLock lock(&mu_);
    free_events_.push_back(event);
  }

  const int device_;
  const cudaStream_t stream_;
  absl::Mutex mu_;
  std::deque<Request> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<cudaEvent_t> free_events_ ABSL_GUARDED_BY(mu_);
};

class CudaDevice : public DeviceApi {
 public:
  int DeviceCount() override {
    // Queried once: a machine without a driver reports an error, which means
    // no usable GPU.
    static const int count = [] {
      int n = 0;
      if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky error
        return 0;
      }
      return n < kMaxDevices ? n : kMaxDevices;
    }();
    return count;
  }

  absl::StatusOr<void*> Alloc(int id, size_t bytes) override {
    MX_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(id), Where("cudaSetDevice", id)));
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err == cudaErrorMemoryAllocation) {
      // Memory the stream-ordered allocator keeps for reuse (cuDNN's
      // workspaces, reductions' scratch) counts as taken: give back what
      // no stream still uses, and try once more.
      cudaGetLastError();
      cudaMemPool_t pool = nullptr;
      if (cudaDeviceGetDefaultMemPool(&pool, id) == cudaSuccess &&
          cudaMemPoolTrimTo(pool, 0) == cudaSuccess) {
        err = cudaMalloc(&p, bytes);
      }
    }
    if (err == cudaSuccess) return p;
    std::string what = absl::StrCat(Where("cudaMalloc", id), " of ", bytes, " bytes");
    size_t free = 0, total = 0;
    if (err == cudaErrorMemoryAllocation && cudaMemGetInfo(&free, &total) == cudaSuccess) {
      absl::StrAppend(&what, " (", free, " of ", total, " bytes free)");
    }
    cudaGetLastError();  // an allocation failure is not sticky; clear it
    return CudaStatus(err, what);
  }

  void Free(int id, void* ptr) override {
    cudaSetDevice(id);
    cudaFree(ptr);
  }

  absl::Status Copy(void* dst, Context dst_ctx, const void* src,
                    Context src_ctx, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    const int dev = PrepareCopy(dst_ctx, src_ctx);
    MX_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(dev), Where("cudaSetDevice", dev)));
    // On the copy's stream, waited for: a cudaMemcpy from pageable memory
    // returns once the bytes are staged, before they reach the device, and
    // nothing would order the (non-blocking) compute stream after them.
    // Unified addressing lets the runtime infer the direction.
    cudaStream_t stream = Stream(dev, CopyPlaceFor(dst_ctx, src_ctx).stream);
    absl::Status s = CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream),
                                CopyName(dst_ctx, src_ctx));
    if (s.ok()) s = CudaStatus(cudaStreamSynchronize(stream), CopyName(dst_ctx, src_ctx));
    return s;
  }

  void CopyAsync(void* dst, Context dst_ctx, const void* src, Context src_ctx, size_t bytes,
                 std::function<void(absl::Status)> done) override {
    if (bytes == 0) return done(absl::OkStatus());
    const int dev = PrepareCopy(dst_ctx, src_ctx);
    const StreamKind kind = CopyPlaceFor(dst_ctx, src_ctx).stream;
    absl::Status s = CudaStatus(cudaSetDevice(dev), Where("cudaSetDevice", dev));
    if (s.ok()) {
      s = CudaStatus(EnqueueCopy(dst, src, bytes, dst_ctx == src_ctx, dev, Stream(dev, kind)),
                     CopyName(dst_ctx, src_ctx));
    }
    if (!s.ok()) {
      cudaGetLastError();  // not sticky (a refused allocation); clear it
      return done(s);
    }
    Watcher(dev, kind)->Watch(std::move(done));
  }

  void WhenStreamDone(int id, std::function<void(absl::Status)> done) override {
    Watcher(id, StreamKind::kCompute)->Watch(std::move(done));
  }

 private:
  // The device that runs a copy (CopyPlaceFor), after giving two GPUs
  // access to each other.
  int PrepareCopy(Context dst_ctx, Context src_ctx) {
    if (dst_ctx.is_gpu() && src_ctx.is_gpu() && dst_ctx.device_id != src_ctx.device_id) {
      EnablePeerAccess(dst_ctx.device_id, src_ctx.device_id);
      EnablePeerAccess(src_ctx.device_id, dst_ctx.device_id);
    }
    return CopyPlaceFor(dst_ctx, src_ctx).device;
  }

  // Enqueues the copy on stream. Within one device (`same_device`) the two
  // ranges may overlap (slices of one array), which cudaMemcpyAsync does
  // not allow: such a copy goes through stream-ordered scratch memory, so
  // it moves the values as the CPU's memmove does.
  static cudaError_t EnqueueCopy(void* dst, const void* src, size_t bytes, bool same_device,
                                 int device, cudaStream_t stream) {
    const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    if (!same_device || d + bytes <= s || s + bytes <= d) {
      return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream);
    }
    void* scratch = nullptr;
    cudaError_t err = internal::cuda::MallocScratch(&scratch, bytes, device, stream);
    if (err != cudaSuccess) return err;
    err = cudaMemcpyAsync(scratch, src, bytes, cudaMemcpyDeviceToDevice, stream);
    if (err == cudaSuccess) {
      err = cudaMemcpyAsync(dst, scratch, bytes, cudaMemcpyDeviceToDevice, stream);
    }
    cudaFreeAsync(scratch, stream);
    return err;
  }

  static std::string CopyName(Context dst_ctx, Context src_ctx) {
    return absl::StrCat("copy ", src_ctx.ToString(), " -> ", dst_ctx.ToString());
  }

  // Lets `device` reach `peer`'s memory directly, once per ordered pair, so
  // that a copy between them moves over NVLink or PCIe rather than through
  // host memory (the runtime stages it there otherwise). Devices that
  // cannot reach each other keep copying through the host; any error here
  // (access already enabled, by the application for instance) is cleared
  // and changes nothing else.
  void EnablePeerAccess(int device, int peer) {
    {
      absl::MutexLock lock(&peer_mu_);
      if (!peer_tried_.insert({device, peer}).second) return;
    }
    int can = 0;
    if (cudaDeviceCanAccessPeer(&can, device, peer) != cudaSuccess || can == 0) {
      cudaGetLastError();
      return;
    }
    int previous = 0;
    cudaGetDevice(&previous);
    if (cudaSetDevice(device) != cudaSuccess ||
        cudaDeviceEnablePeerAccess(peer, 0) != cudaSuccess) {
      cudaGetLastError();
    }
    cudaSetDevice(previous);
  }

  StreamWatcher* Watcher(int id, StreamKind kind) {
    const int k = static_cast<int>(kind);
    std::call_once(watcher_once_[id][k],
                   [&] { watchers_[id][k] = new StreamWatcher(id, Stream(id, kind)); });
    return watchers_[id][k];
  }

  std::array<std::array<std::once_flag, kStreamKinds>, kMaxDevices> watcher_once_;
  std::array<std::array<StreamWatcher*, kStreamKinds>, kMaxDevices> watchers_{};
  absl::Mutex peer_mu_;
  std::set<std::pair<int, int>> peer_tried_ ABSL_GUARDED_BY(peer_mu_);
};

// Page-locked host memory, portable (every GPU reads it directly); copies
// among host arrays are the CPU's.
class PinnedHost : public DeviceApi {
 public:
  int DeviceCount() override { return CpuDeviceApi()->DeviceCount(); }

  absl::StatusOr<void*> Alloc(int, size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (err == cudaSuccess) return p;
    cudaGetLastError();  // not sticky; clear it
    return CudaStatus(err, absl::StrCat("cudaHostAlloc of ", bytes, " page-locked bytes"));
  }

  void Free(int, void* ptr) override { cudaFreeHost(ptr); }

  absl::Status Copy(void* dst, Context dst_ctx, const void* src, Context src_ctx,
                    size_t bytes) override {
    return CpuDeviceApi()->Copy(dst, dst_ctx, src, src_ctx, bytes);
  }

  void CopyAsync(void* dst, Context dst_ctx, const void* src, Context src_ctx, size_t bytes,
                 std::function<void(absl::Status)> done) override {
    CpuDeviceApi()->CopyAsync(dst, dst_ctx, src, src_ctx, bytes, std::move(done));
  }

  void WhenStreamDone(int id, std::function<void(absl::Status)> done) override {
    CpuDeviceApi()->WhenStreamDone(id, std::move(done));
  }
};

cudaStream_t Stream(int device, StreamKind kind) {
  static std::array<std::array<std::once_flag, kStreamKinds>, kMaxDevices> once;
  static std::array<std::array<cudaStream_t, kStreamKinds>, kMaxDevices> streams{};
  if (device < 0 || device >= kMaxDevices) return nullptr;
  const int k = static_cast<int>(kind);
  std::call_once(once[device][k], [device, k] {
    int previous = 0;
    cudaGetDevice(&previous);
    if (cudaSetDevice(device) == cudaSuccess) {
      cudaStreamCreateWithFlags(&streams[device][k], cudaStreamNonBlocking);
    }
    cudaSetDevice(previous);
  });
  return streams[device][k];
}

}  // namespace

namespace cuda {

cudaStream_t ComputeStream(int device) { return Stream(device, StreamKind::kCompute); }

cudaError_t MallocScratch(void** p, size_t bytes, int device, cudaStream_t stream) {
  cudaError_t err = cudaMallocAsync(p, bytes, stream);
  if (err != cudaErrorMemoryAllocation) return err;
  cudaGetLastError();  // not sticky; clear it
  void (*release)(Context) = PooledMemoryReleaser().load();
  if (release == nullptr) return err;
  release(gpu(device));
  return cudaMallocAsync(p, bytes, stream);
}

}  // namespace cuda

DeviceApi* GpuDeviceApi() {
  static CudaDevice* device = new CudaDevice();
  return device;
}

DeviceApi* PinnedHostApi() {
  static PinnedHost* host = new PinnedHost();
  return host;
}

}  // namespace mx::internal
