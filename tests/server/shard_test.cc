// ParameterShard: the dist_sync and dist_async rules, driven by threads that
// stand in for workers.
#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/shard.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::Contains;
using ::testing::Not;
using ::testing::HasSubstr;

absl::Time Soon(int ms = 2000) { return absl::Now() + absl::Milliseconds(ms); }

TEST(ShardSync, SumsInRankOrderBitForBitWhateverTheArrivalOrder) {
  constexpr int kWorkers = 4, kSteps = 20;
  // Values whose float sum depends on the order of addition.
  auto value = [](int step, int rank) {
    const float v[] = {1e8f, 1.0f, -1e8f, 3.0f};
    return std::vector<float>{v[rank] * (1 + step % 3), 0.1f * rank + step};
  };
  ParameterShard shard({/*sync=*/true, kWorkers, /*elastic=*/false});
  ASSERT_TRUE(shard.Init(7, Shape{2}, {0, 0}).ok());
  std::mt19937 gen(1);
  for (int step = 1; step <= kSteps; ++step) {
    std::vector<int> order = {0, 1, 2, 3};
    std::shuffle(order.begin(), order.end(), gen);
    std::vector<std::thread> workers;
    for (int rank : order) {
      workers.emplace_back([&, rank] { ASSERT_TRUE(shard.Push(7, rank, value(step, rank)).ok()); });
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    for (auto& t : workers) t.join();
    auto got = shard.Pull(7, step, Soon());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->version, step);
    std::vector<float> want(2, 0.0f);
    for (int r = 0; r < kWorkers; ++r) {
      for (int i = 0; i < 2; ++i) want[i] += value(step, r)[i];
    }
    // Without an optimizer the value is the sum (summation service).
    EXPECT_EQ(std::memcmp((*got->data).data(), want.data(), sizeof(float) * 2), 0)
        << "step " << step << ": " << (*got->data)[0] << " vs " << want[0];
  }
}

