// mx_server: a coordinator or a parameter server of a distributed job.
//
//   mx_server --role=coordinator --bind=127.0.0.1:9000 --num_servers=2 --num_workers=2
//   mx_server --role=server --coordinator=127.0.0.1:9000 --bind=127.0.0.1:0
//
// The DMLC_* variables MXNet users know configure it too (flags win):
// DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER,
// DMLC_NUM_WORKER. --bind is where it listens; --advertise is the address
// other nodes use (they differ behind a Kubernetes Service). Runs until
// every worker has finished (the coordinator tells the servers through
// heartbeats), or until SIGINT or SIGTERM; it then logs "<role>: every
// worker finished; shutting down" (or "... shutting down (SIGTERM)"), stops
// serving and exits 0. A server also stops, with an error and exit code 1,
// when the coordinator is unreachable for three heartbeats.
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <string>
#include <thread>

#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"
#include "server/coordinator.h"
#include "server/kvstore_service.h"

ABSL_FLAG(std::string, role, "", "coordinator or server (default: $DMLC_ROLE)");
ABSL_FLAG(std::string, bind, "",
          "host:port to listen on (default: coordinator $DMLC_PS_ROOT_URI:$DMLC_PS_ROOT_PORT, "
          "server 0.0.0.0:0, any free port)");
ABSL_FLAG(std::string, advertise, "",
          "host:port other nodes use to reach this one, or a host alone (then with the bound "
          "port); default: the bound address, with 0.0.0.0 replaced by 127.0.0.1");
ABSL_FLAG(std::string, coordinator, "",
          "the coordinator's host:port (default: $DMLC_PS_ROOT_URI:$DMLC_PS_ROOT_PORT)");
ABSL_FLAG(int, num_servers, 0, "servers in the job (default: $DMLC_NUM_SERVER)");
ABSL_FLAG(int, num_workers, 0, "workers in the job (default: $DMLC_NUM_WORKER)");
ABSL_FLAG(std::string, rank, "",
          "the server rank to ask the coordinator for, 0 to num_servers-1 (default: $MX_RANK; "
          "neither: the lowest one free); launch.py gives each server its index");
ABSL_FLAG(std::string, mode, "sync", "sync (dist_sync) or async (dist_async)");
ABSL_FLAG(bool, elastic, false,
          "continue without workers that died instead of failing (give it to the coordinator "
          "and to every server)");
ABSL_FLAG(int, max_message_mb, 1024,
          "a server refuses requests larger than this many MiB (1 to 1024)");
ABSL_FLAG(int, startup_timeout_s, 0,
          "a server fails unless every node of the job has registered within this many seconds "
          "(default: $MX_STARTUP_TIMEOUT_S, else 120)");
ABSL_FLAG(int, heartbeat_timeout_s, 5,
          "the coordinator declares a node dead after this many silent seconds (at least 2: "
          "nodes heartbeat every second)");

namespace mx {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

int IntFlagOrEnv(int flag, const char* env, const char* name) {
  if (flag > 0) return flag;
  const std::string text = Env(env);
  int v = 0;
  if (!absl::SimpleAtoi(text, &v) || v <= 0) {
    std::cerr << "mx_server: --" << name << " (or $" << env << ") must be a positive number, not '"
              << text << "'\n";
    std::exit(2);
  }
  return v;
}

// --startup_timeout_s, else $MX_STARTUP_TIMEOUT_S, else the default (as
// workers).
int StartupTimeoutSeconds() {
  if (Env("MX_STARTUP_TIMEOUT_S").empty() && absl::GetFlag(FLAGS_startup_timeout_s) <= 0) {
    return kDefaultStartupTimeoutSeconds;
  }
  return IntFlagOrEnv(absl::GetFlag(FLAGS_startup_timeout_s), "MX_STARTUP_TIMEOUT_S",
                      "startup_timeout_s");
}

std::string RootAddress() {
  if (Env("DMLC_PS_ROOT_URI").empty()) return "";
  return absl::StrCat(Env("DMLC_PS_ROOT_URI"), ":", Env("DMLC_PS_ROOT_PORT"));
}

// Whether `address` is a host name or IP address, with or without ":port",
// that other nodes could dial: not, say, "$(POD_IP)", an environment
// variable that Kubernetes left unexpanded.
bool DialableAddress(const std::string& address) {
  std::string host = address, port;
  const size_t colon = address.rfind(':');
  if (colon != std::string::npos && address.back() != ']') {
    host = address.substr(0, colon);
    port = address.substr(colon + 1);
    int p;
    if (!absl::SimpleAtoi(port, &p) || p < 1 || p > 65535) return false;
  }
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {  // IPv6
    return host.find_first_not_of("0123456789abcdefABCDEF:.", 1) == host.size() - 1;
  }
  return !host.empty() &&
         host.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-") ==
             std::string::npos;
}

// Blocks until SIGINT or SIGTERM (blocked in every thread, so they arrive
// here) and returns it, or until `stop()` turns true and returns 0.
int WaitForSignal(const std::function<bool()>& stop) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  timespec tick{0, 200 * 1000 * 1000};
  while (!stop()) {
    const int sig = sigtimedwait(&set, nullptr, &tick);
    if (sig > 0) return sig;
  }
  return 0;
}

