#include "kvstore/options.h"

#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace mx::internal {

absl::StatusOr<double> ParseNumber(const std::string& where,
                                   const NumberSpec& spec,
                                   const std::string& value) {
  double v = 0;
  if (!absl::SimpleAtod(value, &v) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": option '",
                                                   spec.key, "' = '", value,
                                                   "' is not a finite number"));
  }
  // In range as a double, and as the float the updates use (Adam's beta1
  // 0.99999999999 is 1 in float32, and its mean then never moves).
  const double f = static_cast<float>(v);
  auto outside = [&](double x) {
    return x < spec.lo || (spec.hi_open ? x >= spec.hi : x > spec.hi);
  };
  if (outside(v) || outside(f)) {
    std::string range;
    if (spec.hi == kInf) {
      range = absl::StrCat(">= ", FormatNumber(spec.lo));
    } else {
      range = absl::StrCat("in [", FormatNumber(spec.lo), ", ",
                           FormatNumber(spec.hi), spec.hi_open ? ")" : "]");
    }
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": option '", spec.key, "' = ", value, " must be ", range,
                     outside(v) ? "" : absl::StrCat(" (in float32 it is ", FormatNumber(f), ")")));
  }
  return v;
}

absl::StatusOr<int64_t> ParseInteger(const std::string& where,
                                     const std::string& key,
                                     const std::string& value, int64_t lo) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(value, &v)) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": option '", key, "' = '", value, "' is not an integer"));
  }
  if (v < lo) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": option '", key, "' = ", value, " must be >= ", lo));
  }
  return v;
}

std::string FormatNumber(double v) {
  for (int precision = 6; precision < 17; ++precision) {
    std::string s = absl::StrFormat("%.*g", precision, v);
    double back = 0;
    if (absl::SimpleAtod(s, &back) && back == v) return s;
  }
  return absl::StrFormat("%.17g", v);
}

std::string FormatFloat(float v) {
  for (int precision = 6; precision < 9; ++precision) {
    std::string s = absl::StrFormat("%.*g", precision, v);
    float back = 0;
    if (absl::SimpleAtof(s, &back) && back == v) return s;
  }
  return absl::StrFormat("%.9g", v);
}

}  // namespace mx::internal
