// A parameter server (and a coordinator) fed damaged requests on every method of its service
// (tests/proto/mutate.h: flipped bits, cut and inserted bytes, extreme
// varints, in random slices) answers each with OK or an error status that
// says what was wrong, never an internal error, and keeps serving: a key
// initialized afterwards pulls back exactly its value. Thousands of calls
// from a fixed seed, many in flight at once.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/mx.pb.h"
#include "proto/wire.h"
#include "rpc/security.h"
#include "rpc/shared_memory.h"
#include "server/coordinator.h"
#include "server/kvstore_service.h"
#include "tests/proto/mutate.h"

namespace mx {
namespace {

proto::Tensor TensorOf(const std::vector<float>& v) {
  proto::Tensor t;
  t.add_shape(static_cast<int64_t>(v.size()));
  t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
  return t;
}

// Unary calls with raw bytes to one service of a server, up to 32 in flight,
// each from `caller` (its token and identity).
class RawClient {
 public:
  RawClient(const std::string& address, const std::string& service)
      : stub_(grpc::CreateChannel(address, grpc::InsecureChannelCredentials())),
        prefix_("/mx.proto." + service + "/") {}

  rpc::Caller caller;

  // Calls `method` with `request`; done(status, response bytes) runs on a
  // gRPC thread. Waits while 32 calls are unanswered.
  void Start(const std::string& method, grpc::ByteBuffer request, int deadline_ms,
             std::function<void(const grpc::Status&, const std::string&)> done) {
    {
      absl::MutexLock lock(&flight_->mu);
      flight_->mu.Await(absl::Condition(flight_.get(), &Flight::HasRoom));
      ++flight_->in_flight;
    }
    auto* call = new Pending{std::move(request), {}, {}, std::move(done)};
    call->ctx.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::milliseconds(deadline_ms));
    caller.Stamp(&call->ctx);
    stub_.UnaryCall(&call->ctx, prefix_ + method, grpc::StubOptions(), &call->request,
                    &call->response, [flight = flight_, call](grpc::Status s) {
                      std::string bytes;
                      std::vector<grpc::Slice> slices;
                      if (s.ok() && call->response.Dump(&slices).ok()) {
                        for (const grpc::Slice& slice : slices) {
                          bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
                        }
                      }
                      call->done(s, bytes);
                      delete call;
                      // `flight` outlives the client: a caller of Call may
                      // return (and destroy the client) once done ran.
                      absl::MutexLock lock(&flight->mu);
                      --flight->in_flight;
                    });
  }

  // The same, waiting for the answer.
  grpc::Status Call(const std::string& method, const std::string& request, std::string* response) {
    absl::Notification answered;
    grpc::Status status;
    grpc::Slice slice(request);
    Start(method, grpc::ByteBuffer(&slice, 1), 5000,
          [&](const grpc::Status& s, const std::string& bytes) {
            status = s;
            *response = bytes;
            answered.Notify();
          });
    answered.WaitForNotification();
    return status;
  }

  void WaitForAll() {
    absl::MutexLock lock(&flight_->mu);
    flight_->mu.Await(absl::Condition(+[](int* n) { return *n == 0; }, &flight_->in_flight));
  }
  ~RawClient() { WaitForAll(); }

 private:
  // The calls in flight, shared with their callbacks.
  struct Flight {
    absl::Mutex mu;
    int in_flight ABSL_GUARDED_BY(mu) = 0;
    bool HasRoom() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return in_flight < 32; }
  };
  struct Pending {
    grpc::ByteBuffer request, response;
    grpc::ClientContext ctx;
    std::function<void(const grpc::Status&, const std::string&)> done;
  };
  grpc::GenericStub stub_;
  const std::string prefix_;
  const std::shared_ptr<Flight> flight_ = std::make_shared<Flight>();
};

using Requests = std::vector<std::pair<std::string, std::string>>;  // method, bytes

