// Embedding with a row-sparse weight (Executor's row_sparse arguments):
// the same outputs and the same gradient rows as a dense table, the
// gradient only on the rows set, the capacity independent of the table's
// size, and errors for every misuse.
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

constexpr int kTable = 50, kDim = 4, kBatch = 3, kFields = 2;

// data (3, 2) -> Embedding(50 x 4, sparse_grad) -> Flatten -> FC(1) -> loss.
Symbol Net(bool sparse_grad = true) {
  Symbol net = Op("Embedding", {Variable("data")},
                  {{"input_dim", kTable}, {"output_dim", kDim}, {"sparse_grad", sparse_grad}},
                  "embed");
  net = Op("Flatten", {net}, {}, "flatten");
  net = Op("FullyConnected", {net}, {{"num_hidden", 1}}, "fc");
  return Op("LinearRegressionOutput", {net}, {}, "loss");
}

// Unique rows 0, 3, 7, 41, 49: 7.5 reads row 7, -2 row 0 and 60 row 49, as
// in dense Embedding (MXNet truncates and clips).
const std::vector<float> kData = {7.5f, 3, 41, 7, -2, 60};

std::map<std::string, Shape> InputShapes() {
  return {{"data", {kBatch, kFields}}, {"loss_label", {kBatch, 1}}};
}

void Fill(Executor& exec, const NDArray& table) {
  NDArray(exec.arg_dict().at("data")).SyncCopyFromCPU(kData.data(), kData.size());
  const std::vector<float> label = {1, -1, 0.5f};
  NDArray(exec.arg_dict().at("loss_label")).SyncCopyFromCPU(label.data(), label.size());
  NDArray fc = exec.arg_dict().at("fc_weight");
  SampleUniform(-1, 1, &fc);
  fc.WaitToRead();
  if (!exec.row_sparse_args().count("embed_weight")) {
    NDArray(exec.arg_dict().at("embed_weight")).Assign(table);
  }
}

std::string ErrorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(SparseEmbedding, MatchesTheDenseTableAndGradientOnTheRowsSet) {
  srand(5);
  NDArray table = RandomUniform(-1, 1, {kTable, kDim});
  auto dense = Executor::SimpleBind(Net(), cpu(), InputShapes());
  ASSERT_TRUE(dense.ok()) << dense.status();
  // Capacity 6 (batch x fields): the block never depends on the table size.
  auto sparse = Executor::SimpleBind(Net(), cpu(), InputShapes(), GradReq::kWrite, {}, {},
                                     {{"embed_weight", kBatch * kFields}});
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  EXPECT_EQ((*sparse)->arg_dict().at("embed_weight").shape(), Shape({6, kDim}));
  srand(9);
  Fill(**dense, table);
  srand(9);
  Fill(**sparse, table);

  const std::vector<int64_t> ids = UniqueRowIds(FromVector(kData), kTable);
  ASSERT_EQ(ids, std::vector<int64_t>({0, 3, 7, 41, 49}));
  (*sparse)->SetRowSparseArg("embed_weight", GatherRows(table, ids));
  for (Executor* e : {dense->get(), sparse->get()}) {
    e->Forward(true);
    e->Backward();
  }
  EXPECT_EQ((*sparse)->outputs()[0].ToVector(), (*dense)->outputs()[0].ToVector());
  const RowSparseNDArray g = (*sparse)->row_sparse_grad("embed_weight");
  EXPECT_EQ(g.shape(), Shape({kTable, kDim}));
  EXPECT_EQ(g.indices(), ids);
  const NDArray dense_grad = (*dense)->grad_dict().at("embed_weight");
  EXPECT_EQ(g.ToDense().ToVector(), dense_grad.ToVector());
  EXPECT_EQ(g.data().ToVector(), GatherRows(dense_grad, ids).data().ToVector());
  EXPECT_EQ((*sparse)->grad_dict().at("fc_weight").ToVector(),
            (*dense)->grad_dict().at("fc_weight").ToVector());
}

