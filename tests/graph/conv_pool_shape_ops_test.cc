// Convolution, Pooling, Flatten, Reshape, Concat and transpose beyond the
// operator table: names and argument lists, shape inference from partial
// knowledge (in both directions where MXNet does it), the errors for bad
// shapes and parameters, and max pooling's choice among equal maxima.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"
#include "ndarray/launch.h"
#include "ndarray/ndarray.h"
#include "ndarray/nn_kernels.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

using ShapeMap = std::map<std::string, Shape>;

Symbol Unary(const std::string& op, Params params) {
  return Op(op, {Variable("data")}, params, "op");
}

Symbol::Shapes Infer(const Symbol& s, const ShapeMap& known) {
  auto shapes = s.InferShape(known);
  EXPECT_TRUE(shapes.ok()) << shapes.status();
  return shapes.ok() ? *shapes : Symbol::Shapes{};
}

std::string InferError(const Symbol& s, const ShapeMap& known) {
  auto shapes = s.InferShape(known);
  EXPECT_FALSE(shapes.ok());
  return shapes.ok() ? "" : std::string(shapes.status().message());
}

// ---- Names.

TEST(LayerNames, DefaultToTheLowerCasedOperator) {
  NameScope scope;
  Symbol data = Variable("data");
  EXPECT_EQ(Op("Convolution", {data}, {{"kernel", "(3,3)"}, {"num_filter", 2}}).name(),
            "convolution0");
  EXPECT_EQ(Op("Pooling", {data}, {{"kernel", "(2,2)"}}).name(), "pooling0");
  EXPECT_EQ(Op("Flatten", {data}).name(), "flatten0");
  EXPECT_EQ(Op("Reshape", {data}, {{"shape", "(-1,)"}}).name(), "reshape0");
  EXPECT_EQ(Op("Concat", {data, data}, {{"num_args", 2}}).name(), "concat0");
  EXPECT_EQ(Op("transpose", {data}).name(), "transpose0");
}

TEST(ConvolutionNames, CreatesWeightAndBiasLikeMXNet) {
  Symbol conv = Op("Convolution", {Variable("data")}, {{"kernel", "(5,5)"}, {"num_filter", 20}},
                   "conv1");
  EXPECT_THAT(conv.ListArguments(), ElementsAre("data", "conv1_weight", "conv1_bias"));
  Symbol no_bias = Op("Convolution", {Variable("data")},
                      {{"kernel", "(5,5)"}, {"num_filter", 20}, {"no_bias", true}}, "conv2");
  EXPECT_THAT(no_bias.ListArguments(), ElementsAre("data", "conv2_weight"));
}

TEST(ConcatNames, ArgumentsAreArg0ToArgNAndAllRequired) {
  Symbol a = Variable("a"), b = Variable("b");
  Symbol c = Op("Concat", {a, b}, {{"num_args", 2}}, "cat");
  EXPECT_THAT(c.ListArguments(), ElementsAre("a", "b"));
  try {
    Op("Concat", {a}, {{"num_args", 2}}, "cat");
    ADD_FAILURE() << "a missing Concat input must be an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("required input 'arg1' is missing"));
  }
}

// ---- Convolution.

TEST(ConvolutionShapes, LeNetLayers) {
  Symbol s = Op("Convolution", {Variable("data")}, {{"kernel", "(5,5)"}, {"num_filter", 20}},
                "conv1");
  s = Op("Pooling", {s}, {{"kernel", "(2,2)"}, {"stride", "(2,2)"}}, "pool1");
  s = Op("Convolution", {s}, {{"kernel", "(5,5)"}, {"num_filter", 50}}, "conv2");
  s = Op("Pooling", {s}, {{"kernel", "(2,2)"}, {"stride", "(2,2)"}}, "pool2");
  s = Op("Flatten", {s}, {}, "flat");
  Symbol::Shapes shapes = Infer(s, {{"data", Shape{100, 1, 28, 28}}});
  EXPECT_THAT(shapes.arguments,
              ElementsAre(Shape{100, 1, 28, 28}, Shape{20, 1, 5, 5}, Shape{20},
                          Shape{50, 20, 5, 5}, Shape{50}));
  EXPECT_THAT(shapes.outputs, ElementsAre(Shape{100, 800}));
}

