// Tests of the data iterators (worker/io.h): batch contents for every
// last-batch rule, epochs, shuffling, partitioning, prefetching, and the
// MNIST and CSV readers with every way their files can be wrong.
#include "worker/io.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"
#include "zlib.h"

namespace mx {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// ---- Helpers.

std::string TempPath(const std::string& name) {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  return ::testing::TempDir() + info->test_suite_name() + "_" + info->name() +
         "_" + name;
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

void WriteGzip(const std::string& path, const std::string& data) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(gzwrite(f, data.data(), static_cast<unsigned>(data.size())),
            static_cast<int>(data.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

// Samples of the array tests: sample i has data (i, 100 + i) and label i, so
// a batch tells which samples it holds.
NDArray SampleData(int n) {
  std::vector<float> v;
  for (int i = 0; i < n; ++i) {
    v.push_back(static_cast<float>(i));
    v.push_back(static_cast<float>(100 + i));
  }
  return FromVector(v, {n, 2});
}

NDArray SampleLabels(int n) {
  std::vector<float> v(n);
  std::iota(v.begin(), v.end(), 0.0f);
  return FromVector(v, {n});
}

// Options of the array tests (C++17 has no designated initializers).
ArrayIterOptions Batches(int batch_size,
                         LastBatch last_batch = LastBatch::kPad) {
  ArrayIterOptions o;
  o.batch_size = batch_size;
  o.last_batch = last_batch;
  return o;
}

ArrayIterOptions Shuffled(int batch_size, uint64_t seed,
                          LastBatch last_batch = LastBatch::kPad) {
  ArrayIterOptions o = Batches(batch_size, last_batch);
  o.shuffle = true;
  o.seed = seed;
  return o;
}

std::unique_ptr<DataIter> MakeArrayIter(int n, ArrayIterOptions options) {
  absl::StatusOr<std::unique_ptr<DataIter>> iter =
      ArrayIter(SampleData(n), SampleLabels(n), options);
  EXPECT_TRUE(iter.ok()) << iter.status();
  return iter.ok() ? *std::move(iter) : nullptr;
}

// A batch as the sample indices of its labels, with its pad.
struct Seen {
  std::vector<int> samples;
  int pad;
  bool operator==(const Seen& o) const {
    return samples == o.samples && pad == o.pad;
  }
};

void PrintTo(const Seen& s, std::ostream* os) {
  *os << "{";
  for (int i : s.samples) *os << i << " ";
  *os << "pad " << s.pad << "}";
}

std::vector<int> ToInts(const NDArray& a) {
  std::vector<int> out;
  for (float v : a.ToVector()) out.push_back(static_cast<int>(v));
  return out;
}

// Runs the rest of the epoch; also checks that each batch's data rows
// belong to its labels.
std::vector<Seen> RunEpoch(DataIter* iter) {
  std::vector<Seen> batches;
  DataBatch batch;
  while (iter->Next(&batch)) {
    EXPECT_EQ(batch.data.size(), 1u);
    EXPECT_EQ(batch.label.size(), 1u);
    std::vector<int> labels = ToInts(batch.label[0]);
    std::vector<float> data = batch.data[0].ToVector();
    if (data.size() == 2 * labels.size()) {  // the array tests' samples
      for (size_t i = 0; i < labels.size(); ++i) {
        EXPECT_EQ(data[2 * i], labels[i]);
        EXPECT_EQ(data[2 * i + 1], 100 + labels[i]);
      }
    }
    batches.push_back({labels, batch.pad});
    if (batches.size() > 1000) break;  // a broken end of epoch
  }
  return batches;
}

std::vector<int> Flatten(const std::vector<Seen>& batches) {
  std::vector<int> all;
  for (const Seen& b : batches) {
    all.insert(all.end(), b.samples.begin(), b.samples.end() - b.pad);
  }
  return all;
}

std::vector<int> Range(int begin, int end) {
  std::vector<int> v(end - begin);
  std::iota(v.begin(), v.end(), begin);
  return v;
}

// ---- ArrayIter: batches and the last-batch rules.

TEST(ArrayIter, BatchesInOrderWithDescriptions) {
  auto iter = MakeArrayIter(10, Batches(4));
  ASSERT_NE(iter, nullptr);
  EXPECT_EQ(iter->batch_size(), 4);
  EXPECT_EQ(iter->num_samples(), 10);
  ASSERT_EQ(iter->ProvideData().size(), 1u);
  EXPECT_EQ(iter->ProvideData()[0].name, "data");
  EXPECT_EQ(iter->ProvideData()[0].shape, Shape({4, 2}));
  ASSERT_EQ(iter->ProvideLabel().size(), 1u);
  EXPECT_EQ(iter->ProvideLabel()[0].name, "softmax_label");
  EXPECT_EQ(iter->ProvideLabel()[0].shape, Shape({4}));

  DataBatch batch;
  ASSERT_TRUE(iter->Next(&batch));
  EXPECT_EQ(batch.data[0].shape(), Shape({4, 2}));
  EXPECT_EQ(batch.label[0].shape(), Shape({4}));
  EXPECT_THAT(batch.data[0].ToVector(),
              ElementsAre(0, 100, 1, 101, 2, 102, 3, 103));
  EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(0, 1, 2, 3));
  EXPECT_EQ(batch.pad, 0);
}

TEST(ArrayIter, PadFillsTheLastBatchFromTheStart) {
  auto iter = MakeArrayIter(10, Batches(4, LastBatch::kPad));
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{0, 1, 2, 3}, 0}, Seen{{4, 5, 6, 7}, 0},
                          Seen{{8, 9, 0, 1}, 2}));
  DataBatch batch;
  EXPECT_FALSE(iter->Next(&batch)) << "stays at the end until Reset";
  iter->Reset();
  EXPECT_EQ(RunEpoch(iter.get()).size(), 3u);
}

