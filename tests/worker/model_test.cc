// FeedForward: fit/predict/score, checkpoints in MXNet's layout, resuming.
#include "worker/model.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/kvstore.h"
#include "worker/checkpoint.h"
#include "worker/zoo.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Two Gaussian blobs per class in 8 dimensions: easy to separate.
struct Blobs {
  NDArray data, label;
};
Blobs MakeBlobs(int n, int classes, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> noise(0, 0.3f);
  std::vector<float> x(n * 8), y(n);
  for (int i = 0; i < n; ++i) {
    int c = i % classes;
    y[i] = c;
    for (int d = 0; d < 8; ++d) x[i * 8 + d] = (d % classes == c ? 2.0f : 0.0f) + noise(gen);
  }
  return {FromVector(x, Shape{n, 8}), FromVector(y, Shape{n})};
}

Symbol SmallMlp(int classes) {
  Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 16}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
  net = Op("FullyConnected", {net}, {{"num_hidden", classes}}, "fc2");
  return Op("SoftmaxOutput", {net}, {}, "softmax");
}

std::unique_ptr<DataIter> Iter(const Blobs& b, int batch, bool shuffle = false) {
  ArrayIterOptions o;
  o.batch_size = batch;
  o.shuffle = shuffle;
  auto it = ArrayIter(b.data, b.label, o);
  EXPECT_TRUE(it.ok()) << it.status();
  return *std::move(it);
}

FitOptions Sgd(int epochs, float lr, float momentum = 0) {
  FitOptions f;
  f.num_epoch = epochs;
  f.optimizer = "sgd";
  f.optimizer_options = {{"learning_rate", std::to_string(lr)},
                         {"momentum", std::to_string(momentum)}};
  f.initializer = "xavier";
  return f;
}

TEST(FeedForwardFit, LearnsSeparableData) {
  srand(1);
  Blobs train = MakeBlobs(400, 4, 1), test = MakeBlobs(200, 4, 2);
  FeedForward model(SmallMlp(4));
  auto train_it = Iter(train, 20, true), test_it = Iter(test, 20);
  std::vector<MetricValues> eval_history;
  FitOptions f = Sgd(5, 0.5f);
  f.epoch_end_callbacks.push_back([&](const EpochEndParam& p) {
    eval_history.push_back(p.eval_metrics);
    return true;
  });
  ASSERT_TRUE(model.Fit(train_it.get(), test_it.get(), f).ok());
  ASSERT_EQ(eval_history.size(), 5u);
  EXPECT_EQ(eval_history.back()[0].first, "accuracy");
  EXPECT_GT(eval_history.back()[0].second, 0.95);
  auto score = model.Score(test_it.get(), "accuracy");
  ASSERT_TRUE(score.ok());
  EXPECT_GT((*score)[0].second, 0.95);
  auto pred = model.Predict(test_it.get());
  ASSERT_TRUE(pred.ok()) << pred.status();
  ASSERT_EQ(pred->size(), 1u);
  EXPECT_EQ((*pred)[0].shape(), (Shape{200, 4}));
  // Rows are probabilities.
  std::vector<float> p = (*pred)[0].ToVector();
  EXPECT_NEAR(p[0] + p[1] + p[2] + p[3], 1.0f, 1e-5);
}

// An 0.8-era symbol file's weight_lr_mult of 0 on fc1 freezes fc1_weight
// (MXNet moves it to the weight's __lr_mult__); fc1_bias and fc2 train.
TEST(FeedForwardFit, LrMultFromAnMxnet08FileActs) {
  const std::string json = R"({"nodes": [
    {"op": "null", "name": "data", "param": {}, "inputs": []},
    {"op": "null", "name": "fc1_weight", "param": {}, "inputs": []},
    {"op": "null", "name": "fc1_bias", "param": {}, "inputs": []},
    {"op": "FullyConnected", "name": "fc1", "param": {"num_hidden": "16"},
     "attr": {"weight_lr_mult": "0"}, "inputs": [[0, 0], [1, 0], [2, 0]]},
    {"op": "Activation", "name": "relu1", "param": {"act_type": "relu"}, "inputs": [[3, 0]]},
    {"op": "null", "name": "fc2_weight", "param": {}, "inputs": []},
    {"op": "null", "name": "fc2_bias", "param": {}, "inputs": []},
    {"op": "FullyConnected", "name": "fc2", "param": {"num_hidden": "4"},
     "inputs": [[4, 0], [5, 0], [6, 0]]},
    {"op": "null", "name": "softmax_label", "param": {}, "inputs": []},
    {"op": "SoftmaxOutput", "name": "softmax", "param": {}, "inputs": [[7, 0], [8, 0]]}],
    "arg_nodes": [0, 1, 2, 5, 6, 8], "heads": [[9, 0]]})";
  absl::StatusOr<Symbol> net = Symbol::FromJSON(json);
  ASSERT_TRUE(net.ok()) << net.status();
  srand(3);
  Blobs train = MakeBlobs(80, 4, 1);
  FeedForward model(*net);
  const NDArray w1 = RandomUniform(-0.1f, 0.1f, {16, 8}), w2 = RandomUniform(-0.1f, 0.1f, {4, 16});
  model.arg_params()["fc1_weight"] = w1.Copy();
  model.arg_params()["fc2_weight"] = w2.Copy();
  auto it = Iter(train, 20);
  ASSERT_TRUE(model.Fit(it.get(), nullptr, Sgd(2, 0.5f)).ok());
  EXPECT_EQ(model.arg_params().at("fc1_weight").ToVector(), w1.ToVector());
  EXPECT_NE(model.arg_params().at("fc2_weight").ToVector(), w2.ToVector());
  EXPECT_NE(model.arg_params().at("fc1_bias").ToVector(), std::vector<float>(16, 0.0f));
}

