// The tensor-carrying wire encoding: what EncodeTensorMessage writes is the
// protobuf message of mx.proto to any protobuf reader, DecodeWithTensor
// reads what any protobuf writer writes, and bad bytes are errors.
#include "proto/wire.h"

#include <cstring>
#include <deque>
#include <random>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/proto/mutate.h"

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes;
}

grpc::ByteBuffer Buffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

proto::PushRequest Header(int key, int64_t n) {
  proto::PushRequest h;
  h.set_key(key);
  h.set_rank(1);
  h.set_min_version(9);
  h.mutable_value()->add_shape(n);
  return h;
}

TEST(Wire, EncodedPushIsTheProtobufMessage) {
  const std::vector<float> data = {1.5f, -2, 3};
  auto owner = std::make_shared<std::vector<float>>(data);
  grpc::ByteBuffer b = ToByteBuffer(EncodeTensorMessage(Header(7, 3), 3, Pieces::Of(owner->data(), 3, owner)));
  proto::PushRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(b)));
  EXPECT_EQ(parsed.key(), 7);
  EXPECT_EQ(parsed.rank(), 1);
  EXPECT_EQ(parsed.min_version(), 9);
  EXPECT_THAT(parsed.value().shape(), ElementsAre(3));
  ASSERT_EQ(parsed.value().data().size(), 12u);
  EXPECT_EQ(0, std::memcmp(parsed.value().data().data(), data.data(), 12));
}

TEST(Wire, EncodingDoesNotCopyTheDataAndHoldsItsOwner) {
  auto owner = std::make_shared<std::vector<float>>(std::vector<float>{1, 2});
  std::weak_ptr<std::vector<float>> watch = owner;
  {
    grpc::ByteBuffer b = ToByteBuffer(EncodeTensorMessage(Header(1, 2), 3, Pieces::Of(owner->data(), 2, owner)));
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(b.Dump(&slices).ok());
    ASSERT_EQ(slices.size(), 2u);
    EXPECT_EQ(static_cast<const void*>(slices[1].begin()), static_cast<const void*>(owner->data()));
    owner.reset();
    EXPECT_FALSE(watch.expired());  // the buffer keeps it
  }
  EXPECT_TRUE(watch.expired());
}

TEST(Wire, DecodesPlainProtobufAndOwnEncoding) {
  const float values[2] = {4, 5};
  proto::PushRequest plain = Header(3, 2);
  plain.mutable_value()->set_data(values, sizeof(values));
  auto owner = std::make_shared<std::vector<float>>(std::vector<float>{4, 5});
  for (const grpc::ByteBuffer& b :
       {Buffer(plain.SerializeAsString()), ToByteBuffer(EncodeTensorMessage(Header(3, 2), 3, Pieces::Of(owner->data(), 2, owner)))}) {
    std::vector<float> out(2, 0);
    proto::PushRequest header;
    size_t got = 0;
    absl::Status s = DecodeWithTensor(b, 3, &header, [&](size_t, size_t bytes) -> absl::StatusOr<void*> {
      got = bytes;
      return static_cast<void*>(out.data());
    });
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(got, 8u);
    EXPECT_THAT(out, ElementsAre(4, 5));
    EXPECT_EQ(header.key(), 3);
    EXPECT_EQ(header.min_version(), 9);
    EXPECT_THAT(header.value().shape(), ElementsAre(2));
    EXPECT_TRUE(header.value().data().empty());  // went to the sink only
    EXPECT_TRUE(TensorShape(header.value(), got).ok());
  }
}

// A repeated message with other fields (PushPullMany's credential): what
// EncodeRepeated writes is the protobuf message, and DecodeRepeated gives
// the other fields back in `rest`, whichever comes first on the wire.
TEST(Wire, RepeatedMessageCarriesItsOtherFields) {
  auto owner = std::make_shared<std::vector<float>>(std::vector<float>{1, 2, 3});
  std::vector<EncodedMessage> entries = {
      EncodeTensorMessage(Header(4, 2), 3, Pieces::Of(owner->data(), 2, owner)),
      EncodeTensorMessage(Header(5, 1), 3, Pieces::Of(owner->data() + 2, 1, owner))};
  proto::PushPullManyRequest rest;
  rest.mutable_credential()->set_node("worker/1:abc");
  const grpc::ByteBuffer ours = EncodeRepeated(kManyEntriesField, entries, &rest);
  proto::PushPullManyRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(ours)));
  ASSERT_EQ(parsed.entries_size(), 2);
  EXPECT_EQ(parsed.entries(1).key(), 5);
  EXPECT_EQ(parsed.credential().node(), "worker/1:abc");

  // Protobuf's own encoding puts the credential after the entries.
  for (const grpc::ByteBuffer& b : {ours, Buffer(parsed.SerializeAsString())}) {
    std::deque<proto::PushRequest> headers;
    proto::PushPullManyRequest got;
    const absl::Status s = DecodeRepeated(
        b, kManyEntriesField, kPushValueField, [&](int) { return &headers.emplace_back(); },
        [&](int) { return [](size_t, size_t) -> absl::StatusOr<void*> { return nullptr; }; },
        &got);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(headers.size(), 2u);
    EXPECT_EQ(headers[0].key(), 4);
    EXPECT_EQ(got.entries_size(), 0);  // entries went to their headers only
    EXPECT_EQ(got.credential().node(), "worker/1:abc");
  }
}

