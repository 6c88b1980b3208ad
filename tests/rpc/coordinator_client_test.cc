// The one coordinator client (rpc/coordinator_client.h) against a real
// coordinator on 127.0.0.1: mutual TLS when both ends have certificates of
// the job's CA; clear, immediate errors when one end speaks TLS and the
// other does not, or a certificate is not the job CA's; the job token; and
// the heartbeat rule: a coordinator that goes away is reported once.
#include "rpc/coordinator_client.h"

#include <arpa/inet.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/trace.h"
#include "rpc/rpc.h"
#include "server/coordinator.h"
#include "tests/rpc/test_tls.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

using test::MakeTls;

// A coordinator of a job of `workers` workers (and no servers) at `bind`.
std::unique_ptr<CoordinatorServer> StartCoordinator(const rpc::Security& security,
                                                    const std::string& bind = "127.0.0.1:0",
                                                    int workers = 1) {
  CoordinatorOptions o;
  o.num_servers = 0;
  o.num_workers = workers;
  o.heartbeat_timeout = absl::Seconds(2);
  o.security = security;
  auto c = CoordinatorServer::Start(bind, o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

absl::StatusOr<std::unique_ptr<rpc::CoordinatorClient>> RegisterWorker(
    const std::string& address, const rpc::Security& security, int rank = -1) {
  rpc::CoordinatorClient::Options o;
  o.address = address;
  o.security = security;
  o.startup_timeout = absl::Seconds(20);
  o.rpc_timeout = absl::Seconds(10);
  proto::RegisterRequest req;
  req.set_role(proto::WORKER);
  if (rank >= 0) req.set_rank(rank);
  return rpc::CoordinatorClient::Register(o, req);
}

class CoordinatorClientTls : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    job_ = new rpc::Security(MakeTls("job-ca"));
    other_ = new rpc::Security(MakeTls("other-ca"));
  }
  static rpc::Security* job_;
  static rpc::Security* other_;
};
rpc::Security* CoordinatorClientTls::job_ = nullptr;
rpc::Security* CoordinatorClientTls::other_ = nullptr;

TEST_F(CoordinatorClientTls, BothEndsWithTheJobsCertificatesRegister) {
  auto c = StartCoordinator(*job_);
  auto client = RegisterWorker(c->address(), *job_);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ((*client)->cluster().self().rank(), 0);
  EXPECT_EQ((*client)->caller().key.size(), 32u);  // the session key
}