TEST(FeedForwardFit, ALrMultThatIsNoNumberIsAnError) {
  Symbol bad = Op("SoftmaxOutput",
                  {Op("FullyConnected", {Variable("data", {{"lr_mult", "fast"}})}, {{"num_hidden", 4}})}, {}, "softmax");
  Blobs train = MakeBlobs(40, 4, 1);
  FeedForward model(bad);
  auto it = Iter(train, 20);
  absl::Status s = model.Fit(it.get(), nullptr, Sgd(1, 0.5f));
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("symbol attribute __lr_mult__ of 'data' is 'fast', not a number"));
}

TEST(FeedForwardFit, PredictDropsPaddingOfTheLastBatch) {
  srand(2);
  Blobs train = MakeBlobs(60, 2, 3), test = MakeBlobs(50, 2, 4);
  FeedForward model(SmallMlp(2));
  auto train_it = Iter(train, 20), test_it = Iter(test, 20);  // 50 = 20+20+10 (+10 pad)
  ASSERT_TRUE(model.Fit(train_it.get(), nullptr, Sgd(1, 0.1f)).ok());
  auto pred = model.Predict(test_it.get());
  ASSERT_TRUE(pred.ok());
  EXPECT_EQ((*pred)[0].shape(), (Shape{50, 2}));
}

TEST(FeedForwardFit, EarlyStoppingEndsTraining) {
  srand(3);
  Blobs train = MakeBlobs(40, 2, 5);
  FeedForward model(SmallMlp(2));
  auto it = Iter(train, 20);
  int epochs = 0;
  FitOptions f = Sgd(50, 0.0f);  // lr 0: the metric never improves
  f.epoch_end_callbacks.push_back([&](const EpochEndParam&) { ++epochs; return true; });
  f.epoch_end_callbacks.push_back(EarlyStopping("accuracy", 3));
  ASSERT_TRUE(model.Fit(it.get(), nullptr, f).ok());
  EXPECT_EQ(epochs, 4);  // the best at epoch 0, then 3 without improvement
}

FeedForward FittedMlp();  // below

// Data that gives no batch in an epoch (a libsvm file shorter than a batch,
// its last batch discarded) is an error, not an epoch trained on nothing
// whose metrics say nan.
TEST(FeedForwardFit, AnEpochWithoutABatchIsAnError) {
  class NoBatches : public DataIter {
   public:
    explicit NoBatches(std::unique_ptr<DataIter> shapes) : shapes_(std::move(shapes)) {}
    void Reset() override {}
    bool Next(DataBatch*) override { return false; }
    std::vector<DataDesc> ProvideData() const override { return shapes_->ProvideData(); }
    std::vector<DataDesc> ProvideLabel() const override { return shapes_->ProvideLabel(); }
    int batch_size() const override { return shapes_->batch_size(); }

   private:
    std::unique_ptr<DataIter> shapes_;
  };
  NoBatches empty(Iter(MakeBlobs(40, 2, 5), 20));
  FeedForward model(SmallMlp(2));
  const absl::Status s = model.Fit(&empty, nullptr, Sgd(2, 0.1f));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("epoch 0: the training data gave no batch of 20 samples"));
  // So is scoring on data without a batch (an empty test file): the
  // accuracy was nan and mx_train exited 0.
  FeedForward trained = FittedMlp();
  const auto score = trained.Score(&empty, "accuracy");
  EXPECT_EQ(score.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(score.status().message(), HasSubstr("the evaluation data gave no batch"));
}

// Evaluation data with samples of another shape (test images of 30x30
// beside training ones of 28x28) is refused before training, naming both
// shapes; before, the evaluation failed after the first epoch with
// "Assign: shape mismatch". Scoring a model on such data names the
// parameter.
TEST(FeedForwardFit, EvaluationDataOfAnotherShapeIsRefusedAtOnce) {
  FeedForward model(SmallMlp(2));
  const Blobs blobs = MakeBlobs(40, 2, 5);
  const Blobs narrow{Zeros({40, 6}), blobs.label};  // 6 features, not 8
  auto train = Iter(blobs, 20);
  auto eval = Iter(narrow, 20);
  int epochs = 0;
  FitOptions f = Sgd(2, 0.1f);
  f.epoch_end_callbacks.push_back([&](const EpochEndParam&) {
    ++epochs;
    return true;
  });
  const absl::Status s = model.Fit(train.get(), eval.get(), f);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("the evaluation data's 'data' has shape (20,6) but the "
                                     "training data's is (20,8)"));
  EXPECT_EQ(epochs, 0);
  FeedForward trained = FittedMlp();
  const auto score = trained.Score(eval.get(), "accuracy");
  EXPECT_THAT(score.status().message(),
              HasSubstr("parameter 'fc1_weight' has shape (16,8) but the network bound to this "
                        "data needs (16,6)"));
}

