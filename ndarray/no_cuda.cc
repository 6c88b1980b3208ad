// Linked into builds without CUDA: there is no GPU device implementation,
// and the GPU entry points of the kernel layer exist only to report that
// (no array can be created on a GPU in such a build, so none is reached).
#include "ndarray/device.h"
#include "ndarray/dnn.h"
#include "ndarray/kernel.h"
#include "ndarray/nn_kernels.h"
#include "ndarray/sparse_kernels.h"
#include "ndarray/update_kernels.h"
#include "ndarray/launch.h"

namespace mx::internal {
DeviceApi* GpuDeviceApi() { return nullptr; }
DeviceApi* PinnedHostApi() { return nullptr; }
}  // namespace mx::internal

namespace mx::kernel {

namespace {
constexpr const char* kNoGpu = "this build of mx has no GPU support";
}  // namespace

template <typename K>
const char* GpuLaunch(int, int64_t, const typename K::Params&) {
  return kNoGpu;
}

template <typename R>
const char* GpuReduce(int, const float*, float*, int64_t, int64_t, int64_t, bool) {
  return kNoGpu;
}

const char* GpuSgemm(int, const ColMajorGemm&, float, float) { return kNoGpu; }

const char* GpuCollectives(const std::vector<int>&, const std::vector<GpuCollective>&) {
  return kNoGpu;
}

#define MX_KERNEL(K) template const char* GpuLaunch<K>(int, int64_t, const K::Params&);
#define MX_REDUCER(R) \
  template const char* GpuReduce<R>(int, const float*, float*, int64_t, int64_t, int64_t, bool);
#include "ndarray/kernel_list.inc"
#undef MX_KERNEL
#undef MX_REDUCER

}  // namespace mx::kernel

namespace mx::kernel {

const char* GpuConvForward(int, const ConvShape&, const float*, const float*, float*, float) {
  return kNoGpu;
}
const char* GpuConvAddBias(int, const ConvShape&, const float*, float*) { return kNoGpu; }
const char* GpuConvBackwardData(int, const ConvShape&, const float*, const float*, float*,
                                float) {
  return kNoGpu;
}
const char* GpuConvBackwardFilter(int, const ConvShape&, const float*, const float*, float*,
                                  float) {
  return kNoGpu;
}
const char* GpuConvBackwardBias(int, const ConvShape&, const float*, float*, float) {
  return kNoGpu;
}
const char* GpuPoolForward(int, const PoolShape&, const float*, float*, float) { return kNoGpu; }
const char* GpuPoolBackward(int, const PoolShape&, const float*, const float*, const float*,
                            float*, float) {
  return kNoGpu;
}

}  // namespace mx::kernel
