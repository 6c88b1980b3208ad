// The click-through workload's data: the synthetic click log with a
// planted model (worker/ctr_data.h) read back through the streaming
// libsvm iterator (LibSvmIter, worker/io.h).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "worker/checkpoint.h"
#include "worker/ctr_data.h"
#include "worker/io.h"
#include "worker/model.h"
#include "worker/zoo.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

std::string Contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Every batch of an epoch: (features by sample, labels), pad removed.
struct Epoch {
  std::vector<std::vector<float>> features;
  std::vector<float> labels;
};
Epoch ReadEpoch(DataIter& it, int fields) {
  Epoch e;
  DataBatch b;
  while (it.Next(&b)) {
    const std::vector<float> data = b.data[0].ToVector(), label = b.label[0].ToVector();
    for (int k = 0; k < it.batch_size() - b.pad; ++k) {
      e.features.emplace_back(data.begin() + k * fields, data.begin() + (k + 1) * fields);
      e.labels.push_back(label[k]);
    }
  }
  return e;
}

TEST(ClickLogTest, ThePlantedModelBeatsAConstantAndTheFileReadsBack) {
  ClickLogOptions o;
  o.path = TempPath("clicks.txt.gz");
  o.samples = 2000;
  o.fields = 4;
  o.vocab = 50;
  absl::StatusOr<ClickLogStats> stats = WriteClickLog(o);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->samples, 2000);
  EXPECT_GT(stats->click_rate, 0.05);
  EXPECT_LT(stats->click_rate, 0.5);
  EXPECT_LT(stats->best_logloss, stats->constant_logloss - 0.05);

  auto it = LibSvmIter({o.path, o.fields, 128});
  ASSERT_TRUE(it.ok()) << it.status();
  const Epoch e = ReadEpoch(**it, o.fields);
  ASSERT_EQ(e.features.size(), 1920u);  // 15 whole batches; the rest dropped (kDiscard)
  double clicks = 0;
  std::map<int, int> counts;  // field 0's values
  for (size_t i = 0; i < e.features.size(); ++i) {
    for (int f = 0; f < o.fields; ++f) {
      EXPECT_GE(e.features[i][f], f * o.vocab);
      EXPECT_LT(e.features[i][f], (f + 1) * o.vocab);
    }
    ++counts[static_cast<int>(e.features[i][0])];
    EXPECT_TRUE(e.labels[i] == 0 || e.labels[i] == 1);
    clicks += e.labels[i];
  }
  EXPECT_NEAR(clicks / e.labels.size(), stats->click_rate, 0.03);
  // A power law: value 0 is the most frequent, and far more than the mean.
  EXPECT_GT(counts[0], 1920 / o.vocab * 5);
  for (const auto& [v, n] : counts) EXPECT_LE(n, counts[0]) << "value " << v;
  // Reset reads it again, the same.
  (*it)->Reset();
  EXPECT_EQ(ReadEpoch(**it, o.fields).features, e.features);
}

TEST(ClickLogTest, TheSameSeedWritesTheSameFile) {
  ClickLogOptions o;
  o.samples = 300;
  o.path = TempPath("a.txt");
  ASSERT_TRUE(WriteClickLog(o).ok());
  o.path = TempPath("b.txt");
  ASSERT_TRUE(WriteClickLog(o).ok());
  EXPECT_EQ(Contents(TempPath("a.txt")), Contents(TempPath("b.txt")));
  o.seed = 2;  // other samples of the same model (a test log)
  o.path = TempPath("c.txt");
  auto other = WriteClickLog(o);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(Contents(TempPath("a.txt")), Contents(TempPath("c.txt")));
  o.samples = 0;
  EXPECT_EQ(WriteClickLog(o).status().code(), absl::StatusCode::kInvalidArgument);
  // fields x vocab past 2^24, also where the product wraps to 0 (it
  // passed the check and crashed).
  o.samples = 10;
  for (int64_t vocab : {int64_t{1} << 22, int64_t{1} << 62}) {
    o.fields = 4;
    o.vocab = vocab;
    EXPECT_EQ(WriteClickLog(o).status().code(), absl::StatusCode::kInvalidArgument) << vocab;
  }
}

