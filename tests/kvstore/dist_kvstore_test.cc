// The distributed KVStore against parameter servers on 127.0.0.1 (in this
// process, on free ports), with threads standing in for workers.
#include "kvstore/dist_kvstore.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/row_sparse.h"
#include "proto/mx.pb.h"
#include "rpc/metrics.h"
#include "rpc/security.h"
#include "server/kvstore_service.h"
#include "tests/gpu_skip.h"
#include "tests/proto/raw_call.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// With MX_TEST_TRANSPORT=stream (the target dist_kvstore_stream_test),
// servers take stream connections and the stores send their pushes and
// pulls through them (rpc/stream.h); else all goes through gRPC.
bool Streams() {
  const char* transport = std::getenv("MX_TEST_TRANSPORT");
  return transport != nullptr && std::string(transport) == "stream";
}

ParameterServerOptions MaxMessageMb(int mb) {
  ParameterServerOptions o;
  o.max_message_mb = mb;
  o.stream_port = Streams() ? 0 : -1;
  return o;
}

// The store's servers: `server`'s gRPC and stream addresses.
void AddServer(const ParameterServer& server, DistKVStoreOptions* o) {
  o->servers.push_back(server.address());
  o->stream_addresses.push_back(server.stream_address());
}

struct Cluster {
  std::vector<std::unique_ptr<ParameterServer>> servers;
  std::vector<std::string> addresses;
  std::vector<std::string> stream_addresses;
};

Cluster StartServers(int n, int workers, bool sync = true, int staleness = 0) {
  Cluster c;
  for (int i = 0; i < n; ++i) {
    ShardOptions o;
    o.sync = sync;
    o.num_workers = workers;
    o.staleness = staleness;
    auto s = ParameterServer::Start("127.0.0.1:0", o, MaxMessageMb(1024));
    EXPECT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->stream_address().empty(), !Streams());
    c.addresses.push_back((*s)->address());
    c.stream_addresses.push_back((*s)->stream_address());
    c.servers.push_back(*std::move(s));
  }
  return c;
}

std::unique_ptr<KVStore> Worker(const Cluster& c, int rank, int workers, int64_t bound,
                                bool sync = true, int staleness = 0) {
  DistKVStoreOptions o;
  o.servers = c.addresses;
  o.stream_addresses = c.stream_addresses;
  o.rank = rank;
  o.num_workers = workers;
  o.sync = sync;
  o.staleness = staleness;
  o.big_key_bound = bound;
  o.rpc_timeout = absl::Seconds(5);
  auto kv = CreateDistKVStore(o);
  EXPECT_TRUE(kv.ok()) << kv.status();
  return *std::move(kv);
}

// The optimizer of the tests below and of their single-process reference:
// SGD, lr 0.5, momentum 0.9.
std::unique_ptr<Optimizer> Sgd() {
  auto sgd = Optimizer::Create("sgd", {{"learning_rate", "0.5"}, {"momentum", "0.9"}});
  EXPECT_TRUE(sgd.ok()) << sgd.status();
  return *std::move(sgd);
}

// The process's peak resident memory (VmHWM), in KiB.
int64_t PeakResidentKb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  int64_t kb = 0;
  while (std::getline(status, line)) {
    absl::string_view rest = line;
    if (absl::ConsumePrefix(&rest, "VmHWM:")) {
      EXPECT_TRUE(absl::SimpleAtoi(absl::StripSuffix(absl::StripAsciiWhitespace(rest), "kB"), &kb))
          << line;
    }
  }
  return kb;
}

// A dist_sync worker (bound 16) whose servers apply Sgd().
std::unique_ptr<KVStore> SgdWorker(const Cluster& c, int rank, int workers) {
  auto kv = Worker(c, rank, workers, /*bound=*/16);
  EXPECT_TRUE(kv->SetOptimizer(Sgd()).ok());
  return kv;
}

// Gradient of worker `rank` at `step` for a key of n elements: values whose
// float sum depends on the order of addition.
std::vector<float> Grad(int rank, int step, int64_t n) {
  std::vector<float> g(n);
  for (int64_t i = 0; i < n; ++i) g[i] = (rank == 0 ? 1e7f : 0.3f) * (1 + (i + step) % 5) - rank;
  return g;
}

// The single-process reference: key k+1 (sizes[k] elements, starting at
// ones) after each of `steps` steps of SGD (lr 0.5, momentum 0.9) on the
// rank-order sum of every worker's Grad. Returns [step][k].
std::vector<std::vector<std::vector<float>>> Reference(const std::vector<int64_t>& sizes,
                                                       int workers, int steps) {
  std::unique_ptr<Optimizer> sgd = Sgd();
  std::vector<std::vector<std::vector<float>>> want(steps);
  for (size_t k = 0; k < sizes.size(); ++k) {
    NDArray w = Ones({sizes[k]});
    for (int step = 0; step < steps; ++step) {
      std::vector<float> sum(sizes[k], 0.0f);
      for (int r = 0; r < workers; ++r) {
        std::vector<float> g = Grad(r, step, sizes[k]);
        for (int64_t i = 0; i < sizes[k]; ++i) sum[i] += g[i];
      }
      sgd->Update(static_cast<int>(k + 1), w, FromVector(sum));
      want[step].push_back(w.ToVector());
    }
  }
  return want;
}

TEST(DistSync, TwoServersTwoWorkersMatchASingleProcessBitForBit) {
  constexpr int kWorkers = 2, kSteps = 5;
  const std::vector<int64_t> sizes = {3, 40};  // key 1 small, key 2 split (bound 16)
  Cluster c = StartServers(2, kWorkers);
  std::vector<std::vector<std::vector<float>>> pulled(kWorkers);
  std::vector<std::thread> workers;
  for (int r = 0; r < kWorkers; ++r) {
    workers.emplace_back([&, r] {
      auto kv = SgdWorker(c, r, kWorkers);
      for (size_t k = 0; k < sizes.size(); ++k) {
        ASSERT_TRUE(kv->Init(static_cast<int>(k + 1), Ones({sizes[k]})).ok());
      }
      for (int step = 0; step < kSteps; ++step) {
        for (size_t k = 0; k < sizes.size(); ++k) {
          NDArray g = FromVector(Grad(r, step, sizes[k]));
          ASSERT_TRUE(kv->Push(static_cast<int>(k + 1), g).ok());
        }
      }
      for (size_t k = 0; k < sizes.size(); ++k) {
        NDArray out = Empty({sizes[k]});
        ASSERT_TRUE(kv->Pull(static_cast<int>(k + 1), &out).ok());
        pulled[r].push_back(out.ToVector());
      }
    });
  }
  for (auto& t : workers) t.join();

  // The reference: the same rank-order sums through the same optimizer.
  const auto want = Reference(sizes, kWorkers, kSteps);
  for (size_t k = 0; k < sizes.size(); ++k) {
    const std::vector<float>& last = want[kSteps - 1][k];
    for (int r = 0; r < kWorkers; ++r) {
      ASSERT_EQ(pulled[r][k].size(), last.size());
      EXPECT_EQ(0, std::memcmp(pulled[r][k].data(), last.data(), last.size() * sizeof(float)))
          << "key " << k + 1 << " worker " << r;
    }
  }
  // Key 2 (40 elements, bound 16) is cut into 3 slices dealt over the 2
  // servers: key 2 itself and slice keys 1 and 2 (proto/slice_key.h).
  int64_t elements = 0;
  std::vector<int> slices_per_server(2, 0);
  for (int s = 0; s < 2; ++s) {
    for (int server_key : {2, 2 + (1 << 24), 2 + (2 << 24)}) {
      auto slice = c.servers[s]->shard().Pull(server_key, kSteps, absl::Now() + absl::Seconds(1));
      if (!slice.ok()) continue;
      elements += static_cast<int64_t>(slice->data.bytes() / sizeof(float));
      ++slices_per_server[s];
    }
  }
  EXPECT_EQ(elements, 40);
  EXPECT_THAT(slices_per_server, ::testing::UnorderedElementsAre(1, 2));
}

// PushPull (one round trip per slice) gives every worker, at every step,
// the value a single process computes.
TEST(DistSync, PushPullGivesEachStepsValue) {
  constexpr int kWorkers = 2, kSteps = 4;
  const std::vector<int64_t> sizes = {3, 40};  // key 1 small, key 2 split (bound 16)
  Cluster c = StartServers(2, kWorkers);
  // pulled[rank][step][key]
  std::vector<std::vector<std::vector<std::vector<float>>>> pulled(kWorkers);
  std::vector<std::thread> workers;
  for (int r = 0; r < kWorkers; ++r) {
    workers.emplace_back([&, r] {
      auto kv = SgdWorker(c, r, kWorkers);
      std::vector<NDArray> weights;
      for (size_t k = 0; k < sizes.size(); ++k) {
        ASSERT_TRUE(kv->Init(static_cast<int>(k + 1), Ones({sizes[k]})).ok());
        weights.push_back(Empty({sizes[k]}));
      }
      for (int step = 0; step < kSteps; ++step) {
        for (size_t k = 0; k < sizes.size(); ++k) {
          NDArray g = FromVector(Grad(r, step, sizes[k]));
          ASSERT_TRUE(kv->PushPull(static_cast<int>(k + 1), {g}, {weights[k]}).ok());
        }
        pulled[r].emplace_back();
        for (const NDArray& w : weights) pulled[r].back().push_back(w.ToVector());
      }
    });
  }
  for (auto& t : workers) t.join();

  const auto want = Reference(sizes, kWorkers, kSteps);
  for (int r = 0; r < kWorkers; ++r) {
    ASSERT_EQ(pulled[r].size(), static_cast<size_t>(kSteps));
    for (int step = 0; step < kSteps; ++step) {
      for (size_t k = 0; k < sizes.size(); ++k) {
        EXPECT_EQ(pulled[r][step][k], want[step][k]) << "key " << k + 1 << " worker " << r << " step " << step;
      }
    }
  }
}

