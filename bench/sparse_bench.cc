// Row-sparse push and pull against dense ones (issue 18): a worker pushes
// a gradient of 1% of the rows of a 1M x 64 table and pulls those rows
// back, against a dense push and pull of the whole table (what a store
// without row_sparse does), both through dist_sync with 2 parameter
// servers on 127.0.0.1 (in this process) applying SGD. Figures: the step's
// time (baseline: the dense step, same run, interleaved rounds) and the
// bytes each moves.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "kvstore/dist_kvstore.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"
#include "server/kvstore_service.h"

namespace mx {
namespace {

constexpr int64_t kRows = 1 << 20, kDim = 64;
constexpr double kTouched = 0.01;

void Check(const absl::Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "sparse_bench: %s: %s\n", what, std::string(s.message()).c_str());
  std::exit(1);
}

int Main() {
  std::vector<std::unique_ptr<ParameterServer>> servers;
  DistKVStoreOptions o;
  for (int i = 0; i < 2; ++i) {
    auto s = ParameterServer::Start("127.0.0.1:0", ShardOptions{});
    Check(s.status(), "server");
    o.servers.push_back((*s)->address());
    servers.push_back(*std::move(s));
  }
  auto kv = CreateDistKVStore(o);
  Check(kv.status(), "store");
  auto sgd = Optimizer::Create("sgd", {{"learning_rate", "0.1"}});
  Check(sgd.status(), "optimizer");
  Check((*kv)->SetOptimizer(*std::move(sgd)), "set optimizer");

  constexpr int kDenseKey = 1, kTableKey = 2;
  NDArray weight = Zeros({kRows, kDim});
  NDArray grad = Full({kRows, kDim}, 1e-3f);
  Check((*kv)->Init(kDenseKey, weight), "init dense");
  Check((*kv)->InitRowSparse(kTableKey, {kRows, kDim}, {0.07f, 1}), "init table");

  // 1% of the rows, another draw each step as batches touch other rows
  // (drawn before the clock starts).
  std::mt19937_64 gen(7);
  std::vector<std::vector<int64_t>> draws(16);
  for (std::vector<int64_t>& ids : draws) {
    std::bernoulli_distribution pick(kTouched);
    for (int64_t r = 0; r < kRows; ++r) {
      if (pick(gen)) ids.push_back(r);
    }
  }
  size_t step = 0;
  auto touched = [&] { return draws[step++ % draws.size()]; };
  int64_t sparse_rows = 0;
  auto dense_step = [&] {
    Check((*kv)->PushPull(kDenseKey, {grad}, {weight}), "dense pushpull");
    weight.WaitToRead();
  };
  auto sparse_step = [&] {
    std::vector<int64_t> ids = touched();
    sparse_rows = static_cast<int64_t>(ids.size());
    const RowSparseNDArray g({kRows, kDim}, ids, Full({sparse_rows, kDim}, 1e-3f));
    Check((*kv)->Push(kTableKey, g), "row-sparse push");
    RowSparseNDArray rows;
    Check((*kv)->RowSparsePull(kTableKey, std::move(ids), &rows), "row-sparse pull");
    rows.data().WaitToRead();
  };
  const auto [dense, sparse] = bench::MedianPair(7, dense_step, sparse_step);
  const double dense_bytes = 2.0 * kRows * kDim * sizeof(float);
  // Rows both ways, and their ids (8 bytes each) both ways.
  const double sparse_bytes = 2.0 * sparse_rows * (kDim * sizeof(float) + sizeof(int64_t));
  bench::Report("rowsparse_pushpull_1pct_1Mx64", sparse * 1e3, "ms", dense * 1e3, dense / sparse,
                ">=20");
  bench::Report("rowsparse_pushpull_1pct_1Mx64_bytes", sparse_bytes / 1e6, "MB",
                dense_bytes / 1e6, dense_bytes / sparse_bytes, "(bytes)");
  Check((*kv)->Finish(), "finish");
  return 0;
}

}  // namespace
}  // namespace mx

int main(int argc, char** argv) {
  mx::bench::NoArguments("sparse_bench", argc, argv);
  return mx::Main();
}
