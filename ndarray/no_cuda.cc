// Linked into builds without CUDA: there is no GPU device implementation.
#include "ndarray/device.h"

namespace mx::internal {
DeviceApi* GpuDeviceApi() { return nullptr; }
}  // namespace mx::internal