// Replicas 2 in one process: two servers, each the other's backup. A
// primary answers a pull of a step only once its backup holds the step, so
// a worker that gets each step's value proves that the steps reached the
// backups, through gRPC, or with MX_TEST_TRANSPORT=stream on stream
// connections: there the servers' gRPC addresses given to replication are
// ones where nothing listens.
TEST(DistReplicas, StepsReachTheBackupsThroughTheDataPathsTransport) {
  constexpr int kSteps = 3;
  const std::vector<int64_t> sizes = {3, 40};  // key 1 small, key 2 split (bound 16)
  Cluster c = StartServers(2, 1);
  for (int rank = 0; rank < 2; ++rank) {
    ReplicationOptions ro;
    ro.rank = rank;
    ro.servers = Streams() ? std::vector<std::string>{"127.0.0.1:1", "127.0.0.1:1"} : c.addresses;
    ro.stream_servers = c.stream_addresses;  // "" each without streams
    ro.rpc_timeout = absl::Seconds(2);
    c.servers[rank]->StartReplication(std::move(ro));
  }
  DistKVStoreOptions o;
  o.servers = c.addresses;
  o.stream_addresses = c.stream_addresses;
  o.replicas = 2;
  o.big_key_bound = 16;
  o.rpc_timeout = absl::Seconds(5);
  auto kv = CreateDistKVStore(o);
  ASSERT_TRUE(kv.ok()) << kv.status();
  ASSERT_TRUE((*kv)->SetOptimizer(Sgd()).ok());
  std::vector<NDArray> weights;
  for (size_t k = 0; k < sizes.size(); ++k) {
    ASSERT_TRUE((*kv)->Init(static_cast<int>(k + 1), Ones({sizes[k]})).ok());
    weights.push_back(Empty({sizes[k]}));
  }
  const auto want = Reference(sizes, /*workers=*/1, kSteps);
  for (int step = 0; step < kSteps; ++step) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      NDArray g = FromVector(Grad(0, step, sizes[k]));
      absl::Status s = (*kv)->PushPull(static_cast<int>(k + 1), {g}, {weights[k]});
      ASSERT_TRUE(s.ok()) << "key " << k + 1 << " step " << step << ": " << s;
      EXPECT_EQ(weights[k].ToVector(), want[step][k]) << "key " << k + 1 << " step " << step;
    }
  }
}

// An init naming a server the job does not have as a key's backup is
// refused: the key's steps went nowhere, so every pull of it ran out of
// time waiting for "server 7" to acknowledge them.
TEST(DistReplicas, AnInitNamingAServerTheJobHasNotIsRefused) {
  Cluster c = StartServers(2, 1);
  for (int rank = 0; rank < 2; ++rank) {
    ReplicationOptions ro;
    ro.rank = rank;
    ro.servers = c.addresses;
    c.servers[rank]->StartReplication(std::move(ro));
  }
  auto channel = grpc::CreateChannel(c.addresses[0], grpc::InsecureChannelCredentials());
  proto::InitRequest init;
  init.set_key(1);
  init.mutable_value()->add_shape(1);
  init.mutable_value()->set_data(std::string(4, '\0'));
  init.set_primary(0);
  init.set_backup(7);
  grpc::Status s =
      testing::RawCall(channel, "/mx.proto.KVStoreService/Init", init.SerializeAsString());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("the job has servers 0 to 1"));
  init.set_backup(1);
  s = testing::RawCall(channel, "/mx.proto.KVStoreService/Init", init.SerializeAsString());
  EXPECT_TRUE(s.ok()) << s.error_message();
  // A server with a rank but without replication says so.
  Cluster plain = StartServers(1, 1);
  plain.servers[0]->SetRank(0);
  s = testing::RawCall(grpc::CreateChannel(plain.addresses[0], grpc::InsecureChannelCredentials()),
                       "/mx.proto.KVStoreService/Init", init.SerializeAsString());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("this server does not replicate"));
}