TEST(ArrayIter, PadRepeatsTheEpochWhenTheBatchIsLarger) {
  auto iter = MakeArrayIter(3, Batches(7));
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{0, 1, 2, 0, 1, 2, 0}, 4}));
}

TEST(ArrayIter, ExactMultipleHasNoPadding) {
  auto iter = MakeArrayIter(8, Batches(4));
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{0, 1, 2, 3}, 0}, Seen{{4, 5, 6, 7}, 0}));
}

TEST(ArrayIter, DiscardDropsTheIncompleteBatch) {
  auto iter = MakeArrayIter(10, Batches(4, LastBatch::kDiscard));
  for (int epoch = 0; epoch < 2; ++epoch) {
    EXPECT_THAT(RunEpoch(iter.get()),
                ElementsAre(Seen{{0, 1, 2, 3}, 0}, Seen{{4, 5, 6, 7}, 0}))
        << "epoch " << epoch;
    iter->Reset();
  }
}

TEST(ArrayIter, RollOverCarriesLeftoverSamplesIntoTheNextEpoch) {
  auto iter = MakeArrayIter(10, Batches(4, LastBatch::kRollOver));
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{0, 1, 2, 3}, 0}, Seen{{4, 5, 6, 7}, 0}));
  iter->Reset();
  // 8 and 9 start epoch 1, which then has 12 samples: three batches.
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{8, 9, 0, 1}, 0}, Seen{{2, 3, 4, 5}, 0},
                          Seen{{6, 7, 8, 9}, 0}));
  iter->Reset();
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{0, 1, 2, 3}, 0}, Seen{{4, 5, 6, 7}, 0}));
}

TEST(ArrayIter, ResetMidEpochStartsOverAndRollsNothingOver) {
  auto iter = MakeArrayIter(10, Batches(4, LastBatch::kRollOver));
  DataBatch batch;
  ASSERT_TRUE(iter->Next(&batch));
  iter->Reset();
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{0, 1, 2, 3}, 0}, Seen{{4, 5, 6, 7}, 0}));
}

TEST(ArrayIter, ReusesItsBatchArrays) {
  auto iter = MakeArrayIter(10, Batches(4));
  DataBatch first, second;
  ASSERT_TRUE(iter->Next(&first));
  ASSERT_TRUE(iter->Next(&second));
  EXPECT_TRUE(first.data[0].SharesStorageWith(second.data[0]));
  EXPECT_TRUE(first.label[0].SharesStorageWith(second.label[0]));
}

TEST(ArrayIter, WaitsForPendingReadsBeforeOverwritingABatch) {
  auto iter = MakeArrayIter(10, Batches(4));
  DataBatch batch;
  ASSERT_TRUE(iter->Next(&batch));
  NDArray copy = Zeros({4, 2});
  copy.Assign(batch.data[0]);  // asynchronous read of the batch
  ASSERT_TRUE(iter->Next(&batch));
  EXPECT_THAT(copy.ToVector(), ElementsAre(0, 100, 1, 101, 2, 102, 3, 103));
}

TEST(ArrayIter, KeepsTheLabelsPerSampleShape) {
  std::vector<float> labels(5 * 3);
  std::iota(labels.begin(), labels.end(), 0.0f);
  ArrayIterOptions options = Batches(2);
  options.data_name = "x";
  options.label_name = "y";
  auto iter = ArrayIter(Zeros({5, 2, 2}), FromVector(labels, {5, 3}), options);
  ASSERT_TRUE(iter.ok()) << iter.status();
  EXPECT_EQ((*iter)->ProvideData()[0].name, "x");
  EXPECT_EQ((*iter)->ProvideData()[0].shape, Shape({2, 2, 2}));
  EXPECT_EQ((*iter)->ProvideLabel()[0].name, "y");
  EXPECT_EQ((*iter)->ProvideLabel()[0].shape, Shape({2, 3}));
  DataBatch batch;
  ASSERT_TRUE((*iter)->Next(&batch));
  ASSERT_TRUE((*iter)->Next(&batch));
  EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(6, 7, 8, 9, 10, 11));
}

// ---- Shuffling.