// Each mismatch ends registration at once (well before the 20 s startup
// timeout) with an error that says what is wrong.
TEST_F(CoordinatorClientTls, APlaintextNodeIsToldTheCoordinatorSpeaksTls) {
  auto c = StartCoordinator(*job_);
  const absl::Time start = absl::Now();
  auto client = RegisterWorker(c->address(), rpc::Security());
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(client.status().message(),
              HasSubstr(absl::StrCat(c->address(), " speaks TLS, and this node has no certificate")));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST_F(CoordinatorClientTls, ATlsNodeIsToldTheCoordinatorSpeaksPlaintext) {
  auto c = StartCoordinator(rpc::Security());
  const absl::Time start = absl::Now();
  auto client = RegisterWorker(c->address(), *job_);
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(client.status().message(),
              HasSubstr(absl::StrCat(c->address(), " speaks plaintext, and this node is configured "
                                                   "for TLS")));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST_F(CoordinatorClientTls, ACertificateOfAnotherCaIsRefusedAtTheHandshake) {
  auto c = StartCoordinator(*job_);
  const absl::Time start = absl::Now();
  auto client = RegisterWorker(c->address(), *other_);
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(client.status().message(), HasSubstr("the TLS handshake failed"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_EQ(c->refused(), 0);  // refused before any call reached it
}

// Telling why a connection fails (rpc::ConnectionProblem) connects with a
// bound: to a listener whose accept queue is full, which drops the SYN, a
// blocking connect waited for the kernel's SYN retries (about 2 minutes),
// far past a node's start-up deadline.
TEST(CoordinatorClient, APeerThatDropsTheConnectionIsJudgedWithinASecond) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(listener, 0), 0);
  socklen_t len = sizeof(addr);
  getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  // Fill the accept queue (never accepted): later SYNs are dropped.
  std::vector<int> queued;
  for (int i = 0; i < 4; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    queued.push_back(fd);
  }
  absl::SleepFor(absl::Milliseconds(100));
  const std::string address = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
  auto judged = std::make_shared<absl::Notification>();
  std::thread([address, judged] {
    (void)rpc::ConnectionProblem(address, rpc::Security{});
    judged->Notify();
  }).detach();
  EXPECT_TRUE(judged->WaitForNotificationWithTimeout(absl::Seconds(10)))
      << "still connecting to " << address;
  for (int fd : queued) close(fd);
  close(listener);
}

TEST(CoordinatorClient, TheJobTokenIsRequired) {
  rpc::Security job;
  job.token = "the-token";
  auto c = StartCoordinator(job);
  auto refused = RegisterWorker(c->address(), rpc::Security());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(refused.status().message(), HasSubstr("register: no job token"));
  auto client = RegisterWorker(c->address(), job);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ((*client)->caller().token, "the-token");
  EXPECT_EQ(c->refused(), 1);
}

// A "coordinator" that takes every call and never answers (a hung
// process keeps its port; so does one stopped with SIGSTOP), until the
// test ends.
class Silent : public grpc::CallbackGenericService {
  struct Hold : grpc::ServerGenericBidiReactor {
    void OnCancel() override { Finish(grpc::Status::CANCELLED); }
    void OnDone() override { delete this; }
  };
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new Hold;
  }
};

// Found by tests/chaos: a registration the coordinator took but never
// answered failed with a bare "Deadline Exceeded", which named nobody, so
// the launcher blamed the node that gave up. It names the coordinator.
TEST(CoordinatorClient, ACoordinatorThatTakesTheCallButNeverAnswersIsNamed) {
  Silent silent;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(&silent);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  const std::string address = absl::StrCat("127.0.0.1:", port);
  rpc::CoordinatorClient::Options o;
  o.address = address;
  o.startup_timeout = absl::Seconds(2);
  proto::RegisterRequest req;
  req.set_role(proto::WORKER);
  const absl::Time start = absl::Now();
  auto client = rpc::CoordinatorClient::Register(o, req);
  ASSERT_FALSE(client.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnavailable) << client.status();
  EXPECT_THAT(client.status().message(),
              HasSubstr(absl::StrCat("the coordinator at ", address, " is unreachable: it took "
                                     "the call but did not answer within 2s")));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

// Heartbeats go on while the coordinator answers; once it is gone, the
// node hears so once, naming it, after kLostAfter without an answer.
TEST(CoordinatorClient, ALostCoordinatorIsReportedOnce) {
  auto c = StartCoordinator(rpc::Security());
  const std::string address = c->address();
  auto client = RegisterWorker(address, rpc::Security());
  ASSERT_TRUE(client.ok()) << client.status();
  std::atomic<int> answers{0}, lost{0};
  absl::Notification gone;
  std::string why;
  (*client)->StartHeartbeats([&](const proto::HeartbeatResponse&) { ++answers; },
                             [&](const absl::Status& s) {
                               why = std::string(s.message());
                               ++lost;
                               gone.Notify();
                             });
  absl::SleepFor(absl::Milliseconds(2500));
  EXPECT_GE(answers.load(), 2);
  const absl::Time stopped = absl::Now();
  c.reset();
  ASSERT_TRUE(gone.WaitForNotificationWithTimeout(absl::Seconds(15)));
  const absl::Duration took = absl::Now() - stopped;
  EXPECT_GE(took, rpc::CoordinatorClient::kLostAfter - absl::Seconds(1));
  EXPECT_LT(took, rpc::CoordinatorClient::kLostAfter + absl::Seconds(4));
  EXPECT_THAT(why, HasSubstr(absl::StrCat("the coordinator at ", address, " is unreachable")));
  absl::SleepFor(absl::Seconds(2));
  EXPECT_EQ(lost.load(), 1);
  (*client)->StopHeartbeats();
}

// Registers workers 0..n-1 of the job at `address` at once (registration
// waits for all).
std::vector<std::unique_ptr<rpc::CoordinatorClient>> RegisterWorkers(
    const std::string& address, const rpc::Security& security, int n) {
  std::vector<absl::StatusOr<std::unique_ptr<rpc::CoordinatorClient>>> got(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] { got[i] = RegisterWorker(address, security, i); });
  }
  for (std::thread& t : threads) t.join();
  std::vector<std::unique_ptr<rpc::CoordinatorClient>> clients;
  for (auto& c : got) {
    EXPECT_TRUE(c.ok()) << c.status();
    if (c.ok()) clients.push_back(*std::move(c));
  }
  return clients;
}