// Sends `calls` damaged copies of the `seeds` in turn (fixed seed), 32 at
// a time, and returns how many got each status. A status outside
// `expected`, or an error without a message, fails the test.
std::map<grpc::StatusCode, int> SendDamaged(RawClient& client, const Requests& seeds,
                                            const std::set<grpc::StatusCode>& expected,
                                            int calls) {
  std::mt19937 rng(20261202);
  absl::Mutex mu;
  std::map<grpc::StatusCode, int> counts;
  std::vector<std::string> unexpected;
  for (int i = 0; i < calls; ++i) {
    const auto& [method, bytes] = seeds[i % seeds.size()];
    const std::string damaged = testing::Mutate(bytes, &rng);
    client.Start(method, testing::Sliced(damaged, &rng), 300,
                 [&, method = method, damaged](const grpc::Status& s, const std::string&) {
                   absl::MutexLock lock(&mu);
                   ++counts[s.error_code()];
                   const bool clear = s.ok() || !s.error_message().empty();
                   if (!expected.count(s.error_code()) || !clear) {
                     unexpected.push_back(absl::StrCat(method, " ", absl::BytesToHexString(damaged),
                                                       ": code ", s.error_code(), " '",
                                                       s.error_message(), "'"));
                   }
                 });
  }
  client.WaitForAll();
  for (const auto& [code, n] : counts) std::printf("status %d: %d calls\n", code, n);
  EXPECT_THAT(unexpected, ::testing::IsEmpty());
  return counts;
}

