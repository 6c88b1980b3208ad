// Executors bound on gpu(0) against the same graphs bound on the CPU: the
// MLP of the seed (FullyConnected, Activation, SoftmaxOutput), dot,
// convolution and pooling through cuDNN, BatchNorm, Embedding, Concat,
// transpose, broadcast arithmetic, sum and mean, LeakyReLU, Dropout, the regression
// losses, SoftmaxActivation, and a graph split between the CPU and the GPU
// (group2ctx), in forward and backward, with
// gradients written and accumulated (kAdd). Tolerance 1e-5 relative (cuBLAS
// and OpenBLAS sum products in different orders), 1e-4 through cuDNN's
// convolutions. Skipped, with the reason, without a GPU.
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "gtest/gtest.h"
#include "tests/gpu_skip.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

// Every operator of mx runs on GPUs; one that does not, for the refusal.
OpDef CpuOnlyOp() {
  OpDef op;
  op.name = "_test_cpu_only";
  op.infer_shape = [](const ParsedParams&, ShapeList* in, ShapeList* out, ShapeList*) {
    (*out)[0] = (*in)[0];
    return absl::OkStatus();
  };
  op.forward = [](const OpContext&, const ParsedParams&, const std::vector<TBlob>&,
                  const std::vector<OpReq>&, const std::vector<TBlob>&,
                  const std::vector<TBlob>&) {};
  return op;
}
MX_REGISTER_OP(CpuOnlyOp());

class GpuExecutor : public ::testing::Test {
 protected:
  void SetUp() override { MX_SKIP_WITHOUT_GPU(); }
};

void ExpectNear(const NDArray& want, const NDArray& got, float rel, const std::string& what) {
  ASSERT_EQ(want.shape(), got.shape()) << what;
  const std::vector<float> w = want.ToVector(), g = got.Copy(cpu()).ToVector();
  for (size_t i = 0; i < w.size(); ++i) {
    ASSERT_NEAR(g[i], w[i], rel * std::max(1.0f, std::fabs(w[i]))) << what << " at " << i;
  }
}

// Binds net on the CPU and on gpu(0) with the same random arguments (labels
// in [0, classes)), runs forward and backward `steps` times on each (with
// kAdd, gradients accumulate), and compares outputs and gradients.
void ExpectGpuMatchesCpu(const Symbol& net, const std::map<std::string, Shape>& shapes, int classes,
                         GradReq req, float rel = 1e-5f, bool train = true) {
  auto on_cpu = Executor::SimpleBind(net, cpu(), shapes, req, {{"label", GradReq::kNull}});
  auto on_gpu = Executor::SimpleBind(net, gpu(0), shapes, req, {{"label", GradReq::kNull}});
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  for (const auto& [name, array] : (*on_cpu)->arg_dict()) {
    NDArray value = RandomUniform(-1, 1, array.shape());
    if (name == "label") {
      std::vector<float> labels(array.size());
      for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<float>(i * 7 % classes);
      value.Assign(labels);
    }
    NDArray(array).Assign(value);
    NDArray((*on_gpu)->arg_dict().at(name)).Assign(value);
  }
  for (const auto& [name, array] : (*on_cpu)->aux_dict()) {  // moving statistics, as if trained
    NDArray value = RandomUniform(0.5f, 1.5f, array.shape());
    NDArray(array).Assign(value);
    NDArray((*on_gpu)->aux_dict().at(name)).Assign(value);
  }
  for (int step = 0; step < 2; ++step) {
    for (Executor* e : {on_cpu->get(), on_gpu->get()}) {
      e->Forward(train);
      if (train) e->Backward();
    }
  }
  for (size_t i = 0; i < (*on_cpu)->outputs().size(); ++i) {
    ExpectNear((*on_cpu)->outputs()[i], (*on_gpu)->outputs()[i], rel, "output");
  }
  for (const auto& [name, grad] : (*on_cpu)->grad_dict()) {
    ExpectNear(grad, (*on_gpu)->grad_dict().at(name), rel, "gradient of " + name);
  }
  for (const auto& [name, state] : (*on_cpu)->aux_dict()) {
    ExpectNear(state, (*on_gpu)->aux_dict().at(name), rel, "auxiliary state " + name);
  }
}

