// Tests of the optimizers and learning-rate schedulers (kvstore/optimizer.h).
//
// One table of cases drives the update tests: every optimizer runs several
// steps on two parameters (a weight and a bias) with random gradients, and
// its weights and states are compared with a plain double-precision
// implementation of the rule written out in the header. The schedulers are
// compared with a line-by-line port of MXNet's stateful Python classes at
// every update count. Then: multipliers, options() round trips, saving and
// loading states (bit-identical continuation), and every error.
#include "kvstore/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/gpu_skip.h"
#include "ndarray/ndarray.h"

namespace mx {
namespace {

using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using Options = Optimizer::Options;

// ---- Helpers.

std::vector<float> RandomVector(int64_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

std::unique_ptr<Optimizer> MustCreate(const std::string& name,
                                      const Options& options) {
  absl::StatusOr<std::unique_ptr<Optimizer>> opt =
      Optimizer::Create(name, options);
  EXPECT_TRUE(opt.ok()) << name << ": " << opt.status();
  return opt.ok() ? std::move(*opt) : nullptr;
}

// The status of the mx::Error thrown by f, or OK when it throws nothing.
absl::Status StatusOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.status();
  }
  return absl::OkStatus();
}

void ExpectStatus(const absl::Status& s, absl::StatusCode code,
                  const std::vector<std::string>& parts) {
  EXPECT_EQ(s.code(), code) << s;
  for (const std::string& part : parts) {
    EXPECT_THAT(std::string(s.message()), HasSubstr(part)) << s;
  }
}

void ExpectCreateError(const std::string& name, const Options& options,
                       const std::vector<std::string>& parts) {
  SCOPED_TRACE(name);
  ExpectStatus(Optimizer::Create(name, options).status(),
               absl::StatusCode::kInvalidArgument, parts);
}

double OptionOr(const Options& options, const std::string& key,
                double default_value) {
  auto it = options.find(key);
  if (it == options.end()) return default_value;
  double v = 0;
  EXPECT_TRUE(absl::SimpleAtod(it->second, &v)) << key;
  return v;
}

// The state arrays of parameter `index`, read back through SaveStates.
std::vector<std::vector<float>> StatesOf(const Optimizer& opt, int index) {
  absl::StatusOr<std::string> bytes = opt.SaveStates();
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  if (!bytes.ok()) return {};
  absl::StatusOr<NamedArrays> arrays = DeserializeArrays(*bytes);
  EXPECT_TRUE(arrays.ok()) << arrays.status();
  std::vector<std::vector<float>> out;
  const std::string prefix = absl::StrCat("param:", index, ":state:");
  for (const auto& [name, array] : *arrays) {
    if (name.rfind(prefix, 0) == 0) out.push_back(array.ToVector());
  }
  return out;
}

// ---- Reference rules, in double precision, from the header's formulas.

double Clip(double x, double c) { return c < 0 ? x : std::clamp(x, -c, c); }

struct RefParam {
  std::vector<double> w;
  std::vector<std::vector<double>> s;  // states
  int64_t t = 0;
};

// Hyper-parameters of one optimizer from its options, with the header's
// defaults.
struct Hyper {
  explicit Hyper(const Options& o)
      : rescale(OptionOr(o, "rescale_grad", 1)),
        clip(OptionOr(o, "clip_gradient", -1)),
        momentum(OptionOr(o, "momentum", 0)),
        beta1(OptionOr(o, "beta1", 0.9)),
        beta2(OptionOr(o, "beta2", 0.999)),
        gamma1(OptionOr(o, "gamma1", 0.9)),
        rho(OptionOr(o, "rho", 0.9)),
        clip_weights(OptionOr(o, "clip_weights", -1)),
        options(o) {}
  double Epsilon(double default_value) const {
    return OptionOr(options, "epsilon", default_value);
  }
  double rescale, clip, momentum, beta1, beta2, gamma1, rho, clip_weights;
  Options options;
};

// One step of `name` on p with the effective lr and wd of the parameter.
void ReferenceStep(const std::string& name, const Hyper& h, double lr,
                   double wd, const std::vector<float>& grad, RefParam& p) {
  const size_t n = p.w.size();
  ++p.t;
  auto states = [&](size_t k) {
    while (p.s.size() < k) p.s.emplace_back(n, 0.0);
  };
  for (size_t i = 0; i < n; ++i) {
    double& w = p.w[i];
    const double g = Clip(h.rescale * grad[i], h.clip);
    if (name == "sgd" || (name == "nag" && h.momentum == 0)) {
      if (h.momentum == 0) {
        w -= lr * (g + wd * w);
      } else {
        states(1);
        double& m = p.s[0][i];
        m = h.momentum * m - lr * (g + wd * w);
        w += m;
      }
    } else if (name == "nag") {
      states(1);
      double& m = p.s[0][i];
      const double gw = g + wd * w;
      m = h.momentum * m + gw;
      w -= lr * (gw + h.momentum * m);
    } else if (name == "adam") {
      states(2);
      double& m = p.s[0][i];
      double& v = p.s[1][i];
      const double gr = Clip(h.rescale * grad[i] + wd * w, h.clip);
      m = h.beta1 * m + (1 - h.beta1) * gr;
      v = h.beta2 * v + (1 - h.beta2) * gr * gr;
      const double lr_t = lr * std::sqrt(1 - std::pow(h.beta2, p.t)) /
                          (1 - std::pow(h.beta1, p.t));
      w -= lr_t * m / (std::sqrt(v) + h.Epsilon(1e-8));
    } else if (name == "adagrad") {
      states(1);
      double& hist = p.s[0][i];
      hist += g * g;
      w -= lr *
           (g / std::sqrt(hist + OptionOr(h.options, "eps", 1e-7)) + wd * w);
    } else if (name == "rmsprop") {
      states(1);
      double& ms = p.s[0][i];
      const double gr = Clip(h.rescale * grad[i] + wd * w, h.clip);
      ms = (1 - h.gamma1) * gr * gr + h.gamma1 * ms;
      w = Clip(w - lr * gr / std::sqrt(ms + h.Epsilon(1e-8)), h.clip_weights);
    } else if (name == "adadelta") {
      states(2);
      double& acc_g = p.s[0][i];
      double& acc_d = p.s[1][i];
      const double eps = h.Epsilon(1e-5);
      acc_g = h.rho * acc_g + (1 - h.rho) * g * g;
      const double d = std::sqrt(acc_d + eps) / std::sqrt(acc_g + eps) * g;
      acc_d = h.rho * acc_d + (1 - h.rho) * d * d;
      w -= d + wd * w;
    } else {
      ADD_FAILURE() << "no reference for " << name;
    }
  }
}

void ExpectNear(const std::vector<float>& got, const std::vector<double>& want,
                double rel, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], rel * std::max(1.0, std::abs(want[i])))
        << what << " element " << i;
  }
}

// ---- The table of update cases.

struct Case {
  std::string optimizer;
  Options options;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return absl::StrCat(info.param.optimizer, "_", info.index);
}