// A spare that takes a dead server's rank gets the whole state of every
// key the survivor held alone, in calls of at most the size its servers
// take (1 MiB here): two keys of 600 KB used to go in one call of 1.2 MB,
// refused again and again, so no key ever had its second copy back.
TEST(DistReplicas, ASparesStatesComeInCallsItTakes) {
  constexpr int64_t kFloats = 150000;  // 600 KB
  ShardOptions so;
  so.num_workers = 1;
  auto survivor = ParameterServer::Start("127.0.0.1:0", so, MaxMessageMb(1));
  auto spare = ParameterServer::Start("127.0.0.1:0", so, MaxMessageMb(1));
  ASSERT_TRUE(survivor.ok()) << survivor.status();
  ASSERT_TRUE(spare.ok()) << spare.status();
  const std::vector<std::string> addresses = {(*survivor)->address(), (*spare)->address()};
  for (int rank = 0; rank < 2; ++rank) {
    ReplicationOptions ro;
    ro.rank = rank;
    ro.servers = {addresses[0], "127.0.0.1:1"};  // server 1 is dead at first
    if (rank == 1) ro.servers = addresses;
    ro.stream_servers = {(*survivor)->stream_address(), ""};
    ro.rpc_timeout = absl::Seconds(2);
    (rank == 0 ? *survivor : *spare)->StartReplication(std::move(ro));
  }
  // Server 1 died: keys 1 and 2 are held by server 0 alone.
  (*survivor)->ServerDied(1);
  for (int key : {1, 2}) {
    ASSERT_TRUE(
        (*survivor)
            ->shard()
            .Init(key, Shape{kFloats}, std::vector<float>(kFloats, key), {Copies::kPrimary, 1})
            .ok());
  }
  EXPECT_EQ((*survivor)->ServerReplaced(1, (*spare)->address(), (*spare)->stream_address(), ""), 2);
  // A step of each key: its pull answers once the key's new backup holds
  // the step, which it takes after the key's state.
  for (int key : {1, 2}) {
    ASSERT_TRUE((*survivor)->shard().Push(key, 0, std::vector<float>(kFloats, 10.0f + key)).ok());
  }
  for (int key : {1, 2}) {
    auto got = (*survivor)->shard().Pull(key, 1, absl::Now() + absl::Seconds(10));
    EXPECT_TRUE(got.ok()) << "key " << key << ": " << got.status();
  }
  // The spare holds both, with their values, once it takes over.
  EXPECT_EQ((*spare)->ServerDied(0), 2);
  for (int key : {1, 2}) {
    auto got = (*spare)->shard().Pull(key, 1, absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(got.ok()) << "key " << key << ": " << got.status();
    EXPECT_EQ(got->data.ToFloats(), std::vector<float>(kFloats, 10.0f + key));
  }
}

// Issue 17, item 7, over the network: a worker that only pushes (no
// pulls to hold it back) runs ahead of one that has not started; the
// server holds at most max_pending_pushes (4) of its pushes of the key and
// parks one more, so the worker waits rather than filling the server's
// memory, and nothing fails. Once the other worker pushes, every step sums
// its own pair.
TEST(DistSync, AWorkerFarAheadIsSlowedToTheOthersPaceNotFailed) {
  constexpr int kSteps = 12;
  Cluster c = StartServers(1, 2);
  auto ahead = Worker(c, 0, 2, 1 << 20), behind = Worker(c, 1, 2, 1 << 20);
  ASSERT_TRUE(ahead->Init(1, Zeros({2})).ok());
  ASSERT_TRUE(behind->Init(1, Zeros({2})).ok());
  for (int step = 1; step <= kSteps; ++step) {
    ASSERT_TRUE(ahead->Push(1, {FromVector({float(step), 0})}).ok());  // queued on the engine
  }
  absl::SleepFor(absl::Milliseconds(500));  // it runs as far as it may
  const ParameterShard::Held held = c.servers[0]->shard().held(1);
  EXPECT_EQ(held.pending, 4);
  EXPECT_EQ(held.parked, 1);
  NDArray out = Empty({2});
  for (int step = 1; step <= kSteps; ++step) {
    ASSERT_TRUE(behind->Push(1, {FromVector({0, float(step)})}).ok());
    ASSERT_TRUE(behind->Pull(1, {out}).ok());
    // Without an optimizer the value is the step's sum: (step, step).
    EXPECT_EQ(out.ToVector(), (std::vector<float>{float(step), float(step)})) << "step " << step;
  }
  ASSERT_TRUE(ahead->Pull(1, {out}).ok());
  EXPECT_EQ(out.ToVector(), (std::vector<float>{kSteps, kSteps}));  // no push lost or failed
  EXPECT_EQ(c.servers[0]->shard().held(1).pending, 0);
}

// Issue 18, item 5: bounded staleness. With s = 2 a worker's pull after
// its t-th push waits only for step t - 2, so a worker whose partner has
// stopped completes exactly 2 steps more than the partner and then waits;
// each step the partner takes lets it take one more. Every value it pulls
// is of a step between t - 2 and t (without an optimizer a step's value is
// its sum, here (step, step)), and once both have pushed every step the
// value is the last step's.
TEST(DistSsp, AWorkerRunsExactlyStalenessStepsAheadOfTheSlowest) {
  constexpr int kStaleness = 2, kSteps = 10;
  Cluster c = StartServers(1, 2, /*sync=*/true, kStaleness);
  auto fast = Worker(c, 0, 2, 1 << 20, true, kStaleness);
  auto slow = Worker(c, 1, 2, 1 << 20, true, kStaleness);
  ASSERT_TRUE(fast->Init(1, Zeros({2})).ok());
  ASSERT_TRUE(slow->Init(1, Zeros({2})).ok());
  std::atomic<int> fast_steps{0};
  std::vector<float> seen(kSteps + 1, -1);  // by fast's step: the version its pull returned
  std::thread runner([&] {
    NDArray out = Empty({2});
    for (int step = 1; step <= kSteps; ++step) {
      ASSERT_TRUE(fast->Push(1, {FromVector({float(step), 0})}).ok());
      ASSERT_TRUE(fast->Pull(1, {out}).ok());
      const std::vector<float> v = out.ToVector();  // waits for the pull
      EXPECT_EQ(v[0], v[1]) << "step " << step;
      seen[step] = v[0];
      fast_steps.store(step);
    }
  });
  NDArray out = Empty({2});
  auto slow_step = [&](int step) {
    ASSERT_TRUE(slow->Push(1, {FromVector({0, float(step)})}).ok());
    ASSERT_TRUE(slow->Pull(1, {out}).ok());
    out.WaitToRead();
  };
  // The fast worker gets exactly `steps` steps done, and no more.
  auto expect_fast_at = [&](int steps) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (fast_steps.load() < steps && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
    absl::SleepFor(absl::Milliseconds(300));  // room to run further, if it could
    EXPECT_EQ(fast_steps.load(), steps);
  };
  for (int step = 1; step <= 2; ++step) slow_step(step);
  expect_fast_at(2 + kStaleness);
  slow_step(3);
  expect_fast_at(3 + kStaleness);
  for (int step = 4; step <= kSteps; ++step) slow_step(step);
  runner.join();
  for (int step = 1; step <= kSteps; ++step) {
    EXPECT_GE(seen[step], step - kStaleness) << "step " << step;
    EXPECT_LE(seen[step], step) << "step " << step;
  }
  ASSERT_TRUE(slow->Pull(1, {out}).ok());
  EXPECT_EQ(out.ToVector(), (std::vector<float>{kSteps, kSteps}));
}

TEST(DistSsp, StalenessMustMatchTheServersAndSuitTheMode) {
  Cluster c = StartServers(1, 2, /*sync=*/true, /*staleness=*/2);
  absl::Status s = Worker(c, 0, 2, 1 << 20, true, /*staleness=*/3)->Init(1, Ones({2}));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("this server allows a staleness of 2, the worker's store uses 3 "
                                     "(give every node the same --staleness or MX_STALENESS)"));
  s = Worker(c, 0, 2, 1 << 20)->Init(1, Ones({2}));  // plain dist_sync against it
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(Worker(c, 0, 2, 1 << 20, true, 2)->Init(1, Ones({2})).ok());

  DistKVStoreOptions o;
  o.servers = c.addresses;
  o.stream_addresses = c.stream_addresses;
  o.num_workers = 2;
  o.staleness = -1;
  EXPECT_THAT(CreateDistKVStore(o).status().message(),
              HasSubstr("staleness -1: must be 0 or more, and applies to dist_sync only"));
  o.staleness = 2;
  o.sync = false;
  EXPECT_EQ(CreateDistKVStore(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// The servers' count of pushed bytes as they arrived (this process's
// servers, all tests so far).
double PushedBytes() {
  for (absl::string_view line : absl::StrSplit(metrics::Registry::Global().Text(), '\n')) {
    if (absl::ConsumePrefix(&line, "mx_server_pushed_bytes_total ")) {
      double v = 0;
      EXPECT_TRUE(absl::SimpleAtod(line, &v)) << line;
      return v;
    }
  }
  return 0;
}

// Issue 18, item 4: with 2-bit compression a push sends +-t or 0 per
// element, in 1/16 of the bytes, and the worker adds what it lost to its
// next push; the server (no optimizer: a step's value is its sum) holds
// exactly the quantized values. Through Push, PushPull and a bucket.
TEST(DistCompression, TwoBitPushesCarryQuantizedValuesWithErrorFeedback) {
  Cluster c = StartServers(2, 1);
  auto kv = Worker(c, 0, 1, /*bound=*/16);  // key 2 (40 elements) is cut in 3
  ASSERT_TRUE(kv->SetGradientCompression({{"type", "2bit"}, {"threshold", "0.5"}}).ok());
  ASSERT_TRUE(kv->Init(1, Zeros({4})).ok());
  ASSERT_TRUE(kv->Init(2, Zeros({40})).ok());
  const NDArray g = FromVector({0.25f, 0.625f, -0.75f, 0.125f});  // exact in binary
  NDArray out = Empty({4});
  const double before = PushedBytes();
  ASSERT_TRUE(kv->Push(1, {g}).ok());
  ASSERT_TRUE(kv->Pull(1, {out}).ok());
  EXPECT_EQ(out.ToVector(), (std::vector<float>{0, 0.5f, -0.5f, 0}));
  EXPECT_EQ(PushedBytes() - before, 4);  // one 32-bit word, not 16 bytes
  ASSERT_TRUE(kv->PushPull(1, {g}, {out}).ok());  // residual (0.25, 0.125, -0.25, 0.125) added
  EXPECT_EQ(out.ToVector(), (std::vector<float>{0.5f, 0.5f, -0.5f, 0}));
  // A bucket of both keys, three steps. Key 1's residual goes on
  // (0.25, 0.25, -0.5, 0.25) -> ...; key 2's 3/16 reaches 0.5 at the third.
  const std::vector<std::vector<float>> key1 = {
      {0, 0.5f, -0.5f, 0}, {0.5f, 0.5f, -0.5f, 0.5f}, {0, 0.5f, -0.5f, 0}};
  NDArray out2 = Empty({40});
  for (int step = 1; step <= 3; ++step) {
    ASSERT_TRUE(kv->PushPull({1, 2}, {{g}, {FromVector(std::vector<float>(40, 0.1875f))}},
                             {{out}, {out2}}).ok());
    EXPECT_EQ(out.ToVector(), key1[step - 1]) << "step " << step;
    EXPECT_EQ(out2.ToVector(), std::vector<float>(40, step == 3 ? 0.5f : 0.0f)) << "step " << step;
  }
}

TEST(DistCompression, Fp16PushesHalfTheBytes) {
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, 1 << 20);
  ASSERT_TRUE(kv->SetGradientCompression({{"type", "fp16"}}).ok());
  ASSERT_TRUE(kv->Init(1, Zeros({3})).ok());
  NDArray out = Empty({3});
  const double before = PushedBytes();
  ASSERT_TRUE(kv->Push(1, {FromVector({1.0f + 1.0f / 4096, 2.5f, -1e-3f})}).ok());
  ASSERT_TRUE(kv->Pull(1, {out}).ok());
  EXPECT_EQ(out.ToVector(), (std::vector<float>{1.0f, 2.5f, static_cast<float>(static_cast<_Float16>(-1e-3f))}));
  EXPECT_EQ(PushedBytes() - before, 6);  // the pull waited for the push
}

TEST(DistCompression, BadSettingsAreErrors) {
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, 1 << 20);
  absl::Status s = kv->SetGradientCompression({{"type", "2bit"}, {"threshold", "0"}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("kvstore dist_sync: gradient compression: threshold '0' must "
                                     "be a float32 number above 0"));
  EXPECT_THAT(kv->SetGradientCompression({{"type", "3bit"}}).message(), HasSubstr("unknown type '3bit'"));
  ASSERT_TRUE(kv->Init(7, Zeros({2})).ok());
  ASSERT_TRUE(kv->Push(7, {Ones({2})}).ok());
  s = kv->SetGradientCompression({{"type", "2bit"}});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("set gradient compression before the first push (key 7 was pushed)"));
  auto local = KVStore::Create("local");
  ASSERT_TRUE(local.ok());
  s = (*local)->SetGradientCompression({{"type", "fp16"}});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("applies to the distributed stores"));
  EXPECT_TRUE((*local)->SetGradientCompression({{"type", "none"}}).ok());
}

// Workers sharing one process (one engine, one channel per server) run
// many steps of several keys in flight, as training does: every step
// completes, none waits for a deadline.
TEST(DistSync, ManyStepsOfManyKeysInFlight) {
  constexpr int kWorkers = 2, kSteps = 200;
  const std::vector<int64_t> sizes = {784 * 128, 128, 128 * 64, 64, 64 * 10, 10};
  Cluster c = StartServers(2, kWorkers);
  std::vector<std::thread> workers;
  std::vector<std::vector<float>> last(kWorkers);
  for (int r = 0; r < kWorkers; ++r) {
    workers.emplace_back([&, r] {
      auto kv = Worker(c, r, kWorkers, /*bound=*/1 << 20);
      std::vector<NDArray> grads, weights;
      for (size_t k = 0; k < sizes.size(); ++k) {
        ASSERT_TRUE(kv->Init(static_cast<int>(k), Zeros({sizes[k]})).ok());
        grads.push_back(Ones({sizes[k]}));
        weights.push_back(Empty({sizes[k]}));
      }
      for (int step = 0; step < kSteps; ++step) {
        for (size_t k = sizes.size(); k-- > 0;) {
          ASSERT_TRUE(kv->PushPull(static_cast<int>(k), {grads[k]}, {weights[k]},
                                   static_cast<int>(k)).ok());
        }
        for (const NDArray& w : weights) w.WaitToRead();
      }
      last[r] = weights[5].ToVector();
    });
  }
  for (auto& t : workers) t.join();
  // No optimizer: each step's value is the sum of both workers' ones.
  for (int r = 0; r < kWorkers; ++r) EXPECT_THAT(last[r], ::testing::Each(2.0f));
}

// A PushPull of several keys (small ones and one split across both
// servers) is one call per server and gives the same values as one key at
// a time.
TEST(DistSync, PushPullOfSeveralKeysMatchesOneAtATime) {
  constexpr int kWorkers = 2, kSteps = 3;
  const std::vector<int64_t> sizes = {3, 40, 5};  // key 11 is split (bound 16)
  Cluster c = StartServers(2, kWorkers);
  std::vector<std::vector<std::vector<float>>> bucketed(kWorkers), single(kWorkers);
  std::vector<std::thread> workers;
  for (int r = 0; r < kWorkers; ++r) {
    workers.emplace_back([&, r] {
      auto kv = SgdWorker(c, r, kWorkers);
      // Keys 10.. by bucket, 20.. one at a time, from the same start.
      std::vector<Key> keys;
      std::vector<std::vector<NDArray>> outs_b, outs_s;
      for (size_t k = 0; k < sizes.size(); ++k) {
        for (int base : {10, 20}) {
          ASSERT_TRUE(kv->Init(base + static_cast<int>(k), Ones({sizes[k]})).ok());
        }
        keys.emplace_back(10 + static_cast<int>(k));
        outs_b.push_back({Empty({sizes[k]}), Empty({sizes[k]})});  // two outputs each
        outs_s.push_back({Empty({sizes[k]})});
      }
      for (int step = 0; step < kSteps; ++step) {
        std::vector<std::vector<NDArray>> grads;
        for (size_t k = 0; k < sizes.size(); ++k) grads.push_back({FromVector(Grad(r, step, sizes[k]))});
        ASSERT_TRUE(kv->PushPull(keys, grads, outs_b, 1).ok());
        for (size_t k = 0; k < sizes.size(); ++k) {
          ASSERT_TRUE(kv->PushPull(20 + static_cast<int>(k), grads[k], outs_s[k]).ok());
        }
      }
      for (size_t k = 0; k < sizes.size(); ++k) {
        bucketed[r].push_back(outs_b[k][0].ToVector());
        EXPECT_EQ(outs_b[k][1].ToVector(), bucketed[r].back()) << "second output of key " << k;
        single[r].push_back(outs_s[k][0].ToVector());
      }
    });
  }
  for (auto& t : workers) t.join();
  for (int r = 0; r < kWorkers; ++r) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      EXPECT_EQ(bucketed[r][k], single[r][k]) << "worker " << r << " key " << k;
      EXPECT_EQ(bucketed[r][k], bucketed[0][k]);
    }
  }
}

