// The coordinator over gRPC on 127.0.0.1 (in this process, on a free port):
// barriers when a worker dies, with and without elastic, and bad requests.
#include "server/coordinator.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/mx.grpc.pb.h"
#include "rpc/rpc.h"
#include "rpc/security.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

constexpr auto kTimeout = std::chrono::milliseconds(600);

// Registers a node of `role` (asking for `rank` unless it is negative).
grpc::Status Register(proto::Coordinator::Stub& stub, proto::Role role, int rank = -1,
                      proto::RegisterResponse* resp = nullptr) {
  proto::RegisterRequest req;
  req.set_role(role);
  req.set_address(role == proto::SERVER ? "127.0.0.1:1" : "");
  if (rank >= 0) req.set_rank(rank);
  proto::RegisterResponse ignored;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return stub.Register(&ctx, req, resp != nullptr ? resp : &ignored);
}

// Says on `ctx` that the call comes from node `rank` of `role` with `key`.
void Act(grpc::ClientContext* ctx, proto::Role role, int rank, const std::string& key) {
  rpc::Caller{"", static_cast<rpc::Role>(role), rank, key}.Stamp(ctx);
}

// A coordinator for one server and two workers, all registered; the server
// and worker 0 keep heartbeating, worker 1 only when told to. Each call
// comes from the node it acts for (its session key), unless the test
// forges one.
class Cluster {
 public:
  explicit Cluster(bool elastic) {
    CoordinatorOptions o;
    o.num_servers = 1;
    o.num_workers = 2;
    o.heartbeat_timeout = absl::FromChrono(kTimeout);
    o.elastic = elastic;
    auto c = CoordinatorServer::Start("127.0.0.1:0", o);
    EXPECT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
    stub_ = proto::Coordinator::NewStub(rpc::SharedChannel(coordinator_->address(), {}));
    std::vector<std::thread> registering;
    proto::RegisterResponse resp[3];
    const proto::Role roles[3] = {proto::SERVER, proto::WORKER, proto::WORKER};
    for (int i = 0; i < 3; ++i) {
      registering.emplace_back(
          [this, &resp, &roles, i] { EXPECT_TRUE(Register(*stub_, roles[i], -1, &resp[i]).ok()); });
    }
    for (std::thread& t : registering) t.join();
    for (const proto::RegisterResponse& r : resp) {
      keys_[{r.self().role(), r.self().rank()}] = r.session_key();
    }
    heartbeats_ = std::thread([this] {
      while (!stop_) {
        Heartbeat(proto::SERVER, 0);
        Heartbeat(proto::WORKER, 0);
        if (worker1_alive_) Heartbeat(proto::WORKER, 1);
        std::this_thread::sleep_for(kTimeout / 6);
      }
    });
  }
  ~Cluster() {
    stop_ = true;
    heartbeats_.join();
  }

  // Worker 1 stops heartbeating; returns once the coordinator reports it dead.
  void KillWorker1() {
    worker1_alive_ = false;
    for (int i = 0; i < 100; ++i) {
      proto::HeartbeatResponse resp;
      if (Heartbeat(proto::WORKER, 0, &resp).ok() && resp.dead_size() > 0) {
        EXPECT_EQ(resp.dead(0).role(), proto::WORKER);
        EXPECT_EQ(resp.dead(0).rank(), 1);
        return;
      }
      std::this_thread::sleep_for(kTimeout / 6);
    }
    ADD_FAILURE() << "worker 1 was never declared dead";
  }

  grpc::Status Barrier(int rank, int64_t epoch, std::chrono::milliseconds deadline) {
    proto::BarrierRequest req;
    req.set_rank(rank);
    req.set_epoch(epoch);
    proto::BarrierResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    Act(&ctx, proto::WORKER, rank, Key(proto::WORKER, rank));
    return stub_->Barrier(&ctx, req, &resp);
  }

  // Worker `rank` finishes: it leaves the job and stops heartbeating.
  grpc::Status Leave(int rank) {
    if (rank == 1) worker1_alive_ = false;
    proto::LeaveRequest req;
    req.set_rank(rank);
    proto::LeaveResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    Act(&ctx, proto::WORKER, rank, Key(proto::WORKER, rank));
    return stub_->Leave(&ctx, req, &resp);
  }
  bool finished() const { return coordinator_->finished(); }

