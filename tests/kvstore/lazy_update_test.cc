// Lazy updates of row-sparse gradients (Optimizer::UpdateRows): the rows a
// gradient stores move exactly as a dense update of just those rows would
// move them; every other row, and its state, stays as it was (MXNet's
// lazy_update); a table's row range on a server is addressed by first_row.
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/optimizer.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Optimizer> Make(const std::string& name, const Optimizer::Options& options) {
  auto opt = Optimizer::Create(name, options);
  EXPECT_TRUE(opt.ok()) << opt.status();
  return std::move(*opt);
}

// Row r of a 6x3 table holds r + 0.1 * c; gradients are distinct per step.
std::vector<float> Table() {
  std::vector<float> v;
  for (int r = 0; r < 6; ++r) {
    for (int c = 0; c < 3; ++c) v.push_back(r + 0.1f * c);
  }
  return v;
}

std::vector<float> RowsOf(const std::vector<float>& table, const std::vector<int64_t>& ids) {
  std::vector<float> out;
  for (int64_t r : ids) out.insert(out.end(), table.begin() + r * 3, table.begin() + r * 3 + 3);
  return out;
}

std::vector<float> Grad(int step, size_t rows) {
  std::vector<float> g;
  for (size_t i = 0; i < rows * 3; ++i) g.push_back(0.3f * (step + 1) - 0.07f * i);
  return g;
}

struct Case {
  std::string name;
  Optimizer::Options options;
};

class LazyUpdateTest : public ::testing::TestWithParam<Case> {};

TEST_P(LazyUpdateTest, TouchedRowsMoveAsADenseUpdateOfThoseRowsAndOthersStay) {
  const std::vector<int64_t> ids = {1, 4};
  auto lazy = Make(GetParam().name, GetParam().options);
  auto dense = Make(GetParam().name, GetParam().options);
  lazy->SetParamNames({{0, "embed_weight"}});
  dense->SetParamNames({{0, "embed_weight"}});
  NDArray table = FromVector(Table(), {6, 3});
  NDArray rows = FromVector(RowsOf(Table(), ids), {2, 3});
  for (int step = 0; step < 3; ++step) {
    const std::vector<float> g = Grad(step, ids.size());
    lazy->UpdateRows(0, table, RowSparseNDArray({6, 3}, ids, FromVector(g, {2, 3})));
    dense->Update(0, rows, FromVector(g, {2, 3}));
  }
  const std::vector<float> after = table.ToVector();
  EXPECT_EQ(RowsOf(after, ids), rows.ToVector());
  EXPECT_EQ(RowsOf(after, {0, 2, 3, 5}), RowsOf(Table(), {0, 2, 3, 5}));
  EXPECT_EQ(lazy->num_update(), 3);
}

INSTANTIATE_TEST_SUITE_P(
    Optimizers, LazyUpdateTest,
    ::testing::Values(Case{"sgd", {{"learning_rate", "0.1"}, {"wd", "0.01"}}},
                      Case{"sgd", {{"learning_rate", "0.1"}, {"momentum", "0.9"}, {"wd", "0.01"}}},
                      Case{"nag", {{"learning_rate", "0.1"}, {"momentum", "0.9"}}},
                      Case{"adam", {{"learning_rate", "0.01"}, {"wd", "0.01"}}},
                      Case{"adagrad", {{"learning_rate", "0.1"}, {"clip_gradient", "0.5"}}},
                      Case{"rmsprop", {{"learning_rate", "0.01"}}},
                      Case{"adadelta", {{"rescale_grad", "0.5"}}}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return info.param.name + std::to_string(info.index);
    });

TEST(LazyUpdate, UntouchedRowsKeepMomentumAndGetNoDecay) {
  // Momentum SGD with weight decay: row 1 is touched at step 0 only. A dense
  // update with zero gradient rows would keep moving it (momentum) and
  // decay it; the lazy update leaves it exactly where step 0 put it, and
  // row 5's first update starts from zero momentum.
  auto opt = Make("sgd", {{"learning_rate", "0.5"}, {"momentum", "0.9"}, {"wd", "0.1"}});
  opt->SetParamNames({{0, "embed_weight"}});
  NDArray w = Zeros({6, 1});
  opt->UpdateRows(0, w, RowSparseNDArray({6, 1}, {1}, FromVector({1.f}, {1, 1})));
  EXPECT_FLOAT_EQ(w.ToVector()[1], -0.5f);  // m = -lr * g; w += m
  opt->UpdateRows(0, w, RowSparseNDArray({6, 1}, {5}, FromVector({2.f}, {1, 1})));
  const std::vector<float> v = w.ToVector();
  EXPECT_FLOAT_EQ(v[1], -0.5f);
  EXPECT_FLOAT_EQ(v[5], -1.f);
  // The same two steps as dense updates move row 1 again.
  auto dense_opt = Make("sgd", {{"learning_rate", "0.5"}, {"momentum", "0.9"}, {"wd", "0.1"}});
  dense_opt->SetParamNames({{0, "embed_weight"}});
  NDArray d = Zeros({6, 1});
  dense_opt->Update(0, d, FromVector({0, 1, 0, 0, 0, 0}, {6, 1}));
  dense_opt->Update(0, d, FromVector({0, 0, 0, 0, 0, 2}, {6, 1}));
  EXPECT_NE(d.ToVector()[1], -0.5f);
}

TEST(LazyUpdate, ARowRangeOfATableIsAddressedByFirstRow) {
  // A server holding rows [3, 6) of a 6-row table updates its rows 0 and 2
  // for the ids 3 and 5.
  auto opt = Make("sgd", {{"learning_rate", "1"}});
  NDArray range = Zeros({3, 2});
  opt->UpdateRows(0, range, RowSparseNDArray({6, 2}, {3, 5}, FromVector({1, 2, 3, 4}, {2, 2})),
                  /*first_row=*/3);
  EXPECT_EQ(range.ToVector(), std::vector<float>({-1, -2, 0, 0, -3, -4}));
}

TEST(LazyUpdate, ErrorsNameTheParameterAndTheRows) {
  auto opt = Make("sgd", {{"learning_rate", "1"}});
  opt->SetParamNames({{7, "embed_weight"}});
  NDArray range = Zeros({3, 2});
  const auto error = [&](int64_t first_row, const RowSparseNDArray& g) -> std::string {
    try {
      opt->UpdateRows(7, range, g, first_row);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_THAT(error(3, RowSparseNDArray({6, 2}, {1}, Ones({1, 2}))),
              HasSubstr("lazy update of parameter 7 ('embed_weight'): row id 1 of the gradient "
                        "is outside the weight's rows [3, 6)"));
  EXPECT_THAT(error(4, RowSparseNDArray({6, 2}, {5}, Ones({1, 2}))),
              HasSubstr("the weight (3,2) is not rows [4, 7) of the gradient's table (6,2)"));
  EXPECT_THAT(error(0, RowSparseNDArray({6, 3}, {5}, Ones({1, 3}))),
              HasSubstr("is not rows [0, 3) of the gradient's table (6,3)"));
  // Nothing was applied by the refused calls.
  EXPECT_EQ(range.ToVector(), std::vector<float>(6, 0.f));
  EXPECT_EQ(opt->num_update(), 0);
}

}  // namespace
}  // namespace mx
