// End-to-end training as a user runs it (data loading, shuffling and the
// optimizer included) of the MLP, LeNet and the zoo's ResNet on
// Fashion-MNIST (train_bench [mlp|lenet|resnet]), against the same
// training in PyTorch at its best thread setting, in the same run. Also
// reports both test accuracies: the speed target holds only at equal or
// better accuracy. Round r trains with seed r on both sides; the speed is
// the best round's, the accuracy the mean over rounds (one seed's accuracy
// varies by about +-0.006 for either).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "bench/bench_util.h"
#include "bench/torch_runner.h"
#include "worker/io.h"
#include "worker/model.h"
#include "worker/zoo.h"

namespace mx::bench {
namespace {

constexpr char kDir[] = "/usr/share/datasets/fashion-mnist";

struct Result {
  double samples_per_s, accuracy;
};

std::unique_ptr<DataIter> Mnist(bool train, uint64_t seed) {
  MnistOptions o;
  const std::string prefix = std::string(kDir) + (train ? "/train" : "/t10k");
  o.images = prefix + "-images-idx3-ubyte.gz";
  o.labels = prefix + "-labels-idx1-ubyte.gz";
  o.batch_size = 100;
  o.shuffle = train;
  o.seed = seed;
  auto it = MnistIter(o);
  ThrowIfError(it.status());
  return PrefetchingIter(*std::move(it));
}

// PyTorch's Conv2d and Linear draw their biases from U(-1/sqrt(fan_in),
// 1/sqrt(fan_in)) (mx's initializers start biases at 0): drawn here so that
// both sides train the same model. With zero biases LeNet's mean accuracy
// over seeds 0-3 was 0.8728 against PyTorch's 0.8784; with these, 0.8779.
void InitBiasesAsPyTorch(const Symbol& net, const Shape& data, FeedForward* model) {
  auto shapes = net.InferShape({{"data", data}});
  ThrowIfError(shapes.status());
  const std::vector<std::string> names = net.ListArguments();
  std::map<std::string, Shape> arg;
  for (size_t i = 0; i < names.size(); ++i) arg[names[i]] = shapes->arguments[i];
  for (const auto& [name, shape] : arg) {
    absl::string_view layer = name;
    if (!absl::ConsumeSuffix(&layer, "_bias")) continue;
    auto weight = arg.find(absl::StrCat(layer, "_weight"));
    if (weight == arg.end() || weight->second.ndim() < 2) continue;
    const double fan_in = static_cast<double>(weight->second.Size()) / weight->second[0];
    const float bound = static_cast<float>(1.0 / std::sqrt(fan_in));
    model->arg_params()[name] = RandomUniform(-bound, bound, shape);
  }
}

Result TrainMx(const Symbol& net, int epochs, float lr, float momentum, uint64_t seed) {
  srand(seed);
  const double start = NowSeconds();
  auto train = Mnist(true, seed);  // reading the files counts, as in PyTorch
  FeedForward model(net);
  InitBiasesAsPyTorch(net, train->ProvideData()[0].shape, &model);
  FitOptions f;
  f.num_epoch = epochs;
  f.optimizer_options = {{"learning_rate", std::to_string(lr)},
                         {"momentum", std::to_string(momentum)}};
  // The weight rule of PyTorch's Conv2d and Linear (uniform within
  // 1/sqrt(fan_in)), so that both sides train the same model; with MXNet's
  // default Xavier (avg, magnitude 3) LeNet ended about 0.005 lower
  // (seeds 0-1: 0.8762, 0.8768 vs 0.8819, 0.8793).
  f.initializer = "xavier";
  f.initializer_options = {{"factor_type", "in"}, {"magnitude", "1"}};
  ThrowIfError(model.Fit(train.get(), nullptr, f));
  const double seconds = NowSeconds() - start;
  auto test = Mnist(false, seed);
  auto score = model.Score(test.get(), "accuracy");
  ThrowIfError(score.status());
  return {epochs * 60000.0 / seconds, (*score)[0].second};
}

// Mean and standard error of the mean ("m +- se") of per-seed accuracies.
std::string MeanAndError(const std::vector<double>& v) {
  if (v.empty()) return "n/a";
  double mean = 0;
  for (double x : v) mean += x / v.size();
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean) / std::max<size_t>(v.size() - 1, 1);
  return absl::StrFormat("%.4f +- %.4f", mean, std::sqrt(var / v.size()));
}

// Alternating rounds (see the top): best speed, mean accuracy per side.
// Each seed's accuracy is printed, and the means with their standard
// errors: "equal accuracy" is a claim about those means, and one seed's
// test accuracy after one epoch moves by several points with rounding
// alone where BatchNorm's moving statistics are young (the ResNet).
void Compare(const std::string& name, const Symbol& net, int epochs, int rounds, float lr,
             float momentum, double target) {
  double mx_speed = 0, torch_speed = 0;
  std::vector<double> mx_accuracy, torch_accuracy;
  for (int seed = 0; seed < rounds; ++seed) {
    const Result r = TrainMx(net, epochs, lr, momentum, seed);
    mx_speed = std::max(mx_speed, r.samples_per_s);
    mx_accuracy.push_back(r.accuracy);
    auto t = RunTorchBest("train_epochs " + name + " {threads} " + std::to_string(epochs) + " " +
                          std::to_string(lr) + " " + std::to_string(momentum) + " " + kDir + " " +
                          std::to_string(seed));
    std::printf("# %s seed %d: mx %.0f samples/s, test accuracy %.4f", name.c_str(), seed,
                r.samples_per_s, r.accuracy);
    if (t) {
      torch_speed = std::max(torch_speed, t->samples_per_s);
      torch_accuracy.push_back(t->accuracy);
      std::printf("; PyTorch %.0f samples/s, test accuracy %.4f", t->samples_per_s, t->accuracy);
    }
    std::printf("\n");
  }
  std::printf(
      "# %s: test accuracy over seeds 0-%d after %d epoch(s), mean +- standard error: "
      "mx %s, PyTorch %s\n",
      name.c_str(), rounds - 1, epochs, MeanAndError(mx_accuracy).c_str(),
      MeanAndError(torch_accuracy).c_str());
  Report("train_e2e_" + name, mx_speed, "samples/s", torch_speed,
         torch_speed > 0 ? mx_speed / torch_speed : 0,
         ">=" + std::to_string(target).substr(0, 3) + "(vs_pytorch_best,equal_accuracy)");
}

}  // namespace
}  // namespace mx::bench