Symbol Mlp(const std::string& act) {
  Symbol net = Variable("data");
  net = Op("FullyConnected", {net}, {{"num_hidden", 64}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", act}}, "act1");
  net = Op("FullyConnected", {net}, {{"num_hidden", 10}, {"no_bias", true}}, "fc2");
  return Op("SoftmaxOutput", {net, Variable("label")}, {{"normalization", "batch"}}, "softmax");
}

TEST_F(GpuExecutor, AnMlpTrainsOnTheGpuAsOnTheCpuForEveryActivation) {
  for (const char* act : {"relu", "sigmoid", "tanh", "softrelu", "softsign"}) {
    SCOPED_TRACE(act);
    ExpectGpuMatchesCpu(Mlp(act), {{"data", {32, 20}}, {"label", {32}}}, 10, GradReq::kWrite);
  }
}

// On a GPU consecutive nodes run as one engine operation by default
// (graph/executor.h, "Bulks"); one operation per node must give the same
// bits, since the same kernels run in the same order on the same stream.
TEST_F(GpuExecutor, BulkedNodesGiveTheBitsOfOneOperationPerNode) {
  const std::map<std::string, Shape> shapes = {{"data", {32, 20}}, {"label", {32}}};
  std::vector<std::vector<float>> seen[2];
  for (const bool bulked : {true, false}) {
    setenv("MX_EXEC_BULK_GPU", bulked ? "15" : "1", 1);
    auto exec = Executor::SimpleBind(Mlp("relu"), gpu(0), shapes);
    unsetenv("MX_EXEC_BULK_GPU");
    ASSERT_TRUE(exec.ok()) << exec.status();
    mx::srand(3);
    for (const auto& [name, array] : (*exec)->arg_dict()) {
      NDArray(array).Assign(name == "label" ? Zeros(array.shape())
                                            : RandomUniform(-1, 1, array.shape()));
    }
    WaitAll();
    Engine::Get()->StartTrace();
    (*exec)->Forward(true);
    (*exec)->Backward();
    WaitAll();
    std::vector<std::string> names;
    for (const TraceEvent& e : Engine::Get()->StopTrace()) names.push_back(e.name);
    if (bulked) {
      EXPECT_THAT(names, ::testing::Contains("bulk(fc1 .. softmax)"));
      EXPECT_THAT(names, ::testing::Contains("bulk(softmax_backward .. fc1_backward)"));
    } else {
      EXPECT_THAT(names, ::testing::Contains("fc1_backward"));
    }
    std::vector<std::vector<float>>& values = seen[bulked ? 0 : 1];
    values.push_back((*exec)->outputs()[0].ToVector());
    for (const auto& [name, grad] : (*exec)->grad_dict()) values.push_back(grad.ToVector());
  }
  EXPECT_EQ(seen[0], seen[1]);
}

TEST_F(GpuExecutor, AccumulatedGradientsMatchTheCpu) {
  ExpectGpuMatchesCpu(Mlp("relu"), {{"data", {16, 12}}, {"label", {16}}}, 10, GradReq::kAdd);
}

TEST_F(GpuExecutor, DotMatchesTheCpuWithTransposes) {
  Symbol net = Op("dot", {Variable("a"), Variable("b")},
                  {{"transpose_a", true}, {"transpose_b", true}}, "dot");
  net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
  ExpectGpuMatchesCpu(net, {{"a", {7, 5}}, {"b", {9, 7}}, {"label", {5}}}, 9, GradReq::kWrite);
}

// A LeNet-like network through cuDNN: convolutions (bias, stride, pad,
// dilation, groups), max and avg pooling (with and without padding counted),
// Flatten and the MLP head. tanh, not relu, before max pooling: relu's
// zeros tie within windows, and cuDNN may send a tie's gradient to another
// element than the CPU's first maximum.
TEST_F(GpuExecutor, ConvolutionAndPoolingThroughCudnnMatchTheCpu) {
  Symbol net = Variable("data");
  net = Op("Convolution", {net}, {{"kernel", "(3,3)"}, {"num_filter", 8}, {"pad", "(1,1)"}},
           "conv1");
  net = Op("Activation", {net}, {{"act_type", "tanh"}}, "tanh1");
  net = Op("Pooling", {net}, {{"kernel", "(2,2)"}, {"stride", "(2,2)"}, {"pool_type", "max"}},
           "pool1");
  net = Op("Convolution", {net},
           {{"kernel", "(3,3)"}, {"num_filter", 8}, {"num_group", 2}, {"dilate", "(2,1)"},
            {"stride", "(1,2)"}, {"no_bias", true}},
           "conv2");
  net = Op("Pooling", {net},
           {{"kernel", "(2,2)"}, {"pad", "(1,1)"}, {"pool_type", "avg"},
            {"count_include_pad", false}},
           "pool2");
  net = Op("Pooling", {net}, {{"kernel", "(2,2)"}, {"pad", "(1,1)"}, {"pool_type", "avg"}},
           "pool3");
  net = Op("Flatten", {net}, {}, "flatten");
  net = Op("FullyConnected", {net}, {{"num_hidden", 10}}, "fc");
  net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
  // 1e-4: a weight gradient sums hundreds of products, in an order that
  // depends on the algorithm cuDNN's heuristics pick on the machine (one
  // H200 run differed from the CPU by 1.8e-5 relative).
  ExpectGpuMatchesCpu(net, {{"data", {4, 3, 16, 16}}, {"label", {4}}}, 10, GradReq::kWrite,
                      1e-4f);
  ExpectGpuMatchesCpu(net, {{"data", {2, 3, 16, 16}}, {"label", {2}}}, 10, GradReq::kAdd,
                      1e-4f);
}

TEST_F(GpuExecutor, GlobalPoolingMatchesTheCpu) {
  Symbol net = Op("Pooling", {Variable("data")}, {{"global_pool", true}, {"pool_type", "avg"}},
                  "gpool");
  net = Op("Flatten", {net}, {}, "flatten");
  net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
  ExpectGpuMatchesCpu(net, {{"data", {3, 5, 7, 6}}, {"label", {3}}}, 5, GradReq::kWrite);
}

// Every element-wise operator and scalar form, in a graph where outputs feed
// several consumers (so the executor accumulates their gradients).
TEST_F(GpuExecutor, ElementWiseOperatorsMatchTheCpu) {
  Symbol x = Variable("data");
  Symbol a = Op("FullyConnected", {x}, {{"num_hidden", 8}}, "fa");
  Symbol b = Op("FullyConnected", {x}, {{"num_hidden", 8}}, "fb");
  // pos in [1, 2]: a safe denominator.
  Symbol pos = Op("_plus_scalar", {Op("Activation", {b}, {{"act_type", "sigmoid"}}, "sb")},
                  {{"scalar", 1.0f}}, "pos");
  Symbol t = Op("elemwise_add", {a, b}, {}, "add");
  t = Op("elemwise_sub", {t, b}, {}, "sub");
  t = Op("elemwise_mul", {t, pos}, {}, "mul");
  t = Op("elemwise_div", {t, pos}, {}, "div");
  Symbol u = Op("_rdiv_scalar", {pos}, {{"scalar", 3.0f}}, "rdiv");
  u = Op("_rminus_scalar", {u}, {{"scalar", 1.0f}}, "rminus");
  u = Op("_mul_scalar", {u}, {{"scalar", 0.5f}}, "muls");
  u = Op("_div_scalar", {u}, {{"scalar", 2.0f}}, "divs");
  u = Op("_minus_scalar", {u}, {{"scalar", 0.25f}}, "minuss");
  Symbol net = Op("elemwise_add", {t, u}, {}, "sum");
  net = Op("FullyConnected", {net}, {{"num_hidden", 10}}, "fc");
  net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
  ExpectGpuMatchesCpu(net, {{"data", {6, 5}}, {"label", {6}}}, 10, GradReq::kWrite);
  ExpectGpuMatchesCpu(net, {{"data", {6, 5}}, {"label", {6}}}, 10, GradReq::kAdd);
}

// The rows that count are counted on the GPU (labels i * 7 % 5: 0 is
// ignored in 2 of the 6 rows).
TEST_F(GpuExecutor, SoftmaxOutputWithIgnoredLabelsMatchesTheCpu) {
  for (const char* norm : {"valid", "batch", "null"}) {
    SCOPED_TRACE(norm);
    Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 5}}, "fc");
    net = Op("SoftmaxOutput", {net, Variable("label")},
             {{"normalization", norm}, {"use_ignore", true}, {"ignore_label", 0.0f}}, "softmax");
    ExpectGpuMatchesCpu(net, {{"data", {6, 4}}, {"label", {6}}}, 5, GradReq::kWrite);
    ExpectGpuMatchesCpu(net, {{"data", {6, 4}}, {"label", {6}}}, 5, GradReq::kAdd);
  }
}