// A sink that returns nullptr leaves the data in the buffer and learns
// where they lie; PiecesOf then hands them out uncopied, across slices.
TEST(Wire, DataLeftInTheBufferArePiecesOfItsSlices) {
  std::vector<float> values(64);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5f * i;
  const size_t n = values.size() * sizeof(float);
  proto::PushRequest plain = Header(3, values.size());
  plain.mutable_value()->set_data(values.data(), n);
  const std::string bytes = plain.SerializeAsString();
  // Slices of 37 bytes (gRPC merges small ones): the floats straddle them.
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size(); at += 37) slices.emplace_back(bytes.substr(at, 37));
  const grpc::ByteBuffer buffer(slices.data(), slices.size());
  proto::PushRequest header;
  size_t offset = 0, size = 0;
  ASSERT_TRUE(DecodeWithTensor(buffer, 3, &header,
                               [&](size_t at, size_t bytes) -> absl::StatusOr<void*> {
                                 offset = at;
                                 size = bytes;
                                 return nullptr;
                               })
                  .ok());
  EXPECT_EQ(header.key(), 3);
  ASSERT_EQ(size, n);
  EXPECT_EQ(bytes.substr(offset, size), std::string(reinterpret_cast<const char*>(values.data()), n));
  absl::StatusOr<Slices> dumped = SlicesOf(buffer);
  ASSERT_TRUE(dumped.ok());
  absl::StatusOr<Pieces> pieces = PiecesOf(*dumped, offset, size);
  ASSERT_TRUE(pieces.ok()) << pieces.status();
  EXPECT_GE(pieces->pieces.size(), n / 37);
  EXPECT_EQ(pieces->bytes(), n);
  EXPECT_EQ(pieces->ToFloats(), values);
  float middle[20];
  pieces->CopyTo(6, sizeof(middle), middle);  // from the middle of a float
  EXPECT_EQ(std::memcmp(middle, reinterpret_cast<const char*>(values.data()) + 6, sizeof(middle)), 0);
  EXPECT_EQ(PiecesOf(*dumped, offset, bytes.size()).status().code(), absl::StatusCode::kOutOfRange);
}

// Large copies store around the cache; every byte still lands, whatever
// the alignment of either end and the length of the tail.
TEST(Wire, CopyAroundCacheCopiesLikeMemcpy) {
  std::vector<char> source((1 << 20) + 200);
  for (size_t i = 0; i < source.size(); ++i) source[i] = static_cast<char>(i * 131 + i / 251);
  for (size_t n : {size_t{0}, size_t{1}, size_t{65535}, size_t{65536}, size_t{65536 + 77}, size_t{1} << 20}) {
    for (size_t dst_at : {0, 1, 8, 15}) {
      for (size_t src_at : {0, 3}) {
        std::vector<char> out(n + 48, '#');
        CopyAroundCache(out.data() + dst_at, source.data() + src_at, n);
        ASSERT_EQ(std::memcmp(out.data() + dst_at, source.data() + src_at, n), 0)
            << n << " bytes to +" << dst_at << " from +" << src_at;
        for (size_t i = 0; i < dst_at; ++i) ASSERT_EQ(out[i], '#') << "wrote before the destination";
        for (size_t i = dst_at + n; i < out.size(); ++i) ASSERT_EQ(out[i], '#') << "wrote past it";
      }
    }
  }
}