// Gradients are drawn from [-2, 2] so that clip_gradient (with rescale_grad)
// clips some elements and not others.
const Case kCases[] = {
    {"sgd", {{"learning_rate", "0.1"}}},
    {"sgd",
     {{"learning_rate", "0.1"}, {"wd", "0.1"}, {"clip_gradient", "0.3"}}},
    {"sgd", {{"learning_rate", "0.1"}, {"momentum", "0.9"}}},
    {"sgd",
     {{"learning_rate", "0.05"},
      {"momentum", "0.9"},
      {"wd", "0.01"},
      {"rescale_grad", "0.5"},
      {"clip_gradient", "0.7"}}},
    {"nag", {{"learning_rate", "0.1"}, {"wd", "0.1"}}},
    {"nag", {{"learning_rate", "0.1"}, {"momentum", "0.9"}}},
    {"nag",
     {{"momentum", "0.5"},
      {"wd", "0.02"},
      {"rescale_grad", "0.25"},
      {"clip_gradient", "0.4"}}},
    {"adam", {}},
    {"adam",
     {{"learning_rate", "0.01"},
      {"beta1", "0.8"},
      {"beta2", "0.99"},
      {"epsilon", "1e-6"},
      {"wd", "0.01"},
      {"rescale_grad", "0.5"},
      {"clip_gradient", "0.6"}}},
    {"adagrad", {{"learning_rate", "0.1"}}},
    {"adagrad",
     {{"learning_rate", "0.1"},
      {"eps", "1e-3"},
      {"wd", "0.05"},
      {"rescale_grad", "2"},
      {"clip_gradient", "1.5"}}},
    {"rmsprop", {{"learning_rate", "0.01"}}},
    {"rmsprop",
     {{"learning_rate", "0.05"},
      {"gamma1", "0.8"},
      {"epsilon", "1e-4"},
      {"wd", "0.03"},
      {"rescale_grad", "0.5"},
      {"clip_gradient", "0.5"},
      {"clip_weights", "0.9"},
      {"centered", "false"}}},
    {"adadelta", {}},
    {"adadelta",
     {{"rho", "0.8"},
      {"epsilon", "1e-4"},
      {"wd", "0.01"},
      {"rescale_grad", "0.5"},
      {"clip_gradient", "0.5"}}},
};

class UpdateTest : public ::testing::TestWithParam<Case> {};

// Two parameters: "fc_weight" (decayed) and "fc_bias" (wd_mult 0 by
// default), updated in an interleaved order so that their counts differ.
TEST_P(UpdateTest, MatchesDoublePrecisionReference) {
  const Case& c = GetParam();
  std::unique_ptr<Optimizer> opt = MustCreate(c.optimizer, c.options);
  ASSERT_NE(opt, nullptr);
  opt->SetParamNames({{0, "fc_weight"}, {1, "fc_bias"}});
  const Hyper h(c.options);
  const double default_lr =
      (c.optimizer == "adam" || c.optimizer == "rmsprop") ? 0.001 : 0.01;
  const double lr = OptionOr(c.options, "learning_rate", default_lr);
  const double wd = OptionOr(c.options, "wd", 0);
  const Shape shapes[2] = {{3, 5}, {5}};
  NDArray weights[2];
  RefParam ref[2];
  for (int p = 0; p < 2; ++p) {
    std::vector<float> init = RandomVector(shapes[p].Size(), 10 + p, -1, 1);
    weights[p] = FromVector(init, shapes[p]);
    ref[p].w.assign(init.begin(), init.end());
  }
  const int order[] = {0, 1, 0, 0, 1, 0, 1, 1, 0};
  for (size_t step = 0; step < std::size(order); ++step) {
    const int p = order[step];
    std::vector<float> g = RandomVector(shapes[p].Size(), 100 + step, -2, 2);
    opt->Update(p, weights[p], FromVector(g, shapes[p]));
    ReferenceStep(c.optimizer, h, lr, p == 0 ? wd : 0.0, g, ref[p]);
    ExpectNear(weights[p].ToVector(), ref[p].w, 2e-5,
               absl::StrCat("weight ", p, " after step ", step));
  }
  for (int p = 0; p < 2; ++p) {
    std::vector<std::vector<float>> states = StatesOf(*opt, p);
    ASSERT_EQ(states.size(), ref[p].s.size()) << "parameter " << p;
    for (size_t k = 0; k < states.size(); ++k) {
      ExpectNear(states[k], ref[p].s[k], 2e-5,
                 absl::StrCat("state ", k, " of parameter ", p));
    }
  }
  EXPECT_EQ(opt->num_update(), 5);  // parameter 0 was updated 5 times
}

INSTANTIATE_TEST_SUITE_P(AllOptimizers, UpdateTest, ::testing::ValuesIn(kCases),
                         CaseName);

// The same as the reference, but a regression guard that the update really
// changes the weight by the documented amount in the simplest case.
TEST(Sgd, OneStepIsWeightMinusLrTimesGradient) {
  std::unique_ptr<Optimizer> opt =
      MustCreate("sgd", {{"learning_rate", "0.5"}});
  NDArray w = FromVector({1, 2, 3});
  opt->Update(0, w, FromVector({2, -2, 0}));
  EXPECT_THAT(w.ToVector(), ElementsAreArray({0.0f, 3.0f, 3.0f}));
}

TEST(Sgd, MomentumAccumulatesAcrossSteps) {
  std::unique_ptr<Optimizer> opt =
      MustCreate("sgd", {{"learning_rate", "1"}, {"momentum", "0.5"}});
  NDArray w = FromVector({0});
  for (int i = 0; i < 3; ++i) opt->Update(0, w, FromVector({1}));
  // m: -1, -1.5, -1.75; w: -1, -2.5, -4.25.
  EXPECT_THAT(w.ToVector(), ElementsAreArray({-4.25f}));
}

TEST(Adam, FirstStepMovesEveryWeightByAboutTheLearningRate) {
  // With bias correction the first step is lr * g / (|g| + eps).
  std::unique_ptr<Optimizer> opt =
      MustCreate("adam", {{"learning_rate", "0.1"}});
  NDArray w = Zeros({3});
  opt->Update(0, w, FromVector({5, -0.01f, 300}));
  std::vector<float> got = w.ToVector();
  EXPECT_NEAR(got[0], -0.1, 1e-6);
  EXPECT_NEAR(got[1], 0.1, 1e-4);
  EXPECT_NEAR(got[2], -0.1, 1e-6);
}

TEST(AdaDelta, IgnoresTheLearningRateAsMxnet) {
  std::unique_ptr<Optimizer> a = MustCreate("adadelta", {});
  std::unique_ptr<Optimizer> b =
      MustCreate("adadelta", {{"learning_rate", "5"}});
  NDArray wa = FromVector({1, -1}), wb = FromVector({1, -1});
  a->Update(0, wa, FromVector({0.5f, 2}));
  b->Update(0, wb, FromVector({0.5f, 2}));
  EXPECT_EQ(wa.ToVector(), wb.ToVector());
}

TEST(Update, OrdersWithTheOperationsAroundItAndWorksOnViews) {
  std::unique_ptr<Optimizer> opt = MustCreate("sgd", {{"learning_rate", "1"}});
  NDArray all = Ones({4, 2});
  NDArray rows = all.Slice(1, 3);
  NDArray grad = Ones({2, 2}) * 2.0f;  // produced asynchronously
  opt->Update(7, rows, grad);
  all += 1.0f;  // must see the update
  EXPECT_THAT(all.ToVector(), ElementsAreArray({2.0f, 2.0f, 0.0f, 0.0f, 0.0f,
                                                0.0f, 2.0f, 2.0f}));
}