TEST(ConvolutionShapes, StridePadDilateAndGroups) {
  Symbol s = Unary("Convolution", {{"kernel", "(3,2)"},
                                   {"num_filter", 6},
                                   {"stride", "(2,3)"},
                                   {"pad", "(1,2)"},
                                   {"dilate", "(2,1)"},
                                   {"num_group", 3}});
  Symbol::Shapes shapes = Infer(s, {{"data", Shape{2, 9, 10, 11}}});
  // oh = (10 + 2 - 2*2 - 1) / 2 + 1 = 4; ow = (11 + 4 - 1 - 1) / 3 + 1 = 5.
  EXPECT_THAT(shapes.outputs, ElementsAre(Shape{2, 6, 4, 5}));
  EXPECT_EQ(shapes.arguments[1], (Shape{6, 3, 3, 2}));
}

TEST(ConvolutionShapes, UnknownBatchStaysUnknown) {
  Symbol s = Unary("Convolution", {{"kernel", "(3,3)"}, {"num_filter", 4}});
  Symbol::Shapes shapes = Infer(s, {{"data", Shape{0, 3, 8, 8}}});
  EXPECT_EQ(shapes.outputs[0], (Shape{0, 4, 6, 6}));
  EXPECT_EQ(shapes.arguments[1], (Shape{4, 3, 3, 3}));
}

TEST(ConvolutionShapes, WeightTellsTheChannels) {
  Symbol s = Unary("Convolution", {{"kernel", "(3,3)"}, {"num_filter", 4}, {"num_group", 2}});
  Symbol::Shapes shapes = Infer(s, {{"op_weight", Shape{4, 3, 3, 3}}});
  EXPECT_EQ(shapes.arguments[0], (Shape{0, 6, 0, 0}));
  EXPECT_EQ(shapes.arguments[2], (Shape{4}));
}

TEST(ConvolutionShapes, KernelLargerThanThePaddedInputNamesTheShapes) {
  Symbol s = Unary("Convolution", {{"kernel", "(5,5)"}, {"num_filter", 4}, {"pad", "(1,1)"}});
  std::string e = InferError(s, {{"data", Shape{1, 1, 2, 8}}});
  EXPECT_THAT(e, HasSubstr("op (Convolution)"));
  EXPECT_THAT(e, HasSubstr("kernel (5,5)"));
  EXPECT_THAT(e, HasSubstr("(1,1,2,8)"));
}

TEST(ConvolutionShapes, ChannelsMustDivideIntoGroups) {
  Symbol s = Unary("Convolution", {{"kernel", "(1,1)"}, {"num_filter", 4}, {"num_group", 2}});
  std::string e = InferError(s, {{"data", Shape{1, 3, 4, 4}}});
  EXPECT_THAT(e, HasSubstr("(1,3,4,4)"));
  EXPECT_THAT(e, HasSubstr("num_group=2"));
}

TEST(ConvolutionShapes, WrongWeightNamesBothShapes) {
  Symbol s = Unary("Convolution", {{"kernel", "(3,3)"}, {"num_filter", 4}});
  std::string e = InferError(s, {{"data", Shape{1, 3, 8, 8}}, {"op_weight", Shape{4, 2, 3, 3}}});
  EXPECT_THAT(e, HasSubstr("weight"));
  EXPECT_THAT(e, HasSubstr("(4,2,3,3)"));
  EXPECT_THAT(e, HasSubstr("(4,3,3,3)"));
}

TEST(ConvolutionShapes, OnlyTwoDimensionalKernels) {
  std::string e = InferError(Unary("Convolution", {{"kernel", "(3,3,3)"}, {"num_filter", 4}}),
                        {{"data", Shape{1, 3, 8, 8, 8}}});
  EXPECT_THAT(e, HasSubstr("kernel=(3,3,3)"));
  EXPECT_THAT(e, HasSubstr("only 2-D"));
}

TEST(ConvolutionShapes, DataMustBeFourDimensional) {
  std::string e = InferError(Unary("Convolution", {{"kernel", "(3,3)"}, {"num_filter", 4}}),
                        {{"data", Shape{3, 8, 8}}});
  EXPECT_THAT(e, HasSubstr("4-D"));
  EXPECT_THAT(e, HasSubstr("(3,8,8)"));
}