TEST(FeedForwardFit, BadOptimizerIsAnError) {
  Blobs train = MakeBlobs(40, 2, 5);
  FeedForward model(SmallMlp(2));
  auto it = Iter(train, 20);
  FitOptions f = Sgd(1, 0.1f);
  f.optimizer = "sgdd";
  absl::Status s = model.Fit(it.get(), nullptr, f);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("sgdd"));
}

// FitOptions.kvstore is used on one context too: a dist type makes its
// store (this test binary has no parameter-server client, so that is an
// error saying so), an unknown type is an error. Both trained locally,
// silently, before.
TEST(FeedForwardFit, TheKVStoreTypeIsHonouredOnOneContext) {
  Blobs train = MakeBlobs(40, 2, 5);
  for (const auto& [type, expected] : std::vector<std::pair<std::string, std::string>>{
           {"dist_sync", "needs the parameter-server client"},
           {"bogus", "unknown kvstore type 'bogus'"}}) {
    FeedForward model(SmallMlp(2));
    auto it = Iter(train, 20);
    FitOptions f = Sgd(1, 0.1f);
    f.kvstore = type;
    EXPECT_THAT(model.Fit(it.get(), nullptr, f).message(), HasSubstr(expected)) << type;
  }
  FeedForward model(SmallMlp(2));
  auto it = Iter(train, 20);
  FitOptions f = Sgd(1, 0.1f);
  f.kvstore = "nccl";  // one device: nothing to sum, updated in place
  EXPECT_TRUE(model.Fit(it.get(), nullptr, f).ok());
}

// A variable's __init__ attribute (MXNet's Variable(init=...), kept in
// symbol files) decides its initial value, before the name rules.
TEST(FeedForwardFit, AVariablesOwnInitializerComesFirst) {
  Symbol net =
      Op("FullyConnected",
         {Variable("data"),
          {"weight", Variable("fc_weight", {{"__init__", R"(["constant", {"value": 0.5}])"}})},
          {"bias", Variable("fc_bias", {{"__init__", R"(["one", {}])"}})}},
         {{"num_hidden", 2}}, "fc");
  net = Op("SoftmaxOutput", {net}, {}, "softmax");
  Blobs train = MakeBlobs(40, 2, 5);
  FeedForward model(net);
  auto it = Iter(train, 20);
  ASSERT_TRUE(model.Fit(it.get(), nullptr, Sgd(1, 0.0f)).ok());
  EXPECT_THAT(model.arg_params().at("fc_weight").ToVector(), ::testing::Each(0.5f));
  EXPECT_THAT(model.arg_params().at("fc_bias").ToVector(), ::testing::Each(1.0f));
  Symbol unknown = Op(
      "FullyConnected",
      {Variable("data"), {"weight", Variable("fc_weight", {{"__init__", R"(["bilinear", {}])"}})}},
      {{"num_hidden", 2}}, "fc");
  FeedForward bad(Op("SoftmaxOutput", {unknown}, {}, "softmax"));
  it = Iter(train, 20);
  EXPECT_THAT(
      bad.Fit(it.get(), nullptr, Sgd(1, 0.0f)).message(),
      HasSubstr("parameter 'fc_weight': __init__ '[\"bilinear\", {}]': unknown initializer"));
}

TEST(FeedForwardFit, DataThatDoesNotFitTheNetworkIsAnError) {
  NDArray x = Zeros({40, 8}), y = Zeros({40});
  ArrayIterOptions o;
  o.batch_size = 20;
  auto it = ArrayIter(x, y, o);
  ASSERT_TRUE(it.ok());
  FeedForward model(zoo::LeNet());  // wants (N, 1, 28, 28)
  absl::Status s = model.Fit(it->get(), nullptr, Sgd(1, 0.1f));
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("conv1"));
}

std::string TempPrefix(const std::string& name) { return ::testing::TempDir() + "/" + name; }