// Device copies in the distributed stores: each worker pushes its gradient
// as two halves on the contexts `copies` (their sum is the gradient, bit
// for bit) and pulls into arrays on the contexts `outs`: keys 1 and 2 by a
// bucket PushPull, key 3 by Push then Pull, key 4 by PushPull. Checks every
// output after every step against the single-process reference.
void TrainWithCopies(bool device_sums, const std::vector<Context>& copies,
                     const std::vector<Context>& outs) {
  constexpr int kWorkers = 2, kSteps = 3;
  const std::vector<int64_t> sizes = {3, 40, 5, 20};  // key 2 is split (bound 16)
  Cluster c = StartServers(2, kWorkers);
  // pulled[rank][step][key][output]
  std::vector<std::vector<std::vector<std::vector<std::vector<float>>>>> pulled(kWorkers);
  std::vector<std::thread> workers;
  for (int r = 0; r < kWorkers; ++r) {
    workers.emplace_back([&, r] {
      DistKVStoreOptions o;
      o.servers = c.addresses;
      o.stream_addresses = c.stream_addresses;
      o.rank = r;
      o.num_workers = kWorkers;
      o.big_key_bound = 16;
      o.device_sums = device_sums;
      o.rpc_timeout = absl::Seconds(5);
      auto kv = CreateDistKVStore(o);
      ASSERT_TRUE(kv.ok()) << kv.status();
      EXPECT_EQ((*kv)->type(), device_sums ? "dist_device_sync" : "dist_sync");
      ASSERT_TRUE((*kv)->SetOptimizer(Sgd()).ok());
      std::vector<std::vector<NDArray>> weights;
      for (size_t k = 0; k < sizes.size(); ++k) {
        ASSERT_TRUE((*kv)->Init(static_cast<int>(k + 1), Ones({sizes[k]})).ok());
        weights.emplace_back();
        for (Context ctx : outs) weights.back().push_back(Empty({sizes[k]}, ctx));
      }
      for (int step = 0; step < kSteps; ++step) {
        std::vector<std::vector<NDArray>> halves;
        for (int64_t n : sizes) {
          const NDArray half = FromVector(Grad(r, step, n)) * 0.5f;
          halves.emplace_back();
          for (Context ctx : copies) halves.back().push_back(half.Copy(ctx));
        }
        ASSERT_TRUE((*kv)->PushPull({1, 2}, {halves[0], halves[1]}, {weights[0], weights[1]}).ok());
        ASSERT_TRUE((*kv)->Push(3, halves[2]).ok());
        ASSERT_TRUE((*kv)->Pull(3, weights[2]).ok());
        ASSERT_TRUE((*kv)->PushPull(4, halves[3], weights[3]).ok());
        pulled[r].emplace_back();
        for (const std::vector<NDArray>& key : weights) {
          pulled[r].back().emplace_back();
          for (const NDArray& w : key) pulled[r].back().back().push_back(w.ToVector());
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  const auto want = Reference(sizes, kWorkers, kSteps);
  for (int r = 0; r < kWorkers; ++r) {
    ASSERT_EQ(pulled[r].size(), static_cast<size_t>(kSteps));
    for (int step = 0; step < kSteps; ++step) {
      for (size_t k = 0; k < sizes.size(); ++k) {
        for (size_t i = 0; i < outs.size(); ++i) {
          EXPECT_EQ(pulled[r][step][k][i], want[step][k])
              << "worker " << r << " step " << step << " key " << k + 1 << " output on "
              << outs[i].ToString();
        }
      }
    }
  }
}

// dist_device_sync sums device copies where one of them lies (key k on copy
// k mod n's context): copies on two CPU contexts give dist_sync's values.
TEST(DistDeviceSync, CopiesOnCpuContextsGiveDistSyncsValues) {
  TrainWithCopies(/*device_sums=*/true, {cpu(0), cpu(1)}, {cpu(0), cpu(1)});
}

TEST(DistDeviceSync, OnlyWithDistSync) {
  Cluster c = StartServers(1, 1);
  DistKVStoreOptions o;
  o.servers = c.addresses;
  o.sync = false;
  o.device_sums = true;
  auto kv = CreateDistKVStore(o);
  ASSERT_FALSE(kv.ok());
  EXPECT_EQ(kv.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(kv.status().message(), HasSubstr("dist_sync only"));
}

// The GPU twins: copies on gpu(0) and the CPU, outputs on both (two on
// gpu(0): the second comes from the first), summed on the CPU (dist_sync)
// or where a copy lies (dist_device_sync: key 1 on the CPU, key 2 on the
// GPU, ...); every output holds the CPU reference's bits (one sum of two
// halves is exact, and the servers add the workers' sums as before).
class DistOnGpu : public ::testing::Test {
 protected:
  void SetUp() override { MX_SKIP_WITHOUT_GPU(); }
};

TEST_F(DistOnGpu, DeviceCopiesAndOutputsGiveTheCpuValues) {
  for (bool device_sums : {false, true}) {
    SCOPED_TRACE(device_sums ? "dist_device_sync" : "dist_sync");
    TrainWithCopies(device_sums, {gpu(0), cpu()}, {gpu(0), cpu(), gpu(0)});
  }
}

TEST(DistErrors, PushPullOfSeveralKeysChecksItsArguments) {
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, 1 << 20);
  ASSERT_TRUE(kv->Init(1, Ones({2})).ok());
  ASSERT_TRUE(kv->Init(2, Ones({3})).ok());
  NDArray a = Ones({2}), b = Ones({3});
  EXPECT_THAT(kv->PushPull({Key(1), Key(2)}, {{a}}, {{a}, {b}}).message(),
              HasSubstr("2 keys but 1 lists of values"));
  EXPECT_THAT(kv->PushPull({Key(1), Key(1)}, {{a}, {a}}, {{a}, {a}}).message(),
              HasSubstr("key 1 given twice"));
  EXPECT_THAT(kv->PushPull({Key(1), Key(2)}, {{a}, {a}}, {{a}, {b}}).message(),
              HasSubstr("pushpull of key 2: value 0 has shape (2,) but the key holds (3,)"));
  EXPECT_THAT(kv->PushPull({Key(1), Key(9)}, {{a}, {b}}, {{a}, {b}}).message(),
              HasSubstr("never initialized"));
  ASSERT_TRUE(kv->PushPull({Key(1), Key(2)}, {{a}, {b}}, {{a}, {b}}).ok());
  EXPECT_THAT(b.ToVector(), ElementsAre(1, 1, 1));
  EXPECT_EQ(kv->bucket_bytes(), 4 << 20);
}

// A pushpull whose outputs are the pushed array itself: in place.
TEST(DistSync, PushPullInPlace) {
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, 1 << 20);
  ASSERT_TRUE(kv->Init(4, Zeros({3})).ok());
  NDArray a = FromVector({1, 2, 3});
  ASSERT_TRUE(kv->PushPull(4, {a}, {a}).ok());  // no optimizer: the sum
  EXPECT_THAT(a.ToVector(), ElementsAre(1, 2, 3));
  ASSERT_TRUE(kv->PushPull(4, {a, a}, {a}).ok());
  EXPECT_THAT(a.ToVector(), ElementsAre(2, 4, 6));
}

TEST(DistSync, BigKeyRoundTripsAcrossServers) {
  Cluster c = StartServers(3, 1);
  auto kv = Worker(c, 0, 1, /*bound=*/100);
  std::vector<float> v(1000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  ASSERT_TRUE(kv->Init(5, FromVector(v)).ok());
  NDArray a = Empty({1000}), b = Empty({1000}, cpu(1));
  ASSERT_TRUE(kv->Pull(5, {a, b}).ok());
  EXPECT_EQ(a.ToVector(), v);
  EXPECT_EQ(b.ToVector(), v);
  // Without an optimizer a push replaces the value with the sum.
  ASSERT_TRUE(kv->Push(5, {FromVector(v), FromVector(v)}).ok());
  ASSERT_TRUE(kv->Pull(5, &a).ok());
  EXPECT_EQ(a.ToVector()[999], 2 * 999.0f);
}

TEST(DistAsync, PushesApplyOnArrival) {
  Cluster c = StartServers(1, 2, /*sync=*/false);
  auto kv = Worker(c, 1, 2, 1 << 20, /*sync=*/false);
  auto sgd = Optimizer::Create("sgd", {{"learning_rate", "1"}});
  ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
  ASSERT_TRUE(kv->Init(1, Zeros({2})).ok());
  ASSERT_TRUE(kv->Push(1, FromVector({1, 2})).ok());
  NDArray out = Empty({2});
  ASSERT_TRUE(kv->Pull(1, &out).ok());  // no other worker needed
  EXPECT_THAT(out.ToVector(), ElementsAre(-1, -2));
}

TEST(DistErrors, BadRequestsNameKeyAndServer) {
  Cluster c = StartServers(1, 2);
  auto kv = Worker(c, 0, 2, 1 << 20);
  EXPECT_THAT(kv->Push(3, Ones({2})).message(), HasSubstr("never initialized"));
  ASSERT_TRUE(kv->Init(3, Ones({2})).ok());
  EXPECT_THAT(kv->Push(3, Ones({3})).message(), HasSubstr("(3,)"));
  // Another worker initializes the key with another shape: the server says no.
  auto other = Worker(c, 1, 2, 1 << 20);
  absl::Status s = other->Init(3, Ones({4}));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("server 0 (" + c.addresses[0] + ")"));
  EXPECT_THAT(s.message(), HasSubstr("already initialized with shape (2,)"));
}

// A worker whose store differs from the servers' settings (a node started
// by hand with other flags) fails at its first init, saying what differs.
TEST(DistErrors, KeysThatWouldNameSlicesAreRefused) {
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, 1 << 20);
  const absl::Status s = kv->Init(1 << 24, Ones({2}));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("init of key 16777216: the distributed stores take keys below 16777216"));
  EXPECT_TRUE(kv->Init((1 << 24) - 1, Ones({2})).ok());
  EXPECT_TRUE(kv->Init(-5, Ones({2})).ok());  // negative keys are never cut into slice keys
}

TEST(DistErrors, AStoreOfAnotherModeOrJobSizeIsRefusedAtInit) {
  Cluster c = StartServers(1, 2);  // dist_sync, 2 workers
  absl::Status s = Worker(c, 0, 2, 1 << 20, /*sync=*/false)->Init(1, Ones({2}));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("init of key 1 on server 0"));
  EXPECT_THAT(s.message(), HasSubstr("this server runs dist_sync, the worker's store is dist_async"));
  s = Worker(c, 0, 3, 1 << 20)->Init(1, Ones({2}));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("this server expects 2 workers, the worker's job has 3"));
  EXPECT_TRUE(Worker(c, 0, 2, 1 << 20)->Init(1, Ones({2})).ok());
}

