// The metrics registry's text format, the HTTP endpoint (/metrics,
// /healthz) and the per-call RPC metrics of a coordinator answering real
// calls.
#include "rpc/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/mx.grpc.pb.h"
#include "rpc/async.h"
#include "rpc/metrics_http.h"
#include "rpc/rpc.h"
#include "server/coordinator.h"

namespace mx {
namespace metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(Registry, WritesTheTextFormat) {
  Registry r;
  r.AddCounter("pushes_total", "Pushes\\applied", {"method", "code"})->With({"Push", "OK"})->Add(3);
  r.AddGauge("depth", "Queue depth")->With({})->Set(2.5);
  Histogram* h = r.AddHistogram("latency_seconds", "Latency", {0.001, 0.01}, {"m"})->With({"a"});
  h->Observe(0.0005);
  h->Observe(0.001);  // bounds are inclusive ("le")
  h->Observe(0.5);
  EXPECT_EQ(r.Text(),
            "# HELP depth Queue depth\n"
            "# TYPE depth gauge\n"
            "depth 2.5\n"
            "# HELP latency_seconds Latency\n"
            "# TYPE latency_seconds histogram\n"
            "latency_seconds_bucket{m=\"a\",le=\"0.001\"} 2\n"
            "latency_seconds_bucket{m=\"a\",le=\"0.01\"} 2\n"
            "latency_seconds_bucket{m=\"a\",le=\"+Inf\"} 3\n"
            "latency_seconds_sum{m=\"a\"} 0.5015\n"
            "latency_seconds_count{m=\"a\"} 3\n"
            "# HELP pushes_total Pushes\\\\applied\n"
            "# TYPE pushes_total counter\n"
            "pushes_total{method=\"Push\",code=\"OK\"} 3\n");
}

// Numbers as other Prometheus clients write them: a bucket's bound
// le="0.0005" (Prometheus matches le as text; "5e-04" missed a selector
// written for other exporters) and a whole count without an exponent.
TEST(Registry, NumbersAreWrittenAsOtherClientsWriteThem) {
  Registry r;
  r.AddCounter("bytes_total", "Bytes")->With({})->Add(1e6);
  r.AddHistogram("wait_seconds", "Wait", {1e-05, 0.0005})->With({})->Observe(1);
  const std::string text = r.Text();
  EXPECT_THAT(text, HasSubstr("bytes_total 1000000\n"));
  EXPECT_THAT(text, HasSubstr("wait_seconds_bucket{le=\"0.0005\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("wait_seconds_bucket{le=\"1e-05\"} 0\n"));  // as Go's client
}

TEST(Registry, EscapesLabelValuesAndKeepsMembers) {
  Registry r;
  Family<Counter>* f = r.AddCounter("c_total", "C", {"l"});
  f->With({"a\"b\\c\nd"})->Add();
  EXPECT_THAT(r.Text(), HasSubstr("c_total{l=\"a\\\"b\\\\c\\nd\"} 1\n"));
  // The same name and type again is the same family; members persist.
  EXPECT_EQ(r.AddCounter("c_total", "C", {"l"}), f);
  EXPECT_EQ(f->With({"a\"b\\c\nd"})->value(), 1);
}

TEST(Registry, RefreshesGaugesBeforeEachExposition) {
  Registry r;
  Gauge* g = r.AddGauge("g", "G")->With({});
  int calls = 0;
  r.OnCollect([&] { g->Set(++calls); });
  EXPECT_THAT(r.Text(), HasSubstr("g 1\n"));
  EXPECT_THAT(r.Text(), HasSubstr("g 2\n"));
}

// A connection to 127.0.0.1:port from the address `from` (IPv4).
int ConnectFrom(int port, const char* from) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in source{};
  source.sin_family = AF_INET;
  inet_pton(AF_INET, from, &source.sin_addr);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&source), sizeof(source)), 0) << from;
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0) << from;
  return fd;
}

// The whole response to `request` (raw bytes) on the connection fd, closed
// then.
std::string Exchange(int fd, const std::string& request) {
  (void)send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, n);
  close(fd);
  return out;
}