TEST_F(GpuExecutor, LeakyReluOfEveryTypeMatchesTheCpu) {
  for (const char* act : {"leaky", "elu", "selu", "gelu", "prelu"}) {
    SCOPED_TRACE(act);
    Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 12}}, "fc1");
    net = Op("Reshape", {net}, {{"shape", "(0, 3, 4)"}}, "r");
    net = Op("LeakyReLU", {net}, {{"act_type", act}, {"slope", 0.3f}}, "lrelu");
    net = Op("FullyConnected", {Op("Flatten", {net}, {}, "flat")}, {{"num_hidden", 5}}, "fc2");
    net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
    ExpectGpuMatchesCpu(net, {{"data", {8, 6}}, {"label", {8}}}, 5, GradReq::kWrite);
    ExpectGpuMatchesCpu(net, {{"data", {8, 6}}, {"label", {8}}}, 5, GradReq::kAdd);
  }
}

TEST_F(GpuExecutor, BatchNormMatchesTheCpuInTrainingWithItsMovingStatistics) {
  for (const bool fix_gamma : {true, false}) {
    SCOPED_TRACE(fix_gamma ? "fix_gamma" : "learnt gamma");
    Symbol net = Op("Convolution", {Variable("data")},
                    {{"kernel", "(3,3)"}, {"num_filter", 4}, {"pad", "(1,1)"}}, "conv");
    net = Op("BatchNorm", {net}, {{"fix_gamma", fix_gamma}, {"output_mean_var", true}}, "bn");
    net = Op("FullyConnected", {Op("Flatten", {net[0]}, {}, "flat")}, {{"num_hidden", 3}}, "fc");
    net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
    ExpectGpuMatchesCpu(net, {{"data", {5, 2, 6, 6}}, {"label", {5}}}, 3, GradReq::kWrite, 1e-4f);
    ExpectGpuMatchesCpu(net, {{"data", {5, 2, 6, 6}}, {"label", {5}}}, 3, GradReq::kAdd, 1e-4f);
  }
}

