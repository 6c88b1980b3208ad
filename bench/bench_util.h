// Helpers shared by the benchmarks: timing and the BENCH line format.
//
// Every figure is printed as one line
//   BENCH name=<id> value=<v> unit=<u> baseline=<b> ratio=<r> target=<t>
// where the baseline is measured in the same run and ratio is oriented so
// that bigger is better; `target` states the goal for the ratio.
#ifndef MX_BENCH_BENCH_UTIL_H_
#define MX_BENCH_BENCH_UTIL_H_

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace mx::bench {

// Benchmarks run as mx_server and mx_train do: without absl's mutex
// deadlock detection (on in Debian's build of abseil), which updates a
// global lock graph on every absl::Mutex lock: gRPC's and the storage
// pool's.
inline const bool kLikeTheDaemons = [] {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return true;
}();

inline double NowSeconds() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Median wall time in seconds of `reps` calls of fn, after one warm-up call.
inline double MedianSeconds(int reps, const std::function<void()>& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    double start = NowSeconds();
    fn();
    t.push_back(NowSeconds() - start);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// CPU time this process has used, all threads together, in seconds.
inline double CpuSeconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Runs fns in turn `rounds` times (so drift on a shared machine hits all
// alike), after one warm-up call each; returns their median times. With
// `cpu`, also the median CPU time of each (this process, all threads):
// cost per unit of work, which the machine's other load sways less than
// wall time.
inline std::vector<double> MedianTurns(int rounds, const std::vector<std::function<void()>>& fns,
                                       std::vector<double>* cpu = nullptr) {
  for (const auto& fn : fns) fn();
  std::vector<std::vector<double>> t(fns.size()), c(fns.size());
  for (int i = 0; i < rounds; ++i) {
    for (size_t f = 0; f < fns.size(); ++f) {
      const double s = NowSeconds(), cs = CpuSeconds();
      fns[f]();
      t[f].push_back(NowSeconds() - s);
      c[f].push_back(CpuSeconds() - cs);
    }
  }
  auto median = [](std::vector<double>& v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::vector<double> medians;
  for (size_t f = 0; f < fns.size(); ++f) {
    medians.push_back(median(t[f]));
    if (cpu != nullptr) cpu->push_back(median(c[f]));
  }
  return medians;
}

// MedianTurns of two.
inline std::pair<double, double> MedianPair(int rounds, const std::function<void()>& a,
                                            const std::function<void()>& b) {
  const std::vector<double> m = MedianTurns(rounds, {a, b});
  return {m[0], m[1]};
}

// One figure's BENCH line; `extra` (e.g. "range=A-B": the value's spread
// over the repetitions) goes at its end.
inline int& FiguresReported() {
  static int n = 0;
  return n;
}
inline void Report(const std::string& name, double value,
                   const std::string& unit, double baseline, double ratio,
                   const std::string& target, const std::string& extra = "") {
  ++FiguresReported();
  std::printf("BENCH name=%s value=%.4g unit=%s baseline=%.4g ratio=%.3f target=%s%s%s\n",
              name.c_str(), value, unit.c_str(), baseline, ratio,
              target.c_str(), extra.empty() ? "" : " ", extra.c_str());
  std::fflush(stdout);
}

// A bench's exit code once it ran: 2, saying so, when it was given a
// `filter` that no figure matched (a mistyped name printed nothing and
// exited 0, which a script reads as a run).
inline int ExitCode(const char* bench, const std::string& filter) {
  if (filter.empty() || FiguresReported() > 0) return 0;
  std::fprintf(stderr, "%s: no figure matches '%s'\n", bench, filter.c_str());
  return 2;
}

// A bench that takes no arguments refuses any (exit code 2): it ran every
// figure, whatever was asked.
inline void NoArguments(const char* bench, int argc, char** argv) {
  if (argc <= 1) return;
  std::fprintf(stderr, "%s takes no arguments (got '%s'): it runs every figure\n", bench, argv[1]);
  std::exit(2);
}

}  // namespace mx::bench

#endif  // MX_BENCH_BENCH_UTIL_H_
