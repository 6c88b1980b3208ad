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

// The Python that has torch: MX_TORCH_PYTHON (a GPU machine's PyTorch may
// live in a virtual environment), else Debian's.
inline std::string TorchPython() {
  const char* env = std::getenv("MX_TORCH_PYTHON");
  return env != nullptr ? env : "/usr/bin/python3";
}

struct TorchResult {
  double samples_per_s = 0;
  double accuracy = -1;  // when the command reports one
};

// Runs `torch_baseline.py <args>` with 1 and 2 threads (the thread count
// replaces "{threads}" in args) and returns the faster result, or nullopt
// with a message on stderr when PyTorch is unavailable.
inline std::optional<TorchResult> RunTorchBest(const std::string& args_template) {
  std::optional<TorchResult> best;
  for (int threads : {1, 2}) {
    std::string args = args_template;
    size_t at = args.find("{threads}");
    if (at != std::string::npos) args.replace(at, 9, std::to_string(threads));
    std::string cmd = "OMP_WAIT_POLICY=passive " + TorchPython() + " " + TorchScript() + " " +
                      args + " 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) return std::nullopt;
    char line[512];
    std::string out;
    while (std::fgets(line, sizeof(line), p) != nullptr) out += line;
    int rc = pclose(p);
    TorchResult r;
    int n = std::sscanf(out.c_str(), "samples_per_s %lf accuracy %lf", &r.samples_per_s,
                        &r.accuracy);
    if (rc != 0 || n < 1) {
      std::fprintf(stderr, "PyTorch baseline unavailable (install python3-torch: "
                           "deploy/setup.sh --bench): %s\n", out.c_str());
      return std::nullopt;
    }
    if (!best || r.samples_per_s > best->samples_per_s) best = r;
  }
  return best;
}

// Best samples/s of PyTorch over its thread settings (1 and 2 threads;
// OMP_WAIT_POLICY=passive so that idle OpenMP threads do not spin against
// OpenBLAS), or nullopt with a message on stderr when torch is unavailable.
inline std::optional<double> TorchSamplesPerSecond(const std::string& model,
                                                   double seconds) {
  std::optional<TorchResult> r =
      RunTorchBest("train_step " + model + " {threads} " + std::to_string(seconds));
  if (!r) return std::nullopt;
  return r->samples_per_s;
}

}  // namespace mx::bench

#endif  // MX_BENCH_TORCH_RUNNER_H_
