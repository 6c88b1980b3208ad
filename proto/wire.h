// Internal: conversions between mx values and the wire format, shared by
// the server and the distributed KVStore client.
#ifndef MX_PROTO_WIRE_H_
#define MX_PROTO_WIRE_H_

#include <grpcpp/grpcpp.h>

#include <vector>

#include "absl/status/statusor.h"
#include "ndarray/base.h"
#include "proto/mx.pb.h"

namespace mx {

// Large tensors travel in single messages up to this size.
constexpr int kMaxMessageBytes = 1 << 30;

struct HostTensor {
  Shape shape;
  std::vector<float> data;
};

// Checks dtype and size against shape (INVALID_ARGUMENT naming both).
absl::StatusOr<HostTensor> FromProto(const proto::Tensor& t);
void ToProto(const std::vector<float>& data, proto::Tensor* t);
void ToProto(const float* data, const Shape& shape, proto::Tensor* t);

// Initializes gRPC once for the life of the process. Clients and servers
// call it before creating channels: otherwise destroying the last channel
// shuts gRPC down while its callback thread may still be finishing a call.
void KeepGrpcAlive();

// The process's channel to `address`, created once and kept: channels are
// expensive, and one that is destroyed while gRPC's callback thread
// finishes a call on it aborted the process (gRPC 1.51,
// grpc_cq_internal_unref).
std::shared_ptr<grpc::Channel> SharedChannel(const std::string& address);

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}
inline absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace mx

#endif  // MX_PROTO_WIRE_H_
