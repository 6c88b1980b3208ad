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
// worker finished; shutting down" and exits 0 (or "... shutting down
// (SIGTERM)" and exits 128 + the signal: StopExitCode). A server also
// stops, with an error and exit code 1, when the coordinator has not
// answered for --coordinator_timeout_s + 2 seconds (workers give up 2 s
// sooner, so they are the ones to report it); a coordinator restarted on
// its address before then is rejoined. With replicas, a server whose rank
// is taken joins as a spare.
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"
#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "ndarray/env.h"
#include "ndarray/trace.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"
#include "rpc/coordinator_client.h"
#include "rpc/metrics.h"
#include "rpc/metrics_http.h"
#include "rpc/rpc.h"
#include "rpc/security.h"
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
ABSL_FLAG(std::string, num_servers, "", "servers in the job (default: $DMLC_NUM_SERVER)");
ABSL_FLAG(std::string, num_workers, "", "workers in the job (default: $DMLC_NUM_WORKER)");
ABSL_FLAG(std::string, rank, "",
          "the server rank to ask the coordinator for, 0 to num_servers-1 (default: $MX_RANK; "
          "neither: the lowest one free); launch.py gives each server its index");
ABSL_FLAG(std::string, mode, "sync", "sync (dist_sync) or async (dist_async)");
ABSL_FLAG(bool, elastic, false,
          "continue without workers that died instead of failing (give it to the coordinator "
          "and to every server)");
ABSL_FLAG(std::string, replicas, "",
          "copies of each key's state on the servers: 1, or 2 (a primary and a backup on the next "
          "server, which takes over if the primary dies; give every server and worker the same; "
          "default: $MX_REPLICAS, else 1)");
ABSL_FLAG(std::string, staleness, "",
          "dist_sync with bounded staleness: a worker's pull may return a value up to this many "
          "steps older than its own pushes, so a worker runs at most this many steps ahead of "
          "the slowest (0: plain dist_sync; give every server and worker the same; default: "
          "$MX_STALENESS, else 0)");
ABSL_FLAG(bool, spare, false,
          "a spare server (with --replicas=2): it waits, and when a server dies it takes that "
          "server's rank, and the survivors give it copies of the keys that lost their second "
          "one (launch.py --spare-servers=N starts N)");
ABSL_FLAG(int, max_message_mb, 1024,
          "a server refuses requests larger than this many MiB (1 to 1024)");
ABSL_FLAG(std::string, startup_timeout_s, "",
          "a server (and the coordinator, counting from its start) fails unless every node of "
          "the job has registered within this many seconds (default: $MX_STARTUP_TIMEOUT_S, "
          "else 120)");
ABSL_FLAG(std::string, coordinator_timeout_s, "",
          "a server stops when the coordinator has not answered its heartbeats for this many "
          "seconds plus 2 (workers give up after this many); a coordinator restarted on its "
          "address within that time is rejoined (default: $MX_COORDINATOR_TIMEOUT_S, else 6)");
ABSL_FLAG(int, heartbeat_timeout_s, 5,
          "the coordinator declares a node dead after this many silent seconds (at least 2: "
          "nodes heartbeat every second)");
ABSL_FLAG(std::string, metrics_port, "",
          "serve Prometheus metrics and /healthz over HTTP on this port of the --bind host "
          "(0: a free one; default: $MX_METRICS_PORT; unset: no endpoint)");
ABSL_FLAG(std::string, trace, "",
          "write this node's timeline (Chrome trace events) into this directory when it stops "
          "(default: $MX_TRACE_DIR; deploy/trace_merge.py merges a job's)");
ABSL_FLAG(std::string, token_file, "",
          "a file whose first line is the job token, which every call must carry (default: "
          "$MX_JOB_TOKEN_FILE, or the token itself in $MX_JOB_TOKEN; neither: an open job that "
          "any process reaching the port may call)");
ABSL_FLAG(std::string, tls_cert, "",
          "this node's certificate (PEM) for mutual TLS on every connection (default: "
          "$MX_TLS_CERT); needs --tls_key and --tls_ca");
ABSL_FLAG(std::string, tls_key, "", "the private key of --tls_cert (default: $MX_TLS_KEY)");
ABSL_FLAG(std::string, tls_ca, "",
          "the job's CA certificate: peers must present certificates it signed (default: "
          "$MX_TLS_CA)");