TEST(Update, LargeArrayMatchesReference) {
  // Many elements, to exercise the vectorized loop (and its tail), on one
  // thread and split over the CPU pool (an odd count: uneven ranges).
  const Options options = {{"learning_rate", "0.01"},
                           {"momentum", "0.9"},
                           {"wd", "0.001"},
                           {"clip_gradient", "1"}};
  std::vector<float> results[2];
  for (bool split : {false, true}) {
    SCOPED_TRACE(split ? "split" : "one thread");
    std::unique_ptr<Optimizer> opt = MustCreate("sgd", options);
    opt->SplitLargeUpdates(split);
    const int64_t n = 100003;
    std::vector<float> init = RandomVector(n, 1, -1, 1);
    NDArray w = FromVector(init);
    RefParam ref;
    ref.w.assign(init.begin(), init.end());
    for (int step = 0; step < 3; ++step) {
      std::vector<float> g = RandomVector(n, 50 + step, -3, 3);
      opt->Update(0, w, FromVector(g));
      ReferenceStep("sgd", Hyper(options), 0.01, 0.001, g, ref);
    }
    results[split] = w.ToVector();
    ExpectNear(results[split], ref.w, 2e-5, "large weight");
  }
  EXPECT_EQ(results[0], results[1]) << "splitting the update changed its result";
}

// ---- Learning rate and weight decay multipliers.

// With a zero gradient, SGD gives w * (1 - lr * wd_effective).
float DecayFactorAfterOneStep(Optimizer& opt, int index) {
  NDArray w = FromVector({1.0f});
  opt.Update(index, w, FromVector({0.0f}));
  return w.ToVector()[0];
}

TEST(Multipliers, WdMultDefaultsToZeroForNamesNotEndingInWeightOrGamma) {
  std::unique_ptr<Optimizer> opt =
      MustCreate("sgd", {{"learning_rate", "0.5"}, {"wd", "0.2"}});
  opt->SetParamNames({{0, "fc1_weight"},
                      {1, "fc1_bias"},
                      {2, "bn_gamma"},
                      {3, "bn_beta"},
                      {4, "embed_weight_scale"}});
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 0), 0.9f);
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 1), 1.0f);
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 2), 0.9f);
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 3), 1.0f);
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 4), 1.0f);
  // A parameter without a name is decayed (MXNet's multiplier 1.0).
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 9), 0.9f);
}

TEST(Multipliers, ExplicitWdMultOverridesTheDefaultAndLrMultScales) {
  std::unique_ptr<Optimizer> opt =
      MustCreate("sgd", {{"learning_rate", "0.5"}, {"wd", "0.2"}});
  opt->SetParamNames({{0, "fc1_weight"}, {1, "fc1_bias"}});
  opt->SetWdMult({{"fc1_bias", 2.0f}, {"fc1_weight", 0.5f}});
  opt->SetLrMult({{"fc1_weight", 0.1f}});
  EXPECT_FLOAT_EQ(opt->LearningRate(0), 0.05f);
  EXPECT_FLOAT_EQ(opt->LearningRate(1), 0.5f);
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 0), 1.0f - 0.05f * 0.1f);
  EXPECT_FLOAT_EQ(DecayFactorAfterOneStep(*opt, 1), 1.0f - 0.5f * 0.4f);
}

TEST(Multipliers, LrMultAppliesToTheGradientStepOfEveryOptimizer) {
  for (const std::string name : {"sgd", "nag", "adam", "adagrad", "rmsprop"}) {
    SCOPED_TRACE(name);
    std::unique_ptr<Optimizer> plain =
        MustCreate(name, {{"learning_rate", "0.02"}});
    std::unique_ptr<Optimizer> halved =
        MustCreate(name, {{"learning_rate", "0.04"}});
    halved->SetParamNames({{0, "w"}});
    halved->SetLrMult({{"w", 0.5f}});
    NDArray a = FromVector({1, 2}), b = FromVector({1, 2});
    plain->Update(0, a, FromVector({0.3f, -0.7f}));
    halved->Update(0, b, FromVector({0.3f, -0.7f}));
    EXPECT_EQ(a.ToVector(), b.ToVector());
  }
}

// ---- Schedulers.

// MXNet's Python classes, ported line by line (stateful, called in order).
class MxnetScheduler {
 public:
  virtual ~MxnetScheduler() = default;
  virtual double operator()(int64_t n) = 0;

 protected:
  MxnetScheduler(double base_lr, int64_t warmup_steps, double warmup_begin_lr,
                 bool constant)
      : base_lr(base_lr),
        warmup_steps(warmup_steps),
        warmup_final_lr(base_lr),
        warmup_begin_lr(warmup_begin_lr),
        constant(constant) {}
  double get_warmup_lr(int64_t n) const {
    if (constant) return warmup_begin_lr;
    const double increase = (warmup_final_lr - warmup_begin_lr) *
                            static_cast<double>(n) /
                            static_cast<double>(warmup_steps);
    return warmup_begin_lr + increase;
  }
  double base_lr;
  int64_t warmup_steps;
  double warmup_final_lr, warmup_begin_lr;
  bool constant;
};

class MxnetFactor : public MxnetScheduler {
 public:
  MxnetFactor(int64_t step, double factor, double stop_factor_lr, double base,
              int64_t warmup_steps = 0, double warmup_begin_lr = 0,
              bool constant = false)
      : MxnetScheduler(base, warmup_steps, warmup_begin_lr, constant),
        step(step),
        factor(factor),
        stop_factor_lr(stop_factor_lr) {}
  double operator()(int64_t n) override {
    if (n < warmup_steps) return get_warmup_lr(n);
    while (n > count + step) {
      count += step;
      base_lr *= factor;
      if (base_lr < stop_factor_lr) base_lr = stop_factor_lr;
    }
    return base_lr;
  }

 private:
  int64_t step;
  double factor, stop_factor_lr;
  int64_t count = 0;
};

class MxnetMultiFactor : public MxnetScheduler {
 public:
  MxnetMultiFactor(std::vector<int64_t> step, double factor, double base,
                   int64_t warmup_steps = 0, double warmup_begin_lr = 0)
      : MxnetScheduler(base, warmup_steps, warmup_begin_lr, false),
        step(std::move(step)),
        factor(factor) {}
  double operator()(int64_t n) override {
    if (n < warmup_steps) return get_warmup_lr(n);
    while (cur_step_ind <= step.size() - 1) {
      if (n > step[cur_step_ind]) {
        ++cur_step_ind;
        base_lr *= factor;
      } else {
        return base_lr;
      }
    }
    return base_lr;
  }

 private:
  std::vector<int64_t> step;
  double factor;
  size_t cur_step_ind = 0;
};

class MxnetCosine : public MxnetScheduler {
 public:
  MxnetCosine(int64_t max_update, double base, double final_lr,
              int64_t warmup_steps = 0, double warmup_begin_lr = 0)
      : MxnetScheduler(base, warmup_steps, warmup_begin_lr, false),
        base_lr_orig(base),
        max_update(max_update),
        final_lr(final_lr),
        max_steps(max_update - warmup_steps) {}
  double operator()(int64_t n) override {
    if (n < warmup_steps) return get_warmup_lr(n);
    if (n <= max_update) {
      base_lr = final_lr +
                (base_lr_orig - final_lr) *
                    (1 + std::cos(M_PI * static_cast<double>(n - warmup_steps) /
                                  static_cast<double>(max_steps))) /
                    2;
    }
    return base_lr;
  }

