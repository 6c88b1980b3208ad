// Internal: parsing of the string options that create optimizers and
// learning-rate schedulers. Every error is kInvalidArgument and names where
// the option was given, the option and the value.
#ifndef MX_KVSTORE_OPTIONS_H_
#define MX_KVSTORE_OPTIONS_H_

#include <cstdint>
#include <limits>
#include <string>

#include "absl/status/statusor.h"

namespace mx::internal {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// A numeric option: its default and the closed range [lo, hi] it must lie in
// (half-open [lo, hi) when hi_open).
struct NumberSpec {
  const char* key;
  double default_value;
  double lo = -kInf;
  double hi = kInf;
  bool hi_open = false;
};

// A finite number within spec's range. `where` starts the error message
// ("adam", "lr_scheduler factor").
absl::StatusOr<double> ParseNumber(const std::string& where,
                                   const NumberSpec& spec,
                                   const std::string& value);

// A base-10 integer >= lo.
absl::StatusOr<int64_t> ParseInteger(const std::string& where,
                                     const std::string& key,
                                     const std::string& value, int64_t lo);

// The shortest decimal form that parses back to exactly v.
std::string FormatNumber(double v);
// The same for a float, parsed back as a float ("0.1" for 0.1f).
std::string FormatFloat(float v);

}  // namespace mx::internal

#endif  // MX_KVSTORE_OPTIONS_H_
