#include "kvstore/gradient_compression.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace mx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

GradientCompression TwoBit(float threshold) {
  GradientCompression c;
  c.type = GradientCompression::Type::kTwoBit;
  c.threshold = threshold;
  return c;
}

TEST(GradientCompressionTest, ParametersAsMXNetTakesThem) {
  auto c = GradientCompression::FromParams({{"type", "2bit"}, {"threshold", "0.25"}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->type, GradientCompression::Type::kTwoBit);
  EXPECT_EQ(c->threshold, 0.25f);
  EXPECT_EQ(c->ToString(), "2bit (threshold 0.25)");
  EXPECT_EQ(GradientCompression::FromParams({{"type", "2bit"}})->threshold, 0.5f);
  EXPECT_EQ(GradientCompression::FromParams({{"type", "fp16"}})->type, GradientCompression::Type::kFp16);
  EXPECT_FALSE(GradientCompression::FromParams({})->enabled());
}

TEST(GradientCompressionTest, BadParametersNameWhatIsWrong) {
  auto message = [](std::map<std::string, std::string> p) {
    return std::string(GradientCompression::FromParams(p).status().message());
  };
  EXPECT_THAT(message({{"type", "1bit"}}), HasSubstr("unknown type '1bit' (known: 2bit, fp16, none)"));
  // 1e-50 and 1e39 are doubles above 0 but float32 0 and inf.
  for (const char* t : {"0", "-1", "nan", "inf", "half", "1e-50", "1e39"}) {
    EXPECT_THAT(message({{"type", "2bit"}, {"threshold", t}}),
                HasSubstr(std::string("threshold '") + t +
                          "' must be a float32 number above 0 and below infinity"));
  }
  EXPECT_THAT(message({{"type", "fp16"}, {"threshold", "0.5"}}),
              HasSubstr("'threshold' applies to type 2bit, not fp16"));
  EXPECT_THAT(message({{"type", "2bit"}, {"threshhold", "0.5"}}),
              HasSubstr("unknown parameter 'threshhold'"));
}

// MXNet's 2-bit scheme: +-t where gradient + residual reaches it, else 0;
// the residual keeps the rest and is added to the next push.
TEST(GradientCompressionTest, TwoBitKeepsWhatItLostForTheNextPush) {
  const GradientCompression c = TwoBit(0.5f);
  const std::vector<float> g = {0.3f, 0.6f, -0.7f, 0.1f, -0.5f};
  std::vector<float> residual(g.size(), 0.0f), q(g.size());
  Quantize(c, g.data(), g.size(), residual.data(), q.data());
  EXPECT_THAT(q, ElementsAre(0.0f, 0.5f, -0.5f, 0.0f, -0.5f));
  EXPECT_THAT(residual, ElementsAre(0.3f, 0.6f - 0.5f, -0.7f + 0.5f, 0.1f, 0.0f));
  Quantize(c, g.data(), g.size(), residual.data(), q.data());
  EXPECT_THAT(q, ElementsAre(0.5f, 0.5f, -0.5f, 0.0f, -0.5f));
  // Over both pushes nothing is lost: sent + residual = what was pushed.
  const std::vector<float> sent = {0.5f, 1.0f, -1.0f, 0.0f, -1.0f};
  for (size_t i = 0; i < g.size(); ++i) EXPECT_FLOAT_EQ(sent[i] + residual[i], 2 * g[i]) << i;
}

TEST(GradientCompressionTest, Fp16RoundsToNearestHalf) {
  GradientCompression c;
  c.type = GradientCompression::Type::kFp16;
  const std::vector<float> g = {1.0f, 1.0f + 1.0f / 4096, 65504.0f, -3.14159f};
  std::vector<float> residual(g.size(), 0.0f), q(g.size());
  Quantize(c, g.data(), g.size(), residual.data(), q.data());
  EXPECT_THAT(q, ElementsAre(1.0f, 1.0f, 65504.0f, -3.140625f));  // 2^-12 is below half's step
  EXPECT_FLOAT_EQ(residual[1], 1.0f / 4096);
}

// Beyond half's range a push sends 65504 and keeps the rest for later:
// rounding 70000 to inf made the residual -inf, then NaN on every push.
TEST(GradientCompressionTest, Fp16KeepsWhatIsBeyondHalfsRange) {
  GradientCompression c;
  c.type = GradientCompression::Type::kFp16;
  std::vector<float> g = {70000.0f, -1e30f}, residual(2, 0.0f), q(2);
  Quantize(c, g.data(), g.size(), residual.data(), q.data());
  EXPECT_THAT(q, ElementsAre(65504.0f, -65504.0f));
  EXPECT_THAT(residual, ElementsAre(70000.0f - 65504.0f, -1e30f + 65504.0f));
  g = {0.0f, 0.0f};
  Quantize(c, g.data(), g.size(), residual.data(), q.data());
  EXPECT_THAT(q, ElementsAre(4496.0f, -65504.0f));
  EXPECT_THAT(residual, ElementsAre(0.0f, -1e30f + 2 * 65504.0f));
  // A diverged gradient is sent as it is and does not stay in the residual.
  g = {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  residual = {0.0f, 0.0f};
  Quantize(c, g.data(), g.size(), residual.data(), q.data());
  EXPECT_EQ(q[0], std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(q[1]));
  EXPECT_THAT(residual, ElementsAre(0.0f, 0.0f));
  g = {1.0f, 2.0f};
  Quantize(c, g.data(), g.size(), residual.data(), q.data());
  EXPECT_THAT(q, ElementsAre(1.0f, 2.0f));
}

TEST(GradientCompressionTest, PackIsExactForQuantizedValuesAndSmall) {
  const GradientCompression two = TwoBit(0.25f);
  std::vector<float> q(17);
  for (size_t i = 0; i < q.size(); ++i) q[i] = (i % 3 == 0) ? 0.25f : (i % 3 == 1 ? -0.25f : 0.0f);
  ASSERT_EQ(PackedBytes(two, 17), 8u);  // 16 per 32-bit word, rounded up
  std::vector<uint8_t> bytes(8);
  Pack(two, q.data(), 17, bytes.data());
  std::vector<float> back(17);
  ASSERT_TRUE(Unpack(two, bytes.data(), bytes.size(), 17, back.data()).ok());
  EXPECT_EQ(back, q);

  GradientCompression half;
  half.type = GradientCompression::Type::kFp16;
  EXPECT_EQ(PackedBytes(half, 17), 34u);
  const std::vector<float> h = {1.5f, -0.099975586f, 2048.0f};  // all exact halves
  std::vector<uint8_t> hb(6);
  Pack(half, h.data(), 3, hb.data());
  std::vector<float> hback(3);
  ASSERT_TRUE(Unpack(half, hb.data(), hb.size(), 3, hback.data()).ok());
  EXPECT_EQ(hback, h);
}

TEST(GradientCompressionTest, DamagedDataIsAnError) {
  const GradientCompression two = TwoBit(0.5f);
  std::vector<uint8_t> bytes(8, 0);
  std::vector<float> out(17);
  absl::Status s = Unpack(two, bytes.data(), 4, 17, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("2bit (threshold 0.5) data of 17 values takes 8 bytes, not 4"));
  bytes[4] = 0x03;  // the last element (16) has code 3
  s = Unpack(two, bytes.data(), 8, 17, out.data());
  EXPECT_THAT(s.message(), HasSubstr("bad code 3 at element 16"));
}

}  // namespace
}  // namespace mx
