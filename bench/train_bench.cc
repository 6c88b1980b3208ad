// End-to-end training as a user runs it (data loading, shuffling and the
// optimizer included) of the MLP and LeNet on Fashion-MNIST, against the same
// training in PyTorch at its best thread setting, in the same run. Also
// reports both test accuracies: the speed target holds only at equal or
// better accuracy.
#include <cstdio>
#include <string>

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

std::unique_ptr<DataIter> Mnist(bool train) {
  MnistOptions o;
  const std::string prefix = std::string(kDir) + (train ? "/train" : "/t10k");
  o.images = prefix + "-images-idx3-ubyte.gz";
  o.labels = prefix + "-labels-idx1-ubyte.gz";
  o.batch_size = 100;
  o.shuffle = train;
  auto it = MnistIter(o);
  ThrowIfError(it.status());
  return PrefetchingIter(*std::move(it));
}

Result TrainMx(const Symbol& net, int epochs, float lr, float momentum) {
  srand(0);
  const double start = NowSeconds();
  auto train = Mnist(true);  // reading the files counts, as in PyTorch
  FeedForward model(net);
  FitOptions f;
  f.num_epoch = epochs;
  f.optimizer_options = {{"learning_rate", std::to_string(lr)},
                         {"momentum", std::to_string(momentum)}};
  f.initializer = "xavier";
  ThrowIfError(model.Fit(train.get(), nullptr, f));
  const double seconds = NowSeconds() - start;
  auto test = Mnist(false);
  auto score = model.Score(test.get(), "accuracy");
  ThrowIfError(score.status());
  return {epochs * 60000.0 / seconds, (*score)[0].second};
}

// Best of `rounds` alternating rounds per side (see graph_bench.cc).
void Compare(const std::string& name, const Symbol& net, int epochs, float lr, float momentum,
             double target) {
  Result mx{0, 0};
  std::optional<TorchResult> torch;
  const int rounds = epochs > 2 ? 2 : 1;  // LeNet takes minutes per round
  for (int round = 0; round < rounds; ++round) {
    Result r = TrainMx(net, epochs, lr, momentum);
    if (r.samples_per_s > mx.samples_per_s) mx = r;
    auto t = RunTorchBest("train_epochs " + name + " {threads} " + std::to_string(epochs) + " " +
                          std::to_string(lr) + " " + std::to_string(momentum) + " " + kDir);
    if (t && (!torch || t->samples_per_s > torch->samples_per_s)) torch = t;
  }
  const double base = torch ? torch->samples_per_s : 0;
  std::printf("# %s: mx accuracy %.4f, PyTorch accuracy %.4f after %d epoch(s)\n", name.c_str(),
              mx.accuracy, torch ? torch->accuracy : -1.0, epochs);
  Report("train_e2e_" + name, mx.samples_per_s, "samples/s", base,
         base > 0 ? mx.samples_per_s / base : 0,
         ">=" + std::to_string(target).substr(0, 3) + "(vs_pytorch_best,equal_accuracy)");
}

}  // namespace
}  // namespace mx::bench

int main(int argc, char** argv) {
  using namespace mx::bench;
  std::string only = argc > 1 ? argv[1] : "";
  // The configurations of the accuracy targets: MLP 10 epochs, LeNet 2.
  if (only.empty() || only == "mlp") Compare("mlp", mx::zoo::Mlp(), 10, 0.1f, 0.0f, 1.3);
  if (only.empty() || only == "lenet") Compare("lenet", mx::zoo::LeNet(), 2, 0.05f, 0.9f, 1.5);
  return 0;
}
