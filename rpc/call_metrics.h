// Internal to rpc/: gRPC interceptors that count every call of the
// process's servers and channels into metrics::Registry::Global() (calls
// by method and status code, latency, bytes), while metrics are enabled.
// Listen and SharedChannel install them; while disabled (the default until
// a metrics endpoint starts) a call pays one relaxed load.
#ifndef MX_RPC_CALL_METRICS_H_
#define MX_RPC_CALL_METRICS_H_

#include <grpcpp/support/client_interceptor.h>
#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <vector>

namespace mx {
namespace rpc {

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
ServerCallMetrics();
std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>>
ClientCallMetrics();

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_CALL_METRICS_H_