// Heartbeats of a client, counted; `lost` holds why the coordinator was
// lost ("" while it is not).
struct Heartbeats {
  std::atomic<int> answers{0};
  std::atomic<int> dead_workers{0};  // in the latest answer
  std::mutex mu;
  std::string lost;
  void Start(rpc::CoordinatorClient* client) {
    client->StartHeartbeats(
        [this](const proto::HeartbeatResponse& r) {
          dead_workers = r.dead_size();
          ++answers;
        },
        [this](const absl::Status& s) {
          std::lock_guard<std::mutex> lock(mu);
          lost = std::string(s.message());
        });
  }
  std::string Lost() {
    std::lock_guard<std::mutex> lock(mu);
    return lost;
  }
};

// Waits up to 10 s for `done()`.
bool Eventually(const std::function<bool()>& done) {
  for (int i = 0; i < 200 && !done(); ++i) absl::SleepFor(absl::Milliseconds(50));
  return done();
}

// The coordinator holds no parameter state: when it dies and a new one
// starts on its address, the nodes rejoin it (keeping their ranks and
// session keys), heartbeats go on without the coordinator counting as
// lost, and a barrier entered while it was away completes once it is back.
TEST(CoordinatorRestart, NodesRejoinARestartedCoordinator) {
  rpc::Security job;
  job.token = "the-token";
  auto c = StartCoordinator(job, "127.0.0.1:0", 2);
  const std::string address = c->address();
  auto workers = RegisterWorkers(address, job, 2);
  ASSERT_EQ(workers.size(), 2u);
  Heartbeats beats[2];
  for (int i = 0; i < 2; ++i) beats[i].Start(workers[i].get());
  ASSERT_TRUE(Eventually([&] { return beats[0].answers > 0 && beats[1].answers > 0; }));
  c.reset();  // dies
  // Worker 0 enters a barrier while no coordinator runs.
  absl::Status barrier0;
  std::thread in_barrier([&] { barrier0 = workers[0]->Barrier(3); });
  absl::SleepFor(absl::Milliseconds(1500));
  c = StartCoordinator(job, address, 2);  // a new one, on the same address
  ASSERT_NE(c, nullptr);
  const int before[2] = {beats[0].answers, beats[1].answers};
  ASSERT_TRUE(Eventually([&] {
    return beats[0].answers > before[0] + 1 && beats[1].answers > before[1] + 1;
  }));
  EXPECT_TRUE(workers[1]->Barrier(3).ok());
  in_barrier.join();
  EXPECT_TRUE(barrier0.ok()) << barrier0;
  absl::SleepFor(absl::Seconds(3));  // past the new coordinator's heartbeat timeout
  EXPECT_EQ(beats[0].dead_workers.load(), 0);
  EXPECT_EQ(beats[0].Lost(), "");
  EXPECT_EQ(beats[1].Lost(), "");
  EXPECT_EQ(c->refused(), 0);
  // The job ends with the restarted coordinator as with the first.
  for (auto& w : workers) w->StopHeartbeats();
  EXPECT_TRUE(workers[0]->Leave().ok());
  EXPECT_TRUE(workers[1]->Leave().ok());
  EXPECT_TRUE(c->finished());
}