// Requests that no mx client sends: the server answers with an error and
// keeps serving.
TEST(DistErrors, MalformedMessagesAreRejectedAndTheServerKeepsServing) {
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, 1 << 20);
  ASSERT_TRUE(kv->Init(1, Ones({2})).ok());
  auto channel = grpc::CreateChannel(c.addresses[0], grpc::InsecureChannelCredentials());
  auto call = [&](const std::string& method, const std::string& bytes) {
    return testing::RawCall(channel, "/mx.proto.KVStoreService/" + method, bytes);
  };
  // Garbage: a truncated length-delimited field.
  grpc::Status s = call("Push", std::string("\x1a\x7f\x01", 3));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  // The small methods parse their requests too (gRPC's parser would say
  // INTERNAL, without a word).
  s = call("Init", std::string("\x12\x7f\x01", 3));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("init: malformed request"));
  s = call("SetOptimizer", std::string("\x0a\x02\xff\xfe", 4));  // a name that is no UTF-8
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("set_optimizer: malformed request"));
  // A well-formed push whose data disagree with its shape.
  proto::PushRequest bad;
  bad.set_key(1);
  bad.mutable_value()->add_shape(2);
  bad.mutable_value()->set_data(std::string(12, '\0'));
  s = call("PushPull", bad.SerializeAsString());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("push of key 1: tensor of shape (2,) carries 12 bytes"));
  // Compressed pushes: a 2-bit one without a threshold, one whose size
  // disagrees, and a dtype that does not exist.
  bad.mutable_value()->set_dtype(proto::TWO_BIT);
  bad.mutable_value()->set_data(std::string(4, '\0'));
  s = call("Push", bad.SerializeAsString());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("push of key 1: unsupported dtype 2 with threshold 0"));
  bad.mutable_value()->set_threshold(0.5f);
  bad.mutable_value()->set_data(std::string(8, '\0'));
  s = call("Push", bad.SerializeAsString());
  EXPECT_THAT(s.error_message(), HasSubstr("2bit (threshold 0.5) data of 2 values takes 4 bytes, not 8"));
  // Refused before the 2^30 floats (4 GiB) it claims are allocated: the
  // process's peak memory stays where it was.
  const int64_t peak = PeakResidentKb();
  bad.mutable_value()->set_shape(0, int64_t{1} << 30);
  s = call("Push", bad.SerializeAsString());
  EXPECT_THAT(s.error_message(),
              HasSubstr("data of 1073741824 values takes 268435456 bytes, not 8"));
  EXPECT_LT(PeakResidentKb() - peak, 512 << 10) << "KiB more at the peak";
  bad.mutable_value()->set_shape(0, 2);
  bad.mutable_value()->set_dtype(static_cast<proto::DType>(9));
  s = call("Push", bad.SerializeAsString());
  EXPECT_THAT(s.error_message(), HasSubstr("push of key 1: unsupported dtype 9"));
  // A pull of a key nobody initialized.
  proto::PullRequest unknown;
  unknown.set_key(77);
  s = call("Pull", unknown.SerializeAsString());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("key 77"));
  // A pushpull of several keys whose answer should go to shared memory
  // this worker never attached (the server aborted on it once).
  proto::PushPullManyRequest many;
  proto::PushRequest* entry = many.add_entries();
  entry->set_key(1);
  entry->mutable_value()->add_shape(2);
  entry->mutable_value()->set_data(std::string(8, '\0'));
  entry->mutable_shm_reply()->set_offset(0);
  s = call("PushPullMany", many.SerializeAsString());
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.error_message(), HasSubstr("pushpull of key 1"));
  // A plain protobuf push (data in one occurrence of the field) is fine.
  proto::PushRequest good;
  good.set_key(1);
  good.mutable_value()->add_shape(2);
  const float two[2] = {2, 2};
  good.mutable_value()->set_data(two, sizeof(two));
  EXPECT_TRUE(call("Push", good.SerializeAsString()).ok());
  NDArray out = Empty({2});
  ASSERT_TRUE(kv->Pull(1, &out).ok());
  EXPECT_THAT(out.ToVector(), ElementsAre(2, 2));
}

// Seeds for MutatedRequests: a valid request of every method that takes
// one, by method name.
std::vector<std::pair<std::string, std::string>> ValidRequests() {
  const float four[4] = {1, 2, 3, 4};
  auto push = [&](int key, int64_t min_version) {
    proto::PushRequest p;
    p.set_key(key);
    p.set_rank(0);
    p.set_min_version(min_version);
    p.mutable_value()->add_shape(4);
    p.mutable_value()->set_data(four, sizeof(four));
    return p;
  };
  proto::PushPullManyRequest many;
  *many.add_entries() = push(1, 0);
  *many.add_entries() = push(2, 0);
  proto::PullRequest pull;
  pull.set_key(1);
  proto::InitRequest init;
  init.set_key(3);
  *init.mutable_value() = push(3, 0).value();
  proto::SetOptimizerRequest sgd;
  sgd.set_name("sgd");
  (*sgd.mutable_options())["learning_rate"] = "0.1";
  (*sgd.mutable_param_names())[1] = "fc_weight";
  (*sgd.mutable_lr_mult())["fc_weight"] = 2;
  std::unique_ptr<Optimizer> opt = Sgd();
  opt->Update(1, Zeros({4}), Ones({4}));
  proto::OptimizerStates states;
  states.set_states(*opt->SaveStates());
  return {{"Push", push(1, 0).SerializeAsString()},
          {"PushPull", push(1, 0).SerializeAsString()},
          {"PushPullMany", many.SerializeAsString()},
          {"Pull", pull.SerializeAsString()},
          {"Init", init.SerializeAsString()},
          {"SetOptimizer", sgd.SerializeAsString()},
          {"LoadOptimizerStates", states.SerializeAsString()}};
}

// `bytes` with 1 to 3 random changes: bits flipped, a byte set to an edge
// value, a cut, random bytes inserted, a run repeated.
std::string Mutate(std::string bytes, std::mt19937* rng) {
  auto below = [&](size_t n) { return n == 0 ? size_t{0} : (*rng)() % n; };
  for (int m = 1 + below(3); m > 0; --m) {
    const size_t at = below(bytes.size() + 1);
    switch (below(5)) {
      case 0:
        if (at < bytes.size()) bytes[at] ^= static_cast<char>(1 << below(8));
        break;
      case 1:
        if (at < bytes.size()) bytes[at] = "\x00\x7f\x80\xff"[below(4)];
        break;
      case 2:
        bytes.resize(at);
        break;
      case 3:
        for (size_t i = 1 + below(8); i > 0; --i) bytes.insert(bytes.begin() + at, static_cast<char>((*rng)()));
        break;
      default:
        bytes.insert(at, bytes.substr(below(bytes.size() + 1), 1 + below(16)));
    }
  }
  return bytes;
}

// Thousands of requests that are valid ones mutated at random (a fixed
// seed, so a failure repeats) reach every method that parses a request.
// Each is answered (an error or a success) within its deadline, none as an
// escaped exception or an internal error, and the server then serves a
// worker correctly.
TEST(DistErrors, MutatedRequestsAreAnsweredAndTheServerKeepsServing) {
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, 1 << 20);
  ASSERT_TRUE(kv->Init(1, Ones({4})).ok());
  ASSERT_TRUE(kv->Init(2, Ones({4})).ok());
  grpc::GenericStub stub(grpc::CreateChannel(c.addresses[0], grpc::InsecureChannelCredentials()));
  std::mt19937 rng(20261202);
  std::map<grpc::StatusCode, int> codes;
  constexpr int kRounds = 200, kInFlight = 50;  // 10,000 calls, 50 at a time
  const auto seeds = ValidRequests();
  for (int round = 0; round < kRounds; ++round) {
    struct Call {
      grpc::ClientContext ctx;
      grpc::ByteBuffer req, resp;
      grpc::Status status;
      absl::Notification done;
    };
    std::vector<std::unique_ptr<Call>> calls;
    for (int i = 0; i < kInFlight; ++i) {
      const auto& [method, valid] = seeds[rng() % seeds.size()];
      auto call = std::make_unique<Call>();
      grpc::Slice slice(Mutate(valid, &rng));
      call->req = grpc::ByteBuffer(&slice, 1);
      call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
      Call* raw = call.get();
      stub.UnaryCall(&raw->ctx, "/mx.proto.KVStoreService/" + method, grpc::StubOptions(), &raw->req,
                     &raw->resp, [raw](grpc::Status s) {
                       raw->status = s;
                       raw->done.Notify();
                     });
      calls.push_back(std::move(call));
    }
    for (auto& call : calls) {
      ASSERT_TRUE(call->done.WaitForNotificationWithTimeout(absl::Seconds(10))) << "a call hung";
      ++codes[call->status.error_code()];
      EXPECT_NE(call->status.error_code(), grpc::StatusCode::UNKNOWN) << call->status.error_message();
      EXPECT_NE(call->status.error_code(), grpc::StatusCode::INTERNAL) << call->status.error_message();
    }
  }
  for (const auto& [code, n] : codes) std::cout << "status " << code << ": " << n << " calls\n";
  EXPECT_GT(codes[grpc::StatusCode::INVALID_ARGUMENT], 100);  // the mutants were parsed

  // The server serves as it should (with the optimizer a worker sets: the
  // mutants set others).
  ASSERT_TRUE(kv->SetOptimizer(Sgd()).ok());
  ASSERT_TRUE(kv->Init(9, Zeros({3})).ok());
  NDArray out = Empty({3});
  ASSERT_TRUE(kv->PushPull(9, {FromVector({1, 2, 3})}, {out}).ok());
  EXPECT_THAT(out.ToVector(), ElementsAre(-0.5f, -1, -1.5f));
}