TEST(ArrayIter, ShuffleVisitsEverySampleOncePerEpoch) {
  auto iter = MakeArrayIter(50, Shuffled(10, 7));
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::vector<int> all = Flatten(RunEpoch(iter.get()));
    EXPECT_NE(all, Range(0, 50)) << "epoch " << epoch << " is not shuffled";
    std::sort(all.begin(), all.end());
    EXPECT_EQ(all, Range(0, 50)) << "epoch " << epoch;
    iter->Reset();
  }
}

TEST(ArrayIter, ShuffleIsReproduciblePerSeedAndEpoch) {
  const ArrayIterOptions options = Shuffled(10, 7);
  auto a = MakeArrayIter(50, options);
  auto b = MakeArrayIter(50, options);
  std::vector<int> a0 = Flatten(RunEpoch(a.get()));
  a->Reset();
  std::vector<int> a1 = Flatten(RunEpoch(a.get()));
  // b starts with a Reset, which before any Next is no new epoch.
  b->Reset();
  b->Reset();
  EXPECT_EQ(Flatten(RunEpoch(b.get())), a0);
  b->Reset();
  EXPECT_EQ(Flatten(RunEpoch(b.get())), a1);
  EXPECT_NE(a0, a1) << "each epoch has its own order";

  ArrayIterOptions other = options;
  other.seed = 8;
  auto c = MakeArrayIter(50, other);
  EXPECT_NE(Flatten(RunEpoch(c.get())), a0) << "the seed matters";
}

// A run resumed at epoch 2 (first_epoch = 2) sees the orders of epochs 2
// and 3 of the whole run, through a prefetching iterator too.
TEST(ArrayIter, FirstEpochContinuesTheWholeRunsOrders) {
  const ArrayIterOptions options = Shuffled(10, 7);
  auto whole = MakeArrayIter(50, options);
  std::vector<std::vector<int>> orders;
  for (int epoch = 0; epoch < 4; ++epoch) {
    whole->Reset();
    orders.push_back(Flatten(RunEpoch(whole.get())));
  }
  ArrayIterOptions resumed = options;
  resumed.first_epoch = 2;
  std::vector<std::unique_ptr<DataIter>> iters;
  iters.push_back(MakeArrayIter(50, resumed));
  iters.push_back(PrefetchingIter(MakeArrayIter(50, resumed)));
  for (auto& iter : iters) {
    iter->Reset();
    EXPECT_EQ(Flatten(RunEpoch(iter.get())), orders[2]);
    iter->Reset();
    EXPECT_EQ(Flatten(RunEpoch(iter.get())), orders[3]);
  }
  EXPECT_NE(orders[2], orders[0]);
}

TEST(ArrayIter, ShuffledPaddingComesFromTheStartOfTheEpochOrder) {
  auto iter = MakeArrayIter(10, Shuffled(4, 3));
  std::vector<Seen> batches = RunEpoch(iter.get());
  ASSERT_EQ(batches.size(), 3u);
  EXPECT_EQ(batches[2].pad, 2);
  EXPECT_EQ(batches[2].samples[2], batches[0].samples[0]);
  EXPECT_EQ(batches[2].samples[3], batches[0].samples[1]);
}

TEST(ArrayIter, ShuffledRollOverKeepsEverySampleOnceAcrossEpochs) {
  auto iter = MakeArrayIter(10, Shuffled(4, 5, LastBatch::kRollOver));
  // Over 2 epochs, 20 samples make 5 batches, each sample twice.
  std::vector<int> all = Flatten(RunEpoch(iter.get()));
  iter->Reset();
  std::vector<int> second = Flatten(RunEpoch(iter.get()));
  all.insert(all.end(), second.begin(), second.end());
  ASSERT_EQ(all.size(), 20u);
  std::map<int, int> count;
  for (int s : all) ++count[s];
  for (int s = 0; s < 10; ++s) EXPECT_EQ(count[s], 2) << "sample " << s;
}

// ---- Errors.

