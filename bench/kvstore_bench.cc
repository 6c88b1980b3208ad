// Local KVStore: push (sum) and pull of 4 device copies of a 16 MiB value
// on CPU contexts, against the memory bandwidth of memcpy measured in the
// same run. The bandwidth-bound time of one push + pull is the time to move
// its minimal traffic: read the 4 copies and write the sum (5 x 16 MiB),
// then read the sum and write 4 copies (5 x 16 MiB), at memcpy's rate.
#include <cstring>
#include <vector>

#include "bench/bench_util.h"
#include "kvstore/kvstore.h"

namespace mx::bench {
namespace {

constexpr int kDevices = 4;
constexpr int64_t kElements = 16 * 1024 * 1024 / sizeof(float);

void Run() {
  auto kv = KVStore::Create("local");
  ThrowIfError(kv.status());
  ThrowIfError((*kv)->Init(0, Zeros({kElements})));
  std::vector<NDArray> grads, weights;
  for (int d = 0; d < kDevices; ++d) {
    grads.push_back(RandomUniform(0, 1, {kElements}, cpu(d)));
    weights.push_back(Empty({kElements}, cpu(d)));
  }
  std::vector<char> src(64 << 20, 1), dst(64 << 20);
  auto [t_kv, t_copy] = MedianPair(
      9,
      [&] {
        ThrowIfError((*kv)->Push(0, grads));
        ThrowIfError((*kv)->Pull(0, weights));
        WaitAll();
      },
      [&] { std::memcpy(dst.data(), src.data(), src.size()); });
  // memcpy moves 2 x 64 MiB (read + write); push + pull moves 10 x 16 MiB.
  const double copy_bw = 2.0 * src.size() / t_copy;
  const double bytes = 10.0 * kElements * sizeof(float);
  const double kv_bw = bytes / t_kv;
  Report("kvstore_local_pushpull_4x16MiB", kv_bw / 1e9, "GB/s", copy_bw / 1e9, kv_bw / copy_bw,
         ">=0.5");
}

}  // namespace
}  // namespace mx::bench

int main(int argc, char** argv) {
  mx::bench::NoArguments("kvstore_bench", argc, argv);
  mx::bench::Run();
  return 0;
}
