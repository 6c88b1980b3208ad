// Row-sparse arrays (ndarray/row_sparse.h). Ids are merged and looked up on
// the calling thread (they are host data, fixed when an array is made); the
// values move in engine operations through ndarray/sparse_kernels.h.
#include "ndarray/row_sparse.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"
#include "ndarray/op_util.h"
#include "ndarray/sparse_kernels.h"

namespace mx {
namespace {

using Ids = std::vector<int64_t>;
using SharedIds = std::shared_ptr<const Ids>;

Shape RowsShape(const Shape& shape, int64_t rows) {
  Shape s = shape;
  s[0] = rows;
  return s;
}

void RequireCpu(const char* op, Context ctx) {
  if (!ctx.is_gpu()) return;
  throw Error(absl::UnimplementedError(absl::StrCat(
      op, ": row_sparse arrays live on CPU contexts for now, not ", ctx.ToString())));
}

void RequireSameDenseShape(const char* op, const Shape& a, const Shape& b) {
  MX_THROW_IF_NOT(a == b, op, ": shape mismatch ", a.ToString(), " vs ", b.ToString());
}

// For each id of `ids`, its position among `stored` (both sorted), or -1.
Ids PositionsIn(const Ids& stored, const Ids& ids) {
  Ids pos(ids.size(), -1);
  size_t j = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    while (j < stored.size() && stored[j] < ids[i]) ++j;
    if (j < stored.size() && stored[j] == ids[i]) pos[i] = static_cast<int64_t>(j);
  }
  return pos;
}

// Pushes row kernel K of ndarray/sparse_kernels.h (its Params: dst, src,
// pos, dim) over the n elements of its compact operand: one engine
// operation that reads src and writes *dst.
template <typename K>
void PushRows(const char* name, const NDArray& src, SharedIds pos, NDArray* dst, int64_t dim,
              int64_t n) {
  const Context ctx = dst->context();
  internal::PushKernel(name, ctx, {&src}, {dst}, [src, dst = *dst, pos, dim, name, ctx, n] {
    kernel::Launch<K>(name, ctx, n, {dst.data(), src.data(), pos->data(), dim});
  });
}

// dst[pos[r], :] += src[r, :] (dst dense rows, src compact).
void PushScatterAdd(const char* name, const NDArray& src, SharedIds pos, NDArray* dst,
                    int64_t dim) {
  PushRows<kernel::ScatterAddRowsKernel>(name, src, std::move(pos), dst, dim, src.size());
}

// out[r, :] = src[pos[r], :] (or 0 where pos[r] < 0).
void PushGather(const char* name, const NDArray& src, SharedIds pos, NDArray* out,
                int64_t dim) {
  PushRows<kernel::GatherRowsKernel>(name, src, std::move(pos), out, dim, out->size());
}

// The checks of dense `op` b: b non-null, on dense's context, of its shape.
void RequireDenseRows(const char* op, const NDArray& dense, const RowSparseNDArray& b) {
  MX_THROW_IF_NOT(!b.is_none(), op, ": a null RowSparseNDArray");
  internal::RequireSameContext(op, {&dense, &b.data()});
  RequireSameDenseShape(op, dense.shape(), b.shape());
}

SharedIds Share(Ids ids) { return std::make_shared<const Ids>(std::move(ids)); }

}  // namespace

absl::Status CheckRowIds(const Ids& ids, int64_t num_rows, const std::string& what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= num_rows) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": row id ", ids[i], " at position ",
                                                     i, " is outside [0, ", num_rows, ")"));
    }
    if (i > 0 && ids[i] <= ids[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": row ids must be sorted ascending and unique, but ", ids[i], " at position ", i,
          ids[i] == ids[i - 1] ? " repeats the id before it" : " follows the larger ",
          ids[i] == ids[i - 1] ? "" : absl::StrCat(ids[i - 1])));
    }
  }
  return absl::OkStatus();
}

RowSparseNDArray::RowSparseNDArray(const Shape& shape, Context ctx)
    : RowSparseNDArray(shape, {}, NDArray(shape.ndim() >= 1 ? RowsShape(shape, 0) : Shape{0}, ctx)) {}