TEST(ArrayIter, RejectsArraysThatDisagree) {
  auto iter = ArrayIter(Zeros({5, 2}), Zeros({4}), {});
  ASSERT_FALSE(iter.ok());
  EXPECT_EQ(iter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(iter.status().message(),
              AllOf(HasSubstr("(5,2)"), HasSubstr("(4,)")));
  EXPECT_FALSE(ArrayIter(NDArray(), Zeros({4}), {}).ok());
  EXPECT_FALSE(ArrayIter(Zeros({0, 2}), Zeros({0}), {}).ok());
}

TEST(ArrayIter, RejectsBadBatchSizes) {
  auto zero = ArrayIter(Zeros({5, 2}), Zeros({5}), Batches(0));
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(zero.status().message(), HasSubstr("batch_size"));
  for (LastBatch rule : {LastBatch::kDiscard, LastBatch::kRollOver}) {
    auto big = ArrayIter(Zeros({5, 2}), Zeros({5}), Batches(6, rule));
    EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(big.status().message(), HasSubstr("batch_size 6"));
  }
}

// ---- PrefetchingIter.

TEST(PrefetchingIter, GivesTheSameBatchesAsItsInnerIterator) {
  const ArrayIterOptions options = Shuffled(4, 11, LastBatch::kRollOver);
  auto plain = MakeArrayIter(10, options);
  auto prefetched = PrefetchingIter(MakeArrayIter(10, options));
  EXPECT_EQ(prefetched->batch_size(), 4);
  EXPECT_EQ(prefetched->num_samples(), 10);
  EXPECT_EQ(prefetched->ProvideData()[0].shape, Shape({4, 2}));
  EXPECT_EQ(prefetched->ProvideLabel()[0].name, "softmax_label");
  for (int epoch = 0; epoch < 4; ++epoch) {
    EXPECT_EQ(RunEpoch(prefetched.get()), RunEpoch(plain.get()))
        << "epoch " << epoch;
    prefetched->Reset();
    plain->Reset();
  }
}

// Fit calls Reset() before its first epoch, by which time the thread has
// usually fetched batches already; the epoch must still be epoch 0 of the
// shuffle, or the same seed trains differently from run to run.
TEST(PrefetchingIter, ResetBeforeTheFirstNextIsNotAnEpoch) {
  const ArrayIterOptions options = Shuffled(4, 11);
  auto plain = MakeArrayIter(10, options);
  auto prefetched = PrefetchingIter(MakeArrayIter(10, options));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // it fetches
  prefetched->Reset();
  prefetched->Reset();
  EXPECT_EQ(RunEpoch(prefetched.get()), RunEpoch(plain.get()));
  prefetched->Reset();
  plain->Reset();
  EXPECT_EQ(RunEpoch(prefetched.get()), RunEpoch(plain.get())) << "epoch 1";
}

TEST(PrefetchingIter, PadsAsItsInnerIterator) {
  auto iter = PrefetchingIter(MakeArrayIter(10, Batches(4)));
  EXPECT_THAT(RunEpoch(iter.get()),
              ElementsAre(Seen{{0, 1, 2, 3}, 0}, Seen{{4, 5, 6, 7}, 0},
                          Seen{{8, 9, 0, 1}, 2}));
}

TEST(PrefetchingIter, ResetMidEpochStartsOver) {
  auto iter = PrefetchingIter(MakeArrayIter(10, Batches(2)));
  DataBatch batch;
  ASSERT_TRUE(iter->Next(&batch));
  ASSERT_TRUE(iter->Next(&batch));
  iter->Reset();
  EXPECT_EQ(Flatten(RunEpoch(iter.get())), Range(0, 10));
}

// Counts its Next() calls and fails the one numbered fail_at (from 1).
class CountingIter : public DataIter {
 public:
  CountingIter(int batches, int fail_at)
      : batches_(batches), fail_at_(fail_at) {}
  void Reset() override { served_ = 0; }
  bool Next(DataBatch* batch) override {
    int call = ++calls_;
    if (call == fail_at_) {
      throw Error(absl::DataLossError("disk on fire in batch " +
                                      std::to_string(served_)));
    }
    if (served_ == batches_) return false;
    batch->data = {Full({1}, static_cast<float>(served_))};
    batch->label = {Full({1}, static_cast<float>(served_))};
    batch->pad = 0;
    ++served_;
    return true;
  }
  std::vector<DataDesc> ProvideData() const override { return {{"d", {1}}}; }
  std::vector<DataDesc> ProvideLabel() const override { return {{"l", {1}}}; }
  int batch_size() const override { return 1; }

  std::atomic<int> calls_{0};

 private:
  int served_ = 0;
  const int batches_;
  const int fail_at_;
};

TEST(PrefetchingIter, PreparesTheNextBatchInTheBackground) {
  auto inner = std::make_unique<CountingIter>(5, -1);
  CountingIter* counter = inner.get();
  auto iter = PrefetchingIter(std::move(inner));
  DataBatch batch;
  ASSERT_TRUE(iter->Next(&batch));
  // Without another call, the thread fetches the second batch.
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (counter->calls_ < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_GE(counter->calls_, 2);
}

TEST(PrefetchingIter, CurrentBatchIsNotOverwrittenWhileHeld) {
  auto iter = PrefetchingIter(MakeArrayIter(12, Batches(2)));
  DataBatch batch;
  ASSERT_TRUE(iter->Next(&batch));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(0, 1));
  DataBatch next;
  ASSERT_TRUE(iter->Next(&next));
  EXPECT_FALSE(next.label[0].SharesStorageWith(batch.label[0]));
  EXPECT_THAT(next.label[0].ToVector(), ElementsAre(2, 3));
}

TEST(PrefetchingIter, InnerErrorsSurfaceOnTheCallersThread) {
  auto iter = PrefetchingIter(std::make_unique<CountingIter>(5, 3));
  DataBatch batch;
  ASSERT_TRUE(iter->Next(&batch));
  EXPECT_EQ(batch.label[0].Scalar(), 0);
  ASSERT_TRUE(iter->Next(&batch));
  EXPECT_EQ(batch.label[0].Scalar(), 1);
  try {
    iter->Next(&batch);
    ADD_FAILURE() << "the inner iterator's error was not rethrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(e.what(), HasSubstr("disk on fire in batch 2"));
  }
  EXPECT_FALSE(iter->Next(&batch)) << "the epoch ended with the error";
  iter->Reset();
  std::vector<float> labels;
  while (iter->Next(&batch)) labels.push_back(batch.label[0].Scalar());
  EXPECT_THAT(labels, ElementsAre(0, 1, 2, 3, 4));
}

TEST(PrefetchingIter, DestroysCleanlyAtAnyPoint) {
  { auto unused = PrefetchingIter(MakeArrayIter(10, Batches(2))); }
  {
    auto iter = PrefetchingIter(MakeArrayIter(10, Batches(2)));
    DataBatch batch;
    ASSERT_TRUE(iter->Next(&batch));
  }
  {
    auto iter = PrefetchingIter(MakeArrayIter(10, Batches(2)));
    RunEpoch(iter.get());
  }
}

// ---- MnistIter on IDX files the tests write.

std::string BigEndian(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16),
          static_cast<char>(v >> 8), static_cast<char>(v)};
}