  // A heartbeat of node `rank` of `role`, sent as node `as` (default: the
  // same) with its key.
  grpc::Status Heartbeat(proto::Role role, int rank, proto::HeartbeatResponse* resp = nullptr,
                         int as = -1) {
    proto::HeartbeatRequest req;
    req.set_role(role);
    req.set_rank(rank);
    proto::HeartbeatResponse ignored;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    if (as < 0) as = rank;
    Act(&ctx, role, as, Key(role, as));
    return stub_->Heartbeat(&ctx, req, resp != nullptr ? resp : &ignored);
  }

  // The session key the coordinator gave a node ("" for one it did not).
  std::string Key(proto::Role role, int rank) const {
    auto it = keys_.find({role, rank});
    return it == keys_.end() ? "" : it->second;
  }
  proto::Coordinator::Stub& stub() { return *stub_; }
  int64_t refused() const { return coordinator_->refused(); }

 private:
  std::unique_ptr<CoordinatorServer> coordinator_;
  std::unique_ptr<proto::Coordinator::Stub> stub_;
  std::thread heartbeats_;
  std::atomic<bool> stop_{false}, worker1_alive_{true};
  std::map<std::pair<proto::Role, int>, std::string> keys_;
};

TEST(CoordinatorBarrier, WaitsForEveryLiveWorker) {
  Cluster c(/*elastic=*/false);
  // Alone, worker 0 waits (and its deadline passes).
  EXPECT_EQ(c.Barrier(0, 0, std::chrono::milliseconds(200)).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  // With worker 1 it completes.
  std::thread other([&] { EXPECT_TRUE(c.Barrier(1, 1, std::chrono::seconds(5)).ok()); });
  EXPECT_TRUE(c.Barrier(0, 1, std::chrono::seconds(5)).ok());
  other.join();
}

TEST(CoordinatorBarrier, FailsNamingADeadWorker) {
  Cluster c(/*elastic=*/false);
  std::thread kill([&] { c.KillWorker1(); });
  const auto start = std::chrono::steady_clock::now();
  grpc::Status s = c.Barrier(0, 0, std::chrono::seconds(10));
  kill.join();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ABORTED);
  EXPECT_THAT(s.error_message(), HasSubstr("worker 1"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(CoordinatorBarrier, ElasticCompletesWithoutADeadWorker) {
  Cluster c(/*elastic=*/true);
  // A barrier waiting when the worker dies completes...
  std::thread kill([&] { c.KillWorker1(); });
  EXPECT_TRUE(c.Barrier(0, 0, std::chrono::seconds(10)).ok());
  kill.join();
  // ... and so do later ones.
  EXPECT_TRUE(c.Barrier(0, 1, std::chrono::seconds(2)).ok());
}

// A worker that finished is neither declared dead nor waited for; once
// every worker has finished, servers are told to shut down and the
// coordinator is done.
TEST(CoordinatorLeave, FinishedWorkersEndTheJob) {
  Cluster c(/*elastic=*/false);
  ASSERT_TRUE(c.Leave(1).ok());
  std::this_thread::sleep_for(kTimeout * 2);  // past the heartbeat timeout
  proto::HeartbeatResponse resp;
  ASSERT_TRUE(c.Heartbeat(proto::SERVER, 0, &resp).ok());
  EXPECT_EQ(resp.dead_size(), 0);  // not dead: finished
  EXPECT_FALSE(resp.shutdown());   // worker 0 still works
  EXPECT_TRUE(c.Barrier(0, 0, std::chrono::seconds(2)).ok());  // without worker 1
  EXPECT_FALSE(c.finished());
  ASSERT_TRUE(c.Leave(0).ok());
  ASSERT_TRUE(c.Heartbeat(proto::SERVER, 0, &resp).ok());
  EXPECT_TRUE(resp.shutdown());
  EXPECT_TRUE(c.finished());  // the only server has been told
  EXPECT_EQ(c.Leave(5).error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

TEST(CoordinatorErrors, UnregisteredNodesAreRefused) {
  Cluster c(/*elastic=*/false);
  grpc::Status s = c.Barrier(7, 0, std::chrono::seconds(2));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("barrier: worker 7 is not registered in this job"));
  s = c.Heartbeat(proto::SERVER, 3);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("heartbeat: server 3 is not registered in this job"));
}

// Identity is bound to registration: a registered node cannot act for
// another (Leave of another worker, its heartbeat or barrier), nor can a
// caller that names a node without its session key. Nothing is applied.
TEST(CoordinatorIdentity, NodesCannotActForOthers) {
  Cluster c(/*elastic=*/false);
  // Worker 0 leaves for worker 1, and heartbeats for it.
  proto::LeaveRequest leave;
  leave.set_rank(1);
  proto::LeaveResponse left;
  grpc::ClientContext ctx;
  Act(&ctx, proto::WORKER, 0, c.Key(proto::WORKER, 0));
  grpc::Status s = c.stub().Leave(&ctx, leave, &left);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("leave: worker 0 claims to act for worker 1"));
  s = c.Heartbeat(proto::WORKER, 1, nullptr, /*as=*/0);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  // A caller that says it is worker 1 without its key.
  grpc::ClientContext forged;
  Act(&forged, proto::WORKER, 1, "00112233445566778899aabbccddeeff");
  s = c.stub().Leave(&forged, leave, &left);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("without its session key"));
  // A server may not enter a barrier.
  proto::BarrierRequest barrier;
  proto::BarrierResponse entered;
  grpc::ClientContext server;
  Act(&server, proto::SERVER, 0, c.Key(proto::SERVER, 0));
  s = c.stub().Barrier(&server, barrier, &entered);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(c.refused(), 4);
  // Worker 1 was neither finished nor kept alive by the forgeries: both
  // workers still hold the barrier, and the server is not told to stop.
  proto::HeartbeatResponse resp;
  ASSERT_TRUE(c.Heartbeat(proto::SERVER, 0, &resp).ok());
  EXPECT_FALSE(resp.shutdown());
  EXPECT_EQ(resp.finished_workers_size(), 0);
}

// The sweep runs every 100 ms whether or not nodes call: the time since it
// last ended (what mx_server's /livez watches) stays short.
TEST(CoordinatorSweep, RunsOnItsOwnAndSaysWhenItLastEnded) {
  CoordinatorOptions o;
  o.num_workers = 1;
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  for (int i = 0; i < 5; ++i) {
    absl::SleepFor(absl::Milliseconds(300));
    EXPECT_LT((*c)->SinceLastSweep(), absl::Seconds(2)) << "after " << (i + 1) * 300 << " ms";
  }
}

// With a job token, every call must carry it: registration included.
TEST(CoordinatorToken, CallsWithoutTheTokenAreRefused) {
  CoordinatorOptions o;
  o.num_workers = 1;
  o.security.token = "s3cret";
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = proto::Coordinator::NewStub(rpc::SharedChannel((*c)->address(), {}));
  for (const char* token : {"", "wrong", "s3cret-and-more"}) {
    proto::RegisterRequest req;
    proto::RegisterResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    rpc::Caller{token}.Stamp(&ctx);
    grpc::Status s = stub->Register(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << token;
    EXPECT_THAT(s.error_message(), HasSubstr(*token ? "wrong job token" : "no job token"));
  }
  EXPECT_EQ((*c)->refused(), 3);
}

// A node that asks for a rank gets it, whatever the order of registration;
// one that asks for none gets the lowest free. A rank out of range or taken
// is refused, saying which.
TEST(CoordinatorRanks, RequestedRanksAreHonouredAndChecked) {
  CoordinatorOptions o;
  o.num_servers = 2;
  o.num_workers = 2;
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = proto::Coordinator::NewStub(rpc::SharedChannel((*c)->address(), {}));
  struct Node {
    proto::Role role;
    int rank;  // asked for; -1: none
    proto::RegisterResponse resp;
  };
  std::vector<Node> nodes = {
      {proto::SERVER, 1, {}}, {proto::SERVER, 0, {}}, {proto::WORKER, 1, {}}, {proto::WORKER, -1, {}}};
  std::vector<std::thread> registering;
  for (Node& n : nodes) {
    registering.emplace_back([&stub, &n] { EXPECT_TRUE(Register(*stub, n.role, n.rank, &n.resp).ok()); });
  }
  for (std::thread& t : registering) t.join();
  EXPECT_EQ(nodes[0].resp.self().rank(), 1);
  EXPECT_EQ(nodes[1].resp.self().rank(), 0);
  EXPECT_EQ(nodes[2].resp.self().rank(), 1);
  EXPECT_EQ(nodes[3].resp.self().rank(), 0);
  ASSERT_EQ(nodes[3].resp.servers_size(), 2);  // the cluster view, by rank
  EXPECT_EQ(nodes[3].resp.servers(1).rank(), 1);

  grpc::Status s = Register(*stub, proto::WORKER, 2);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("worker rank 2 is outside 0..1"));
  s = Register(*stub, proto::SERVER, 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_THAT(s.error_message(), HasSubstr("server rank 1 is already taken by 127.0.0.1:1"));
  s = Register(*stub, proto::WORKER);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("all 2 workers have already registered"));
}

// A node killed while its registration waited for the others (its call
// is cancelled) held nothing: before the job forms its rank is free again,
// for the node started in its place (launch.py restarts such a server).
TEST(CoordinatorRanks, TheRankOfANodeThatDiedWhileRegisteringIsFreeAgain) {
  CoordinatorOptions o;
  o.num_servers = 2;
  o.num_workers = 1;
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = proto::Coordinator::NewStub(rpc::SharedChannel((*c)->address(), {}));
  proto::RegisterRequest req;
  req.set_role(proto::SERVER);
  req.set_rank(1);
  req.set_address("127.0.0.1:7");
  proto::RegisterResponse resp;
  grpc::ClientContext dying;
  dying.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  std::thread killer([&dying] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    dying.TryCancel();
  });
  EXPECT_EQ(stub->Register(&dying, req, &resp).error_code(), grpc::StatusCode::CANCELLED);
  killer.join();
  std::vector<proto::RegisterResponse> resps(3);
  std::vector<std::thread> registering;
  registering.emplace_back([&] { EXPECT_TRUE(Register(*stub, proto::SERVER, 1, &resps[0]).ok()); });
  registering.emplace_back([&] { EXPECT_TRUE(Register(*stub, proto::SERVER, 0, &resps[1]).ok()); });
  registering.emplace_back([&] { EXPECT_TRUE(Register(*stub, proto::WORKER, 0, &resps[2]).ok()); });
  for (std::thread& t : registering) t.join();
  EXPECT_EQ(resps[0].self().rank(), 1);
  ASSERT_EQ(resps[2].servers_size(), 2);
  EXPECT_EQ(resps[2].servers(1).address(), "127.0.0.1:1");  // the new one's, not 127.0.0.1:7
}

