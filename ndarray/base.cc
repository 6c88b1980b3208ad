#include "ndarray/base.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "absl/strings/str_join.h"

namespace mx {

absl::Status StatusFromException(std::exception_ptr e) {
  if (e == nullptr) return absl::OkStatus();
  try {
    std::rethrow_exception(e);
  } catch (const Error& err) {
    return err.status();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory");
  } catch (const std::exception& err) {
    return absl::InternalError(err.what());
  } catch (...) {
    return absl::UnknownError("unknown exception");
  }
}

namespace internal {
void CheckFailed(const char* file, int line, const char* cond) {
  std::fprintf(stderr, "mx internal error: %s:%d: check failed: %s\n", file,
               line, cond);
  std::abort();
}
}  // namespace internal

int64_t Shape::Size() const {
  int64_t n = 1;
  for (int64_t d : dims_) n *= d;
  return n;
}

std::optional<int64_t> Shape::CheckedSize() const {
  if (std::find(dims_.begin(), dims_.end(), 0) != dims_.end()) return 0;
  int64_t n = 1;
  for (int64_t d : dims_) {
    if (d > 0 && n > std::numeric_limits<int64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  return n;
}

int64_t Shape::RowSize() const {
  int64_t n = 1;
  for (size_t i = 1; i < dims_.size(); ++i) n *= dims_[i];
  return n;
}

bool Shape::IsValid() const {
  for (int64_t d : dims_) {
    if (d < 0) return false;
  }
  return true;
}

std::string Shape::ToString() const {
  if (dims_.size() == 1) return absl::StrCat("(", dims_[0], ",)");
  return absl::StrCat("(", absl::StrJoin(dims_, ","), ")");
}

std::ostream& operator<<(std::ostream& os, const Shape& shape) {
  return os << shape.ToString();
}

}  // namespace mx