int main(int argc, char** argv) {
  using namespace mx::bench;
  std::string only = argc > 1 ? argv[1] : "";
  // train_bench MODEL ROUNDS: that many seeds instead of the default.
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 0;
  auto or_default = [&](int n) { return rounds > 0 ? rounds : n; };
  // The configurations of the accuracy targets: MLP 10 epochs, LeNet 2,
  // the zoo's ResNet 1. Speed targets: issue 20's.
  // Rounds (seeds): enough for a mean accuracy within about +-0.003 for
  // the MLP and LeNet; a round takes about 25 s for the MLP, 90 s for LeNet
  // and 70 s for the ResNet (both sides). The ResNet trains at lr 0.01: at
  // 0.05 one seed's test accuracy after its epoch ranged 0.25-0.71 for mx
  // (seeds 0-3; 0.58-0.65 for PyTorch), as BatchNorm's moving statistics
  // lag the last steps' large moves (refreshed with the final weights, all
  // four gave 0.76-0.79); at 0.01, 0.65-0.72 (PyTorch 0.61-0.69).
  if (only.empty() || only == "mlp")
    Compare("mlp", mx::zoo::Mlp(), 10, or_default(3), 0.1f, 0.0f, 2.0);
  if (only.empty() || only == "lenet")
    Compare("lenet", mx::zoo::LeNet(), 2, or_default(4), 0.05f, 0.9f, 1.8);
  if (only.empty() || only == "resnet") {
    Compare("resnet", mx::zoo::ResNet(), 1, or_default(4), 0.01f, 0.9f, 1.5);
  }
  return ExitCode("train_bench", only);
}