// Inference (the moving statistics), use_global_stats in training, and a
// channel axis other than 1.
TEST_F(GpuExecutor, BatchNormMatchesTheCpuInInferenceWithGlobalStatsAndOnOtherAxes) {
  auto net = [](Params bn) {
    Symbol s = Op("BatchNorm", {Variable("data")}, bn, "bn");
    s = Op("FullyConnected", {Op("Flatten", {s}, {}, "flat")}, {{"num_hidden", 3}}, "fc");
    return Op("SoftmaxOutput", {s, Variable("label")}, {}, "softmax");
  };
  const std::map<std::string, Shape> shapes = {{"data", {5, 4, 3, 3}}, {"label", {5}}};
  ExpectGpuMatchesCpu(net({{"fix_gamma", false}}), shapes, 3, GradReq::kWrite, 1e-5f,
                      /*train=*/false);
  ExpectGpuMatchesCpu(net({{"fix_gamma", false}, {"use_global_stats", true}}), shapes, 3,
                      GradReq::kWrite);
  for (const int axis : {-1, 2}) {
    SCOPED_TRACE(axis);
    ExpectGpuMatchesCpu(net({{"fix_gamma", false}, {"axis", axis}}), shapes, 3, GradReq::kAdd);
  }
}

// Indices repeat (their gradients add up in one row) and fall outside
// [0, input_dim) (clipped); the data gets no gradient.
TEST_F(GpuExecutor, EmbeddingMatchesTheCpu) {
  Symbol data = Variable("data");
  Symbol idx = Op("_mul_scalar", {Op("_plus_scalar", {data}, {{"scalar", 1.0f}}, "p")},
                  {{"scalar", 4.0f}}, "idx");  // data in [-1, 1): indices in [0, 8)
  Symbol net = Op("Embedding", {idx}, {{"input_dim", 6}, {"output_dim", 5}}, "emb");
  net = Op("FullyConnected", {Op("Flatten", {net}, {}, "flat")}, {{"num_hidden", 3}}, "fc");
  net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
  ExpectGpuMatchesCpu(net, {{"data", {7, 4}}, {"label", {7}}}, 3, GradReq::kWrite);
  ExpectGpuMatchesCpu(net, {{"data", {7, 4}}, {"label", {7}}}, 3, GradReq::kAdd);
}