TEST(Checkpoint, ParamsFileHasMxnetLayout) {
  std::string path = TempPrefix("layout.params");
  ASSERT_TRUE(SaveNDArrayList(path, {{"arg:w", FromVector({1, 2, 3, 4, 5, 6}, Shape{2, 3})}}).ok());
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto u64 = [&](size_t off) { uint64_t v; std::memcpy(&v, bytes.data() + off, 8); return v; };
  auto u32 = [&](size_t off) { uint32_t v; std::memcpy(&v, bytes.data() + off, 4); return v; };
  EXPECT_EQ(u64(0), 0x112u);      // list magic
  EXPECT_EQ(u64(8), 0u);          // reserved
  EXPECT_EQ(u64(16), 1u);         // one array
  EXPECT_EQ(u32(24), 0xF993FAC9u);  // V2 record
  EXPECT_EQ(u32(28), 0u);         // dense
  EXPECT_EQ(u32(32), 2u);         // ndim
  EXPECT_EQ(u64(36), 2u);
  EXPECT_EQ(u64(44), 3u);
  EXPECT_EQ(u32(52), 1u);         // cpu
  EXPECT_EQ(u32(56), 0u);         // device 0
  EXPECT_EQ(u32(60), 0u);         // float32
  float first;
  std::memcpy(&first, bytes.data() + 64, 4);
  EXPECT_EQ(first, 1.0f);
  EXPECT_EQ(u64(88), 1u);         // one name
  EXPECT_EQ(u64(96), 5u);
  EXPECT_EQ(bytes.substr(104), "arg:w");
}

// Appends v's bytes (as the machine stores them, as MXNet writes them) to
// *bytes: a .params file built by hand.
template <typename T>
void Put(std::string* bytes, T v) {
  bytes->append(reinterpret_cast<const char*>(&v), sizeof(v));
}

