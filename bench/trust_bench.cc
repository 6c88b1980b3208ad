// What trust and visibility cost the distributed store, each measured in
// turns against the same without it (1 server and 1 worker on 127.0.0.1,
// in this process, dist_sync):
// - mutual TLS against plaintext: pushpull of 16 MiB values (target: at
//   least 0.7 of plaintext's throughput), the CPU time per byte of both,
//   and small round trips;
// - the job token and node identities checked on every call against
//   neither: the time they add to a small pushpull (target: under 5 us);
// - per-call RPC metrics on against off: an MLP training step's
//   communication (target: at least 0.97 of off's speed);
// - the timeline's event sites with tracing off: their cost per step of
//   that communication (target: under 0.1% of the step).
//
// Usage: trust_bench [SUBSTRING]: only the figures whose names contain it.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kvstore/dist_kvstore.h"
#include "ndarray/trace.h"
#include "rpc/metrics.h"
#include "rpc/security.h"
#include "server/kvstore_service.h"

namespace mx::bench {
namespace {

std::string only;
bool Wanted(const std::string& name) { return name.find(only) != std::string::npos; }

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A CA and one certificate it signed for the name mx-job, made with
// openssl in a temporary directory (removed at once): a job's TLS as
// deploy/job_secrets.py makes it.
rpc::Security MakeTls() {
  char dir[] = "/tmp/mx-trust-bench-XXXXXX";
  if (mkdtemp(dir) == nullptr) throw std::runtime_error("mkdtemp failed");
  const std::string d = dir;
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string cmd =
      "cd " + d + " && openssl req -x509 " + ec + " -keyout ca.key -out ca.pem -days 1 -subj /CN=ca" +
      " && openssl req " + ec + " -keyout n.key -out n.csr -subj /CN=n" +
      " && printf 'subjectAltName=DNS:mx-job\\nextendedKeyUsage=serverAuth,clientAuth\\n' > n.ext" +
      " && openssl x509 -req -in n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out n.pem" +
      " -days 1 -extfile n.ext) >/dev/null 2>&1";
  if (std::system(("(" + cmd).c_str()) != 0) {
    std::filesystem::remove_all(d);
    throw std::runtime_error("openssl failed (apt-get install openssl)");
  }
  rpc::Security s;
  s.tls_cert = ReadFile(d + "/n.pem");
  s.tls_key = ReadFile(d + "/n.key");
  s.tls_ca = ReadFile(d + "/ca.pem");
  s.tls_server_name = "mx-job";
  std::filesystem::remove_all(d);
  return s;
}

// One server and one worker with `security`; with `identities`, the
// server checks the worker's session key on every call.
struct Pair {
  std::unique_ptr<ParameterServer> server;
  std::unique_ptr<KVStore> worker;