// The line an orderly stop logs: "server 1: every worker finished;
// shutting down", or "server 1: shutting down (SIGTERM)" on a signal.
void LogShutdown(const std::string& who, int sig) {
  if (sig == 0) {
    std::cout << who << ": every worker finished; shutting down" << std::endl;
    return;
  }
  std::cout << who << ": shutting down (" << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ")"
            << std::endl;
}

int RunCoordinator() {
  std::string bind = absl::GetFlag(FLAGS_bind);
  if (bind.empty()) bind = RootAddress();
  if (bind.empty()) {
    std::cerr << "mx_server: the coordinator needs --bind (or DMLC_PS_ROOT_URI/PORT)\n";
    return 2;
  }
  const int timeout_s = absl::GetFlag(FLAGS_heartbeat_timeout_s);
  if (timeout_s < 2) {
    std::cerr << "mx_server: --heartbeat_timeout_s must be at least 2 (nodes heartbeat every "
                 "second), not "
              << timeout_s << "\n";
    return 2;
  }
  CoordinatorOptions o;
  o.num_servers = IntFlagOrEnv(absl::GetFlag(FLAGS_num_servers), "DMLC_NUM_SERVER", "num_servers");
  o.num_workers = IntFlagOrEnv(absl::GetFlag(FLAGS_num_workers), "DMLC_NUM_WORKER", "num_workers");
  o.heartbeat_timeout = absl::Seconds(timeout_s);
  o.elastic = absl::GetFlag(FLAGS_elastic);
  auto c = CoordinatorServer::Start(bind, o);
  if (!c.ok()) {
    std::cerr << "mx_server: " << c.status().message() << "\n";
    return 1;
  }
  std::cout << "coordinator listening on " << (*c)->address()
            << (o.elastic ? " (elastic)" : "") << std::endl;
  const int sig = WaitForSignal([&c] { return (*c)->finished(); });
  LogShutdown("coordinator", sig);
  return 0;
}

