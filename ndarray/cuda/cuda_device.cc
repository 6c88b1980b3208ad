// The GPU DeviceApi over the CUDA runtime. Compiled only with CUDA.
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ndarray/base.h"
#include "ndarray/cuda/fill.cuh"
#include "ndarray/device.h"

namespace mx::internal {

namespace {

absl::Status CudaStatus(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return absl::OkStatus();
  absl::StatusCode code = err == cudaErrorMemoryAllocation
                              ? absl::StatusCode::kResourceExhausted
                              : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

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
      return n;
    }();
    return count;
  }

  absl::StatusOr<void*> Alloc(int id, size_t bytes) override {
    MX_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(id), Where("cudaSetDevice", id)));
    void* p = nullptr;
    MX_RETURN_IF_ERROR(
        CudaStatus(cudaMalloc(&p, bytes),
                   absl::StrCat(Where("cudaMalloc", id), " of ", bytes, " bytes")));
    return p;
  }

  void Free(int id, void* ptr) override {
    cudaSetDevice(id);
    cudaFree(ptr);
  }

  absl::Status Copy(void* dst, Context dst_ctx, const void* src,
                    Context src_ctx, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    int dev = dst_ctx.is_gpu() ? dst_ctx.device_id : src_ctx.device_id;
    MX_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(dev), Where("cudaSetDevice", dev)));
    // Unified addressing lets the runtime infer the direction.
    return CudaStatus(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault),
                      absl::StrCat("copy ", src_ctx.ToString(), " -> ",
                                   dst_ctx.ToString()));
  }

  absl::Status Fill(float* dst, int id, float value, size_t n) override {
    MX_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(id), Where("cudaSetDevice", id)));
    MX_RETURN_IF_ERROR(CudaStatus(static_cast<cudaError_t>(cuda::LaunchFill(dst, value, n)),
                                  Where("fill kernel", id)));
    return CudaStatus(cudaDeviceSynchronize(), Where("fill kernel", id));
  }

 private:
  static std::string Where(const char* what, int id) {
    return absl::StrCat(what, " on gpu(", id, ")");
  }
};

}  // namespace

DeviceApi* GpuDeviceApi() {
  static CudaDevice* device = new CudaDevice();
  return device;
}

}  // namespace mx::internal