 private:
  double base_lr_orig;
  int64_t max_update;
  double final_lr;
  int64_t max_steps;
};

std::unique_ptr<LRScheduler> MustCreateScheduler(
    const std::string& name, float base_lr,
    const std::map<std::string, std::string>& options) {
  absl::StatusOr<std::unique_ptr<LRScheduler>> s =
      CreateLRScheduler(name, base_lr, options);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

void ExpectMatchesMxnet(const LRScheduler& ours, MxnetScheduler& theirs,
                        int64_t last) {
  for (int64_t n = 0; n <= last; ++n) {
    ASSERT_EQ(ours.LearningRate(n), static_cast<float>(theirs(n)))
        << "num_update " << n;
  }
}

TEST(LRScheduler, FactorMatchesMxnetAtEveryUpdate) {
  auto s = MustCreateScheduler(
      "factor", 0.1f,
      {{"step", "7"}, {"factor", "0.6"}, {"stop_factor_lr", "1e-3"}});
  ASSERT_NE(s, nullptr);
  MxnetFactor ref(7, 0.6, 1e-3, 0.1f);
  ExpectMatchesMxnet(*s, ref, 200);
}

TEST(LRScheduler, FactorAtKeySteps) {
  auto s =
      MustCreateScheduler("factor", 1.0f, {{"step", "10"}, {"factor", "0.5"}});
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->LearningRate(0), 1.0f);
  EXPECT_EQ(s->LearningRate(10), 1.0f);
  EXPECT_EQ(s->LearningRate(11), 0.5f);
  EXPECT_EQ(s->LearningRate(20), 0.5f);
  EXPECT_EQ(s->LearningRate(21), 0.25f);
  // The default stop_factor_lr (1e-8) is a floor, reached without a long loop.
  EXPECT_FLOAT_EQ(s->LearningRate(int64_t{1} << 50), 1e-8f);
}

// The scheduler carries its products on from its last answer: a count
// smaller than the last (a resumed run) starts again, with the same bits.
TEST(LRScheduler, FactorAnswersAnyOrderOfCountsAlike) {
  const std::map<std::string, std::string> options = {
      {"step", "3"}, {"factor", "0.9"}, {"stop_factor_lr", "1e-5"}};
  auto ordered = MustCreateScheduler("factor", 0.5f, options);
  std::vector<float> want;
  for (int64_t n = 0; n < 400; ++n) want.push_back(ordered->LearningRate(n));
  auto mixed = MustCreateScheduler("factor", 0.5f, options);
  for (int64_t n : {300, 7, 399, 0, 150, 151, 40}) {
    EXPECT_EQ(mixed->LearningRate(n), want[n]) << n;
  }
}

TEST(LRScheduler, FactorOfOneNeverChangesAndZeroFloorsAtStop) {
  auto one = MustCreateScheduler("factor", 0.3f, {{"step", "1"}});
  EXPECT_EQ(one->LearningRate(int64_t{1} << 60), 0.3f);
  auto zero = MustCreateScheduler(
      "factor", 0.3f,
      {{"step", "1"}, {"factor", "0"}, {"stop_factor_lr", "0"}});
  EXPECT_EQ(zero->LearningRate(1), 0.3f);
  EXPECT_EQ(zero->LearningRate(2), 0.0f);
  EXPECT_EQ(zero->LearningRate(int64_t{1} << 60), 0.0f);
}

TEST(LRScheduler, FactorWithLinearWarmupMatchesMxnet) {
  auto s = MustCreateScheduler("factor", 1.0f,
                               {{"step", "10"},
                                {"factor", "0.5"},
                                {"warmup_steps", "4"},
                                {"warmup_begin_lr", "0.2"}});
  ASSERT_NE(s, nullptr);
  EXPECT_FLOAT_EQ(s->LearningRate(0), 0.2f);
  EXPECT_FLOAT_EQ(s->LearningRate(2), 0.6f);
  EXPECT_FLOAT_EQ(s->LearningRate(4), 1.0f);
  EXPECT_FLOAT_EQ(s->LearningRate(11), 0.5f);  // steps count from update 0
  MxnetFactor ref(10, 0.5, 1e-8, 1.0, 4, 0.2);
  ExpectMatchesMxnet(*s, ref, 100);
}

TEST(LRScheduler, ConstantWarmupHoldsTheBeginRate) {
  auto s = MustCreateScheduler("factor", 1.0f,
                               {{"step", "100"},
                                {"warmup_steps", "5"},
                                {"warmup_begin_lr", "0.25"},
                                {"warmup_mode", "constant"}});
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->LearningRate(0), 0.25f);
  EXPECT_EQ(s->LearningRate(4), 0.25f);
  EXPECT_EQ(s->LearningRate(5), 1.0f);
}

TEST(LRScheduler, MultiFactorMatchesMxnetAtEveryUpdate) {
  auto s = MustCreateScheduler("multifactor", 1.0f,
                               {{"step", "5,10,20"}, {"factor", "0.1"}});
  ASSERT_NE(s, nullptr);
  EXPECT_FLOAT_EQ(s->LearningRate(5), 1.0f);
  EXPECT_FLOAT_EQ(s->LearningRate(6), 0.1f);
  EXPECT_FLOAT_EQ(s->LearningRate(10), 0.1f);
  EXPECT_FLOAT_EQ(s->LearningRate(11), 0.01f);
  EXPECT_FLOAT_EQ(s->LearningRate(21), 0.001f);
  EXPECT_FLOAT_EQ(s->LearningRate(100000), 0.001f);
  MxnetMultiFactor ref({5, 10, 20}, 0.1, 1.0);
  ExpectMatchesMxnet(*s, ref, 60);

  auto warm = MustCreateScheduler(
      "multifactor", 0.5f,
      {{"step", "8,9"}, {"factor", "0.5"}, {"warmup_steps", "6"}});
  MxnetMultiFactor warm_ref({8, 9}, 0.5, 0.5f, 6, 0);
  ExpectMatchesMxnet(*warm, warm_ref, 30);
}

TEST(LRScheduler, CosineAtKeyStepsAndMatchesMxnet) {
  auto s = MustCreateScheduler("cosine", 1.0f,
                               {{"max_update", "100"}, {"final_lr", "0.1"}});
  ASSERT_NE(s, nullptr);
  EXPECT_FLOAT_EQ(s->LearningRate(0), 1.0f);
  EXPECT_FLOAT_EQ(s->LearningRate(50), 0.55f);
  EXPECT_FLOAT_EQ(s->LearningRate(100), 0.1f);
  EXPECT_FLOAT_EQ(s->LearningRate(150), 0.1f);
  MxnetCosine ref(100, 1.0, 0.1);
  ExpectMatchesMxnet(*s, ref, 130);

  auto warm = MustCreateScheduler(
      "cosine", 1.0f, {{"max_update", "110"}, {"warmup_steps", "10"}});
  ASSERT_NE(warm, nullptr);
  EXPECT_FLOAT_EQ(warm->LearningRate(0), 0.0f);
  EXPECT_FLOAT_EQ(warm->LearningRate(5), 0.5f);
  EXPECT_FLOAT_EQ(warm->LearningRate(10), 1.0f);
  EXPECT_FLOAT_EQ(warm->LearningRate(60), 0.5f);
  EXPECT_FLOAT_EQ(warm->LearningRate(110), 0.0f);
  MxnetCosine warm_ref(110, 1.0, 0.0, 10, 0.0);
  ExpectMatchesMxnet(*warm, warm_ref, 130);
}