// A request over the server's size limit is refused with an error naming
// the key and the server; the server goes on serving.
TEST(DistErrors, OversizedMessagesAreRefusedAndTheServerKeepsServing) {
  auto server = ParameterServer::Start("127.0.0.1:0", {true, 1, false}, MaxMessageMb(1));
  ASSERT_TRUE(server.ok()) << server.status();
  DistKVStoreOptions o;
  AddServer(**server, &o);
  o.rpc_timeout = absl::Seconds(5);
  auto kv = CreateDistKVStore(o);
  ASSERT_TRUE(kv.ok());
  constexpr int64_t kBig = 512 * 1024;  // 2 MiB of floats
  ASSERT_TRUE((*kv)->Init(1, Zeros({4})).ok());
  absl::Status big = (*kv)->Init(2, Zeros({kBig}));
  EXPECT_EQ(big.code(), absl::StatusCode::kResourceExhausted) << big;
  EXPECT_THAT(big.message(), HasSubstr("init of key 2 on server 0"));
  NDArray out = Empty({4});
  ASSERT_TRUE((*kv)->PushPull(1, {Ones({4})}, {out}).ok());
  EXPECT_THAT(out.ToVector(), ElementsAre(1, 1, 1, 1));
  EXPECT_EQ(ParameterServer::Start("127.0.0.1:0", {true, 1, false}, MaxMessageMb(0)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A stream port another process holds is an error naming it; the server
// does not start.
TEST(DistErrors, AStreamPortInUseIsAnErrorNamingIt) {
  ParameterServerOptions first;
  first.stream_port = 0;
  auto holder = ParameterServer::Start("127.0.0.1:0", {true, 1, false}, first);
  ASSERT_TRUE(holder.ok()) << holder.status();
  const std::string taken = (*holder)->stream_address();
  ParameterServerOptions second;
  ASSERT_TRUE(absl::SimpleAtoi(taken.substr(taken.rfind(':') + 1), &second.stream_port));
  auto clash = ParameterServer::Start("127.0.0.1:0", {true, 1, false}, second);
  ASSERT_FALSE(clash.ok());
  EXPECT_THAT(clash.status().message(), HasSubstr("stream port: cannot listen on 127.0.0.1:"));
  EXPECT_THAT(clash.status().message(), HasSubstr("in use"));
}

TEST(DistErrors, PullFromAStoppedServerFailsWithinTheDeadlineNamingIt) {
  Cluster c = StartServers(1, 1);
  DistKVStoreOptions o;
  o.servers = c.addresses;
  o.stream_addresses = c.stream_addresses;
  o.rpc_timeout = absl::Seconds(2);
  auto kv = CreateDistKVStore(o);
  ASSERT_TRUE(kv.ok());
  ASSERT_TRUE((*kv)->Init(1, Ones({2})).ok());
  c.servers.clear();  // the server goes away
  NDArray out = Empty({2});
  const absl::Time start = absl::Now();
  ASSERT_TRUE((*kv)->Pull(1, &out).ok());  // pushed to the engine
  try {
    out.WaitToRead();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(c.addresses[0]));
    EXPECT_THAT(e.what(), HasSubstr("pull of key 1"));
  }
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
}

// A server that starts where one died (its address, now free) serves a
// store made after it at once. gRPC channels are shared in the process,
// and the old one, refused by the dead server, would fail every call at
// once until its reconnect backoff ended; CI saw it when a test's server
// got a dead one's port.
TEST(DistErrors, AStoreReachesAServerThatListensWhereADeadOneDid) {
  Cluster c = StartServers(1, 1);
  const std::string address = c.addresses[0];
  {
    DistKVStoreOptions o;
    o.servers = c.addresses;
    o.stream_addresses = c.stream_addresses;
    o.rpc_timeout = absl::Seconds(2);
    o.connections_per_server = 2;
    auto old = CreateDistKVStore(o);
    ASSERT_TRUE(old.ok()) << old.status();
    for (int key = 1; key < 6; ++key) ASSERT_TRUE((*old)->Init(key, Ones({2})).ok());
    c.servers.clear();
    // Connections refused on every channel (the keys take both).
    EXPECT_EQ((*old)->Init(6, Ones({2})).code(), absl::StatusCode::kUnavailable);
    for (int key = 1; key < 6; ++key) {
      NDArray out = Empty({2});
      ASSERT_TRUE((*old)->Pull(key, &out).ok());
      EXPECT_THROW(out.WaitToRead(), Error) << key;
    }
  }
  auto again = ParameterServer::Start(address, {true, 1, false}, MaxMessageMb(1024));
  ASSERT_TRUE(again.ok()) << again.status();
  DistKVStoreOptions o;
  AddServer(**again, &o);
  o.rpc_timeout = absl::Seconds(2);
  o.connections_per_server = 2;
  auto kv = CreateDistKVStore(o);
  ASSERT_TRUE(kv.ok()) << kv.status();
  for (int key = 1; key < 6; ++key) {
    const absl::Status init = (*kv)->Init(key, Zeros({2}));
    ASSERT_TRUE(init.ok()) << init;
  }
  for (int key = 1; key < 6; ++key) {
    NDArray out = Empty({2});
    ASSERT_TRUE((*kv)->PushPull(key, {Ones({2})}, {out}).ok());
    EXPECT_THAT(out.ToVector(), ElementsAre(1, 1)) << key;
  }
}

// Momentum lives on the servers: saving and loading it through the client
// continues a run exactly, even on a new cluster.
TEST(DistOptimizerStates, SaveAndLoadContinueARunExactly) {
  const std::vector<float> g1 = {1, -2, 3}, g2 = {0.5f, 0.25f, -1};
  std::vector<float> straight;
  {
    Cluster c = StartServers(2, 1);
    auto kv = Worker(c, 0, 1, 2);  // bound 2: the key is split over both servers
    ASSERT_TRUE(kv->SetOptimizer(Sgd()).ok());
    ASSERT_TRUE(kv->Init(1, Ones({3})).ok());
    ASSERT_TRUE(kv->Push(1, FromVector(g1)).ok());
    ASSERT_TRUE(kv->Push(1, FromVector(g2)).ok());
    NDArray out = Empty({3});
    ASSERT_TRUE(kv->Pull(1, &out).ok());
    straight = out.ToVector();
  }
  const std::string path = ::testing::TempDir() + "/dist.states";
  std::vector<float> after_one;
  {
    Cluster c = StartServers(2, 1);
    auto kv = Worker(c, 0, 1, 2);
    EXPECT_EQ(kv->SaveOptimizerStates(path).code(), absl::StatusCode::kFailedPrecondition);
    ASSERT_TRUE(kv->SetOptimizer(Sgd()).ok());
    ASSERT_TRUE(kv->Init(1, Ones({3})).ok());
    ASSERT_TRUE(kv->Push(1, FromVector(g1)).ok());
    NDArray out = Empty({3});
    ASSERT_TRUE(kv->Pull(1, &out).ok());
    after_one = out.ToVector();
    ASSERT_TRUE(kv->SaveOptimizerStates(path).ok());
  }
  Cluster c = StartServers(2, 1);
  auto kv = Worker(c, 0, 1, 2);
  ASSERT_TRUE(kv->SetOptimizer(Sgd()).ok());
  ASSERT_TRUE(kv->Init(1, FromVector(after_one)).ok());
  ASSERT_TRUE(kv->LoadOptimizerStates(path).ok());
  ASSERT_TRUE(kv->Push(1, FromVector(g2)).ok());
  NDArray out = Empty({3});
  ASSERT_TRUE(kv->Pull(1, &out).ok());
  EXPECT_EQ(out.ToVector(), straight);

  Cluster three = StartServers(3, 1);
  auto other = Worker(three, 0, 1, 2);
  ASSERT_TRUE(other->SetOptimizer(Sgd()).ok());
  absl::Status s = other->LoadOptimizerStates(path);
  EXPECT_THAT(s.message(), HasSubstr("holds the state of 2 servers; this job has 3"));
}

// A file saved with replicas 2 has an empty entry for a server that was
// no key's primary; a job with one copy loads it too. Before, the empty
// entry went to that server, which refused it ("not an mx NDArray file").
TEST(DistOptimizerStates, AnEmptyEntryIsNoState) {
  const std::string path = ::testing::TempDir() + "/empty_entry.states";
  const std::vector<float> g1 = {1, -2, 3}, g2 = {0.5f, 0.25f, -1};
  std::vector<float> straight, after_one;
  {
    Cluster c = StartServers(2, 1);
    auto kv = SgdWorker(c, 0, 1);  // the key (3 values) on one server
    ASSERT_TRUE(kv->Init(1, Ones({3})).ok());
    NDArray out = Empty({3});
    for (const auto& g : {g1, g2}) {
      ASSERT_TRUE(kv->Push(1, FromVector(g)).ok());
      ASSERT_TRUE(kv->Pull(1, &out).ok());
      if (after_one.empty()) {
        after_one = out.ToVector();
        ASSERT_TRUE(kv->SaveOptimizerStates(path).ok());
      }
    }
    straight = out.ToVector();
  }
  proto::ClusterOptimizerStates all;
  {
    std::ifstream in(path, std::ios::binary);
    ASSERT_TRUE(all.ParseFromIstream(&in));
  }
  ASSERT_EQ(all.servers_size(), 2);
  // The server without the key: as replicas 2 saves it.
  const int keyless = all.servers(0).size() < all.servers(1).size() ? 0 : 1;
  all.set_servers(keyless, "");
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    ASSERT_TRUE(all.SerializeToOstream(&out));
  }
  Cluster c = StartServers(2, 1);
  auto kv = SgdWorker(c, 0, 1);
  ASSERT_TRUE(kv->Init(1, FromVector(after_one)).ok());
  const absl::Status loaded = kv->LoadOptimizerStates(path);
  ASSERT_TRUE(loaded.ok()) << loaded;
  ASSERT_TRUE(kv->Push(1, FromVector(g2)).ok());
  NDArray out = Empty({3});
  ASSERT_TRUE(kv->Pull(1, &out).ok());
  EXPECT_EQ(out.ToVector(), straight);
}

// The servers apply the same per-parameter rules as a worker would: a bias
// is not decayed, a multiplier scales the learning rate.
// Keys of 8 elements with a bound of 2: each is cut into 4 slices on the
// one server, held under slice keys, and every slice is updated with its
// key's name (no decay for the bias, twice the rate for the weight).
TEST(DistOptimizer, ServersApplyParameterNamesAndMultipliers) {
  auto make = [] {
    auto sgd = *Optimizer::Create("sgd", {{"learning_rate", "0.5"}, {"wd", "0.1"}});
    sgd->SetParamNames({{1, "fc_weight"}, {2, "fc_bias"}});
    sgd->SetLrMult({{"fc_weight", 2.0f}});
    return sgd;
  };
  Cluster c = StartServers(1, 1);
  auto kv = Worker(c, 0, 1, /*bound=*/2);
  ASSERT_TRUE(kv->SetOptimizer(make()).ok());
  auto local = KVStore::Create("local");
  ASSERT_TRUE((*local)->SetOptimizer(make()).ok());
  const std::vector<float> grad = {1, -1, 1, -1, 1, -1, 1, -1};
  for (KVStore* store : {kv.get(), local->get()}) {
    for (int key : {1, 2}) {
      ASSERT_TRUE(store->Init(key, Ones({8})).ok());
      ASSERT_TRUE(store->Push(key, FromVector(grad)).ok());
    }
  }
  for (int key : {1, 2}) {
    NDArray d = Empty({8}), l = Empty({8});
    ASSERT_TRUE(kv->Pull(key, &d).ok());
    ASSERT_TRUE((*local)->Pull(key, &l).ok());
    EXPECT_EQ(d.ToVector(), l.ToVector()) << "key " << key;
  }
  NDArray bias = Empty({8});
  ASSERT_TRUE(kv->Pull(2, &bias).ok());
  EXPECT_THAT(bias.ToVector(), ElementsAre(0.5f, 1.5f, 0.5f, 1.5f, 0.5f, 1.5f, 0.5f, 1.5f));
  NDArray weight = Empty({8});
  ASSERT_TRUE(kv->Pull(1, &weight).ok());
  const std::vector<float> w = weight.ToVector();
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_FLOAT_EQ(w[i], 1 - 1.0f * (grad[i] + 0.1f)) << i;  // lr 0.5 x 2, wd 0.1
  }
  // The slices are there: slice 3 of key 2 under its slice key.
  EXPECT_TRUE(c.servers[0]->shard().Pull(2 + (3 << 24), 1, absl::Now() + absl::Seconds(1)).ok());
}

