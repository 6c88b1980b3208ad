// Row-sparse keys in the local store: tables created from a TableInit
// (the same numbers however a table is split into row ranges), pushes of
// row-sparse gradients with lazy optimizer updates, RowSparsePull, and the
// errors of item 6 of issue 18 (wrong kind of key, bad row ids, shapes).
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/kvstore.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<KVStore> Local() {
  auto kv = KVStore::Create("local");
  EXPECT_TRUE(kv.ok()) << kv.status();
  return std::move(*kv);
}

std::vector<float> RowsOf(const std::vector<float>& table, int64_t dim,
                          const std::vector<int64_t>& ids) {
  std::vector<float> out;
  for (int64_t r : ids) {
    out.insert(out.end(), table.begin() + r * dim, table.begin() + (r + 1) * dim);
  }
  return out;
}

TEST(TableInit, RowRangesOfATableAreFilledAlikeHoweverItIsSplit) {
  NDArray whole = Empty({10, 3});
  SampleUniformRows(-0.5f, 0.5f, 7, 0, &whole);
  NDArray tail = Empty({4, 3});
  SampleUniformRows(-0.5f, 0.5f, 7, 6, &tail);
  const std::vector<float> w = whole.ToVector();
  EXPECT_EQ(tail.ToVector(), RowsOf(w, 3, {6, 7, 8, 9}));
  for (float x : w) {
    EXPECT_GE(x, -0.5f);
    EXPECT_LT(x, 0.5f);
  }
  // The same numbers as RandomUniform's for that seed's element indices.
  NDArray other = Empty({10, 3});
  SampleUniformRows(-0.5f, 0.5f, 8, 0, &other);
  EXPECT_NE(other.ToVector(), w);
}

