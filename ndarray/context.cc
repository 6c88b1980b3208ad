#include "ndarray/context.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "ndarray/device.h"

namespace mx {

std::string Context::ToString() const {
  return absl::StrCat(is_gpu() ? "gpu(" : is_pinned() ? "cpu_pinned(" : "cpu(", device_id, ")");
}

std::ostream& operator<<(std::ostream& os, const Context& ctx) {
  return os << ctx.ToString();
}

bool BuiltWithCuda() { return internal::GpuDeviceApi() != nullptr; }

int NumGpus() {
  internal::DeviceApi* gpu = internal::GpuDeviceApi();
  return gpu == nullptr ? 0 : gpu->DeviceCount();
}

absl::Status CheckContextAvailable(Context ctx) {
  if (ctx.device_id < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid context ", ctx.ToString(),
                     ": device id must be >= 0"));
  }
  if (ctx.is_cpu()) return absl::OkStatus();
  if (!BuiltWithCuda()) {
    return absl::FailedPreconditionError(absl::StrCat(
        ctx.ToString(),
        " requested but this build of mx has no GPU support (rebuild with "
        "the CUDA toolkit under /usr/local/cuda)"));
  }
  int n = NumGpus();
  if (ctx.device_id >= n) {
    return absl::FailedPreconditionError(absl::StrCat(
        ctx.ToString(), " requested but this machine has ", n, " usable GPU",
        n == 1 ? "" : "s"));
  }
  return absl::OkStatus();
}

namespace internal {

namespace {

class CpuDevice : public DeviceApi {
 public:
  int DeviceCount() override { return 1 << 20; }

  absl::StatusOr<void*> Alloc(int, size_t bytes) override {
    // aligned_alloc needs a size that is a multiple of the alignment.
    size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded == 0 ? kAlign : rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("host out of memory allocating ", bytes, " bytes"));
    }
    return p;
  }

  void Free(int, void* ptr) override { std::free(ptr); }

  absl::Status Copy(void* dst, Context, const void* src, Context,
                    size_t bytes) override {
    if (bytes > 0) std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }

  void CopyAsync(void* dst, Context dst_ctx, const void* src, Context src_ctx, size_t bytes,
                 std::function<void(absl::Status)> done) override {
    done(Copy(dst, dst_ctx, src, src_ctx, bytes));
  }

  void WhenStreamDone(int, std::function<void(absl::Status)> done) override {
    done(absl::OkStatus());
  }

 private:
  static constexpr size_t kAlign = 64;
};

}  // namespace

DeviceApi* CpuDeviceApi() {
  static CpuDevice* device = new CpuDevice();
  return device;
}

DeviceApi* DeviceApiFor(Context ctx) {
  if (ctx.is_gpu()) return GpuDeviceApi();
  if (!ctx.is_pinned()) return CpuDeviceApi();
  // Decided once, so that every block is freed by what allocated it.
  static DeviceApi* const pinned = NumGpus() > 0 ? PinnedHostApi() : CpuDeviceApi();
  return pinned;
}

}  // namespace internal
}  // namespace mx