// gRPC sets SO_REUSEPORT by default, which lets a second daemon share a
// port and receive some of its calls. The port must be refused instead.
TEST(CoordinatorErrors, APortInUseIsRefused) {
  auto first = CoordinatorServer::Start("127.0.0.1:0", CoordinatorOptions());
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = CoordinatorServer::Start((*first)->address(), CoordinatorOptions());
  ASSERT_FALSE(second.ok()) << "two coordinators share " << (*first)->address();
  EXPECT_THAT(second.status().message(), HasSubstr((*first)->address()));
}

// A registration still waiting for the rest of the job when the
// coordinator stops is answered at once, saying why, not left to its
// deadline (10 s here).
TEST(CoordinatorShutdown, WaitingRegistrationsAreToldAtOnce) {
  CoordinatorOptions o;
  o.num_workers = 2;
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = proto::Coordinator::NewStub(rpc::SharedChannel((*c)->address(), {}));
  grpc::Status s;
  std::thread waiting([&] { s = Register(*stub, proto::SERVER); });
  // Once the server has registered (a heartbeat for it lacks only its key,
  // which its registration's answer will carry), stop.
  for (int i = 0; i < 200; ++i) {
    proto::HeartbeatRequest req;
    req.set_role(proto::SERVER);
    proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    Act(&ctx, proto::SERVER, 0, "");
    if (stub->Heartbeat(&ctx, req, &resp).error_message().find("session key") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const auto start = std::chrono::steady_clock::now();
  c->reset();
  waiting.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("the coordinator is shutting down"));
}

// A node starts heartbeating only once its registration is answered, and
// that waits for the rest of the job: the heartbeat timeout counts from the
// answer, not from the node's own registration. (Seen in CI: a worker that
// registered 4 s before the last server was declared dead 1 s into training
// with a 5 s timeout.)
TEST(CoordinatorHeartbeats, TheTimeoutCountsFromTheRegistrationsAnswer) {
  CoordinatorOptions o;
  o.num_servers = 1;
  o.num_workers = 1;
  o.heartbeat_timeout = absl::FromChrono(kTimeout);
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = proto::Coordinator::NewStub(rpc::SharedChannel((*c)->address(), {}));
  proto::RegisterResponse worker;
  grpc::Status registered;
  std::thread waiting([&] { registered = Register(*stub, proto::WORKER, -1, &worker); });
  // The server registers two timeouts after the worker.
  std::this_thread::sleep_for(2 * kTimeout);
  proto::RegisterResponse server;
  ASSERT_TRUE(Register(*stub, proto::SERVER, -1, &server).ok());
  waiting.join();
  ASSERT_TRUE(registered.ok()) << registered.error_message();
  // Both heartbeat promptly after their answers; nobody is dead.
  for (const proto::RegisterResponse* node : {&worker, &server}) {
    proto::HeartbeatRequest req;
    req.set_role(node->self().role());
    req.set_rank(node->self().rank());
    proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    Act(&ctx, node->self().role(), node->self().rank(), node->session_key());
    ASSERT_TRUE(stub->Heartbeat(&ctx, req, &resp).ok());
    for (const proto::NodeInfo& dead : resp.dead()) {
      ADD_FAILURE() << "declared dead: " << proto::Role_Name(dead.role()) << " " << dead.rank();
    }
  }
}

// A coordinator that not every node registers with (a job that never
// came together, or one restarted after its job ended) fails once the
// startup timeout has passed, naming the missing nodes, and finishes.
TEST(CoordinatorStartup, NodesThatNeverRegisterFailTheJobAtTheStartupTimeout) {
  CoordinatorOptions o;
  o.num_servers = 1;
  o.num_workers = 2;
  o.heartbeat_timeout = absl::Seconds(1);
  o.startup_timeout = absl::Milliseconds(500);
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->failure(), "");
  for (int i = 0; i < 50 && !(*c)->finished(); ++i) absl::SleepFor(absl::Milliseconds(100));
  EXPECT_TRUE((*c)->finished());
  EXPECT_THAT((*c)->failure(), HasSubstr("register: server 0 and workers 0, 1 did not register "
                                         "within 500ms of the coordinator's start"));
}

