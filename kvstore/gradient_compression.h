// Gradient compression for the distributed stores (MXNet's
// set_gradient_compression): a worker sends each pushed gradient in fewer
// bytes, keeping what the compression lost (the residual) and adding it to
// its next push of the key (error feedback), so nothing is lost for good,
// only late. Servers decompress before summing; pulls stay float32.
//
//   type "2bit" (threshold t > 0): each element of gradient + residual is
//     sent as +t (when >= t), -t (when <= -t) or 0, in 2 bits: 1/16 of the
//     float32 bytes. MXNet's scheme, with its default t = 0.5.
//   type "fp16": each element of gradient + residual is rounded to IEEE
//     half precision (nearest, ties to even): half the bytes.
//   type "none": float32 as is.
//
// Quantize is lossy and runs once per push (it updates the residual);
// Pack and Unpack are exact for Quantize's output, so a push sent again
// (replicas' failover) sends the same values.
#ifndef MX_KVSTORE_GRADIENT_COMPRESSION_H_
#define MX_KVSTORE_GRADIENT_COMPRESSION_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mx {

struct GradientCompression {
  enum class Type { kNone, kTwoBit, kFp16 };
  Type type = Type::kNone;
  float threshold = 0.5f;  // kTwoBit

  // From MXNet's parameters: {"type": "2bit" | "fp16" | "none",
  // "threshold": t (2bit only, > 0; default 0.5)}. Anything else is
  // INVALID_ARGUMENT naming the parameter and the value.
  static absl::StatusOr<GradientCompression> FromParams(
      const std::map<std::string, std::string>& params);
  bool enabled() const { return type != Type::kNone; }
  std::string ToString() const;  // "2bit (threshold 0.5)", "fp16", "none"
};

// out[i] = the compressed value of g[i] + residual[i]; residual[i] = what
// it lost. out may be g; residual starts at zeros.
void Quantize(const GradientCompression& c, const float* g, int64_t n, float* residual, float* out);

// The bytes n values take on the wire.
size_t PackedBytes(const GradientCompression& c, int64_t n);

// INVALID_ARGUMENT unless `bytes` is PackedBytes(c, n): a receiver checks
// this before it allocates for the n values a message claims.
absl::Status CheckPacked(const GradientCompression& c, size_t bytes, int64_t n);
// Writes n values of Quantize's output in PackedBytes(c, n) bytes.
void Pack(const GradientCompression& c, const float* q, int64_t n, uint8_t* out);

// Reads n values from `bytes` bytes written by Pack. A size other than
// PackedBytes(c, n) or a 2-bit code Pack never writes is INVALID_ARGUMENT.
absl::Status Unpack(const GradientCompression& c, const uint8_t* in, size_t bytes, int64_t n,
                    float* out);

}  // namespace mx

#endif  // MX_KVSTORE_GRADIENT_COMPRESSION_H_