TEST_F(GpuExecutor, BroadcastArithmeticAndReductionsMatchTheCpu) {
  Symbol a = Op("Reshape", {Op("FullyConnected", {Variable("data")}, {{"num_hidden", 12}}, "fa")},
                {{"shape", "(0, 3, 4)"}}, "ra");  // (n, 3, 4)
  Symbol b = Op("Reshape", {Op("FullyConnected", {Variable("data")}, {{"num_hidden", 4}}, "fb")},
                {{"shape", "(0, 1, 4)"}}, "rb");  // (n, 1, 4)
  Symbol c = Op("Reshape", {Op("FullyConnected", {Variable("data")}, {{"num_hidden", 3}}, "fc")},
                {{"shape", "(0, 3, 1)"}}, "rc");  // (n, 3, 1)
  Symbol pos = Op("_plus_scalar", {Op("Activation", {c}, {{"act_type", "sigmoid"}}, "sc")},
                  {{"scalar", 1.0f}}, "pos");
  Symbol t = Op("broadcast_add", {a, b}, {}, "badd");
  t = Op("broadcast_sub", {t, c}, {}, "bsub");
  t = Op("broadcast_mul", {b, t}, {}, "bmul");
  t = Op("broadcast_div", {t, pos}, {}, "bdiv");
  Symbol s = Op("sum", {t}, {{"axis", "(1)"}}, "s");                      // (n, 4)
  Symbol m = Op("mean", {t}, {{"axis", "(2)"}, {"keepdims", true}}, "m");  // (n, 3, 1)
  Symbol net = Op("Concat", {s, Op("Flatten", {m}, {}, "fm")}, {{"num_args", 2}}, "cat");
  net = Op("LinearRegressionOutput", {net, Variable("label")}, {}, "out");
  ExpectGpuMatchesCpu(net, {{"data", {5, 6}}, {"label", {5, 7}}}, 2, GradReq::kWrite);
  ExpectGpuMatchesCpu(net, {{"data", {5, 6}}, {"label", {5, 7}}}, 2, GradReq::kAdd);
}

