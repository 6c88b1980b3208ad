// Context: the device an NDArray lives on, cpu(i), cpu_pinned(i) or gpu(i).
//
// cpu(i) for any i is host memory; distinct CPU ids act as distinct devices
// (the local KVStore and data-parallel training treat them so), which lets
// multi-device code run on machines without GPUs. gpu(i) needs a build with
// CUDA and a machine with at least i+1 GPUs; CheckContextAvailable says which
// of the two is missing.
//
// cpu_pinned(i) (MXNet's) is host memory that GPUs copy to and from
// directly: page-locked (cudaHostAlloc), so a copy between it and a GPU
// runs asynchronously on the GPU's copy streams at the bus's speed, beside
// the GPU's computation. Operations run on it as on the CPU (is_cpu() is
// true). Like distinct CPU ids it is a context of its own: an operation
// takes arrays of one context, and Assign or Copy moves values between
// cpu(i) and cpu_pinned(i). Without a usable GPU it is ordinary host
// memory. Page-locked memory is taken from the system's RAM for good, so
// it is meant for transfer buffers, not for whole models.
#ifndef MX_NDARRAY_CONTEXT_H_
#define MX_NDARRAY_CONTEXT_H_

#include <ostream>
#include <string>

#include "absl/status/status.h"

namespace mx {

// MXNet's numbering.
enum class DeviceType : int { kCPU = 1, kGPU = 2, kCPUPinned = 3 };

struct Context {
  DeviceType device_type = DeviceType::kCPU;
  int device_id = 0;

  static Context CPU(int id = 0) { return {DeviceType::kCPU, id}; }
  static Context GPU(int id = 0) { return {DeviceType::kGPU, id}; }
  static Context CPUPinned(int id = 0) { return {DeviceType::kCPUPinned, id}; }

  // Host memory: cpu(i) or cpu_pinned(i).
  bool is_cpu() const { return device_type != DeviceType::kGPU; }
  bool is_gpu() const { return device_type == DeviceType::kGPU; }
  bool is_pinned() const { return device_type == DeviceType::kCPUPinned; }

  // "cpu(0)", "cpu_pinned(0)" or "gpu(1)".
  std::string ToString() const;

  friend bool operator==(const Context& a, const Context& b) {
    return a.device_type == b.device_type && a.device_id == b.device_id;
  }
  friend bool operator!=(const Context& a, const Context& b) { return !(a == b); }
  friend bool operator<(const Context& a, const Context& b) {
    if (a.device_type != b.device_type) return a.device_type < b.device_type;
    return a.device_id < b.device_id;
  }
  template <typename H>
  friend H AbslHashValue(H h, const Context& c) {
    return H::combine(std::move(h), static_cast<int>(c.device_type), c.device_id);
  }
};

inline Context cpu(int id = 0) { return Context::CPU(id); }
inline Context gpu(int id = 0) { return Context::GPU(id); }
inline Context cpu_pinned(int id = 0) { return Context::CPUPinned(id); }

std::ostream& operator<<(std::ostream& os, const Context& ctx);

// True when this binary was compiled with CUDA support.
bool BuiltWithCuda();

// Number of GPUs this process can use: 0 without CUDA support or devices.
int NumGpus();

// OK when arrays can be created on ctx. Otherwise FailedPrecondition for a GPU
// in a build without CUDA or on a machine with too few GPUs, and
// InvalidArgument for a negative device id; the message names ctx.
absl::Status CheckContextAvailable(Context ctx);

}  // namespace mx

#endif  // MX_NDARRAY_CONTEXT_H_
