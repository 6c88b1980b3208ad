// The KVStore factory and the local store: the seed's example, sums of
// device copies, updaters and optimizers, string keys, errors, and the
// engine ordering of pushes.
#include "kvstore/kvstore.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/optimizer.h"
#include "tests/gpu_skip.h"

namespace mx {
namespace {

using ::testing::Each;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::unique_ptr<KVStore> Local() {
  auto kv = KVStore::Create("local");
  EXPECT_TRUE(kv.ok()) << kv.status();
  return *std::move(kv);
}

TEST(KVStoreSeed, InitAndPull) {
  auto kv = Local();
  ASSERT_TRUE(kv->Init(3, Ones({2, 3}) * 2).ok());
  NDArray a = Empty({2, 3});
  ASSERT_TRUE(kv->Pull(3, &a).ok());
  EXPECT_THAT(a.ToVector(), Each(2.0f));
  EXPECT_EQ(kv->rank(), 0);
  EXPECT_EQ(kv->num_workers(), 1);
  EXPECT_EQ(kv->type(), "local");
}

TEST(KVStoreFactory, UnknownAndUnavailableTypesAreClearErrors) {
  auto unknown = KVStore::Create("locall");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("unknown kvstore type 'locall'"));
  // No substring guessing: "dist" alone is not dist_sync.
  EXPECT_EQ(KVStore::Create("dist").status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* gpu : {"device", "nccl", "dist_device_sync"}) {
    auto s = KVStore::Create(gpu);
    if (NumGpus() > 0) {
      // With GPUs, "device" and "nccl" work (KVStoreOnGpu below);
      // dist_device_sync is the distributed store's, which this test does
      // not link, and says so.
      if (std::string(gpu) != "dist_device_sync") {
        EXPECT_TRUE(s.ok()) << gpu << ": " << s.status();
        continue;
      }
      EXPECT_EQ(s.status().code(), absl::StatusCode::kUnimplemented) << gpu;
      EXPECT_THAT(s.status().message(), HasSubstr("needs the parameter-server client"));
      continue;
    }
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(s.status().message(), HasSubstr(BuiltWithCuda() ? "no usable GPU" : "no GPU support"));
  }
}

// The GPU twins of the local store's tests: "local" with values on gpu(0)
// and on the CPU, and "device", which sums and updates on the GPU, give
// what the CPU-only store gives (bitwise for sums of two copies; 1e-6
// relative after optimizer updates, whose multiply-adds the compilers may
// fuse differently).
class KVStoreOnGpu : public ::testing::Test {
 protected:
  void SetUp() override { MX_SKIP_WITHOUT_GPU(); }
};

TEST_F(KVStoreOnGpu, LocalAndDeviceStoresSumGpuAndCpuCopiesAsTheCpuStoreDoes) {
  for (const char* type : {"local", "device"}) {
    auto kv = KVStore::Create(type);
    ASSERT_TRUE(kv.ok()) << kv.status();
    ASSERT_TRUE((*kv)->Init(3, FromVector({1, 2, 3})).ok());
    ASSERT_TRUE((*kv)->Push(3, {FromVector({1, 1, 1}).Copy(gpu(0)), FromVector({0.5f, 0, -1})}).ok());
    NDArray on_gpu = Empty({3}, gpu(0)), on_cpu = Empty({3});
    ASSERT_TRUE((*kv)->Pull(3, {on_gpu, on_cpu}).ok());
    EXPECT_THAT(on_gpu.ToVector(), ElementsAre(1.5f, 1, 0)) << type;
    EXPECT_THAT(on_cpu.ToVector(), ElementsAre(1.5f, 1, 0)) << type;
    // One copy elsewhere than the key (on the GPU for "local", on the CPU
    // for "device") travels once, straight into the sum's buffer.
    const NDArray one =
        std::string(type) == "local" ? FromVector({2, 4, 8}).Copy(gpu(0)) : FromVector({2, 4, 8});
    ASSERT_TRUE((*kv)->Push(3, {one}).ok());
    ASSERT_TRUE((*kv)->Pull(3, {on_gpu, on_cpu}).ok());
    EXPECT_THAT(on_gpu.ToVector(), ElementsAre(2, 4, 8)) << type;
    EXPECT_THAT(on_cpu.ToVector(), ElementsAre(2, 4, 8)) << type;
  }
}

TEST_F(KVStoreOnGpu, TheDeviceStoreUpdatesOnTheGpuAsTheLocalStoreOnTheCpu) {
  auto device = KVStore::Create("device");
  ASSERT_TRUE(device.ok()) << device.status();
  auto local = Local();
  for (KVStore* kv : {device->get(), local.get()}) {
    std::unique_ptr<Optimizer> opt =
        *Optimizer::Create("sgd", {{"learning_rate", "0.1"}, {"momentum", "0.9"}});
    ASSERT_TRUE(kv->SetOptimizer(std::move(opt)).ok());
    ASSERT_TRUE(kv->Init(0, FromVector({1, -1, 0.5f, 2})).ok());
  }
  for (int step = 0; step < 5; ++step) {
    const NDArray g = FromVector({0.1f * step, -0.2f, 0.3f, 1});
    ASSERT_TRUE((*device)->Push(0, {g.Copy(gpu(0)), g}).ok());
    ASSERT_TRUE(local->Push(0, {g, g}).ok());
  }
  NDArray from_device = Empty({4}, gpu(0)), from_local = Empty({4});
  ASSERT_TRUE((*device)->Pull(0, {from_device}).ok());
  ASSERT_TRUE(local->Pull(0, {from_local}).ok());
  const std::vector<float> want = from_local.ToVector(), got = from_device.ToVector();
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-6f * std::max(1.0f, std::fabs(want[i]))) << i;
  }
}