// A hung coordinator keeps its port and takes calls without answering
// them (found by tests/chaos: the nodes gave it up and the job failed).
// A node says so once per silence, before it gives the coordinator up, so
// that the launcher can restart it; a worker leaving the job meanwhile
// tries again each heartbeat deadline and rejoins the restarted one.
TEST(CoordinatorRestart, ANodeSaysOnceThatAHungCoordinatorDoesNotAnswer) {
  rpc::Security job;
  job.token = "the-token";
  auto c = StartCoordinator(job, "127.0.0.1:0", 1);
  const std::string address = c->address();
  auto workers = RegisterWorkers(address, job, 1);
  ASSERT_EQ(workers.size(), 1u);
  Heartbeats beats;
  beats.Start(workers[0].get());
  ASSERT_TRUE(Eventually([&] { return beats.answers > 0; }));
  c.reset();
  Silent silent;  // the hung one, on its port
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials());
  builder.RegisterCallbackGenericService(&silent);
  std::unique_ptr<grpc::Server> hung = builder.BuildAndStart();
  ASSERT_NE(hung, nullptr);
  testing::internal::CaptureStderr();
  absl::SleepFor(absl::Milliseconds(4500));  // two heartbeats past their deadline
  workers[0]->StopHeartbeats();
  absl::Status left;
  std::thread leaving([&] { left = workers[0]->Leave(); });
  absl::SleepFor(absl::Milliseconds(2500));  // the first attempt timed out
  hung->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  hung.reset();
  c = StartCoordinator(job, address, 1);  // restarted, as the launcher does
  ASSERT_NE(c, nullptr);
  leaving.join();
  const std::string said = testing::internal::GetCapturedStderr();
  EXPECT_TRUE(left.ok()) << left;
  EXPECT_TRUE(c->finished());
  const std::string silence =
      absl::StrCat("worker 0: the coordinator at ", address, " has not answered for ");
  EXPECT_THAT(said, HasSubstr(silence));
  EXPECT_THAT(said, HasSubstr("s (hung?); going on without it, giving it up after 6s"));
  EXPECT_EQ(said.find(silence), said.rfind(silence)) << said;  // once
  EXPECT_THAT(said, HasSubstr("worker 0: rejoined the coordinator at " + address));
  EXPECT_EQ(beats.Lost(), "");
}

// A node that does not rejoin the restarted coordinator within its
// heartbeat timeout is declared dead, and the others hear of it; what a
// rejoining node heard of before (a finished worker) is kept.
TEST(CoordinatorRestart, ANodeThatDoesNotRejoinIsDeclaredDead) {
  auto c = StartCoordinator(rpc::Security(), "127.0.0.1:0", 3);
  const std::string address = c->address();
  auto workers = RegisterWorkers(address, rpc::Security(), 3);
  ASSERT_EQ(workers.size(), 3u);
  ASSERT_TRUE(workers[2]->Leave().ok());  // finished
  Heartbeats beats, beats1;
  beats.Start(workers[0].get());
  beats1.Start(workers[1].get());
  ASSERT_TRUE(Eventually([&] { return beats.answers > 1; }));  // heard worker 2 finished
  c.reset();
  workers[1]->StopHeartbeats();  // it will not rejoin
  c = StartCoordinator(rpc::Security(), address, 3);
  const absl::Time restarted = absl::Now();
  // Worker 1 never heartbeats again: declared dead about 2 s after worker 0 rejoined.
  ASSERT_TRUE(Eventually([&] { return beats.dead_workers.load() == 1; }));
  EXPECT_GE(absl::Now() - restarted, absl::Seconds(2));
  EXPECT_EQ(beats.Lost(), "");
  // Worker 2 finished before the restart: it is not declared dead, and
  // once worker 0 leaves the job is over, failed: worker 1 died (without
  // --elastic a dead worker fails the job, also when the others finished).
  absl::SleepFor(absl::Seconds(1));
  EXPECT_EQ(beats.dead_workers.load(), 1);
  workers[0]->StopHeartbeats();
  ASSERT_TRUE(workers[0]->Leave().ok());
  EXPECT_TRUE(Eventually([&] { return c->finished(); }));
  EXPECT_THAT(c->failure(), HasSubstr("worker(s) 1 died before finishing"));
  // A node declared dead may not come back.
  const absl::Status late = workers[1]->Barrier(5);
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition) << late;
  EXPECT_THAT(late.message(), HasSubstr("barrier: register (rejoin): worker 1 was declared dead"));
  EXPECT_EQ(beats1.Lost(), "");
}