TEST_F(GpuExecutor, ConcatAndTransposeMatchTheCpu) {
  Symbol a = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 12}}, "fa");
  Symbol b = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 6}}, "fb");
  Symbol ra = Op("Reshape", {a}, {{"shape", "(0, 4, 3)"}}, "ra");
  Symbol rb = Op("Reshape", {b}, {{"shape", "(0, 2, 3)"}}, "rb");
  Symbol cat = Op("Concat", {ra, rb}, {{"num_args", 2}, {"dim", 1}}, "cat");  // (n, 6, 3)
  Symbol t = Op("transpose", {cat}, {{"axes", "(2, 0, 1)"}}, "t");           // (3, n, 6)
  Symbol net = Op("transpose", {t}, {}, "back");                             // (6, n, 3)
  net = Op("FullyConnected", {Op("Flatten", {net}, {}, "flat")}, {{"num_hidden", 4}}, "fc");
  net = Op("LinearRegressionOutput", {net, Variable("label")}, {}, "out");
  ExpectGpuMatchesCpu(net, {{"data", {6, 5}}, {"label", {6, 4}}}, 2, GradReq::kWrite);
  ExpectGpuMatchesCpu(net, {{"data", {6, 5}}, {"label", {6, 4}}}, 2, GradReq::kAdd);
}

TEST_F(GpuExecutor, RegressionOutputsAndChannelSoftmaxMatchTheCpu) {
  for (const char* loss : {"LinearRegressionOutput", "LogisticRegressionOutput",
                           "MAERegressionOutput"}) {
    SCOPED_TRACE(loss);
    Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 3}}, "fc");
    net = Op(loss, {net, Variable("label")}, {{"grad_scale", 0.5f}}, "out");
    ExpectGpuMatchesCpu(net, {{"data", {4, 5}}, {"label", {4, 3}}}, 2, GradReq::kWrite);
  }
  Symbol net = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 24}}, "fc");
  net = Op("Reshape", {net}, {{"shape", "(0, 4, 6)"}}, "r");
  net = Op("SoftmaxActivation", {net}, {{"mode", "channel"}}, "sm");
  net = Op("LinearRegressionOutput", {Op("Flatten", {net}, {}, "flat"), Variable("label")}, {},
           "out");
  ExpectGpuMatchesCpu(net, {{"data", {3, 5}}, {"label", {3, 24}}}, 2, GradReq::kWrite);
}

// Dropout draws on the GPU what it draws on the CPU for the same seed; the
// executors draw their own seeds, so the check is the mask's use.
TEST_F(GpuExecutor, DropoutAppliesItsMaskOnTheGpu) {
  Symbol net = Op("Dropout", {Variable("data")}, {{"p", 0.5f}, {"axes", "(1)"}}, "drop");
  auto e = Executor::SimpleBind(net, gpu(0), {{"data", {4, 3, 5}}});
  ASSERT_TRUE(e.ok()) << e.status();
  NDArray(((*e)->arg_dict().at("data"))).Assign(1.0f);
  (*e)->Forward(true);
  (*e)->Backward({Ones({4, 3, 5}, gpu(0)) * 3.0f});
  const std::vector<float> y = (*e)->outputs()[0].Copy(cpu()).ToVector();
  const std::vector<float> gx = (*e)->grad_dict().at("data").Copy(cpu()).ToVector();
  int kept = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    ASSERT_TRUE(y[i] == 0.0f || y[i] == 2.0f) << y[i];
    ASSERT_EQ(y[i], y[i % 5 + (i / 15) * 15]) << "not shared along axis 1 at " << i;
    ASSERT_EQ(gx[i], 3.0f * y[i]) << i;
    kept += y[i] > 0;
  }
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, static_cast<int>(y.size()));
}