// Config() gives the options that recreate the scheduler.
std::unique_ptr<LRScheduler> Recreate(const LRScheduler& s) {
  std::map<std::string, std::string> config = s.Config();
  std::map<std::string, std::string> options;
  float base_lr = 0;
  for (const auto& [key, value] : config) {
    if (key == "lr_scheduler") continue;
    const std::string option = key.substr(std::string("lr_scheduler.").size());
    if (option == "base_lr") {
      EXPECT_TRUE(absl::SimpleAtof(value, &base_lr));
    } else {
      options[option] = value;
    }
  }
  return MustCreateScheduler(config.at("lr_scheduler"), base_lr, options);
}

TEST(LRScheduler, ConfigRecreatesTheSameSchedule) {
  std::vector<std::unique_ptr<LRScheduler>> schedulers;
  schedulers.push_back(MustCreateScheduler("factor", 0.3f,
                                           {{"step", "3"},
                                            {"factor", "0.7"},
                                            {"stop_factor_lr", "0.01"},
                                            {"warmup_steps", "2"},
                                            {"warmup_begin_lr", "0.1"}}));
  schedulers.push_back(MustCreateScheduler("multifactor", 0.3f,
                                           {{"step", "3,7,8"},
                                            {"factor", "0.3"},
                                            {"warmup_mode", "constant"},
                                            {"warmup_steps", "2"}}));
  schedulers.push_back(MustCreateScheduler(
      "cosine", 0.3f, {{"max_update", "40"}, {"final_lr", "0.05"}}));
  for (const auto& s : schedulers) {
    ASSERT_NE(s, nullptr);
    std::unique_ptr<LRScheduler> copy = Recreate(*s);
    ASSERT_NE(copy, nullptr);
    EXPECT_EQ(copy->Config(), s->Config());
    for (int64_t n = 0; n < 50; ++n) {
      EXPECT_EQ(copy->LearningRate(n), s->LearningRate(n)) << n;
    }
  }
}

TEST(LRScheduler, BadNamesOptionsAndValuesAreInvalidArgument) {
  struct Bad {
    std::string name;
    float base_lr;
    std::map<std::string, std::string> options;
    std::vector<std::string> parts;
  };
  const std::vector<Bad> cases = {
      {"exponential", 1, {}, {"'exponential'", "factor"}},
      {"factor", 1, {}, {"'step'", "required"}},
      {"factor", 1, {{"step", "0"}}, {"'step'", ">= 1"}},
      {"factor", 1, {{"step", "2.5"}}, {"'step'", "integer"}},
      {"factor", 1, {{"step", "2"}, {"factor", "1.5"}}, {"'factor'"}},
      {"factor", 1, {{"step", "2"}, {"factor", "half"}}, {"'factor'", "half"}},
      {"factor",
       1,
       {{"step", "2"}, {"stepsize", "2"}},
       {"'stepsize'", "unknown"}},
      {"factor",
       1,
       {{"step", "2"}, {"warmup_begin_lr", "2"}},
       {"warmup_begin_lr", "base_lr"}},
      {"factor",
       1,
       {{"step", "2"}, {"warmup_steps", "-1"}},
       {"'warmup_steps'"}},
      {"factor", 1, {{"step", "2"}, {"warmup_mode", "cubic"}}, {"'cubic'"}},
      {"multifactor", 1, {{"step", "10,5"}}, {"increasing"}},
      {"multifactor", 1, {{"step", "10,x"}}, {"'x'"}},
      {"multifactor", 1, {{"step", ""}}, {"'step'"}},
      {"cosine", 1, {{"final_lr", "0"}}, {"'max_update'", "required"}},
      {"cosine",
       1,
       {{"max_update", "10"}, {"warmup_steps", "10"}},
       {"max_update", "warmup_steps"}},
  };
  for (const Bad& c : cases) {
    SCOPED_TRACE(c.name);
    ExpectStatus(CreateLRScheduler(c.name, c.base_lr, c.options).status(),
                 absl::StatusCode::kInvalidArgument, c.parts);
  }
}

// ---- The schedule inside an optimizer.

TEST(OptimizerSchedule, EvaluatesTheScheduleAtTheCountAfterEachUpdate) {
  std::unique_ptr<Optimizer> opt =
      MustCreate("sgd", {{"learning_rate", "1"},
                         {"lr_scheduler", "factor"},
                         {"lr_scheduler.step", "2"},
                         {"lr_scheduler.factor", "0.5"}});
  ASSERT_NE(opt, nullptr);
  NDArray w = Zeros({1});
  // Updates 1..6 use num_update 1..6: rates 1, 1, .5, .5, .25, .25.
  const float want[] = {-1, -2, -2.5, -3, -3.25, -3.5};
  for (float expected : want) {
    opt->Update(0, w, FromVector({1}));
    EXPECT_EQ(w.ToVector()[0], expected);
  }
  EXPECT_EQ(opt->num_update(), 6);
}

TEST(OptimizerSchedule, NumUpdateIsTheMaximumOverParameters) {
  std::unique_ptr<Optimizer> opt =
      MustCreate("sgd", {{"learning_rate", "1"},
                         {"lr_scheduler", "multifactor"},
                         {"lr_scheduler.step", "2"},
                         {"lr_scheduler.factor", "0.1"}});
  ASSERT_NE(opt, nullptr);
  NDArray a = Zeros({1}), b = Zeros({1});
  EXPECT_FLOAT_EQ(opt->LearningRate(0), 1.0f);
  for (int i = 0; i < 3; ++i) opt->Update(0, a, FromVector({0}));
  // Parameter 1 has never been updated, but num_update is already 3.
  EXPECT_FLOAT_EQ(opt->LearningRate(1), 0.1f);
  opt->Update(1, b, FromVector({1}));
  EXPECT_FLOAT_EQ(b.ToVector()[0], -0.1f);
}

TEST(OptimizerSchedule, SchedulerBaseLrDefaultsToTheLearningRate) {
  std::unique_ptr<Optimizer> a =
      MustCreate("sgd", {{"learning_rate", "0.4"},
                         {"lr_scheduler", "cosine"},
                         {"lr_scheduler.max_update", "10"}});
  std::unique_ptr<Optimizer> b =
      MustCreate("sgd", {{"learning_rate", "0.4"},
                         {"lr_scheduler", "cosine"},
                         {"lr_scheduler.max_update", "10"},
                         {"lr_scheduler.base_lr", "2"}});
  EXPECT_FLOAT_EQ(a->LearningRate(0), 0.4f * 0.5f * (1 + std::cos(M_PI / 10)));
  EXPECT_FLOAT_EQ(b->LearningRate(0), 2.0f * 0.5f * (1 + std::cos(M_PI / 10)));
}