  Pair(const rpc::Security& security, bool identities) {
    ParameterServerOptions so;
    so.security = security;
    so.identities = identities;
    so.stream_port = 0;  // as mx_server: pushes and pulls on stream connections
    auto s = ParameterServer::Start("127.0.0.1:0", {true, 1, false}, so);
    ThrowIfError(s.status());
    server = *std::move(s);
    DistKVStoreOptions o;
    o.servers = {server->address()};  // TLS: checked for tls_server_name
    o.stream_addresses = {server->stream_address()};
    o.num_workers = 1;
    o.security = security;
    if (identities) {
      o.session_key = rpc::NewSessionKey();
      server->AdmitWorkers({o.session_key});
    }
    auto kv = CreateDistKVStore(o);
    ThrowIfError(kv.status());
    worker = *std::move(kv);
  }
};

// One pushpull of each of `values` (keys from `first_key`), waited for.
void PushPullAll(KVStore& kv, int first_key, const std::vector<NDArray>& values,
                 const std::vector<NDArray>& outs) {
  for (size_t k = 0; k < values.size(); ++k) {
    ThrowIfError(kv.PushPull(first_key + static_cast<int>(k), {values[k]}, {outs[k]}));
  }
  for (const NDArray& o : outs) o.WaitToRead();
}

void InitKeys(KVStore& kv, int first_key, const std::vector<NDArray>& values) {
  for (size_t k = 0; k < values.size(); ++k) {
    ThrowIfError(kv.Init(first_key + static_cast<int>(k), Zeros(values[k].shape())));
  }
}

// TLS against plaintext: 16 MiB pushpull throughput and a small round trip.
void Tls() {
  if (!Wanted("dist_tls")) return;
  rpc::Security tls = MakeTls();
  tls.token = "bench-token";
  rpc::Security plain;
  plain.token = "bench-token";
  Pair with(tls, true), without(plain, true);
  for (int64_t bytes : {int64_t{16} << 20, int64_t{64}}) {
    const int64_t n = bytes / 4;
    std::vector<NDArray> values = {RandomUniform(0, 1, {n})}, outs = {Empty({n})};
    const int key = bytes > 1024 ? 0 : 1;
    InitKeys(*with.worker, key, values);
    InitKeys(*without.worker, key, values);
    // Turns long enough that a scheduling hiccup moves no median: large,
    // 2 pushpulls (tens of ms); small, 50 round trips.
    const int reps = bytes > 1024 ? 31 : 40;
    const int per_turn = bytes > 1024 ? 2 : 50;
    auto turn = [&](Pair& p) {
      return [&] {
        for (int i = 0; i < per_turn; ++i) PushPullAll(*p.worker, key, values, outs);
      };
    };
    std::vector<double> cpu;
    const std::vector<double> t = MedianTurns(reps, {turn(with), turn(without)}, &cpu);
    if (bytes > 1024) {
      const double moved = 2.0 * bytes * per_turn;
      Report("dist_tls_pushpull_16MiB_1server_1worker", moved / t[0] / 1e9, "GB/s",
             moved / t[1] / 1e9, t[1] / t[0], ">=0.7");
      // What bounds the figure above where both ends share few cores: the
      // CPU each byte costs (this process, both ends), TLS against
      // plaintext.
      Report("dist_tls_pushpull_16MiB_cpu_per_byte", cpu[0] / moved * 1e9, "ns/B",
             cpu[1] / moved * 1e9, cpu[1] / cpu[0], "info");
    } else {
      Report("dist_tls_small_rtt_1server_1worker", t[0] / per_turn * 1e6, "us",
             t[1] / per_turn * 1e6, t[1] / t[0], "info");
    }
  }
}

// The token and identity checks: a small pushpull's round trip with a
// token and identities against one with neither. Value: the microseconds
// they add per call (the server checks both on every call).
void Token() {
  if (!Wanted("dist_token")) return;
  rpc::Security token;
  token.token = "bench-token-0123456789abcdef0123456789abcdef";
  Pair with(token, true), without(rpc::Security{}, false);
  std::vector<NDArray> values = {Ones({16})}, outs = {Empty({16})};
  InitKeys(*with.worker, 0, values);
  InitKeys(*without.worker, 0, values);
  // Call by call in turns (with, without, with, ...): the machine's drift
  // falls on both alike. The medians of the single round trips.
  constexpr int kCalls = 8000;
  std::vector<double> with_t, without_t;
  for (int i = 0; i < kCalls; ++i) {
    for (Pair* p : {&with, &without}) {
      const double s = NowSeconds();
      PushPullAll(*p->worker, 0, values, outs);
      (p == &with ? with_t : without_t).push_back(NowSeconds() - s);
    }
  }
  auto median = [](std::vector<double>& v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double with_us = median(with_t) * 1e6, without_us = median(without_t) * 1e6;
  Report("dist_token_identity_cost_us", with_us - without_us, "us", without_us,
         without_us / with_us, "<5us");
}

// The MLP 784-128-64-10's gradients, last layer first, and arrays for its
// weights.
void MlpStep(std::vector<NDArray>* values, std::vector<NDArray>* outs) {
  for (int64_t n : {10, 64 * 10, 64, 128 * 64, 128, 784 * 128}) {
    values->push_back(Ones({n}));
    outs->push_back(Empty({n}));
  }
}

// Per-call metrics on against off, for the MLP 784-128-64-10's step
// communication (6 keys, last layer first, one pushpull each).
void Metrics() {
  if (!Wanted("dist_metrics")) return;
  rpc::Security plain;
  plain.token = "bench-token";
  Pair p(plain, true);
  std::vector<NDArray> values, outs;
  MlpStep(&values, &outs);
  InitKeys(*p.worker, 0, values);
  constexpr int kPerTurn = 20;
  auto steps = [&](bool on) {
    return [&, on] {
      metrics::SetEnabled(on);
      for (int i = 0; i < kPerTurn; ++i) PushPullAll(*p.worker, 0, values, outs);
    };
  };
  const std::vector<double> t = MedianTurns(41, {steps(true), steps(false)});
  metrics::SetEnabled(false);
  Report("dist_metrics_on_mlp_step_comm_1server_1worker", t[0] / kPerTurn * 1e6, "us",
         t[1] / kPerTurn * 1e6, t[1] / t[0], ">=0.97");
}

// Tracing off: what the timeline's event sites cost a training step's
// communication when nobody traces. Each site then costs one relaxed
// load; the figure is that cost, measured here per site, times the sites
// one step passes (counted with tracing on), against the step's time.
void TraceOff() {
  if (!Wanted("trace_off")) return;
  rpc::Security plain;
  Pair p(plain, false);
  std::vector<NDArray> values, outs;
  MlpStep(&values, &outs);
  InitKeys(*p.worker, 100, values);
  constexpr int kSteps = 50;
  // The sites a step passes: the events it records with tracing on (each
  // checked Enabled() at most twice).
  trace::Start("/dev/null");
  const size_t before = trace::EventCount();
  for (int i = 0; i < kSteps; ++i) PushPullAll(*p.worker, 100, values, outs);
  const double sites = 2.0 * (trace::EventCount() - before) / kSteps;
  trace::Stop();
  const double step = MedianSeconds(31, [&] {
    for (int i = 0; i < kSteps; ++i) PushPullAll(*p.worker, 100, values, outs);
  }) / kSteps;
  constexpr int kChecks = 100000000;
  int64_t hits = 0;
  const double check = MedianSeconds(5, [&] {
    for (int i = 0; i < kChecks; ++i) {
      if (trace::Enabled()) ++hits;
      asm volatile("" : "+r"(hits));  // kept: one load per iteration
    }
  }) / kChecks;
  const double cost = sites * check;
  Report("trace_off_cost_mlp_step_comm_1server_1worker", cost * 1e9, "ns", step * 1e9,
         step / (step + cost), ">=0.999");
}

}  // namespace
}  // namespace mx::bench

int main(int argc, char** argv) {
  if (argc > 1) mx::bench::only = argv[1];
  mx::bench::Tls();
  mx::bench::Token();
  mx::bench::Metrics();
  mx::bench::TraceOff();
  return mx::bench::ExitCode("trust_bench", mx::bench::only);
}
