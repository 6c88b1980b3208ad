// Internal to rpc/: gRPC interceptors that count every call of the
// process's servers and channels into metrics::Registry::Global() (calls
// by method and status code, latency, bytes), while metrics are enabled.
// Listen and SharedChannel install them; while disabled (the default until
// a metrics endpoint starts) a call pays one relaxed load.
#ifndef MX_RPC_CALL_METRICS_H_
#define MX_RPC_CALL_METRICS_H_

#include <grpcpp/support/client_interceptor.h>
#include <grpcpp/support/server_interceptor.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace mx {
namespace rpc {

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
ServerCallMetrics();
std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>>
ClientCallMetrics();

// Counts calls of `method` (in full: "/mx.proto.KVStoreService/Push")
// under its own name on the server side; calls of methods no server of the
// process routes are counted as method "unrouted". AsyncServer::Route
// calls it.
void RouteCallMetrics(const std::string& method);

// The same counts for a call that gRPC did not carry (a stream
// connection's, rpc/stream.h): `method` in full, `code` a gRPC status
// code, `start` when it arrived or was made.
void CountServerCall(const std::string& method, int code,
                     std::chrono::steady_clock::time_point start, size_t received, size_t sent);
void CountClientCall(const std::string& method, int code,
                     std::chrono::steady_clock::time_point start, size_t sent);

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_CALL_METRICS_H_