TEST(ConvolutionParams, BadValuesNameTheParameter) {
  auto error = [](Params params) {
    return InferError(Unary("Convolution", params), {{"data", Shape{1, 4, 8, 8}}});
  };
  EXPECT_THAT(error({{"kernel", "(3,3)"}, {"num_filter", 4}, {"stride", "(0,1)"}}),
              HasSubstr("stride=(0,1)"));
  EXPECT_THAT(error({{"kernel", "(3,3)"}, {"num_filter", 6}, {"num_group", 4}}),
              HasSubstr("num_group=4"));
  EXPECT_THAT(error({{"kernel", "(3,3)"}, {"num_filter", 4}, {"pad", "(1,1,1)"}}),
              HasSubstr("pad=(1,1,1)"));
  try {
    Unary("Convolution", {{"kernel", "(3,3)"}});
    ADD_FAILURE() << "num_filter is required";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("Convolution: required parameter 'num_filter'"));
  }
  try {
    Unary("Convolution", {{"kernel", "(3,3)"}, {"num_filter", 2}, {"layout", "NHWC"}});
    ADD_FAILURE() << "only NCHW is supported";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("layout"));
  }
}

// ---- Pooling.

TEST(PoolingShapes, HeightOf2To31RowsIsRefused) {
  // Max pooling's backward keeps row indices in 32 bits.
  Symbol s = Unary("Pooling", {{"kernel", "(2,2)"}, {"pool_type", "max"}});
  std::string e = InferError(s, {{"data", Shape{1, 1, int64_t{1} << 31, 2}}});
  EXPECT_THAT(e, HasSubstr("(1,1,2147483648,2)"));
  EXPECT_THAT(e, HasSubstr("2^31 - 1 rows"));
  Infer(s, {{"data", Shape{1, 1, (int64_t{1} << 31) - 1, 2}}});
}

TEST(PoolingShapes, ValidRoundsDownAndFullRoundsUp) {
  Params p = {{"kernel", "(3,3)"}, {"stride", "(2,2)"}};
  EXPECT_EQ(Infer(Unary("Pooling", p), {{"data", Shape{1, 2, 8, 9}}}).outputs[0],
            (Shape{1, 2, 3, 4}));
  p.push_back({"pooling_convention", "full"});
  EXPECT_EQ(Infer(Unary("Pooling", p), {{"data", Shape{1, 2, 8, 9}}}).outputs[0],
            (Shape{1, 2, 4, 4}));
}

TEST(PoolingShapes, GlobalPoolIgnoresTheKernel) {
  Symbol s = Unary("Pooling", {{"global_pool", true}, {"pool_type", "avg"}});
  EXPECT_EQ(Infer(s, {{"data", Shape{2, 3, 7, 5}}}).outputs[0], (Shape{2, 3, 1, 1}));
  EXPECT_EQ(Infer(s, {{"data", Shape{0, 3, 0, 0}}}).outputs[0], (Shape{0, 3, 1, 1}));
}

TEST(PoolingShapes, KernelLargerThanThePaddedInputNamesTheShapes) {
  std::string e =
      InferError(Unary("Pooling", {{"kernel", "(4,4)"}}), {{"data", Shape{1, 1, 3, 9}}});
  EXPECT_THAT(e, HasSubstr("(4,4)"));
  EXPECT_THAT(e, HasSubstr("(1,1,3,9)"));
}

TEST(PoolingParams, KernelIsNeededWithoutGlobalPool) {
  std::string e = InferError(Unary("Pooling", {}), {{"data", Shape{1, 1, 3, 3}}});
  EXPECT_THAT(e, HasSubstr("kernel"));
  try {
    Unary("Pooling", {{"kernel", "(2,2)"}, {"pool_type", "median"}});
    ADD_FAILURE() << "median is not a pool type";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("pool_type"));
  }
}

// Runs max pooling forward and backward (head gradient of ones) on `data`.
std::vector<float> MaxPoolGradient(const std::vector<float>& data, Shape shape, Params params) {
  Symbol s = Op("Pooling", {Variable("data")}, params, "pool");
  NDArray grad = Zeros(shape);
  auto exec = Executor::Bind(s, cpu(), {{"data", FromVector(data, shape)}}, {{"data", grad}});
  EXPECT_TRUE(exec.ok()) << exec.status();
  if (!exec.ok()) return {};
  (*exec)->Forward(true);
  (*exec)->Backward({Ones((*exec)->outputs()[0].shape())});
  return grad.ToVector();
}

