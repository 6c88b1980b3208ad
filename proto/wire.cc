#include "proto/wire.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "proto/mx.grpc.pb.h"

namespace mx {
namespace {

using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;

constexpr int kTensorDataField = 3;  // Tensor.data
constexpr uint32_t kLengthDelimited = 2;

uint32_t Tag(int field, uint32_t wire_type) { return (static_cast<uint32_t>(field) << 3) | wire_type; }

// Protobuf's bounds on the varints of tags and lengths, which
// CodedInputStream does not keep (it reads up to 10 bytes and drops the
// high bits): at most 5 bytes; a length at most 2^31 - 1.
constexpr int kMaxVarint32Bytes = 5;

// The next field's tag, or 0 at the end of the message (or of the current
// limit) or, setting *malformed, where a tag is longer than protobuf allows.
uint32_t ReadTag(CodedInputStream* in, bool* malformed) {
  const int start = in->CurrentPosition();
  const uint32_t tag = in->ReadTag();
  if (in->CurrentPosition() - start <= kMaxVarint32Bytes) return tag;
  *malformed = true;
  return 0;
}

// The length of a length-delimited field.
bool ReadLength(CodedInputStream* in, uint32_t* n) {
  const int start = in->CurrentPosition();
  return in->ReadVarint32(n) && in->CurrentPosition() - start <= kMaxVarint32Bytes &&
         *n <= static_cast<uint32_t>(std::numeric_limits<int>::max());
}

// Copies the field whose tag was just read from `in` to `out`, unchanged.
bool CopyField(uint32_t tag, CodedInputStream* in, CodedOutputStream* out) {
  if ((tag >> 3) == 0) return false;  // field number 0 is not valid protobuf
  out->WriteTag(tag);
  switch (tag & 7) {
    case 0: {  // varint
      uint64_t v;
      if (!in->ReadVarint64(&v)) return false;
      out->WriteVarint64(v);
      return true;
    }
    case 1: {  // fixed64
      uint64_t v;
      if (!in->ReadLittleEndian64(&v)) return false;
      out->WriteLittleEndian64(v);
      return true;
    }
    case 2: {  // length-delimited
      uint32_t n;
      std::string bytes;
      if (!ReadLength(in, &n) || !in->ReadString(&bytes, static_cast<int>(n))) return false;
      out->WriteVarint32(n);
      out->WriteString(bytes);
      return true;
    }
    case 5: {  // fixed32
      uint32_t v;
      if (!in->ReadLittleEndian32(&v)) return false;
      out->WriteLittleEndian32(v);
      return true;
    }
    default:  // groups are not used by mx.proto
      return false;
  }
}

// Reads past the field whose tag was just read (CopyField without the copy).
bool SkipField(uint32_t tag, CodedInputStream* in) {
  if ((tag >> 3) == 0) return false;
  uint64_t v64;
  uint32_t v32;
  switch (tag & 7) {
    case 0:
      return in->ReadVarint64(&v64);
    case 1:
      return in->ReadLittleEndian64(&v64);
    case 2:
      return ReadLength(in, &v32) && in->Skip(static_cast<int>(v32));
    case 5:
      return in->ReadLittleEndian32(&v32);
    default:
      return false;
  }
}

// Reads the next n bytes of `in` to dst, as CopyAroundCache copies: they
// are a tensor's data, which its reader reads later if at all.
bool ReadAroundCache(CodedInputStream* in, char* dst, size_t n) {
  while (n > 0) {
    const void* data;
    int size;
    if (!in->GetDirectBufferPointer(&data, &size)) return false;
    const size_t take = std::min(n, static_cast<size_t>(size));
    CopyAroundCache(dst, data, take);
    in->Skip(static_cast<int>(take));
    dst += take;
    n -= take;
  }
  return true;
}

// Reads (one occurrence of) the tensor message that `in` is limited to: its
// data go to `sink` (*have_data says whether an earlier one had data), its
// other fields to `out`.
absl::Status DecodeTensor(CodedInputStream* in, const TensorSink& sink, CodedOutputStream* out,
                          bool* have_data) {
  bool malformed = false;
  while (uint32_t tag = ReadTag(in, &malformed)) {
    if (tag != Tag(kTensorDataField, kLengthDelimited)) {
      if (!CopyField(tag, in, out)) return absl::InvalidArgumentError("malformed tensor field");
      continue;
    }
    uint32_t n;
    if (*have_data) return absl::InvalidArgumentError("tensor data sent twice");
    if (!ReadLength(in, &n)) return absl::InvalidArgumentError("malformed tensor data length");
    if (static_cast<int64_t>(n) > in->BytesUntilLimit()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor data of ", n, " bytes overruns the message"));
    }
    absl::StatusOr<void*> dst = sink(in->CurrentPosition(), n);
    if (!dst.ok()) return dst.status();
    const bool read = *dst == nullptr ? in->Skip(static_cast<int>(n))
                                      : ReadAroundCache(in, static_cast<char*>(*dst), n);
    if (!read) return absl::InvalidArgumentError("truncated tensor data");
    *have_data = true;
  }
  if (malformed || !in->ConsumedEntireMessage()) {
    return absl::InvalidArgumentError("malformed tensor");
  }
  return absl::OkStatus();
}

void DestroyOwner(void* owner) { delete static_cast<std::shared_ptr<const void>*>(owner); }

}  // namespace

EncodedMessage EncodeTensorMessage(const google::protobuf::MessageLite& header, int tensor_field,
                                   const Pieces& data) {
  const size_t bytes = data.bytes();
  std::string prefix = header.SerializeAsString();
  {
    google::protobuf::io::StringOutputStream stream(&prefix);
    CodedOutputStream out(&stream);
    const uint32_t data_tag = Tag(kTensorDataField, kLengthDelimited);
    const size_t tensor_bytes = CodedOutputStream::VarintSize32(data_tag) +
                                CodedOutputStream::VarintSize64(bytes) + bytes;
    out.WriteTag(Tag(tensor_field, kLengthDelimited));
    out.WriteVarint64(tensor_bytes);
    out.WriteTag(data_tag);
    out.WriteVarint64(bytes);
  }
  EncodedMessage m;
  m.bytes = prefix.size() + bytes;
  m.slices.emplace_back(prefix);
  for (absl::Span<const char> p : data.pieces) {
    if (p.empty()) continue;
    m.slices.emplace_back(const_cast<char*>(p.data()), p.size(), DestroyOwner,
                          new std::shared_ptr<const void>(data.owner));
  }
  return m;
}

absl::StatusOr<Slices> SlicesOf(const grpc::ByteBuffer& buffer) {
  auto slices = std::make_shared<std::vector<grpc::Slice>>();
  if (!buffer.Dump(slices.get()).ok()) return absl::InternalError("cannot read a gRPC buffer");
  return slices;
}

absl::StatusOr<Pieces> PiecesOf(const Slices& slices, size_t offset, size_t bytes) {
  Pieces out;
  size_t start = 0;  // of the current slice in the buffer
  for (const grpc::Slice& s : *slices) {
    const size_t end = start + s.size();
    const size_t from = std::max(start, offset), to = std::min(end, offset + bytes);
    if (from < to) {
      out.pieces.emplace_back(reinterpret_cast<const char*>(s.begin()) + (from - start), to - from);
    }
    start = end;
  }
  if (offset + bytes > start) {
    return absl::OutOfRangeError(absl::StrCat("bytes ", offset, "..", offset + bytes,
                                              " of a buffer of ", start));
  }
  out.owner = slices;
  return out;
}

grpc::ByteBuffer ToByteBuffer(const EncodedMessage& m) {
  return grpc::ByteBuffer(m.slices.data(), m.slices.size());
}

grpc::ByteBuffer EncodeMessage(const google::protobuf::MessageLite& m) {
  grpc::Slice bytes(m.SerializeAsString());
  return grpc::ByteBuffer(&bytes, 1);
}

EncodedMessage EncodeHeader(const google::protobuf::MessageLite& m) {
  EncodedMessage e;
  e.slices.emplace_back(m.SerializeAsString());
  e.bytes = e.slices.back().size();
  return e;
}

grpc::ByteBuffer EncodeRepeated(int field, const std::vector<EncodedMessage>& entries,
                                const google::protobuf::MessageLite* rest) {
  std::vector<grpc::Slice> slices;
  // Protobuf merges a message's fields in any order: the others first.
  if (rest != nullptr) slices.emplace_back(rest->SerializeAsString());
  for (const EncodedMessage& e : entries) {
    std::string tag;
    {
      google::protobuf::io::StringOutputStream stream(&tag);
      CodedOutputStream out(&stream);
      out.WriteTag(Tag(field, kLengthDelimited));
      out.WriteVarint64(e.bytes);
    }
    slices.emplace_back(tag);
    slices.insert(slices.end(), e.slices.begin(), e.slices.end());
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

namespace {

// Positions in a CodedInputStream are ints: longer messages are refused.
absl::Status CheckLength(const grpc::ByteBuffer& buffer) {
  if (buffer.Length() <= kMaxMessageBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("message of ", buffer.Length(),
                                                 " bytes; the largest is ", kMaxMessageBytes));
}

// A protobuf input stream over a buffer's slices (no copy), limited to the
// buffer's length (see PushLength), which CheckLength has bounded.
class BufferInput {
 public:
  explicit BufferInput(const grpc::ByteBuffer& buffer)
      : copy_(buffer), reader_(&copy_), in_(&reader_) {
    in_.SetTotalBytesLimit(kMaxMessageBytes);
    in_.PushLimit(static_cast<int>(buffer.Length()));
  }
  CodedInputStream* get() { return &in_; }

 private:
  grpc::ByteBuffer copy_;  // shares the slices; the reader needs a mutable buffer
  grpc::ProtoBufferReader reader_;
  CodedInputStream in_;
};

// Reads the length of a length-delimited field and limits `in` to it.
// False if it is malformed or runs past the enclosing message: `in` is
// always under a limit (BufferInput sets the buffer's length), and
// CodedInputStream would otherwise keep the outer limit for a longer
// field and take the input's end for a legitimate end of the field.
bool PushLength(CodedInputStream* in, CodedInputStream::Limit* limit) {
  uint32_t n;
  if (!ReadLength(in, &n) || static_cast<int64_t>(n) > in->BytesUntilLimit()) return false;
  *limit = in->PushLimit(static_cast<int>(n));
  return true;
}

// Reads one message (to the end of `in`, or of its current limit) into
// `header`, its tensor's data into `sink` (see DecodeWithTensor).
absl::Status DecodeMessage(CodedInputStream* in, int tensor_field,
                           google::protobuf::MessageLite* header, const TensorSink& sink) {
  std::string rest;  // every field but the tensor's data, re-encoded for `header`
  bool have_tensor = false, have_data = false;
  {
    google::protobuf::io::StringOutputStream stream(&rest);
    CodedOutputStream out(&stream);
    bool malformed = false;
    while (uint32_t tag = ReadTag(in, &malformed)) {
      if (tensor_field == 0 || tag != Tag(tensor_field, kLengthDelimited)) {
        if (!CopyField(tag, in, &out)) return absl::InvalidArgumentError("malformed message");
        continue;
      }
      CodedInputStream::Limit limit;
      if (!PushLength(in, &limit)) return absl::InvalidArgumentError("malformed tensor length");
      std::string tensor;
      {
        google::protobuf::io::StringOutputStream tensor_stream(&tensor);
        CodedOutputStream tensor_out(&tensor_stream);
        MX_RETURN_IF_ERROR(DecodeTensor(in, sink, &tensor_out, &have_data));
      }
      in->PopLimit(limit);
      have_tensor = true;
      out.WriteTag(tag);
      out.WriteVarint32(static_cast<uint32_t>(tensor.size()));
      out.WriteString(tensor);
    }
    if (malformed || !in->ConsumedEntireMessage()) {
      return absl::InvalidArgumentError("malformed message");
    }
  }
  if (have_tensor && !have_data) {  // protobuf leaves out empty data
    absl::StatusOr<void*> dst = sink(0, 0);
    if (!dst.ok()) return dst.status();
  }
  if (!header->ParseFromString(rest)) return absl::InvalidArgumentError("malformed message fields");
  return absl::OkStatus();
}

}  // namespace

absl::Status DecodeWithTensor(const grpc::ByteBuffer& buffer, int tensor_field,
                              google::protobuf::MessageLite* header, const TensorSink& sink) {
  MX_RETURN_IF_ERROR(CheckLength(buffer));
  BufferInput in(buffer);
  return DecodeMessage(in.get(), tensor_field, header, sink);
}

absl::Status DecodeRepeated(const grpc::ByteBuffer& buffer, int field, int tensor_field,
                            const std::function<google::protobuf::MessageLite*(int)>& header,
                            const std::function<TensorSink(int)>& sink,
                            google::protobuf::MessageLite* rest) {
  MX_RETURN_IF_ERROR(CheckLength(buffer));
  BufferInput input(buffer);
  CodedInputStream& in = *input.get();
  std::string ignored;
  google::protobuf::io::StringOutputStream ignored_stream(&ignored);
  CodedOutputStream ignored_out(&ignored_stream);
  int index = 0;
  bool malformed = false;
  while (uint32_t tag = ReadTag(&in, &malformed)) {
    if (tag != Tag(field, kLengthDelimited)) {  // unknown fields are skipped
      if (!CopyField(tag, &in, &ignored_out)) return absl::InvalidArgumentError("malformed message");
      continue;
    }
    CodedInputStream::Limit limit;
    if (!PushLength(&in, &limit)) return absl::InvalidArgumentError("malformed entry length");
    absl::Status s = DecodeMessage(&in, tensor_field, header(index), sink(index));
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("entry ", index, ": ", s.message()));
    in.PopLimit(limit);
    ++index;
  }
  if (malformed || !in.ConsumedEntireMessage()) {
    return absl::InvalidArgumentError("malformed message");
  }
  if (rest == nullptr) return absl::OkStatus();
  ignored_out.Trim();  // `ignored` holds exactly the bytes written
  if (!rest->ParseFromString(ignored)) {
    return absl::InvalidArgumentError("malformed message");
  }
  return absl::OkStatus();
}

proto::Credential PeekCredential(const grpc::ByteBuffer& buffer, int field) {
  constexpr uint32_t kMaxCredentialBytes = 64 << 10;
  proto::Credential credential;
  if (!CheckLength(buffer).ok()) return credential;
  BufferInput input(buffer);
  CodedInputStream& in = *input.get();
  bool malformed = false;
  while (uint32_t tag = ReadTag(&in, &malformed)) {
    if (tag != Tag(field, kLengthDelimited)) {
      if (!SkipField(tag, &in)) break;
      continue;
    }
    uint32_t n;
    std::string bytes;
    if (!ReadLength(&in, &n) || n > kMaxCredentialBytes ||
        !in.ReadString(&bytes, static_cast<int>(n)) || !credential.MergeFromString(bytes)) {
      break;
    }
  }
  return credential;
}

absl::StatusOr<Shape> TensorShape(const proto::Tensor& t, size_t data_bytes) {
  if (t.dtype() != proto::FLOAT32) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported dtype ", t.dtype()));
  }
  MX_ASSIGN_OR_RETURN(Shape shape, TensorDims(t));
  if (data_bytes != shape.Size() * sizeof(float)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor of shape ", shape.ToString(), " carries ", data_bytes, " bytes, expected ",
        shape.Size() * sizeof(float)));
  }
  return shape;
}