TEST(RowSparseKVStore, PullsTheRowsAskedForFromTheInitialTable) {
  auto kv = Local();
  ASSERT_TRUE(kv->InitRowSparse(3, {1000, 4}, {0.1f, 42}).ok());
  NDArray whole = Empty({1000, 4});
  SampleUniformRows(-0.1f, 0.1f, 42, 0, &whole);
  RowSparseNDArray rows;
  ASSERT_TRUE(kv->RowSparsePull(3, {2, 500, 999}, &rows).ok());
  EXPECT_EQ(rows.indices(), std::vector<int64_t>({2, 500, 999}));
  EXPECT_EQ(rows.data().ToVector(), RowsOf(whole.ToVector(), 4, {2, 500, 999}));
  // Zeros without a scale; a second init with the same shape keeps the table.
  ASSERT_TRUE(kv->InitRowSparse(4, {10, 2}).ok());
  ASSERT_TRUE(kv->InitRowSparse(3, {1000, 4}).ok());
  ASSERT_TRUE(kv->RowSparsePull(4, {0, 9}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>(4, 0.f));
}

TEST(RowSparseKVStore, PushesUpdateOnlyTheTouchedRowsLazily) {
  auto kv = Local();
  ASSERT_TRUE(kv->InitRowSparse(3, {6, 2}).ok());
  auto opt = Optimizer::Create("sgd", {{"learning_rate", "0.5"}, {"momentum", "0.9"}});
  ASSERT_TRUE(opt.ok());
  ASSERT_TRUE(kv->SetOptimizer(std::move(*opt)).ok());
  // Two devices' gradients are summed on the union of their rows.
  ASSERT_TRUE(kv->PushRowSparse(3, {RowSparseNDArray({6, 2}, {1}, FromVector({1, 2}, {1, 2})),
                                    RowSparseNDArray({6, 2}, {1, 4}, FromVector({1, 0, 4, 4}, {2, 2}))})
                  .ok());
  RowSparseNDArray rows;
  ASSERT_TRUE(kv->RowSparsePull(3, {0, 1, 4}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>({0, 0, -1, -1, -2, -2}));
  // Row 1 is not pushed now: its momentum does not move it (lazy update).
  ASSERT_TRUE(kv->Push(3, RowSparseNDArray({6, 2}, {4}, FromVector({0, 0}, {1, 2}))).ok());
  ASSERT_TRUE(kv->RowSparsePull(3, {1, 4}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>({-1, -1, -3.8f, -3.8f}));
}

TEST(RowSparseKVStore, WithoutAnOptimizerTheTableBecomesThePushedSum) {
  auto kv = Local();
  ASSERT_TRUE(kv->InitRowSparse(3, {4, 1}, {1.f, 1}).ok());
  ASSERT_TRUE(kv->Push(3, RowSparseNDArray({4, 1}, {2}, FromVector({5}, {1, 1}))).ok());
  RowSparseNDArray rows;
  ASSERT_TRUE(kv->RowSparsePull(3, {0, 1, 2, 3}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>({0, 0, 5, 0}));
}

TEST(RowSparseKVStore, AssignRowsSetsRowsWithoutTheOptimizer) {
  auto kv = Local();
  ASSERT_TRUE(kv->InitRowSparse(3, {6, 2}, {1.f, 4}).ok());
  auto opt = Optimizer::Create("sgd", {{"learning_rate", "0.5"}});
  ASSERT_TRUE(opt.ok());
  ASSERT_TRUE(kv->SetOptimizer(std::move(*opt)).ok());
  ASSERT_TRUE(kv->AssignRows(3, RowSparseNDArray({6, 2}, {0, 5}, FromVector({1, 2, 3, 4}, {2, 2})))
                  .ok());
  RowSparseNDArray rows;
  ASSERT_TRUE(kv->RowSparsePull(3, {0, 5}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>({1, 2, 3, 4}));
  EXPECT_THAT(std::string(kv->AssignRows(4, RowSparseNDArray({6, 2})).message()),
              HasSubstr("never initialized"));
}

TEST(RowSparseKVStore, ErrorsNameTheKeyAndWhatIsWrong) {
  auto kv = Local();
  ASSERT_TRUE(kv->InitRowSparse(3, {6, 2}).ok());
  ASSERT_TRUE(kv->Init(5, Ones({6, 2})).ok());
  RowSparseNDArray rows;
  NDArray dense = Ones({6, 2});
  const RowSparseNDArray grad({6, 2}, {1}, Ones({1, 2}));
  auto message = [](const absl::Status& s) { return std::string(s.message()); };

  EXPECT_THAT(message(kv->Push(3, dense)),
              HasSubstr("push of key 3: the key is row-sparse (InitRowSparse)"));
  EXPECT_THAT(message(kv->Pull(3, &dense)), HasSubstr("pull of key 3: the key is row-sparse"));
  EXPECT_THAT(message(kv->Init(3, dense)), HasSubstr("init of key 3: the key is row-sparse"));
  EXPECT_THAT(message(kv->Push(5, grad)),
              HasSubstr("row-sparse push of key 5: the key is dense (Init)"));
  EXPECT_THAT(message(kv->RowSparsePull(5, {1}, &rows)),
              HasSubstr("row_sparse_pull of key 5: the key is dense"));
  EXPECT_THAT(message(kv->InitRowSparse(5, {6, 2})), HasSubstr("init of key 5: the key is dense"));
  EXPECT_THAT(message(kv->RowSparsePull(3, {1, 6}, &rows)),
              HasSubstr("row_sparse_pull of key 3: row id 6 at position 1 is outside [0, 6)"));
  EXPECT_THAT(message(kv->RowSparsePull(3, {2, 1}, &rows)),
              HasSubstr("row_sparse_pull of key 3: row ids must be sorted ascending and unique"));
  EXPECT_THAT(message(kv->RowSparsePull(3, {2, 2}, &rows)), HasSubstr("repeats"));
  EXPECT_THAT(message(kv->Push(3, RowSparseNDArray({7, 2}, {1}, Ones({1, 2})))),
              HasSubstr("value 0 has shape (7,2) but the key holds (6,2)"));
  EXPECT_THAT(message(kv->RowSparsePull(9, {1}, &rows)),
              HasSubstr("never initialized (call InitRowSparse first)"));
  EXPECT_THAT(message(kv->InitRowSparse(3, {7, 2})),
              HasSubstr("already initialized with shape (6,2), now (7,2)"));
  EXPECT_THAT(message(kv->InitRowSparse(8, {0, 2})), HasSubstr("needs at least one dimension and one row"));
  EXPECT_THAT(message(kv->InitRowSparse(8, {4, 2}, {-1.f, 0})), HasSubstr("scale -1 must be finite"));
  kv->SetUpdater([](int, const NDArray&, NDArray*) {});
  EXPECT_THAT(message(kv->Push(3, grad)), HasSubstr("a custom updater takes dense values"));
  // None of the refused calls changed the table.
  ASSERT_TRUE(kv->RowSparsePull(3, {0, 1, 2, 3, 4, 5}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>(12, 0.f));
}

// A pushpull whose pull is refused (unsorted row ids, a key never made)
// pushes nothing: the push was applied first, and a corrected retry
// applied it twice.
TEST(RowSparseKVStore, RefusedPushPullLeavesTheTableAlone) {
  auto kv = Local();
  ASSERT_TRUE(kv->InitRowSparse(3, {4, 1}).ok());
  auto opt = Optimizer::Create("sgd", {{"learning_rate", "1"}});
  ASSERT_TRUE(opt.ok());
  ASSERT_TRUE(kv->SetOptimizer(std::move(*opt)).ok());
  const RowSparseNDArray grad({4, 1}, {1}, FromVector({2}, {1, 1}));
  RowSparseNDArray out;
  EXPECT_THAT(std::string(kv->PushPullRowSparse(3, {grad}, {3, 1}, &out).message()),
              HasSubstr("row_sparse_pull of key 3"));
  std::vector<RowSparseNDArray> outs;
  EXPECT_THAT(
      std::string(kv->PushPullRowSparse({3, 4}, {{grad}, {grad}}, {{1}, {1}}, &outs).message()),
      HasSubstr("never initialized"));
  ASSERT_TRUE(kv->PushPullRowSparse(3, {grad}, {1, 3}, &out).ok());
  EXPECT_EQ(out.data().ToVector(), std::vector<float>({-2, 0}));
}

}  // namespace
}  // namespace mx
