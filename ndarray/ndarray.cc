#include "ndarray/ndarray.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ndarray/device.h"
#include "ndarray/launch.h"
#include "ndarray/op_util.h"
#include "ndarray/storage.h"

namespace mx {

// Storage and its engine variable. The chunk keeps the engine and the
// storage alive, and frees its memory through the engine, after every
// operation pushed on it so far has completed; so engine operations may
// capture raw data pointers of the arrays they declare.
struct NDArray::Chunk {
  Chunk(int64_t elements, Context ctx)
      : ctx(ctx), engine(Engine::Shared()), storage(Storage::Shared()) {
    absl::StatusOr<StorageHandle> h =
        storage->Alloc(static_cast<size_t>(elements) * sizeof(float), ctx);
    ThrowIfError(h.status());
    handle = *h;
    var = engine->NewVariable();
  }
  ~Chunk() {
    engine->DeleteVariable(
        [storage = storage, handle = handle](RunContext) {
          storage->Free(handle);
        },
        ctx, var);
  }
  Context ctx;
  std::shared_ptr<Engine> engine;
  std::shared_ptr<Storage> storage;
  StorageHandle handle;
  VarHandle var = nullptr;
};

namespace internal {

void RequireSameContext(const char* op, std::initializer_list<const NDArray*> arrays) {
  const NDArray* first = nullptr;
  for (const NDArray* a : arrays) {
    if (a->is_none()) {
      throw Error(absl::InvalidArgumentError(
          absl::StrCat(op, ": an argument is a null NDArray")));
    }
    if (first == nullptr) {
      first = a;
    } else if (a->context() != first->context()) {
      throw Error(absl::InvalidArgumentError(absl::StrCat(
          op, ": arguments on different contexts, ", first->context().ToString(), " and ",
          a->context().ToString(), "; Copy one to the other's context first")));
    }
  }
}

void RequireSameShape(const char* op, const NDArray& a, const NDArray& b) {
  MX_THROW_IF_NOT(a.shape() == b.shape(), op, ": shape mismatch ",
                  a.shape().ToString(), " vs ", b.shape().ToString());
}

void PushKernel(const char* name, Context ctx,
                std::initializer_list<const NDArray*> reads,
                std::initializer_list<const NDArray*> writes,
                std::function<void()> fn, int priority, FnProperty prop) {
  std::vector<VarHandle> read_vars, write_vars;
  read_vars.reserve(reads.size());
  write_vars.reserve(writes.size());
  for (const NDArray* a : reads) read_vars.push_back(a->var());
  for (const NDArray* a : writes) write_vars.push_back(a->var());
  kernel::Push(name, ctx, std::move(read_vars), std::move(write_vars), std::move(fn), priority,
               prop);
}

}  // namespace internal

NDArray::NDArray(const Shape& shape, Context ctx) : shape_(shape) {
  MX_THROW_IF_NOT(shape.IsValid(), "NDArray: invalid shape ", shape.ToString(),
                  ": dimensions must be >= 0");
  // The byte count must not wrap around (to a small block for a huge array).
  const std::optional<int64_t> elements = shape.CheckedSize();
  MX_THROW_IF_NOT(elements.has_value() && *elements <= PTRDIFF_MAX / int64_t{sizeof(float)},
                  "NDArray: shape ", shape.ToString(), " has too many elements to address");
  ThrowIfError(CheckContextAvailable(ctx));
  chunk_ = std::make_shared<Chunk>(shape.Size(), ctx);
}

void NDArray::CheckNotNone(const char* op) const {
  MX_THROW_IF_NOT(!is_none(), op, ": the NDArray is null (default-constructed)");
}

Context NDArray::context() const {
  return is_none() ? Context() : chunk_->ctx;
}

float* NDArray::data() const {
  return is_none() ? nullptr
                   : static_cast<float*>(chunk_->handle.dptr) + offset_;
}

VarHandle NDArray::var() const { return is_none() ? nullptr : chunk_->var; }

NDArray& NDArray::Assign(float value) {
  CheckNotNone("Assign");
  float* dst = data();
  size_t n = size();
  Context ctx = context();
  internal::PushKernel("Assign(scalar)", ctx, {}, {this}, [=] {
    kernel::Launch<kernel::FillKernel>("Assign(scalar)", ctx, n, {dst, value});
  });
  return *this;
}

NDArray& NDArray::Assign(const std::vector<float>& data) {
  SyncCopyFromCPU(data.data(), data.size());
  return *this;
}

NDArray& NDArray::Assign(const NDArray& src) {
  CheckNotNone("Assign");
  src.CheckNotNone("Assign");
  internal::RequireSameShape("Assign", *this, src);
  CopyFromTo(src, *this);
  return *this;
}

void CopyFromTo(const NDArray& from, const NDArray& to, int priority, const char* name) {
  MX_THROW_IF_NOT(!from.is_none() && !to.is_none(), name,
                  ": an argument is a null NDArray (default-constructed)");
  internal::RequireSameShape(name, to, from);
  if (from.SharesStorageWith(to) && from.data() == to.data()) return;
  float* dst = to.data();
  const float* src = from.data();
  const Context dst_ctx = to.context(), src_ctx = from.context();
  const size_t bytes = to.size() * sizeof(float);
  // A GPU side runs the copy on one of its streams (DeviceApi::CopyAsync);
  // the operation completes when the stream has.
  const Context run_ctx = dst_ctx.is_gpu() ? dst_ctx : src_ctx;
  Engine::Get()->PushAsync(
      [=](RunContext, CallbackOnComplete done) {
        internal::DeviceApiFor(run_ctx)->CopyAsync(
            dst, dst_ctx, src, src_ctx, bytes, [done, name](absl::Status s) {
              if (s.ok()) return done();
              done(std::make_exception_ptr(
                  Error(absl::Status(s.code(), absl::StrCat(name, ": ", s.message())))));
            });
      },
      run_ctx, {from.var()}, {to.var()}, priority, name);
}

NDArray NDArray::Copy(Context ctx) const {
  CheckNotNone("Copy");
  NDArray out(shape_, ctx);
  out.Assign(*this);
  return out;
}

void NDArray::SyncCopyToCPU(float* dst, size_t n) const {
  CheckNotNone("SyncCopyToCPU");
  MX_THROW_IF_NOT(n == static_cast<size_t>(size()),
                  "SyncCopyToCPU: host buffer has ", n,
                  " elements but the array ", shape_.ToString(), " has ",
                  size());
  WaitToRead();
  Context ctx = context();
  ThrowIfError(internal::DeviceApiFor(ctx)->Copy(dst, cpu(), data(), ctx,
                                                 n * sizeof(float)));
}

void NDArray::SyncCopyFromCPU(const float* src, size_t n) {
  CheckNotNone("SyncCopyFromCPU");
  MX_THROW_IF_NOT(n == static_cast<size_t>(size()), "Assign: host data has ",
                  n, " elements but the array ", shape_.ToString(), " has ",
                  size());
  WaitToWrite();
  Context ctx = context();
  ThrowIfError(internal::DeviceApiFor(ctx)->Copy(data(), ctx, src, cpu(),
                                                 n * sizeof(float)));
}

std::vector<float> NDArray::ToVector() const {
  std::vector<float> out(is_none() ? 0 : size());
  SyncCopyToCPU(out.data(), out.size());
  return out;
}

float NDArray::Scalar() const {
  MX_THROW_IF_NOT(size() == 1, "Scalar: the array ", shape_.ToString(),
                  " has ", size(), " elements, not 1");
  return ToVector()[0];
}

NDArray NDArray::Slice(int64_t begin, int64_t end) const {
  CheckNotNone("Slice");
  MX_THROW_IF_NOT(ndim() >= 1, "Slice: cannot slice a 0-d array");
  MX_THROW_IF_NOT(0 <= begin && begin <= end && end <= shape_[0],
                  "Slice: range [", begin, ", ", end,
                  ") is out of bounds for the first dimension of shape ",
                  shape_.ToString());
  Shape shape = shape_;
  shape[0] = end - begin;
  return NDArray(chunk_, shape, offset_ + begin * shape_.RowSize());
}

NDArray NDArray::At(int64_t i) const {
  NDArray row = Slice(i, i + 1);
  if (ndim() == 1) return row;  // (1,), as MXNet's NDArray::At
  return NDArray(row.chunk_, Shape(shape_.begin() + 1, shape_.end()), row.offset_);
}

NDArray NDArray::Reshape(const Shape& shape) const {
  CheckNotNone("Reshape");
  Shape target = shape;
  int infer = -1;
  Shape rest;  // the dimensions given
  for (int i = 0; i < target.ndim(); ++i) {
    if (target[i] == -1) {
      MX_THROW_IF_NOT(infer < 0, "Reshape: more than one -1 in ",
                      shape.ToString());
      infer = i;
    } else {
      MX_THROW_IF_NOT(target[i] >= 0, "Reshape: invalid dimension ",
                      target[i], " in ", shape.ToString());
      rest.push_back(target[i]);
    }
  }
  // Their product must not wrap around (to this array's size even, which
  // made a view far beyond its memory).
  const std::optional<int64_t> checked = rest.CheckedSize();
  MX_THROW_IF_NOT(checked.has_value(), "Reshape: shape ", shape.ToString(),
                  " has too many elements");
  const int64_t known = *checked;
  if (infer >= 0) {
    MX_THROW_IF_NOT(known > 0 && size() % known == 0, "Reshape: cannot infer -1 in ",
                    shape.ToString(), " from ", size(), " elements of ",
                    shape_.ToString());
    target[infer] = size() / known;
  }
  MX_THROW_IF_NOT((infer >= 0 ? known * target[infer] : known) == size(),
                  "Reshape: cannot reshape ", shape_.ToString(), " (", size(), " elements) to ",
                  shape.ToString(), " (", target.Size(), " elements)");
  return NDArray(chunk_, target, offset_);
}

void NDArray::WaitToRead() const {
  if (is_none()) return;
  chunk_->engine->WaitForVar(var());
}

void NDArray::WaitToWrite() const {
  if (is_none()) return;
  // Not a no-op write: one ran once an error had been reported, and wiped
  // the array's error as a successful write does.
  chunk_->engine->WaitForVarIdle(var());
}

NDArray Empty(const Shape& shape, Context ctx) { return NDArray(shape, ctx); }

NDArray Full(const Shape& shape, float value, Context ctx) {
  NDArray a(shape, ctx);
  a.Assign(value);
  return a;
}

NDArray Zeros(const Shape& shape, Context ctx) { return Full(shape, 0, ctx); }
NDArray Ones(const Shape& shape, Context ctx) { return Full(shape, 1, ctx); }

NDArray FromVector(const std::vector<float>& data, const Shape& shape,
                   Context ctx) {
  MX_THROW_IF_NOT(static_cast<int64_t>(data.size()) == shape.Size(),
                  "FromVector: host data has ", data.size(),
                  " elements but shape ", shape.ToString(), " needs ",
                  shape.Size());
  NDArray a(shape, ctx);
  a.Assign(data);
  return a;
}

NDArray FromVector(const std::vector<float>& data, Context ctx) {
  return FromVector(data, Shape{static_cast<int64_t>(data.size())}, ctx);
}

void WaitAll() { Engine::Get()->WaitForAll(); }

// ---- Printing.

namespace {

// Julia-like: integral values get ".0", others six significant digits.
std::string FormatValue(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  std::string s = buf;
  if (std::isfinite(v) && s.find_first_of(".en") == std::string::npos) {
    s += ".0";
  }
  return s;
}

constexpr int64_t kEdgeItems = 4;  // shown at each end of an elided axis

// Indices of an axis of length n to show; -1 marks the elision.
std::vector<int64_t> ShownIndices(int64_t n) {
  std::vector<int64_t> idx;
  if (n <= 2 * kEdgeItems + 1) {
    for (int64_t i = 0; i < n; ++i) idx.push_back(i);
  } else {
    for (int64_t i = 0; i < kEdgeItems; ++i) idx.push_back(i);
    idx.push_back(-1);
    for (int64_t i = n - kEdgeItems; i < n; ++i) idx.push_back(i);
  }
  return idx;
}

// Prints a rows x cols matrix stored at v, columns right-aligned.
void PrintMatrix(std::ostream& os, const float* v, int64_t rows, int64_t cols) {
  std::vector<int64_t> ri = ShownIndices(rows), ci = ShownIndices(cols);
  std::vector<std::vector<std::string>> cells;
  std::vector<size_t> width(ci.size(), 0);
  for (int64_t r : ri) {
    std::vector<std::string> line;
    for (size_t j = 0; j < ci.size(); ++j) {
      std::string s = r < 0 ? (ci[j] < 0 ? "⋱" : "⋮")
                            : (ci[j] < 0 ? "…" : FormatValue(v[r * cols + ci[j]]));
      size_t w = (r < 0 || ci[j] < 0) ? 1 : s.size();
      width[j] = std::max(width[j], w);
      line.push_back(std::move(s));
    }
    cells.push_back(std::move(line));
  }
  for (size_t i = 0; i < cells.size(); ++i) {
    for (size_t j = 0; j < cells[i].size(); ++j) {
      bool symbol = ri[i] < 0 || ci[j] < 0;
      size_t w = symbol ? 1 : cells[i][j].size();
      os << (j == 0 ? "" : "  ") << std::string(width[j] - w, ' ')
         << cells[i][j];
    }
    os << "\n";
  }
}

}  // namespace

std::string NDArray::ToString() const {
  if (is_none()) return "NDArray<float> (null)";
  std::ostringstream os;
  if (ndim() == 0) {
    os << "0-dimensional";
  } else {
    os << absl::StrJoin(shape_, "×");
  }
  os << " NDArray<float> @ " << context().ToString() << ":\n";
  std::vector<float> v = ToVector();
  if (size() == 0) return os.str();
  if (ndim() <= 1) {
    PrintMatrix(os, v.data(), ndim() == 0 ? 1 : shape_[0], 1);
    return os.str();
  }
  int64_t rows = shape_[ndim() - 2], cols = shape_[ndim() - 1];
  int64_t blocks = size() / (rows * cols);
  if (blocks == 1) {
    PrintMatrix(os, v.data(), rows, cols);
    return os.str();
  }
  // Higher dimensions: one block per leading index, like Julia's [:, :, k].
  Shape lead(shape_.begin(), shape_.end() - 2);
  for (int64_t b : ShownIndices(blocks)) {
    if (b < 0) {
      os << "⋮\n\n";
      continue;
    }
    std::vector<int64_t> index(lead.ndim());
    for (int64_t rem = b, d = lead.ndim() - 1; d >= 0; --d) {
      index[d] = rem % lead[d];
      rem /= lead[d];
    }
    os << "[" << absl::StrJoin(index, ",") << ",:,:] =\n";
    PrintMatrix(os, v.data() + b * rows * cols, rows, cols);
    os << "\n";
  }
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const NDArray& a) {
  return os << a.ToString();
}

}  // namespace mx