// "nccl" against "device": the same steps of SGD with momentum on keys 0-3
// (keys take the GPUs in turn, so NCCL's root alternates), by Push and
// Pull and by a bucket PushPull (one NCCL group of reduces, one of
// broadcasts), copies and outputs on gpu(0) and gpu(1). Sums of two copies
// and the optimizer's kernels are the same on both paths: the same bits.
// With one GPU "nccl" is checked as "device" (its copies are not on
// distinct GPUs, so it moves them as "device" does).
TEST_F(KVStoreOnGpu, TheNcclStoreGivesTheDeviceStoresBits) {
  const std::vector<Context> devices =
      NumGpus() >= 2 ? std::vector<Context>{gpu(0), gpu(1)} : std::vector<Context>{gpu(0), cpu()};
  auto nccl = KVStore::Create("nccl");
  auto device = KVStore::Create("device");
  ASSERT_TRUE(nccl.ok()) << nccl.status();
  ASSERT_TRUE(device.ok()) << device.status();
  EXPECT_EQ((*nccl)->type(), "nccl");
  EXPECT_EQ((*nccl)->bucket_bytes(), 4 << 20);  // training sends one NCCL group per bucket
  EXPECT_EQ((*device)->bucket_bytes(), 0);
  constexpr int kKeys = 4;
  const Shape shape{1000};
  std::map<KVStore*, std::vector<std::vector<NDArray>>> weights;
  for (KVStore* kv : {nccl->get(), device->get()}) {
    auto sgd = Optimizer::Create("sgd", {{"learning_rate", "0.1"}, {"momentum", "0.9"}});
    ASSERT_TRUE(sgd.ok()) << sgd.status();
    ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
    for (int k = 0; k < kKeys; ++k) {
      ASSERT_TRUE(kv->Init(k, Ones(shape) * static_cast<float>(k)).ok());
      weights[kv].emplace_back();
      for (Context ctx : devices) weights[kv].back().push_back(Empty(shape, ctx));
    }
  }
  for (int step = 0; step < 4; ++step) {
    std::vector<std::vector<NDArray>> grads(kKeys);
    for (int k = 0; k < kKeys; ++k) {
      for (size_t d = 0; d < devices.size(); ++d) {
        std::vector<float> g(shape.Size());
        for (size_t i = 0; i < g.size(); ++i) {
          g[i] = 0.001f * static_cast<float>((i * 7 + k + step + d) % 13) - 0.005f;
        }
        grads[k].push_back(FromVector(g).Copy(devices[d]));
      }
    }
    for (KVStore* kv : {nccl->get(), device->get()}) {
      if (step % 2 == 0) {
        for (int k = 0; k < kKeys; ++k) {
          ASSERT_TRUE(kv->Push(k, grads[k]).ok());
          ASSERT_TRUE(kv->Pull(k, weights[kv][k]).ok());
        }
      } else {
        ASSERT_TRUE(kv->PushPull({0, 1, 2, 3}, grads, weights[kv]).ok());
      }
    }
  }
  for (int k = 0; k < kKeys; ++k) {
    for (size_t d = 0; d < devices.size(); ++d) {
      EXPECT_EQ(weights[nccl->get()][k][d].ToVector(), weights[device->get()][k][d].ToVector())
          << "key " << k << " on " << devices[d].ToString();
    }
  }
}