// Found by tests/chaos: worker 1 hung just before it finished, after
// worker 0 had finished; the coordinator counted the job as done (every
// worker finished or dead) and the daemons exited 0, so the launcher
// blamed whichever exited first. Without --elastic the job fails naming
// the dead worker.
TEST(CoordinatorClient, AWorkerThatDiesAfterTheOthersFinishedFailsTheJob) {
  auto c = StartCoordinator(rpc::Security(), "127.0.0.1:0", 2);  // heartbeat timeout 2 s
  auto workers = RegisterWorkers(c->address(), rpc::Security(), 2);
  ASSERT_EQ(workers.size(), 2u);
  Heartbeats beats;
  beats.Start(workers[1].get());
  ASSERT_TRUE(workers[0]->Leave().ok());
  ASSERT_TRUE(Eventually([&] { return beats.answers > 0; }));
  workers[1]->StopHeartbeats();  // hangs
  ASSERT_TRUE(Eventually([&] { return !c->failure().empty(); }));
  EXPECT_EQ(c->failure(),
            "worker(s) 1 died before finishing, after the others had: worker 1 stopped sending "
            "heartbeats");
  EXPECT_TRUE(Eventually([&] { return c->finished(); }));
}

// A job of one worker and a waiting spare, which heartbeats only once a
// test starts its heartbeats.
struct JobWithSpare {
  std::unique_ptr<CoordinatorServer> coordinator;
  std::unique_ptr<rpc::CoordinatorClient> worker, spare;
};
JobWithSpare StartJobWithSpare() {
  CoordinatorOptions o;
  o.num_servers = 0;
  o.num_workers = 1;
  o.heartbeat_timeout = absl::Seconds(2);
  JobWithSpare job;
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return job;
  job.coordinator = *std::move(c);
  auto worker = RegisterWorker(job.coordinator->address(), rpc::Security(), 0);
  rpc::CoordinatorClient::Options co;
  co.address = job.coordinator->address();
  proto::RegisterRequest req;
  req.set_role(proto::SERVER);
  req.set_address("127.0.0.1:1");
  req.set_spare(true);
  auto spare = rpc::CoordinatorClient::Register(co, req);
  EXPECT_TRUE(worker.ok() && spare.ok()) << worker.status() << spare.status();
  if (worker.ok()) job.worker = *std::move(worker);
  if (spare.ok()) job.spare = *std::move(spare);
  return job;
}

// Found by tests/chaos: a coordinator whose job was done exited once every
// server had heard so, and a waiting spare whose heartbeat came just after
// ran on until the launcher stopped it. The coordinator waits for it.
TEST(CoordinatorClient, AFinishedJobsCoordinatorWaitsForAWaitingSpareToHearIt) {
  JobWithSpare job = StartJobWithSpare();
  ASSERT_NE(job.spare, nullptr);
  ASSERT_TRUE(job.worker->Leave().ok());
  absl::SleepFor(absl::Milliseconds(500));
  EXPECT_FALSE(job.coordinator->finished());  // the spare has not heard it
  std::atomic<bool> told{false};
  job.spare->StartHeartbeats(
      [&](const proto::HeartbeatResponse& r) { told = told || r.shutdown(); },
      [](const absl::Status&) {});
  ASSERT_TRUE(Eventually([&] { return told.load(); }));
  EXPECT_TRUE(job.coordinator->finished());
  job.spare->StopHeartbeats();
}

