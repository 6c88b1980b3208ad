// Basic vocabulary of mx: the error type, shapes and status macros.
//
// Errors. Anything the outside world controls (a shape, a file, a flag, a
// message) is reported, never CHECK-aborted. Functions that naturally return a
// value (arithmetic on NDArrays) throw mx::Error, which carries an
// absl::StatusCode so that callers on either side of the Status/exception line
// see the same code. Functions that do I/O return absl::Status(Or).
// MX_CHECK is only for mx's own invariants.
#ifndef MX_NDARRAY_BASE_H_
#define MX_NDARRAY_BASE_H_

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace mx {

// An exception that carries a status code. Thrown by NDArray operations on
// bad input and rethrown by the engine to whoever waits on a failed result.
class Error : public std::runtime_error {
 public:
  explicit Error(absl::Status status)
      : std::runtime_error(std::string(status.message())),
        status_(std::move(status)) {}
  const absl::Status& status() const { return status_; }
  absl::StatusCode code() const { return status_.code(); }

 private:
  absl::Status status_;
};

// Throws mx::Error(status) unless it is OK.
inline void ThrowIfError(const absl::Status& status) {
  if (!status.ok()) throw Error(status);
}

// Runs fn; an mx::Error it throws (bad input, a failed engine operation
// rethrown to its waiter) becomes the returned status: the inverse of
// ThrowIfError, for code that reports errors as statuses.
template <typename F>
absl::Status CatchError(F&& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const Error& e) {
    return e.status();
  }
}

// Converts an exception thrown by mx (or anything else) into a Status.
absl::Status StatusFromException(std::exception_ptr e);

// Throws Error(InvalidArgument(StrCat(args...))) when cond is false. For input
// the caller controls; the message must say what was wrong and where.
#define MX_THROW_IF_NOT(cond, ...)                                        \
  do {                                                                    \
    if (!(cond))                                                          \
      throw ::mx::Error(absl::InvalidArgumentError(absl::StrCat(__VA_ARGS__))); \
  } while (0)

// Internal invariants: a failure is a bug in mx, so it aborts with a message.
#define MX_CHECK(cond)                                                   \
  do {                                                                   \
    if (!(cond)) ::mx::internal::CheckFailed(__FILE__, __LINE__, #cond); \
  } while (0)

#define MX_STATUS_CONCAT_INNER_(a, b) a##b
#define MX_STATUS_CONCAT_(a, b) MX_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if expr yields a non-OK status.
#define MX_RETURN_IF_ERROR(expr)                  \
  do {                                            \
    ::absl::Status mx_status_ = (expr);           \
    if (!mx_status_.ok()) return mx_status_;      \
  } while (0)

// MX_ASSIGN_OR_RETURN(auto x, StatusOrExpr): binds the value or returns the
// error.
#define MX_ASSIGN_OR_RETURN(lhs, expr) \
  MX_ASSIGN_OR_RETURN_IMPL_(MX_STATUS_CONCAT_(mx_statusor_, __LINE__), lhs, expr)
#define MX_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

namespace internal {
[[noreturn]] void CheckFailed(const char* file, int line, const char* cond);
}  // namespace internal

// The shape of an NDArray: dimensions in row-major order (the last dimension
// is contiguous). A shape with no dimensions is a scalar of size 1.
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) : dims_(dims) {}
  template <typename It>
  Shape(It begin, It end) : dims_(begin, end) {}

  int ndim() const { return static_cast<int>(dims_.size()); }
  int64_t operator[](int i) const { return dims_[i]; }
  int64_t& operator[](int i) { return dims_[i]; }
  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + dims_.size(); }
  void push_back(int64_t d) { dims_.push_back(d); }

  // Product of the dimensions (1 for a scalar shape).
  int64_t Size() const;
  // The same, or nullopt when it does not fit int64_t (a damaged file's
  // shape, a caller's); 0 when a dimension is 0, however large the others.
  std::optional<int64_t> CheckedSize() const;
  // Number of elements in one step of the first dimension.
  int64_t RowSize() const;
  // True when every dimension is >= 0.
  bool IsValid() const;

  // "(2,3)", as MXNet prints shapes.
  std::string ToString() const;

  friend bool operator==(const Shape& a, const Shape& b) {
    return a.dims_ == b.dims_;
  }
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }

 private:
  absl::InlinedVector<int64_t, 4> dims_;
};

std::ostream& operator<<(std::ostream& os, const Shape& shape);

}  // namespace mx

#endif  // MX_NDARRAY_BASE_H_