TEST(Checkpoint, ReadsV1RecordsAndReportsTruncation) {
  // A file as older MXNet versions wrote it: V1 records have no storage type.
  std::string bytes;
  auto put = [&](auto v) { Put(&bytes, v); };
  put(uint64_t{0x112});
  put(uint64_t{0});
  put(uint64_t{1});
  put(uint32_t{0xF993FAC8});
  put(uint32_t{1});
  put(int64_t{2});
  put(int32_t{1});
  put(int32_t{0});
  put(int32_t{0});
  put(7.0f);
  put(8.0f);
  put(uint64_t{1});
  put(uint64_t{5});
  bytes += "aux:m";
  std::string path = TempPrefix("v1.params");
  std::ofstream(path, std::ios::binary) << bytes;
  auto loaded = LoadNDArrayList(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 1u);
  EXPECT_EQ((*loaded)[0].first, "aux:m");
  EXPECT_THAT((*loaded)[0].second.ToVector(), ElementsAre(7, 8));

  std::ofstream(path, std::ios::binary) << bytes.substr(0, 50);
  auto truncated = LoadNDArrayList(path);
  ASSERT_FALSE(truncated.ok());
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(truncated.status().message(), HasSubstr("truncated"));
  EXPECT_THAT(truncated.status().message(), HasSubstr(path));

  // A shape whose element count overflows (2^62 x 4; its product wrapped
  // to 0, which the array constructor refused without the file's name).
  std::string impossible = bytes.substr(0, 28);  // the list header and a V1 magic
  auto put_into = [&](auto v) { Put(&impossible, v); };
  put_into(uint32_t{2});
  put_into(int64_t{1} << 62);
  put_into(int64_t{4});
  std::ofstream(path, std::ios::binary) << impossible;
  auto overflowing = LoadNDArrayList(path);
  ASSERT_FALSE(overflowing.ok());
  EXPECT_EQ(overflowing.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(overflowing.status().message(),
              HasSubstr(path + ": array 0 has an impossible shape (4611686018427387904,4)"));
}

// MXNet 1.6+ under numpy semantics and MXNet 2 write V3 records: V2's
// layout with a signed rank (-1 a none array, 0 a scalar). They were
// reported as damage ("a bad header").
TEST(Checkpoint, ReadsV3Records) {
  std::string bytes;
  auto put = [&](auto v) { Put(&bytes, v); };
  put(uint64_t{0x112});
  put(uint64_t{0});
  put(uint64_t{2});
  put(uint32_t{0xF993FACA});  // a (2,) array
  put(int32_t{0});            // dense
  put(int32_t{1});
  put(int64_t{2});
  put(int32_t{1});
  put(int32_t{0});
  put(int32_t{0});
  put(7.0f);
  put(8.0f);
  put(uint32_t{0xF993FACA});  // a none array: rank -1, nothing after it
  put(int32_t{0});
  put(int32_t{-1});
  put(uint64_t{2});
  put(uint64_t{5});
  bytes += "arg:w";
  put(uint64_t{5});
  bytes += "arg:n";
  const std::string path = TempPrefix("v3.params");
  std::ofstream(path, std::ios::binary) << bytes;
  auto loaded = LoadNDArrayList(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 2u);
  EXPECT_THAT((*loaded)[0].second.ToVector(), ElementsAre(7, 8));
  EXPECT_TRUE((*loaded)[1].second.is_none());
  // A scalar (rank 0) says what it is.
  std::string scalar = bytes.substr(0, 24);
  scalar.replace(16, 8, std::string("\1\0\0\0\0\0\0\0", 8));
  auto put_scalar = [&](auto v) { Put(&scalar, v); };
  put_scalar(uint32_t{0xF993FACA});
  put_scalar(int32_t{0});
  put_scalar(int32_t{0});
  std::ofstream(path, std::ios::binary) << scalar;
  EXPECT_THAT(LoadNDArrayList(path).status().message(), HasSubstr("is a 0-d (scalar) array"));
}

// MXNet's layout cannot hold a 0-d array: the save is refused (it wrote a
// file nobody could read back).
TEST(Checkpoint, A0dArrayIsNotSaved) {
  const absl::Status s =
      SaveNDArrayList(TempPrefix("scalar.params"), {{"arg:s", FromVector({5.f}, Shape{})}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("cannot hold a 0-d (or null) array"));
}

// A checksum file that exists but cannot be read is an error, not taken
// for an absent one (which loads the file unverified, with a warning).
TEST(Checkpoint, AChecksumFileThatCannotBeReadIsAnError) {
  const std::string path = TempPrefix("unreadable_sum.params");
  ASSERT_TRUE(SaveNDArrayList(path, {{"arg:w", FromVector({1, 2})}}).ok());
  const std::string sum = ChecksumPath(path);
  ASSERT_EQ(std::remove(sum.c_str()), 0);
  ASSERT_EQ(symlink(sum.c_str(), sum.c_str()), 0);  // a loop: ELOOP, even for root
  auto loaded = LoadNDArrayList(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(loaded.status().message(),
              HasSubstr(path + ": its checksum file cannot be read: cannot open " + sum));
  std::remove(sum.c_str());
}

// Writes `bytes` over the file at `path` from `offset` (or appends them).
void Damage(const std::string& path, size_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
std::string FloatBytes(float v) { return std::string(reinterpret_cast<const char*>(&v), 4); }

// The values of a saved one-dimensional array "arg:w" start at offset 56
// (ParamsFileHasMxnetLayout shows a two-dimensional one's at 64).
constexpr size_t kFirstValue = 56;

TEST(Checkpoint, DamagedValuesAreRefusedByTheChecksum) {
  for (float bad : {NAN, INFINITY, 1e38f}) {
    SCOPED_TRACE(bad);
    const std::string path = TempPrefix("damaged.params");
    ASSERT_TRUE(SaveNDArrayList(path, {{"arg:w", FromVector({1, 2, 3, 4})}}).ok());
    ASSERT_TRUE(LoadNDArrayList(path).ok());
    Damage(path, kFirstValue + 2 * 4, FloatBytes(bad));
    auto loaded = LoadNDArrayList(path);
    ASSERT_FALSE(loaded.ok());
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(loaded.status().message(), HasSubstr(path + ": damaged"));
    // What to do when MXNet rewrote it on purpose.
    EXPECT_THAT(loaded.status().message(), HasSubstr("delete " + ChecksumPath(path)));
  }
}

TEST(Checkpoint, AppendedBytesAreRefused) {
  const std::string path = TempPrefix("appended.params");
  ASSERT_TRUE(SaveNDArrayList(path, {{"arg:w", FromVector({1, 2})}}).ok());
  std::ofstream(path, std::ios::binary | std::ios::app) << std::string(1000, '\x5a');
  auto checked = LoadNDArrayList(path);
  ASSERT_FALSE(checked.ok());
  EXPECT_THAT(checked.status().message(), HasSubstr("damaged"));
  // Without the checksum file (as from MXNet), the layout itself refuses them.
  std::remove(ChecksumPath(path).c_str());
  auto unchecked = LoadNDArrayList(path);
  ASSERT_FALSE(unchecked.ok());
  EXPECT_EQ(unchecked.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(unchecked.status().message(), HasSubstr("1000 bytes follow the last name"));
}

TEST(Checkpoint, NonFiniteValuesAreRefusedNamingTheArrayUnlessAllowed) {
  const std::string path = TempPrefix("nan.params");
  ASSERT_TRUE(SaveNDArrayList(path, {{"arg:w", FromVector({1, 2, 3})}}).ok());
  Damage(path, kFirstValue + 4, FloatBytes(NAN));
  std::remove(ChecksumPath(path).c_str());  // as a file from MXNet: unverified
  auto refused = LoadNDArrayList(path);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(refused.status().message(), HasSubstr("array 'arg:w' holds nan at element 1"));
  ParamsLoadOptions allow;
  allow.allow_non_finite = true;
  auto allowed = LoadNDArrayList(path, allow);
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  EXPECT_TRUE(std::isnan((*allowed)[0].second.ToVector()[1]));
}

TEST(Checkpoint, ASaveReplacesTheChecksumOfTheFileItReplaces) {
  const std::string path = TempPrefix("again.params");
  ASSERT_TRUE(SaveNDArrayList(path, {{"arg:w", FromVector({1})}}).ok());
  ASSERT_TRUE(SaveNDArrayList(path, {{"arg:w", FromVector({1, 2, 3})}}).ok());
  auto loaded = LoadNDArrayList(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_THAT((*loaded)[0].second.ToVector(), ElementsAre(1, 2, 3));
  std::ifstream sum(ChecksumPath(path));
  std::string line;
  std::getline(sum, line);
  EXPECT_THAT(line, ::testing::MatchesRegex("crc32=[0-9a-f]{8} bytes=[0-9]+"));
}

TEST(Checkpoint, APrefixWhereNothingCanBeWrittenIsRefusedUpFront) {
  EXPECT_TRUE(CheckCheckpointPrefix(TempPrefix("model")).ok());
  absl::Status s = CheckCheckpointPrefix(TempPrefix("no/such/dir/model"));
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("no/such/dir/"));
  EXPECT_THAT(s.message(), HasSubstr("No such file or directory"));
}

// A checkpoint that cannot be written (a full disk: here the process's file
// size limit) fails with the file named, and the checkpoint already there
// for that epoch still loads.
TEST(Checkpoint, AFailedWriteKeepsTheCheckpointThatWasThere) {
  const std::string prefix = TempPrefix("full");
  Symbol net = zoo::Mlp();
  ASSERT_TRUE(SaveCheckpoint(prefix, 1, net, {{"w", Ones({4})}}, {}).ok());
  rlimit old;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit limited = old;
  limited.rlim_cur = 64 << 10;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limited), 0);
  absl::Status s = SaveCheckpoint(prefix, 1, net, {{"w", Zeros({1 << 20})}}, {});
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr(CheckpointParamsPath(prefix, 1)));
  EXPECT_THAT(s.message(), HasSubstr("File too large"));
  auto kept = LoadCheckpoint(prefix, 1);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->arg_params.at("w").shape(), Shape{4});
}

// SmallMlp(2) after an epoch on blobs.
FeedForward FittedMlp() {
  srand(4);
  Blobs train = MakeBlobs(40, 2, 6);
  FeedForward model(SmallMlp(2));
  auto it = Iter(train, 20);
  EXPECT_TRUE(model.Fit(it.get(), nullptr, Sgd(1, 0.1f)).ok());
  return model;
}

// The .params file is written last: a checkpoint whose optimizer state
// could not be written leaves no .params of its epoch, which a resume
// would have taken for a whole checkpoint (resuming with a fresh
// optimizer, a warning its only sign).
TEST(Checkpoint, AFailedStateWriteLeavesNoParamsOfItsEpoch) {
  FeedForward model = FittedMlp();
  const std::string prefix = TempPrefix("half");
  ASSERT_EQ(mkdir(CheckpointStatesPath(prefix, 1).c_str(), 0755), 0);  // rename fails: EISDIR
  absl::Status s = model.SaveCheckpoint(prefix, 1);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr(CheckpointStatesPath(prefix, 1)));
  EXPECT_EQ(access(CheckpointParamsPath(prefix, 1).c_str(), F_OK), -1)
      << "the epoch's .params was written before its .states failed";
}