TEST(OptimizerSchedule, SetLRSchedulerIsReflectedInOptions) {
  std::unique_ptr<Optimizer> opt = MustCreate("nag", {{"momentum", "0.9"}});
  std::shared_ptr<LRScheduler> s = MustCreateScheduler(
      "multifactor", 0.2f, {{"step", "1,3"}, {"factor", "0.5"}});
  opt->SetLRScheduler(s);
  EXPECT_EQ(opt->options().at("lr_scheduler"), "multifactor");
  EXPECT_EQ(opt->options().at("lr_scheduler.step"), "1,3");
  EXPECT_EQ(opt->options().at("lr_scheduler.base_lr"), "0.2");
  std::unique_ptr<Optimizer> copy = MustCreate(opt->name(), opt->options());
  ASSERT_NE(copy, nullptr);
  NDArray w = Zeros({1});
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(copy->LearningRate(0), opt->LearningRate(0)) << i;
    opt->Update(0, w, FromVector({1}));
    copy->Update(0, w, FromVector({0}));
  }
  opt->SetLRScheduler(nullptr);
  for (const auto& [key, value] : opt->options()) {
    EXPECT_EQ(key.find("lr_scheduler"), std::string::npos) << key;
  }
  EXPECT_FLOAT_EQ(opt->LearningRate(0), 0.01f);
}

// ---- options() recreates the optimizer.

TEST(Options, RecreateAnOptimizerThatUpdatesIdentically) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.optimizer);
    std::unique_ptr<Optimizer> a = MustCreate(c.optimizer, c.options);
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->name(), c.optimizer);
    ASSERT_EQ(a->options().count("learning_rate"), 1u);
    std::unique_ptr<Optimizer> b = MustCreate(a->name(), a->options());
    ASSERT_NE(b, nullptr);
    NDArray wa = FromVector({0.5f, -0.5f}), wb = FromVector({0.5f, -0.5f});
    for (int i = 0; i < 3; ++i) {
      NDArray g = FromVector({0.3f * i, -1.1f});
      a->Update(0, wa, g);
      b->Update(0, wb, g);
    }
    EXPECT_EQ(wa.ToVector(), wb.ToVector());
  }
}

TEST(Options, DefaultLearningRatesFollowMxnet) {
  EXPECT_FLOAT_EQ(MustCreate("sgd", {})->LearningRate(0), 0.01f);
  EXPECT_FLOAT_EQ(MustCreate("nag", {})->LearningRate(0), 0.01f);
  EXPECT_FLOAT_EQ(MustCreate("adagrad", {})->LearningRate(0), 0.01f);
  EXPECT_FLOAT_EQ(MustCreate("adam", {})->LearningRate(0), 0.001f);
  EXPECT_FLOAT_EQ(MustCreate("rmsprop", {})->LearningRate(0), 0.001f);
}

TEST(Options, UnknownOrMalformedOptionsAreInvalidArgumentNamingThem) {
  ExpectCreateError("sgdd", {}, {"'sgdd'", "adam"});
  ExpectCreateError("sgd", {{"momentun", "0.9"}}, {"'momentun'", "momentum"});
  ExpectCreateError("adam", {{"momentum", "0.9"}}, {"'momentum'"});
  ExpectCreateError("sgd", {{"learning_rate", "fast"}},
                    {"'learning_rate'", "fast"});
  ExpectCreateError("sgd", {{"learning_rate", "nan"}}, {"'learning_rate'"});
  ExpectCreateError("sgd", {{"learning_rate", "-0.1"}}, {"'learning_rate'"});
  ExpectCreateError("sgd", {{"wd", "1e39"}}, {"'wd'", "float"});
  ExpectCreateError("sgd", {{"momentum", "1.5"}}, {"'momentum'", "[0, 1]"});
  ExpectCreateError("adam", {{"beta1", "1"}}, {"'beta1'", "[0, 1)"});
  // In range as a double, 1 as the float the update uses.
  ExpectCreateError("adam", {{"beta1", "0.99999999999"}},
                    {"'beta1'", "[0, 1)", "in float32 it is 1"});
  ExpectCreateError("adagrad", {{"eps", "-1e-7"}}, {"'eps'"});
  ExpectCreateError("rmsprop", {{"centered", "true"}}, {"'centered'", "true"});
  ExpectCreateError("adadelta", {{"rho", ""}}, {"'rho'"});
  ExpectCreateError("sgd", {{"lr_scheduler.step", "10"}},
                    {"'lr_scheduler.step'", "'lr_scheduler'"});
  ExpectCreateError("sgd", {{"lr_scheduler", "bogus"}}, {"sgd", "'bogus'"});
  ExpectCreateError("sgd", {{"lr_scheduler", "factor"}},
                    {"sgd", "lr_scheduler factor", "'step'"});
  ExpectCreateError("sgd",
                    {{"lr_scheduler", "factor"},
                     {"lr_scheduler.step", "5"},
                     {"lr_scheduler.typo", "1"}},
                    {"'typo'"});
  ExpectCreateError("sgd",
                    {{"lr_scheduler", "factor"},
                     {"lr_scheduler.step", "5"},
                     {"lr_scheduler.base_lr", "x"}},
                    {"'lr_scheduler.base_lr'"});
}

// ---- Update errors.

TEST(UpdateErrors, MismatchedArraysThrowInvalidArgumentNamingTheParameter) {
  std::unique_ptr<Optimizer> opt = MustCreate("sgd", {{"momentum", "0.9"}});
  opt->SetParamNames({{3, "fc1_weight"}});
  NDArray w = Zeros({2, 3});
  ExpectStatus(StatusOf([&] {
                 opt->Update(3, w, Zeros({3, 2}));
               }),
               absl::StatusCode::kInvalidArgument,
               {"fc1_weight", "(2,3)", "(3,2)"});
  ExpectStatus(StatusOf([&] { opt->Update(3, w, NDArray()); }),
               absl::StatusCode::kInvalidArgument, {"null"});
  ExpectStatus(StatusOf([&] {
                 opt->Update(3, w, Zeros({2, 3}, cpu(1)));
               }),
               absl::StatusCode::kInvalidArgument, {"cpu(0)", "cpu(1)"});
  // A failed call changes nothing: the first real update sets the shape.
  EXPECT_EQ(opt->num_update(), 0);
  opt->Update(3, w, Zeros({2, 3}));
  ExpectStatus(StatusOf([&] { opt->Update(3, Zeros({6}), Zeros({6})); }),
               absl::StatusCode::kInvalidArgument,
               {"parameter 3 ('fc1_weight')", "(6,)", "(2,3)"});
  EXPECT_EQ(opt->num_update(), 1);
}

TEST(UpdateErrors, StatelessOptimizerStillChecksTheShape) {
  std::unique_ptr<Optimizer> opt = MustCreate("sgd", {});
  opt->Update(0, Zeros({4}), Zeros({4}));
  ExpectStatus(StatusOf([&] { opt->Update(0, Zeros({5}), Zeros({5})); }),
               absl::StatusCode::kInvalidArgument,
               {"parameter 0", "(5,)", "(4,)"});
}