TEST(SparseEmbedding, AnIndexOutsideTheRowsSetIsAnErrorOnTheOutput) {
  auto exec = Executor::SimpleBind(Net(), cpu(), InputShapes(), GradReq::kWrite, {}, {},
                                   {{"embed_weight", 6}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  Fill(**exec, NDArray());
  // Row 41 is missing.
  (*exec)->SetRowSparseArg("embed_weight",
                           RowSparseNDArray({kTable, kDim}, {0, 3, 7}, Ones({3, kDim})));
  (*exec)->Forward(false);
  EXPECT_THAT(ErrorOf([&] { (*exec)->outputs()[0].WaitToRead(); }),
              HasSubstr("Embedding: index 41 (element 2 of the data) is not among the 3 rows"));
}

TEST(SparseEmbedding, MisuseIsRefusedNamingTheArgument) {
  auto bind = [](const Symbol& net, std::map<std::string, int64_t> rs,
                 std::map<std::string, GradReq> reqs = {}) {
    return std::string(
        Executor::SimpleBind(net, cpu(), InputShapes(), GradReq::kWrite, reqs, {}, rs)
            .status()
            .message());
  };
  EXPECT_THAT(bind(Net(), {{"fc_weight", 1}}),
              HasSubstr("argument 'fc_weight' is bound row-sparse, but operator fc "
                        "(FullyConnected) reads it"));
  EXPECT_THAT(bind(Net(false), {{"embed_weight", 6}}),
              HasSubstr("only Embedding with sparse_grad=True reads a row-sparse weight"));
  EXPECT_THAT(bind(Net(), {{"embed_weight", 51}}),
              HasSubstr("row-sparse argument 'embed_weight' has shape (51,4) but its table is "
                        "(50,4): it needs the table's shape with 1 to 50 rows"));
  EXPECT_THAT(bind(Net(), {{"embed_weight", 6}}, {{"embed_weight", GradReq::kAdd}}),
              HasSubstr("cannot add to its gradient"));
  EXPECT_THAT(bind(Net(), {{"nothing", 6}}),
              HasSubstr("row_sparse names 'nothing', which is not an argument"));

  auto exec = Executor::SimpleBind(Net(), cpu(), InputShapes(), GradReq::kWrite, {}, {},
                                   {{"embed_weight", 2}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  EXPECT_THAT(ErrorOf([&] { (*exec)->Forward(true); }),
              HasSubstr("Forward: row-sparse argument 'embed_weight' has no rows yet"));
  EXPECT_THAT(ErrorOf([&] {
                (*exec)->SetRowSparseArg(
                    "embed_weight", RowSparseNDArray({kTable, kDim}, {1, 2, 3}, Ones({3, kDim})));
              }),
              HasSubstr("3 rows exceed the capacity of 2"));
  EXPECT_THAT(ErrorOf([&] {
                (*exec)->SetRowSparseArg("embed_weight",
                                         RowSparseNDArray({kTable + 1, kDim}, {1}, Ones({1, kDim})));
              }),
              HasSubstr("the rows are of a table (51,4) but the argument's table is (50,4)"));
  EXPECT_THAT(ErrorOf([&] { (*exec)->SetRowSparseArg("fc_weight", RowSparseNDArray({1, 1})); }),
              HasSubstr("'fc_weight' is not a row-sparse argument"));
}

TEST(SparseEmbedding, ReshapeKeepsTheBlock) {
  auto exec = Executor::SimpleBind(Net(), cpu(), InputShapes(), GradReq::kWrite, {}, {},
                                   {{"embed_weight", 6}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  auto small = (*exec)->Reshape({{"data", {1, kFields}}, {"loss_label", {1, 1}}});
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_TRUE((*small)->arg_dict().at("embed_weight").SharesStorageWith(
      (*exec)->arg_dict().at("embed_weight")));
  EXPECT_EQ((*small)->row_sparse_args(), std::set<std::string>({"embed_weight"}));
}

}  // namespace
}  // namespace mx
