// KVStore: where workers push and pull integer-keyed NDArrays.
//
//   auto kv = mx::KVStore::Create("local");
//   (*kv)->Init(3, mx::Ones({2, 3}) * 2);
//   mx::NDArray a = mx::Empty({2, 3});
//   (*kv)->Pull(3, &a);                   // a holds 2.0 everywhere
//
// Push sums the values given for a key (one per device) and, when an
// optimizer or updater is set, applies it to the stored value with the sum
// as the gradient; without one the stored value becomes the sum. Pull
// copies the stored value into one or more arrays on any contexts.
//
// Push, Pull, PushPull and Broadcast are engine operations: they check their
// arguments at once (an error Status names the key and the shapes) and
// return before the data moves. The engine orders them after the
// operations that write what they read, so a gradient's push waits only for
// the backward operation that produces it, and `priority` lets the first
// layers' parameters go first.
//
// Types: "local" (reduce on the CPU; values on any context), "device"
// (reduce and update on GPUs, each key on one; builds with CUDA on machines
// with GPUs), "dist_sync", "dist_async" (parameter servers; values and
// outputs on any context, device copies summed on the CPU),
// "dist_device_sync" (dist_sync whose device copies are summed on a GPU;
// machines with GPUs), "nccl" ("device" with NCCL's reduce and broadcast
// across the GPUs of a push or pull). A type this binary cannot provide is
// an error from Create, never a crash or a guess.
//
// A KVStore is used from one thread (the training loop).
#ifndef MX_KVSTORE_KVSTORE_H_
#define MX_KVSTORE_KVSTORE_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/gradient_compression.h"
#include "kvstore/optimizer.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"

namespace mx {

// A key: an integer, or a string mapped to an integer by a fixed hash so
// that every worker maps it alike (kvstore.h's StringKey).
class Key {
 public:
  Key(int id) : id_(id) {}  // NOLINT: implicit by design
  Key(const char* name);     // NOLINT
  Key(const std::string& name);  // NOLINT
  int id() const { return id_; }
  // The key as written in messages: "3" or "'fc1_weight' (key 123456)".
  std::string label() const;

 private:
  int id_;
  std::string name_;  // empty for integer keys
};

// The integer a string key maps to: FNV-1a folded into [2^30, 2^31), a
// range integer keys of real models do not reach.
int StringKey(const std::string& name);

// How the rows of a row-sparse key start: zero (scale 0), or uniform in
// [-scale, scale) with each element drawn from `seed` by its index in the
// whole table (SampleUniformRows), so every store, and every split of the
// table over parameter servers, starts from the same table.
struct TableInit {
  float scale = 0.f;
  uint64_t seed = 0;
};

class KVStore {
 public:
  // Called by Push with the summed values and the stored value to update.
  // It runs on the pushing thread and must express its work as NDArray
  // operations (which the engine orders).
  using Updater = std::function<void(int key, const NDArray& merged, NDArray* stored)>;

  // The store of a type. The dist_* types need //kvstore:dist_kvstore linked
  // in (it registers them) and read the cluster from the environment (see
  // kvstore/dist_kvstore.h).
  static absl::StatusOr<std::unique_ptr<KVStore>> Create(const std::string& type);

  using Factory = std::function<absl::StatusOr<std::unique_ptr<KVStore>>(const std::string& type)>;
  // Adds a factory for a type (at static initialization).
  static bool RegisterType(const std::string& type, Factory factory);
  virtual ~KVStore() = default;

  const std::string& type() const { return type_; }

  // Stores a copy of value under key. A key initialized twice with the same
  // shape keeps its first value; with another shape it is an error.
  virtual absl::Status Init(Key key, const NDArray& value) = 0;
  absl::Status Init(const std::vector<Key>& keys, const std::vector<NDArray>& values);

  virtual absl::Status Push(Key key, const std::vector<NDArray>& values, int priority = 0) = 0;
  absl::Status Push(Key key, const NDArray& value, int priority = 0) {
    return Push(key, std::vector<NDArray>{value}, priority);
  }
  virtual absl::Status Pull(Key key, const std::vector<NDArray>& outs, int priority = 0) = 0;
  absl::Status Pull(Key key, NDArray* out, int priority = 0) {
    return Pull(key, std::vector<NDArray>{*out}, priority);
  }
  // Push then Pull (a store may do both in one operation).
  virtual absl::Status PushPull(Key key, const std::vector<NDArray>& values,
                        const std::vector<NDArray>& outs, int priority = 0);
  // PushPull of several keys (values[i] and outs[i] belong to keys[i]) as
  // one unit: a store may send them together; the distributed store makes
  // one round trip per server instead of one per key; "nccl", one NCCL
  // group per bucket. The local store does each key on its own.
  virtual absl::Status PushPull(const std::vector<Key>& keys,
                                const std::vector<std::vector<NDArray>>& values,
                                const std::vector<std::vector<NDArray>>& outs, int priority = 0);
  // How many bytes of gradients the store would like in one PushPull of
  // several keys (0: one key at a time, which keeps each key's
  // communication next to the backward operation that makes it).
  virtual int64_t bucket_bytes() const { return 0; }
  // Init (if needed) with value, then Pull into outs.
  absl::Status Broadcast(Key key, const NDArray& value, const std::vector<NDArray>& outs,
                         int priority = 0);

