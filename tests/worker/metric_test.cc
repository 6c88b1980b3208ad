// Tests of the evaluation metrics (worker/metric.h) on examples computed by
// hand, with padding, running values over several updates, composites and
// every kind of bad input.
#include "worker/metric.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"

namespace mx {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

std::unique_ptr<EvalMetric> Make(const std::string& name, int top_k = 5) {
  absl::StatusOr<std::unique_ptr<EvalMetric>> metric =
      CreateMetric(name, top_k);
  EXPECT_TRUE(metric.ok()) << metric.status();
  return metric.ok() ? *std::move(metric) : nullptr;
}

// The single value of a simple metric.
double Value(const EvalMetric& metric) {
  auto values = metric.Get();
  EXPECT_EQ(values.size(), 1u);
  return values.empty() ? NAN : values[0].second;
}

std::string Name(const EvalMetric& metric) {
  auto values = metric.Get();
  return values.empty() ? "" : values[0].first;
}

// Probabilities of 3 samples over 3 classes: argmax 1, 0, 2.
NDArray Probs() {
  return FromVector({0.2f, 0.7f, 0.1f,  //
                     0.5f, 0.3f, 0.2f,  //
                     0.1f, 0.4f, 0.5f},
                    {3, 3});
}

TEST(Accuracy, ComparesArgmaxWithTheLabel) {
  auto m = Make("accuracy");
  EXPECT_EQ(Name(*m), "accuracy");
  EXPECT_TRUE(std::isnan(Value(*m))) << "no samples yet";
  m->Update({FromVector({1, 0, 1})}, {Probs()});
  EXPECT_DOUBLE_EQ(Value(*m), 2.0 / 3);
  // Running over updates: 2 + 1 correct of 3 + 3.
  m->Update({FromVector({0, 0, 0})}, {Probs()});
  EXPECT_DOUBLE_EQ(Value(*m), 3.0 / 6);
  m->Reset();
  EXPECT_TRUE(std::isnan(Value(*m)));
}

TEST(Accuracy, SkipsPaddedSamples) {
  auto m = Make("accuracy");
  // The third sample is wrong but padding.
  m->Update({FromVector({1, 0, 0})}, {Probs()}, /*pad=*/1);
  EXPECT_DOUBLE_EQ(Value(*m), 1.0);
  m->Update({FromVector({1, 1, 1})}, {Probs()}, /*pad=*/2);
  EXPECT_DOUBLE_EQ(Value(*m), 3.0 / 3);
  m->Update({FromVector({0, 0, 0})}, {Probs()}, /*pad=*/3);
  EXPECT_DOUBLE_EQ(Value(*m), 3.0 / 3) << "a batch of padding counts nothing";
}

TEST(Accuracy, AcceptsLabelsAsAColumnAndPredictedIndices) {
  auto m = Make("acc");
  m->Update({FromVector({1, 0, 2}, {3, 1})}, {Probs()});
  EXPECT_DOUBLE_EQ(Value(*m), 1.0);
  m->Reset();
  // Predictions of the label's shape are class indices already.
  m->Update({FromVector({1, 2, 3, 4})}, {FromVector({1, 2, 0, 4})});
  EXPECT_DOUBLE_EQ(Value(*m), 0.75);
}

TEST(Accuracy, SeveralOutputsCountEach) {
  auto m = Make("accuracy");
  m->Update({FromVector({1, 0, 2}), FromVector({0, 0, 0})}, {Probs(), Probs()});
  EXPECT_DOUBLE_EQ(Value(*m), 4.0 / 6);
}

TEST(TopKAccuracy, LabelAmongTheKLargest) {
  auto m = Make("top_k_accuracy", 2);
  EXPECT_EQ(Name(*m), "top_k_accuracy_2");
  // Top 2 of the rows: {1,0}, {0,1}, {2,1}.
  m->Update({FromVector({0, 2, 1})}, {Probs()});
  EXPECT_DOUBLE_EQ(Value(*m), 2.0 / 3);
  m->Reset();
  m->Update({FromVector({0, 2, 1})}, {Probs()}, /*pad=*/1);
  EXPECT_DOUBLE_EQ(Value(*m), 1.0 / 2);

  auto top1 = Make("top_k_accuracy", 1);
  top1->Update({FromVector({1, 0, 1})}, {Probs()});
  EXPECT_DOUBLE_EQ(Value(*top1), 2.0 / 3) << "k = 1 is accuracy";
  auto all = Make("top_k_accuracy", 3);
  all->Update({FromVector({2, 2, 0})}, {Probs()});
  EXPECT_DOUBLE_EQ(Value(*all), 1.0);
}

TEST(CrossEntropy, MeanNegativeLogOfTheLabelsProbability) {
  auto m = Make("ce");
  EXPECT_EQ(Name(*m), "cross-entropy");
  m->Update({FromVector({1, 0, 2})}, {Probs()});
  const double want = -(std::log(0.7) + std::log(0.5) + std::log(0.5)) / 3;
  EXPECT_NEAR(Value(*m), want, 1e-6);
  m->Update({FromVector({2, 2, 2})}, {Probs()}, /*pad=*/2);
  EXPECT_NEAR(Value(*m), (3 * want - std::log(0.1)) / 4, 1e-6);
}

TEST(CrossEntropy, ZeroProbabilityIsLargeButFinite) {
  auto m = Make("ce");
  m->Update({FromVector({1})}, {FromVector({1.0f, 0.0f}, {1, 2})});
  EXPECT_NEAR(Value(*m), -std::log(1e-12), 1e-3);
}

TEST(Regression, MseMaeRmseOnHandComputedValues) {
  const NDArray label = FromVector({1.5f, 2.0f, 5.0f});
  const NDArray pred = FromVector({1.0f, 2.0f, 3.0f}, {3, 1});
  auto mse = Make("mse");
  auto mae = Make("mae");
  auto rmse = Make("rmse");
  for (auto* m : {mse.get(), mae.get(), rmse.get()}) m->Update({label}, {pred});
  EXPECT_DOUBLE_EQ(Value(*mse), (0.25 + 0 + 4) / 3);
  EXPECT_DOUBLE_EQ(Value(*mae), (0.5 + 0 + 2) / 3);
  EXPECT_DOUBLE_EQ(Value(*rmse), std::sqrt((0.25 + 0 + 4) / 3));
  EXPECT_EQ(Name(*rmse), "rmse");

  // A second batch whose last sample is padding: (1 - 0)^2 over 4 samples.
  for (auto* m : {mse.get(), mae.get(), rmse.get()}) {
    m->Update({FromVector({1.0f, 100.0f})}, {FromVector({0.0f, 0.0f})}, 1);
  }
  EXPECT_DOUBLE_EQ(Value(*mse), (4.25 + 1) / 4);
  EXPECT_DOUBLE_EQ(Value(*mae), (2.5 + 1) / 4);
  EXPECT_DOUBLE_EQ(Value(*rmse), std::sqrt((4.25 + 1) / 4));
}

TEST(Regression, SeveralOutputsPerSampleAverageWithinTheSample) {
  auto mse = Make("mse");
  // Sample errors: (1, 3) -> mean 5; (0, 0) -> 0.
  mse->Update({FromVector({1, 3, 0, 0}, {2, 2})}, {Zeros({2, 2})});
  EXPECT_DOUBLE_EQ(Value(*mse), 2.5);
}

TEST(F1, BinaryOnArgmaxWithPositiveClassOne) {
  auto m = Make("f1");
  EXPECT_EQ(Name(*m), "f1");
  // Predicted 1, 1, 0, 1, 0 against labels 1, 0, 1, 1, 0: tp 2, fp 1, fn 1.
  const NDArray pred = FromVector(
      {0.2f, 0.8f, 0.4f, 0.6f, 0.9f, 0.1f, 0.3f, 0.7f, 0.6f, 0.4f}, {5, 2});
  m->Update({FromVector({1, 0, 1, 1, 0})}, {pred});
  EXPECT_DOUBLE_EQ(Value(*m), 2.0 / 3);
  // Padding the last two: tp 1, fp 1, fn 1 more.
  m->Update({FromVector({1, 0, 1, 0, 0})}, {pred}, /*pad=*/2);
  EXPECT_DOUBLE_EQ(Value(*m), 2.0 * 3 / (2 * 3 + 2 + 2));
}

TEST(F1, OneProbabilityPerSampleAndNoPositives) {
  auto m = Make("f1");
  m->Update({FromVector({1, 0, 1})}, {FromVector({0.9f, 0.6f, 0.2f})});
  // tp 1, fp 1, fn 1.
  EXPECT_DOUBLE_EQ(Value(*m), 0.5);
  m->Reset();
  m->Update({FromVector({0, 0})}, {FromVector({0.1f, 0.2f})});
  EXPECT_DOUBLE_EQ(Value(*m), 0.0) << "no positives at all";
}

TEST(Composite, ReportsEachMetricInOrder) {
  auto m = Make("accuracy, ce,top_k_accuracy", 2);
  m->Update({FromVector({1, 0, 1})}, {Probs()});
  auto values = m->Get();
  ASSERT_EQ(values.size(), 3u);
  EXPECT_EQ(values[0].first, "accuracy");
  EXPECT_DOUBLE_EQ(values[0].second, 2.0 / 3);
  EXPECT_EQ(values[1].first, "cross-entropy");
  EXPECT_NEAR(values[1].second,
              -(std::log(0.7) + std::log(0.5) + std::log(0.4)) / 3, 1e-6);
  EXPECT_EQ(values[2].first, "top_k_accuracy_2");
  EXPECT_DOUBLE_EQ(values[2].second, 1.0);
  m->Reset();
  for (const auto& [name, value] : m->Get()) {
    EXPECT_TRUE(std::isnan(value)) << name;
  }
}

TEST(CreateMetric, RejectsUnknownNamesAndBadLists) {
  for (const std::string name :
       {"accuracyy", "", "accuracy,,ce", "accuracy,", "f1,bogus"}) {
    auto m = CreateMetric(name);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
  EXPECT_THAT(CreateMetric("bogus").status().message(), HasSubstr("'bogus'"));
  EXPECT_EQ(CreateMetric("top_k_accuracy", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Expects an update to throw kInvalidArgument whose message has every part.
void ExpectUpdateError(EvalMetric* m, const std::vector<NDArray>& labels,
                       const std::vector<NDArray>& preds, int pad,
                       const std::vector<std::string>& parts) {
  try {
    m->Update(labels, preds, pad);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), absl::StatusCode::kInvalidArgument) << e.what();
    for (const std::string& part : parts)
      EXPECT_THAT(e.what(), HasSubstr(part));
  }
}

TEST(MetricErrors, ShapesThatDoNotFitNameBothShapes) {
  for (const std::string name : {"accuracy", "top_k_accuracy", "ce", "f1"}) {
    SCOPED_TRACE(name);
    auto m = Make(name, 2);
    ExpectUpdateError(m.get(), {FromVector({1, 0})}, {Probs()}, 0,
                      {"(2,)", "(3,3)"});
    ExpectUpdateError(m.get(), {FromVector({1, 0, 1, 0, 1, 0}, {3, 2})},
                      {Probs()}, 0, {"(3,2)", "(3,3)"});
  }
  auto mse = Make("mse");
  ExpectUpdateError(mse.get(), {FromVector({1, 2, 3})}, {Probs()}, 0,
                    {"(3,)", "(3,3)"});
  auto f1 = Make("f1");
  ExpectUpdateError(f1.get(), {FromVector({1, 0, 1})}, {Probs()}, 0,
                    {"binary", "(3,3)"});
}

TEST(MetricErrors, PadOutsideTheBatch) {
  auto m = Make("accuracy");
  ExpectUpdateError(m.get(), {FromVector({1, 0, 1})}, {Probs()}, 4, {"pad 4"});
  ExpectUpdateError(m.get(), {FromVector({1, 0, 1})}, {Probs()}, -1,
                    {"pad -1"});
}

TEST(MetricErrors, LabelsAndPredictionsInDifferentNumbers) {
  auto m = Make("accuracy");
  ExpectUpdateError(m.get(), {FromVector({1, 0, 1}), FromVector({1, 0, 1})},
                    {Probs()}, 0, {"2 label arrays", "1 prediction"});
}

TEST(MetricErrors, LabelsThatAreNotClassIndices) {
  for (const std::string name : {"ce", "top_k_accuracy", "accuracy"}) {
    SCOPED_TRACE(name);
    auto m = Make(name, 2);
    ExpectUpdateError(m.get(), {FromVector({1, 3, 1})}, {Probs()}, 0,
                      {"label 3 of sample 1"});
    ExpectUpdateError(m.get(), {FromVector({1, 0.5f, 1})}, {Probs()}, 0,
                      {"label 0.5"});
    ExpectUpdateError(m.get(), {FromVector({-0.5f, 0, 1})}, {Probs()}, 0, {"label -0.5"});
    if (name == "ce") {
      ExpectUpdateError(m.get(), {FromVector({-1, 0, 1})}, {Probs()}, 0, {"label -1"});
    }
    // A bad label in padding is not read.
    m->Update({FromVector({1, 0, 7})}, {Probs()}, 1);
  }
  auto f1 = Make("f1");
  ExpectUpdateError(f1.get(), {FromVector({2})}, {FromVector({0.5f})}, 0,
                    {"label 2"});
}

// An ignored label (SoftmaxOutput's ignore_label, -1) is a miss for the
// accuracies, as in MXNet; it failed Fit's default metric after one batch.
TEST(Accuracy, AnIgnoredLabelIsAMiss) {
  for (const std::string name : {"accuracy", "top_k_accuracy"}) {
    SCOPED_TRACE(name);
    auto m = Make(name, 1);
    const NDArray pred = Probs();
    std::vector<float> labels(pred.shape()[0]);
    const std::vector<float> v = pred.ToVector();
    const int64_t classes = pred.shape()[1];
    for (size_t i = 0; i < labels.size(); ++i) {  // every prediction right...
      labels[i] = static_cast<float>(
          std::max_element(v.begin() + i * classes, v.begin() + (i + 1) * classes) -
          (v.begin() + i * classes));
    }
    labels[0] = -1;  // ...but one sample's label is ignored
    m->Update({FromVector(labels)}, {pred});
    EXPECT_DOUBLE_EQ(Value(*m), (labels.size() - 1.0) / labels.size());
  }
}

TEST(MetricErrors, AFailedUpdateChangesNothing) {
  auto m = Make("accuracy");
  m->Update({FromVector({1, 0, 1})}, {Probs()});
  ExpectUpdateError(m.get(), {FromVector({1, 0, 1}), FromVector({1})},
                    {Probs(), Probs()}, 0, {"(1,)"});
  EXPECT_DOUBLE_EQ(Value(*m), 2.0 / 3);
}

}  // namespace
}  // namespace mx