TEST(KVStoreLocal, PushSumsDeviceCopies) {
  for (int devices : {1, 2, 4, 7}) {
    auto kv = Local();
    ASSERT_TRUE(kv->Init(0, Zeros({3})).ok());
    std::vector<NDArray> grads;
    for (int d = 0; d < devices; ++d) grads.push_back(FromVector({1.0f * d, 1, 2}, cpu(d)));
    ASSERT_TRUE(kv->Push(0, grads).ok());
    std::vector<NDArray> outs;
    for (int d = 0; d < devices; ++d) outs.push_back(Empty({3}, cpu(d)));
    ASSERT_TRUE(kv->Pull(0, outs).ok());
    float sum_d = devices * (devices - 1) / 2.0f;
    for (const NDArray& o : outs) {
      EXPECT_THAT(o.ToVector(), ElementsAre(sum_d, devices, 2 * devices)) << devices;
    }
  }
}

TEST(KVStoreLocal, UpdaterSeesTheSum) {
  auto kv = Local();
  ASSERT_TRUE(kv->Init(5, Ones({2})).ok());
  std::vector<int> keys;
  kv->SetUpdater([&](int key, const NDArray& merged, NDArray* stored) {
    keys.push_back(key);
    *stored += merged * 10.0f;
  });
  ASSERT_TRUE(kv->Push(5, {FromVector({1, 2}), FromVector({3, 4})}).ok());
  NDArray out = Empty({2});
  ASSERT_TRUE(kv->Pull(5, &out).ok());
  EXPECT_THAT(out.ToVector(), ElementsAre(41, 61));
  EXPECT_THAT(keys, ElementsAre(5));
}

TEST(KVStoreLocal, OptimizerUpdatesAndStatesRoundTrip) {
  auto kv = Local();
  auto sgd = Optimizer::Create("sgd", {{"learning_rate", "0.5"}, {"momentum", "0.9"}});
  ASSERT_TRUE(sgd.ok());
  ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
  ASSERT_TRUE(kv->Init(1, FromVector({1, 1})).ok());
  ASSERT_TRUE(kv->Push(1, FromVector({1, -1})).ok());
  NDArray w = Empty({2});
  ASSERT_TRUE(kv->Pull(1, &w).ok());
  EXPECT_THAT(w.ToVector(), ElementsAre(0.5f, 1.5f));
  std::string path = ::testing::TempDir() + "/kv.states";
  ASSERT_TRUE(kv->SaveOptimizerStates(path).ok());
  ASSERT_TRUE(kv->LoadOptimizerStates(path).ok());
  ASSERT_TRUE(kv->Push(1, FromVector({1, -1})).ok());  // momentum carries over
  ASSERT_TRUE(kv->Pull(1, &w).ok());
  EXPECT_THAT(w.ToVector(), ElementsAre(0.5f - 0.45f - 0.5f, 1.5f + 0.45f + 0.5f));
}