TEST(Checkpoint, SaveAndLoadModel) {
  FeedForward model = FittedMlp();
  std::string prefix = TempPrefix("model");
  ASSERT_TRUE(model.SaveCheckpoint(prefix, 1).ok());
  auto loaded = FeedForward::LoadCheckpoint(prefix, 1);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->symbol().ListArguments(), model.symbol().ListArguments());
  for (const auto& [name, a] : model.arg_params()) {
    EXPECT_EQ(loaded->arg_params().at(name).ToVector(), a.ToVector()) << name;
  }
  auto missing = FeedForward::LoadCheckpoint(prefix, 7);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

// A checkpoint whose arrays are not the network's is refused at the load,
// naming the file and the array, as MXNet refuses it when copying them in
// (an extra "aux:" entry aborted the process at the end of the first
// epoch).
TEST(Checkpoint, ArraysTheNetworkLacksAreRefusedAtTheLoad) {
  FeedForward model = FittedMlp();
  const std::string prefix = TempPrefix("extra");
  for (const bool aux : {true, false}) {
    std::map<std::string, NDArray> args = model.arg_params(), states = model.aux_params();
    (aux ? states : args)["bogus"] = Zeros({3});
    ASSERT_TRUE(mx::SaveCheckpoint(prefix, 1, model.symbol(), args, states).ok());
    auto loaded = FeedForward::LoadCheckpoint(prefix, 1);
    ASSERT_FALSE(loaded.ok());
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(loaded.status().message(),
                HasSubstr(CheckpointParamsPath(prefix, 1) + ": '" + (aux ? "aux" : "arg") +
                          ":bogus' is not an " + (aux ? "auxiliary state" : "argument") +
                          " of the network"));
  }
}

