// Matrix products on GPUs through cuBLAS, one handle per device bound to its
// compute stream. Compiled only with CUDA.
//
// cuBLAS is loaded with dlopen at the first product on a GPU, not linked:
// linked, it adds about 150 MB of resident memory to every process that
// loads mx, the CPU-only servers and workers included (measured on this
// toolkit: libcublas + libcublasLt at load time).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <climits>
#include <string>

#include "ndarray/cuda/handles.h"
#include "ndarray/cuda/stream.h"
#include "ndarray/launch.h"

namespace mx::kernel {

namespace {

using internal::cuda::kMaxDevices;

// The cuBLAS functions mx calls.
struct Cublas {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasSetStream_v2) set_stream;
  decltype(&cublasSgemm_v2) sgemm;
  decltype(&cublasGetStatusString) status_string;
};

// The library of the major version mx was built against, loaded once; null
// with *error set when it or a function is missing.
const Cublas* LoadCublas(const char** error) {
  static const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  static std::string failure;
  static const Cublas* api = []() -> const Cublas* {
    void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      failure = "cannot load cuBLAS (" + soname + "): " + dlerror();
      return nullptr;
    }
    auto* c = new Cublas;
    c->create = reinterpret_cast<decltype(c->create)>(dlsym(lib, "cublasCreate_v2"));
    c->set_stream = reinterpret_cast<decltype(c->set_stream)>(dlsym(lib, "cublasSetStream_v2"));
    c->sgemm = reinterpret_cast<decltype(c->sgemm)>(dlsym(lib, "cublasSgemm_v2"));
    c->status_string =
        reinterpret_cast<decltype(c->status_string)>(dlsym(lib, "cublasGetStatusString"));
    if (!c->create || !c->set_stream || !c->sgemm || !c->status_string) {
      failure = soname + " lacks a function mx needs";
      delete c;
      return nullptr;
    }
    return c;
  }();
  if (api == nullptr) *error = failure.c_str();
  return api;
}

// The handle of gpu(device) on its compute stream, or nullptr with *error
// set (internal::cuda::DeviceHandles).
cublasHandle_t Handle(const Cublas& cublas, int device, const char** error) {
  using Handles =
      internal::cuda::DeviceHandles<cublasHandle_t, cublasStatus_t, CUBLAS_STATUS_SUCCESS>;
  static auto* handles = new Handles;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const cublasHandle_t h = handles->Get(device, cublas.create, cublas.set_stream, &status);
  if (h == nullptr) *error = cublas.status_string(status);
  return h;
}

}  // namespace

const char* GpuSgemm(int device, const ColMajorGemm& g, float alpha, float beta) {
  if (device < 0 || device >= kMaxDevices) return "no such device";
  for (int64_t d : {g.m, g.n, g.k, g.ld_first, g.ld_second, g.ldc}) {
    if (d > INT_MAX) return "matrix dimension exceeds cuBLAS's 32-bit limit";
  }
  const char* error = nullptr;
  const Cublas* cublas = LoadCublas(&error);
  if (cublas == nullptr) return error;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  cublasHandle_t handle = Handle(*cublas, device, &error);
  if (handle == nullptr) return error;
  cublasStatus_t s = cublas->sgemm(
      handle, g.trans_first ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_second ? CUBLAS_OP_T : CUBLAS_OP_N,
      int(g.m), int(g.n), int(g.k), &alpha, g.first, int(g.ld_first), g.second,
      int(g.ld_second), &beta, g.c, int(g.ldc));
  return s == CUBLAS_STATUS_SUCCESS ? nullptr : cublas->status_string(s);
}

}  // namespace mx::kernel