// Every variable follows the one policy of ndarray/env.h: a value that is
// given but wrong is an error naming the variable and the value.
TEST(DistKVStoreOptions, BadEnvironmentVariablesAreErrors) {
  setenv("MX_COORDINATOR", "127.0.0.1:1", 1);
  auto message = [] { return std::string(CreateDistKVStoreFromEnvironment("dist_sync").status().message()); };
  setenv("MX_BUCKET_KB", "4MB", 1);
  auto bad = CreateDistKVStoreFromEnvironment("dist_sync");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(),
              HasSubstr("kvstore dist_sync: MX_BUCKET_KB=4MB: must be a whole number from 0"));
  unsetenv("MX_BUCKET_KB");
  setenv("MX_ELASTIC", "yes", 1);
  EXPECT_THAT(message(), HasSubstr("MX_ELASTIC=yes: must be 0 or 1"));
  unsetenv("MX_ELASTIC");
  for (const char* rank : {"-1", "first"}) {
    setenv("MX_RANK", rank, 1);
    EXPECT_THAT(message(), HasSubstr(absl::StrCat("MX_RANK=", rank, ": must be a whole number from 0")));
  }
  unsetenv("MX_RANK");
  setenv("MX_STALENESS", "-1", 1);
  EXPECT_THAT(message(), HasSubstr("MX_STALENESS=-1: must be a whole number from 0"));
  unsetenv("MX_STALENESS");
  setenv("MX_RPC_TIMEOUT_S", "soon", 1);
  EXPECT_THAT(message(), HasSubstr("MX_RPC_TIMEOUT_S=soon: must be a whole number from 1"));
  unsetenv("MX_RPC_TIMEOUT_S");
  setenv("MX_JOB_TOKEN_FILE", "/nonexistent/token", 1);
  EXPECT_THAT(message(),
              HasSubstr("MX_JOB_TOKEN_FILE: cannot read /nonexistent/token: No such file"));
  setenv("MX_JOB_TOKEN_FILE", "/tmp", 1);  // said "is empty"
  EXPECT_THAT(message(), HasSubstr("MX_JOB_TOKEN_FILE: /tmp is a directory"));
  // A blank first line is no token (it made an open job).
  const std::string blank = ::testing::TempDir() + "blank_token";
  {
    std::ofstream f(blank);
    f << "\nsecret\n";
  }
  setenv("MX_JOB_TOKEN_FILE", blank.c_str(), 1);
  EXPECT_THAT(message(), HasSubstr("the job token file's first line is empty"));
  // A token's line end (a Kubernetes Secret made from a file `echo` wrote,
  // a file of Windows lines) is no part of it; white space within is an
  // error naming where the token came from.
  const std::string crlf = ::testing::TempDir() + "crlf_token";
  {
    std::ofstream f(crlf);
    f << "secret\r\n";
  }
  setenv("MX_JOB_TOKEN_FILE", crlf.c_str(), 1);
  auto security = rpc::Security::FromEnvironment();
  ASSERT_TRUE(security.ok()) << security.status();
  EXPECT_EQ(security->token, "secret");
  unsetenv("MX_JOB_TOKEN_FILE");
  for (const char* token : {"secret\n", "secret\r\n"}) {
    setenv("MX_JOB_TOKEN", token, 1);
    security = rpc::Security::FromEnvironment();
    ASSERT_TRUE(security.ok()) << security.status();
    EXPECT_EQ(security->token, "secret");
  }
  setenv("MX_JOB_TOKEN", "sec ret", 1);
  EXPECT_THAT(message(), HasSubstr("the job token (MX_JOB_TOKEN) must not contain white space"));
  // Metadata takes printable ASCII only: a token of random bytes aborted
  // the node in gRPC; a set but empty one ran an open job.
  setenv("MX_JOB_TOKEN", "t\xc3\xb6ken", 1);
  EXPECT_THAT(message(), HasSubstr("the job token (MX_JOB_TOKEN) must be printable ASCII (bytes "
                                   "0x21 to 0x7e; e.g. `openssl rand -hex 32`), not byte 0xc3"));
  for (const char* empty : {"", "\n"}) {
    setenv("MX_JOB_TOKEN", empty, 1);
    EXPECT_THAT(message(), HasSubstr("MX_JOB_TOKEN is set but empty"));
  }
  unsetenv("MX_JOB_TOKEN");
  setenv("MX_TLS_CERT", "/etc/hostname", 1);
  EXPECT_THAT(message(), HasSubstr("give all three or none"));
  unsetenv("MX_TLS_CERT");
  unsetenv("MX_COORDINATOR");
}