ABSL_FLAG(std::string, shm_dir, "",
          "where workers on this host put the shared memory they hand this server (values then "
          "skip the network; default: $MX_SHM_DIR; launch.py sets it for jobs on one host)");
ABSL_FLAG(std::string, stream_port, "",
          "servers: the port (on the --bind host; 0: a free one) of the TCP connections "
          "that carry pushes and pulls (with --replicas=2 also other servers' steps) beside gRPC "
          "(rpc/stream.h; mutual TLS when TLS is configured); -1: none, all through gRPC "
          "(default: $MX_STREAM_PORT, else 0)");
ABSL_FLAG(std::string, tls_server_name, "",
          "the name servers' certificates carry, checked instead of the host dialled (default: "
          "$MX_TLS_SERVER_NAME; launch.py --tls uses one name for the whole job)");

namespace mx {
namespace {

// A node's /livez fails once the loop it watches (the coordinator's sweep,
// a server's shard check) has not run for this long.
constexpr absl::Duration kStuckAfter = absl::Seconds(15);

// Makes /livez of `metrics` (may be null) fail once since() exceeds
// kStuckAfter (HttpServer::SetLiveness), until the returned cleanup runs,
// which must be before what since() reads goes.
auto WatchLiveness(metrics::HttpServer* metrics, std::function<absl::Duration()> since,
                   const char* what) {
  if (metrics != nullptr) metrics->SetLiveness(std::move(since), kStuckAfter, what);
  return absl::MakeCleanup([metrics] {
    if (metrics != nullptr) metrics->SetLiveness(nullptr, absl::ZeroDuration(), "");
  });
}

// Exits with code 2 and the setting's error unless `v` holds a value.
template <class T>
T OrExit(absl::StatusOr<T> v) {
  if (!v.ok()) {
    std::cerr << "mx_server: " << v.status().message() << "\n";
    std::exit(2);
  }
  return *std::move(v);
}

// A whole-number setting: the flag, else the environment variable, else
// `otherwise` (nullopt: required, an error naming both).
int IntSetting(const char* flag, const std::string& flag_text, const char* env, int64_t min,
               int64_t max, std::optional<int> otherwise = std::nullopt) {
  std::optional<int64_t> v = OrExit(FlagOrEnvInt(flag, flag_text, env, min, max));
  if (v.has_value()) return static_cast<int>(*v);
  if (otherwise.has_value()) return *otherwise;
  std::cerr << "mx_server: give --" << flag << " (or $" << env << ")\n";
  std::exit(2);
}

// TLS and the job token, from the flags and else the environment.
rpc::Security SecuritySettings() {
  // A file from its flag, else from its variable; errors name which.
  auto file = [](const std::string& flag_value, const char* flag, const char* env) {
    if (!flag_value.empty()) return rpc::Security::File{flag_value, absl::StrCat("--", flag)};
    return rpc::Security::File{EnvString(env), env};
  };
  const std::string token_file = absl::GetFlag(FLAGS_token_file);
  const std::string server_name = absl::GetFlag(FLAGS_tls_server_name);
  rpc::Security s = OrExit(rpc::Security::Load(
      token_file.empty() ? EnvString("MX_JOB_TOKEN") : "",
      file(token_file, "token_file", "MX_JOB_TOKEN_FILE"),
      file(absl::GetFlag(FLAGS_tls_cert), "tls_cert", "MX_TLS_CERT"),
      file(absl::GetFlag(FLAGS_tls_key), "tls_key", "MX_TLS_KEY"),
      file(absl::GetFlag(FLAGS_tls_ca), "tls_ca", "MX_TLS_CA"),
      server_name.empty() ? EnvString("MX_TLS_SERVER_NAME") : server_name));
  if (s.token.empty()) {
    std::cerr << "mx_server: warning: no job token (--token_file, $MX_JOB_TOKEN_FILE or "
                 "$MX_JOB_TOKEN): any process that reaches this port can call it\n";
  }
  return s;
}

std::string RootAddress() {
  if (EnvString("DMLC_PS_ROOT_URI").empty()) return "";
  return absl::StrCat(EnvString("DMLC_PS_ROOT_URI"), ":", EnvString("DMLC_PS_ROOT_PORT"));
}

// A host and an optional port, from "host", "host:port", "[v6]",
// "[v6]:port" or a bare IPv6 address ("fd00::1", taken as a host without a
// port). An IPv6 host keeps (or gets) its brackets, so host + ":" + port
// is an address to dial.
struct HostPort {
  std::string host;
  std::optional<std::string> port;
};
HostPort SplitHostPort(const std::string& address) {
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    if (close == std::string::npos) return {address, std::nullopt};
    HostPort hp{address.substr(0, close + 1), std::nullopt};
    if (close + 1 < address.size()) {
      if (address[close + 1] != ':') return {address, std::nullopt};  // garbage after ']'
      hp.port = address.substr(close + 2);
    }
    return hp;
  }
  const size_t colon = address.find(':');
  if (colon == std::string::npos) return {address, std::nullopt};
  if (address.find(':', colon + 1) != std::string::npos) return {"[" + address + "]", std::nullopt};
  return {address.substr(0, colon), address.substr(colon + 1)};
}

// The port of an address, when it is a whole number in [min, 65535].
std::optional<int> PortIn(const std::optional<std::string>& port, int min) {
  int p;
  if (!port.has_value() || !absl::SimpleAtoi(*port, &p) || p < min || p > 65535) {
    return std::nullopt;
  }
  return p;
}

// Whether `address` is a host name or IP address (IPv4 or IPv6), with or
// without ":port", that other nodes could dial: not, say, "$(POD_IP)", an
// environment variable that Kubernetes left unexpanded.
bool DialableAddress(const std::string& address) {
  const HostPort hp = SplitHostPort(address);
  if (hp.port.has_value() && !PortIn(hp.port, 1)) return false;
  const std::string& host = hp.host;
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {  // IPv6
    return host.find_first_not_of("0123456789abcdefABCDEF:.", 1) == host.size() - 1;
  }
  return !host.empty() &&
         host.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-") ==
             std::string::npos;
}

// An address setting: flag `flag`'s value, or else (when `root`)
// DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT, or else `otherwise`; host:port with a
// port from `min_port` (0 for a bind: any free one) to 65535. Otherwise an
// error naming where it came from: gRPC would listen on another port, and
// a server dialled "127.0.0.1:" until its startup timeout.
absl::StatusOr<std::string> AddressSetting(const char* flag, const std::string& value, bool root,
                                           int min_port, const std::string& otherwise = "") {
  std::string address = value, from = absl::StrCat("--", flag);
  if (address.empty() && root && !EnvString("DMLC_PS_ROOT_URI").empty()) {
    address = RootAddress();
    from = "DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT";
  }
  if (address.empty()) address = otherwise;
  if (address.empty()) return address;  // not given
  const HostPort hp = SplitHostPort(address);
  if (!hp.host.empty() && PortIn(hp.port, min_port).has_value()) return address;
  return absl::InvalidArgumentError(
      absl::StrCat(from, "=", address, ": needs host:port with a port from ", min_port,
                   min_port == 0 ? " (any free port)" : "", " to 65535"));
}

// Signals. SIGINT and SIGTERM run OnStopSignal in whichever thread the
// kernel picks. Once the node serves, it records the signal: WaitForSignal
// returns it and the node shuts down in order. Before, it ends the process
// at once (exit 128 + signal; a server waiting to register, say). A
// handler, not the default action: the kernel delivers signals to a PID 1
// (a container's) only when it has one.
std::atomic<int> g_signal{0};
std::atomic<bool> g_serving{false};

extern "C" void OnStopSignal(int sig) {
  g_signal.store(sig);
  if (g_serving.load()) return;
  mx::ExitOnStopSignal("mx_server", sig, " before serving");
}

void InstallStopHandlers() {
  struct sigaction action = {};
  action.sa_handler = OnStopSignal;
  action.sa_flags = SA_RESTART;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

// Blocks until SIGINT or SIGTERM comes and returns it, or until `stop()`
// turns true and returns 0.
int WaitForSignal(const std::function<bool()>& stop) {
  g_serving = true;
  while (!stop()) {
    if (const int sig = g_signal.load()) return sig;
    absl::SleepFor(absl::Milliseconds(100));
  }
  return g_signal.load();
}

// The line an orderly stop logs: "server 1: every worker finished;
// shutting down", or "server 1: shutting down (SIGTERM)" on a signal; then,
// if any, the calls refused for a missing or wrong token or identity.
void LogShutdown(const std::string& who, int sig, int64_t refused) {
  if (sig == 0) {
    std::cout << who << ": every worker finished; shutting down" << std::endl;
  } else {
    std::cout << who << ": shutting down (" << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ")"
              << std::endl;
  }
  if (refused > 0) {
    std::cout << who << ": refused " << refused
              << " call(s) without the job's token or the caller's identity" << std::endl;
  }
}

// The exit code of a node stopped by signal `sig` before its job finished:
// 128 + the signal, as a shell reports a process killed by it. Such a stop
// is no success: with exit 0, Kubernetes marked a coordinator pod deleted
// or drained mid-job Succeeded, its Job Complete, and never replaced it.
int StopExitCode(int sig) { return 128 + sig; }

// The metrics endpoint of a node bound at `bind` (host:port), on the same
// host, when --metrics_port or MX_METRICS_PORT asks for one; nullptr when
// not. Exits on a bad setting or a port that cannot be had.
std::unique_ptr<metrics::HttpServer> ServeMetrics(const std::string& bind, const std::string& who) {
  const int port = OrExit(metrics::MetricsPort(absl::GetFlag(FLAGS_metrics_port)));
  absl::StatusOr<std::unique_ptr<metrics::HttpServer>> server =
      metrics::ServeMetrics(bind.substr(0, bind.rfind(':')), port, who);
  if (!server.ok()) {
    std::cerr << "mx_server: " << server.status().message() << "\n";
    std::exit(1);
  }
  return *std::move(server);
}

// Starts recording this process's timeline when --trace or MX_TRACE_DIR
// names a directory (ndarray/trace.h); Finish writes it.
struct Timeline {
  explicit Timeline(const std::string& role) {
    if (absl::Status s = trace::StartIn(absl::GetFlag(FLAGS_trace), role); !s.ok()) {
      std::cerr << "mx_server: " << s.message() << "\n";
      std::exit(2);
    }
  }
  ~Timeline() {
    if (absl::Status s = trace::Write(); !s.ok()) std::cerr << "mx_server: " << s.message() << "\n";
  }
};

int NumServers() {
  return IntSetting("num_servers", absl::GetFlag(FLAGS_num_servers), "DMLC_NUM_SERVER", 1, 1 << 16);
}
int NumWorkers() {
  return IntSetting("num_workers", absl::GetFlag(FLAGS_num_workers), "DMLC_NUM_WORKER", 1, 1 << 20);
}

// How long a node goes on without an answer from the coordinator.
int CoordinatorTimeoutSeconds() {
  return IntSetting("coordinator_timeout_s", absl::GetFlag(FLAGS_coordinator_timeout_s),
                    "MX_COORDINATOR_TIMEOUT_S", 2, 86400,
                    absl::ToInt64Seconds(rpc::CoordinatorClient::kLostAfter));
}

int RunCoordinator() {
  Timeline timeline("coordinator");
  const std::string bind =
      OrExit(AddressSetting("bind", absl::GetFlag(FLAGS_bind), /*root=*/true, 0));
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
  o.num_servers = NumServers();
  o.num_workers = NumWorkers();
  o.heartbeat_timeout = absl::Seconds(timeout_s);
  o.startup_timeout = absl::Seconds(IntSetting(
      "startup_timeout_s", absl::GetFlag(FLAGS_startup_timeout_s), "MX_STARTUP_TIMEOUT_S", 1, 86400,
      rpc::kDefaultStartupTimeoutSeconds));
  o.elastic = absl::GetFlag(FLAGS_elastic);
  o.security = SecuritySettings();
  std::unique_ptr<metrics::HttpServer> metrics = ServeMetrics(bind, "coordinator");
  auto c = CoordinatorServer::Start(bind, o);
  if (!c.ok()) {
    std::cerr << "mx_server: " << c.status().message() << "\n";
    return 1;
  }
  metrics::SetNodeInfo("coordinator", -1);
  if (metrics != nullptr) metrics->SetServing(true);
  // Sweeps run every 100 ms and hold the coordinator's lock briefly; one
  // that has not ended in kStuckAfter is stuck (Kubernetes' liveness probe
  // restarts the pod, and the nodes rejoin the new coordinator).
  auto unwatch = WatchLiveness(
      metrics.get(), [c = c->get()] { return c->SinceLastSweep(); }, "the coordinator's sweep");
  std::cout << "coordinator listening on " << (*c)->address()
            << (o.elastic ? " (elastic)" : "") << std::endl;
  const int sig = WaitForSignal([&c] { return (*c)->finished(); });
  if (const std::string failure = (*c)->failure(); sig == 0 && !failure.empty()) {
    std::cerr << "mx_server: coordinator: " << failure << "; stopping" << std::endl;
    return 1;
  }
  LogShutdown("coordinator", sig, (*c)->refused());
  return (*c)->finished() && (*c)->failure().empty() ? 0 : StopExitCode(sig);
}

// The address other nodes use to reach a server bound at `bound`.
std::string Advertised(const std::string& advertise, const std::string& bound) {
  const std::string bound_port = bound.substr(bound.rfind(':') + 1);
  if (advertise.empty()) {
    if (bound.rfind("0.0.0.0:", 0) == 0) return "127.0.0.1:" + bound_port;
    return bound;
  }
  const HostPort hp = SplitHostPort(advertise);
  return hp.host + ":" + hp.port.value_or(bound_port);  // a host alone takes the bound port
}

// The exit code of a server the coordinator declared dead (stopped or cut
// off long enough for the job to go on without it): its keys are served
// elsewhere, and a new server of its rank would join as a spare and give
// them two copies again, so a Kubernetes Job replaces it (k8s_job.py), as
// one stopped from outside, where 1 (the job failed) is final.
constexpr int kExitDeclaredDead = 3;

// Heartbeats until the coordinator says every worker finished (returns
// true), the coordinator says the job failed or is lost (closes the shard,
// prints why, returns false), or a signal (returns false; *sig is set).
// *declared_dead: the coordinator declared this server dead.
bool ServeUntilDone(rpc::CoordinatorClient& coordinator, ParameterServer& ps, int* sig,
                    bool* declared_dead) {
  const int rank = coordinator.cluster().self().rank();
  std::atomic<bool> finished{false}, lost{false};
  // Servers' deaths handled and incarnations known, by rank (heartbeat
  // thread only): news of an earlier incarnation is old news.
  std::set<std::pair<int, int>> dead_servers;
  std::map<int, int> incarnation;
  for (const proto::NodeInfo& server : coordinator.cluster().servers()) {
    incarnation[server.rank()] = server.incarnation();
  }
  coordinator.StartHeartbeats(
      [&](const proto::HeartbeatResponse& hr) {
        for (const proto::NodeInfo& dead : hr.dead()) {
          if (dead.role() == proto::WORKER) ps.WorkerDied(dead.rank());
          if (dead.role() != proto::SERVER || dead.incarnation() < incarnation[dead.rank()] ||
              !dead_servers.insert({dead.rank(), dead.incarnation()}).second) {
            continue;
          }
          if (dead.rank() == rank) {
            // Stopped or cut off long enough for the others to go on
            // without it: its keys are served elsewhere now.
            std::cerr << "mx_server: server " << rank
                      << ": the coordinator declared this server dead; stopping\n";
            ps.shard().Close(absl::StrCat("server ", rank, " was declared dead"));
            *declared_dead = true;
            lost = true;
            continue;
          }
          const int taken = ps.ServerDied(dead.rank());
          std::cout << "server " << rank << ": server " << dead.rank() << " was declared dead"
                    << (taken > 0 ? absl::StrCat("; took over its ", taken, " key(s)") : "")
                    << std::endl;
        }
        for (int i = 0; i < hr.replacements_size(); ++i) {
          const proto::NodeInfo& r = hr.replacements(i);
          if (r.rank() == rank || r.incarnation() <= incarnation[r.rank()]) continue;
          incarnation[r.rank()] = r.incarnation();
          const std::string key = i < hr.replacement_keys_size() ? hr.replacement_keys(i) : "";
          const int restored = ps.ServerReplaced(r.rank(), r.address(), r.stream_address(), key);
          std::cout << "server " << rank << ": server " << r.rank() << " is back at "
                    << r.address() << " (a spare)"
                    << (restored > 0 ? absl::StrCat("; sending it copies of ", restored, " key(s)")
                                     : "")
                    << std::endl;
        }
        for (int worker : hr.finished_workers()) ps.WorkerLeft(worker);
        if (!hr.failure().empty() && !lost.exchange(true)) {
          std::cerr << "mx_server: server " << rank << ": " << hr.failure() << "; stopping\n";
          ps.shard().Close(absl::StrCat("server ", rank, " stopped: ", hr.failure()));
        } else if (hr.shutdown()) {
          finished = true;
        }
      },
      [&](const absl::Status& why) {
        std::cerr << "mx_server: server " << rank << ": " << why.message() << "; stopping\n";
        ps.shard().Close(absl::StrCat("server ", rank, " stopped: ", why.message()));
        lost = true;
      });
  *sig = WaitForSignal([&] { return finished.load() || lost.load(); });
  coordinator.StopHeartbeats();
  return finished.load() && *sig == 0;
}

// A spare's wait: heartbeats until the coordinator assigns it a dead
// server's rank (returns the assignment), or the job ends (nullopt,
// *finished set, "every worker finished" logged), fails or is lost
// (nullopt, the error printed), or a signal comes (nullopt; *sig set).
std::optional<proto::RegisterResponse> AwaitAssignment(rpc::CoordinatorClient& coordinator,
                                                       int* sig, bool* finished) {
  absl::Mutex mu;
  std::optional<proto::RegisterResponse> assignment;
  std::atomic<bool> done{false};
  coordinator.StartHeartbeats(
      [&](const proto::HeartbeatResponse& hr) {
        if (hr.has_assignment()) {
          absl::MutexLock lock(&mu);
          assignment = hr.assignment();
          done = true;
        } else if (!hr.failure().empty()) {
          std::cerr << "mx_server: spare server: " << hr.failure() << "; stopping\n";
          done = true;
        } else if (hr.shutdown()) {
          std::cout << "spare server: every worker finished; shutting down" << std::endl;
          *finished = true;
          done = true;
        }
      },
      [&](const absl::Status& why) {
        std::cerr << "mx_server: spare server: " << why.message() << "; stopping\n";
        done = true;
      });
  *sig = WaitForSignal([&] { return done.load(); });
  coordinator.StopHeartbeats();
  absl::MutexLock lock(&mu);
  if (*sig != 0) return std::nullopt;
  return assignment;
}

int RunServer() {
  Timeline timeline("server");
  const std::string coordinator =
      OrExit(AddressSetting("coordinator", absl::GetFlag(FLAGS_coordinator), /*root=*/true, 1));
  if (coordinator.empty()) {
    std::cerr << "mx_server: a server needs --coordinator (or DMLC_PS_ROOT_URI/PORT)\n";
    return 2;
  }
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode != "sync" && mode != "async") {
    std::cerr << "mx_server: --mode must be sync or async, not '" << mode << "'\n";
    return 2;
  }
  const int workers = NumWorkers();
  const int startup_timeout = IntSetting("startup_timeout_s", absl::GetFlag(FLAGS_startup_timeout_s),
                                         "MX_STARTUP_TIMEOUT_S", 1, 86400,
                                         rpc::kDefaultStartupTimeoutSeconds);
  const std::optional<int64_t> requested_rank = OrExit(
      FlagOrEnvInt("rank", absl::GetFlag(FLAGS_rank), "MX_RANK", 0, 1 << 20));
  const std::string advertise = absl::GetFlag(FLAGS_advertise);
  if (!advertise.empty() && !DialableAddress(advertise)) {
    std::cerr << "mx_server: --advertise '" << advertise
              << "' is not a host or host:port that other nodes could reach\n";
    return 2;
  }
  const std::string bind =
      OrExit(AddressSetting("bind", absl::GetFlag(FLAGS_bind), /*root=*/false, 0, "0.0.0.0:0"));
  ParameterServerOptions server_options;
  server_options.max_message_mb = absl::GetFlag(FLAGS_max_message_mb);
  if (const int mb = server_options.max_message_mb; mb < 1 || mb > (kMaxMessageBytes >> 20)) {
    std::cerr << "mx_server: --max_message_mb=" << mb << ": must be from 1 to "
              << (kMaxMessageBytes >> 20) << "\n";
    return 2;
  }
  server_options.security = SecuritySettings();
  server_options.identities = true;
  server_options.shm_dir = absl::GetFlag(FLAGS_shm_dir);
  if (server_options.shm_dir.empty()) server_options.shm_dir = EnvString("MX_SHM_DIR");
  server_options.stream_port =
      IntSetting("stream_port", absl::GetFlag(FLAGS_stream_port), "MX_STREAM_PORT", -1, 65535, 0);
  std::unique_ptr<metrics::HttpServer> metrics = ServeMetrics(bind, "server");
  const int replicas = IntSetting("replicas", absl::GetFlag(FLAGS_replicas), "MX_REPLICAS", 1, 2, 1);
  const int staleness =
      IntSetting("staleness", absl::GetFlag(FLAGS_staleness), "MX_STALENESS", 0, 1000, 0);
  if (staleness > 0 && mode != "sync") {
    std::cerr << "mx_server: --staleness applies to --mode=sync (dist_sync), not async\n";
    return 2;
  }
  ShardOptions shard_options;
  shard_options.sync = mode == "sync";
  shard_options.num_workers = workers;
  shard_options.elastic = absl::GetFlag(FLAGS_elastic);
  shard_options.staleness = staleness;
  auto ps = ParameterServer::Start(bind, shard_options, server_options);
  if (!ps.ok()) {
    std::cerr << "mx_server: " << ps.status().message() << "\n";
    return 1;
  }
  // A thread of the server takes the shard's lock every 100 ms: a shard
  // stuck on it fails /livez, and Kubernetes restarts the pod (the
  // coordinator then sees the server die; with replicas 2 its keys fail
  // over). Its heartbeats, which never take that lock, would not show it.
  auto unwatch = WatchLiveness(
      metrics.get(), [ps = ps->get()] { return ps->SinceShardChecked(); },
      "the server's shard check");
  bool spare = absl::GetFlag(FLAGS_spare);
  if (spare && replicas < 2) {
    std::cerr << "mx_server: --spare needs --replicas=2 (a spare restores the second copies)\n";
    return 2;
  }
  proto::RegisterRequest req;
  req.set_role(proto::SERVER);
  req.set_address(Advertised(advertise, (*ps)->address()));
  if (const std::string& streams = (*ps)->stream_address(); !streams.empty()) {
    // The host others reach this server at, with the stream port.
    req.set_stream_address(absl::StrCat(req.address().substr(0, req.address().rfind(':')), ":",
                                        streams.substr(streams.rfind(':') + 1)));
  }
  if (requested_rank.has_value() && !spare) req.set_rank(static_cast<int>(*requested_rank));
  req.set_spare(spare);
  rpc::CoordinatorClient::Options co;
  co.address = coordinator;
  co.security = server_options.security;
  co.startup_timeout = absl::Seconds(startup_timeout);
  // Two heartbeats longer than workers wait: a worker that loses the
  // coordinator then says so itself, rather than first meeting a server that
  // has already left (seen: a worker named the server instead).
  co.lost_after = absl::Seconds(CoordinatorTimeoutSeconds() + 2);
  auto client = rpc::CoordinatorClient::Register(co, req);
  // With replicas, a server whose rank is taken (the replacement pod of one
  // that was stopped: Kubernetes replaces it, deploy/k8s_job.py) joins as a
  // spare: it takes the dead one's rank, and restores its keys' second
  // copies, once the coordinator has declared it dead. Its pod then ends
  // as a spare's does, with exit 0 when the job finishes, where a refusal
  // failed the server Job (and perhaps the JobSet) after the job finished.
  if (!client.ok() && absl::IsAlreadyExists(client.status()) && replicas > 1 && !spare) {
    std::cout << "mx_server: " << client.status().message() << "; joining as a spare"
              << std::endl;
    spare = true;
    req.clear_rank();
    req.set_spare(true);
    client = rpc::CoordinatorClient::Register(co, req);
  }
  if (!client.ok()) {
    std::cerr << "mx_server: " << client.status().message() << "\n";
    return 1;
  }
  if (spare) {
    // Ready as a spare (a Kubernetes start-up order waits for readiness).
    if (metrics != nullptr) metrics->SetServing(true);
    std::cout << "spare server waiting on " << req.address()
              << " to take the rank of a server that dies" << std::endl;
    int sig = 0;
    bool finished = false;
    std::optional<proto::RegisterResponse> assignment = AwaitAssignment(**client, &sig, &finished);
    if (!assignment.has_value()) {
      if (sig != 0) LogShutdown("spare server", sig, (*ps)->refused());
      return finished ? 0 : sig != 0 ? StopExitCode(sig) : 1;
    }
    (*client)->Reassign(*assignment);
  }
  const proto::RegisterResponse& cluster = (*client)->cluster();
  const int rank = cluster.self().rank();
  (*ps)->SetRank(rank);
  if (replicas > 1) {
    if (cluster.servers_size() < 2) {
      std::cerr << "mx_server: --replicas=2 needs at least 2 servers, the job has "
                << cluster.servers_size() << "\n";
      return 2;
    }
    (*ps)->AdmitServers({cluster.server_keys().begin(), cluster.server_keys().end()});
    ReplicationOptions ro;
    ro.rank = rank;
    for (const proto::NodeInfo& server : cluster.servers()) {
      ro.servers.push_back(server.address());
      ro.stream_servers.push_back(server.stream_address());
    }
    ro.security = server_options.security;
    ro.claims = (*client)->caller().claims();
    ro.unreachable = [c = client->get()](int server) { c->ReportUnreachable(server); };
    (*ps)->StartReplication(std::move(ro));
  }
  (*ps)->AdmitWorkers({cluster.worker_keys().begin(), cluster.worker_keys().end()});
  metrics::SetNodeInfo("server", rank);
  trace::SetProcessName(absl::StrCat("server ", rank));
  if (metrics != nullptr) metrics->SetServing(true);  // as the health service now
  std::cout << "server " << rank << " serving on " << req.address()
            << (absl::GetFlag(FLAGS_elastic) ? " (elastic)" : "")
            << (replicas > 1 ? " (replicas 2)" : "")
            << (staleness > 0 ? absl::StrCat(" (staleness ", staleness, ")") : "")
            << (spare ? absl::StrCat(" (a spare, incarnation ", cluster.self().incarnation(), ")")
                      : "")
            << std::endl;
  int sig = 0;
  bool declared_dead = false;
  const bool finished = ServeUntilDone(**client, **ps, &sig, &declared_dead);
  if (sig != 0 || finished) LogShutdown(absl::StrCat("server ", rank), sig, (*ps)->refused());
  // The server goes before the client, which was made after it: its
  // replicator reports unreachable servers through the client until it
  // stops (a replication call failing during the shutdown did so on a
  // freed client). /livez's watch, which reads the server, goes first.
  std::move(unwatch).Invoke();
  ps->reset();
  if (finished) return 0;
  if (sig != 0) return StopExitCode(sig);
  return declared_dead ? kExitDeclaredDead : 1;
}

}  // namespace
}  // namespace mx

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("runs a coordinator or a parameter server of an mx job");
  mx::ParseFlags(argc, argv);
  // A crash prints its signal and stack (with symbols) before the process dies.
  absl::InitializeSymbolizer(argv[0]);
  absl::InstallFailureSignalHandler(absl::FailureSignalHandlerOptions());
  mx::InstallStopHandlers();  // a stop, not a failure
  // absl's mutex deadlock detection (on in Debian's build) costs a graph
  // update per lock in gRPC's and the shard's hot paths.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  // A server's array operations (optimizer updates, copies) run under its
  // shard's lock, one at a time: inline, they save two thread switches per
  // update (unless MX_ENGINE_TYPE says otherwise).
  setenv("MX_ENGINE_TYPE", "NaiveEngine", /*overwrite=*/0);
  std::string role = absl::GetFlag(FLAGS_role);
  if (role.empty()) role = mx::EnvString("DMLC_ROLE");
  if (role == "coordinator" || role == "scheduler") return mx::RunCoordinator();
  if (role == "server") return mx::RunServer();
  std::cerr << "mx_server: --role must be coordinator or server (got '" << role << "')\n";
  return 2;
}
