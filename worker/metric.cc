// The metrics follow MXNet's definitions (python/mxnet/gluon/metric.py):
//   accuracy        argmax of each prediction row == label (or the
//                   predictions themselves when they have the label's shape,
//                   both compared as integers)
//   top_k_accuracy  the label is among the k largest predictions: fewer than
//                   k classes score strictly higher than it
//   ce              mean of -log(p[label] + 1e-12)
//   mse, mae        per sample, the mean over its outputs; averaged over
//                   samples
//   rmse            sqrt of the running mse
//   f1              binary F1 of the positive class 1, from true/false
//                   positives and false negatives counted over every update
//                   (MXNet's "micro" average); argmax of (batch, 2)
//                   predictions, or p > 0.5 for one probability per sample
// Each value is over every sample seen since Reset(), so batches weigh by
// their unpadded size; with no samples it is NaN, as in MXNet.
#include "worker/metric.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace mx {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// An array copied to the host.
struct Host {
  Shape shape;
  std::vector<float> v;
};

// One (label, prediction) pair of an update, on the host, with `n` the
// number of samples that count (the batch less its padding).
struct Pair {
  Host label;
  Host pred;
  int64_t n;
};

[[noreturn]] void ShapeError(absl::string_view metric, const Host& label,
                             const Host& pred, absl::string_view why) {
  throw Error(absl::InvalidArgumentError(absl::StrCat(
      metric, ": labels ", label.shape.ToString(), " do not fit predictions ",
      pred.shape.ToString(), ": ", why)));
}

// Checks what every metric needs: as many labels as predictions, arrays
// with a first dimension of samples that agree, and 0 <= pad <= batch.
std::vector<Pair> ToHost(absl::string_view metric,
                         const std::vector<NDArray>& labels,
                         const std::vector<NDArray>& preds, int pad) {
  MX_THROW_IF_NOT(labels.size() == preds.size(), metric, ": ", labels.size(),
                  " label arrays but ", preds.size(), " prediction arrays");
  std::vector<Pair> pairs(labels.size());
  for (size_t i = 0; i < labels.size(); ++i) {
    MX_THROW_IF_NOT(!labels[i].is_none() && !preds[i].is_none(), metric,
                    ": label or prediction ", i, " is null");
    Pair& p = pairs[i];
    p.label = {labels[i].shape(), labels[i].ToVector()};
    p.pred = {preds[i].shape(), preds[i].ToVector()};
    if (p.label.shape.ndim() < 1 || p.pred.shape.ndim() < 1 ||
        p.label.shape[0] != p.pred.shape[0]) {
      ShapeError(metric, p.label, p.pred,
                 "they need the same first dimension of samples");
    }
    const int64_t batch = p.pred.shape[0];
    MX_THROW_IF_NOT(pad >= 0 && pad <= batch, metric, ": pad ", pad,
                    " is outside [0, ", batch, "], the batch of predictions ",
                    p.pred.shape.ToString());
    p.n = batch - pad;
  }
  return pairs;
}

// For classification: one label per sample and (batch, classes)
// predictions.
void RequireClassRows(absl::string_view metric, const Pair& p) {
  if (p.label.shape.Size() != p.label.shape[0]) {
    ShapeError(metric, p.label, p.pred, "expected one label per sample");
  }
  if (p.pred.shape.ndim() != 2 || p.pred.shape[1] < 1) {
    ShapeError(metric, p.label, p.pred,
               "expected predictions of shape (batch, classes)");
  }
}

// The class index in a label, which must be a whole number in
// [0, classes).
int64_t ClassOf(absl::string_view metric, float label, int64_t sample,
                int64_t classes) {
  MX_THROW_IF_NOT(label >= 0 && label < classes && label == std::floor(label),
                  metric, ": label ", label, " of sample ", sample,
                  " is not a class index in [0, ", classes, ")");
  return static_cast<int64_t>(label);
}

// Whether a label is an ignored one: a negative whole number, as
// SoftmaxOutput's ignore_label (-1 by default). Accuracy counts such a
// sample as a miss, as MXNet does (it compares the labels as integers).
bool Ignored(float label) { return label < 0 && label == std::floor(label); }

// The index of the largest value of row[0..n), the first one on ties.
int64_t ArgMax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t j = 1; j < n; ++j) {
    if (row[j] > row[best]) best = j;
  }
  return best;
}

// Metrics whose value is sum / count over samples.
class MeanMetric : public EvalMetric {
 public:
  explicit MeanMetric(std::string name) : name_(std::move(name)) {}

  void Update(const std::vector<NDArray>& labels,
              const std::vector<NDArray>& preds, int pad) override {
    std::vector<Pair> pairs = ToHost(name_, labels, preds, pad);
    // Check every pair before counting any, so a bad update changes nothing.
    for (const Pair& p : pairs) Check(p);
    for (const Pair& p : pairs) {
      sum_ += Sum(p);
      count_ += p.n;
    }
  }

  void Reset() override {
    sum_ = 0;
    count_ = 0;
  }