// A graph split between the CPU and the GPU (group2ctx): the executor
// copies activations over and gradients back.
TEST_F(GpuExecutor, AGraphSplitBetweenCpuAndGpuTrainsAsOnTheCpu) {
  Symbol h;
  {
    AttrScope stage1({{"ctx_group", "host"}});
    h = Op("FullyConnected", {Variable("data")}, {{"num_hidden", 16}}, "fc1");
    h = Op("Activation", {h}, {{"act_type", "relu"}}, "relu1");
  }
  AttrScope stage2({{"ctx_group", "device"}});
  Symbol net = Op("FullyConnected", {h}, {{"num_hidden", 4}}, "fc2");
  net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
  const std::map<std::string, Shape> shapes = {{"data", {8, 10}}, {"label", {8}}};
  auto one = Executor::SimpleBind(net, cpu(), shapes, GradReq::kWrite, {{"label", GradReq::kNull}});
  auto split = Executor::SimpleBind(net, cpu(), shapes, GradReq::kWrite, {{"label", GradReq::kNull}},
                                    {{"host", cpu()}, {"device", gpu(0)}});
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_TRUE(split.ok()) << split.status();
  EXPECT_EQ((*split)->arg_dict().at("fc1_weight").context(), cpu());
  EXPECT_EQ((*split)->arg_dict().at("fc2_weight").context(), gpu(0));
  for (const auto& [name, array] : (*one)->arg_dict()) {
    NDArray value = name == "label" ? FromVector({0, 1, 2, 3, 0, 1, 2, 3}) : RandomUniform(-1, 1, array.shape());
    NDArray(array).Assign(value);
    NDArray((*split)->arg_dict().at(name)).Assign(value);
  }
  for (Executor* e : {one->get(), split->get()}) {
    e->Forward(true);
    e->Backward();
  }
  EXPECT_EQ((*split)->outputs()[0].context(), gpu(0));
  ExpectNear((*one)->outputs()[0], (*split)->outputs()[0], 1e-5f, "output");
  for (const auto& [name, grad] : (*one)->grad_dict()) {
    ExpectNear(grad, (*split)->grad_dict().at(name), 1e-5f, "gradient of " + name);
  }
}

TEST_F(GpuExecutor, BindingAnOperatorWithoutAGpuImplementationIsRefusedNamingIt) {
  Symbol net = Op("_test_cpu_only", {Variable("data")}, {}, "c1");
  auto e = Executor::SimpleBind(net, gpu(0), {{"data", {2, 3}}}, GradReq::kNull);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("c1 (_test_cpu_only)"));
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("gpu(0)"));
}

// What cuDNN lacks (sum, the full convention) and cudnn_off=True run
// through the kernel layer, which keeps the CPU's rule for tied maxima: the
// data comes from a convolution of random values, the head gradient from
// SoftmaxOutput.
TEST_F(GpuExecutor, PoolingThroughTheKernelLayerMatchesTheCpu) {
  const std::vector<Params> pools = {
      {{"kernel", "(3,3)"}, {"stride", "(2,2)"}, {"pooling_convention", "full"}},
      {{"kernel", "(3,2)"}, {"stride", "(2,1)"}, {"pad", "(1,1)"}, {"pool_type", "sum"}},
      {{"kernel", "(2,3)"},
       {"stride", "(3,2)"},
       {"pad", "(1,0)"},
       {"pool_type", "avg"},
       {"pooling_convention", "full"},
       {"count_include_pad", false}},
      {{"kernel", "(2,2)"}, {"stride", "(2,2)"}, {"cudnn_off", true}},
      {{"global_pool", true}, {"pool_type", "sum"}},
  };
  for (const Params& pool : pools) {
    SCOPED_TRACE(::testing::Message() << "pool " << &pool - pools.data());
    Symbol net =
        Op("Convolution", {Variable("data")}, {{"kernel", "(3,3)"}, {"num_filter", 4}}, "conv");
    net = Op("Pooling", {net}, pool, "pool");
    net = Op("FullyConnected", {Op("Flatten", {net}, {}, "flat")}, {{"num_hidden", 5}}, "fc");
    net = Op("SoftmaxOutput", {net, Variable("label")}, {}, "softmax");
    ExpectGpuMatchesCpu(net, {{"data", {3, 2, 11, 10}}, {"label", {3}}}, 5, GradReq::kWrite, 1e-4f);
    ExpectGpuMatchesCpu(net, {{"data", {3, 2, 11, 10}}, {"label", {3}}}, 5, GradReq::kAdd, 1e-4f);
  }
}

}  // namespace
}  // namespace mx
