// Internal: the wire format's codec, shared by the servers and the
// distributed KVStore client: conversions between mx values and messages,
// and encoding and decoding without copies of tensor data. Channels,
// credentials and deadlines are rpc/'s.
#ifndef MX_PROTO_WIRE_H_
#define MX_PROTO_WIRE_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
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
// in one, each as an occurrence of message field `field`, with the fields
// of `rest` (when given: a message of the same type without that field).
struct EncodedMessage {
  std::vector<grpc::Slice> slices;
  size_t bytes = 0;
};
EncodedMessage EncodeTensorMessage(const google::protobuf::MessageLite& header, int tensor_field,
                                   const Pieces& data);
grpc::ByteBuffer ToByteBuffer(const EncodedMessage& m);
grpc::ByteBuffer EncodeRepeated(int field, const std::vector<EncodedMessage>& entries,
                                const google::protobuf::MessageLite* rest = nullptr);

// A message without a tensor, for the raw (byte buffer) methods.
grpc::ByteBuffer EncodeMessage(const google::protobuf::MessageLite& m);
// The same as an EncodedMessage: a message whose tensor's data lie
// elsewhere (shared memory, rpc/shared_memory.h).
EncodedMessage EncodeHeader(const google::protobuf::MessageLite& m);

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
// data to sink(i), for i = 0, 1, ... in order. The other fields are parsed
// into `rest` when given, else skipped.
absl::Status DecodeRepeated(const grpc::ByteBuffer& buffer, int field, int tensor_field,
                            const std::function<google::protobuf::MessageLite*(int)>& header,
                            const std::function<TensorSink(int)>& sink,
                            google::protobuf::MessageLite* rest = nullptr);

// The credential (a proto::Credential in field `field`) of a request, read
// without decoding the rest of it, so that a handler can refuse a caller
// not of the job before the request costs it any memory: decoding
// allocates per entry and per packed row id, many times the bytes sent.
// Several occurrences merge, as protobuf's do; a credential longer than
// 64 KiB, or a malformed message, ends the reading (the decoder, run only
// for an admitted caller, says what is malformed).
proto::Credential PeekCredential(const grpc::ByteBuffer& buffer, int field);

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
// The shape alone (dimensions in range, size bounded), whatever the dtype.
absl::StatusOr<Shape> TensorDims(const proto::Tensor& t);

}  // namespace mx

#endif  // MX_PROTO_WIRE_H_
