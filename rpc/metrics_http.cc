#include "rpc/metrics_http.h"

#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ndarray/env.h"

namespace mx {
namespace metrics {

namespace {

// A dual-stack socket listening on [::]:port, or -1 with errno set (no
// IPv6 on the system, say): 0.0.0.0 (every address) then takes IPv6 too,
// as gRPC's wildcard ports do, for pods on IPv6 or dual-stack clusters.
int ListenDualStack(const std::string& port) {
  int p;
  if (!absl::SimpleAtoi(port, &p) || p < 0 || p > 65535) {
    errno = EINVAL;
    return -1;
  }
  const int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  const int one = 1, zero = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_any;
  a.sin6_port = htons(static_cast<uint16_t>(p));
  if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) != 0 ||
      bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(fd, 64) != 0) {
    const int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

// A socket listening on host:port (port 0: a free one), or an error that
// says why. Made here rather than by libmicrohttpd so that the error is
// the system's ("Address already in use").
absl::StatusOr<int> ListenOn(const std::string& host, const std::string& port) {
  if (host == "0.0.0.0") {
    if (const int fd = ListenDualStack(port); fd >= 0) return fd;
    // Taken on IPv6 (another process's [::]:port): not IPv4 alone, which
    // left IPv6 probes and scrapes to that process.
    if (errno == EADDRINUSE) return absl::UnavailableError(std::strerror(EADDRINUSE));
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int gai = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found);
  if (gai != 0) return absl::InvalidArgumentError(gai_strerror(gai));
  const int fd = socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  std::string error;
  if (fd < 0) {
    error = std::strerror(errno);
  } else {
    const int one = 1;  // a restarted node gets its port back at once
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, found->ai_addr, found->ai_addrlen) != 0 || listen(fd, 64) != 0) {
      error = std::strerror(errno);
      close(fd);
    }
  }
  freeaddrinfo(found);
  if (!error.empty()) return absl::UnavailableError(error);
  return fd;
}

int PortOf(int fd) {
  sockaddr_storage a{};
  socklen_t n = sizeof(a);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n) != 0) return 0;
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

// libmicrohttpd's request callback: `self` is the HttpServer.
MHD_Result Handle(void* self, MHD_Connection* conn, const char* url, const char* method,
                  const char*, const char*, size_t*, void**) {
  // A request with a body says so in its headers (the first call sees none
  // of the body yet, whatever its size).
  const char* length = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
  const bool has_body =
      (length != nullptr && std::string(length) != "0") ||
      MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Transfer-Encoding") != nullptr;
  const HttpServer::Response a = static_cast<const HttpServer*>(self)->Answer(
      url != nullptr ? url : "", method != nullptr ? method : "", has_body);
  MHD_Response* r = MHD_create_response_from_buffer(
      a.body.size(), const_cast<char*>(a.body.data()), MHD_RESPMEM_MUST_COPY);
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, a.type);
  if (a.code == MHD_HTTP_METHOD_NOT_ALLOWED) MHD_add_response_header(r, "Allow", "GET, HEAD");
  const MHD_Result result = MHD_queue_response(conn, a.code, r);
  MHD_destroy_response(r);
  return result;
}

// A connection's whole life, its request and our answer: a peer that
// sends its request a line at a time (within the idle timeout each) held
// a slot for ever, and 16 addresses with 8 such connections each took
// every slot: the kubelet's probes failed and it restarted the pod.
constexpr absl::Duration kRequestTime = absl::Seconds(2);

}  // namespace

void HttpServer::Loop() {
  while (!stop_.load()) {
    MHD_run_wait(daemon_, 100);
    const absl::Time now = absl::Now();
    for (const auto& [conn, started] : started_) {
      if (now - started < kRequestTime) continue;
      // The daemon closes it at its next run; it runs on this thread only,
      // so the socket is still its own.
      const MHD_ConnectionInfo* info =
          MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
      if (info != nullptr) shutdown(info->connect_fd, SHUT_RDWR);
    }
  }
}