  std::vector<std::pair<std::string, double>> Get() const override {
    return {{name_, count_ == 0 ? kNaN : Finish(sum_ / count_)}};
  }

 protected:
  // Throws mx::Error for a pair this metric cannot use.
  virtual void Check(const Pair& p) const = 0;
  // The sum of the metric over the first p.n samples.
  virtual double Sum(const Pair& p) const = 0;
  // Maps the mean to the value reported.
  virtual double Finish(double mean) const { return mean; }

  const std::string name_;

 private:
  double sum_ = 0;
  int64_t count_ = 0;
};

class Accuracy : public MeanMetric {
 public:
  Accuracy() : MeanMetric("accuracy") {}

 protected:
  // Predictions of the label's shape are class indices already.
  static bool PredictsIndices(const Pair& p) {
    return p.pred.shape == p.label.shape;
  }
  void Check(const Pair& p) const override {
    if (PredictsIndices(p)) return;
    RequireClassRows(name_, p);
    for (int64_t i = 0; i < p.n; ++i) {
      if (!Ignored(p.label.v[i])) ClassOf(name_, p.label.v[i], i, p.pred.shape[1]);
    }
  }
  double Sum(const Pair& p) const override {
    int64_t correct = 0;
    if (PredictsIndices(p)) {
      if (p.n == 0) return 0;
      // As MXNet, which compares both as integers.
      const int64_t per_sample = p.label.shape.Size() / p.label.shape[0];
      for (int64_t i = 0; i < p.n * per_sample; ++i) {
        correct += std::trunc(p.pred.v[i]) == std::trunc(p.label.v[i]);
      }
      return static_cast<double>(correct) / per_sample;
    }
    const int64_t classes = p.pred.shape[1];
    for (int64_t i = 0; i < p.n; ++i) {
      correct += !Ignored(p.label.v[i]) &&
                 ArgMax(&p.pred.v[i * classes], classes) == static_cast<int64_t>(p.label.v[i]);
    }
    return static_cast<double>(correct);
  }
};

class TopKAccuracy : public MeanMetric {
 public:
  explicit TopKAccuracy(int k)
      : MeanMetric(absl::StrCat("top_k_accuracy_", k)), k_(k) {}

 protected:
  void Check(const Pair& p) const override {
    RequireClassRows(name_, p);
    for (int64_t i = 0; i < p.n; ++i) {
      if (!Ignored(p.label.v[i])) ClassOf(name_, p.label.v[i], i, p.pred.shape[1]);
    }
  }
  double Sum(const Pair& p) const override {
    const int64_t classes = p.pred.shape[1];
    int64_t correct = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      if (Ignored(p.label.v[i])) continue;  // a miss
      const float* row = &p.pred.v[i * classes];
      const float score = row[static_cast<int64_t>(p.label.v[i])];
      int64_t higher = 0;
      for (int64_t j = 0; j < classes; ++j) higher += row[j] > score;
      correct += higher < k_;
    }
    return static_cast<double>(correct);
  }

 private:
  const int k_;
};

class CrossEntropy : public MeanMetric {
 public:
  CrossEntropy() : MeanMetric("cross-entropy") {}

 protected:
  static constexpr double kEps = 1e-12;  // MXNet's guard against log(0)

  void Check(const Pair& p) const override {
    RequireClassRows(name_, p);
    for (int64_t i = 0; i < p.n; ++i) {
      ClassOf(name_, p.label.v[i], i, p.pred.shape[1]);
    }
  }
  double Sum(const Pair& p) const override {
    const int64_t classes = p.pred.shape[1];
    double sum = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      const double prob =
          p.pred.v[i * classes + static_cast<int64_t>(p.label.v[i])];
      sum -= std::log(prob + kEps);
    }
    return sum;
  }
};

// mse, mae and rmse: labels and predictions hold the same number of values
// per sample, in any shape ((batch,) and (batch, 1) mix).
class Regression : public MeanMetric {
 public:
  enum Kind { kMse, kMae, kRmse };
  explicit Regression(Kind kind)
      : MeanMetric(kind == kMse   ? "mse"
                   : kind == kMae ? "mae"
                                  : "rmse"),
        kind_(kind) {}

 protected:
  void Check(const Pair& p) const override {
    if (p.label.v.size() != p.pred.v.size()) {
      ShapeError(name_, p.label, p.pred,
                 "expected as many labels as predictions");
    }
  }
  double Sum(const Pair& p) const override {
    if (p.pred.shape[0] == 0) return 0;
    const int64_t per_sample = p.pred.shape.Size() / p.pred.shape[0];
    double sum = 0;
    for (int64_t i = 0; i < p.n * per_sample; ++i) {
      const double d = static_cast<double>(p.label.v[i]) - p.pred.v[i];
      sum += kind_ == kMae ? std::abs(d) : d * d;
    }
    return sum / per_sample;
  }
  double Finish(double mean) const override {
    return kind_ == kRmse ? std::sqrt(mean) : mean;
  }

