#include "kvstore/compression_wire.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace mx {

void DescribePacked(const GradientCompression& c, proto::Tensor* t) {
  switch (c.type) {
    case GradientCompression::Type::kNone:
      t->set_dtype(proto::FLOAT32);
      return;
    case GradientCompression::Type::kFp16:
      t->set_dtype(proto::FLOAT16);
      return;
    case GradientCompression::Type::kTwoBit:
      t->set_dtype(proto::TWO_BIT);
      t->set_threshold(c.threshold);
      return;
  }
}

absl::StatusOr<GradientCompression> CompressionOf(const proto::Tensor& t) {
  GradientCompression c;
  if (t.dtype() == proto::FLOAT32) return c;
  if (t.dtype() == proto::FLOAT16) {
    c.type = GradientCompression::Type::kFp16;
    return c;
  }
  if (t.dtype() == proto::TWO_BIT && t.threshold() > 0 && std::isfinite(t.threshold())) {
    c.type = GradientCompression::Type::kTwoBit;
    c.threshold = t.threshold();
    return c;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unsupported dtype ", t.dtype(),
      t.dtype() == proto::TWO_BIT ? absl::StrCat(" with threshold ", t.threshold()) : ""));
}

}  // namespace mx