// n images of 2x3 pixels: pixel j of image i is 10 * i + j. Label i is i % 4.
std::string Images(uint32_t n, uint32_t magic = 0x803) {
  std::string s = BigEndian(magic) + BigEndian(n) + BigEndian(2) + BigEndian(3);
  for (uint32_t i = 0; i < n; ++i) {
    for (int j = 0; j < 6; ++j) s.push_back(static_cast<char>(10 * i + j));
  }
  return s;
}

std::string Labels(uint32_t n, uint32_t magic = 0x801) {
  std::string s = BigEndian(magic) + BigEndian(n);
  for (uint32_t i = 0; i < n; ++i) s.push_back(static_cast<char>(i % 4));
  return s;
}

struct MnistFiles {
  std::string images, labels;
};

MnistFiles WriteMnist(const std::string& images, const std::string& labels,
                      bool gzip) {
  MnistFiles f = {TempPath(gzip ? "images.gz" : "images"),
                  TempPath(gzip ? "labels.gz" : "labels")};
  if (gzip) {
    WriteGzip(f.images, images);
    WriteGzip(f.labels, labels);
  } else {
    WriteFile(f.images, images);
    WriteFile(f.labels, labels);
  }
  return f;
}

MnistOptions Mnist(const MnistFiles& f, int batch_size) {
  MnistOptions o;
  o.images = f.images;
  o.labels = f.labels;
  o.batch_size = batch_size;
  return o;
}

TEST(MnistIter, ReadsPlainAndGzippedFilesAlike) {
  for (bool gzip : {false, true}) {
    SCOPED_TRACE(gzip ? "gzip" : "plain");
    MnistFiles f = WriteMnist(Images(5), Labels(5), gzip);
    auto iter = MnistIter(Mnist(f, 2));
    ASSERT_TRUE(iter.ok()) << iter.status();
    EXPECT_EQ((*iter)->num_samples(), 5);
    EXPECT_EQ((*iter)->ProvideData()[0].shape, Shape({2, 1, 2, 3}));
    EXPECT_EQ((*iter)->ProvideLabel()[0].shape, Shape({2}));
    DataBatch batch;
    ASSERT_TRUE((*iter)->Next(&batch));
    ASSERT_TRUE((*iter)->Next(&batch));
    EXPECT_EQ(batch.data[0].shape(), Shape({2, 1, 2, 3}));
    std::vector<float> want;
    for (int i = 2; i < 4; ++i) {
      for (int j = 0; j < 6; ++j) want.push_back((10 * i + j) / 255.0f);
    }
    EXPECT_THAT(batch.data[0].ToVector(), ElementsAreArray(want));
    EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(2, 3));
    ASSERT_TRUE((*iter)->Next(&batch));
    EXPECT_EQ(batch.pad, 1);
    EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(0, 0));
    EXPECT_FALSE((*iter)->Next(&batch));
  }
}

TEST(MnistIter, FlatAndScaledPixels) {
  MnistFiles f = WriteMnist(Images(3), Labels(3), false);
  MnistOptions o = Mnist(f, 3);
  o.flat = true;
  o.scale = 2.0f;
  auto iter = MnistIter(o);
  ASSERT_TRUE(iter.ok()) << iter.status();
  EXPECT_EQ((*iter)->ProvideData()[0].shape, Shape({3, 6}));
  DataBatch batch;
  ASSERT_TRUE((*iter)->Next(&batch));
  EXPECT_EQ(batch.data[0].shape(), Shape({3, 6}));
  std::vector<float> data = batch.data[0].ToVector();
  EXPECT_FLOAT_EQ(data[6 * 2 + 5], 25 / 255.0f * 2.0f);
}

