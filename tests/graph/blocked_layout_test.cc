// Blocked layouts between operators (graph/executor.h): which results the
// executor stores blocked, and that training gives the same bits as with
// row-major arrays throughout (MX_BLOCKED_LAYOUT=0).
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"
#include "tests/graph/sgd_steps.h"

namespace mx {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::UnorderedElementsAre;

// Sets MX_BLOCKED_LAYOUT for the executors bound in its scope.
class BlockedLayout {
 public:
  explicit BlockedLayout(const char* value) { setenv("MX_BLOCKED_LAYOUT", value, 1); }
  ~BlockedLayout() { unsetenv("MX_BLOCKED_LAYOUT"); }
};

Symbol Conv(const Symbol& in, int filters, const std::string& name, bool bias = false) {
  return Op(
      "Convolution", {in},
      {{"kernel", Shape{3, 3}}, {"pad", Shape{1, 1}}, {"num_filter", filters}, {"no_bias", !bias}},
      name);
}

Symbol Bn(const Symbol& in, const std::string& name) {
  return Op("BatchNorm", {in}, {{"fix_gamma", false}}, name);
}

Symbol Relu(const Symbol& in, const std::string& name) {
  return Op("Activation", {in}, {{"act_type", "relu"}}, name);
}

// The zoo ResNet's shape in small: a stem on 3 channels, a residual block
// of 16 channels, a widening to 32 (two blocks of channels), 2x2 max
// pooling, a convolution with a bias, a global average (or sum).
Symbol Net(const std::string& pool = "avg") {
  Symbol x = Relu(Bn(Conv(Variable("data"), 16, "stem"), "stem_bn"), "stem_relu");
  Symbol branch = Relu(Bn(Conv(x, 16, "a"), "a_bn"), "a_relu");
  branch = Bn(Conv(branch, 16, "b"), "b_bn");
  x = Relu(Op("elemwise_add", {branch, x}, {}, "add"), "block_out");
  x = Relu(Bn(Conv(x, 32, "wide"), "wide_bn"), "wide_relu");
  // 9x9 -> 4x4: the last row and column are in no window.
  x = Op("Pooling", {x}, {{"pool_type", "max"}, {"kernel", Shape{2, 2}}, {"stride", Shape{2, 2}}},
         "max");
  x = Relu(Bn(Conv(x, 32, "deep", /*bias=*/true), "deep_bn"), "deep_relu");
  x = Op("Pooling", {x}, {{"pool_type", pool}, {"global_pool", true}, {"kernel", Shape{1, 1}}},
         "pool");
  x = Op("FullyConnected", {Op("Flatten", {x}, {}, "flatten")}, {{"num_hidden", 10}}, "fc");
  return Op("SoftmaxOutput", {x}, {}, "softmax");
}

// Batch 7 (chunks of unequal size), 9x9 images.
const Shape kData{7, 3, 9, 9};

std::vector<float> Random(int64_t n, uint32_t seed, float scale) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(gen);
  return v;
}

std::unique_ptr<Executor> BindNet(const Symbol& net) {
  auto exec = Executor::SimpleBind(net, cpu(), {{"data", kData}, {"softmax_label", Shape{7}}});
  EXPECT_TRUE(exec.ok()) << exec.status();
  if (!exec.ok()) return nullptr;
  uint32_t seed = 1;
  for (const auto& [name, array] : (*exec)->arg_dict()) {
    NDArray a = array;
    if (name == "softmax_label") {
      a.Assign({0, 3, 9, 1, 1, 5, 7});
    } else if (absl::EndsWith(name, "_gamma")) {
      a.Assign(1.0f);
    } else {
      a.Assign(Random(a.size(), seed++, name == "data" ? 2.0f : 0.3f));
    }
  }
  return *std::move(exec);
}

TEST(BlockedLayout, StoresResultsBetweenConvolutionsBlocked) {
  std::unique_ptr<Executor> exec = BindNet(Net());
  ASSERT_NE(exec, nullptr);
  // The stem reads the data (an argument) row-major, and the pooled result
  // (1x1 planes) stays row-major; everything between is blocked.
  EXPECT_THAT(
      exec->blocked_outputs(),
      UnorderedElementsAre("stem_output", "stem_bn_output", "stem_relu_output", "a_output",
                           "a_bn_output", "a_relu_output", "b_output", "b_bn_output", "add_output",
                           "block_out_output", "wide_output", "wide_bn_output", "wide_relu_output",
                           "max_output", "deep_output", "deep_bn_output", "deep_relu_output"));
}

