#include "rpc/call_metrics.h"

#include <grpcpp/grpcpp.h>

#include <array>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "rpc/metrics.h"

namespace mx {
namespace rpc {

namespace {

using grpc::experimental::InterceptionHookPoints;
using grpc::experimental::InterceptorBatchMethods;
constexpr int kCodes = 17;  // gRPC status codes 0..16

// The counters of one method on one side, looked up once per method.
struct MethodStats {
  std::array<std::atomic<metrics::Counter*>, kCodes> handled{};
  metrics::Histogram* seconds = nullptr;
  metrics::Counter* sent_bytes = nullptr;
  metrics::Counter* received_bytes = nullptr;  // servers only
  metrics::Family<metrics::Counter>* handled_family = nullptr;
  std::string method;

  void Done(grpc::StatusCode code, std::chrono::steady_clock::time_point start) {
    const int c = static_cast<int>(code) >= 0 && static_cast<int>(code) < kCodes
                      ? static_cast<int>(code)
                      : static_cast<int>(grpc::StatusCode::UNKNOWN);
    metrics::Counter* counter = handled[c].load(std::memory_order_acquire);
    if (counter == nullptr) {
      counter = handled_family->With(
          {method, absl::StatusCodeToString(static_cast<absl::StatusCode>(c))});
      handled[c].store(counter, std::memory_order_release);
    }
    counter->Add();
    seconds->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
};

// The short name of "/mx.proto.KVStoreService/Push": "Push" (the service
// is a label of its own).
std::pair<std::string, std::string> Split(const char* full) {
  std::string s(full == nullptr ? "" : full);
  const size_t slash = s.rfind('/');
  if (slash == std::string::npos) return {"", s};
  std::string service = s.substr(0, slash);
  if (!service.empty() && service[0] == '/') service = service.substr(1);
  return {service, s.substr(slash + 1)};
}

class Side {
 public:
  // The families of one side: answered (server) or made (client) calls.
  explicit Side(bool server) {
    metrics::Registry& r = metrics::Registry::Global();
    const std::string p = server ? "mx_rpc_server_" : "mx_rpc_client_";
    const std::string who = server ? "answered by this process" : "made by this process";
    handled_ = r.AddCounter(p + "handled_total", "RPCs " + who + ", by method and status code",
                            {"method", "code"});
    seconds_ = r.AddHistogram(p + "handling_seconds",
                              server ? "Time from a call's arrival to its status, by method"
                                     : "Time from a call's start to its status, by method "
                                       "(for pushpull: the time a worker waits for its step)",
                              metrics::LatencyBuckets(), {"method"});
    sent_ = r.AddCounter(p + "sent_bytes_total", "Message bytes sent, by method", {"method"});
    if (server) {
      received_ = r.AddCounter(p + "received_bytes_total", "Message bytes received, by method",
                               {"method"});
    }
  }

  // The stats of `full_method`; on the server side, of "/unrouted" for a
  // method no server of this process routes (RouteCallMetrics): a caller
  // inventing paths, even without the job's token, added series without
  // bound, each kept for good.
  MethodStats* For(const char* full_method) {
    std::lock_guard<std::mutex> lock(mu_);
    std::string name = full_method == nullptr ? "" : full_method;
    if (received_ != nullptr && !routed_.count(name)) name = "/unrouted";
    std::unique_ptr<MethodStats>& s = methods_[name];
    if (s == nullptr) {
      s = std::make_unique<MethodStats>();
      s->method = Split(name.c_str()).second;
      s->handled_family = handled_;
      s->seconds = seconds_->With({s->method});
      s->sent_bytes = sent_->With({s->method});
      if (received_ != nullptr) s->received_bytes = received_->With({s->method});
    }
    return s.get();
  }

  void Route(const std::string& full_method) {
    std::lock_guard<std::mutex> lock(mu_);
    routed_.insert(full_method);
  }

