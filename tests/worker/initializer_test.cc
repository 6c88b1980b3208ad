// Tests of the parameter initializers (worker/initializer.h): MXNet's name
// rules, the statistics of each rule, reproducibility under srand, and bad
// names and options.
#include "worker/initializer.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"

namespace mx {
namespace {

using ::testing::AllOf;
using ::testing::Each;
using ::testing::HasSubstr;

std::unique_ptr<Initializer> Make(
    const std::string& name,
    const std::map<std::string, std::string>& options = {}) {
  absl::StatusOr<std::unique_ptr<Initializer>> init =
      CreateInitializer(name, options);
  EXPECT_TRUE(init.ok()) << init.status();
  return init.ok() ? *std::move(init) : nullptr;
}

// Initializes a fresh array of `shape` called `name`.
std::vector<float> Init(const Initializer& init, const std::string& name,
                        const Shape& shape) {
  NDArray a = Full(shape, -123.0f);
  absl::Status status = init(name, &a);
  EXPECT_TRUE(status.ok()) << status;
  return a.ToVector();
}

struct Stats {
  double mean, stddev, max_abs;
};

Stats StatsOf(const std::vector<float>& v) {
  double sum = 0, sq = 0, max_abs = 0;
  for (float x : v) {
    sum += x;
    sq += static_cast<double>(x) * x;
    max_abs = std::max(max_abs, static_cast<double>(std::abs(x)));
  }
  const double mean = sum / v.size();
  return {mean, std::sqrt(sq / v.size() - mean * mean), max_abs};
}

TEST(Initializer, NameRulesAsMxnet) {
  auto init = Make("constant", {{"value", "0.5"}});
  EXPECT_THAT(Init(*init, "fc1_bias", {4}), Each(0.0f));
  EXPECT_THAT(Init(*init, "bn0_beta", {4}), Each(0.0f));
  EXPECT_THAT(Init(*init, "bn0_moving_mean", {4}), Each(0.0f));
  EXPECT_THAT(Init(*init, "bn0_gamma", {4}), Each(1.0f));
  EXPECT_THAT(Init(*init, "bn0_moving_var", {4}), Each(1.0f));
  EXPECT_THAT(Init(*init, "fc1_weight", {2, 3}), Each(0.5f));
  EXPECT_THAT(Init(*init, "weight", {2}), Each(0.5f));
}

TEST(Initializer, NamesMatchingNoRuleAreErrorsNamingTheArray) {
  auto init = Make("uniform");
  for (const std::string name :
       {"data", "softmax_label", "fc1_weight_extra", "bias_of_fc1", ""}) {
    NDArray a = Full({3}, 7.0f);
    absl::Status status = (*init)(name, &a);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_THAT(status.message(), HasSubstr("'" + name + "'"));
    EXPECT_THAT(a.ToVector(), Each(7.0f)) << "left untouched";
  }
  NDArray null;
  EXPECT_EQ((*init)("fc_weight", &null).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*init)("fc_weight", nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Uniform, DrawsWithinScale) {
  srand(1);
  Stats s = StatsOf(Init(*Make("uniform"), "w_weight", {100, 100}));
  EXPECT_LE(s.max_abs, 0.07);
  EXPECT_GT(s.max_abs, 0.069);
  EXPECT_NEAR(s.mean, 0.0, 0.002);
  EXPECT_NEAR(s.stddev, 0.07 / std::sqrt(3.0), 0.002);

  Stats wide =
      StatsOf(Init(*Make("uniform", {{"scale", "2"}}), "w_weight", {100, 100}));
  EXPECT_LE(wide.max_abs, 2.0);
  EXPECT_GT(wide.max_abs, 1.98);
}

TEST(Normal, DrawsWithSigma) {
  srand(2);
  Stats s = StatsOf(Init(*Make("normal"), "w_weight", {100, 100}));
  EXPECT_NEAR(s.mean, 0.0, 0.0005);
  EXPECT_NEAR(s.stddev, 0.01, 0.0003);
  Stats wide =
      StatsOf(Init(*Make("normal", {{"sigma", "3"}}), "w_weight", {100, 100}));
  EXPECT_NEAR(wide.stddev, 3.0, 0.09);
}

// A convolution weight (out 64, in 32, 3x3): fan_in 288, fan_out 576.
const Shape kConv = {64, 32, 3, 3};

TEST(Xavier, UniformScaleFromTheAverageFan) {
  srand(3);
  const double scale = std::sqrt(3.0 / ((288 + 576) / 2.0));
  Stats s = StatsOf(Init(*Make("xavier"), "conv_weight", kConv));
  EXPECT_LE(s.max_abs, scale + 1e-6);
  EXPECT_GT(s.max_abs, 0.99 * scale);
  EXPECT_NEAR(s.mean, 0.0, 0.02 * scale);
  EXPECT_NEAR(s.stddev, scale / std::sqrt(3.0), 0.02 * scale);
}

TEST(Xavier, FactorTypesInAndOut) {
  srand(4);
  Stats in = StatsOf(
      Init(*Make("xavier", {{"factor_type", "in"}}), "conv_weight", kConv));
  EXPECT_LE(in.max_abs, std::sqrt(3.0 / 288) + 1e-6);
  EXPECT_GT(in.max_abs, 0.99 * std::sqrt(3.0 / 288));
  Stats out = StatsOf(
      Init(*Make("xavier", {{"factor_type", "out"}}), "conv_weight", kConv));
  EXPECT_LE(out.max_abs, std::sqrt(3.0 / 576) + 1e-6);
  EXPECT_GT(out.max_abs, 0.99 * std::sqrt(3.0 / 576));
}

TEST(Xavier, GaussianWithMagnitude) {
  srand(5);
  // A fully connected weight (out 200, in 100), magnitude 2, fan_in: the
  // He initialization, stddev sqrt(2 / 100).
  Stats s = StatsOf(Init(*Make("xavier", {{"rnd_type", "gaussian"},
                                          {"factor_type", "in"},
                                          {"magnitude", "2"}}),
                         "fc_weight", {200, 100}));
  EXPECT_NEAR(s.mean, 0.0, 0.003);
  EXPECT_NEAR(s.stddev, std::sqrt(2.0 / 100), 0.02 * std::sqrt(2.0 / 100));
  EXPECT_GT(s.max_abs, 3 * std::sqrt(2.0 / 100)) << "not uniform";
}

TEST(Xavier, VectorWeightIsAnErrorNamingIt) {
  auto init = Make("xavier");
  NDArray a = Zeros({10});
  absl::Status status = (*init)("odd_weight", &a);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("odd_weight"), HasSubstr("(10,)")));
  // Biases follow the name rule, whatever the initializer.
  NDArray bias = Full({10}, 3.0f);
  EXPECT_TRUE((*init)("odd_bias", &bias).ok());
  EXPECT_THAT(bias.ToVector(), Each(0.0f));
}

TEST(Initializer, ReproducibleAfterSrand) {
  for (const std::string name : {"uniform", "normal", "xavier"}) {
    SCOPED_TRACE(name);
    auto init = Make(name);
    srand(42);
    std::vector<float> a = Init(*init, "fc_weight", {16, 8});
    std::vector<float> b = Init(*init, "fc_weight", {16, 8});
    srand(42);
    EXPECT_EQ(Init(*init, "fc_weight", {16, 8}), a);
    EXPECT_EQ(Init(*init, "fc_weight", {16, 8}), b);
    EXPECT_NE(a, b) << "successive draws differ";
    srand(43);
    EXPECT_NE(Init(*init, "fc_weight", {16, 8}), a);
  }
}

TEST(CreateInitializer, RejectsUnknownNamesAndBadOptions) {
  struct Case {
    std::string name;
    std::map<std::string, std::string> options;
    std::string message;
  } cases[] = {
      {"glorot", {}, "unknown initializer 'glorot'"},
      {"uniform", {{"sigma", "1"}}, "unknown option 'sigma'"},
      {"uniform", {{"scale", "big"}}, "scale='big' is not a number"},
      {"uniform", {{"scale", "-1"}}, "scale must not be negative"},
      {"normal", {{"sigma", "-0.1"}}, "sigma must not be negative"},
      {"xavier", {{"rnd_type", "cauchy"}}, "rnd_type='cauchy'"},
      {"xavier", {{"factor_type", "sum"}}, "factor_type='sum'"},
      {"xavier", {{"magnitude", "nan"}}, "magnitude='nan'"},
      {"constant", {}, "'value' is required"},
  };
  for (const Case& c : cases) {
    auto init = CreateInitializer(c.name, c.options);
    EXPECT_EQ(init.status().code(), absl::StatusCode::kInvalidArgument)
        << c.message;
    EXPECT_THAT(init.status().message(), HasSubstr(c.message));
  }
}

// An MXNet variable's __init__ attribute, as Initializer.dumps() writes
// it; its rule applies whatever the array's name.
TEST(InitializerFromAttr, ReadsMxnetsDumps) {
  auto from = [](const std::string& attr, const std::string& name) {
    absl::StatusOr<std::unique_ptr<Initializer>> init = InitializerFromAttr(attr);
    EXPECT_TRUE(init.ok()) << init.status();
    NDArray a = Full({64, 32}, -123.0f);
    if (init.ok()) EXPECT_TRUE((*init)->InitByRule(name, &a).ok());
    return a.ToVector();
  };
  EXPECT_THAT(from(R"(["zero", {}])", "fc_weight"), Each(0.0f));
  EXPECT_THAT(from(R"(["one", {}])", "fc_bias"), Each(1.0f));  // not the bias rule's 0
  EXPECT_THAT(from(R"(["constant", {"value": 2.5}])", "data"), Each(2.5f));
  EXPECT_LE(StatsOf(from(R"(["uniform", {"scale": 0.5}])", "w")).max_abs, 0.5);
  EXPECT_NEAR(StatsOf(from(R"(["normal", {"sigma": 2.0}])", "w")).stddev, 2.0, 0.1);
  const double xavier_scale = std::sqrt(3.0 / ((64 + 32) / 2.0));
  EXPECT_LE(
      StatsOf(
          from(R"(["xavier", {"rnd_type": "uniform", "factor_type": "avg", "magnitude": 3}])", "w"))
          .max_abs,
      xavier_scale);
  for (const auto& [attr, message] : std::vector<std::pair<std::string, std::string>>{
           {"normal", "is not an MXNet initializer"},
           {R"(["orthogonal", {}])", "unknown initializer 'orthogonal'"},
           {R"(["zero", {"value": 1}])", "zero takes no options"},
           {R"(["normal", {"sigma": -1}])", "sigma must not be negative"}}) {
    EXPECT_THAT(InitializerFromAttr(attr).status().message(), HasSubstr(message)) << attr;
  }
}

}  // namespace
}  // namespace mx
