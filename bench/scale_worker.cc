// A worker of a scale run (bench/scale_bench.py, started by deploy/launch.py
// like mx_train): the communication of a small model's training step, the
// keys of 8 layers (a 128x128 weight and 256 biases each: 135 KFloats, as
// many bytes as the Fashion-MNIST MLP's, in 16 keys so that 8 servers all
// hold some), a dist_sync pushpull of each per step, for --seconds seconds; then it
// leaves the job (workers may stop at different steps: a step completes
// with the workers still in it). Checks what it pulls: without an
// optimizer a key's value after a step is the sum of that step's pushes,
// and every worker pushes 1.0, so each element is a whole number between 1
// and the number of workers. Prints one line:
//   scale_worker: rank R steps N step_ms p50 A p90 B max C
// Exits 0 after leaving the job; 1, printing why, on any error; 2 on a bad flag.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "kvstore/kvstore.h"
#include "ndarray/env.h"
#include "ndarray/ndarray.h"

ABSL_FLAG(double, seconds, 0, "how long to take steps (more than 0)");

namespace {

const std::vector<int64_t> kKeySizes = [] {
  std::vector<int64_t> sizes;
  for (int layer = 0; layer < 8; ++layer) {
    sizes.push_back(128 * 128);
    sizes.push_back(256);
  }
  return sizes;
}();

// Throws unless every element of `pulled` is a whole number in [1, workers].
void CheckPulled(int key, const mx::NDArray& pulled, int workers) {
  for (float v : pulled.ToVector()) {
    if (v < 1 || v > workers || v != static_cast<float>(static_cast<int>(v))) {
      throw std::runtime_error(absl::StrCat("key ", key, " pulled ", v, ": not the sum of 1 to ",
                                            workers, " pushes of 1.0"));
    }
  }
}

void Run(double seconds) {
  absl::StatusOr<std::unique_ptr<mx::KVStore>> created = mx::KVStore::Create("dist_sync");
  mx::ThrowIfError(created.status());
  mx::KVStore& kv = **created;
  std::vector<mx::NDArray> pushes, outs;
  for (size_t k = 0; k < kKeySizes.size(); ++k) {
    mx::ThrowIfError(kv.Init(static_cast<int>(k), mx::Zeros({kKeySizes[k]})));
    pushes.push_back(mx::Ones({kKeySizes[k]}));
    outs.push_back(mx::Empty({kKeySizes[k]}));
  }
  using Clock = std::chrono::steady_clock;
  const Clock::time_point end =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::vector<double> step_ms;
  while (Clock::now() < end) {
    const Clock::time_point start = Clock::now();
    for (size_t k = 0; k < kKeySizes.size(); ++k) {
      mx::ThrowIfError(kv.PushPull(static_cast<int>(k), {pushes[k]}, {outs[k]}));
    }
    for (const mx::NDArray& o : outs) o.WaitToRead();
    step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    // Checking every step would cost as much as the step: every 16th.
    if (step_ms.size() % 16 == 1) {
      for (size_t k = 0; k < outs.size(); ++k) CheckPulled(static_cast<int>(k), outs[k], kv.num_workers());
    }
  }
  mx::ThrowIfError(kv.Finish());
  std::sort(step_ms.begin(), step_ms.end());
  auto at = [&](double q) {
    return step_ms.empty() ? 0.0 : step_ms[static_cast<size_t>(q * (step_ms.size() - 1))];
  };
  std::cout << "scale_worker: rank " << kv.rank() << " steps " << step_ms.size() << " step_ms p50 "
            << at(0.5) << " p90 " << at(0.9) << " max " << at(1.0) << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "a worker of bench/scale_bench.py's jobs (started by deploy/launch.py)");
  mx::ParseFlags(argc, argv);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  if (!(seconds > 0)) {
    std::cerr << "scale_worker: --seconds=" << seconds << ": must be more than 0\n";
    return 2;
  }
  try {
    Run(seconds);
    return 0;
  } catch (const std::exception& e) {  // a failed call or a wrong value
    std::cerr << "scale_worker: " << e.what() << "\n";
    return 1;
  }
}