// ... but not for long: a spare that does not heartbeat (hung, or gone)
// does not keep it.
TEST(CoordinatorClient, AFinishedJobsCoordinatorDoesNotWaitForASilentSpare) {
  JobWithSpare job = StartJobWithSpare();
  ASSERT_NE(job.spare, nullptr);
  ASSERT_TRUE(job.worker->Leave().ok());
  const absl::Time left = absl::Now();
  ASSERT_TRUE(Eventually([&] { return job.coordinator->finished(); }));
  EXPECT_GE(absl::Now() - left, absl::Seconds(1));
}

// A spare server waits through a coordinator's restart (it rejoins as a
// spare) and then takes the rank of a server that dies.
TEST(CoordinatorRestart, ASpareRejoinsAndThenTakesADeadServersRank) {
  CoordinatorOptions o;
  o.num_servers = 1;
  o.num_workers = 1;
  o.heartbeat_timeout = absl::Seconds(2);
  auto first = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string address = (*first)->address();
  auto node = [&](proto::Role role, bool spare, const std::string& at) {
    rpc::CoordinatorClient::Options co;
    co.address = address;
    co.startup_timeout = absl::Seconds(20);
    proto::RegisterRequest req;
    req.set_role(role);
    req.set_address(at);
    req.set_spare(spare);
    if (!spare) req.set_rank(0);
    return rpc::CoordinatorClient::Register(co, req);
  };
  auto spare = node(proto::SERVER, true, "127.0.0.1:7");  // answered at once
  ASSERT_TRUE(spare.ok()) << spare.status();
  EXPECT_EQ((*spare)->cluster().self().rank(), 1);  // past the job's one server
  absl::StatusOr<std::unique_ptr<rpc::CoordinatorClient>> server, worker;
  std::thread s([&] { server = node(proto::SERVER, false, "127.0.0.1:5"); });
  worker = node(proto::WORKER, false, "");
  s.join();
  ASSERT_TRUE(server.ok() && worker.ok());
  std::mutex mu;
  std::optional<proto::RegisterResponse> assignment;
  std::string lost;
  (*spare)->StartHeartbeats(
      [&](const proto::HeartbeatResponse& r) {
        std::lock_guard<std::mutex> lock(mu);
        if (r.has_assignment()) assignment = r.assignment();
      },
      [&](const absl::Status& why) {
        std::lock_guard<std::mutex> lock(mu);
        lost = std::string(why.message());
      });
  Heartbeats worker_beats;
  worker_beats.Start(worker->get());
  first->reset();  // the coordinator restarts; the server (not heartbeating) never rejoins
  auto second = CoordinatorServer::Start(address, o);
  ASSERT_TRUE(second.ok()) << second.status();
  // Server 0 does not rejoin: declared dead, its rank goes to the spare.
  ASSERT_TRUE(Eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return assignment.has_value();
  }));
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(lost, "");
  EXPECT_EQ(assignment->self().rank(), 0);
  EXPECT_EQ(assignment->self().incarnation(), 1);
  EXPECT_EQ(assignment->self().address(), "127.0.0.1:7");
  (*spare)->StopHeartbeats();
  (*worker)->StopHeartbeats();
}

