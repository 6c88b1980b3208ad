// A worker of a dist_sync job (started by deploy/launch.py) that has more
// batches than the others: worker r runs 3 + r steps. Each step pushpulls
// two keys, a small one (on one server) and one split across the servers,
// with every element of the push equal to r + 1, and prints what it pulled:
// "step S of N: small V, big W". Without an optimizer a step's value is the
// sum of the pushes of the workers still in it. Exits 0 after leaving the
// job (KVStore::Finish); non-zero, printing why, on any error. With
// UNEVEN_BARRIER=1 it enters a barrier (KVStore::Barrier) before leaving.
#include <cstdlib>
#include <iostream>
#include <vector>

#include "kvstore/kvstore.h"
#include "ndarray/ndarray.h"

namespace {

constexpr int64_t kSmall = 4, kBig = (1 << 20) + 8;  // above the default bound

void Run() {
  absl::StatusOr<std::unique_ptr<mx::KVStore>> created = mx::KVStore::Create("dist_sync");
  mx::ThrowIfError(created.status());
  mx::KVStore& kv = **created;
  const int rank = kv.rank();
  const int steps = 3 + rank;
  std::vector<mx::NDArray> pushes, outs;
  for (int64_t n : {kSmall, kBig}) {
    mx::ThrowIfError(kv.Init(static_cast<int>(pushes.size()), mx::Zeros({n})));
    pushes.push_back(mx::FromVector(std::vector<float>(n, rank + 1.0f)));
    outs.push_back(mx::Empty({n}));
  }
  for (int step = 1; step <= steps; ++step) {
    for (int key : {0, 1}) mx::ThrowIfError(kv.PushPull(key, {pushes[key]}, {outs[key]}));
    const std::vector<float> small = outs[0].ToVector(), big = outs[1].ToVector();
    std::cout << "step " << step << " of " << steps << ": small " << small.front() << ", big "
              << big.front() << " " << big.back() << std::endl;
  }
  if (std::getenv("UNEVEN_BARRIER") != nullptr) mx::ThrowIfError(kv.Barrier());
  mx::ThrowIfError(kv.Finish());
}

}  // namespace

int main() {
  try {
    Run();
    return 0;
  } catch (const std::exception& e) {  // a failed call or engine operation (an RPC)
    std::cerr << "uneven_worker: " << e.what() << "\n";
    return 1;
  }
}