TEST(ShardSync, PullWaitsForEveryWorkerAndNamesTheMissingOnes) {
  ParameterShard shard({true, 2, false});
  ASSERT_TRUE(shard.Init(1, Shape{1}, {0}).ok());
  ASSERT_TRUE(shard.Push(1, 0, {2}).ok());
  auto early = shard.Pull(1, 1, absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(early.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(early.status().message(), HasSubstr("worker(s) 1"));
  std::thread late([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ASSERT_TRUE(shard.Push(1, 1, {3}).ok());
  });
  auto got = shard.Pull(1, 1, Soon());
  late.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT((*got->data), ElementsAre(5));
  // An older version is served at once.
  EXPECT_TRUE(shard.Pull(1, 0, absl::Now()).ok());
}

TEST(ShardSync, AWorkerThatRunsAheadIsQueuedForTheNextStep) {
  ParameterShard shard({true, 2, false});
  ASSERT_TRUE(shard.Init(1, Shape{1}, {0}).ok());
  ASSERT_TRUE(shard.Push(1, 0, {1}).ok());
  ASSERT_TRUE(shard.Push(1, 0, {10}).ok());  // step 2 already: not a second vote
  auto none = shard.Pull(1, 1, absl::Now() + absl::Milliseconds(20));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(shard.Push(1, 1, {2}).ok());
  auto step1 = shard.Pull(1, 1, Soon());
  ASSERT_TRUE(step1.ok());
  EXPECT_EQ(step1->version, 1);
  EXPECT_THAT((*step1->data), ElementsAre(3));  // 1 + 2
  ASSERT_TRUE(shard.Push(1, 1, {20}).ok());
  auto step2 = shard.Pull(1, 2, Soon());
  ASSERT_TRUE(step2.ok());
  EXPECT_THAT((*step2->data), ElementsAre(30));  // 10 + 20
}

TEST(ShardSync, OptimizerRunsOncePerStep) {
  ParameterShard shard({true, 3, false});
  ASSERT_TRUE(shard.SetOptimizer("sgd", {{"learning_rate", "0.1"}}).ok());
  ASSERT_TRUE(shard.Init(2, Shape{2}, {1, 1}).ok());
  for (int r = 0; r < 3; ++r) ASSERT_TRUE(shard.Push(2, r, {1, 2}).ok());
  auto got = shard.Pull(2, 1, Soon());
  ASSERT_TRUE(got.ok());
  EXPECT_FLOAT_EQ((*got->data)[0], 1 - 0.1f * 3);
  EXPECT_FLOAT_EQ((*got->data)[1], 1 - 0.1f * 6);
  EXPECT_EQ(got->version, 1);
  EXPECT_FALSE(shard.SetOptimizer("sgdd", {}).ok());
}

TEST(ShardAsync, AppliesEachPushOnArrival) {
  ParameterShard shard({/*sync=*/false, 2, false});
  ASSERT_TRUE(shard.Init(3, Shape{1}, {0}).ok());
  ASSERT_TRUE(shard.SetOptimizer("sgd", {{"learning_rate", "1"}}).ok());
  ASSERT_TRUE(shard.Push(3, 1, {1}).ok());
  ASSERT_TRUE(shard.Push(3, 1, {1}).ok());  // async: no per-step limit
  auto got = shard.Pull(3, 2, Soon());
  ASSERT_TRUE(got.ok());
  EXPECT_THAT((*got->data), ElementsAre(-2));
  EXPECT_EQ(got->version, 2);
}

TEST(ShardFailures, DeadWorkerFailsWaitingPullsWithItsRank) {
  ParameterShard shard({true, 3, false});
  ASSERT_TRUE(shard.Init(1, Shape{1}, {0}).ok());
  ASSERT_TRUE(shard.Push(1, 0, {1}).ok());
  ASSERT_TRUE(shard.Push(1, 1, {1}).ok());
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    shard.MarkDead(2);
  });
  auto start = absl::Now();
  auto got = shard.Pull(1, 1, Soon(10000));
  killer.join();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(got.status().message(), HasSubstr("worker(s) 2 died"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));  // no wait for the deadline
  EXPECT_EQ(shard.Push(1, 2, {1}).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ShardFailures, ElasticShardCompletesStepsWithoutTheDeadWorker) {
  ParameterShard shard({true, 3, /*elastic=*/true});
  ASSERT_TRUE(shard.Init(1, Shape{1}, {0}).ok());
  ASSERT_TRUE(shard.Push(1, 0, {1}).ok());
  ASSERT_TRUE(shard.Push(1, 2, {4}).ok());
  shard.MarkDead(1);
  auto got = shard.Pull(1, 1, Soon());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT((*got->data), ElementsAre(5));
  EXPECT_THAT(shard.live_workers(), ElementsAre(0, 2));
  // The next step needs only the two live workers.
  ASSERT_TRUE(shard.Push(1, 0, {1}).ok());
  ASSERT_TRUE(shard.Push(1, 2, {1}).ok());
  EXPECT_TRUE(shard.Pull(1, 2, Soon()).ok());
}

TEST(ShardFailures, CloseEndsWaitingPullsAtOnceAndRefusesLaterCalls) {
  ParameterShard shard({true, 2, false});
  ASSERT_TRUE(shard.Init(1, Shape{1}, {0}).ok());
  ASSERT_TRUE(shard.Push(1, 0, {1}).ok());
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    shard.Close("server 3 stopped: no coordinator");
  });
  auto start = absl::Now();
  auto got = shard.Pull(1, 1, Soon(10000));  // worker 1 never pushes
  closer.join();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(got.status().message(), HasSubstr("pull of key 1: server 3 stopped: no coordinator"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));  // no wait for the deadline
  shard.Close("another reason");  // the first one stays
  absl::Status s = shard.Push(1, 1, {1});
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("server 3 stopped"));
}

