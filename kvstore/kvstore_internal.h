// Internal helpers shared by the KVStore implementations.
#ifndef MX_KVSTORE_KVSTORE_INTERNAL_H_
#define MX_KVSTORE_KVSTORE_INTERNAL_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvstore/kvstore.h"

namespace mx::internal {

// The sum of a push's device copies on ctx: the value itself for a single
// copy on ctx, else the sum of every copy (those on other contexts copied
// to ctx first) in *merged, which is allocated on ctx at the first call. On
// the CPU the sum is one engine operation (named `name`).
NDArray SumCopies(const std::vector<NDArray>& values, const Shape& shape, NDArray* merged,
                  int priority, const char* name, Context ctx = cpu());

// Checks that arrays is non-empty and every array has `shape`.
absl::Status CheckArrays(const Key& key, const char* what, const char* role,
                         const std::vector<NDArray>& arrays, const Shape& shape);

// A second init of `key` (as a table or dense, with `shape`) where the
// store holds it already (a table or dense, `held`): OK when both agree (the
// first init wins, as in MXNet), else the error naming the difference.
absl::Status CheckReinit(const Key& key, bool held_is_table, const Shape& held, bool as_table,
                         const Shape& shape);

// Checks that a PushPull of several keys has one list of values and one of
// outputs per key, and no key twice.
absl::Status CheckBucket(const std::vector<Key>& keys,
                         const std::vector<std::vector<NDArray>>& values,
                         const std::vector<std::vector<NDArray>>& outs);

// ---- Row-sparse keys: the checks every store makes, with one wording.

// Checks a table's shape (at least one dimension, at least one row) and
// its TableInit (scale finite and >= 0).
absl::Status CheckTable(const Key& key, const Shape& shape, const TableInit& init);
// The error for a key used as the other kind: `what` ("push", "pull",
// "init", "row_sparse_pull", "row-sparse push") of a key that is a table
// (key_is_table) or dense.
absl::Status WrongKeyKind(const Key& key, const char* what, bool key_is_table);
// Checks that values is non-empty and each is a row-sparse array of `shape`.
absl::Status CheckRowSparseValues(const Key& key, const std::vector<RowSparseNDArray>& values,
                                  const Shape& shape);
// Checks that a PushPullRowSparse of several tables has one list of values
// and one of row ids per key, and no key twice.
absl::Status CheckTableBucket(const std::vector<Key>& keys,
                              const std::vector<std::vector<RowSparseNDArray>>& values,
                              const std::vector<std::vector<int64_t>>& row_ids);
// The sum of a row-sparse push's device copies on the CPU (the value itself
// for one copy on cpu()).
RowSparseNDArray SumRowSparse(const std::vector<RowSparseNDArray>& values);

std::unique_ptr<KVStore> NewLocalKVStore(const std::string& type);

}  // namespace mx::internal

#endif  // MX_KVSTORE_KVSTORE_INTERNAL_H_