int RunServer() {
  std::string coordinator = absl::GetFlag(FLAGS_coordinator);
  if (coordinator.empty()) coordinator = RootAddress();
  if (coordinator.empty()) {
    std::cerr << "mx_server: a server needs --coordinator (or DMLC_PS_ROOT_URI/PORT)\n";
    return 2;
  }
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode != "sync" && mode != "async") {
    std::cerr << "mx_server: --mode must be sync or async, not '" << mode << "'\n";
    return 2;
  }
  const int workers = IntFlagOrEnv(absl::GetFlag(FLAGS_num_workers), "DMLC_NUM_WORKER", "num_workers");
  const int startup_timeout = StartupTimeoutSeconds();
  std::string rank_text = absl::GetFlag(FLAGS_rank);
  if (rank_text.empty()) rank_text = Env("MX_RANK");
  int requested_rank = 0;
  if (!rank_text.empty() && (!absl::SimpleAtoi(rank_text, &requested_rank) || requested_rank < 0)) {
    std::cerr << "mx_server: --rank (or $MX_RANK) must be a rank from 0, not '" << rank_text
              << "'\n";
    return 2;
  }
  std::string advertise = absl::GetFlag(FLAGS_advertise);
  if (!advertise.empty() && !DialableAddress(advertise)) {
    std::cerr << "mx_server: --advertise '" << advertise
              << "' is not a host or host:port that other nodes could reach\n";
    return 2;
  }
  std::string bind = absl::GetFlag(FLAGS_bind);
  if (bind.empty()) bind = "0.0.0.0:0";
  auto ps = ParameterServer::Start(bind, {mode == "sync", workers, absl::GetFlag(FLAGS_elastic)},
                                   absl::GetFlag(FLAGS_max_message_mb));
  if (!ps.ok()) {
    std::cerr << "mx_server: " << ps.status().message() << "\n";
    return 1;
  }
  const std::string bound = (*ps)->address();
  const std::string bound_port = bound.substr(bound.rfind(':') + 1);
  if (advertise.empty()) {
    advertise = bound;
    if (advertise.rfind("0.0.0.0:", 0) == 0) advertise = "127.0.0.1:" + bound_port;
  } else if (advertise.find(':') == std::string::npos) {
    advertise += ":" + bound_port;  // a host name: with the port it got
  }
  proto::RegisterRequest req;
  req.set_role(proto::SERVER);
  req.set_address(advertise);
  if (!rank_text.empty()) req.set_rank(requested_rank);
  absl::StatusOr<proto::RegisterResponse> resp =
      RegisterWithCoordinator(coordinator, req, absl::Seconds(startup_timeout));
  if (!resp.ok()) {
    std::cerr << "mx_server: " << resp.status().message() << "\n";
    return 1;
  }
  const int rank = resp->self().rank();
  std::cout << "server " << rank << " serving on " << advertise
            << (absl::GetFlag(FLAGS_elastic) ? " (elastic)" : "") << std::endl;

  auto stub = proto::Coordinator::NewStub(SharedChannel(coordinator));
  std::atomic<bool> stop{false}, finished{false};
  std::atomic<int> exit_code{0};
  std::thread heartbeat([&] {
    int failures = 0;
    while (!stop.load()) {
      proto::HeartbeatRequest hb;
      hb.set_role(proto::SERVER);
      hb.set_rank(rank);
      proto::HeartbeatResponse hr;
      grpc::ClientContext hctx;
      hctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      if (stub->Heartbeat(&hctx, hb, &hr).ok()) {
        failures = 0;
        for (const proto::NodeInfo& dead : hr.dead()) {
          if (dead.role() == proto::WORKER) (*ps)->shard().MarkDead(dead.rank());
        }
        for (int finished : hr.finished_workers()) (*ps)->shard().MarkFinished(finished);
        if (hr.shutdown()) {
          finished = true;
          stop = true;
          break;
        }
      } else if (++failures >= 3) {
        const std::string why =
            absl::StrCat("the coordinator at ", coordinator, " is unreachable; stopping");
        std::cerr << "mx_server: server " << rank << ": " << why << "\n";
        (*ps)->shard().Close(absl::StrCat("server ", rank, " stopped: ", why));
        exit_code = 1;
        stop = true;
        break;
      }
      // One second between heartbeats, ending early on a stop.
      for (int i = 0; i < 10 && !stop.load(); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
  });
  const int sig = WaitForSignal([&stop] { return stop.load(); });
  if (sig != 0 || finished.load()) LogShutdown(absl::StrCat("server ", rank), sig);
  stop = true;
  heartbeat.join();
  return exit_code.load();
}

}  // namespace
}  // namespace mx

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("runs a coordinator or a parameter server of an mx job");
  absl::ParseCommandLine(argc, argv);
  // A crash prints its signal and stack (with symbols) before the process dies.
  absl::InitializeSymbolizer(argv[0]);
  absl::InstallFailureSignalHandler(absl::FailureSignalHandlerOptions());
  std::signal(SIGTERM, SIG_DFL);  // a stop, not a failure
  // absl's mutex deadlock detection (on in Debian's build) costs a graph
  // update per lock in gRPC's and the shard's hot paths.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  // A server's array operations (optimizer updates, copies) run under its
  // shard's lock, one at a time: inline, they save two thread switches per
  // update (unless MX_ENGINE_TYPE says otherwise).
  setenv("MX_ENGINE_TYPE", "NaiveEngine", /*overwrite=*/0);
  // Signals are taken by WaitForSignal, not by gRPC's threads.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::string role = absl::GetFlag(FLAGS_role);
  if (role.empty()) role = mx::Env("DMLC_ROLE");
  if (role == "coordinator" || role == "scheduler") return mx::RunCoordinator();
  if (role == "server") return mx::RunServer();
  std::cerr << "mx_server: --role must be coordinator or server (got '" << role << "')\n";
  return 2;
}