// Trains the zoo's click-through model (dense or row-sparse tables) for 3
// epochs on a click log with a planted model; returns the model and fills
// the log-loss of held-out samples and what the planted model allows.
struct CtrRun {
  double logloss, best, constant;
};
CtrRun TrainCtr(bool sparse, FeedForward* model, std::vector<Context> contexts = {cpu()}) {
  ClickLogOptions o;
  o.samples = 40000;
  o.fields = 4;
  o.vocab = 100;
  o.path = TempPath("ctr_train.txt");
  EXPECT_TRUE(WriteClickLog(o).ok());
  o.samples = 10000;
  o.seed = 2;  // other samples, the same model
  o.path = TempPath("ctr_test.txt");
  absl::StatusOr<ClickLogStats> test_stats = WriteClickLog(o);
  EXPECT_TRUE(test_stats.ok());
  auto train = LibSvmIter({TempPath("ctr_train.txt"), o.fields, 128});
  auto test = LibSvmIter({TempPath("ctr_test.txt"), o.fields, 100});
  EXPECT_TRUE(train.ok() && test.ok());
  *model = FeedForward(zoo::Ctr(o.fields * o.vocab, 16, sparse), std::move(contexts));
  FitOptions fit;
  fit.num_epoch = 3;
  fit.optimizer_options = {{"learning_rate", "0.5"}};
  const absl::Status fitted = model->Fit(train->get(), nullptr, fit);
  EXPECT_TRUE(fitted.ok()) << fitted;
  absl::StatusOr<MetricValues> score = model->Score(test->get(), "ce");
  EXPECT_TRUE(score.ok()) << score.status();
  return {score.ok() ? score->at(0).second : 1e9, test_stats->best_logloss,
          test_stats->constant_logloss};
}

// The zoo's click-through model learns the planted model: on held-out
// samples of it its log-loss lands between the best achievable and a
// constant predictor's, much nearer the best.
TEST(ClickLogTest, TheCtrModelLearnsThePlantedModel) {
  FeedForward model(Symbol{});
  const CtrRun r = TrainCtr(/*sparse=*/false, &model);
  EXPECT_GT(r.logloss, r.best - 0.02);
  EXPECT_LT(r.logloss, r.best + 0.3 * (r.constant - r.best)) << "best " << r.best
                                                               << ", constant " << r.constant;
}

// With row-sparse tables it learns as well, holds no table itself (they
// live in the KVStore) and refuses a checkpoint that would lack them.
TEST(ClickLogTest, TheSparseCtrModelLearnsThePlantedModelWithTablesInTheStore) {
  FeedForward model(Symbol{});
  const CtrRun r = TrainCtr(/*sparse=*/true, &model);
  EXPECT_GT(r.logloss, r.best - 0.02);
  EXPECT_LT(r.logloss, r.best + 0.3 * (r.constant - r.best)) << "best " << r.best
                                                               << ", constant " << r.constant;
  EXPECT_FALSE(model.arg_params().count("deep_embed_weight"));
  EXPECT_TRUE(model.arg_params().count("deep_fc1_weight"));
}

// A checkpoint of the sparse model holds its tables (.tables, written a
// range of rows at a time); resuming from it continues exactly as the
// uninterrupted run: the same predictions, bit for bit.
TEST(ClickLogTest, TheSparseCtrModelResumesFromACheckpointExactly) {
  ClickLogOptions o;
  o.samples = 5000;
  o.fields = 4;
  o.vocab = 50;
  o.path = TempPath("resume_train.txt");
  ASSERT_TRUE(WriteClickLog(o).ok());
  auto iter = [&] { return LibSvmIter({o.path, o.fields, 100}); };
  const std::string prefix = TempPath("ctr_ckpt");
  FitOptions fit;
  fit.optimizer_options = {{"learning_rate", "0.5"}};
  fit.num_epoch = 2;
  const Symbol net = zoo::Ctr(o.fields * o.vocab, 8, /*sparse=*/true);

  FeedForward whole(net);
  auto train = iter();
  ASSERT_TRUE(train.ok());
  FitOptions with_checkpoints = fit;
  with_checkpoints.epoch_end_callbacks = {DoCheckpoint(prefix)};
  ASSERT_TRUE(whole.Fit(train->get(), nullptr, with_checkpoints).ok());
  auto want = whole.Predict(iter()->get());
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_THAT(std::string(whole.Fit(train->get(), nullptr, fit).message()),
              HasSubstr("save a checkpoint and resume from it instead"));

  auto resumed = FeedForward::LoadCheckpoint(prefix, 1);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  FitOptions rest = fit;
  rest.begin_epoch = 1;
  rest.optimizer_states_path = CheckpointStatesPath(prefix, 1);
  auto again = iter();
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE(resumed->Fit(again->get(), nullptr, rest).ok());
  auto got = resumed->Predict(iter()->get());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[0].ToVector(), (*want)[0].ToVector());

  // A checkpoint whose tables file is gone is refused at load.
  std::remove(CheckpointTablesPath(prefix, 2).c_str());
  EXPECT_THAT(std::string(FeedForward::LoadCheckpoint(prefix, 2).status().message()),
              HasSubstr("has row-sparse parameters but no tables file"));
}

