// The one reason GPU tests give for skipping where no GPU is usable.
#ifndef MX_TESTS_GPU_SKIP_H_
#define MX_TESTS_GPU_SKIP_H_

#include <string>

#include "ndarray/context.h"

namespace mx {

// Empty when gpu(0) is usable; otherwise why not (printed by GTEST_SKIP and
// collected by tests/run_all.sh).
inline std::string NoGpuReason() {
  if (!BuiltWithCuda()) return "this build of mx has no CUDA support";
  if (NumGpus() == 0) return "no usable GPU on this machine (no driver or no device)";
  return "";
}

}  // namespace mx

// Skips the current test, with the reason, unless gpu(0) is usable.
#define MX_SKIP_WITHOUT_GPU()                                  \
  if (const std::string why = ::mx::NoGpuReason(); !why.empty()) \
  GTEST_SKIP() << why

#endif  // MX_TESTS_GPU_SKIP_H_
