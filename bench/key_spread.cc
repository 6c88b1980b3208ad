// How evenly ResNet-50's parameters spread over parameter servers, by
// kvstore/placement.h's rule, against MXNet's (whole keys below 1M
// elements by hash, bigger ones cut once per server) computed in the same
// run. No network: placement is a pure function every worker computes.
//
//   BENCH name=key_spread_resnet50_<S>s value=<max/mean> baseline=<MXNet's>
//
// with ratio = baseline / value (how much less the busiest server carries
// than under MXNet's rule) and the target on the value: <= 1.1. Then a
// table of the slices per step (message entries) and the spread with
// other min_slice settings, for docs/scaling.md.
#include "tests/kvstore/key_spread.h"

#include <cstdio>
#include <vector>

#include "bench/bench_util.h"
#include "kvstore/placement.h"

namespace mx {
namespace {

using testing::ResNet50ParameterSizes;
using testing::SpreadOf;
using testing::Spread;

int Main() {
  const std::vector<int64_t> sizes = ResNet50ParameterSizes();
  const int kServers[] = {1, 2, 3, 4, 6, 8, 16, 32, 64, 100, 200};
  std::printf("%8s %10s %8s %10s %8s %12s %12s\n", "servers", "mx", "slices", "mxnet", "slices",
              "min_slice=8K", "min_slice=4K");
  for (int servers : kServers) {
    PlacementOptions mx;
    mx.servers = servers;
    PlacementOptions mxnet = mx;
    mxnet.min_slice = int64_t{1} << 40;  // nothing below the bound is cut
    PlacementOptions small8 = mx, small4 = mx;
    small8.min_slice = 8 << 10;
    small4.min_slice = 4 << 10;
    const Spread a = SpreadOf(sizes, mx), b = SpreadOf(sizes, mxnet);
    const Spread c = SpreadOf(sizes, small8), d = SpreadOf(sizes, small4);
    std::printf("%8d %10.3f %8lld %10.3f %8lld %7.3f %4lld %7.3f %4lld\n", servers,
                a.max_over_mean, static_cast<long long>(a.parts), b.max_over_mean,
                static_cast<long long>(b.parts), c.max_over_mean, static_cast<long long>(c.parts),
                d.max_over_mean, static_cast<long long>(d.parts));
  }
  for (int servers : kServers) {
    if (servers == 1) continue;
    PlacementOptions mx;
    mx.servers = servers;
    PlacementOptions mxnet = mx;
    mxnet.min_slice = int64_t{1} << 40;
    const double value = SpreadOf(sizes, mx).max_over_mean;
    const double baseline = SpreadOf(sizes, mxnet).max_over_mean;
    std::printf(
        "BENCH name=key_spread_resnet50_%ds value=%.3f unit=max/mean baseline=%.3f ratio=%.3f "
        "target=value<=1.1\n",
        servers, value, baseline, baseline / value);
  }
  return 0;
}

}  // namespace
}  // namespace mx

int main(int argc, char** argv) {
  mx::bench::NoArguments("key_spread", argc, argv);
  return mx::Main();
}