RowSparseNDArray::RowSparseNDArray(const Shape& shape, Ids indices, NDArray data)
    : shape_(shape) {
  MX_THROW_IF_NOT(shape.ndim() >= 1 && shape.IsValid(), "RowSparseNDArray: invalid shape ",
                  shape.ToString(), " (at least one dimension, none negative)");
  MX_THROW_IF_NOT(!data.is_none(), "RowSparseNDArray: the data is a null NDArray");
  RequireCpu("RowSparseNDArray", data.context());
  ThrowIfError(CheckRowIds(indices, shape[0], "RowSparseNDArray " + shape.ToString()));
  const Shape want = RowsShape(shape, static_cast<int64_t>(indices.size()));
  MX_THROW_IF_NOT(data.shape() == want, "RowSparseNDArray ", shape.ToString(), ": ",
                  indices.size(), " row ids need data of shape ", want.ToString(), ", not ",
                  data.shape().ToString());
  indices_ = Share(std::move(indices));
  data_ = std::move(data);
}

NDArray RowSparseNDArray::ToDense() const {
  NDArray dense = Zeros(shape_, context());
  dense += *this;
  return dense;
}

RowSparseNDArray RowSparseNDArray::Copy(Context ctx) const {
  RequireCpu("RowSparseNDArray::Copy", ctx);
  RowSparseNDArray out = *this;
  out.data_ = data_.Copy(ctx);
  return out;
}

RowSparseNDArray& RowSparseNDArray::operator*=(float s) {
  data_ *= s;
  return *this;
}

std::string RowSparseNDArray::ToString() const {
  if (is_none()) return "RowSparseNDArray<float> (null)";
  std::ostringstream os;
  os << absl::StrJoin(shape_, "×") << " RowSparseNDArray<float> @ " << context().ToString()
     << ", " << nnz() << (nnz() == 1 ? " stored row" : " stored rows");
  if (nnz() == 0) return os.str() + "\n";
  const Ids& ids = indices();
  os << ", ids ";
  constexpr int64_t kShown = 8;
  if (nnz() <= kShown) {
    os << absl::StrJoin(ids, ", ");
  } else {
    os << absl::StrJoin(ids.begin(), ids.begin() + kShown / 2, ", ") << ", …, "
       << absl::StrJoin(ids.end() - kShown / 2, ids.end(), ", ");
  }
  // The rows as a matrix, one line per stored row.
  const std::string rows = data_.Reshape({nnz(), row_size()}).ToString();
  os << ":" << rows.substr(rows.find('\n'));
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const RowSparseNDArray& a) {
  return os << a.ToString();
}

RowSparseNDArray ToRowSparse(const NDArray& dense) {
  MX_THROW_IF_NOT(!dense.is_none() && dense.ndim() >= 1,
                  "ToRowSparse: needs an array with at least one dimension");
  RequireCpu("ToRowSparse", dense.context());
  const std::vector<float> v = dense.ToVector();
  const int64_t dim = dense.shape().RowSize();
  Ids ids;
  for (int64_t r = 0; r < dense.shape()[0]; ++r) {
    const float* row = v.data() + r * dim;
    if (std::any_of(row, row + dim, [](float x) { return x != 0.f; })) ids.push_back(r);
  }
  return GatherRows(dense, std::move(ids));
}

RowSparseNDArray GatherRows(const NDArray& dense, Ids ids) {
  MX_THROW_IF_NOT(!dense.is_none() && dense.ndim() >= 1,
                  "GatherRows: needs an array with at least one dimension");
  RequireCpu("GatherRows", dense.context());
  ThrowIfError(CheckRowIds(ids, dense.shape()[0], "GatherRows"));
  NDArray data(RowsShape(dense.shape(), static_cast<int64_t>(ids.size())), dense.context());
  RowSparseNDArray out(dense.shape(), ids, data);
  PushGather("GatherRows", dense, Share(std::move(ids)), &data, dense.shape().RowSize());
  return out;
}

RowSparseNDArray Retain(const RowSparseNDArray& a, Ids ids) {
  MX_THROW_IF_NOT(!a.is_none(), "Retain: a null RowSparseNDArray");
  ThrowIfError(CheckRowIds(ids, a.num_rows(), "Retain"));
  NDArray data(RowsShape(a.shape(), static_cast<int64_t>(ids.size())), a.context());
  SharedIds pos = Share(PositionsIn(a.indices(), ids));
  RowSparseNDArray out(a.shape(), std::move(ids), data);
  PushGather("Retain", a.data(), std::move(pos), &data, a.row_size());
  return out;
}

