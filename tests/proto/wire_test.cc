// The tensor-carrying wire encoding: what EncodeTensorMessage writes is the
// protobuf message of mx.proto to any protobuf reader, DecodeWithTensor
// reads what any protobuf writer writes, and bad bytes are errors.
#include "proto/wire.h"

#include <cstring>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

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

}  // namespace
}  // namespace mx