// The GPU twin of the rules above: every optimizer, with and without
// clipping and weight decay, updates a weight on gpu(0) as on the CPU, step
// after step. Both run the same kernel source (ndarray/update_kernels.h);
// they may differ by where the compilers fuse multiply-adds, so the
// tolerance is 1e-6 relative.
TEST(GpuUpdates, EveryOptimizerUpdatesOnTheGpuAsOnTheCpu) {
  MX_SKIP_WITHOUT_GPU();
  const std::vector<std::pair<std::string, Optimizer::Options>> cases = {
      {"sgd", {{"learning_rate", "0.1"}, {"wd", "0.01"}}},
      {"sgd", {{"learning_rate", "0.1"}, {"momentum", "0.9"}, {"clip_gradient", "0.3"}}},
      {"nag", {{"learning_rate", "0.1"}, {"momentum", "0.9"}, {"wd", "0.001"}}},
      {"adam", {{"learning_rate", "0.01"}, {"wd", "0.01"}, {"clip_gradient", "0.5"}}},
      {"adagrad", {{"learning_rate", "0.1"}}},
      {"rmsprop", {{"learning_rate", "0.01"}, {"clip_weights", "0.8"}}},
      {"adadelta", {{"wd", "0.01"}}}};
  for (const auto& [name, options] : cases) {
    std::unique_ptr<Optimizer> on_cpu = MustCreate(name, options);
    std::unique_ptr<Optimizer> on_gpu = MustCreate(name, options);
    NDArray wc = RandomUniform(-1, 1, {1000}, cpu());
    NDArray wg = wc.Copy(gpu(0));
    for (int step = 0; step < 3; ++step) {
      NDArray gc = RandomUniform(-1, 1, {1000}, cpu());
      on_cpu->Update(0, wc, gc);
      on_gpu->Update(0, wg, gc.Copy(gpu(0)));
    }
    const std::vector<float> want = wc.ToVector(), got = wg.Copy(cpu()).ToVector();
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-6f * std::max(1.0f, std::fabs(want[i])))
          << name << " at " << i;
    }
  }
}

TEST(UpdateErrors, AWeightAndAGradientOnDifferentContextsAreRefused) {
  std::unique_ptr<Optimizer> opt = MustCreate("sgd", {});
  ExpectStatus(StatusOf([&] { opt->Update(0, Zeros({4}, cpu(0)), Zeros({4}, cpu(1))); }),
               absl::StatusCode::kInvalidArgument, {"cpu(0)", "cpu(1)"});
}

TEST(UpdateErrors, StatesFollowTheWeightToAnotherCpuContext) {
  std::unique_ptr<Optimizer> a = MustCreate("adam", {});
  std::unique_ptr<Optimizer> b = MustCreate("adam", {});
  NDArray wa = FromVector({1, 2}), wb = FromVector({1, 2}, cpu(0));
  a->Update(0, wa, FromVector({0.5f, 0.5f}));
  b->Update(0, wb, FromVector({0.5f, 0.5f}));
  NDArray wb2 = wb.Copy(cpu(2));
  a->Update(0, wa, FromVector({0.1f, -0.5f}));
  b->Update(0, wb2, FromVector({0.1f, -0.5f}, cpu(2)));
  EXPECT_EQ(wa.ToVector(), wb2.ToVector());
}

// ---- Saving and loading states.

// Runs `steps` interleaved updates of two parameters from `first_step` on.
void RunSteps(Optimizer& opt, NDArray* weights, int first_step, int steps) {
  for (int step = first_step; step < first_step + steps; ++step) {
    const int p = step % 3 == 2 ? 1 : 0;
    const Shape shape = weights[p].shape();
    opt.Update(
        p, weights[p],
        FromVector(RandomVector(shape.Size(), 300 + step, -2, 2), shape));
  }
}

class SaveLoadTest : public ::testing::TestWithParam<Case> {};

TEST_P(SaveLoadTest, ContinuingAfterLoadIsBitIdenticalToAnUninterruptedRun) {
  Case c = GetParam();
  // A schedule makes the continuation depend on num_update as well.
  c.options["lr_scheduler"] = "factor";
  c.options["lr_scheduler.step"] = "2";
  c.options["lr_scheduler.factor"] = "0.8";
  const Shape shapes[2] = {{4, 3}, {3}};
  auto fresh_weights = [&](NDArray* w) {
    for (int p = 0; p < 2; ++p) {
      w[p] =
          FromVector(RandomVector(shapes[p].Size(), 7 + p, -1, 1), shapes[p]);
    }
  };
  const std::map<int, std::string> names = {{0, "w_weight"}, {1, "w_bias"}};

  NDArray uninterrupted[2];
  fresh_weights(uninterrupted);
  std::unique_ptr<Optimizer> a = MustCreate(c.optimizer, c.options);
  ASSERT_NE(a, nullptr);
  a->SetParamNames(names);
  RunSteps(*a, uninterrupted, 0, 10);

  NDArray resumed[2];
  fresh_weights(resumed);
  std::unique_ptr<Optimizer> b = MustCreate(c.optimizer, c.options);
  b->SetParamNames(names);
  RunSteps(*b, resumed, 0, 5);
  absl::StatusOr<std::string> bytes = b->SaveStates();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  std::unique_ptr<Optimizer> restored = MustCreate(b->name(), b->options());
  restored->SetParamNames(names);
  ASSERT_TRUE(restored->LoadStates(*bytes).ok());
  EXPECT_EQ(restored->num_update(), b->num_update());
  RunSteps(*restored, resumed, 5, 5);

  for (int p = 0; p < 2; ++p) {
    EXPECT_EQ(resumed[p].ToVector(), uninterrupted[p].ToVector()) << p;
    EXPECT_EQ(StatesOf(*restored, p), StatesOf(*a, p)) << p;
  }
  EXPECT_EQ(restored->num_update(), a->num_update());
}

INSTANTIATE_TEST_SUITE_P(AllOptimizers, SaveLoadTest,
                         ::testing::ValuesIn(kCases), CaseName);

std::string TempPath(const std::string& name) {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  return ::testing::TempDir() + info->test_suite_name() + "_" + info->name() +
         "_" + name;
}

TEST(SaveLoadStates, FileRoundTripContinuesIdentically) {
  const Options options = {{"learning_rate", "0.1"}, {"momentum", "0.9"}};
  NDArray a[2] = {Ones({2, 2}), Ones({2})};
  NDArray b[2] = {Ones({2, 2}), Ones({2})};
  std::unique_ptr<Optimizer> uninterrupted = MustCreate("sgd", options);
  RunSteps(*uninterrupted, a, 0, 8);
  std::unique_ptr<Optimizer> first = MustCreate("sgd", options);
  RunSteps(*first, b, 0, 4);
  const std::string path = TempPath("sgd.states");
  ASSERT_TRUE(first->SaveStatesToFile(path).ok());
  std::unique_ptr<Optimizer> second = MustCreate("sgd", options);
  absl::Status s = second->LoadStatesFromFile(path);
  ASSERT_TRUE(s.ok()) << s;
  RunSteps(*second, b, 4, 4);
  EXPECT_EQ(a[0].ToVector(), b[0].ToVector());
  EXPECT_EQ(a[1].ToVector(), b[1].ToVector());
  std::remove(path.c_str());
}