absl::StatusOr<Shape> TensorDims(const proto::Tensor& t) {
  Shape shape;
  uint64_t elements = 1;
  for (int64_t d : t.shape()) {
    // Bounded dimensions keep the product from overflowing.
    if (d < 0 || d > kMaxMessageBytes) {
      return absl::InvalidArgumentError(absl::StrCat("bad dimension ", d));
    }
    shape.push_back(d);
    elements *= static_cast<uint64_t>(d);
    if (elements > kMaxMessageBytes) {
      return absl::InvalidArgumentError(absl::StrCat("tensor of shape ", shape.ToString(), "... is too large"));
    }
  }
  return shape;
}

absl::StatusOr<HostTensor> FromProto(const proto::Tensor& t) {
  MX_ASSIGN_OR_RETURN(Shape shape, TensorShape(t, t.data().size()));
  HostTensor h{shape, std::vector<float>(shape.Size())};
  std::memcpy(h.data.data(), t.data().data(), t.data().size());
  return h;
}

void ToProto(const float* data, const Shape& shape, proto::Tensor* t) {
  t->clear_shape();
  for (int64_t d : shape) t->add_shape(d);
  t->set_dtype(proto::FLOAT32);
  t->set_data(data, shape.Size() * sizeof(float));
}


}  // namespace mx
