// Accuracy on the real Fashion-MNIST test set (Debian's
// dataset-fashion-mnist), training as mx_train does. PyTorch reaches 0.875
// (MLP, SGD lr 0.1, batch 100, 10 epochs) and 0.877 (LeNet, SGD lr 0.05,
// momentum 0.9, batch 100, 2 epochs) with the same settings; runs of either
// vary by about +-0.005 with the seed, which is the tolerance here. The
// seeds are fixed so that a run is reproducible.
#include <fstream>

#include "gtest/gtest.h"
#include "worker/io.h"
#include "worker/model.h"
#include "worker/zoo.h"

namespace mx {
namespace {

constexpr char kDir[] = "/usr/share/datasets/fashion-mnist";

bool HaveData() {
  return std::ifstream(std::string(kDir) + "/t10k-labels-idx1-ubyte.gz").good();
}

std::unique_ptr<DataIter> Mnist(bool train, uint64_t seed) {
  MnistOptions o;
  const std::string prefix = std::string(kDir) + (train ? "/train" : "/t10k");
  o.images = prefix + "-images-idx3-ubyte.gz";
  o.labels = prefix + "-labels-idx1-ubyte.gz";
  o.batch_size = 100;
  o.shuffle = train;
  o.seed = seed;
  auto it = MnistIter(o);
  EXPECT_TRUE(it.ok()) << it.status();
  return PrefetchingIter(*std::move(it));
}

double TrainAndTest(const Symbol& net, std::vector<Context> contexts, int epochs, float lr,
                    float momentum, uint64_t seed) {
  srand(seed);
  FeedForward model(net, std::move(contexts));
  auto train = Mnist(true, seed), test = Mnist(false, seed);
  FitOptions f;
  f.num_epoch = epochs;
  f.optimizer_options = {{"learning_rate", std::to_string(lr)},
                         {"momentum", std::to_string(momentum)}};
  f.initializer = "xavier";
  f.epoch_end_callbacks.push_back(LogEpoch());
  absl::Status s = model.Fit(train.get(), nullptr, f);
  EXPECT_TRUE(s.ok()) << s;
  auto score = model.Score(test.get(), "accuracy");
  EXPECT_TRUE(score.ok()) << score.status();
  return score.ok() ? (*score)[0].second : 0.0;
}

TEST(FashionMnist, MlpReachesPyTorchAccuracy) {
  if (!HaveData()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  double acc = TrainAndTest(zoo::Mlp(), {cpu()}, 10, 0.1f, 0.0f, 0);
  std::printf("MLP test accuracy %.4f (PyTorch: 0.875)\n", acc);
  EXPECT_GE(acc, 0.875 - 0.005);
}

TEST(FashionMnist, LeNetReachesPyTorchAccuracy) {
  if (!HaveData()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  double acc = TrainAndTest(zoo::LeNet(), {cpu()}, 2, 0.05f, 0.9f, 2);
  std::printf("LeNet test accuracy %.4f (PyTorch: 0.877)\n", acc);
  EXPECT_GE(acc, 0.877 - 0.005);
}

TEST(FashionMnist, MlpOnTwoContextsMatchesOne) {
  if (!HaveData()) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  double acc = TrainAndTest(zoo::Mlp(), {cpu(0), cpu(1)}, 10, 0.1f, 0.0f, 0);
  std::printf("MLP on [cpu(0), cpu(1)] test accuracy %.4f\n", acc);
  EXPECT_GE(acc, 0.875 - 0.005);
}

}  // namespace
}  // namespace mx
