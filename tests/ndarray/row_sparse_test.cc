// RowSparseNDArray: construction and its checks, conversions, sums (in
// order, bit-identical to dense sums), products with dense arrays, printing
// and files.
#include "ndarray/row_sparse.h"

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

// A 6x2 table whose row r holds (10r, 10r + 1) at the rows `ids`.
RowSparseNDArray Rows(const std::vector<int64_t>& ids, float scale = 1.f) {
  std::vector<float> v;
  for (int64_t r : ids) {
    v.push_back(scale * 10.f * r);
    v.push_back(scale * (10.f * r + 1));
  }
  return RowSparseNDArray({6, 2}, ids, FromVector(v, {static_cast<int64_t>(ids.size()), 2}));
}

std::string ErrorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(RowSparseTest, StoresRowsAndConvertsToDense) {
  RowSparseNDArray a = Rows({1, 4});
  EXPECT_EQ(a.nnz(), 2);
  EXPECT_EQ(a.shape(), Shape({6, 2}));
  EXPECT_EQ(a.row_size(), 2);
  EXPECT_EQ(a.ToDense().ToVector(),
            std::vector<float>({0, 0, 10, 11, 0, 0, 0, 0, 40, 41, 0, 0}));
  RowSparseNDArray empty({6, 2});
  EXPECT_EQ(empty.nnz(), 0);
  EXPECT_EQ(empty.ToDense().ToVector(), std::vector<float>(12, 0.f));
}

TEST(RowSparseTest, HigherDimensionalRows) {
  RowSparseNDArray a({3, 2, 2}, {2}, FromVector({1, 2, 3, 4}, {1, 2, 2}));
  EXPECT_EQ(a.row_size(), 4);
  EXPECT_EQ(a.ToDense().ToVector(),
            std::vector<float>({0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4}));
}

TEST(RowSparseTest, RefusesBadIdsNamingThem) {
  const NDArray two = Ones({2, 2});
  EXPECT_THAT(ErrorOf([&] { RowSparseNDArray({6, 2}, {1, 6}, two); }),
              HasSubstr("row id 6 at position 1 is outside [0, 6)"));
  EXPECT_THAT(ErrorOf([&] { RowSparseNDArray({6, 2}, {-1, 2}, two); }),
              HasSubstr("row id -1 at position 0"));
  EXPECT_THAT(ErrorOf([&] { RowSparseNDArray({6, 2}, {3, 3}, two); }),
              HasSubstr("3 at position 1 repeats the id before it"));
  EXPECT_THAT(ErrorOf([&] { RowSparseNDArray({6, 2}, {4, 2}, two); }),
              HasSubstr("sorted ascending and unique, but 2 at position 1 follows the larger 4"));
  EXPECT_THAT(ErrorOf([&] { RowSparseNDArray({6, 2}, {1}, two); }),
              HasSubstr("1 row ids need data of shape (1,2), not (2,2)"));
  EXPECT_THAT(ErrorOf([&] { RowSparseNDArray({6, 3}, {1, 2}, two); }),
              HasSubstr("need data of shape (2,3)"));
  EXPECT_TRUE(CheckRowIds({0, 2, 5}, 6).ok());
  EXPECT_EQ(CheckRowIds({0, 7}, 6, "pull of key 3").message(),
            "pull of key 3: row id 7 at position 1 is outside [0, 6)");
}

TEST(RowSparseTest, FromDenseKeepsNonZeroRows) {
  NDArray dense = FromVector({0, 0, 1, 0, 0, 0, 0, -2}, {4, 2});
  RowSparseNDArray a = ToRowSparse(dense);
  EXPECT_EQ(a.indices(), std::vector<int64_t>({1, 3}));
  EXPECT_EQ(a.data().ToVector(), std::vector<float>({1, 0, 0, -2}));
  EXPECT_EQ(a.ToDense().ToVector(), dense.ToVector());
}

TEST(RowSparseTest, GatherAndRetain) {
  NDArray dense = FromVector({0, 1, 2, 3, 4, 5, 6, 7}, {4, 2});
  RowSparseNDArray g = GatherRows(dense, {0, 2});
  EXPECT_EQ(g.data().ToVector(), std::vector<float>({0, 1, 4, 5}));
  // Retain keeps every requested id; rows a lacks read as zero.
  RowSparseNDArray r = Retain(Rows({1, 4}), {0, 4});
  EXPECT_EQ(r.indices(), std::vector<int64_t>({0, 4}));
  EXPECT_EQ(r.data().ToVector(), std::vector<float>({0, 0, 40, 41}));
  EXPECT_THAT(ErrorOf([&] { GatherRows(dense, {2, 1}); }), HasSubstr("GatherRows: row ids"));
}