TEST(DistKVStoreOptions, BadOptionsAreErrors) {
  DistKVStoreOptions o;
  EXPECT_EQ(CreateDistKVStore(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.servers = {"127.0.0.1:1"};
  o.rank = 2;
  o.num_workers = 2;
  EXPECT_THAT(CreateDistKVStore(o).status().message(), HasSubstr("rank 2 outside 0..1"));
  o.rank = 0;
  // No deadline at all, or one every call misses.
  for (absl::Duration timeout : {absl::InfiniteDuration(), absl::ZeroDuration()}) {
    o.rpc_timeout = timeout;
    EXPECT_THAT(
        CreateDistKVStore(o).status().message(),
        HasSubstr("rpc_timeout " + absl::FormatDuration(timeout) + ": must be from 1s to 24h"));
  }
}

// An empty bucket is nothing to do: it made an engine operation that
// waited for no call and never ended, so WaitAll hung.
TEST(DistBucket, AnEmptyBucketIsNothingToDo) {
  Cluster c = StartServers(1, 1);
  std::unique_ptr<KVStore> kv = Worker(c, 0, 1, 16);
  ASSERT_TRUE(kv->PushPull(std::vector<Key>{}, {}, {}).ok());
  std::vector<RowSparseNDArray> outs(3);
  ASSERT_TRUE(kv->PushPullRowSparse(std::vector<Key>{}, {}, {}, &outs).ok());
  EXPECT_TRUE(outs.empty());
  auto waited = std::make_shared<absl::Notification>();
  std::thread([waited] {
    for (;;) {  // until no error of an earlier test's operations is left to throw
      try {
        Engine::Get()->WaitForAll();
        break;
      } catch (const Error&) {
      }
    }
    waited->Notify();
  }).detach();
  EXPECT_TRUE(waited->WaitForNotificationWithTimeout(absl::Seconds(10)))
      << "the engine did not finish its work";
}

// ---- Row-sparse keys (tables split by row ranges over the servers).

// Worker `rank`'s row-sparse gradient of a (100, 3) table at `step`: rows in
// both servers' ranges ([0, 50) and [50, 100)), overlapping the other
// worker's, and at step 2 none in server 1's range for worker 1 (its push
// there is an empty vote). Values whose float sum depends on the order.
RowSparseNDArray TableGrad(int rank, int step) {
  std::vector<int64_t> ids = rank == 0 ? std::vector<int64_t>{1, 2, 60 + step}
                                       : (step == 2 ? std::vector<int64_t>{3}
                                                    : std::vector<int64_t>{2, 50, 99});
  std::vector<float> v;
  for (size_t i = 0; i < ids.size() * 3; ++i) v.push_back((rank == 0 ? 1e7f : 0.3f) * (1 + (i + step) % 4) - rank);
  return RowSparseNDArray({100, 3}, ids, FromVector(v, {static_cast<int64_t>(ids.size()), 3}));
}

std::vector<int64_t> AllRows(int64_t n) {
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = i;
  return ids;
}

TEST(DistRowSparse, TwoServersTwoWorkersMatchTheLocalStoreBitForBit) {
  constexpr int kWorkers = 2, kSteps = 3, kKey = 7;
  const TableInit init{0.5f, 11};
  Cluster c = StartServers(2, kWorkers);
  std::vector<std::vector<std::vector<float>>> pulled(kWorkers);
  std::vector<std::thread> workers;
  for (int r = 0; r < kWorkers; ++r) {
    workers.emplace_back([&, r] {
      auto kv = SgdWorker(c, r, kWorkers);
      ASSERT_TRUE(kv->InitRowSparse(kKey, {100, 3}, init).ok());
      for (int step = 0; step < kSteps; ++step) {
        ASSERT_TRUE(kv->Push(kKey, TableGrad(r, step)).ok());
        RowSparseNDArray rows;
        ASSERT_TRUE(kv->RowSparsePull(kKey, AllRows(100), &rows).ok());
        pulled[r].push_back(rows.data().ToVector());
      }
    });
  }
  for (auto& t : workers) t.join();

  // The local store, given both workers' gradients in rank order.
  auto local = KVStore::Create("local");
  ASSERT_TRUE(local.ok());
  ASSERT_TRUE((*local)->SetOptimizer(Sgd()).ok());
  ASSERT_TRUE((*local)->InitRowSparse(kKey, {100, 3}, init).ok());
  for (int step = 0; step < kSteps; ++step) {
    ASSERT_TRUE((*local)->PushRowSparse(kKey, {TableGrad(0, step), TableGrad(1, step)}).ok());
    RowSparseNDArray want;
    ASSERT_TRUE((*local)->RowSparsePull(kKey, AllRows(100), &want).ok());
    const std::vector<float> w = want.data().ToVector();
    for (int r = 0; r < kWorkers; ++r) {
      ASSERT_EQ(pulled[r][step].size(), w.size());
      EXPECT_EQ(0, std::memcmp(pulled[r][step].data(), w.data(), w.size() * sizeof(float)))
          << "step " << step << " worker " << r;
    }
  }
  // Each server holds its half of the rows only.
  for (int s = 0; s < 2; ++s) {
    auto range = c.servers[s]->shard().Pull(kKey, kSteps, absl::Now() + absl::Seconds(1),
                                            std::vector<int64_t>{s * 50});
    ASSERT_TRUE(range.ok()) << range.status();
    auto outside = c.servers[s]->shard().Pull(kKey, kSteps, absl::Now() + absl::Seconds(1),
                                              std::vector<int64_t>{(1 - s) * 50});
    EXPECT_THAT(std::string(outside.status().message()),
                HasSubstr(absl::StrCat("is not among this server's rows [", s * 50)));
  }
}

// PushPullRowSparse of two tables (one call per server for both): each
// step's push, and other rows at the version that includes it, exactly as
// the local store's Push then RowSparsePull give them.
TEST(DistRowSparse, PushPullOfSeveralTablesMatchesPushThenPull) {
  constexpr int kWorkers = 2, kSteps = 3;
  Cluster c = StartServers(2, kWorkers);
  const std::vector<Key> keys = {7, 8};
  const std::vector<int64_t> next = {0, 2, 49, 50, 60, 61, 62, 99};
  std::vector<std::vector<std::vector<float>>> pulled(kWorkers);
  std::vector<std::thread> workers;
  for (int r = 0; r < kWorkers; ++r) {
    workers.emplace_back([&, r] {
      auto kv = SgdWorker(c, r, kWorkers);
      for (const Key& k : keys) ASSERT_TRUE(kv->InitRowSparse(k, {100, 3}, {0.5f, 3}).ok());
      for (int step = 0; step < kSteps; ++step) {
        std::vector<RowSparseNDArray> outs;
        ASSERT_TRUE(kv->PushPullRowSparse(keys, {{TableGrad(r, step)}, {TableGrad(r, step) * 2.f}},
                                          {next, next}, &outs)
                        .ok());
        ASSERT_EQ(outs.size(), 2u);
        for (const RowSparseNDArray& o : outs) pulled[r].push_back(o.data().ToVector());
      }
    });
  }
  for (auto& t : workers) t.join();
  auto local = KVStore::Create("local");
  ASSERT_TRUE(local.ok());
  ASSERT_TRUE((*local)->SetOptimizer(Sgd()).ok());
  for (const Key& k : keys) ASSERT_TRUE((*local)->InitRowSparse(k, {100, 3}, {0.5f, 3}).ok());
  for (int step = 0; step < kSteps; ++step) {
    for (size_t t = 0; t < keys.size(); ++t) {
      const float scale = t == 0 ? 1.f : 2.f;
      ASSERT_TRUE((*local)
                      ->PushRowSparse(keys[t], {TableGrad(0, step) * scale, TableGrad(1, step) * scale})
                      .ok());
      RowSparseNDArray want;
      ASSERT_TRUE((*local)->RowSparsePull(keys[t], next, &want).ok());
      for (int r = 0; r < kWorkers; ++r) {
        EXPECT_EQ(pulled[r][step * 2 + t], want.data().ToVector())
            << "step " << step << " table " << t << " worker " << r;
      }
    }
  }
}

TEST(DistRowSparse, APullOfSomeRowsAsksOnlyTheirServersAndAsyncAppliesOnArrival) {
  Cluster c = StartServers(2, 1, /*sync=*/false);
  auto kv = Worker(c, 0, 1, 16, /*sync=*/false);
  ASSERT_TRUE(kv->SetOptimizer(Sgd()).ok());
  ASSERT_TRUE(kv->InitRowSparse(3, {10, 2}).ok());
  ASSERT_TRUE(kv->Push(3, RowSparseNDArray({10, 2}, {1, 8}, FromVector({1, 2, 3, 4}, {2, 2}))).ok());
  RowSparseNDArray rows;
  ASSERT_TRUE(kv->RowSparsePull(3, {8}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>({-1.5f, -2.f}));
  ASSERT_TRUE(kv->RowSparsePull(3, {}, &rows).ok());
  EXPECT_EQ(rows.nnz(), 0);
  rows.data().WaitToRead();
}

TEST(DistRowSparse, AssignRowsSetsRowsOnEveryServerOutsideSteps) {
  Cluster c = StartServers(2, 1);
  auto kv = Worker(c, 0, 1, 16);
  ASSERT_TRUE(kv->SetOptimizer(Sgd()).ok());
  ASSERT_TRUE(kv->InitRowSparse(3, {10, 2}).ok());
  // Rows 1 (server 0) and 8 (server 1); no step, no optimizer.
  ASSERT_TRUE(kv->AssignRows(3, RowSparseNDArray({10, 2}, {1, 8}, FromVector({1, 2, 3, 4}, {2, 2})))
                  .ok());
  RowSparseNDArray rows;
  ASSERT_TRUE(kv->RowSparsePull(3, {1, 8, 9}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>({1, 2, 3, 4, 0, 0}));
  // The first push is still the first step.
  ASSERT_TRUE(kv->Push(3, RowSparseNDArray({10, 2}, {9}, FromVector({1, 1}, {1, 2}))).ok());
  ASSERT_TRUE(kv->RowSparsePull(3, {9}, &rows).ok());
  EXPECT_EQ(rows.data().ToVector(), std::vector<float>({-0.5f, -0.5f}));
  EXPECT_THAT(std::string(kv->AssignRows(3, RowSparseNDArray({11, 2})).message()),
              HasSubstr("has shape (11,2) but the key holds (10,2)"));
}

TEST(DistRowSparse, ErrorsNameTheKey) {
  Cluster c = StartServers(2, 1);
  auto kv = Worker(c, 0, 1, 16);
  ASSERT_TRUE(kv->InitRowSparse(3, {10, 2}).ok());
  ASSERT_TRUE(kv->Init(4, Ones({10, 2})).ok());
  NDArray dense = Ones({10, 2});
  RowSparseNDArray rows;
  auto message = [](const absl::Status& s) { return std::string(s.message()); };
  EXPECT_THAT(message(kv->Push(3, dense)), HasSubstr("push of key 3: the key is row-sparse"));
  EXPECT_THAT(message(kv->Init(3, dense)), HasSubstr("init of key 3: the key is row-sparse"));
  EXPECT_THAT(message(kv->Push(4, RowSparseNDArray({10, 2}))),
              HasSubstr("row-sparse push of key 4: the key is dense"));
  EXPECT_THAT(message(kv->RowSparsePull(3, {5, 5}, &rows)),
              HasSubstr("row_sparse_pull of key 3: row ids must be sorted ascending and unique"));
  EXPECT_THAT(message(kv->RowSparsePull(3, {10}, &rows)),
              HasSubstr("row id 10 at position 0 is outside [0, 10)"));
  EXPECT_THAT(message(kv->InitRowSparse(3, {11, 2})), HasSubstr("already initialized with shape (10,2)"));
  EXPECT_THAT(message(kv->InitRowSparse(1 << 24, {11, 2})), HasSubstr("take keys below"));
  // Another worker of the job (a second store) that sees the key as
  // another range is refused by the servers.
  auto other = Worker(c, 0, 1, 16);
  EXPECT_THAT(message(other->InitRowSparse(3, {12, 2})),
              HasSubstr("already initialized here as rows from 0 of (10,2)"));
  EXPECT_THAT(message(other->InitRowSparse(4, {10, 2})), HasSubstr("as a dense key"));
}

}  // namespace
}  // namespace mx