TEST(MnistIter, PartsAreContiguousEqualAndCoverEverySample) {
  MnistFiles f = WriteMnist(Images(7), Labels(7), false);
  std::vector<float> firsts;
  int64_t total = 0;
  for (int part = 0; part < 3; ++part) {
    MnistOptions o = Mnist(f, 1);
    o.part_index = part;
    o.num_parts = 3;
    auto iter = MnistIter(o);
    ASSERT_TRUE(iter.ok()) << iter.status();
    total += (*iter)->num_samples();
    DataBatch batch;
    while ((*iter)->Next(&batch)) {
      // The first pixel of image i is 10 * i.
      firsts.push_back(std::round(batch.data[0].ToVector()[0] * 255.0f));
    }
  }
  EXPECT_EQ(total, 9);  // 3 parts of ceil(7 / 3) = 3: boundaries shared
  EXPECT_THAT(firsts, ElementsAre(0, 10, 20, 20, 30, 40, 40, 50, 60));
}

TEST(MnistIter, PartsHaveEqualSizesSoWorkersTakeEqualBatchCounts) {
  MnistFiles f = WriteMnist(Images(7), Labels(7), false);
  std::vector<int64_t> sizes;
  for (int part = 0; part < 3; ++part) {
    MnistOptions o = Mnist(f, 1);
    o.part_index = part;
    o.num_parts = 3;
    auto iter = MnistIter(o);
    ASSERT_TRUE(iter.ok()) << iter.status();
    sizes.push_back((*iter)->num_samples());
  }
  EXPECT_THAT(sizes, ElementsAre(3, 3, 3));
}

TEST(MnistIter, RejectsInvalidParts) {
  MnistFiles f = WriteMnist(Images(4), Labels(4), false);
  for (auto [index, parts] : std::vector<std::pair<int, int>>{
           {0, 0}, {-1, 2}, {2, 2}, {0, -3}, {0, 5}}) {
    MnistOptions o = Mnist(f, 1);
    o.part_index = index;
    o.num_parts = parts;
    auto iter = MnistIter(o);
    EXPECT_EQ(iter.status().code(), absl::StatusCode::kInvalidArgument)
        << index << " of " << parts;
  }
}

TEST(MnistIter, ShuffleIsReproducible) {
  MnistFiles f = WriteMnist(Images(20), Labels(20), false);
  MnistOptions o = Mnist(f, 5);
  o.shuffle = true;
  o.seed = 42;
  auto a = MnistIter(o);
  auto b = MnistIter(o);
  ASSERT_TRUE(a.ok() && b.ok());
  DataBatch x, y;
  std::vector<float> xs, ys;
  while ((*a)->Next(&x)) {
    ASSERT_TRUE((*b)->Next(&y));
    std::vector<float> xd = x.data[0].ToVector(), yd = y.data[0].ToVector();
    xs.insert(xs.end(), xd.begin(), xd.end());
    ys.insert(ys.end(), yd.begin(), yd.end());
  }
  EXPECT_EQ(xs, ys);
  EXPECT_NE(xs[0], 0.0f) << "hardly shuffled (1 in 20 chance)";
}