TEST(BlockedLayout, TrainsToTheSameBitsAsRowMajor) {
  for (const std::string pool : {"avg", "sum"}) {
    SCOPED_TRACE(pool);
    std::map<std::string, std::vector<float>> blocked, row_major;
    {
      std::unique_ptr<Executor> exec = BindNet(Net(pool));
      ASSERT_NE(exec, nullptr);
      ASSERT_THAT(exec->blocked_outputs(), Not(IsEmpty()));
      blocked = SgdSteps(exec.get(), 3);
    }
    {
      BlockedLayout off("0");
      std::unique_ptr<Executor> exec = BindNet(Net(pool));
      ASSERT_NE(exec, nullptr);
      ASSERT_THAT(exec->blocked_outputs(), IsEmpty());
      row_major = SgdSteps(exec.get(), 3);
    }
    ASSERT_EQ(blocked.size(), row_major.size());
    for (const auto& [name, values] : row_major) {
      EXPECT_EQ(blocked.at(name), values) << name;  // bit for bit
    }
  }
}

TEST(BlockedLayout, MonitorSeesRowMajorValues) {
  // Read at once: a later in-place operator (Activation) overwrites
  // row-major results.
  auto record = [](Executor* exec) {
    auto seen = std::make_shared<std::map<std::string, std::vector<float>>>();
    exec->SetMonitorCallback([seen](const std::string& name, const NDArray& value) {
      (*seen)[name] = value.ToVector();
    });
    exec->Forward(true);
    return *seen;
  };
  std::unique_ptr<Executor> exec = BindNet(Net());
  ASSERT_NE(exec, nullptr);
  const auto blocked = record(exec.get());
  BlockedLayout off("0");
  std::unique_ptr<Executor> plain = BindNet(Net());
  ASSERT_NE(plain, nullptr);
  const auto row_major = record(plain.get());
  ASSERT_EQ(blocked.size(), row_major.size());
  for (const auto& [name, values] : row_major) EXPECT_EQ(blocked.at(name), values) << name;
  EXPECT_TRUE(blocked.count("a_bn_output"));
}

// What keeps a result row-major: a caller sees it (a graph output), an
// operator that does not take blocked arrays reads it (Flatten, max
// pooling), or an element-wise operator joins it to one that must be so.
TEST(BlockedLayout, KeepsRowMajorWhatCallersOrOtherOperatorsSee) {
  const Symbol data = Variable("data");
  const Symbol a = Conv(data, 16, "a"), b = Conv(data, 16, "b"), c = Conv(data, 16, "c");
  const Symbol d = Conv(data, 16, "d"), e = Conv(data, 16, "e");
  const Symbol joined = Relu(c + data, "joined");  // data: 3 channels, an argument
  const Symbol max = Op("Pooling", {d}, {{"pool_type", "max"}, {"global_pool", true}}, "max");
  const Symbol group = Group({Relu(a, "shown"), Op("Flatten", {b}, {}, "flat"), joined, max,
                              Relu(Conv(Relu(e, "e_relu"), 16, "f"), "f_relu")});
  const Shape x{2, 16, 5, 5};  // 16 channels, so that c + data is well formed
  auto exec = Executor::SimpleBind(group, cpu(), {{"data", x}});
  ASSERT_TRUE(exec.ok()) << exec.status();
  // Only e and e_relu sit between convolutions alone. The graph shows
  // shown's and f_relu's outputs, so a's and f's, joined to them by
  // element-wise operators, stay row-major too.
  EXPECT_THAT((*exec)->blocked_outputs(), UnorderedElementsAre("e_output", "e_relu_output"));
}

TEST(BlockedLayout, RefusesABadSettingNamingIt) {
  BlockedLayout bad("yes");
  auto exec = Executor::SimpleBind(Net(), cpu(), {{"data", kData}, {"softmax_label", Shape{7}}});
  ASSERT_FALSE(exec.ok());
  EXPECT_EQ(exec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(exec.status().message(), HasSubstr("MX_BLOCKED_LAYOUT"));
}

}  // namespace
}  // namespace mx
