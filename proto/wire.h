// Internal: conversions between mx values and the wire format, shared by
// the server and the distributed KVStore client.
#ifndef MX_PROTO_WIRE_H_
#define MX_PROTO_WIRE_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "ndarray/base.h"
#include "proto/mx.pb.h"
#include "proto/pieces.h"

namespace mx {

// Large tensors travel in single messages up to this size.
constexpr int kMaxMessageBytes = 1 << 30;

struct HostTensor {
  Shape shape;
  std::vector<float> data;
};

// Checks dtype and size against shape (INVALID_ARGUMENT naming both).
absl::StatusOr<HostTensor> FromProto(const proto::Tensor& t);
void ToProto(const float* data, const Shape& shape, proto::Tensor* t);

// Messages that carry a tensor's data (PushRequest, PullResponse), moved
// without copies of the data on the sending side and, on the receiving
// side, with one copy out of gRPC's receive buffers or none (the data are
// used where they arrived). The bytes are exactly protobuf's encoding of
// the messages in mx.proto, so any protobuf peer can read and write them.
//
// EncodeTensorMessage: `header` (with its tensor field holding shape and
// dtype, no data), then a second occurrence of the tensor field (number
// `tensor_field`) holding only Tensor.data = the bytes of `data`; protobuf
// merges repeated occurrences of a message field. The data are not copied:
// the message refers to them, and holds data.owner until gRPC is done with
// them. The caller keeps the bytes unchanged until the call completes.
// ToByteBuffer makes one message of the pieces; EncodeRepeated puts several
// in one, each as an occurrence of message field `field`.
struct EncodedMessage {
  std::vector<grpc::Slice> slices;
  size_t bytes = 0;
};
EncodedMessage EncodeTensorMessage(const google::protobuf::MessageLite& header, int tensor_field,
                                   const Pieces& data);
grpc::ByteBuffer ToByteBuffer(const EncodedMessage& m);
grpc::ByteBuffer EncodeRepeated(int field, const std::vector<EncodedMessage>& entries);

// A message without a tensor, for the raw (byte buffer) methods.
grpc::ByteBuffer EncodeMessage(const google::protobuf::MessageLite& m);

// The field numbers these functions take, from mx.proto.
constexpr int kPushValueField = 3;    // PushRequest.value
constexpr int kPullValueField = 1;    // PullResponse.value
constexpr int kManyEntriesField = 1;  // PushPullManyRequest/Response.entries

// DecodeWithTensor: parses `buffer` into `header`, except the data of the
// tensor field (number `tensor_field`; 0 for a message without one): it
// calls sink(offset, bytes) with where they lie in the buffer and copies
// them to the memory the sink returns, or leaves them if it returns
// nullptr (see PiecesOf). Malformed input, or a sink error, is an error
// (INVALID_ARGUMENT unless the sink says other).
using TensorSink = std::function<absl::StatusOr<void*>(size_t offset, size_t bytes)>;
absl::Status DecodeWithTensor(const grpc::ByteBuffer& buffer, int tensor_field,
                              google::protobuf::MessageLite* header, const TensorSink& sink);

// DecodeRepeated: reads a message whose field `field` repeats, each
// occurrence a message decoded as by DecodeWithTensor into header(i), its
// data to sink(i), for i = 0, 1, ... in order. Other fields are skipped.
absl::Status DecodeRepeated(const grpc::ByteBuffer& buffer, int field, int tensor_field,
                            const std::function<google::protobuf::MessageLite*(int)>& header,
                            const std::function<TensorSink(int)>& sink);

// The request of a raw method without a tensor. Bytes that are no such
// message are INVALID_ARGUMENT "METHOD: malformed request: ...", where
// gRPC's own parser (of a method that is not raw) answers INTERNAL with no
// message.
template <class Request>
absl::StatusOr<Request> ParseRequest(const grpc::ByteBuffer& request, const char* method) {
  Request req;
  const absl::Status s = DecodeWithTensor(request, 0, &req, nullptr);
  if (s.ok()) return req;
  return absl::InvalidArgumentError(absl::StrCat(method, ": malformed request: ", s.message()));
}

// The slices of `buffer`: references, nothing copied.
using Slices = std::shared_ptr<const std::vector<grpc::Slice>>;
absl::StatusOr<Slices> SlicesOf(const grpc::ByteBuffer& buffer);
// Bytes [offset, offset + bytes) of a buffer's slices, where they lie;
// the pieces hold the slices. OUT_OF_RANGE past the buffer's end.
absl::StatusOr<Pieces> PiecesOf(const Slices& slices, size_t offset, size_t bytes);

// Checks a decoded tensor's shape and dtype against the number of bytes
// its data held.
absl::StatusOr<Shape> TensorShape(const proto::Tensor& t, size_t data_bytes);

// Initializes gRPC once for the life of the process. Clients and servers
// call it before creating channels: otherwise destroying the last channel
// shuts gRPC down while its callback thread may still be finishing a call.
void KeepGrpcAlive();

// A server builder listening on bind_address alone: without SO_REUSEPORT
// (gRPC's default sets it), so a port another daemon holds is an error
// instead of being silently shared. With it, a parameter server given an
// ephemeral port could share the coordinator's, and the kernel then handed
// some Register calls to the server (UNIMPLEMENTED, no message).
// It sets the HTTP/2 flow control and framing every mx connection uses
// (as SharedChannel does for clients).
void ListenExclusively(grpc::ServerBuilder* builder, const std::string& bind_address,
                       int* port);

// The process's channel to `address`, created once and kept: channels are
// expensive, and one that is destroyed while gRPC's callback thread
// finishes a call on it aborted the process (gRPC 1.51,
// grpc_cq_internal_unref).
// `connection` numbers separate TCP connections to one address (each read
// and parsed by one gRPC thread at a time): several let big transfers to
// one server proceed in parallel.
std::shared_ptr<grpc::Channel> SharedChannel(const std::string& address, int connection = 0);

// When a server gives up on a call that waits for other nodes (a pull for
// the workers' pushes, a registration or barrier for the other nodes): a
// tenth of the time left before the caller's `deadline`, at most 0.5 s
// before it, so that its answer saying what was missing reaches the caller
// before the caller's own DEADLINE_EXCEEDED, which says nothing.
// InfiniteFuture for a call without a deadline.
absl::Time GiveUpBefore(std::chrono::system_clock::time_point deadline);

// How long servers and workers wait for every node of the job to register,
// unless MX_STARTUP_TIMEOUT_S (or mx_server --startup_timeout_s) says.
constexpr int kDefaultStartupTimeoutSeconds = 120;

// Registers with the coordinator at `address`, waiting up to `timeout` for
// it to start and for every node of the job to register. Errors start
// with "registering with the coordinator at ADDRESS: "; one that never
// answered is UNAVAILABLE saying so (instead of a bare deadline).
absl::StatusOr<proto::RegisterResponse> RegisterWithCoordinator(const std::string& address,
                                                               const proto::RegisterRequest& req,
                                                               absl::Duration timeout);

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}
inline absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// Answers a raw method without a tensor at once: parses its request
// (ParseRequest), calls handle(req, &resp) and answers with resp or
// handle's error.
template <class Req, class Resp, class Handle>
grpc::ServerUnaryReactor* AnswerRequest(grpc::CallbackServerContext* ctx,
                                        const grpc::ByteBuffer& request,
                                        grpc::ByteBuffer* response, const char* method,
                                        const Handle& handle) {
  Resp resp;
  absl::StatusOr<Req> req = ParseRequest<Req>(request, method);
  absl::Status s = req.ok() ? handle(*req, &resp) : req.status();
  if (s.ok()) *response = EncodeMessage(resp);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(s));
  return reactor;
}

}  // namespace mx

#endif  // MX_PROTO_WIRE_H_