// With no coordinator back, a barrier waits for it as long as heartbeats
// would (lost_after, not its whole 10 s deadline) and then names it.
TEST(CoordinatorRestart, AnAbsentCoordinatorIsLostAfterTheTimeout) {
  auto c = StartCoordinator(rpc::Security());
  const std::string address = c->address();
  auto client = RegisterWorker(address, rpc::Security());
  ASSERT_TRUE(client.ok()) << client.status();
  c.reset();
  const absl::Time gone = absl::Now();
  const absl::Status barrier = (*client)->Barrier(0);  // rpc_timeout 10 s
  const absl::Duration waited = absl::Now() - gone;
  EXPECT_GE(waited, rpc::CoordinatorClient::kLostAfter - absl::Milliseconds(500));
  EXPECT_LT(waited, absl::Seconds(9));
  EXPECT_EQ(barrier.code(), absl::StatusCode::kUnavailable) << barrier;
  EXPECT_THAT(barrier.message(),
              HasSubstr(absl::StrCat("barrier: the coordinator at ", address,
                                     " is unreachable: away (or restarting) for ")));
}

// Once a node has lost the coordinator its calls have failed: its
// heartbeats stop, where they rejoined a restarted coordinator, which then
// counted the node as alive (and held its rank).
TEST(CoordinatorRestart, ANodeThatLostTheCoordinatorDoesNotRejoinARestartedOne) {
  auto c = StartCoordinator(rpc::Security());
  const std::string address = c->address();
  auto client = RegisterWorker(address, rpc::Security(), 0);
  ASSERT_TRUE(client.ok()) << client.status();
  Heartbeats beats;
  beats.Start(client->get());
  ASSERT_TRUE(Eventually([&] { return beats.answers > 0; }));
  c.reset();
  ASSERT_TRUE(Eventually([&] { return !beats.Lost().empty(); }));
  c = StartCoordinator(rpc::Security(), address);
  ASSERT_NE(c, nullptr);
  absl::SleepFor(absl::Seconds(3));  // heartbeats come every second
  auto fresh = RegisterWorker(address, rpc::Security(), 0);
  EXPECT_TRUE(fresh.ok()) << fresh.status();  // rank 0 is not the lost node's again
  (*client)->StopHeartbeats();
}

// The timeline (ndarray/trace.h): a barrier is a span, and heartbeats give
// the node its clock offset to the coordinator with an uncertainty; on one
// host (one clock) the offset lies within it.
TEST(CoordinatorClient, BarriersAndTheClockOffsetGoOnTheTimeline) {
  const std::string path = test::TestTmpDir() + "/timeline.json";
  trace::Start(path);
  auto c = StartCoordinator(rpc::Security());
  auto client = RegisterWorker(c->address(), rpc::Security());
  ASSERT_TRUE(client.ok()) << client.status();
  std::atomic<int> answers{0};
  (*client)->StartHeartbeats([&](const proto::HeartbeatResponse&) { ++answers; },
                             [](const absl::Status&) {});
  for (int i = 0; i < 100 && answers.load() < 2; ++i) absl::SleepFor(absl::Milliseconds(50));
  ASSERT_GE(answers.load(), 2);
  ASSERT_TRUE((*client)->Barrier(7).ok());
  (*client)->StopHeartbeats();
  ASSERT_TRUE(trace::Write().ok());
  std::ifstream f(path);
  std::stringstream text;
  text << f.rdbuf();
  EXPECT_THAT(text.str(), HasSubstr("\"name\":\"barrier\""));
  EXPECT_THAT(text.str(), HasSubstr("\"args\":{\"epoch\":7}"));
  int64_t offset = 0, uncertainty = 0;
  const size_t at = text.str().find("\"clock_offset_us\":");
  ASSERT_NE(at, std::string::npos);
  ASSERT_EQ(std::sscanf(text.str().c_str() + at, "\"clock_offset_us\":%ld,\"clock_uncertainty_us\":%ld",
                        &offset, &uncertainty), 2);
  EXPECT_GT(uncertainty, 0);
  EXPECT_LE(std::abs(offset), uncertainty) << "one host, one clock";
  // A timeline that cannot be written is an error naming the file.
  trace::Start("/nonexistent-dir/timeline.json");
  const absl::Status unwritable = trace::Write();
  trace::Stop();
  EXPECT_EQ(unwritable.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(unwritable.message(), HasSubstr("cannot write /nonexistent-dir/timeline.json"));
}

}  // namespace
}  // namespace mx
