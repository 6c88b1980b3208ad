// The standard gRPC health service (grpc.health.v1.Health/Check) on the
// coordinator and on parameter servers: what Kubernetes probes ask. It
// needs no job token; a server that checks identities is NOT_SERVING until
// it knows the job's workers (it has registered), SERVING after.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/coordinator.h"
#include "server/kvstore_service.h"
#include "server/shard.h"

namespace mx {
namespace {

// HealthCheckResponse.status: 1 SERVING, 2 NOT_SERVING; -1 when the call
// fails. The request for the whole server is the empty message.
int HealthOf(const std::string& address) {
  grpc::GenericStub stub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::ByteBuffer request, response;
  grpc::Slice empty("", 0);
  request = grpc::ByteBuffer(&empty, 1);
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = s;
                   done.Notify();
                 });
  done.WaitForNotification();
  if (!status.ok()) return -1;
  grpc::Slice bytes;
  if (!response.DumpToSingleSlice(&bytes).ok() || bytes.size() != 2 || bytes.begin()[0] != 0x08) {
    return -1;
  }
  return bytes.begin()[1];
}

constexpr int kServing = 1;
constexpr int kNotServing = 2;

TEST(Health, TheCoordinatorServesFromTheStart) {
  CoordinatorOptions o;
  o.security.token = "a-token-the-probe-does-not-have";
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(HealthOf((*c)->address()), kServing);
  EXPECT_EQ((*c)->refused(), 0);  // health checks are not refused calls
}

TEST(Health, AServerServesOnceItKnowsTheWorkers) {
  ParameterServerOptions o;
  o.identities = true;
  o.security.token = "a-token-the-probe-does-not-have";
  auto ps = ParameterServer::Start("127.0.0.1:0", {true, 2, false}, o);
  ASSERT_TRUE(ps.ok()) << ps.status();
  EXPECT_EQ(HealthOf((*ps)->address()), kNotServing);
  (*ps)->AdmitWorkers({"key0", "key1"});
  EXPECT_EQ(HealthOf((*ps)->address()), kServing);
}

TEST(Health, AServerWithoutIdentitiesServesAtOnce) {
  auto ps = ParameterServer::Start("127.0.0.1:0", {true, 1, false});
  ASSERT_TRUE(ps.ok()) << ps.status();
  EXPECT_EQ(HealthOf((*ps)->address()), kServing);
}

// What mx_server's /livez watches on a server: a thread takes the shard's
// lock every 100 ms. A shard held on its lock (here by a replicator's
// queue, which runs under it) shows; once let go, the checks resume.
TEST(Liveness, AServerShowsAShardStuckOnItsLock) {
  auto ps = ParameterServer::Start("127.0.0.1:0", {true, 1, false});
  ASSERT_TRUE(ps.ok()) << ps.status();
  ParameterShard& shard = (*ps)->shard();
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_LT((*ps)->SinceShardChecked(), absl::Seconds(1));
  absl::Notification holding, release;
  shard.SetReplicator([&](int, ReplicaStep) {
    holding.Notify();
    release.WaitForNotification();
  });
  ASSERT_TRUE(shard.Init(7, Shape{1}, {0}, {Copies::kPrimary, 1}).ok());
  std::thread pusher([&] { EXPECT_TRUE(shard.Push(7, 0, {1}).ok()); });
  ASSERT_TRUE(holding.WaitForNotificationWithTimeout(absl::Seconds(5)));
  absl::SleepFor(absl::Milliseconds(1500));
  EXPECT_GT((*ps)->SinceShardChecked(), absl::Seconds(1));
  release.Notify();
  pusher.join();
  absl::SleepFor(absl::Milliseconds(500));
  EXPECT_LT((*ps)->SinceShardChecked(), absl::Seconds(1));
}

}  // namespace
}  // namespace mx