TEST(RowSparseTest, UniqueRowIdsOfEmbeddingIndices) {
  EXPECT_EQ(UniqueRowIds(FromVector({5, 1, 5, 0, 1}), 6), std::vector<int64_t>({0, 1, 5}));
  // The rows dense Embedding reads: truncated, clipped, NaN reads row 0.
  EXPECT_EQ(UniqueRowIds(FromVector({1.5f, 6, 1e9f, -3, 4.99f}), 6),
            std::vector<int64_t>({0, 1, 4, 5}));
  EXPECT_EQ(UniqueRowIds(FromVector({std::nanf(""), 2}), 6), std::vector<int64_t>({0, 2}));
  EXPECT_THAT(ErrorOf([&] { UniqueRowIds(FromVector({1}), 0); }), HasSubstr("a table needs rows"));
}

TEST(RowSparseTest, SumsOnTheUnionOfRows) {
  RowSparseNDArray s = Rows({1, 4}) + Rows({0, 4}, 2.f);
  EXPECT_EQ(s.indices(), std::vector<int64_t>({0, 1, 4}));
  EXPECT_EQ(s.data().ToVector(), std::vector<float>({0, 2, 10, 11, 120, 123}));
  EXPECT_EQ((Rows({2}) * 3.f).data().ToVector(), std::vector<float>({60, 63}));
  RowSparseNDArray m = Rows({2});
  m *= 0.5f;
  EXPECT_EQ(m.data().ToVector(), std::vector<float>({10, 10.5}));
}

TEST(RowSparseTest, SumInOrderIsBitIdenticalToDenseSum) {
  // Values whose float sum depends on the order of the additions.
  const std::vector<float> big = {1e8f, 1.f}, neg = {-1e8f, 3.f};
  std::vector<RowSparseNDArray> terms = {
      RowSparseNDArray({3, 2}, {0}, FromVector(big, {1, 2})),
      RowSparseNDArray({3, 2}, {0, 2}, FromVector({1, 1e-8f, 5, 6}, {2, 2})),
      RowSparseNDArray({3, 2}, {0}, FromVector(neg, {1, 2}))};
  NDArray dense = Zeros({3, 2});
  for (const RowSparseNDArray& t : terms) dense += t.ToDense();
  EXPECT_EQ(Sum(terms).ToDense().ToVector(), dense.ToVector());
}

TEST(RowSparseTest, DenseArithmetic) {
  NDArray dense = Ones({6, 2});
  NDArray sum = dense + Rows({3});
  EXPECT_EQ(sum.ToVector()[6], 31.f);
  EXPECT_EQ(sum.ToVector()[0], 1.f);
  EXPECT_EQ(dense.ToVector()[6], 1.f);  // + made a new array
  dense += Rows({3});
  EXPECT_EQ(dense.ToVector(), sum.ToVector());
  RowSparseNDArray prod = Rows({1, 3}) * Full({6, 2}, 2.f);
  EXPECT_EQ(prod.indices(), std::vector<int64_t>({1, 3}));
  EXPECT_EQ(prod.data().ToVector(), std::vector<float>({20, 22, 60, 62}));
  EXPECT_THAT(ErrorOf([&] { NDArray d = Ones({5, 2}); d += Rows({1}); }),
              HasSubstr("shape mismatch (5,2) vs (6,2)"));
  EXPECT_THAT(ErrorOf([&] { Rows({1}) + RowSparseNDArray({6, 3}); }),
              HasSubstr("shape mismatch (6,2) vs (6,3)"));
}

// Rows that are a view of the dense array itself: read before any is
// written (the kernel read a row it had already overwritten).
TEST(RowSparseTest, RowsThatAreAViewOfTheTargetAreReadFirst) {
  NDArray d = FromVector({1, 2, 3, 4}, {4, 1});
  RowSparseNDArray b({4, 1}, {1, 2}, d.Slice(0, 2));
  d += b;
  EXPECT_EQ(d.ToVector(), std::vector<float>({1, 3, 5, 4}));
  NDArray e = FromVector({1, 2, 3, 4}, {4, 1});
  AssignRows(RowSparseNDArray({4, 1}, {1, 2}, e.Slice(0, 2)), &e);
  EXPECT_EQ(e.ToVector(), std::vector<float>({1, 1, 2, 4}));
}