  // ---- Row-sparse keys: tables (embeddings) of which a step reads and
  // updates a few rows. The store keeps the whole table (the distributed
  // store shards it by row ranges over every server, so no process holds
  // all of it); workers push row-sparse gradients, which carry only the
  // touched rows, and pull only the rows they need. The optimizer updates
  // them lazily (Optimizer::UpdateRows); without one the table becomes the
  // pushed sum, zero outside its rows, as a dense key becomes its sum. A
  // custom updater takes dense values and is refused for them.
  //
  // Dense Push and Pull on a row-sparse key, and row-sparse pushes to a
  // dense key, are INVALID_ARGUMENT naming the key, as are values of
  // another shape and row ids that are out of range, unsorted or repeated.

  // Creates a table of `shape` (at least one dimension) under key. Again
  // with the same shape it keeps the table; with another, an error.
  virtual absl::Status InitRowSparse(Key key, const Shape& shape, const TableInit& init = {}) = 0;
  // Pushes row-sparse gradients (one per device, summed in the order given
  // on the union of their rows; across workers as for dense keys).
  virtual absl::Status PushRowSparse(Key key, const std::vector<RowSparseNDArray>& values,
                                     int priority = 0) = 0;
  absl::Status Push(Key key, const RowSparseNDArray& value, int priority = 0) {
    return PushRowSparse(key, {value}, priority);
  }
  // Sets *out to rows `row_ids` (sorted, unique, in range) of the table:
  // a RowSparseNDArray with those ids whose data arrives through the engine
  // like a dense pull's (MXNet's row_sparse_pull). *out is replaced, not
  // written into: the ids of a RowSparseNDArray are fixed.
  virtual absl::Status RowSparsePull(Key key, std::vector<int64_t> row_ids,
                                     RowSparseNDArray* out, int priority = 0) = 0;
  // PushRowSparse of `values`, then RowSparsePull of `row_ids` (other rows:
  // those the next batch needs) as of the step that includes the push. The
  // distributed store does both in one round trip per server.
  // Sets the rows `rows` stores to its values, outside any step: no
  // optimizer, no vote (restoring a checkpoint's table before training;
  // in a job, one worker does it and the others wait at a Barrier).
  virtual absl::Status AssignRows(Key key, const RowSparseNDArray& rows) = 0;
  absl::Status PushPullRowSparse(Key key, const std::vector<RowSparseNDArray>& values,
                                 std::vector<int64_t> row_ids, RowSparseNDArray* out,
                                 int priority = 0);
  // The same for several tables (values[i], row_ids[i] and (*outs)[i]
  // belong to keys[i]; outs is resized) as one unit: the distributed store
  // makes one round trip per server for all of them.
  virtual absl::Status PushPullRowSparse(const std::vector<Key>& keys,
                                         const std::vector<std::vector<RowSparseNDArray>>& values,
                                         std::vector<std::vector<int64_t>> row_ids,
                                         std::vector<RowSparseNDArray>* outs, int priority = 0);

  virtual void SetUpdater(Updater updater) = 0;
  // The store applies optimizer->Update(key, stored, merged) on Push.
  virtual absl::Status SetOptimizer(std::unique_ptr<Optimizer> optimizer) = 0;
  // Gradient compression of pushes, as MXNet's set_gradient_compression:
  // {"type": "2bit" | "fp16" | "none", "threshold": t} (2bit; default 0.5;
  // kvstore/gradient_compression.h). The distributed stores send each
  // pushed gradient compressed and keep what it lost for the next push of
  // the key. Call it before the first push. Bad parameters are
  // INVALID_ARGUMENT naming them; the local store, which sends nothing,
  // refuses any type but "none" (FAILED_PRECONDITION). Errors start with
  // "kvstore TYPE: ".
  absl::Status SetGradientCompression(const std::map<std::string, std::string>& params);
  virtual absl::Status SaveOptimizerStates(const std::string& path) const = 0;
  virtual absl::Status LoadOptimizerStates(const std::string& path) = 0;

  virtual int rank() const { return 0; }
  virtual int num_workers() const { return 1; }
  // The lowest rank among the workers still in the job: 0, unless workers
  // died in an elastic job (a distributed store asks the coordinator).
  // That worker writes the job's checkpoints.
  virtual int first_live_rank() { return 0; }
  // Blocks until every worker has reached the barrier (a no-op locally
  // beyond waiting for this store's pending operations).
  virtual absl::Status Barrier() = 0;
  // This worker is done with the job. A distributed store leaves it: the
  // coordinator stops expecting the worker's heartbeats, and once every
  // worker has finished the servers and the coordinator shut down. The
  // store must not be used afterwards. Locally a no-op.
  virtual absl::Status Finish() { return absl::OkStatus(); }

 protected:
  explicit KVStore(std::string type) : type_(std::move(type)) {}
  // Takes checked compression settings (SetGradientCompression); stores
  // that send no gradients refuse any but none.
  virtual absl::Status UseGradientCompression(const GradientCompression& c);

 private:
  std::string type_;
};

}  // namespace mx

#endif  // MX_KVSTORE_KVSTORE_H_
