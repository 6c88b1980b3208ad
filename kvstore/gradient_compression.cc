#include "kvstore/gradient_compression.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace mx {
namespace {

// 2-bit codes, 16 to a little-endian 32-bit word, element i at bits 2i.
constexpr uint32_t kZero = 0, kPlus = 1, kMinus = 2;

float TwoBit(float v, float t) { return v >= t ? t : (v <= -t ? -t : 0.0f); }
float Half(float v) { return static_cast<float>(static_cast<_Float16>(v)); }

}  // namespace

absl::StatusOr<GradientCompression> GradientCompression::FromParams(
    const std::map<std::string, std::string>& params) {
  GradientCompression c;
  for (const auto& [name, value] : params) {
    if (name != "type" && name != "threshold") {
      return absl::InvalidArgumentError(absl::StrCat(
          "gradient compression: unknown parameter '", name, "' (known: type, threshold)"));
    }
  }
  auto type = params.find("type");
  const std::string t = type == params.end() ? "none" : type->second;
  if (t == "2bit") {
    c.type = Type::kTwoBit;
  } else if (t == "fp16") {
    c.type = Type::kFp16;
  } else if (t != "none") {
    return absl::InvalidArgumentError(absl::StrCat(
        "gradient compression: unknown type '", t, "' (known: 2bit, fp16, none)"));
  }
  auto threshold = params.find("threshold");
  if (threshold != params.end()) {
    if (c.type != Type::kTwoBit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gradient compression: 'threshold' applies to type 2bit, not ", t));
    }
    double v = 0;
    if (!absl::SimpleAtod(threshold->second, &v) || !(v > 0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gradient compression: threshold '", threshold->second, "' must be a number above 0"));
    }
    c.threshold = static_cast<float>(v);
  }
  return c;
}

std::string GradientCompression::ToString() const {
  switch (type) {
    case Type::kTwoBit: return absl::StrCat("2bit (threshold ", threshold, ")");
    case Type::kFp16: return "fp16";
    case Type::kNone: break;
  }
  return "none";
}

void Quantize(const GradientCompression& c, const float* g, int64_t n, float* residual, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = g[i] + residual[i];
    float q = v;
    if (c.type == GradientCompression::Type::kTwoBit) q = TwoBit(v, c.threshold);
    if (c.type == GradientCompression::Type::kFp16) q = Half(v);
    residual[i] = v - q;
    out[i] = q;
  }
}

size_t PackedBytes(const GradientCompression& c, int64_t n) {
  switch (c.type) {
    case GradientCompression::Type::kTwoBit: return static_cast<size_t>((n + 15) / 16) * 4;
    case GradientCompression::Type::kFp16: return static_cast<size_t>(n) * 2;
    case GradientCompression::Type::kNone: break;
  }
  return static_cast<size_t>(n) * 4;
}

void Pack(const GradientCompression& c, const float* q, int64_t n, uint8_t* out) {
  switch (c.type) {
    case GradientCompression::Type::kTwoBit:
      for (int64_t w = 0; w < (n + 15) / 16; ++w) {
        uint32_t word = 0;
        for (int64_t i = w * 16; i < std::min<int64_t>(n, w * 16 + 16); ++i) {
          const uint32_t code = q[i] > 0 ? kPlus : (q[i] < 0 ? kMinus : kZero);
          word |= code << (2 * (i - w * 16));
        }
        std::memcpy(out + 4 * w, &word, 4);  // little-endian hosts only, as float32 data
      }
      return;
    case GradientCompression::Type::kFp16:
      for (int64_t i = 0; i < n; ++i) {
        const _Float16 h = static_cast<_Float16>(q[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    case GradientCompression::Type::kNone:
      std::memcpy(out, q, static_cast<size_t>(n) * 4);
      return;
  }
}

absl::Status Unpack(const GradientCompression& c, const uint8_t* in, size_t bytes, int64_t n,
                    float* out) {
  if (bytes != PackedBytes(c, n)) {
    return absl::InvalidArgumentError(absl::StrCat(
        c.ToString(), " data of ", n, " values takes ", PackedBytes(c, n), " bytes, not ", bytes));
  }
  switch (c.type) {
    case GradientCompression::Type::kTwoBit:
      for (int64_t w = 0; w < (n + 15) / 16; ++w) {
        uint32_t word;
        std::memcpy(&word, in + 4 * w, 4);
        for (int64_t i = w * 16; i < std::min<int64_t>(n, w * 16 + 16); ++i) {
          const uint32_t code = (word >> (2 * (i - w * 16))) & 3;
          if (code == 3) {
            return absl::InvalidArgumentError(absl::StrCat("2bit data: bad code 3 at element ", i));
          }
          out[i] = code == kPlus ? c.threshold : (code == kMinus ? -c.threshold : 0.0f);
        }
      }
      return absl::OkStatus();
    case GradientCompression::Type::kFp16:
      for (int64_t i = 0; i < n; ++i) {
        _Float16 h;
        std::memcpy(&h, in + 2 * i, 2);
        out[i] = static_cast<float>(h);
      }
      return absl::OkStatus();
    case GradientCompression::Type::kNone:
      std::memcpy(out, in, bytes);
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

}  // namespace mx