// A tensor large enough to be copied around the cache, arriving in slices
// of odd sizes, small and large, decodes to an unaligned destination intact.
TEST(Wire, LargeTensorDecodesAcrossSlices) {
  std::vector<float> values(300000);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * i - 7;
  const size_t n = values.size() * sizeof(float);
  proto::PushRequest plain = Header(5, values.size());
  plain.mutable_value()->set_data(values.data(), n);
  const std::string bytes = plain.SerializeAsString();
  std::vector<grpc::Slice> slices;  // 4099, 10075, 28003, 81787, ... bytes
  for (size_t at = 0, size = 4099; at < bytes.size(); at += size, size = size * 3 - 2222) {
    slices.emplace_back(bytes.substr(at, size));
  }
  const grpc::ByteBuffer buffer(slices.data(), slices.size());
  std::vector<char> out(n + 1);
  proto::PushRequest header;
  ASSERT_TRUE(DecodeWithTensor(buffer, 3, &header, [&](size_t, size_t) -> absl::StatusOr<void*> {
                return static_cast<void*>(out.data() + 1);
              }).ok());
  EXPECT_EQ(header.key(), 5);
  EXPECT_EQ(std::memcmp(out.data() + 1, values.data(), n), 0);
}

TEST(Wire, EmptyTensorCallsTheSinkWithZeroBytes) {
  proto::PushRequest h = Header(1, 0);
  size_t got = 99;
  proto::PushRequest header;
  ASSERT_TRUE(DecodeWithTensor(Buffer(h.SerializeAsString()), 3, &header,
                               [&](size_t, size_t bytes) -> absl::StatusOr<void*> {
                                 got = bytes;
                                 return nullptr;
                               })
                  .ok());
  EXPECT_EQ(got, 0u);
}

TEST(Wire, BadBytesAreErrors) {
  auto sink = [](size_t, size_t) -> absl::StatusOr<void*> {
    static float space[4];
    return static_cast<void*>(space);
  };
  proto::PushRequest header;
  // Truncated: the data field claims more bytes than the message holds.
  proto::PushRequest big = Header(1, 4);
  big.mutable_value()->set_data(std::string(16, 'x'));
  std::string bytes = big.SerializeAsString();
  EXPECT_FALSE(DecodeWithTensor(Buffer(bytes.substr(0, bytes.size() - 3)), 3, &header, sink).ok());
  // A group wire type (unused by mx.proto).
  EXPECT_FALSE(DecodeWithTensor(Buffer(std::string("\x0b", 1)), 3, &header, sink).ok());
  // Data twice.
  proto::Tensor twice;
  twice.set_data(std::string(4, 'a'));
  std::string t = twice.SerializeAsString() + twice.SerializeAsString();
  proto::PushRequest wrapper;
  std::string msg = std::string("\x1a", 1) + static_cast<char>(t.size()) + t;
  absl::Status s = DecodeWithTensor(Buffer(msg), 3, &header, sink);
  EXPECT_THAT(s.message(), HasSubstr("twice"));
  // What protobuf's parser refuses and CodedInputStream alone would take:
  // a tensor field longer than what is left of the message (its contents
  // so far well-formed), field number 0, a tag or a length of more than
  // 5 bytes.
  for (const std::string& refused :
       {std::string("\x08\x07\x1a\x16", 4),
        std::string("\x08\x07\x01", 3) + std::string(8, 'x'),
        std::string("\x88\x80\x80\x80\x80\x00\x07", 7),
        std::string("\x1a\x82\x80\x80\x80\x80\x00\x08\x01", 9)}) {
    SCOPED_TRACE(absl::BytesToHexString(refused));
    EXPECT_FALSE(proto::PushRequest().ParseFromString(refused));
    EXPECT_EQ(DecodeWithTensor(Buffer(refused), 3, &header, sink).code(),
              absl::StatusCode::kInvalidArgument);
  }
  // The sink's refusal is the error.
  s = DecodeWithTensor(Buffer(big.SerializeAsString()), 3, &header,
                       [](size_t, size_t) -> absl::StatusOr<void*> { return absl::DataLossError("no room"); });
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
}

TEST(Wire, TensorShapeChecksSizeDtypeAndDimensions) {
  proto::Tensor t;
  t.add_shape(2);
  t.add_shape(3);
  EXPECT_TRUE(TensorShape(t, 24).ok());
  EXPECT_THAT(TensorShape(t, 20).status().message(), HasSubstr("carries 20 bytes, expected 24"));
  t.add_shape(-1);
  EXPECT_FALSE(TensorShape(t, 0).ok());
  proto::Tensor huge;
  for (int i = 0; i < 4; ++i) huge.add_shape(1 << 20);
  EXPECT_THAT(TensorShape(huge, 0).status().message(), HasSubstr("too large"));
}