// As in MXNet, the last of SetOptimizer and SetUpdater decides (an updater
// set after an optimizer was ignored).
TEST(KVStoreLocal, TheLastOfOptimizerAndUpdaterDecides) {
  auto kv = Local();
  auto sgd = Optimizer::Create("sgd", {{"learning_rate", "0.5"}});
  ASSERT_TRUE(sgd.ok());
  ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
  kv->SetUpdater([](int, const NDArray& merged, NDArray* stored) { stored->Assign(merged); });
  ASSERT_TRUE(kv->Init(1, FromVector({1, 1})).ok());
  ASSERT_TRUE(kv->Push(1, FromVector({1, -1})).ok());
  NDArray w = Empty({2});
  ASSERT_TRUE(kv->Pull(1, &w).ok());
  EXPECT_THAT(w.ToVector(), ElementsAre(1, -1));
  EXPECT_EQ(kv->SaveOptimizerStates(::testing::TempDir() + "/none.states").code(),
            absl::StatusCode::kFailedPrecondition);
}

// Saved states of other shapes than the store's keys are refused at the
// load, naming the parameter (the load succeeded, and every push failed).
TEST(KVStoreLocal, StatesOfOtherShapesAreRefusedAtTheLoad) {
  const std::string path = ::testing::TempDir() + "/other.states";
  {
    auto other = Local();
    auto sgd = Optimizer::Create("sgd", {{"momentum", "0.9"}});
    ASSERT_TRUE(sgd.ok());
    ASSERT_TRUE(other->SetOptimizer(*std::move(sgd)).ok());
    ASSERT_TRUE(other->Init(1, Ones({3})).ok());
    ASSERT_TRUE(other->Push(1, Ones({3})).ok());
    ASSERT_TRUE(other->SaveOptimizerStates(path).ok());
  }
  auto kv = Local();
  ASSERT_TRUE(kv->Init(1, Ones({2})).ok());
  auto sgd = Optimizer::Create("sgd", {{"momentum", "0.9"}});
  ASSERT_TRUE(sgd.ok());
  ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
  const absl::Status s = kv->LoadOptimizerStates(path);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("parameter 1"));
}