// A rejoin (RegisterRequest.session_key) of node `rank` of `role` with `key`,
// carrying `token`.
grpc::Status Rejoin(proto::Coordinator::Stub& stub, proto::Role role, int rank,
                    const std::string& key, const std::string& token = "t",
                    const std::function<void(proto::RegisterRequest*)>& more = nullptr) {
  proto::RegisterRequest req;
  req.set_role(role);
  req.set_rank(rank);
  req.set_session_key(key);
  if (more) more(&req);
  proto::RegisterResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  rpc::Caller{token}.Stamp(&ctx);
  grpc::Status s = stub.Register(&ctx, req, &resp);
  if (s.ok()) {
    EXPECT_EQ(resp.self().rank(), rank);
    EXPECT_EQ(resp.session_key(), key);
  }
  return s;
}

// A server declared dead while no spare waited keeps its rank vacant
// until one comes: the first spare that registers takes it. Before, a spare
// took a rank only at a death, so one started after it waited for ever
// and the dead server's keys kept one copy.
TEST(CoordinatorSpares, ASpareThatRegistersAfterADeathTakesTheVacantRank) {
  CoordinatorOptions o;
  o.num_servers = 2;
  o.num_workers = 1;
  // Longer than the file's: a pause of the test over it would declare
  // server 0 dead too (and the spare take rank 0).
  o.heartbeat_timeout = absl::Seconds(2);
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = proto::Coordinator::NewStub(rpc::SharedChannel((*c)->address(), {}));
  std::map<std::pair<proto::Role, int>, std::string> keys;
  {
    std::vector<std::thread> registering;
    proto::RegisterResponse resp[3];
    const proto::Role roles[3] = {proto::SERVER, proto::SERVER, proto::WORKER};
    const int ranks[3] = {0, 1, 0};
    for (int i = 0; i < 3; ++i) {
      registering.emplace_back(
          [&, i] { EXPECT_TRUE(Register(*stub, roles[i], ranks[i], &resp[i]).ok()); });
    }
    for (std::thread& t : registering) t.join();
    for (const proto::RegisterResponse& r : resp)
      keys[{r.self().role(), r.self().rank()}] = r.session_key();
  }
  auto heartbeat = [&](proto::Role role, int rank, const std::string& key) {
    proto::HeartbeatRequest req;
    req.set_role(role);
    req.set_rank(rank);
    proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    Act(&ctx, role, rank, key);
    EXPECT_TRUE(stub->Heartbeat(&ctx, req, &resp).ok());
    return resp;
  };
  // Server 1 falls silent and is declared dead; no spare waits.
  bool dead = false;
  for (int i = 0; i < 60 && !dead; ++i) {
    heartbeat(proto::SERVER, 0, keys[{proto::SERVER, 0}]);
    const proto::HeartbeatResponse resp = heartbeat(proto::WORKER, 0, keys[{proto::WORKER, 0}]);
    for (const proto::NodeInfo& d : resp.dead()) dead |= d.role() == proto::SERVER && d.rank() == 1;
    std::this_thread::sleep_for(kTimeout / 6);
  }
  ASSERT_TRUE(dead) << "server 1 was never declared dead";
  // A spare registers: its first heartbeat's answer gives it rank 1.
  proto::RegisterRequest req;
  req.set_role(proto::SERVER);
  req.set_address("127.0.0.1:2");
  req.set_spare(true);
  proto::RegisterResponse spare;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  ASSERT_TRUE(stub->Register(&ctx, req, &spare).ok());
  const proto::HeartbeatResponse resp =
      heartbeat(proto::SERVER, spare.self().rank(), spare.session_key());
  ASSERT_TRUE(resp.has_assignment()) << "the spare was not given the dead server's rank";
  EXPECT_EQ(resp.assignment().self().rank(), 1);
  EXPECT_EQ(resp.assignment().self().address(), "127.0.0.1:2");
  EXPECT_EQ(resp.assignment().self().incarnation(), 1);
}