TEST(RowSparseTest, CopyHasItsOwnData) {
  RowSparseNDArray a = Rows({2});
  RowSparseNDArray b = a.Copy();
  b *= 0.f;
  EXPECT_EQ(a.data().ToVector(), std::vector<float>({20, 21}));
  EXPECT_EQ(b.indices(), a.indices());
}

// Row-sparse arrays live on CPU contexts: a copy to a GPU is refused at
// once, saying so (here and on a machine with GPUs, where the copy would
// otherwise hand host row ids to GPU kernels).
TEST(RowSparseTest, ACopyToAGpuIsRefused) {
  try {
    Rows({2}).Copy(gpu(0));
    ADD_FAILURE() << "copied to gpu(0)";
  } catch (const Error& e) {
    EXPECT_EQ(e.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(e.what(), HasSubstr("row_sparse arrays live on CPU contexts"));
  }
}

TEST(RowSparseTest, Prints) {
  const std::string s = Rows({1, 4}).ToString();
  EXPECT_THAT(s, HasSubstr("6×2 RowSparseNDArray<float> @ cpu(0), 2 stored rows, ids 1, 4:"));
  EXPECT_THAT(s, HasSubstr("40.0  41.0"));
  std::vector<int64_t> many;
  for (int64_t i = 0; i < 20; ++i) many.push_back(i * 3);
  const std::string m =
      RowSparseNDArray({100, 1}, many, Zeros({20, 1})).ToString();
  EXPECT_THAT(m, HasSubstr("ids 0, 3, 6, 9, …, 48, 51, 54, 57:"));
  EXPECT_EQ(RowSparseNDArray({5, 2}).ToString(),
            "5×2 RowSparseNDArray<float> @ cpu(0), 0 stored rows\n");
}

TEST(RowSparseTest, SavesAndLoads) {
  const std::string path = ::testing::TempDir() + "/rsp.nd";
  ASSERT_TRUE(SaveRowSparse(path, {{"embed", Rows({1, 4})}, {"none", RowSparseNDArray({6, 2})}})
                  .ok());
  auto loaded = LoadRowSparse(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 2u);
  EXPECT_EQ((*loaded)[0].first, "embed");
  EXPECT_EQ((*loaded)[0].second.indices(), std::vector<int64_t>({1, 4}));
  EXPECT_EQ((*loaded)[0].second.ToDense().ToVector(), Rows({1, 4}).ToDense().ToVector());
  EXPECT_EQ((*loaded)[1].second.nnz(), 0);
  // The dense loader names the row-sparse entry instead of misreading it.
  EXPECT_THAT(std::string(Load(path).status().message()),
              HasSubstr("array 'embed' is row_sparse; load it with LoadRowSparse"));
  ASSERT_TRUE(Save(path, {{"w", Ones({2})}}).ok());
  EXPECT_THAT(std::string(LoadRowSparse(path).status().message()),
              HasSubstr("array 'w' is dense; load it with Load"));
  std::remove(path.c_str());
}

TEST(RowSparseTest, LoadRefusesDamagedIds) {
  const std::string path = ::testing::TempDir() + "/rsp_bad.nd";
  ASSERT_TRUE(SaveRowSparse(path, {{"e", Rows({1, 4})}}).ok());
  // Swap the two ids in the file (and fix nothing else): unsorted ids are
  // data loss, not a crash, and the checksum says so too.
  std::FILE* f = std::fopen(path.c_str(), "r+b");
  ASSERT_NE(f, nullptr);
  // magic 4, version 4, count 8, name len 4, name 1, stype 4, ndim 4,
  // dims 16, nnz 8: the ids start at offset 53.
  const int64_t swapped[2] = {4, 1};
  std::fseek(f, 53, SEEK_SET);
  std::fwrite(swapped, sizeof(swapped), 1, f);
  std::fclose(f);
  const std::string msg(LoadRowSparse(path).status().message());
  EXPECT_THAT(msg, HasSubstr("array 'e': row ids must be sorted ascending"));
  EXPECT_THAT(msg, HasSubstr("checksum does not match"));
  std::remove(path.c_str());
}

}  // namespace
}  // namespace mx
