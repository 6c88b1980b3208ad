// RowSparseNDArray: MXNet's row_sparse storage. An array of shape
// (rows, d1, d2, ...) stored as the sorted ids of its non-zero rows and a
// dense NDArray `data` of shape (nnz, d1, d2, ...) holding those rows; every
// other row is zero. Embedding tables' gradients and the rows a worker pulls
// of a big table are row-sparse: a step touches a few thousand rows of
// millions.
//
//   mx::RowSparseNDArray g({1000000, 64}, {3, 17}, mx::Ones({2, 64}));
//   g.nnz();              // 2
//   g.ToDense();          // 1000000x64, rows 3 and 17 are ones (avoid!)
//   weight += g;          // dense += row-sparse touches two rows only
//
// Handles, asynchrony and errors are NDArray's (ndarray/ndarray.h): the row
// ids are fixed when the array is made and live on the host, the values are
// an NDArray and every operation on them is an engine operation. Copying a
// RowSparseNDArray copies the handle (ids and data are shared).
//
// Row ids are int64 and must be sorted ascending, unique and inside
// [0, rows): every constructor and operation checks them and throws mx::Error
// (kInvalidArgument) naming the offending id and its position.
//
// Row-sparse arrays live on CPU contexts; the kernels are written once
// (ndarray/sparse_kernels.h) like every other, but a GPU needs the ids on the
// device too, which is not done yet: a gpu context is kUnimplemented.
#ifndef MX_NDARRAY_ROW_SPARSE_H_
#define MX_NDARRAY_ROW_SPARSE_H_

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ndarray/ndarray.h"

namespace mx {

class RowSparseNDArray {
 public:
  // A null handle; is_none() is true.
  RowSparseNDArray() = default;
  // An array of `shape` (at least one dimension) with no stored rows: zero.
  explicit RowSparseNDArray(const Shape& shape, Context ctx = cpu());
  // The rows `indices` of an array of `shape` hold `data`, of shape
  // (indices.size(),) + shape[1:]. Takes data's storage (no copy).
  RowSparseNDArray(const Shape& shape, std::vector<int64_t> indices, NDArray data);

  bool is_none() const { return indices_ == nullptr; }
  // The dense shape: (rows, d1, ...).
  const Shape& shape() const { return shape_; }
  int64_t num_rows() const { return shape_[0]; }
  // Elements in one row (d1 * d2 * ...).
  int64_t row_size() const { return shape_.RowSize(); }
  // Stored rows.
  int64_t nnz() const { return static_cast<int64_t>(indices_->size()); }
  const std::vector<int64_t>& indices() const { return *indices_; }
  // The stored rows, (nnz,) + shape[1:].
  const NDArray& data() const { return data_; }
  Context context() const { return data_.context(); }

  // A dense array of shape() (every row; only for arrays that fit).
  NDArray ToDense() const;
  // A copy with its own data on ctx (same ids).
  RowSparseNDArray Copy(Context ctx) const;
  RowSparseNDArray Copy() const { return Copy(context()); }
  // Multiplies the stored rows in place.
  RowSparseNDArray& operator*=(float s);

  // "1000000×64 RowSparseNDArray<float> @ cpu(0), 2 stored rows:" and the
  // rows with their ids, elided when many.
  std::string ToString() const;

 private:
  Shape shape_;
  // Shared with copies of the handle and with pending engine operations.
  std::shared_ptr<const std::vector<int64_t>> indices_;
  NDArray data_;
};

std::ostream& operator<<(std::ostream& os, const RowSparseNDArray& a);

// OK when `ids` are sorted ascending, unique and in [0, num_rows); else
// kInvalidArgument naming `what`, the id and its position.
absl::Status CheckRowIds(const std::vector<int64_t>& ids, int64_t num_rows,
                         const std::string& what = "row ids");

// The rows of `dense` that hold a non-zero value (waits for its values).
RowSparseNDArray ToRowSparse(const NDArray& dense);
// Rows `ids` of a dense array (MXNet's sparse.retain of a dense table, or
// what a parameter server answers to a row_sparse pull).
RowSparseNDArray GatherRows(const NDArray& dense, std::vector<int64_t> ids);
// The rows of `a` whose ids are in `ids` (both sorted), zero rows for ids a
// does not store: the result stores exactly `ids` (MXNet's sparse.retain,
// but keeping every requested id, which is what a pull needs).
RowSparseNDArray Retain(const RowSparseNDArray& a, std::vector<int64_t> ids);
// The sorted unique rows of a table of num_rows rows that Embedding reads
// for the indices `values` (floats, truncated, clipped to [0, num_rows),
// NaN reading row 0, as MXNet's Embedding does); waits for the values. The
// ids a batch's embedding lookup touches.
std::vector<int64_t> UniqueRowIds(const NDArray& values, int64_t num_rows);

// Fills *out with rows [first_row, first_row + out->shape()[0]) of a table
// whose elements are uniform in [low, high), each drawn from `seed` by its
// index in the whole table (the Philox generator of RandomUniform): a table
// split into row ranges is filled alike however it is split. out's other
// dimensions are the table's.
void SampleUniformRows(float low, float high, uint64_t seed, int64_t first_row, NDArray* out);

// Sums of equal shapes, stored on the union of the inputs' rows. The sum of
// several is formed in the order given, element by element, which makes
// it bit-identical to adding the dense forms in that order.
RowSparseNDArray operator+(const RowSparseNDArray& a, const RowSparseNDArray& b);
RowSparseNDArray Sum(const std::vector<RowSparseNDArray>& arrays);
RowSparseNDArray operator*(const RowSparseNDArray& a, float s);
// Element-wise product with a dense array of the same shape: row-sparse,
// on a's rows (zero rows stay zero).
RowSparseNDArray operator*(const RowSparseNDArray& a, const NDArray& dense);
// dense (of the same shape) plus b: a new dense array, and in place. Only
// b's rows are read and written.
NDArray operator+(const NDArray& dense, const RowSparseNDArray& b);
NDArray& operator+=(NDArray& dense, const RowSparseNDArray& b);
// Sets b's rows of dense (of the same shape) to b's values; the others stay.
void AssignRows(const RowSparseNDArray& b, NDArray* dense);

// ---- Files. The NDArray file format (ndarray.h) in its version 2, whose
// entries carry a storage type; a row-sparse entry holds the dense shape,
// the ids (int64) and the stored rows. Load (dense) refuses a row-sparse
// entry and LoadRowSparse a dense one, naming it; version-1 files load as
// before.
using NamedRowSparse = std::vector<std::pair<std::string, RowSparseNDArray>>;
absl::Status SaveRowSparse(const std::string& path, const NamedRowSparse& arrays);
absl::StatusOr<NamedRowSparse> LoadRowSparse(const std::string& path, Context ctx = cpu());

}  // namespace mx

#endif  // MX_NDARRAY_ROW_SPARSE_H_