// The whole response to a GET of `path` on the connection fd, closed then.
std::string GetOn(int fd, const std::string& path) {
  return Exchange(fd, "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
}

// A GET of `path` on 127.0.0.1:port (or [::1]:port): the whole response.
std::string Get(int port, const std::string& path, bool ipv6 = false) {
  const int fd = socket(ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sockaddr_in6 a6{};
  a6.sin6_family = AF_INET6;
  a6.sin6_port = htons(port);
  a6.sin6_addr = in6addr_loopback;
  const int connected = ipv6 ? connect(fd, reinterpret_cast<sockaddr*>(&a6), sizeof(a6))
                             : connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  if (connected != 0) {
    close(fd);
    return "connect failed";
  }
  return GetOn(fd, path);
}

TEST(HttpServer, ServesMetricsAndHealth) {
  Registry r;
  r.AddCounter("mx_test_total", "T")->With({})->Add(7);
  auto s = HttpServer::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(s.ok()) << s.status();
  const int port = (*s)->port();
  ASSERT_GT(port, 0);
  const std::string m = Get(port, "/metrics");
  EXPECT_THAT(m, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(m, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(m, HasSubstr("\r\n\r\n# HELP mx_test_total T\n# TYPE mx_test_total counter\nmx_test_total 7\n"));
  EXPECT_THAT(Get(port, "/healthz"), HasSubstr("HTTP/1.1 503"));
  EXPECT_THAT(Get(port, "/livez"), HasSubstr("HTTP/1.1 200"));
  (*s)->SetServing(true);
  EXPECT_THAT(Get(port, "/healthz"), HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(Get(port, "/other"), Not(HasSubstr("HTTP/1.1 200")));
}

// Idle connections from one address cannot starve the probes of another:
// 32 held from anywhere made the kubelet's /livez fail, and the pod was
// restarted.
TEST(HttpServer, IdleConnectionsFromOneAddressLeaveRoomForOthers) {
  Registry r;
  auto s = HttpServer::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<int> idle;
  for (int i = 0; i < 40; ++i) idle.push_back(ConnectFrom((*s)->port(), "127.0.0.1"));
  absl::SleepFor(absl::Milliseconds(200));  // the server takes them in
  const absl::Time start = absl::Now();
  EXPECT_THAT(GetOn(ConnectFrom((*s)->port(), "127.0.0.2"), "/livez"), HasSubstr("HTTP/1.1 200"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2)) << "not until the idle ones timed out";
  for (int fd : idle) close(fd);
}

// A request sent a line at a time, each within the idle timeout, is ended
// after 2 s: 16 addresses with 8 such connections each held every slot,
// and the kubelet's probes failed for as long as they trickled.
TEST(HttpServer, ARequestThatTricklesInIsEndedAfterTwoSeconds) {
  Registry r;
  auto s = HttpServer::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<int> slow;
  for (const char* from : {"127.0.0.3", "127.0.0.4"}) {
    for (int i = 0; i < 4; ++i) slow.push_back(ConnectFrom((*s)->port(), from));
  }
  for (int fd : slow) {
    const std::string line = "GET /livez HTTP/1.1\r\n";
    ASSERT_EQ(send(fd, line.data(), line.size(), MSG_NOSIGNAL), static_cast<ssize_t>(line.size()));
  }
  const absl::Time start = absl::Now();
  std::vector<bool> ended(slow.size(), false);
  size_t left = slow.size();
  while (left > 0 && absl::Now() - start < absl::Seconds(8)) {
    absl::SleepFor(absl::Milliseconds(250));
    for (size_t i = 0; i < slow.size(); ++i) {
      if (ended[i]) continue;
      const std::string header = "X-Slow: 1\r\n";
      char buf[256];
      const bool closed = send(slow[i], header.data(), header.size(), MSG_NOSIGNAL) < 0 ||
                          recv(slow[i], buf, sizeof(buf), MSG_DONTWAIT) == 0;
      if (closed) {
        ended[i] = true;
        --left;
      }
    }
  }
  EXPECT_EQ(left, 0u) << "connections still open after 8 s of trickling";
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
  for (int fd : slow) close(fd);
  EXPECT_THAT(GetOn(ConnectFrom((*s)->port(), "127.0.0.3"), "/livez"), HasSubstr("HTTP/1.1 200"));
}

// HEAD is answered as GET, without a body (uptime checkers use it); a GET
// with a body is refused, saying what is allowed (the check never fired:
// the first callback sees no body yet).
TEST(HttpServer, HeadIsAGetAndAGetWithABodyIsRefused) {
  Registry r;
  auto s = HttpServer::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(s.ok()) << s.status();
  (*s)->SetServing(true);
  auto raw = [&](const std::string& request) {
    return Exchange(ConnectFrom((*s)->port(), "127.0.0.1"), request);
  };
  const std::string head = raw("HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(head, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(head, Not(HasSubstr("ok\n")));
  const std::string body = raw("GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
  EXPECT_THAT(body, HasSubstr("HTTP/1.1 405"));
  EXPECT_THAT(body, HasSubstr("Allow: GET, HEAD"));
}

// With a progress probe, /livez fails once the loop it watches has not
// run within the limit, saying which loop and how long ago.
TEST(HttpServer, LivenessFailsWhileTheWatchedLoopIsStuck) {
  Registry r;
  auto s = HttpServer::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(s.ok()) << s.status();
  const int port = (*s)->port();
  std::atomic<int64_t> since_s{1};
  (*s)->SetLiveness([&since_s] { return absl::Seconds(since_s.load()); }, absl::Seconds(15),
                    "the test loop");
  EXPECT_THAT(Get(port, "/livez"), HasSubstr("HTTP/1.1 200"));
  since_s = 20;
  const std::string stuck = Get(port, "/livez");
  EXPECT_THAT(stuck, HasSubstr("HTTP/1.1 503"));
  EXPECT_THAT(stuck, HasSubstr("stuck: the test loop last ran 20s ago (the limit is 15s)"));
  EXPECT_THAT(Get(port, "/metrics"), HasSubstr("HTTP/1.1 200"));  // the rest still answers
  since_s = 0;
  EXPECT_THAT(Get(port, "/livez"), HasSubstr("HTTP/1.1 200"));
  since_s = 20;
  (*s)->SetLiveness(nullptr, absl::ZeroDuration(), "");  // no probe: the process answers
  EXPECT_THAT(Get(port, "/livez"), HasSubstr("HTTP/1.1 200"));
}

// Every address (0.0.0.0) takes IPv6 too where the system has it, as
// gRPC's ports do: probes reach pods on IPv6 and dual-stack clusters.
TEST(HttpServer, EveryAddressMeansIpv4AndIpv6) {
  Registry r;
  auto s = HttpServer::Start("0.0.0.0:0", &r);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(Get((*s)->port(), "/livez"), HasSubstr("HTTP/1.1 200"));
  // IPv6 with a loopback address (::1 can be bound), or skip.
  const int probe = socket(AF_INET6, SOCK_STREAM, 0);
  sockaddr_in6 lo{};
  lo.sin6_family = AF_INET6;
  lo.sin6_addr = in6addr_loopback;
  const bool ipv6 =
      probe >= 0 && bind(probe, reinterpret_cast<sockaddr*>(&lo), sizeof(lo)) == 0;
  if (probe >= 0) close(probe);
  if (!ipv6) GTEST_SKIP() << "no IPv6 loopback address on this machine";
  EXPECT_THAT(Get((*s)->port(), "/livez", /*ipv6=*/true), HasSubstr("HTTP/1.1 200"));
}

// Every address on a port another process holds on IPv6 alone is an error,
// not IPv4 alone (which left IPv6 probes and scrapes to that process).
TEST(HttpServer, EveryAddressOnAPortTakenOnIpv6IsAnError) {
  const int other = socket(AF_INET6, SOCK_STREAM, 0);
  const int one = 1;
  sockaddr_in6 any{};
  any.sin6_family = AF_INET6;
  any.sin6_addr = in6addr_any;
  if (other < 0 || setsockopt(other, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0 ||
      bind(other, reinterpret_cast<sockaddr*>(&any), sizeof(any)) != 0 || listen(other, 1) != 0) {
    if (other >= 0) close(other);
    GTEST_SKIP() << "no IPv6 on this machine";
  }
  socklen_t n = sizeof(any);
  getsockname(other, reinterpret_cast<sockaddr*>(&any), &n);
  Registry r;
  const std::string address = "0.0.0.0:" + std::to_string(ntohs(any.sin6_port));
  auto s = HttpServer::Start(address, &r);
  EXPECT_FALSE(s.ok()) << "served IPv4 alone";
  if (!s.ok()) {
    EXPECT_THAT(s.status().message(),
                HasSubstr("cannot listen on " + address + ": Address already in use"));
  }
  close(other);
}

TEST(HttpServer, APortInUseIsAnErrorNamingIt) {
  Registry r;
  auto first = HttpServer::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string address = "127.0.0.1:" + std::to_string((*first)->port());
  auto second = HttpServer::Start(address, &r);
  ASSERT_FALSE(second.ok());
  EXPECT_THAT(second.status().message(), HasSubstr("cannot listen on " + address));
}

TEST(MetricsPort, FlagThenEnvironmentThenOff) {
  unsetenv("MX_METRICS_PORT");
  EXPECT_EQ(*MetricsPort(""), -1);
  EXPECT_EQ(*MetricsPort("9102"), 9102);
  setenv("MX_METRICS_PORT", "0", 1);
  EXPECT_EQ(*MetricsPort(""), 0);
  setenv("MX_METRICS_PORT", "http", 1);
  EXPECT_THAT(MetricsPort("").status().message(),
              HasSubstr("MX_METRICS_PORT=http: must be a whole number from 0 to 65535"));
  EXPECT_THAT(std::string(MetricsPort("70000").status().message()),
              ::testing::StartsWith("--metrics_port=70000: must be a whole number"));
  unsetenv("MX_METRICS_PORT");
}

// The value of the sample `series` (name and labels as written) in `text`.
double Sample(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::strtod(text.c_str() + at + series.size() + 2, nullptr);
}

TEST(CallMetrics, CountCallsByMethodAndCodeWhileEnabled) {
  CoordinatorOptions o;
  o.num_workers = 1;
  o.num_servers = 0;
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = proto::Coordinator::NewStub(rpc::SharedChannel((*c)->address(), {}));
  auto heartbeat = [&] {
    proto::HeartbeatRequest req;
    proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    return stub->Heartbeat(&ctx, req, &resp).error_code();
  };
  const std::string refused = "mx_rpc_server_handled_total{method=\"Heartbeat\",code=\"PERMISSION_DENIED\"}";
  SetEnabled(false);
  ASSERT_EQ(heartbeat(), grpc::StatusCode::PERMISSION_DENIED);  // no identity
  const double before = Sample(Registry::Global().Text(), refused);
  SetEnabled(true);
  ASSERT_EQ(heartbeat(), grpc::StatusCode::PERMISSION_DENIED);
  ASSERT_EQ(heartbeat(), grpc::StatusCode::PERMISSION_DENIED);
  SetEnabled(false);
  const std::string text = Registry::Global().Text();
  EXPECT_EQ(Sample(text, refused), std::max(before, 0.0) + 2) << text;
  EXPECT_EQ(Sample(text, "mx_rpc_client_handled_total{method=\"Heartbeat\",code=\"PERMISSION_DENIED\"}"),
            std::max(before, 0.0) + 2);
  EXPECT_GT(Sample(text, "mx_rpc_server_received_bytes_total{method=\"Heartbeat\"}"), -1);
  EXPECT_EQ(Sample(text, "mx_rpc_server_handling_seconds_count{method=\"Heartbeat\"}"),
            std::max(before, 0.0) + 2);
}

// Calls of methods the server does not route are counted as one method,
// "unrouted": a caller without the job's token inventing paths added
// series without bound.
TEST(CallMetrics, CallsOfUnroutedMethodsShareOneSeries) {
  CoordinatorOptions o;
  o.num_workers = 1;
  o.num_servers = 0;
  auto c = CoordinatorServer::Start("127.0.0.1:0", o);
  ASSERT_TRUE(c.ok()) << c.status();
  grpc::GenericStub stub(rpc::SharedChannel((*c)->address(), {}));
  const std::string unrouted =
      "mx_rpc_server_handled_total{method=\"unrouted\",code=\"UNIMPLEMENTED\"}";
  const double before = std::max(Sample(Registry::Global().Text(), unrouted), 0.0);
  grpc::Slice empty;
  const grpc::ByteBuffer request(&empty, 1);
  SetEnabled(true);
  for (int i = 0; i < 50; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::ByteBuffer response;
    absl::Notification done;
    grpc::Status status;
    rpc::StartUnaryCall(&stub, &ctx, absl::StrCat("/mx.proto.Coordinator/Invented", i), request,
                        &response, [&](grpc::Status s) {
                          status = s;
                          done.Notify();
                        });
    done.WaitForNotification();
    ASSERT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();
  }
  SetEnabled(false);
  const std::string text = Registry::Global().Text();
  EXPECT_EQ(Sample(text, unrouted), before + 50);
  // (The client side, this test's own, names them.)
  for (const char* family : {"handled_total", "handling_seconds_count", "received_bytes_total"}) {
    EXPECT_EQ(text.find(absl::StrCat("mx_rpc_server_", family, "{method=\"Invented")),
              std::string::npos)
        << family;
  }
}

}  // namespace
}  // namespace metrics
}  // namespace mx