TEST(PoolingGradient, MaxGoesToTheFirstOfEqualMaxima) {
  // One 3x3 window: the maximum 5 appears at (0,2), (1,0) and (2,1); the
  // first in row-major order is (0,2).
  std::vector<float> g = MaxPoolGradient({1, 2, 5,  //
                                          5, 0, 3,  //
                                          4, 5, 1},
                                         Shape{1, 1, 3, 3}, {{"kernel", "(3,3)"}});
  EXPECT_THAT(g, ElementsAre(0, 0, 1, 0, 0, 0, 0, 0, 0));
  // Equal maxima in one row of the window, and a constant image.
  g = MaxPoolGradient({0, 7, 7, 0}, Shape{1, 1, 2, 2}, {{"kernel", "(2,2)"}});
  EXPECT_THAT(g, ElementsAre(0, 1, 0, 0));
  g = MaxPoolGradient(std::vector<float>(16, 0.0f), Shape{1, 1, 4, 4},
                      {{"kernel", "(2,2)"}, {"stride", "(2,2)"}});
  EXPECT_THAT(g, ElementsAre(1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0));
}

TEST(PoolingGradient, OverlappingWindowsAccumulate) {
  // 3 windows of width 2 over 4 columns; the maximum 9 wins the first two.
  std::vector<float> g = MaxPoolGradient({1, 9, 2, 3}, Shape{1, 1, 1, 4}, {{"kernel", "(1,2)"}});
  EXPECT_THAT(g, ElementsAre(0, 2, 0, 1));
}

// ---- Convolution's gradients beyond the operator table: accumulated
// (grad_req add), and the same bits run after run, on both CPU paths
// (3 channels: im2col; 16: oneDNN blocked; 20: oneDNN in plain layouts,
// graph/ops/dnnl_conv.h). Batch 11: the pool's chunks of images differ in
// size on every path.

struct ConvGradients {
  std::vector<float> out, data, weight, bias;
};

ConvGradients RunConvolution(int64_t channels, GradReq req, float start) {
  const Shape data_shape{11, channels, 6, 7}, weight_shape{16, channels, 3, 3};
  std::vector<float> data(data_shape.Size()), weight(weight_shape.Size()), head(11 * 16 * 6 * 7);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i % 13) / 13 - 0.4f;
  for (size_t i = 0; i < weight.size(); ++i) weight[i] = static_cast<float>(i % 7) / 7 - 0.5f;
  for (size_t i = 0; i < head.size(); ++i) head[i] = static_cast<float>(i % 5) / 5 - 0.3f;
  const Symbol s = Op("Convolution", {Variable("data")},
                      {{"kernel", "(3,3)"}, {"num_filter", 16}, {"pad", "(1,1)"}}, "conv");
  NDArray dd = Full(data_shape, start), dw = Full(weight_shape, start), db = Full({16}, start);
  auto exec = Executor::Bind(
      s, cpu(),
      {{"data", FromVector(data, data_shape)},
       {"conv_weight", FromVector(weight, weight_shape)},
       {"conv_bias", Full({16}, 0.25f)}},
      {{"data", dd}, {"conv_weight", dw}, {"conv_bias", db}},
      {{"data", req}, {"conv_weight", req}, {"conv_bias", req}});
  EXPECT_TRUE(exec.ok()) << exec.status();
  if (!exec.ok()) return {};
  (*exec)->Forward(true);
  (*exec)->Backward({FromVector(head, Shape{11, 16, 6, 7})});
  return {(*exec)->outputs()[0].ToVector(), dd.ToVector(), dw.ToVector(), db.ToVector()};
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want, float start) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i] + start, 1e-5f * (1 + std::abs(want[i]))) << "at " << i;
  }
}

TEST(ConvolutionGradient, AddsToTheGradientsAndRepeatsBitForBit) {
  for (int64_t channels : {3, 16, 20}) {
    SCOPED_TRACE(::testing::Message() << channels << " channels");
    const ConvGradients write = RunConvolution(channels, GradReq::kWrite, 0.0f);
    const ConvGradients again = RunConvolution(channels, GradReq::kWrite, 0.0f);
    EXPECT_EQ(again.out, write.out);
    EXPECT_EQ(again.data, write.data);
    EXPECT_EQ(again.weight, write.weight);
    EXPECT_EQ(again.bias, write.bias);
    const ConvGradients add = RunConvolution(channels, GradReq::kAdd, 0.5f);
    ExpectNear(add.data, write.data, 0.5f);
    ExpectNear(add.weight, write.weight, 0.5f);
    ExpectNear(add.bias, write.bias, 0.5f);
  }
}