// Training 4 epochs at once equals training 2, checkpointing, loading and
// training 2 more: parameters and optimizer state (momentum) carry over.
TEST(Checkpoint, ResumingGivesTheSameParametersAsAnUninterruptedRun) {
  Blobs train = MakeBlobs(80, 3, 7);
  std::map<std::string, std::vector<float>> straight;
  {
    srand(5);
    FeedForward model(SmallMlp(3));
    auto it = Iter(train, 20);
    ASSERT_TRUE(model.Fit(it.get(), nullptr, Sgd(4, 0.2f, 0.9f)).ok());
    for (const auto& [n, a] : model.arg_params()) straight[n] = a.ToVector();
  }
  std::string prefix = TempPrefix("resume");
  {
    srand(5);
    FeedForward model(SmallMlp(3));
    auto it = Iter(train, 20);
    FitOptions f = Sgd(2, 0.2f, 0.9f);
    f.epoch_end_callbacks.push_back(DoCheckpoint(prefix, 2));
    ASSERT_TRUE(model.Fit(it.get(), nullptr, f).ok());
  }
  auto model = FeedForward::LoadCheckpoint(prefix, 2);
  ASSERT_TRUE(model.ok()) << model.status();
  auto it = Iter(train, 20);
  FitOptions f = Sgd(4, 0.2f, 0.9f);
  f.begin_epoch = 2;
  f.optimizer_states_path = CheckpointStatesPath(prefix, 2);
  ASSERT_TRUE(model->Fit(it.get(), nullptr, f).ok());
  for (const auto& [n, v] : straight) {
    EXPECT_EQ(model->arg_params().at(n).ToVector(), v) << n;
  }
}

TEST(Callbacks, MetricsLogWritesCsvAndJsonLines) {
  srand(6);
  Blobs train = MakeBlobs(40, 2, 8);
  for (std::string ext : {".csv", ".jsonl"}) {
    std::string path = TempPrefix("metrics" + ext);
    std::remove(path.c_str());
    FeedForward model(SmallMlp(2));
    auto it = Iter(train, 20);
    FitOptions f = Sgd(2, 0.1f);
    f.epoch_end_callbacks.push_back(MetricsLog(path));
    ASSERT_TRUE(model.Fit(it.get(), it.get(), f).ok());
    std::ifstream in(path);
    std::vector<std::string> lines;
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    if (ext == ".csv") {
      ASSERT_EQ(lines.size(), 3u);
      EXPECT_EQ(lines[0], "epoch,seconds,samples_per_second,train_accuracy,eval_accuracy");
      EXPECT_THAT(lines[2], ::testing::StartsWith("1,"));
    } else {
      ASSERT_EQ(lines.size(), 2u);
      EXPECT_THAT(lines[1], HasSubstr("\"epoch\": 1"));
      EXPECT_THAT(lines[1], HasSubstr("\"eval_accuracy\": "));
    }
  }
}

// A second run appending to a log (a resumed job) adds no second header;
// non-finite values are JSON Python reads (NaN, Infinity).
TEST(Callbacks, MetricsLogAppendsAfterAnEarlierRun) {
  for (std::string ext : {".csv", ".jsonl"}) {
    const std::string path = TempPrefix("appended" + ext);
    std::remove(path.c_str());
    EpochEndParam p;
    p.train_metrics = {{"cross-entropy", std::nan("")}, {"accuracy", 0.5}};
    for (int run = 0; run < 2; ++run) {
      p.epoch = run;
      p.train_metrics[1].second = run == 0 ? 0.5 : std::numeric_limits<double>::infinity();
      ASSERT_TRUE(MetricsLog(path)(p));
    }
    std::ifstream in(path);
    std::vector<std::string> lines;
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    if (ext == ".csv") {
      ASSERT_EQ(lines.size(), 3u);
      EXPECT_THAT(lines[0], ::testing::StartsWith("epoch,"));
      EXPECT_THAT(lines[2], ::testing::StartsWith("1,"));
    } else {
      ASSERT_EQ(lines.size(), 2u);
      EXPECT_THAT(lines[0], HasSubstr("\"train_cross-entropy\": NaN, \"train_accuracy\": 0.5}"));
      EXPECT_THAT(lines[1], HasSubstr("\"train_accuracy\": Infinity}"));
    }
  }
}

TEST(Callbacks, PeriodsBelowOneAreErrors) {
  EXPECT_THROW(Speedometer(20, 0), Error);
  EXPECT_THROW(DoCheckpoint(TempPrefix("never"), 0), Error);
}

}  // namespace
}  // namespace mx

