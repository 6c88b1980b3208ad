// Serves a metrics registry over plain HTTP through GNU libmicrohttpd
// (Debian's; civetweb 1.15 as Debian builds it ran handlers on threads
// whose stacks were too small for glibc's printf):
//   GET /metrics  the Prometheus text format;
//   GET /healthz  200 "ok" while the node says it is serving, else 503;
//   GET /livez    200 while the process answers and, when a progress
//                 probe is set (SetLiveness), the loop it watches has run
//                 within its limit; else 503 saying how long ago it ran.
// /healthz and /livez are the probes Kubernetes uses: with mutual TLS on
// the gRPC port the kubelet's gRPC probe could not present a certificate.
// Nothing here changes the job: every path only reads.
#ifndef MX_RPC_METRICS_HTTP_H_
#define MX_RPC_METRICS_HTTP_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "rpc/metrics.h"

struct MHD_Daemon;
struct MHD_Connection;

namespace mx {
namespace metrics {

class HttpServer {
 public:
  // Listens on bind_address (host:port; port 0: a free one). Errors name
  // the address (a port in use, a bad host).
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& bind_address,
                                                           Registry* registry);
  ~HttpServer();  // stops listening; requests in progress finish first

  int port() const { return port_; }
  // What /healthz answers; false until set.
  void SetServing(bool serving) { serving_.store(serving); }
  // /livez fails once since_progress() (the time since a loop of the
  // process last ran; called on the HTTP thread, so it must not block)
  // exceeds `limit`: an answer from the HTTP thread alone says nothing of
  // the rest (a coordinator deadlocked on its lock would still answer,
  // and Kubernetes would never restart it). `what` names the loop in the
  // answer.
  void SetLiveness(std::function<absl::Duration()> since_progress, absl::Duration limit,
                   std::string what);

  struct Response {
    unsigned code;
    const char* type;
    std::string body;
  };
  // The answer to `method` on `path` (what the HTTP thread sends).
  Response Answer(const std::string& path, const std::string& method, bool has_body) const;

 private:
  explicit HttpServer(Registry* registry) : registry_(registry) {}

  Response Liveness() const;

  // The HTTP thread: runs the daemon's events, and ends each connection
  // older than kRequestTime (see Start).
  void Loop();

  Registry* const registry_;
  ::MHD_Daemon* daemon_ = nullptr;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  // Open connections and when they started (HTTP thread only).
  std::map<::MHD_Connection*, absl::Time> started_;
  int port_ = 0;
  std::atomic<bool> serving_{false};
  mutable absl::Mutex liveness_mu_;
  std::function<absl::Duration()> since_progress_ ABSL_GUARDED_BY(liveness_mu_);
  absl::Duration liveness_limit_ ABSL_GUARDED_BY(liveness_mu_);
  std::string liveness_what_ ABSL_GUARDED_BY(liveness_mu_);
};

// The port of --metrics_port (`flag_value`) or, when that is empty, of
// MX_METRICS_PORT: -1 when neither is set (no endpoint), else 0-65535 (0:
// a free one). Errors name the flag or the variable and the value.
absl::StatusOr<int> MetricsPort(const std::string& flag_value);

// Starts serving the process's registry on host:port when port >= 0 and
// says where on stderr ("<who>: metrics on http://host:port/metrics");
// nullptr when port < 0. An IPv6 host may come with or without brackets.
absl::StatusOr<std::unique_ptr<HttpServer>> ServeMetrics(const std::string& host, int port,
                                                         const std::string& who);

}  // namespace metrics
}  // namespace mx

#endif  // MX_RPC_METRICS_HTTP_H_