HttpServer::Response HttpServer::Answer(const std::string& path, const std::string& method,
                                        bool has_body) const {
  if (path != "/metrics" && path != "/healthz" && path != "/livez") {
    return {MHD_HTTP_NOT_FOUND, "text/plain", "mx serves /metrics, /healthz and /livez\n"};
  }
  // HEAD as GET (the daemon sends no body): uptime checkers use it.
  if ((method != MHD_HTTP_METHOD_GET && method != MHD_HTTP_METHOD_HEAD) || has_body) {
    return {MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", "only GET and HEAD, without a body\n"};
  }
  if (path == "/metrics") {
    return {MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", registry_->Text()};
  }
  if (path == "/livez") return Liveness();
  if (serving_.load()) return {MHD_HTTP_OK, "text/plain", "ok\n"};
  return {MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", "not serving\n"};
}

void HttpServer::SetLiveness(std::function<absl::Duration()> since_progress, absl::Duration limit,
                             std::string what) {
  absl::MutexLock lock(&liveness_mu_);
  since_progress_ = std::move(since_progress);
  liveness_limit_ = limit;
  liveness_what_ = std::move(what);
}

HttpServer::Response HttpServer::Liveness() const {
  absl::MutexLock lock(&liveness_mu_);
  if (since_progress_ == nullptr) return {MHD_HTTP_OK, "text/plain", "ok\n"};
  const absl::Duration since = since_progress_();
  if (since <= liveness_limit_) return {MHD_HTTP_OK, "text/plain", "ok\n"};
  return {MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain",
          absl::StrCat("stuck: ", liveness_what_, " last ran ", absl::FormatDuration(since),
                       " ago (the limit is ", absl::FormatDuration(liveness_limit_), ")\n")};
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& bind_address,
                                                              Registry* registry) {
  const size_t colon = bind_address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: '", bind_address, "' is not host:port"));
  }
  std::string host = bind_address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  absl::StatusOr<int> fd = ListenOn(host, bind_address.substr(colon + 1));
  if (!fd.ok()) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", bind_address, ": ", fd.status().message()));
  }
  std::unique_ptr<HttpServer> server(new HttpServer(registry));
  server->port_ = PortOf(*fd);
  // One thread (Loop) answers every request (a scrape every few seconds)
  // and ends every connection after kRequestTime. At most kPerAddress
  // connections per client address: 32 idle ones from anywhere took every
  // slot, and the kubelet's probes failed until it restarted the pod.
  constexpr unsigned kConnections = 128, kPerAddress = 4;
  auto notify = +[](void* self, MHD_Connection* conn, void**, MHD_ConnectionNotificationCode code) {
    auto& started = static_cast<HttpServer*>(self)->started_;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
      started[conn] = absl::Now();
    } else {
      started.erase(conn);
    }
  };
  server->daemon_ = MHD_start_daemon(
      MHD_USE_AUTO, 0, nullptr, nullptr, &Handle, server.get(), MHD_OPTION_LISTEN_SOCKET, *fd,
      MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_CONNECTION_LIMIT, kConnections,
      MHD_OPTION_PER_IP_CONNECTION_LIMIT, kPerAddress, MHD_OPTION_NOTIFY_CONNECTION, notify,
      server.get(), MHD_OPTION_END);
  if (server->daemon_ == nullptr) {
    close(*fd);
    return absl::InternalError(absl::StrCat("metrics: cannot serve on ", bind_address));
  }
  server->thread_ = std::thread([s = server.get()] { s->Loop(); });
  return server;
}

HttpServer::~HttpServer() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  if (daemon_ != nullptr) MHD_stop_daemon(daemon_);  // closes the socket
}

absl::StatusOr<int> MetricsPort(const std::string& flag_value) {
  absl::StatusOr<std::optional<int64_t>> port =
      FlagOrEnvInt("metrics_port", flag_value, "MX_METRICS_PORT", 0, 65535);
  if (!port.ok()) return port.status();
  return port->has_value() ? static_cast<int>(**port) : -1;
}

absl::StatusOr<std::unique_ptr<HttpServer>> ServeMetrics(const std::string& host, int port,
                                                         const std::string& who) {
  if (port < 0) return std::unique_ptr<HttpServer>();
  // An IPv6 host as a URL writes it: in brackets.
  const bool bare_v6 = host.find(':') != std::string::npos && host.front() != '[';
  const std::string h = bare_v6 ? absl::StrCat("[", host, "]") : host;
  absl::StatusOr<std::unique_ptr<HttpServer>> server =
      HttpServer::Start(absl::StrCat(h, ":", port), &Registry::Global());
  if (server.ok()) {
    SetEnabled(true);
    std::cerr << who << ": metrics on http://" << h << ":" << (*server)->port() << "/metrics"
              << std::endl;
  }
  return server;
}

}  // namespace metrics
}  // namespace mx