TEST(RpcFuzz, DamagedRequestsGetErrorsAndTheServerKeepsServing) {
  // Shared memory too: a segment the "worker" attached, which damaged
  // ranges must never reach beyond.
  std::string shm_dir = std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") +
                        "/fuzzshmXXXXXX";
  ASSERT_NE(mkdtemp(shm_dir.data()), nullptr);
  auto segment = rpc::SharedSegment::Create(shm_dir, "seg", 1 << 20);
  ASSERT_TRUE(segment.ok()) << segment.status();
  ParameterServerOptions server_options;
  server_options.shm_dir = shm_dir;
  auto server = ParameterServer::Start("127.0.0.1:0", {true, 1, false}, server_options);
  ASSERT_TRUE(server.ok()) << server.status();
  RawClient client((*server)->address(), "KVStoreService");
  std::string response;
  proto::AttachSegmentRequest attach;
  attach.set_name("seg");
  attach.set_segment(1);
  attach.set_bytes(1 << 20);
  ASSERT_TRUE(client.Call("AttachSegment", attach.SerializeAsString(), &response).ok());

  // Valid requests of every method, from which the damaged ones are made.
  proto::InitRequest init;
  init.set_key(1);
  *init.mutable_value() = TensorOf({1, 2, 3, 4});
  ASSERT_TRUE(client.Call("Init", init.SerializeAsString(), &response).ok());
  proto::InitRequest init_big = init;
  init_big.set_key(2);
  *init_big.mutable_value() = TensorOf(std::vector<float>(1000, 0.5f));
  ASSERT_TRUE(client.Call("Init", init_big.SerializeAsString(), &response).ok());
  proto::SetOptimizerRequest optimizer;
  optimizer.set_name("sgd");
  (*optimizer.mutable_options())["learning_rate"] = "0.1";
  (*optimizer.mutable_options())["momentum"] = "0.9";
  (*optimizer.mutable_param_names())[1] = "fc1_weight";
  (*optimizer.mutable_lr_mult())["fc1_weight"] = 0.5f;
  ASSERT_TRUE(client.Call("SetOptimizer", optimizer.SerializeAsString(), &response).ok());
  proto::PushRequest push;
  push.set_key(1);
  push.set_rank(0);
  *push.mutable_value() = TensorOf({0.1f, 0.2f, 0.3f, 0.4f});
  ASSERT_TRUE(client.Call("PushPull", push.SerializeAsString(), &response).ok());
  std::string states;
  ASSERT_TRUE(client.Call("SaveOptimizerStates", "", &states).ok());
  proto::PullRequest pull;
  pull.set_key(1);
  pull.set_min_version(1);
  proto::PushPullManyRequest many;
  *many.add_entries() = push;
  proto::PushRequest push_big = push;
  push_big.set_key(2);
  *push_big.mutable_value() = TensorOf(std::vector<float>(1000, 0.01f));
  *many.add_entries() = push_big;
  // A table (row-sparse key 3, rows [0, 100) of (100, 4)) and its calls:
  // a push of rows, a pushpull answering other rows, a pull, an assign.
  proto::InitRequest init_table;
  init_table.set_key(3);
  proto::TableRange* range = init_table.mutable_table();
  range->add_shape(100);
  range->add_shape(4);
  range->set_rows(100);
  range->set_init_scale(0.1f);
  ASSERT_TRUE(client.Call("Init", init_table.SerializeAsString(), &response).ok());
  proto::PushRequest push_rows;
  push_rows.set_key(3);
  push_rows.mutable_rows()->add_ids(2);
  push_rows.mutable_rows()->add_ids(50);
  *push_rows.mutable_value() = TensorOf(std::vector<float>(8, 0.1f));
  push_rows.mutable_value()->set_shape(0, 2);
  push_rows.mutable_value()->add_shape(4);
  ASSERT_TRUE(client.Call("Push", push_rows.SerializeAsString(), &response).ok());
  proto::PushRequest pushpull_rows = push_rows;
  pushpull_rows.set_min_version(2);
  pushpull_rows.mutable_pull_rows()->add_ids(7);
  proto::PullRequest pull_rows;
  pull_rows.set_key(3);
  pull_rows.set_min_version(1);
  pull_rows.mutable_rows()->add_ids(2);
  pull_rows.mutable_rows()->add_ids(99);
  proto::PushRequest assign = push_rows;
  assign.set_assign(true);
  // A pushpull whose value lies in the shared memory (16 bytes at 64, a
  // release word at 0) and whose answer goes back there, and a pull
  // answered there.
  proto::PushRequest push_shm = push;
  push_shm.mutable_value()->clear_data();
  push_shm.mutable_shm_value()->set_segment(1);
  push_shm.mutable_shm_value()->set_offset(64);
  push_shm.mutable_shm_value()->set_bytes(16);
  push_shm.mutable_shm_value()->set_release(0);
  *push_shm.mutable_shm_reply() = push_shm.shm_value();
  push_shm.mutable_shm_reply()->clear_release();
  push_shm.set_min_version(2);
  ASSERT_TRUE(client.Call("PushPull", push_shm.SerializeAsString(), &response).ok());
  proto::PullRequest pull_shm = pull;
  *pull_shm.mutable_shm_reply() = push_shm.shm_reply();
  const Requests seeds = {
      {"AttachSegment", attach.SerializeAsString()},
      {"PushPull", push_shm.SerializeAsString()},
      {"Pull", pull_shm.SerializeAsString()},
      {"Init", init.SerializeAsString()},
      {"Init", init_table.SerializeAsString()},
      {"Push", push_rows.SerializeAsString()},
      {"PushPull", pushpull_rows.SerializeAsString()},
      {"Pull", pull_rows.SerializeAsString()},
      {"Push", assign.SerializeAsString()},
      {"Push", push.SerializeAsString()},
      {"Pull", pull.SerializeAsString()},
      {"PushPull", push_big.SerializeAsString()},
      {"PushPullMany", many.SerializeAsString()},
      {"SetOptimizer", optimizer.SerializeAsString()},
      {"SaveOptimizerStates", ""},
      {"LoadOptimizerStates", states},
  };

  // Statuses a request of the outside world may get. A damaged pull may
  // ask for a version that never comes: DEADLINE_EXCEEDED, from the server
  // (saying what it waited for) or from the client's own deadline. Damaged
  // optimizer states fail their checksum or framing: DATA_LOSS.
  const std::set<grpc::StatusCode> expected = {
      grpc::StatusCode::OK,           grpc::StatusCode::INVALID_ARGUMENT,
      grpc::StatusCode::NOT_FOUND,    grpc::StatusCode::FAILED_PRECONDITION,
      grpc::StatusCode::OUT_OF_RANGE, grpc::StatusCode::DEADLINE_EXCEEDED,
      grpc::StatusCode::DATA_LOSS,    grpc::StatusCode::RESOURCE_EXHAUSTED};
  constexpr int kCalls = 2400;
  std::map<grpc::StatusCode, int> counts = SendDamaged(client, seeds, expected, kCalls);
  // The damage was both harmless and fatal often enough to test both.
  EXPECT_GT(counts[grpc::StatusCode::OK], kCalls / 20);
  EXPECT_GT(counts[grpc::StatusCode::INVALID_ARGUMENT], kCalls / 5);

  // Still serving: a new key holds exactly what it was given.
  proto::InitRequest fresh;
  fresh.set_key(4242);
  *fresh.mutable_value() = TensorOf({7, 8, 9});
  grpc::Status s = client.Call("Init", fresh.SerializeAsString(), &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  proto::PullRequest fresh_pull;
  fresh_pull.set_key(4242);
  s = client.Call("Pull", fresh_pull.SerializeAsString(), &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  proto::PullResponse pulled;
  ASSERT_TRUE(pulled.ParseFromString(response));
  EXPECT_EQ(pulled.value().data(), fresh.value().data());
  EXPECT_THAT(pulled.value().shape(), ::testing::ElementsAre(3));
}

// The same for the coordinator of a job whose nodes have all registered: a
// request that is no protobuf message is INVALID_ARGUMENT saying so (gRPC's
// own parser would answer INTERNAL without a word); damaged registrations,
// heartbeats, barriers and departures get OK or an error with a message;
// the coordinator goes on answering the nodes' heartbeats.
TEST(RpcFuzz, DamagedRequestsToTheCoordinatorGetErrorsAndItKeepsServing) {
  CoordinatorOptions o;
  o.num_servers = 1;
  o.num_workers = 2;
  o.heartbeat_timeout = absl::Seconds(60);  // nobody dies during the test
  auto coordinator = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  RawClient client((*coordinator)->address(), "Coordinator");
  std::vector<std::thread> registering;
  proto::RegisterResponse registered[3];
  const proto::Role roles[3] = {proto::SERVER, proto::WORKER, proto::WORKER};
  for (int i = 0; i < 3; ++i) {
    registering.emplace_back([&, i] {
      proto::RegisterRequest req;
      req.set_role(roles[i]);
      req.set_address("127.0.0.1:1");
      std::string response;
      EXPECT_TRUE(client.Call("Register", req.SerializeAsString(), &response).ok());
      EXPECT_TRUE(registered[i].ParseFromString(response));
    });
  }
  for (std::thread& t : registering) t.join();
  // The damaged calls come from worker 1, the last check from the server.
  auto as = [&](proto::Role role, int rank) {
    for (const proto::RegisterResponse& r : registered) {
      if (r.self().role() == role && r.self().rank() == rank) {
        return rpc::Caller{"", static_cast<rpc::Role>(role), rank, r.session_key()};
      }
    }
    ADD_FAILURE() << "no such node";
    return rpc::Caller{};
  };
  std::string response;
  grpc::Status s = client.Call("Register", std::string("\x12\x7f\x01", 3), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), ::testing::HasSubstr("register: malformed request"));

  proto::RegisterRequest reg;
  reg.set_role(proto::WORKER);
  reg.set_rank(1);
  proto::HeartbeatRequest beat;
  beat.set_role(proto::WORKER);
  beat.set_rank(1);
  proto::BarrierRequest barrier;
  barrier.set_rank(1);
  barrier.set_epoch(3);
  proto::LeaveRequest leave;
  leave.set_rank(1);
  const Requests seeds = {{"Register", reg.SerializeAsString()},
                          {"Heartbeat", beat.SerializeAsString()},
                          {"Barrier", barrier.SerializeAsString()},
                          {"Leave", leave.SerializeAsString()}};
  // A barrier may wait for a worker that never comes (DEADLINE_EXCEEDED,
  // naming it); a registration finds its rank taken (ALREADY_EXISTS) or
  // none left (FAILED_PRECONDITION); a request for another node than
  // worker 1 is PERMISSION_DENIED.
  const std::set<grpc::StatusCode> expected = {
      grpc::StatusCode::OK,        grpc::StatusCode::INVALID_ARGUMENT,
      grpc::StatusCode::NOT_FOUND, grpc::StatusCode::FAILED_PRECONDITION,
      grpc::StatusCode::ALREADY_EXISTS, grpc::StatusCode::DEADLINE_EXCEEDED,
      grpc::StatusCode::PERMISSION_DENIED};
  client.caller = as(proto::WORKER, 1);
  std::map<grpc::StatusCode, int> counts = SendDamaged(client, seeds, expected, 1200);
  // Damage to a rank or role mostly makes a claim for another node.
  EXPECT_GT(counts[grpc::StatusCode::OK], 1200 / 50);
  EXPECT_GT(counts[grpc::StatusCode::INVALID_ARGUMENT], 1200 / 20);
  EXPECT_GT(counts[grpc::StatusCode::PERMISSION_DENIED], 1200 / 20);

  client.caller = as(proto::SERVER, 0);
  beat.set_role(proto::SERVER);
  beat.set_rank(0);
  s = client.Call("Heartbeat", beat.SerializeAsString(), &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  proto::HeartbeatResponse answer;
  ASSERT_TRUE(answer.ParseFromString(response));
  EXPECT_EQ(answer.dead_size(), 0);
}

}  // namespace
}  // namespace mx