TEST(SaveLoadStates, CountsAreExactBeyondFloatPrecision) {
  // Counts travel in entry names, not as floats.
  std::unique_ptr<Optimizer> opt = MustCreate("adam", {});
  NDArray w = Zeros({1});
  opt->Update(0, w, FromVector({1}));
  absl::StatusOr<std::string> bytes = opt->SaveStates();
  ASSERT_TRUE(bytes.ok());
  absl::StatusOr<NamedArrays> arrays = DeserializeArrays(*bytes);
  ASSERT_TRUE(arrays.ok());
  for (auto& [name, array] : *arrays) {
    if (name == "num_update:1") name = "num_update:16777217";
    if (name == "param:0:count:1") name = "param:0:count:16777217";
  }
  absl::StatusOr<std::string> edited = SerializeArrays(*arrays);
  ASSERT_TRUE(edited.ok());
  std::unique_ptr<Optimizer> loaded = MustCreate("adam", {});
  ASSERT_TRUE(loaded->LoadStates(*edited).ok());
  EXPECT_EQ(loaded->num_update(), 16777217);
}

TEST(SaveLoadStates, EmptyOptimizerRoundTrips) {
  std::unique_ptr<Optimizer> opt = MustCreate("rmsprop", {});
  absl::StatusOr<std::string> bytes = opt->SaveStates();
  ASSERT_TRUE(bytes.ok());
  std::unique_ptr<Optimizer> other = MustCreate("rmsprop", {});
  EXPECT_TRUE(other->LoadStates(*bytes).ok());
  EXPECT_EQ(other->num_update(), 0);
}

std::string StatesAfterOneUpdate(const std::string& name,
                                 const Options& options, const Shape& shape) {
  std::unique_ptr<Optimizer> opt = MustCreate(name, options);
  opt->Update(0, Zeros(shape), Ones(shape));
  absl::StatusOr<std::string> bytes = opt->SaveStates();
  EXPECT_TRUE(bytes.ok());
  return bytes.ok() ? *bytes : "";
}

TEST(SaveLoadStates, WrongOptimizerIsRejectedNamingBoth) {
  const std::string adam = StatesAfterOneUpdate("adam", {}, {3});
  std::unique_ptr<Optimizer> sgd = MustCreate("sgd", {{"momentum", "0.9"}});
  ExpectStatus(sgd->LoadStates(adam), absl::StatusCode::kInvalidArgument,
               {"'adam'", "'sgd'"});
}

TEST(SaveLoadStates, ShapeMismatchNamesTheParameter) {
  const std::string bytes =
      StatesAfterOneUpdate("sgd", {{"momentum", "0.9"}}, {3});
  std::unique_ptr<Optimizer> opt = MustCreate("sgd", {{"momentum", "0.9"}});
  opt->SetParamNames({{0, "fc2_weight"}});
  NDArray w = Zeros({4});
  opt->Update(0, w, Ones({4}));
  ExpectStatus(opt->LoadStates(bytes), absl::StatusCode::kInvalidArgument,
               {"parameter 0 ('fc2_weight')", "(3,)", "(4,)"});
  // The failed load changed nothing: the parameter keeps shape (4).
  EXPECT_EQ(opt->num_update(), 1);
  opt->Update(0, w, Ones({4}));
  EXPECT_FLOAT_EQ(w.ToVector()[0], -0.01f - (0.9f * 0.01f + 0.01f));
}

TEST(SaveLoadStates, LoadedShapeIsCheckedAtTheNextUpdate) {
  const std::string bytes = StatesAfterOneUpdate("adagrad", {}, {2, 2});
  std::unique_ptr<Optimizer> opt = MustCreate("adagrad", {});
  ASSERT_TRUE(opt->LoadStates(bytes).ok());
  ExpectStatus(StatusOf([&] { opt->Update(0, Zeros({4}), Zeros({4})); }),
               absl::StatusCode::kInvalidArgument, {"(4,)", "(2,2)"});
}

TEST(SaveLoadStates, ShapesTheCallerKnowsAreCheckedAtLoad) {
  const std::string bytes = StatesAfterOneUpdate("adagrad", {}, {2, 2});
  std::unique_ptr<Optimizer> opt = MustCreate("adagrad", {});
  ExpectStatus(opt->LoadStates(bytes, {{0, Shape{4}}}),
               absl::StatusCode::kInvalidArgument, {"parameter 0", "(2,2)", "(4,)"});
  EXPECT_TRUE(opt->LoadStates(bytes, {{0, Shape{2, 2}}, {7, Shape{3}}}).ok());
}

TEST(SaveLoadStates, StatesOfOtherOptionsAreRejected) {
  // Momentum states loaded into SGD without momentum, and the reverse.
  const std::string with =
      StatesAfterOneUpdate("sgd", {{"momentum", "0.9"}}, {2});
  const std::string without = StatesAfterOneUpdate("sgd", {}, {2});
  ExpectStatus(MustCreate("sgd", {})->LoadStates(with),
               absl::StatusCode::kInvalidArgument, {"parameter 0", "momentum"});
  ExpectStatus(MustCreate("sgd", {{"momentum", "0.9"}})->LoadStates(without),
               absl::StatusCode::kInvalidArgument, {"parameter 0", "0 state"});
}

TEST(SaveLoadStates, ForeignOrCorruptBytesAreRejected) {
  std::unique_ptr<Optimizer> opt = MustCreate("sgd", {});
  ExpectStatus(opt->LoadStates("not an array file"),
               absl::StatusCode::kDataLoss, {"LoadStates", "magic"});
  std::string bytes = StatesAfterOneUpdate("sgd", {{"momentum", "0.5"}}, {8});
  bytes[bytes.size() / 2] ^= 0x5a;
  EXPECT_EQ(MustCreate("sgd", {{"momentum", "0.5"}})->LoadStates(bytes).code(),
            absl::StatusCode::kDataLoss);
  absl::StatusOr<std::string> params =
      SerializeArrays({{"fc1_weight", Ones({2})}});
  ASSERT_TRUE(params.ok());
  ExpectStatus(opt->LoadStates(*params), absl::StatusCode::kInvalidArgument,
               {"'fc1_weight'", "not optimizer states"});
  absl::StatusOr<std::string> headless =
      SerializeArrays({{"num_update:3", Empty({0})}});
  ASSERT_TRUE(headless.ok());
  ExpectStatus(opt->LoadStates(*headless), absl::StatusCode::kInvalidArgument,
               {"optimizer:<name>"});
  absl::StatusOr<std::string> bad_count =
      SerializeArrays({{"optimizer:sgd", Empty({0})},
                       {"num_update:1", Empty({0})},
                       {"param:0:count:-4", Empty({0})}});
  ASSERT_TRUE(bad_count.ok());
  ExpectStatus(opt->LoadStates(*bad_count), absl::StatusCode::kInvalidArgument,
               {"param:0:count:-4"});
  // A count that counting on would overflow (Adam's step then went
  // negative and its weights stopped moving).
  absl::StatusOr<std::string> huge_count =
      SerializeArrays({{"optimizer:sgd", Empty({0})},
                       {"num_update:1", Empty({0})},
                       {"param:0:count:9223372036854775807", Empty({0})}});
  ASSERT_TRUE(huge_count.ok());
  ExpectStatus(opt->LoadStates(*huge_count), absl::StatusCode::kInvalidArgument,
               {"param:0:count:9223372036854775807"});
}

TEST(SaveLoadStates, MissingFileIsNotFoundNamingIt) {
  std::unique_ptr<Optimizer> opt = MustCreate("sgd", {});
  const std::string path = TempPath("missing.states");
  ExpectStatus(opt->LoadStatesFromFile(path), absl::StatusCode::kNotFound,
               {path});
}

}  // namespace
}  // namespace mx
