// How compressed pushes are described on the wire (proto/mx.proto, Tensor):
// the one mapping between GradientCompression and a tensor's dtype (and
// threshold), for the workers that write them and the servers that read
// them.
#ifndef MX_KVSTORE_COMPRESSION_WIRE_H_
#define MX_KVSTORE_COMPRESSION_WIRE_H_

#include "absl/status/statusor.h"
#include "kvstore/gradient_compression.h"
#include "proto/mx.pb.h"

namespace mx {

// Sets t's dtype (and threshold) for values packed by c (FLOAT32: none).
void DescribePacked(const GradientCompression& c, proto::Tensor* t);

// The compression t's dtype names (FLOAT32: none). Another dtype, or a
// TWO_BIT without a finite threshold above 0, is INVALID_ARGUMENT
// "unsupported dtype N".
absl::StatusOr<GradientCompression> CompressionOf(const proto::Tensor& t);

}  // namespace mx

#endif  // MX_KVSTORE_COMPRESSION_WIRE_H_