TEST(ShardFailures, BadRequestsAreErrorsAndTheShardKeepsServing) {
  ParameterShard shard({true, 2, false});
  EXPECT_EQ(shard.Push(9, 0, {1}).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(shard.Pull(9, 0, Soon()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(shard.Init(1, Shape{2}, {1}).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(shard.Init(1, Shape{2}, {1, 2}).ok());
  EXPECT_TRUE(shard.Init(1, Shape{2}, {5, 5}).ok());  // same shape: kept
  absl::Status reinit = shard.Init(1, Shape{3}, {1, 2, 3});
  EXPECT_THAT(reinit.message(), HasSubstr("already initialized with shape (2,)"));
  absl::Status size = shard.Push(1, 0, {1, 2, 3});
  EXPECT_THAT(size.message(), HasSubstr("3 values but the key holds (2,)"));
  EXPECT_THAT(shard.Push(1, 5, {1, 2}).message(), HasSubstr("rank 5 is outside 0..1"));
  auto v = shard.Pull(1, 0, Soon());
  ASSERT_TRUE(v.ok());
  EXPECT_THAT((*v->data), ElementsAre(1, 2));
}

// Without an optimizer a step's sum is summed into the first rank's push
// buffer and published as it is, uncopied; buffers come back once nothing
// holds them, so a server's steady state allocates nothing per push.
TEST(ParameterShard, StepsReuseTheirBuffers) {
  ParameterShard shard({true, 2, false});
  ASSERT_TRUE(shard.Init(1, Shape{3}, {0, 0, 0}).ok());
  const float* pa;
  {
    std::vector<float> a = shard.TakeBuffer(3), b = shard.TakeBuffer(3);
    a.assign({1, 1, 1});
    b.assign({2, 2, 2});
    pa = a.data();
    const float* pb = b.data();
    ASSERT_TRUE(shard.Push(1, 0, std::move(a)).ok());
    ASSERT_TRUE(shard.Push(1, 1, std::move(b)).ok());
    auto got = shard.Pull(1, 1, absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_THAT(*got->data, ElementsAre(3, 3, 3));
    EXPECT_EQ(got->data->data(), pa);
    // Pulls of one version share it.
    auto second = shard.Pull(1, 1, absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(second.ok());
    EXPECT_EQ(second->data.get(), got->data.get());
    // Rank 1's buffer and the initial value's are free; the value's is not.
    std::vector<float> c = shard.TakeBuffer(3), d = shard.TakeBuffer(3);
    EXPECT_THAT((std::vector<const float*>{c.data(), d.data()}), Contains(pb));
    EXPECT_THAT((std::vector<const float*>{c.data(), d.data()}), Not(Contains(pa)));
    EXPECT_EQ(shard.TakeBuffer(4).size(), 4u);  // another size: a new buffer
    c.assign({1, 1, 1});
    d.assign({1, 1, 1});
    ASSERT_TRUE(shard.Push(1, 0, std::move(c)).ok());
    ASSERT_TRUE(shard.Push(1, 1, std::move(d)).ok());
    // Version 2 replaced it, but these answers still hold version 1.
    EXPECT_THAT(*got->data, ElementsAre(3, 3, 3));
  }
  // Now nothing does.
  std::vector<float> e = shard.TakeBuffer(3), f = shard.TakeBuffer(3);
  EXPECT_THAT((std::vector<const float*>{e.data(), f.data()}), Contains(pa));
  auto v2 = shard.Pull(1, 2, absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(v2.ok());
  EXPECT_THAT(*v2->data, ElementsAre(2, 2, 2));
}

// With an optimizer each version is a buffer of its own too: an answer
// being sent keeps the values it was given while the next step updates.
TEST(ParameterShard, OptimizerStepsPublishNewBuffers) {
  ParameterShard shard({true, 1, false});
  ASSERT_TRUE(shard.Init(1, Shape{2}, {1, 1}).ok());
  ASSERT_TRUE(shard.SetOptimizer("sgd", {{"learning_rate", "0.5"}}).ok());
  ASSERT_TRUE(shard.Push(1, 0, {1, 2}).ok());
  auto v1 = shard.Pull(1, 1, absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(v1.ok());
  EXPECT_THAT(*v1->data, ElementsAre(0.5f, 0));
  ASSERT_TRUE(shard.Push(1, 0, {1, 2}).ok());
  auto v2 = shard.Pull(1, 2, absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(v2.ok());
  EXPECT_THAT(*v2->data, ElementsAre(0, -1));
  EXPECT_THAT(*v1->data, ElementsAre(0.5f, 0));
}

}  // namespace
}  // namespace mx