// 2x2 windows with stride 2 have their own kernels (graph/ops/pooling.cc):
// against the rules on data full of ties, on an odd-sized input whose last
// row and column are in no window, writing and adding.
TEST(PoolingGradient, Max2x2Stride2KeepsTheFirstMaximumRule) {
  const Shape shape{2, 3, 7, 9};
  const int64_t h = 7, w = 9, oh = 3, ow = 4, planes = 6;
  std::vector<float> data(shape.Size()), head(planes * oh * ow);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>((i * 7 + i / 5) % 3);
  for (size_t i = 0; i < head.size(); ++i) head[i] = static_cast<float>(i % 5 + 1);
  std::vector<float> want_out(head.size()), want_grad(data.size(), 0.0f);
  for (int64_t p = 0; p < planes; ++p) {
    for (int64_t oy = 0; oy < oh; ++oy) {
      for (int64_t ox = 0; ox < ow; ++ox) {
        int64_t best = -1;  // the first maximum in row-major order
        for (int64_t ky = 0; ky < 2; ++ky) {
          for (int64_t kx = 0; kx < 2; ++kx) {
            const int64_t at = (p * h + 2 * oy + ky) * w + 2 * ox + kx;
            if (best < 0 || data[at] > data[best]) best = at;
          }
        }
        const int64_t o = (p * oh + oy) * ow + ox;
        want_out[o] = data[best];
        want_grad[best] += head[o];
      }
    }
  }
  const Symbol s = Op("Pooling", {Variable("data")},
                      {{"kernel", "(2,2)"}, {"stride", "(2,2)"}, {"pool_type", "max"}}, "pool");
  for (GradReq req : {GradReq::kWrite, GradReq::kAdd}) {
    SCOPED_TRACE(req == GradReq::kAdd ? "add" : "write");
    NDArray grad = Full(shape, 0.5f);
    auto exec = Executor::Bind(s, cpu(), {{"data", FromVector(data, shape)}}, {{"data", grad}},
                               {{"data", req}});
    ASSERT_TRUE(exec.ok()) << exec.status();
    (*exec)->Forward(true);
    (*exec)->Backward({FromVector(head, Shape{2, 3, oh, ow})});
    EXPECT_EQ((*exec)->outputs()[0].ToVector(), want_out);
    std::vector<float> want = want_grad;
    if (req == GradReq::kAdd) {
      for (float& v : want) v += 0.5f;
    }
    EXPECT_EQ(grad.ToVector(), want);
  }
}

// ---- The kernel layer's pooling (PoolKernel, PoolGradKernel: GPUs run
// them for what cuDNN lacks, and with cudnn_off) against the operator's
// CPU code, bit for bit: every type, both conventions, padding, strides
// smaller and larger than the window, global pooling, writing and adding,
// on data full of ties and with a NaN.

struct PoolCase {
  Params params;
  int64_t k[2], s[2], p[2];
};

struct Pooled {
  std::vector<float> out, grad;
};

Pooled PoolOnTheCpu(const Symbol& s, const std::vector<float>& data, const Shape& shape,
                    const std::vector<float>& head, GradReq req) {
  NDArray grad = Full(shape, 0.5f);
  auto exec = Executor::Bind(s, cpu(), {{"data", FromVector(data, shape)}}, {{"data", grad}},
                             {{"data", req}});
  EXPECT_TRUE(exec.ok()) << exec.status();
  if (!exec.ok()) return {};
  (*exec)->Forward(true);
  (*exec)->Backward({FromVector(head, (*exec)->outputs()[0].shape())});
  return {(*exec)->outputs()[0].ToVector(), grad.ToVector()};
}

Pooled PoolWithTheKernels(const kernel::PoolWindows& w, const std::vector<float>& data,
                          const std::vector<float>& head, bool add) {
  Pooled r{std::vector<float>(head.size(), 0.5f), std::vector<float>(data.size(), 0.5f)};
  kernel::Launch<kernel::PoolKernel>("test", cpu(), static_cast<int64_t>(head.size()),
                                     {r.out.data(), data.data(), w, add});
  kernel::Launch<kernel::PoolGradKernel>("test", cpu(), static_cast<int64_t>(data.size()),
                                         {r.grad.data(), data.data(), head.data(), w, add});
  return r;
}

// Equal as bits, so that NaNs compare.
void ExpectSameBits(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(std::isnan(got[i]), std::isnan(want[i])) << "at " << i;
    if (!std::isnan(want[i])) {
      ASSERT_EQ(got[i], want[i]) << "at " << i;
    }
  }
}

