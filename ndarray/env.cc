#include "ndarray/env.h"

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace mx {

std::string EnvString(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

absl::StatusOr<int64_t> ParseInt(const std::string& what, const std::string& text, int64_t min,
                                 int64_t max) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v) || v < min || v > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, "=", text, ": must be a whole number from ", min, " to ", max));
  }
  return v;
}

absl::StatusOr<std::optional<int64_t>> EnvInt(const char* name, int64_t min, int64_t max) {
  const std::string text = EnvString(name);
  if (text.empty()) return std::nullopt;
  return ParseInt(name, text, min, max);
}

absl::StatusOr<std::optional<bool>> EnvBool(const char* name) {
  const std::string text = EnvString(name);
  if (text.empty()) return std::nullopt;
  if (text != "0" && text != "1") {
    return absl::InvalidArgumentError(absl::StrCat(name, "=", text, ": must be 0 or 1"));
  }
  return text == "1";
}

absl::StatusOr<std::optional<int64_t>> FlagOrEnvInt(const char* flag, const std::string& flag_text,
                                                    const char* env, int64_t min, int64_t max) {
  if (!flag_text.empty()) return ParseInt(absl::StrCat("--", flag), flag_text, min, max);
  return EnvInt(env, min, max);
}

}  // namespace mx