namespace mx {
namespace {

Symbol ThreeLayerMlp() {
  Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 64}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
  net = Op("FullyConnected", {net}, {{"num_hidden", 64}}, "fc2");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu2");
  net = Op("FullyConnected", {net}, {{"num_hidden", 4}}, "fc3");
  return Op("SoftmaxOutput", {net}, {}, "softmax");
}

TEST(DataParallel, TwoContextsTrainLikeOne) {
  Blobs train = MakeBlobs(400, 4, 11), test = MakeBlobs(200, 4, 12);
  std::vector<float> acc;
  std::vector<std::vector<Context>> setups = {{cpu(0)}, {cpu(0), cpu(1)}};
  for (const auto& contexts : setups) {
    srand(9);
    FeedForward model(ThreeLayerMlp(), contexts);
    auto it = Iter(train, 20), test_it = Iter(test, 20);
    ASSERT_TRUE(model.Fit(it.get(), nullptr, Sgd(4, 0.3f)).ok());
    auto score = model.Score(test_it.get(), "accuracy");
    ASSERT_TRUE(score.ok());
    acc.push_back((*score)[0].second);
  }
  EXPECT_GT(acc[0], 0.95);
  // The same total batch gives the same gradients, so the same model up to
  // float rounding.
  EXPECT_NEAR(acc[1], acc[0], 0.01);
}

// BatchNorm's moving statistics are the mean of the devices': device 0's
// alone, from its half of each batch, went into checkpoints and Predict.
TEST(DataParallel, MovingStatisticsAreAveragedOverDevices) {
  Symbol net = Op("BatchNorm", {Variable("data")}, {{"fix_gamma", true}}, "bn");
  net = Op("FullyConnected", {net}, {{"num_hidden", 2}}, "fc");
  net = Op("SoftmaxOutput", {net}, {}, "softmax");
  // One batch: device 0 gets rows of 1, device 1 rows of 3.
  NDArray x = FromVector({1, 1, 1, 1, 3, 3, 3, 3}, {4, 2}), y = FromVector({0, 1, 0, 1}, {4});
  ArrayIterOptions o;
  o.batch_size = 4;
  auto it = ArrayIter(x, y, o);
  ASSERT_TRUE(it.ok()) << it.status();
  FeedForward model(net, {cpu(0), cpu(1)});
  ASSERT_TRUE(model.Fit(it->get(), nullptr, Sgd(1, 0.0f)).ok());
  // moving = 0.9 * 0 + 0.1 * batch mean: 0.1 and 0.3 on the devices.
  const std::vector<float> mean = model.aux_params().at("bn_moving_mean").ToVector();
  ASSERT_EQ(mean.size(), 2u);
  for (float m : mean) EXPECT_NEAR(m, 0.2f, 1e-6f);
}

TEST(DataParallel, BatchMustSplitEvenly) {
  Blobs train = MakeBlobs(60, 2, 13);
  FeedForward model(SmallMlp(2), {cpu(0), cpu(1), cpu(2)});
  auto it = Iter(train, 20);
  absl::Status s = model.Fit(it.get(), nullptr, Sgd(1, 0.1f));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("does not split evenly over 3 contexts"));
}

// The push of the last layer's gradient runs while the first layer's
// backward pass is still to run: communication overlaps computation. A gate
// holds the engine until the whole step (two devices' forward and backward,
// then pushes and pulls with the priorities Fit gives them) is queued, so
// the order in the engine's trace depends on dependencies and priorities
// alone, not on how fast this thread pushes.
TEST(DataParallel, LastLayerPushOverlapsFirstLayerBackward) {
  Symbol net = ThreeLayerMlp();
  std::vector<std::unique_ptr<Executor>> execs;
  for (int d = 0; d < 2; ++d) {
    auto e = Executor::SimpleBind(net, cpu(d), {{"data", Shape{20, 8}}}, GradReq::kWrite,
                                  {{"data", GradReq::kNull}, {"softmax_label", GradReq::kNull}});
    ASSERT_TRUE(e.ok()) << e.status();
    execs.push_back(*std::move(e));
  }
  auto kv = KVStore::Create("local");
  ASSERT_TRUE(kv.ok());
  const std::vector<std::string> params = {"fc1_weight", "fc1_bias", "fc2_weight",
                                           "fc2_bias",   "fc3_weight", "fc3_bias"};
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_TRUE((*kv)->Init(static_cast<int>(i), execs[0]->arg_dict().at(params[i])).ok());
  }
  WaitAll();
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  std::vector<VarHandle> inputs;
  for (const auto& e : execs) inputs.push_back(e->arg_dict().at("data").var());
  Engine::Get()->StartTrace();
  Engine::Get()->PushSync(
      [&](RunContext) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return open; });
      },
      cpu(), {}, inputs, 0, "gate");
  for (const auto& e : execs) {
    e->Forward(true);
    e->Backward();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<NDArray> grads, weights;
    for (const auto& e : execs) {
      grads.push_back(e->grad_dict().at(params[i]));
      weights.push_back(e->arg_dict().at(params[i]));
    }
    const int priority = static_cast<int>(params.size() - i);  // as FeedForward
    ASSERT_TRUE((*kv)->Push(static_cast<int>(i), grads, priority).ok());
    ASSERT_TRUE((*kv)->Pull(static_cast<int>(i), weights, priority).ok());
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    open = true;
  }
  cv.notify_all();
  WaitAll();
  std::vector<std::string> order;
  for (const TraceEvent& e : Engine::Get()->StopTrace()) order.push_back(e.name);
  auto first = [&](const std::string& n) {
    return std::find(order.begin(), order.end(), n) - order.begin();
  };
  auto last = [&](const std::string& n) {
    return static_cast<long>(order.size()) - 1 -
           (std::find(order.rbegin(), order.rend(), n) - order.rbegin());
  };
  const long push_fc3 = first("kvstore_push:4");
  ASSERT_LT(push_fc3, static_cast<long>(order.size())) << "no push of fc3_weight traced";
  EXPECT_LT(push_fc3, last("fc1_backward"))
      << "fc3_weight's push waited for the whole backward pass";
  EXPECT_GT(push_fc3, last("fc3_backward"));  // but not for less than its gradient
}

}  // namespace
}  // namespace mx