TEST(PoolingKernels, MatchTheCpuOperatorBitForBit) {
  const Shape shape{2, 3, 7, 8};
  std::vector<float> data(shape.Size());
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>((i * 7 + i / 5) % 4) / 3;
  std::vector<float> with_nan = data;
  with_nan[19] = std::nanf("");
  const std::vector<PoolCase> cases = {
      {{{"kernel", "(2,2)"}, {"stride", "(2,2)"}}, {2, 2}, {2, 2}, {0, 0}},
      {{{"kernel", "(3,3)"}}, {3, 3}, {1, 1}, {0, 0}},
      {{{"kernel", "(3,2)"}, {"stride", "(2,3)"}, {"pad", "(1,1)"}}, {3, 2}, {2, 3}, {1, 1}},
      {{{"kernel", "(2,3)"}, {"stride", "(3,2)"}, {"pad", "(1,0)"}, {"pooling_convention", "full"}},
       {2, 3},
       {3, 2},
       {1, 0}},
      {{{"kernel", "(3,3)"}, {"stride", "(2,2)"}, {"pooling_convention", "full"}},
       {3, 3},
       {2, 2},
       {0, 0}},
      {{{"global_pool", true}}, {7, 8}, {1, 1}, {0, 0}},
  };
  for (const PoolCase& c : cases) {
    for (const char* type : {"max", "avg", "sum"}) {
      for (const bool count_pad : {true, false}) {
        Params params = c.params;
        params.push_back({"pool_type", type});
        params.push_back({"count_include_pad", count_pad});
        const Symbol s = Op("Pooling", {Variable("data")}, params, "pool");
        auto shapes = s.InferShape({{"data", shape}});
        ASSERT_TRUE(shapes.ok()) << shapes.status();
        const Shape out = shapes->outputs[0];
        const kernel::PoolWindows w{shape[2],
                                    shape[3],
                                    out[2],
                                    out[3],
                                    {c.k[0], c.k[1]},
                                    {c.s[0], c.s[1]},
                                    {c.p[0], c.p[1]},
                                    std::string(type) == "max"   ? kernel::PoolWindows::kMax
                                    : std::string(type) == "avg" ? kernel::PoolWindows::kAvg
                                                                 : kernel::PoolWindows::kSum,
                                    count_pad};
        std::vector<float> head(out.Size());
        for (size_t i = 0; i < head.size(); ++i) head[i] = static_cast<float>(i % 5 + 1) / 4;
        for (const std::vector<float>* x : {&data, &with_nan}) {
          for (GradReq req : {GradReq::kWrite, GradReq::kAdd}) {
            SCOPED_TRACE(::testing::Message()
                         << type << " " << out.ToString() << (count_pad ? " count_pad" : "")
                         << (x == &data ? "" : " nan") << (req == GradReq::kAdd ? " add" : " write")
                         << " k=(" << c.k[0] << "," << c.k[1] << ") s=(" << c.s[0] << "," << c.s[1]
                         << ") p=(" << c.p[0] << "," << c.p[1] << ")");
            const Pooled want = PoolOnTheCpu(s, *x, shape, head, req);
            const Pooled got = PoolWithTheKernels(w, *x, head, req == GradReq::kAdd);
            std::vector<float> want_out = want.out;
            if (req == GradReq::kAdd) {
              for (float& v : want_out) v += 0.5f;  // the kernel adds to 0.5s
            }
            ExpectSameBits(got.out, want_out);
            ExpectSameBits(got.grad, want.grad);
          }
        }
      }
    }
  }
}

// ---- Flatten and Reshape.

TEST(FlattenShapes, KeepsTheBatchAndMultipliesTheRest) {
  EXPECT_EQ(Infer(Unary("Flatten", {}), {{"data", Shape{2, 3, 4, 5}}}).outputs[0],
            (Shape{2, 60}));
  EXPECT_EQ(Infer(Unary("Flatten", {}), {{"data", Shape{0, 3, 4}}}).outputs[0], (Shape{0, 12}));
  EXPECT_EQ(Infer(Unary("Flatten", {}), {{"data", Shape{5}}}).outputs[0], (Shape{5, 1}));
}

Shape ReshapeOf(Shape data, const std::string& shape, bool reverse = false) {
  Symbol s = Unary("Reshape", {{"shape", shape}, {"reverse", reverse}});
  Symbol::Shapes shapes = Infer(s, {{"data", data}});
  return shapes.outputs.empty() ? Shape() : shapes.outputs[0];
}

