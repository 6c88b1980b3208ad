// The operator table's performance mode: forward + backward time of every
// case in tests/graph/op_cases_*.cc against the case's naive reference
// forward, measured in the same run. A filter argument keeps only cases
// whose name contains it (op_bench Convolution).
#include <cstdio>
#include <string>

#include "bench/bench_util.h"
#include "tests/graph/op_harness.h"

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  for (const mx::testing::OpCase& c : mx::testing::AllOpCases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    mx::testing::Timing t = mx::testing::TimeCase(c, 5);  // warm-up and sizing
    const int reps = std::max(3, static_cast<int>(0.2 / std::max(t.mx_seconds, 1e-6)));
    t = mx::testing::TimeCase(c, std::min(reps, 2000));
    mx::bench::Report("op_" + c.name, t.mx_seconds * 1e6, "us_fwd_bwd",
                      t.reference_seconds * 1e6, t.reference_seconds / t.mx_seconds,
                      "info(naive_reference_forward)");
  }
  return mx::bench::ExitCode("op_bench", filter);
}
