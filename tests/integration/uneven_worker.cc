// A worker of a dist_sync job (started by deploy/launch.py) that has more
// batches than the others: worker r runs 3 + r steps. Each step pushpulls
// two keys, a small one (on one server) and one split across the servers,
// with every element of the push equal to r + 1, and prints what it pulled:
// "step S of N: small V, big W". Without an optimizer a step's value is the
// sum of the pushes of the workers still in it. Exits 0 after leaving the
// job (KVStore::Finish); non-zero, printing why, on any error.
#include <iostream>
#include <vector>

#include "kvstore/kvstore.h"
#include "ndarray/ndarray.h"

namespace {

constexpr int64_t kSmall = 4, kBig = (1 << 20) + 8;  // above the default bound

int Run() {
  absl::StatusOr<std::unique_ptr<mx::KVStore>> kv = mx::KVStore::Create("dist_sync");
  if (!kv.ok()) {
    std::cerr << "uneven_worker: " << kv.status() << "\n";
    return 1;
  }
  const int rank = (*kv)->rank();
  const int steps = 3 + rank;
  std::vector<mx::NDArray> pushes, outs;
  for (int64_t n : {kSmall, kBig}) {
    pushes.push_back(mx::FromVector(std::vector<float>(n, rank + 1.0f)));
    outs.push_back(mx::Empty({n}));
  }
  for (int key : {0, 1}) {
    absl::Status s = (*kv)->Init(key, mx::Zeros({key == 0 ? kSmall : kBig}));
    if (!s.ok()) {
      std::cerr << "uneven_worker: " << s << "\n";
      return 1;
    }
  }
  for (int step = 1; step <= steps; ++step) {
    for (int key : {0, 1}) {
      absl::Status s = (*kv)->PushPull(key, {pushes[key]}, {outs[key]});
      if (!s.ok()) {
        std::cerr << "uneven_worker: " << s << "\n";
        return 1;
      }
    }
    const std::vector<float> small = outs[0].ToVector(), big = outs[1].ToVector();
    std::cout << "step " << step << " of " << steps << ": small " << small.front() << ", big "
              << big.front() << " " << big.back() << std::endl;
  }
  absl::Status s = (*kv)->Finish();
  if (!s.ok()) {
    std::cerr << "uneven_worker: " << s << "\n";
    return 1;
  }
  return 0;
}

}  // namespace

int main() {
  try {
    return Run();
  } catch (const std::exception& e) {  // a failed engine operation (an RPC)
    std::cerr << "uneven_worker: " << e.what() << "\n";
    return 1;
  }
}