TEST(ReshapeShapes, SpecialValuesAsMXNetDocumentsThem) {
  // The examples of MXNet's Reshape documentation.
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(4,0,2)"), (Shape{4, 3, 2}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(2,0,0)"), (Shape{2, 3, 4}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(6,1,-1)"), (Shape{6, 1, 4}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(3,-1,8)"), (Shape{3, 1, 8}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(-1,)"), (Shape{24}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(-2,)"), (Shape{2, 3, 4}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(2,-2)"), (Shape{2, 3, 4}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(-2,1,1)"), (Shape{2, 3, 4, 1, 1}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(-3,4)"), (Shape{6, 4}));
  EXPECT_EQ(ReshapeOf({2, 3, 4, 5}, "(-3,-3)"), (Shape{6, 20}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(0,-3)"), (Shape{2, 12}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(-3,-2)"), (Shape{6, 4}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(-4,1,2,-2)"), (Shape{1, 2, 3, 4}));
  EXPECT_EQ(ReshapeOf({2, 3, 4}, "(2,-4,-1,3,-2)"), (Shape{2, 1, 3, 4}));
  EXPECT_EQ(ReshapeOf({10, 5, 4}, "(-1,0)"), (Shape{40, 5}));
  EXPECT_EQ(ReshapeOf({10, 5, 4}, "(-1,0)", true), (Shape{50, 4}));
}

TEST(ReshapeShapes, PartialKnowledgeInBothDirections) {
  // An unknown batch taken by the -1 leaves it unknown; one copied by 0
  // lets the -1 be inferred.
  EXPECT_EQ(ReshapeOf({0, 784}, "(-1,1,28,28)"), (Shape{0, 1, 28, 28}));
  EXPECT_EQ(ReshapeOf({0, 1, 28, 28}, "(0,-1)"), (Shape{0, 784}));
  EXPECT_EQ(ReshapeOf({0, 3, 4}, "(-1,-2)"), (Shape{0, 3, 4}));
  EXPECT_EQ(ReshapeOf({0, 6, 2}, "(0,-1,3)"), (Shape{0, 4, 3}));
  EXPECT_EQ(ReshapeOf({0, 3, 4}, "(-3,-1)"), (Shape{0, 0}));
  // A known output fills the single unknown input dimension.
  Symbol s = Unary("Reshape", {{"shape", "(-1,784)"}});
  s = Op("FullyConnected", {s}, {{"num_hidden", 10}}, "fc");
  Symbol::Shapes shapes = Infer(s, {{"data", Shape{0, 28, 28}}, {"fc_weight", Shape{10, 784}}});
  EXPECT_EQ(shapes.arguments[0], (Shape{0, 28, 28}));  // the batch is still unknown
  Symbol r = Unary("Reshape", {{"shape", "(32,784)"}});
  EXPECT_EQ(Infer(r, {{"data", Shape{0, 28, 28}}}).arguments[0], (Shape{32, 28, 28}));
}

TEST(ReshapeShapes, ErrorsNameTheShapes) {
  std::string e = InferError(Unary("Reshape", {{"shape", "(5,-1)"}}), {{"data", Shape{2, 3, 4}}});
  EXPECT_THAT(e, HasSubstr("(2,3,4)"));
  EXPECT_THAT(e, HasSubstr("shape=(5,-1)"));
  e = InferError(Unary("Reshape", {{"shape", "(5,5)"}}), {{"data", Shape{2, 3, 4}}});
  EXPECT_THAT(e, HasSubstr("24 elements"));
  EXPECT_THAT(e, HasSubstr("25 elements"));
  EXPECT_THAT(InferError(Unary("Reshape", {{"shape", "(-1,-1)"}}), {{"data", Shape{2, 3}}}),
              HasSubstr("more than one -1"));
  EXPECT_THAT(InferError(Unary("Reshape", {{"shape", "(-4,5,-1)"}}), {{"data", Shape{6}}}),
              HasSubstr("-4 cannot split dimension 6"));
  EXPECT_THAT(InferError(Unary("Reshape", {{"shape", "(0,0,0)"}}), {{"data", Shape{2, 3}}}),
              HasSubstr("more dimensions than input data of shape (2,3)"));
  EXPECT_THAT(InferError(Unary("Reshape", {{"shape", "(-5,)"}}), {{"data", Shape{2, 3}}}),
              HasSubstr("-5 is not a dimension"));
  EXPECT_THAT(InferError(Unary("Reshape", {{"target_shape", "(5,)"}}), {{"data", Shape{2, 3}}}),
              HasSubstr("target_shape=(5,) (the legacy form of shape) does not fit"));
}

// MXNet 0.8's target_shape and keep_highest, used when shape is empty; its
// files write them beside a shape too (every parameter, target_shape
// (0,0) by default), which then wins: such files were refused.
TEST(ReshapeShapes, LegacyParametersAsMXNet08) {
  auto out = [](Params params, Shape data) {
    const Symbol::Shapes s = Infer(Unary("Reshape", params), {{"data", data}});
    return s.outputs.empty() ? Shape{} : s.outputs[0];
  };
  EXPECT_EQ(
      out({{"target_shape", "(0,0)"}, {"keep_highest", "False"}, {"shape", "(0,-1)"}}, {2, 3, 4}),
      (Shape{2, 12}));
  EXPECT_EQ(out({{"target_shape", "(6,)"}}, {2, 3}), (Shape{6}));
  EXPECT_EQ(out({{"target_shape", "(3,0)"}}, {2, 3, 4}), (Shape{3, 8}));
  EXPECT_EQ(out({{"target_shape", "(1,0)"}, {"keep_highest", "True"}}, {2, 3, 4}), (Shape{2, 12}));
}

// ---- Concat.

Symbol Concat2(Params params) {
  return Op("Concat", {Variable("a"), Variable("b")}, params, "cat");
}

TEST(ConcatShapes, SumsTheAxis) {
  Symbol::Shapes shapes = Infer(Concat2({{"num_args", 2}}),
                                {{"a", Shape{2, 3, 4}}, {"b", Shape{2, 5, 4}}});
  EXPECT_EQ(shapes.outputs[0], (Shape{2, 8, 4}));
  shapes = Infer(Concat2({{"num_args", 2}, {"dim", -1}}), {{"a", Shape{2, 3}}, {"b", Shape{2, 1}}});
  EXPECT_EQ(shapes.outputs[0], (Shape{2, 4}));
}

TEST(ConcatShapes, CompletesInputsFromEachOtherAndTheOutput) {
  // b's other dimensions come from a; its axis from the output.
  Symbol s = Op("Reshape", {Concat2({{"num_args", 2}})}, {{"shape", "(2,20)"}}, "r");
  Symbol::Shapes shapes = Infer(s, {{"a", Shape{2, 3, 4}}, {"b", Shape{0, 0, 0}}});
  EXPECT_EQ(shapes.arguments[1], (Shape{2, 2, 4}));
  // Unknown axis on one input: the output's axis stays unknown.
  shapes = Infer(Concat2({{"num_args", 2}}), {{"a", Shape{2, 3, 4}}, {"b", Shape{2, 0, 4}}});
  EXPECT_EQ(shapes.outputs[0], (Shape{2, 0, 4}));
}

TEST(ConcatShapes, MismatchesNameTheInputs) {
  std::string e =
      InferError(Concat2({{"num_args", 2}}), {{"a", Shape{2, 3, 4}}, {"b", Shape{3, 3, 4}}});
  EXPECT_THAT(e, HasSubstr("input arg1"));
  EXPECT_THAT(e, HasSubstr("(3,3,4)"));
  e = InferError(Concat2({{"num_args", 2}}), {{"a", Shape{2, 3, 4}}, {"b", Shape{2, 3}}});
  EXPECT_THAT(e, HasSubstr("(2,3)"));
  EXPECT_THAT(e, HasSubstr("number of dimensions"));
  e = InferError(Concat2({{"num_args", 2}, {"dim", 3}}), {{"a", Shape{2, 3}}, {"b", Shape{2, 3}}});
  EXPECT_THAT(e, HasSubstr("dim=3"));
}

// ---- transpose.

TEST(TransposeShapes, PermutesAndReversesByDefault) {
  EXPECT_EQ(Infer(Unary("transpose", {}), {{"data", Shape{2, 3, 4}}}).outputs[0],
            (Shape{4, 3, 2}));
  EXPECT_EQ(Infer(Unary("transpose", {{"axes", "(0,2,3,1)"}}), {{"data", Shape{2, 3, 4, 5}}})
                .outputs[0],
            (Shape{2, 4, 5, 3}));
  EXPECT_EQ(Infer(Unary("transpose", {{"axes", "(1,0)"}}), {{"data", Shape{0, 7}}}).outputs[0],
            (Shape{7, 0}));
}

TEST(TransposeShapes, AxesMustBeAPermutation) {
  EXPECT_THAT(InferError(Unary("transpose", {{"axes", "(0,0,1)"}}), {{"data", Shape{2, 3, 4}}}),
              HasSubstr("not a permutation"));
  EXPECT_THAT(InferError(Unary("transpose", {{"axes", "(1,0)"}}), {{"data", Shape{2, 3, 4}}}),
              HasSubstr("axes=(1,0)"));
}

}  // namespace
}  // namespace mx