TEST(MnistIter, MissingFileIsNotFoundNamingIt) {
  MnistOptions o;
  o.images = TempPath("no-such-images");
  o.labels = TempPath("no-such-labels");
  auto iter = MnistIter(o);
  EXPECT_EQ(iter.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(iter.status().message(), HasSubstr(o.images));
}

TEST(MnistIter, WrongMagicNamesFileAndOffset) {
  for (bool gzip : {false, true}) {
    SCOPED_TRACE(gzip ? "gzip" : "plain");
    // The labels' magic on the images file.
    MnistFiles f = WriteMnist(Images(3, 0x801), Labels(3), gzip);
    auto iter = MnistIter(Mnist(f, 1));
    EXPECT_EQ(iter.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(iter.status().message(),
                AllOf(HasSubstr(f.images), HasSubstr("magic 0x00000801"),
                      HasSubstr("offset 0"), HasSubstr("0x00000803")));
  }
  MnistFiles f = WriteMnist(Images(3), Labels(3, 0x803), false);
  auto iter = MnistIter(Mnist(f, 1));
  EXPECT_THAT(iter.status().message(),
              AllOf(HasSubstr(f.labels), HasSubstr("magic")));
}

TEST(MnistIter, TruncatedFileNamesFileAndOffset) {
  for (bool gzip : {false, true}) {
    SCOPED_TRACE(gzip ? "gzip" : "plain");
    std::string images = Images(4);
    images.resize(images.size() - 5);  // 16 + 24 - 5 = 35 bytes
    MnistFiles f = WriteMnist(images, Labels(4), gzip);
    auto iter = MnistIter(Mnist(f, 1));
    EXPECT_EQ(iter.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(
        iter.status().message(),
        AllOf(HasSubstr(f.images), HasSubstr("truncated at offset 35")));
  }
  // A header cut short.
  MnistFiles f = WriteMnist(Images(4).substr(0, 10), Labels(4), false);
  auto iter = MnistIter(Mnist(f, 1));
  EXPECT_THAT(iter.status().message(),
              AllOf(HasSubstr(f.images), HasSubstr("truncated at offset 10")));
}

// A header may promise far more than the file holds (here about 2^40
// bytes): that is truncation at the real end of the data, not an attempt
// to allocate what the header says.
TEST(MnistIter, HeaderPromisingTerabytesIsTruncation) {
  for (bool gzip : {false, true}) {
    SCOPED_TRACE(gzip ? "gzip" : "plain");
    std::string images = Images(4);  // 4 x 2 x 3: 16 + 24 bytes
    images.replace(4, 12, BigEndian(1 << 16) + BigEndian(1 << 12) + BigEndian(1 << 12));
    MnistFiles f = WriteMnist(images, Labels(4), gzip);
    auto iter = MnistIter(Mnist(f, 1));
    EXPECT_EQ(iter.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(iter.status().message(),
                AllOf(HasSubstr(f.images), HasSubstr("truncated at offset 40")));
  }
}

TEST(MnistIter, CutGzipStreamIsTruncation) {
  MnistFiles f = WriteMnist(Images(40), Labels(40), true);
  std::ifstream in(f.images, std::ios::binary);
  std::string gz((std::istreambuf_iterator<char>(in)),
                 std::istreambuf_iterator<char>());
  WriteFile(f.images, gz.substr(0, gz.size() / 2));
  auto iter = MnistIter(Mnist(f, 1));
  EXPECT_EQ(iter.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(iter.status().message(),
              AllOf(HasSubstr(f.images), HasSubstr("offset")));
}

TEST(MnistIter, TrailingBytesAreAnError) {
  MnistFiles f = WriteMnist(Images(3), Labels(3) + "xy", false);
  auto iter = MnistIter(Mnist(f, 1));
  EXPECT_EQ(iter.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(
      iter.status().message(),
      AllOf(HasSubstr(f.labels), HasSubstr("unexpected data at offset 11")));
}

TEST(MnistIter, CountMismatchNamesBothFiles) {
  MnistFiles f = WriteMnist(Images(5), Labels(4), false);
  auto iter = MnistIter(Mnist(f, 1));
  EXPECT_EQ(iter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(iter.status().message(),
              AllOf(HasSubstr(f.images), HasSubstr("5 images"),
                    HasSubstr(f.labels), HasSubstr("4 labels")));
}

TEST(MnistIter, HeaderPromisingTooMuchIsTruncationNotAnAllocation) {
  std::string images = BigEndian(0x803) + BigEndian(0xffffffff) +
                       BigEndian(0xffff) + BigEndian(0xffff) + "abc";
  MnistFiles f = WriteMnist(images, Labels(3), false);
  auto iter = MnistIter(Mnist(f, 1));
  EXPECT_EQ(iter.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(iter.status().message(), HasSubstr(f.images));
}

// The Fashion-MNIST test set from Debian's dataset-fashion-mnist.
TEST(MnistIter, FashionMnistTestSet) {
  const std::string dir = "/usr/share/datasets/fashion-mnist/";
  MnistOptions o;
  o.images = dir + "t10k-images-idx3-ubyte.gz";
  o.labels = dir + "t10k-labels-idx1-ubyte.gz";
  if (!std::ifstream(o.images) || !std::ifstream(o.labels)) {
    GTEST_SKIP() << "Fashion-MNIST is not installed in " << dir;
  }
  o.batch_size = 100;
  auto iter = MnistIter(o);
  ASSERT_TRUE(iter.ok()) << iter.status();
  EXPECT_EQ((*iter)->num_samples(), 10000);
  std::map<int, int> histogram;
  float lo = 1, hi = 0;
  int batches = 0;
  DataBatch batch;
  while ((*iter)->Next(&batch)) {
    ++batches;
    ASSERT_EQ(batch.data[0].shape(), Shape({100, 1, 28, 28}));
    ASSERT_EQ(batch.label[0].shape(), Shape({100}));
    ASSERT_EQ(batch.pad, 0);
    for (float v : batch.data[0].ToVector()) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    for (float l : batch.label[0].ToVector()) {
      ASSERT_EQ(l, std::floor(l));
      ++histogram[static_cast<int>(l)];
    }
  }
  EXPECT_EQ(batches, 100);
  EXPECT_EQ(lo, 0.0f);
  EXPECT_EQ(hi, 1.0f);
  ASSERT_EQ(histogram.size(), 10u);
  for (const auto& [label, count] : histogram) {
    EXPECT_GE(label, 0);
    EXPECT_LE(label, 9);
    EXPECT_EQ(count, 1000) << "class " << label;
  }
}

// ---- CsvIter.

CsvOptions Csv(const std::string& data, const std::string& label,
               const Shape& data_shape, int batch_size = 100) {
  CsvOptions o;
  o.data_csv = data;
  o.label_csv = label;
  o.data_shape = data_shape;
  o.batch_size = batch_size;
  return o;
}

TEST(CsvIter, ReadsDataAndLabels) {
  const std::string data = TempPath("data.csv"), label = TempPath("label.csv");
  WriteFile(data, "1,2,3,4\n5, 6 ,7,8\r\n9,10,11,12e0\n\n");
  WriteFile(label, "0\n1\n2");
  auto iter = CsvIter(Csv(data, label, {2, 2}, 2));
  ASSERT_TRUE(iter.ok()) << iter.status();
  EXPECT_EQ((*iter)->num_samples(), 3);
  EXPECT_EQ((*iter)->ProvideData()[0].shape, Shape({2, 2, 2}));
  EXPECT_EQ((*iter)->ProvideLabel()[0].shape, Shape({2}));
  DataBatch batch;
  ASSERT_TRUE((*iter)->Next(&batch));
  EXPECT_THAT(batch.data[0].ToVector(), ElementsAre(1, 2, 3, 4, 5, 6, 7, 8));
  EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(0, 1));
  ASSERT_TRUE((*iter)->Next(&batch));
  EXPECT_THAT(batch.data[0].ToVector(), ElementsAre(9, 10, 11, 12, 1, 2, 3, 4));
  EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(2, 0));
  EXPECT_EQ(batch.pad, 1);
  EXPECT_FALSE((*iter)->Next(&batch));
}

TEST(CsvIter, SeveralLabelValuesAndMissingLabelFile) {
  const std::string data = TempPath("data.csv"), label = TempPath("label.csv");
  WriteFile(data, "1\n2\n");
  WriteFile(label, "1,2\n3,4\n");
  CsvOptions options = Csv(data, label, {1}, 2);
  options.label_shape = {2};
  auto iter = CsvIter(options);
  ASSERT_TRUE(iter.ok()) << iter.status();
  EXPECT_EQ((*iter)->ProvideLabel()[0].shape, Shape({2, 2}));
  DataBatch batch;
  ASSERT_TRUE((*iter)->Next(&batch));
  EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(1, 2, 3, 4));

  auto unlabeled = CsvIter(Csv(data, "", {1}, 2));
  ASSERT_TRUE(unlabeled.ok()) << unlabeled.status();
  ASSERT_TRUE((*unlabeled)->Next(&batch));
  EXPECT_THAT(batch.label[0].ToVector(), ElementsAre(0, 0));
}

TEST(CsvIter, PartitionsLines) {
  const std::string data = TempPath("data.csv");
  WriteFile(data, "0\n1\n2\n3\n4\n5\n");
  CsvOptions options = Csv(data, "", {1}, 10);
  options.part_index = 1;
  options.num_parts = 2;
  auto iter = CsvIter(options);
  ASSERT_TRUE(iter.ok()) << iter.status();
  EXPECT_EQ((*iter)->num_samples(), 3);
  DataBatch batch;
  ASSERT_TRUE((*iter)->Next(&batch));
  EXPECT_THAT(batch.data[0].ToVector(),
              ElementsAre(3, 4, 5, 3, 4, 5, 3, 4, 5, 3));
  EXPECT_EQ(batch.pad, 7);
}

// The status of a CsvIter over data lines `text` of 3 values each.
absl::Status CsvStatus(const std::string& path, const std::string& text) {
  WriteFile(path, text);
  return CsvIter(Csv(path, "", {3})).status();
}

TEST(CsvIter, MalformedLinesNameFileAndLine) {
  const std::string path = TempPath("data.csv");
  struct Case {
    std::string text, message;
  } cases[] = {
      {"1,2,3\n4,5\n", ":2: expected 3 values, found 2"},
      {"1,2,3\n4,5,6,7\n", ":2: expected 3 values, found 4"},
      {"1,2,3\n4,5,6\n7,x8,9\n", ":3: value 2 'x8' is not a finite number"},
      {"1,2,3\n4,,6\n", ":2: value 2 '' is not a finite number"},
      // Read as numbers, but a run trained on them and wrote NaN checkpoints.
      {"1,2,3\n4,nan,6\n", ":2: value 2 'nan' is not a finite number"},
      {"1e999,2,3\n", ":1: value 1 '1e999' is not a finite number"},
      {"1,2,-inf\n", ":1: value 3 '-inf' is not a finite number"},
      {"1,2,3\n\n4,5,6\n", ":2: blank line before more samples"},
      {"", "no samples"},
  };
  for (const Case& c : cases) {
    absl::Status status = CsvStatus(path, c.text);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_THAT(status.message(), HasSubstr(c.message)) << c.text;
    EXPECT_THAT(status.message(), HasSubstr(path)) << c.text;
  }
}

TEST(CsvIter, LabelCountMustMatch) {
  const std::string data = TempPath("data.csv"), label = TempPath("label.csv");
  WriteFile(data, "1\n2\n3\n");
  WriteFile(label, "1\n2\n");
  auto iter = CsvIter(Csv(data, label, {1}));
  EXPECT_EQ(iter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(iter.status().message(),
              AllOf(HasSubstr("3 samples"), HasSubstr(label), HasSubstr("2")));
}

TEST(CsvIter, MissingFileAndBadShape) {
  auto missing = CsvIter(Csv(TempPath("nope.csv"), "", {1}));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope.csv"));
  const std::string data = TempPath("data.csv");
  WriteFile(data, "1\n");
  EXPECT_EQ(CsvIter(Csv(data, "", Shape{})).status().code(),
            absl::StatusCode::kInvalidArgument)
      << "no data_shape";
}

}  // namespace
}  // namespace mx
