// Matrix products on GPUs through cuBLAS, one handle per device bound to its
// compute stream. Compiled only with CUDA.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <climits>
#include <mutex>

#include "ndarray/cuda/stream.h"
#include "ndarray/launch.h"

namespace mx::kernel {

namespace {

constexpr int kMaxDevices = 64;

// The handle of gpu(device), or nullptr with *error set.
cublasHandle_t Handle(int device, const char** error) {
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<cublasHandle_t, kMaxDevices> handles{};
  static std::array<cublasStatus_t, kMaxDevices> status{};
  std::call_once(once[device], [device] {
    status[device] = cublasCreate(&handles[device]);
    if (status[device] == CUBLAS_STATUS_SUCCESS) {
      status[device] = cublasSetStream(handles[device], internal::cuda::ComputeStream(device));
    }
  });
  if (status[device] != CUBLAS_STATUS_SUCCESS) {
    *error = cublasGetStatusString(status[device]);
    return nullptr;
  }
  return handles[device];
}

}  // namespace

const char* GpuSgemm(int device, const ColMajorGemm& g, float alpha, float beta) {
  if (device < 0 || device >= kMaxDevices) return "no such device";
  for (int64_t d : {g.m, g.n, g.k, g.ld_first, g.ld_second, g.ldc}) {
    if (d > INT_MAX) return "matrix dimension exceeds cuBLAS's 32-bit limit";
  }
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const char* error = nullptr;
  cublasHandle_t handle = Handle(device, &error);
  if (handle == nullptr) return error;
  cublasStatus_t s = cublasSgemm(
      handle, g.trans_first ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_second ? CUBLAS_OP_T : CUBLAS_OP_N,
      int(g.m), int(g.n), int(g.k), &alpha, g.first, int(g.ld_first), g.second,
      int(g.ld_second), &beta, g.c, int(g.ldc));
  return s == CUBLAS_STATUS_SUCCESS ? nullptr : cublasGetStatusString(s);
}

}  // namespace mx::kernel