// A coordinator of `servers` servers and `workers` workers (job token "t")
// that no node has registered with: as a restarted one, and a stub to it.
struct Restarted {
  Restarted(int servers, int workers) {
    CoordinatorOptions o;
    o.num_servers = servers;
    o.num_workers = workers;
    o.security.token = "t";
    coordinator = CoordinatorServer::Start("127.0.0.1:0", o);
    EXPECT_TRUE(coordinator.ok()) << coordinator.status();
    stub = proto::Coordinator::NewStub(rpc::SharedChannel((*coordinator)->address(), {}));
  }
  absl::StatusOr<std::unique_ptr<CoordinatorServer>> coordinator;
  std::unique_ptr<proto::Coordinator::Stub> stub;
};

// A restarted coordinator knows no address of a server that has not
// rejoined yet: a worker's report that it cannot reach that server (it
// could not reach it while the coordinator was away, say) waits for the
// rejoin or the heartbeat timeout. Before, the health check of the empty
// address failed at once and the live server was declared dead.
TEST(CoordinatorRestart, AReportOfAServerNotRejoinedYetDoesNotDeclareItDead) {
  Restarted r(2, 1);
  ASSERT_TRUE(r.coordinator.ok());
  ASSERT_TRUE(Rejoin(*r.stub, proto::WORKER, 0, "key-w0").ok());
  auto heartbeat = [&](bool report) {
    proto::HeartbeatRequest req;
    req.set_role(proto::WORKER);
    req.set_rank(0);
    if (report) req.add_unreachable_servers(1);
    proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    Act(&ctx, proto::WORKER, 0, "key-w0");
    EXPECT_TRUE(r.stub->Heartbeat(&ctx, req, &resp).ok());
    return resp;
  };
  heartbeat(true);
  absl::SleepFor(absl::Milliseconds(1500));  // the health check takes at most 1 s
  EXPECT_EQ(heartbeat(false).dead_size(), 0) << "server 1 was declared dead";
  ASSERT_TRUE(Rejoin(*r.stub, proto::SERVER, 1, "key-s1", "t", [](proto::RegisterRequest* req) {
                req->set_address("127.0.0.1:1");
              }).ok());
  EXPECT_EQ(heartbeat(false).dead_size(), 0);
}