Ids UniqueRowIds(const NDArray& values, int64_t num_rows) {
  const std::vector<float> v = values.ToVector();
  Ids ids;
  ids.reserve(v.size());
  MX_THROW_IF_NOT(num_rows > 0, "UniqueRowIds: a table needs rows, not ", num_rows);
  // The rows dense Embedding reads: indices clipped and truncated as MXNet
  // does. Refusing them failed sparse training on data dense trained on.
  for (const float x : v) ids.push_back(kernel::EmbeddingRow(x, num_rows));
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

void SampleUniformRows(float low, float high, uint64_t seed, int64_t first_row, NDArray* out) {
  MX_THROW_IF_NOT(!out->is_none() && out->ndim() >= 1 && first_row >= 0,
                  "SampleUniformRows: needs rows of a table and first_row >= 0");
  MX_THROW_IF_NOT(low <= high, "SampleUniformRows: low ", low, " > high ", high);
  const int64_t n = out->size(), offset = first_row * out->shape().RowSize();
  const Context ctx = out->context();
  internal::PushKernel("SampleUniformRows", ctx, {}, {out}, [o = *out, seed, offset, low, high,
                                                            ctx, n] {
    kernel::Launch<kernel::UniformAtKernel>("SampleUniformRows", ctx, n,
                                            {o.data(), seed, offset, low, high});
  });
}

RowSparseNDArray Sum(const std::vector<RowSparseNDArray>& arrays) {
  MX_THROW_IF_NOT(!arrays.empty(), "Sum: no row-sparse arrays to add");
  for (const RowSparseNDArray& a : arrays) {
    MX_THROW_IF_NOT(!a.is_none(), "Sum: a null RowSparseNDArray");
    RequireSameDenseShape("Sum", arrays[0].shape(), a.shape());
    internal::RequireSameContext("Sum", {&arrays[0].data(), &a.data()});
  }
  Ids ids;
  for (const RowSparseNDArray& a : arrays) {
    Ids merged;
    merged.reserve(ids.size() + a.indices().size());
    std::set_union(ids.begin(), ids.end(), a.indices().begin(), a.indices().end(),
                   std::back_inserter(merged));
    ids.swap(merged);
  }
  NDArray data = Zeros(RowsShape(arrays[0].shape(), static_cast<int64_t>(ids.size())),
                       arrays[0].context());
  // 0 + a0 + a1 + ...: each term is added in order, as a dense sum would.
  for (const RowSparseNDArray& a : arrays) {
    PushScatterAdd("Sum", a.data(), Share(PositionsIn(ids, a.indices())), &data, a.row_size());
  }
  return RowSparseNDArray(arrays[0].shape(), std::move(ids), std::move(data));
}

RowSparseNDArray operator+(const RowSparseNDArray& a, const RowSparseNDArray& b) {
  return Sum({a, b});
}

RowSparseNDArray operator*(const RowSparseNDArray& a, float s) {
  return RowSparseNDArray(a.shape(), a.indices(), a.data() * s);
}

RowSparseNDArray operator*(const RowSparseNDArray& a, const NDArray& dense) {
  MX_THROW_IF_NOT(!a.is_none(), "operator*: a null RowSparseNDArray");
  internal::RequireSameContext("operator*", {&a.data(), &dense});
  RequireSameDenseShape("operator*", a.shape(), dense.shape());
  NDArray data(a.data().shape(), a.context());
  SharedIds pos = Share(a.indices());
  const int64_t n = data.size(), dim = a.row_size();
  const Context ctx = a.context();
  const NDArray rows = a.data();
  internal::PushKernel("operator*", ctx, {&rows, &dense}, {&data},
                       [rows, dense, data, pos, dim, ctx, n] {
                         kernel::Launch<kernel::MulRowsKernel>(
                             "operator*", ctx, n,
                             {data.data(), rows.data(), dense.data(), pos->data(), dim});
                       });
  return RowSparseNDArray(a.shape(), a.indices(), data);
}

NDArray operator+(const NDArray& dense, const RowSparseNDArray& b) {
  NDArray out = dense.Copy();
  out += b;
  return out;
}

// b's rows, as a copy when they lie in `dense`'s memory: the kernels would
// read rows they already overwrote (d += a row-sparse view of d's own rows
// gave 6 where 5 was due), as dense in-place arithmetic reads a copy too.
NDArray RowsApartFrom(const NDArray& dense, const RowSparseNDArray& b) {
  return b.data().SharesStorageWith(dense) ? b.data().Copy() : b.data();
}

NDArray& operator+=(NDArray& dense, const RowSparseNDArray& b) {
  RequireDenseRows("operator+=", dense, b);
  PushScatterAdd("operator+=", RowsApartFrom(dense, b), Share(b.indices()), &dense, b.row_size());
  return dense;
}

void AssignRows(const RowSparseNDArray& b, NDArray* dense) {
  RequireDenseRows("AssignRows", *dense, b);
  PushRows<kernel::ScatterRowsKernel>("AssignRows", RowsApartFrom(*dense, b), Share(b.indices()),
                                      dense, b.row_size(), b.data().size());
}

}  // namespace mx
