// Internal helpers for NDArray operations: argument checks and pushing
// kernels to the engine.
#ifndef MX_NDARRAY_OP_UTIL_H_
#define MX_NDARRAY_OP_UTIL_H_

#include <functional>
#include <initializer_list>
#include <vector>

#include "ndarray/ndarray.h"

namespace mx::internal {

// Throws kInvalidArgument naming `op` when an array is null or the arrays
// are not all on one context (only copies move data between contexts).
void RequireSameContext(const char* op, std::initializer_list<const NDArray*> arrays);

// Throws kInvalidArgument naming `op` unless a and b have equal shapes.
void RequireSameShape(const char* op, const NDArray& a, const NDArray& b);

// Pushes fn to the engine, reading the vars of `reads` and writing those of
// `writes`. fn may throw; the error is stored on `writes`. On a GPU context
// fn enqueues work on the device's compute stream (ndarray/launch.h) and the
// operation completes once the stream has run it.
void PushKernel(const char* name, Context ctx,
                std::initializer_list<const NDArray*> reads,
                std::initializer_list<const NDArray*> writes,
                std::function<void()> fn, int priority = 0,
                FnProperty prop = FnProperty::kNormal);

}  // namespace mx::internal

#endif  // MX_NDARRAY_OP_UTIL_H_