// A bucket is checked whole before any of it is pushed: a bad key after a
// good one left the good one updated (and a corrected retry updated it
// twice).
TEST(KVStoreLocal, ABadKeyInABucketLeavesTheOthersUntouched) {
  auto kv = Local();
  auto sgd = Optimizer::Create("sgd", {{"learning_rate", "1"}});
  ASSERT_TRUE(sgd.ok());
  ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
  ASSERT_TRUE(kv->Init(0, Ones({2})).ok());
  ASSERT_TRUE(kv->Init(1, Ones({2})).ok());
  NDArray out0 = Empty({2}), out1 = Empty({2});
  const absl::Status s =
      kv->PushPull(std::vector<Key>{0, 1}, {{Ones({2})}, {Ones({3})}}, {{out0}, {out1}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  NDArray w = Empty({2});
  ASSERT_TRUE(kv->Pull(0, &w).ok());
  EXPECT_THAT(w.ToVector(), ElementsAre(1, 1));
}

// The update runs on the key's context: one copy on another host context
// (another CPU id, page-locked memory) is brought there first, as several
// copies are by their sum.
TEST(KVStoreLocal, AnOptimizerTakesOneCopyFromAnotherHostContext) {
  for (Context where : {cpu(1), cpu_pinned()}) {
    auto kv = Local();
    auto sgd = Optimizer::Create("sgd", {{"learning_rate", "0.5"}});
    ASSERT_TRUE(sgd.ok());
    ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
    ASSERT_TRUE(kv->Init(1, FromVector({1, 1})).ok());
    absl::Status pushed = kv->Push(1, FromVector({1, -1}, where));
    ASSERT_TRUE(pushed.ok()) << where.ToString() << ": " << pushed;
    NDArray w = Empty({2}, where);
    ASSERT_TRUE(kv->Pull(1, &w).ok());
    EXPECT_THAT(w.ToVector(), ElementsAre(0.5f, 1.5f)) << where.ToString();
  }
}

TEST(KVStoreLocal, PushPullAndBroadcast) {
  auto kv = Local();
  NDArray a = Empty({2}), b = Empty({2}, cpu(1));
  ASSERT_TRUE(kv->Broadcast(9, FromVector({4, 5}), {a, b}).ok());
  EXPECT_THAT(b.ToVector(), ElementsAre(4, 5));
  ASSERT_TRUE(kv->PushPull(9, {FromVector({1, 1}), FromVector({2, 2})}, {a}).ok());
  EXPECT_THAT(a.ToVector(), ElementsAre(3, 3));
}

TEST(KVStoreLocal, StringKeysMapConsistently) {
  EXPECT_EQ(StringKey("fc1_weight"), StringKey(std::string("fc1_weight")));
  EXPECT_NE(StringKey("fc1_weight"), StringKey("fc1_bias"));
  EXPECT_GE(StringKey("x"), 1 << 30);
  auto kv = Local();
  ASSERT_TRUE(kv->Init("fc1_weight", Ones({2})).ok());
  NDArray out = Empty({2});
  ASSERT_TRUE(kv->Pull(StringKey("fc1_weight"), &out).ok());
  EXPECT_THAT(out.ToVector(), ElementsAre(1, 1));
  absl::Status s = kv->Pull("fc2_weight", &out);
  EXPECT_THAT(s.message(), HasSubstr("'fc2_weight'"));
}

TEST(KVStoreLocal, BadRequestsNameKeyAndShapes) {
  auto kv = Local();
  absl::Status s = kv->Push(4, Ones({2}));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("key 4"));
  EXPECT_THAT(s.message(), HasSubstr("never initialized"));
  NDArray out = Empty({2});
  EXPECT_THAT(kv->Pull(4, &out).message(), HasSubstr("never initialized"));

  ASSERT_TRUE(kv->Init(4, Ones({2, 3})).ok());
  s = kv->Push(4, {Ones({2, 3}), Ones({3, 2})});
  EXPECT_THAT(s.message(), HasSubstr("value 1 has shape (3,2)"));
  EXPECT_THAT(s.message(), HasSubstr("(2,3)"));
  s = kv->Pull(4, &out);
  EXPECT_THAT(s.message(), HasSubstr("output 0 has shape (2,)"));
  s = kv->Init(4, Ones({6}));
  EXPECT_THAT(s.message(), HasSubstr("already initialized with shape (2,3)"));
  EXPECT_TRUE(kv->Init(4, Ones({2, 3})).ok());  // same shape: fine
  EXPECT_EQ(kv->SaveOptimizerStates("/tmp/x").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(kv->Push(4, std::vector<NDArray>{}).code(), absl::StatusCode::kInvalidArgument);
}

// A push waits only for the operation that writes its gradient: the push of
// a gradient produced early completes while another gradient is still being
// computed (on the engine's second worker: the BUILD file asks for two).
TEST(KVStoreLocal, PushWaitsOnlyForItsOwnGradient) {
  auto kv = Local();
  NDArray slow = Zeros({4}), fast = Zeros({4});
  ASSERT_TRUE(kv->Init(1, Zeros({4})).ok());
  ASSERT_TRUE(kv->Init(2, Zeros({4})).ok());
  WaitAll();
  Engine::Get()->StartTrace();
  Engine::Get()->PushSync([](RunContext) { std::this_thread::sleep_for(std::chrono::milliseconds(200)); },
                          cpu(), {}, {slow.var()}, 0, "slow_backward");
  Engine::Get()->PushSync([](RunContext) {}, cpu(), {}, {fast.var()}, 0, "fast_backward");
  ASSERT_TRUE(kv->Push(1, {slow, slow}).ok());
  ASSERT_TRUE(kv->Push(2, {fast, fast}).ok());
  WaitAll();
  std::vector<TraceEvent> trace = Engine::Get()->StopTrace();
  std::vector<std::string> order;
  for (const TraceEvent& e : trace) order.push_back(e.name);
  auto pos = [&](const std::string& n) {
    return std::find(order.begin(), order.end(), n) - order.begin();
  };
  ASSERT_LT(pos("kvstore_push:2"), static_cast<long>(order.size()));
  EXPECT_LT(pos("kvstore_push:2"), pos("slow_backward"));
  EXPECT_GT(pos("kvstore_push:1"), pos("slow_backward"));
}

}  // namespace
}  // namespace mx