 private:
  const Kind kind_;
};

class F1 : public EvalMetric {
 public:
  void Update(const std::vector<NDArray>& labels,
              const std::vector<NDArray>& preds, int pad) override {
    std::vector<Pair> pairs = ToHost("f1", labels, preds, pad);
    for (const Pair& p : pairs) Check(p);
    for (const Pair& p : pairs) Count(p);
  }

  void Reset() override { tp_ = fp_ = fn_ = count_ = 0; }

  std::vector<std::pair<std::string, double>> Get() const override {
    if (count_ == 0) return {{"f1", kNaN}};
    const double precision =
        tp_ + fp_ > 0 ? static_cast<double>(tp_) / (tp_ + fp_) : 0;
    const double recall =
        tp_ + fn_ > 0 ? static_cast<double>(tp_) / (tp_ + fn_) : 0;
    const double f1 = precision + recall > 0
                          ? 2 * precision * recall / (precision + recall)
                          : 0;
    return {{"f1", f1}};
  }

 private:
  // (batch, 2) scores, or one probability of class 1 per sample.
  static bool OneProbability(const Pair& p) {
    return p.pred.shape.Size() == p.pred.shape[0];
  }
  void Check(const Pair& p) const {
    if (p.label.shape.Size() != p.label.shape[0]) {
      ShapeError("f1", p.label, p.pred, "expected one label per sample");
    }
    if (!OneProbability(p) &&
        (p.pred.shape.ndim() != 2 || p.pred.shape[1] != 2)) {
      ShapeError("f1", p.label, p.pred,
                 "binary F1 expects predictions of shape (batch, 2) or one "
                 "probability per sample");
    }
    for (int64_t i = 0; i < p.n; ++i) ClassOf("f1", p.label.v[i], i, 2);
  }
  void Count(const Pair& p) {
    for (int64_t i = 0; i < p.n; ++i) {
      const bool predicted = OneProbability(p)
                                 ? p.pred.v[i] > 0.5f
                                 : p.pred.v[2 * i + 1] > p.pred.v[2 * i];
      const bool actual = p.label.v[i] == 1.0f;
      tp_ += predicted && actual;
      fp_ += predicted && !actual;
      fn_ += !predicted && actual;
    }
    count_ += p.n;
  }

  int64_t tp_ = 0, fp_ = 0, fn_ = 0, count_ = 0;
};

class Composite : public EvalMetric {
 public:
  explicit Composite(std::vector<std::unique_ptr<EvalMetric>> metrics)
      : metrics_(std::move(metrics)) {}

  void Update(const std::vector<NDArray>& labels,
              const std::vector<NDArray>& preds, int pad) override {
    for (auto& m : metrics_) m->Update(labels, preds, pad);
  }
  void Reset() override {
    for (auto& m : metrics_) m->Reset();
  }
  std::vector<std::pair<std::string, double>> Get() const override {
    std::vector<std::pair<std::string, double>> values;
    for (const auto& m : metrics_) {
      for (auto& v : m->Get()) values.push_back(std::move(v));
    }
    return values;
  }

 private:
  std::vector<std::unique_ptr<EvalMetric>> metrics_;
};

absl::StatusOr<std::unique_ptr<EvalMetric>> CreateOne(absl::string_view name,
                                                      int top_k) {
  // MXNet's names and their registered aliases.
  if (name == "accuracy" || name == "acc") return std::make_unique<Accuracy>();
  if (name == "top_k_accuracy" || name == "top_k_acc") {
    if (top_k < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("top_k_accuracy: k must be at least 1, not ", top_k));
    }
    return std::make_unique<TopKAccuracy>(top_k);
  }
  if (name == "ce" || name == "cross-entropy") {
    return std::make_unique<CrossEntropy>();
  }
  if (name == "mse") return std::make_unique<Regression>(Regression::kMse);
  if (name == "mae") return std::make_unique<Regression>(Regression::kMae);
  if (name == "rmse") return std::make_unique<Regression>(Regression::kRmse);
  if (name == "f1") return std::make_unique<F1>();
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown metric '", name,
      "' (known: accuracy, top_k_accuracy, ce, mse, mae, rmse, f1, and "
      "comma-separated lists of them)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<EvalMetric>> CreateMetric(
    const std::string& name, int top_k) {
  std::vector<absl::string_view> parts = absl::StrSplit(name, ',');
  if (parts.size() == 1)
    return CreateOne(absl::StripAsciiWhitespace(name), top_k);
  std::vector<std::unique_ptr<EvalMetric>> metrics;
  for (absl::string_view part : parts) {
    part = absl::StripAsciiWhitespace(part);
    if (part.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric list '", name, "' has an empty name"));
    }
    MX_ASSIGN_OR_RETURN(std::unique_ptr<EvalMetric> metric,
                        CreateOne(part, top_k));
    metrics.push_back(std::move(metric));
  }
  return std::unique_ptr<EvalMetric>(new Composite(std::move(metrics)));
}

}  // namespace mx
