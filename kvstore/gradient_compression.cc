#include "kvstore/gradient_compression.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace mx {
namespace {

// 2-bit codes, 16 to a little-endian 32-bit word, element i at bits 2i.
constexpr uint32_t kPlus = 1, kMinus = 2;  // and 0 for 0

// Branch-free, so that the compiler vectorizes the loops.
float TwoBit(float v, float t) { return (v >= t ? t : 0.0f) + (v <= -t ? -t : 0.0f); }
uint32_t TwoBitCode(float q) {
  return static_cast<uint32_t>(q > 0) * kPlus + static_cast<uint32_t>(q < 0) * kMinus;
}

// Conversions to and from IEEE half (round to nearest, ties to even). The
// compiler's _Float16 conversions are library calls of about 11 ns each
// on x86-64 without -mf16c (1.2 ms for the MLP's 110K gradients); where
// the CPU has F16C (every x86-64 since 2012) 8 convert in one instruction.
void ToHalvesPortable(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const _Float16 h = static_cast<_Float16>(in[i]);
    std::memcpy(out + i, &h, 2);
  }
}
void FromHalvesPortable(const uint16_t* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    _Float16 h;
    std::memcpy(&h, in + i, 2);
    out[i] = static_cast<float>(h);
  }
}

#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) void ToHalvesF16c(const float* in, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  ToHalvesPortable(in + i, n - i, out + i);
}
__attribute__((target("avx,f16c"))) void FromHalvesF16c(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  FromHalvesPortable(in + i, n - i, out + i);
}
const bool kF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#else
constexpr bool kF16c = false;
void ToHalvesF16c(const float* in, int64_t n, uint16_t* out) { ToHalvesPortable(in, n, out); }
void FromHalvesF16c(const uint16_t* in, int64_t n, float* out) { FromHalvesPortable(in, n, out); }
#endif

void ToHalves(const float* in, int64_t n, uint16_t* out) {
  kF16c ? ToHalvesF16c(in, n, out) : ToHalvesPortable(in, n, out);
}
void FromHalves(const uint16_t* in, int64_t n, float* out) {
  kF16c ? FromHalvesF16c(in, n, out) : FromHalvesPortable(in, n, out);
}

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
    // Checked as the float32 it travels as: 1e-50 would be 0, 1e39 inf.
    double v = 0;
    const bool number = absl::SimpleAtod(threshold->second, &v);
    const float f = static_cast<float>(v);
    if (!number || !(f > 0) || !std::isfinite(f)) {
      return absl::InvalidArgumentError(
          absl::StrCat("gradient compression: threshold '", threshold->second,
                       "' must be a float32 number above 0 and below infinity"));
    }
    c.threshold = f;
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
  if (c.type == GradientCompression::Type::kFp16) {
    // In blocks: v = g + r, q = half(v), r = v - q. A finite v beyond
    // half's range is sent as the largest half and the excess kept, where
    // half(v) would be inf and the residual -inf, then NaN for good. A
    // non-finite v (a diverged gradient) is sent as it is, residual 0.
    constexpr int64_t kBlock = 256;
    constexpr float kHalfMax = 65504.0f;
    float v[kBlock];
    uint16_t h[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      for (int64_t i = 0; i < m; ++i) {
        const float x = g[b + i] + residual[b + i];
        v[i] = std::isfinite(x) ? std::clamp(x, -kHalfMax, kHalfMax) : x;
        residual[b + i] = std::isfinite(x) ? x - v[i] : 0.0f;
      }
      ToHalves(v, m, h);
      FromHalves(h, m, out + b);
      for (int64_t i = 0; i < m; ++i) {
        if (std::isfinite(v[i])) residual[b + i] += v[i] - out[b + i];
      }
    }
    return;
  }
  if (c.type == GradientCompression::Type::kNone) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = g[i] + residual[i];
      residual[i] = 0;
    }
    return;
  }
  const float t = c.threshold;
  for (int64_t i = 0; i < n; ++i) {
    const float v = g[i] + residual[i];
    const float q = TwoBit(v, t);
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
        if (w * 16 + 16 <= n) {
          for (int k = 0; k < 16; ++k) word |= TwoBitCode(q[w * 16 + k]) << (2 * k);
        } else {
          for (int64_t i = w * 16; i < n; ++i) word |= TwoBitCode(q[i]) << (2 * (i - w * 16));
        }
        std::memcpy(out + 4 * w, &word, 4);  // little-endian hosts only, as float32 data
      }
      return;
    case GradientCompression::Type::kFp16: {
      std::vector<uint16_t> h(n);
      ToHalves(q, n, h.data());
      std::memcpy(out, h.data(), 2 * static_cast<size_t>(n));
      return;
    }
    case GradientCompression::Type::kNone:
      std::memcpy(out, q, static_cast<size_t>(n) * 4);
      return;
  }
}

absl::Status CheckPacked(const GradientCompression& c, size_t bytes, int64_t n) {
  if (bytes == PackedBytes(c, n)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(c.ToString(), " data of ", n, " values takes ",
                                                 PackedBytes(c, n), " bytes, not ", bytes));
}

absl::Status Unpack(const GradientCompression& c, const uint8_t* in, size_t bytes, int64_t n,
                    float* out) {
  if (absl::Status s = CheckPacked(c, bytes, n); !s.ok()) return s;
  switch (c.type) {
    case GradientCompression::Type::kTwoBit: {
      const float values[4] = {0.0f, c.threshold, -c.threshold, 0.0f};  // by code
      for (int64_t w = 0; w < (n + 15) / 16; ++w) {
        uint32_t word;
        std::memcpy(&word, in + 4 * w, 4);
        // Code 3 is never written: where a word has one (both bits of a
        // pair set), say which element.
        const uint32_t bad = word & (word >> 1) & 0x55555555u;
        if (bad != 0) {
          const int64_t i = w * 16 + __builtin_ctz(bad) / 2;
          if (i < n) return absl::InvalidArgumentError(absl::StrCat("2bit data: bad code 3 at element ", i));
        }
        for (int64_t i = w * 16; i < std::min<int64_t>(n, w * 16 + 16); ++i) {
          out[i] = values[(word >> (2 * (i - w * 16))) & 3];
        }
      }
      return absl::OkStatus();
    }
    case GradientCompression::Type::kFp16: {
      std::vector<uint16_t> h(n);
      std::memcpy(h.data(), in, bytes);
      FromHalves(h.data(), n, out);
      return absl::OkStatus();
    }
    case GradientCompression::Type::kNone:
      std::memcpy(out, in, bytes);
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

}  // namespace mx