// A sink that checks the range it is given lies in the buffer, and puts
// the data in *data: it takes them (the decoder copies them there) or, if
// `leave`, leaves them in place and reads them with PiecesOf.
TensorSink CheckingSink(const Slices& slices, size_t total, bool leave, std::string* data) {
  return [=](size_t offset, size_t bytes) -> absl::StatusOr<void*> {
    EXPECT_LE(offset + bytes, total) << "the sink was given a range beyond the buffer";
    data->resize(bytes);
    if (!leave) return static_cast<void*>(data->data());
    absl::StatusOr<Pieces> pieces = PiecesOf(slices, offset, bytes);
    EXPECT_TRUE(pieces.ok()) << pieces.status();
    if (!pieces.ok()) return pieces.status();
    EXPECT_EQ(pieces->bytes(), bytes);
    pieces->CopyTo(0, bytes, data->data());
    return nullptr;
  };
}

// Damaged messages (the bytes of a push, of several, cut into slices at
// random) decode or fail with an error, never reading outside the buffer;
// whatever decodes is what protobuf's own parser reads from the same bytes.
// 20000 cases from a fixed seed.
TEST(Wire, DamagedMessagesFailCleanlyAndWhatDecodesIsProtobufs) {
  std::mt19937 rng(20261202);
  proto::PushRequest push = Header(7, 5);
  const std::vector<float> values = {1, 2, 3, 4, 5};
  const std::string own = Flatten(ToByteBuffer(EncodeTensorMessage(
      push, kPushValueField, Pieces::Of(values.data(), values.size(), nullptr))));
  proto::PushRequest plain = push;
  plain.mutable_value()->set_data(std::string(reinterpret_cast<const char*>(values.data()), 20));
  proto::PushPullManyRequest many;
  *many.add_entries() = plain;
  *many.add_entries() = Header(8, 0);
  *many.add_entries() = plain;
  const std::vector<std::string> singles = {own, plain.SerializeAsString()};
  const std::string repeated = many.SerializeAsString();
  int decoded = 0, refused = 0;
  for (int i = 0; i < 20000; ++i) {
    SCOPED_TRACE(absl::StrCat("case ", i));
    const bool as_many = i % 3 == 2;
    const std::string bytes =
        i < 3 ? (as_many ? repeated : singles[i % 2])  // the undamaged messages first
              : testing::Mutate(as_many ? repeated : singles[i % 2], &rng);
    const grpc::ByteBuffer buffer = testing::Sliced(bytes, &rng);
    absl::StatusOr<Slices> slices = SlicesOf(buffer);
    ASSERT_TRUE(slices.ok());
    if (!as_many) {
      proto::PushRequest header;
      std::string data;
      const absl::Status s = DecodeWithTensor(buffer, kPushValueField, &header,
                                              CheckingSink(*slices, bytes.size(), i / 2 % 2, &data));
      if (i < 3) {
        ASSERT_TRUE(s.ok()) << s;  // the undamaged messages decode
      }
      if (!s.ok()) {
        ++refused;
        continue;
      }
      ++decoded;
      proto::PushRequest reference;
      ASSERT_TRUE(reference.ParseFromString(bytes))
          << "decoded what protobuf refuses: " << absl::BytesToHexString(bytes);
      EXPECT_EQ(header.key(), reference.key());
      EXPECT_EQ(header.rank(), reference.rank());
      EXPECT_EQ(header.min_version(), reference.min_version());
      EXPECT_THAT(header.value().shape(), ::testing::ElementsAreArray(reference.value().shape()));
      EXPECT_EQ(header.value().dtype(), reference.value().dtype());
      EXPECT_EQ(data, reference.value().data());
      continue;
    }
    std::deque<proto::PushRequest> headers;  // stable addresses
    std::deque<std::string> data;
    const absl::Status s = DecodeRepeated(
        buffer, kManyEntriesField, kPushValueField, [&](int) { return &headers.emplace_back(); },
        [&](int e) { return CheckingSink(*slices, bytes.size(), e % 2, &data.emplace_back()); });
    if (i < 3) {
      ASSERT_TRUE(s.ok()) << s;
    }
    if (!s.ok()) {
      ++refused;
      continue;
    }
    ++decoded;
    proto::PushPullManyRequest reference;
    ASSERT_TRUE(reference.ParseFromString(bytes))
        << "decoded what protobuf refuses: " << absl::BytesToHexString(bytes);
    ASSERT_EQ(static_cast<size_t>(reference.entries_size()), headers.size());
    for (int e = 0; e < reference.entries_size(); ++e) {
      EXPECT_EQ(headers[e].key(), reference.entries(e).key());
      EXPECT_THAT(headers[e].value().shape(),
                  ::testing::ElementsAreArray(reference.entries(e).value().shape()));
      EXPECT_EQ(data[e], reference.entries(e).value().data());
    }
  }
  // Both outcomes occur: the damage is neither always fatal nor harmless.
  EXPECT_GT(decoded, 1000);
  EXPECT_GT(refused, 1000);
}

}  // namespace
}  // namespace mx