 private:
  metrics::Family<metrics::Counter>* handled_;
  metrics::Family<metrics::Histogram>* seconds_;
  metrics::Family<metrics::Counter>* sent_;
  metrics::Family<metrics::Counter>* received_ = nullptr;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<MethodStats>> methods_;
  std::set<std::string> routed_ = {"/grpc.health.v1.Health/Check"};  // server side
};

Side& ServerSide() {
  static Side* s = new Side(true);
  return *s;
}
Side& ClientSide() {
  static Side* s = new Side(false);
  return *s;
}

// mx's own services take and give raw byte buffers (grpc.health.v1 does
// not): only their received messages can be measured as such.
bool RawMethod(const char* method) {
  return method != nullptr && std::strncmp(method, "/mx.proto.", 10) == 0;
}

class ServerInterceptor : public grpc::experimental::Interceptor {
 public:
  ServerInterceptor(MethodStats* stats, bool raw)
      : stats_(stats), raw_(raw), start_(std::chrono::steady_clock::now()) {}

  void Intercept(InterceptorBatchMethods* m) override {
    if (raw_ && m->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE)) {
      if (auto* b = static_cast<grpc::ByteBuffer*>(m->GetRecvMessage())) {
        stats_->received_bytes->Add(static_cast<double>(b->Length()));
      }
    }
    if (m->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      if (grpc::ByteBuffer* b = m->GetSerializedSendMessage()) {
        stats_->sent_bytes->Add(static_cast<double>(b->Length()));
      }
    }
    if (m->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      stats_->Done(m->GetSendStatus().error_code(), start_);
    }
    m->Proceed();
  }

 private:
  MethodStats* const stats_;
  const bool raw_;
  const std::chrono::steady_clock::time_point start_;
};

class ClientInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit ClientInterceptor(MethodStats* stats)
      : stats_(stats), start_(std::chrono::steady_clock::now()) {}

  void Intercept(InterceptorBatchMethods* m) override {
    if (m->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      if (grpc::ByteBuffer* b = m->GetSerializedSendMessage()) {
        stats_->sent_bytes->Add(static_cast<double>(b->Length()));
      }
    }
    if (m->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_STATUS)) {
      stats_->Done(m->GetRecvStatus()->error_code(), start_);
    }
    m->Proceed();
  }

 private:
  MethodStats* const stats_;
  const std::chrono::steady_clock::time_point start_;
};

class ServerFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    if (!metrics::Enabled()) return nullptr;
    return new ServerInterceptor(ServerSide().For(info->method()), RawMethod(info->method()));
  }
};

class ClientFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    if (!metrics::Enabled()) return nullptr;
    return new ClientInterceptor(ClientSide().For(info->method()));
  }
};

}  // namespace

void RouteCallMetrics(const std::string& method) { ServerSide().Route(method); }

void CountServerCall(const std::string& method, int code,
                     std::chrono::steady_clock::time_point start, size_t received, size_t sent) {
  if (!metrics::Enabled()) return;
  MethodStats* stats = ServerSide().For(method.c_str());
  stats->received_bytes->Add(static_cast<double>(received));
  stats->sent_bytes->Add(static_cast<double>(sent));
  stats->Done(static_cast<grpc::StatusCode>(code), start);
}

void CountClientCall(const std::string& method, int code,
                     std::chrono::steady_clock::time_point start, size_t sent) {
  if (!metrics::Enabled()) return;
  MethodStats* stats = ClientSide().For(method.c_str());
  stats->sent_bytes->Add(static_cast<double>(sent));
  stats->Done(static_cast<grpc::StatusCode>(code), start);
}

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
ServerCallMetrics() {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> v;
  v.push_back(std::make_unique<ServerFactory>());
  return v;
}

std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>>
ClientCallMetrics() {
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> v;
  v.push_back(std::make_unique<ClientFactory>());
  return v;
}

}  // namespace rpc
}  // namespace mx