// Two devices (cpu(0) and cpu(1)) share each batch: each binds the rows
// its half needs, pulled once for both, and their gradients are summed.
TEST(ClickLogTest, TheSparseCtrModelTrainsOnTwoDevices) {
  FeedForward model(Symbol{});
  const CtrRun r = TrainCtr(/*sparse=*/true, &model, {cpu(0), cpu(1)});
  EXPECT_GT(r.logloss, r.best - 0.02);
  EXPECT_LT(r.logloss, r.best + 0.3 * (r.constant - r.best)) << "best " << r.best
                                                               << ", constant " << r.constant;
}

void Write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

TEST(LibSvmIterTest, PartsPaddingAndLabels) {
  const std::string path = TempPath("small.txt");
  Write(path, "1 3:1 7:1\n0 1:1 2:1\n-1 4:1 5:1\n+1 6:1 8:1\n1 9:1 10:1");  // no last newline
  // Worker 1 of 2: lines 2 and 4.
  auto part = LibSvmIter({path, 2, 4, 1, 2, LastBatch::kPad});
  ASSERT_TRUE(part.ok()) << part.status();
  DataBatch b;
  ASSERT_TRUE((*part)->Next(&b));
  EXPECT_EQ(b.pad, 2);
  EXPECT_EQ(b.data[0].ToVector(), (std::vector<float>{1, 2, 6, 8, 1, 2, 6, 8}));  // padded with its own
  EXPECT_EQ(b.label[0].ToVector(), (std::vector<float>{0, 1, 0, 1}));
  EXPECT_FALSE((*part)->Next(&b));
  auto all = LibSvmIter({path, 2, 5});
  ASSERT_TRUE(all.ok());
  ASSERT_TRUE((*all)->Next(&b));
  EXPECT_EQ(b.label[0].ToVector(), (std::vector<float>{1, 0, 0, 1, 1}));  // -1 reads as 0
  EXPECT_EQ(b.data[0].ToVector()[9], 10);  // the last line, without its newline
}

TEST(LibSvmIterTest, DamagedLinesNameTheFileAndLine) {
  const std::string path = TempPath("bad.txt");
  auto error_of = [&](const std::string& second_line, int64_t features = int64_t{1} << 24) {
    Write(path, "1 3:1 7:1\n" + second_line + "\n");
    auto it = LibSvmIter({path, 2, 2, 0, 1, LastBatch::kDiscard, features});
    EXPECT_TRUE(it.ok());
    DataBatch b;
    try {
      (*it)->Next(&b);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), absl::StatusCode::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(error_of("1 3:1"), HasSubstr(path + ": line 2: 1 features, expected 2"));
  EXPECT_THAT(error_of("2 3:1 4:1"), HasSubstr("line 2: label '2' is not 0, 1, -1 or +1"));
  EXPECT_THAT(error_of("1 3:0.5 4:1"), HasSubstr("line 2: feature '3:0.5': only binary features"));
  EXPECT_THAT(error_of("1 x:1 4:1"), HasSubstr("line 2: feature 'x:1' is not INDEX:VALUE"));
  EXPECT_THAT(error_of("1 16777216:1 4:1"), HasSubstr("line 2: feature index 16777216 is outside"));
  // Beyond the model's features (its Embedding would clamp it silently).
  EXPECT_THAT(error_of("1 3:1 100:1", 100),
              HasSubstr("line 2: feature index 100 is outside 0..99 (the model's features)"));
  EXPECT_EQ(LibSvmIter({TempPath("missing.txt"), 2, 2}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(LibSvmIter({path, 0, 2}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LibSvmIter({path, 2, 2, 0, 1, LastBatch::kRollOver}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mx