// A restarted coordinator (one that never saw the job's registrations)
// tells a node's calls NOT_FOUND, so that it rejoins; a rejoin needs the
// job token and a rank in range, takes a rank once (the same key again is
// fine), and the node's calls are then checked against that key.
TEST(CoordinatorRestart, RejoinsAreCheckedAndAnsweredAtOnce) {
  Restarted r(1, 2);
  ASSERT_TRUE(r.coordinator.ok());
  auto& c = r.coordinator;
  auto& stub = r.stub;
  auto heartbeat = [&](int rank, const std::string& key) {
    proto::HeartbeatRequest req;
    req.set_role(proto::WORKER);
    req.set_rank(rank);
    proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    Act(&ctx, proto::WORKER, rank, key);
    return stub->Heartbeat(&ctx, req, &resp);
  };
  grpc::Status s = heartbeat(1, "key-1");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(),
              HasSubstr("heartbeat: worker 1 is not registered with this coordinator"));
  // No such rank, or a wrong key: refused by the guard (without the token
  // that a key implies: UNAUTHENTICATED).
  EXPECT_EQ(heartbeat(5, "key-5").error_code(), grpc::StatusCode::UNAUTHENTICATED);

  EXPECT_EQ(Rejoin(*stub, proto::WORKER, 1, "key-1", "wrong").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  s = Rejoin(*stub, proto::WORKER, 2, "key-2");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("worker rank 2 is outside 0..1"));
  // Answered at once, although worker 0 and the server have not rejoined.
  ASSERT_TRUE(Rejoin(*stub, proto::WORKER, 1, "key-1").ok());
  EXPECT_TRUE(Rejoin(*stub, proto::WORKER, 1, "key-1").ok());  // again: the same
  s = Rejoin(*stub, proto::WORKER, 1, "another-key");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_THAT(s.error_message(), HasSubstr("worker rank 1 has rejoined already"));
  EXPECT_TRUE(heartbeat(1, "key-1").ok());
  EXPECT_EQ(heartbeat(1, "another-key").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ((*c)->refused(), 3);  // rank 5, the wrong token, the wrong key
}

