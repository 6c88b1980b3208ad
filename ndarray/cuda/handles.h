// Internal: one library handle per GPU (cuBLAS's, cuDNN's), bound to the
// GPU's compute stream, made at the first use that succeeds. A failed
// creation (the libraries allocate device memory, which may be short at
// that moment) is tried again at the next use: remembered, it refused the
// library for the process's life. Compiled only with CUDA.
#ifndef MX_NDARRAY_CUDA_HANDLES_H_
#define MX_NDARRAY_CUDA_HANDLES_H_

#include <array>
#include <atomic>
#include <mutex>

#include "ndarray/cuda/stream.h"

namespace mx::internal::cuda {

// H a handle type, S the library's status type, kOk its success.
template <typename H, typename S, S kOk>
class DeviceHandles {
 public:
  // gpu(device)'s handle, made with create(&handle) and bound with
  // bind(handle, stream); nullptr with *status set when either fails.
  // Thread-safe; after the first success, one atomic load.
  template <typename Create, typename Bind>
  H Get(int device, Create create, Bind bind, S* status) {
    if (H h = ready_[device].load(std::memory_order_acquire)) return h;
    std::lock_guard<std::mutex> lock(mu_);
    if (H h = ready_[device].load(std::memory_order_relaxed)) return h;
    *status = kOk;
    if (made_[device] == nullptr) {
      *status = create(&made_[device]);
      if (*status != kOk) made_[device] = nullptr;
    }
    if (*status == kOk) *status = bind(made_[device], ComputeStream(device));
    if (*status != kOk) return nullptr;  // made_ kept: only its binding is tried again
    ready_[device].store(made_[device], std::memory_order_release);
    return made_[device];
  }

 private:
  std::array<std::atomic<H>, kMaxDevices> ready_{};
  std::mutex mu_;
  std::array<H, kMaxDevices> made_{};  // created, perhaps not bound yet
};

}  // namespace mx::internal::cuda

#endif  // MX_NDARRAY_CUDA_HANDLES_H_
