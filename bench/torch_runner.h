// Runs bench/torch_baseline.py with Debian's python3 and reads its figure.
#ifndef MX_BENCH_TORCH_RUNNER_H_
#define MX_BENCH_TORCH_RUNNER_H_

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

namespace mx::bench {

// The script's path: next to this binary's sources, found from the
// workspace (bench/run_all.sh runs from the repository root).
inline std::string TorchScript() {
  const char* env = std::getenv("MX_TORCH_BASELINE");
  return env != nullptr ? env : "bench/torch_baseline.py";
}

// Best samples/s of PyTorch over its thread settings (1 and 2 threads;
// OMP_WAIT_POLICY=passive so that idle OpenMP threads do not spin against
// OpenBLAS), or nullopt with a message on stderr when torch is unavailable.
inline std::optional<double> TorchSamplesPerSecond(const std::string& model,
                                                   double seconds) {
  std::optional<double> best;
  for (int threads : {1, 2}) {
    std::string cmd = "OMP_WAIT_POLICY=passive /usr/bin/python3 " + TorchScript() +
                      " train_step " + model + " " + std::to_string(threads) +
                      " " + std::to_string(seconds) + " 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) return std::nullopt;
    char line[512];
    std::string out;
    while (std::fgets(line, sizeof(line), p) != nullptr) out += line;
    int rc = pclose(p);
    double v = 0;
    if (rc != 0 || std::sscanf(out.c_str(), "samples_per_s %lf", &v) != 1) {
      std::fprintf(stderr, "PyTorch baseline unavailable (install python3-torch: "
                           "deploy/setup.sh --bench): %s\n", out.c_str());
      return std::nullopt;
    }
    if (!best || v > *best) best = v;
  }
  return best;
}

}  // namespace mx::bench

#endif  // MX_BENCH_TORCH_RUNNER_H_