// A role that is neither is refused, not taken for a worker (a role 7
// took worker rank 0 from the real worker 0).
TEST(CoordinatorRestart, ARoleThatIsNeitherIsRefused) {
  Restarted r(1, 1);
  ASSERT_TRUE(r.coordinator.ok());
  auto& stub = r.stub;
  const grpc::Status s = Rejoin(*stub, static_cast<proto::Role>(7), 0, "key", "t", nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(),
              HasSubstr("register: role 7 is neither a worker (0) nor a server"));
  EXPECT_TRUE(Rejoin(*stub, proto::WORKER, 0, "key-w0").ok());
  // A spare's rank far past the servers (INT_MAX: the next spare's rank
  // overflowed) is refused too.
  const grpc::Status spare = Rejoin(*stub, proto::SERVER, 2147483647, "key-spare", "t",
                                    [](proto::RegisterRequest* req) { req->set_spare(true); });
  EXPECT_EQ(spare.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << spare.error_message();
  EXPECT_THAT(spare.error_message(),
              HasSubstr("a spare server's rank is past the job's 1 servers"));
}

// After a restart, nodes' news of a server's death predating its
// replacement (a spare that took its rank, incarnation 1) is stale: it
// declared the live replacement dead, whichever rejoined first, and the
// replacement's own news of its predecessor did too.
TEST(CoordinatorRestart, NewsOfADeathOlderThanTheReplacementIsIgnored) {
  Restarted r(2, 1);
  ASSERT_TRUE(r.coordinator.ok());
  auto& stub = r.stub;
  auto predecessor_dead = [](proto::RegisterRequest* req) {
    proto::NodeInfo* dead = req->add_dead();
    dead->set_role(proto::SERVER);
    dead->set_rank(0);
    dead->set_incarnation(0);
  };
  ASSERT_TRUE(Rejoin(*stub, proto::SERVER, 0, "key-s0", "t", [&](proto::RegisterRequest* req) {
                req->set_incarnation(1);
                predecessor_dead(req);
              }).ok());
  ASSERT_TRUE(Rejoin(*stub, proto::WORKER, 0, "key-w0", "t", predecessor_dead).ok());
  proto::HeartbeatRequest req;
  req.set_role(proto::WORKER);
  req.set_rank(0);
  proto::HeartbeatResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  Act(&ctx, proto::WORKER, 0, "key-w0");
  ASSERT_TRUE(stub->Heartbeat(&ctx, req, &resp).ok());
  for (const proto::NodeInfo& dead : resp.dead()) {
    EXPECT_FALSE(dead.role() == proto::SERVER && dead.rank() == 0)
        << "the live replacement of server 0 was declared dead";
  }
}

}  // namespace
}  // namespace mx
