// The local KVStores. "local": values live in host memory (page-locked
// once a copy on a GPU comes); pushes of several device copies (on any
// contexts, GPUs included: they are copied to the host first) are summed by
// one engine operation per key, so keys reduce in parallel on the engine's
// workers. "device": each key lives on one GPU, settled at its first push
// or pull among its arrays' GPUs, the one holding the fewest bytes of keys
// (MXNet's CommDevice balances so); pushes are copied to that GPU (peer
// copies where the devices allow), summed there by the kernel layer,
// updated there by the optimizer, and pulls copy from there. "nccl": as
// "device", but the copies of a push that lie on
// distinct GPUs, the key's among them, are summed by one NCCL reduce onto
// the key's GPU, and a pull into such outputs is one NCCL broadcast from
// it; a bucket of such keys (PushPull of several) makes one NCCL group of
// reduces and one of broadcasts. Other copies go as "device" moves them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvstore/kvstore.h"
#include "kvstore/kvstore_internal.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx {
namespace internal {

namespace {

// Sums values into out in blocks that stay in cache: one pass over out.
void SumInto(const std::vector<const float*>& values, float* out, int64_t n) {
  constexpr int64_t kBlock = 4096;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    float* o = out + start;
    const float* v0 = values[0] + start;
    std::copy(v0, v0 + len, o);
    for (size_t k = 1; k < values.size(); ++k) {
      const float* v = values[k] + start;
      for (int64_t i = 0; i < len; ++i) o[i] += v[i];
    }
  }
}

class LocalKVStore : public KVStore {
 public:
  explicit LocalKVStore(std::string type)
      : KVStore(type), on_gpus_(type == "device" || type == "nccl"), nccl_(type == "nccl") {}

  // The operations pushed under the entries' names (push_name, pull_name)
  // end before the names go: the engine reads them for traces and errors.
  // Every such operation reads or writes its key's stored array or its sum
  // buffer (which a pull read as the stored one before Apply swapped them).
  ~LocalKVStore() override {
    for (auto& [key, e] : store_) {
      for (NDArray* a : {&e.stored, &e.merged}) {
        if (a->is_none()) continue;
        try {
          a->WaitToWrite();
        } catch (const Error&) {
          // Its waiters were, or will be, told; a destructor throws nothing.
        }
      }
    }
  }

  absl::Status Init(Key key, const NDArray& value) override {
    if (value.is_none()) return absl::InvalidArgumentError(absl::StrCat("init of key ", key.label(), ": null array"));
    auto it = store_.find(key.id());
    if (it != store_.end()) {
      return CheckReinit(key, it->second.table, it->second.stored.shape(), false, value.shape());
    }
    return CatchError([&] {
      Entry e;
      // Where it lives until its first push or pull on a GPU (Place).
      // A host value waits in page-locked memory: spread over every
      // visible GPU, such keys made contexts and allocations on GPUs the
      // job does not use.
      e.ctx = !on_gpus_ ? cpu() : value.context().is_gpu() ? value.context() : cpu_pinned();
      e.stored = Empty(value.shape(), e.ctx);
      e.stored.Assign(value);
      e.push_name = absl::StrCat("kvstore_push:", key.label());
      e.pull_name = absl::StrCat("kvstore_pull:", key.label());
      store_.emplace(key.id(), std::move(e));  // only once its array exists
    });
  }

  absl::Status Push(Key key, const std::vector<NDArray>& values, int priority) override {
    MX_ASSIGN_OR_RETURN(Entry * e, Find(key, "push", false));
    MX_RETURN_IF_ERROR(CheckArrays(key, "push", "value", values, e->stored.shape()));
    return CatchError([&] {
      Place(e, values);
      Apply(key, e, Reduce(e, values, priority), priority);
    });
  }

  absl::Status Pull(Key key, const std::vector<NDArray>& outs, int priority) override {
    MX_ASSIGN_OR_RETURN(Entry * e, Find(key, "pull", false));
    MX_RETURN_IF_ERROR(CheckArrays(key, "pull", "output", outs, e->stored.shape()));
    return CatchError([&] {
      Place(e, outs);
      Spread(*e, outs, priority);
    });
  }

  // nccl: training sends small keys together (each NCCL group launch has
  // a fixed cost), in buckets of about a dist store's size.
  int64_t bucket_bytes() const override { return nccl_ ? int64_t{4} << 20 : 0; }

  // nccl: a bucket whose keys' copies and outputs all lie on one set of
  // distinct GPUs is one NCCL group of reduces, the updates, then one group
  // of broadcasts. Any other bucket goes key by key.
  absl::Status PushPull(const std::vector<Key>& keys,
                        const std::vector<std::vector<NDArray>>& values,
                        const std::vector<std::vector<NDArray>>& outs, int priority) override {
    // Every key is checked before any is pushed: a bad one later in the
    // bucket left the earlier ones updated, and a corrected retry updated
    // them twice.
    MX_RETURN_IF_ERROR(CheckBucket(keys, values, outs));
    std::vector<Entry*> entries;
    for (size_t i = 0; i < keys.size(); ++i) {
      MX_ASSIGN_OR_RETURN(Entry * e, Find(keys[i], "pushpull", false));
      MX_RETURN_IF_ERROR(CheckArrays(keys[i], "pushpull", "value", values[i], e->stored.shape()));
      MX_RETURN_IF_ERROR(CheckArrays(keys[i], "pushpull", "output", outs[i], e->stored.shape()));
      entries.push_back(e);
    }
    if (!nccl_) return KVStore::PushPull(keys, values, outs, priority);
    MX_RETURN_IF_ERROR(CatchError([&] {
      for (size_t i = 0; i < keys.size(); ++i) {
        Place(entries[i], values[i]);
        Place(entries[i], outs[i]);
      }
    }));
    std::optional<std::vector<int>> devices;
    for (size_t i = 0; i < keys.size(); ++i) {
      const Entry* e = entries[i];
      const std::optional<std::vector<int>> ranks = NcclRanks(values[i], e->ctx);
      if (i == 0) devices = ranks;
      if (devices.has_value() && (ranks != devices || NcclRanks(outs[i], e->ctx) != devices)) {
        devices.reset();
      }
    }
    if (!devices.has_value()) return KVStore::PushPull(keys, values, outs, priority);
    return CatchError([&] {
      std::vector<kernel::GpuCollective> reduces, broadcasts;
      std::vector<VarHandle> pushed, sums, stored, pulled;
      for (size_t i = 0; i < keys.size(); ++i) {
        reduces.push_back(ReduceCall(*entries[i], values[i], *devices, &pushed));
        sums.push_back(entries[i]->merged.var());
      }
      const Context first = gpu((*devices)[0]);
      kernel::PushCollectives("kvstore_nccl_reduce", first, *devices, std::move(reduces),
                              std::move(pushed), std::move(sums), priority);
      for (size_t i = 0; i < keys.size(); ++i) {
        Apply(keys[i], entries[i], entries[i]->merged, priority);
      }
      for (size_t i = 0; i < keys.size(); ++i) {
        broadcasts.push_back(BroadcastCall(*entries[i], outs[i], *devices, &pulled));
        stored.push_back(entries[i]->stored.var());
      }
      kernel::PushCollectives("kvstore_nccl_broadcast", first, *devices, std::move(broadcasts),
                              std::move(stored), std::move(pulled), priority);
    });
  }

  absl::Status InitRowSparse(Key key, const Shape& shape, const TableInit& init) override {
    if (on_gpus_) {
      return absl::UnimplementedError(absl::StrCat(
          "init of key ", key.label(), ": kvstore 'device' keeps row-sparse keys on GPUs, "
          "which is not implemented yet; use 'local'"));
    }
    MX_RETURN_IF_ERROR(CheckTable(key, shape, init));
    if (auto it = store_.find(key.id()); it != store_.end()) {
      return CheckReinit(key, it->second.table, it->second.stored.shape(), true, shape);
    }
    return CatchError([&] {
      NDArray table = Zeros(shape);
      if (init.scale > 0) SampleUniformRows(-init.scale, init.scale, init.seed, 0, &table);
      Entry& e = store_[key.id()];
      e.ctx = cpu();
      e.table = true;
      e.stored = table;
    });
  }

  absl::Status PushRowSparse(Key key, const std::vector<RowSparseNDArray>& values,
                             int) override {
    MX_ASSIGN_OR_RETURN(Entry * e, TableToPush(key, values, "row-sparse push"));
    return CatchError([&] { UpdateRows(key, e, values); });
  }

  // Every key, value and row id list is checked before any key is pushed,
  // as in PushPull: a pull refused after its push left the table updated,
  // and a corrected retry updated it twice.
  absl::Status PushPullRowSparse(const std::vector<Key>& keys,
                                 const std::vector<std::vector<RowSparseNDArray>>& values,
                                 std::vector<std::vector<int64_t>> row_ids,
                                 std::vector<RowSparseNDArray>* outs, int) override {
    MX_RETURN_IF_ERROR(CheckTableBucket(keys, values, row_ids));
    std::vector<Entry*> entries;
    for (size_t i = 0; i < keys.size(); ++i) {
      MX_ASSIGN_OR_RETURN(Entry * e, TableToPush(keys[i], values[i], "row-sparse pushpull"));
      MX_RETURN_IF_ERROR(TableToPull(keys[i], row_ids[i], "row-sparse pushpull").status());
      entries.push_back(e);
    }
    outs->assign(keys.size(), RowSparseNDArray());
    return CatchError([&] {
      for (size_t i = 0; i < keys.size(); ++i) {
        UpdateRows(keys[i], entries[i], values[i]);
        (*outs)[i] = GatherRows(entries[i]->stored, std::move(row_ids[i]));
      }
    });
  }

  absl::Status RowSparsePull(Key key, std::vector<int64_t> row_ids, RowSparseNDArray* out,
                             int) override {
    MX_ASSIGN_OR_RETURN(Entry * e, TableToPull(key, row_ids, "row_sparse_pull"));
    return CatchError([&] { *out = GatherRows(e->stored, std::move(row_ids)); });
  }

  absl::Status AssignRows(Key key, const RowSparseNDArray& rows) override {
    MX_ASSIGN_OR_RETURN(Entry * e, Find(key, "assign_rows", true));
    MX_RETURN_IF_ERROR(CheckRowSparseValues(key, {rows}, e->stored.shape()));
    return CatchError([&] {
      mx::AssignRows(rows.context() == cpu() ? rows : rows.Copy(cpu()), &e->stored);
    });
  }

  // The last of SetUpdater and SetOptimizer decides how pushes update, as
  // in MXNet (an updater set after an optimizer was ignored).
  void SetUpdater(Updater updater) override {
    updater_ = std::move(updater);
    optimizer_.reset();
  }

  absl::Status SetOptimizer(std::unique_ptr<Optimizer> optimizer) override {
    optimizer_ = std::move(optimizer);
    updater_ = nullptr;
    return absl::OkStatus();
  }

  absl::Status SaveOptimizerStates(const std::string& path) const override {
    if (optimizer_ == nullptr) {
      return absl::FailedPreconditionError("SaveOptimizerStates: no optimizer is set");
    }
    return optimizer_->SaveStatesToFile(path);
  }

  absl::Status LoadOptimizerStates(const std::string& path) override {
    if (optimizer_ == nullptr) {
      return absl::FailedPreconditionError("LoadOptimizerStates: set an optimizer first");
    }
    // Checked against the keys' shapes at the load, not at the next push.
    std::map<int, Shape> shapes;
    for (const auto& [key, e] : store_) shapes[key] = e.stored.shape();
    return optimizer_->LoadStatesFromFile(path, shapes);
  }

  absl::Status Barrier() override {
    return CatchError([&] {
      for (auto& [key, e] : store_) e.stored.WaitToRead();
    });
  }

 private:
  struct Entry {
    Context ctx;  // where the key lives, is summed and updated
    NDArray stored;
    NDArray merged;  // the sum of a multi-device push, allocated once
    bool placed = false;  // ctx settled by Place
    bool table = false;  // a row-sparse key (InitRowSparse)
    std::string push_name, pull_name;  // engine operation names (stable)
  };

  // Settles where key e lives at its first push or pull that brings an
  // array on a GPU (a key that never sees one stays where Init put it),
  // moving it there (engine-ordered copies):
  //  - local: page-locked host memory, so that copies to and from the GPUs
  //    run on their copy streams instead of blocking in the driver (MXNet
  //    keeps its local keys there too);
  //  - device, nccl: the GPU among the arrays' that holds the fewest bytes
  //    of keys so far, as MXNet's CommDevice balances its keys; so keys stay
  //    on the GPUs the job trains on, and NCCL finds the key's GPU among the
  //    copies'.
  void Place(Entry* e, const std::vector<NDArray>& arrays) {
    if (e->placed) return;
    std::vector<int> gpus;
    for (const NDArray& a : arrays) {
      const Context c = a.context();
      if (c.is_gpu() && std::find(gpus.begin(), gpus.end(), c.device_id) == gpus.end()) {
        gpus.push_back(c.device_id);
      }
    }
    if (gpus.empty()) return;
    Context home = cpu_pinned();
    if (on_gpus_) {
      int least = gpus[0];
      for (int g : gpus) {
        if (gpu_bytes_[g] < gpu_bytes_[least]) least = g;
      }
      home = gpu(least);
    }
    if (home != e->ctx) {
      NDArray moved = Empty(e->stored.shape(), home);
      moved.Assign(e->stored);
      e->stored = moved;
      e->merged = NDArray();
      e->ctx = home;
    }
    if (home.is_gpu()) gpu_bytes_[home.device_id] += e->stored.size() * int64_t{sizeof(float)};
    e->placed = true;
  }

  // The entry of key for `what`, which uses it as a table (row-sparse) or
  // as a dense key.
  // The table a push of `values` updates, checked (`what`: the call, for
  // errors).
  absl::StatusOr<Entry*> TableToPush(const Key& key, const std::vector<RowSparseNDArray>& values,
                                     const char* what) {
    MX_ASSIGN_OR_RETURN(Entry * e, Find(key, what, true));
    MX_RETURN_IF_ERROR(CheckRowSparseValues(key, values, e->stored.shape()));
    if (optimizer_ == nullptr && updater_) {
      return absl::FailedPreconditionError(
          absl::StrCat("row-sparse push of key ", key.label(),
                       ": a custom updater takes dense values; set an optimizer instead"));
    }
    return e;
  }
  // The table a pull of `row_ids` reads, checked.
  absl::StatusOr<Entry*> TableToPull(const Key& key, const std::vector<int64_t>& row_ids,
                                     const char* what) {
    MX_ASSIGN_OR_RETURN(Entry * e, Find(key, what, true));
    MX_RETURN_IF_ERROR(CheckRowIds(row_ids, e->stored.shape()[0],
                                   absl::StrCat("row_sparse_pull of key ", key.label())));
    return e;
  }
  // A checked push's update: the optimizer's on the pushed rows, or the
  // table becomes their sum.
  void UpdateRows(const Key& key, Entry* e, const std::vector<RowSparseNDArray>& values) {
    const RowSparseNDArray merged = SumRowSparse(values);
    if (optimizer_ != nullptr) {
      optimizer_->UpdateRows(key.id(), e->stored, merged);
    } else {
      e->stored.Assign(0.f);
      e->stored += merged;
    }
  }

  absl::StatusOr<Entry*> Find(const Key& key, const char* what, bool as_table) {
    auto it = store_.find(key.id());
    if (it == store_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " of key ", key.label(), ": the key was never initialized (call ",
          as_table ? "InitRowSparse" : "Init", " first)"));
    }
    if (it->second.table != as_table) return WrongKeyKind(key, what, it->second.table);
    return &it->second;
  }

  // nccl: the GPU ids of `arrays` when NCCL can take them: on distinct GPUs,
  // the key's GPU `home` among them, more than one; else nullopt.
  std::optional<std::vector<int>> NcclRanks(const std::vector<NDArray>& arrays,
                                            Context home) const {
    if (!nccl_ || arrays.size() < 2) return std::nullopt;
    std::vector<int> devices;
    for (const NDArray& a : arrays) {
      if (!a.context().is_gpu()) return std::nullopt;
      devices.push_back(a.context().device_id);
    }
    if (std::set<int>(devices.begin(), devices.end()).size() != devices.size()) return std::nullopt;
    if (std::find(devices.begin(), devices.end(), home.device_id) == devices.end()) {
      return std::nullopt;
    }
    return devices;
  }

  // The NCCL reduce of `values` (ranked as `devices`) into e.merged, on the
  // key's GPU; adds the variables it reads to *reads.
  static kernel::GpuCollective ReduceCall(Entry& e, const std::vector<NDArray>& values,
                                          const std::vector<int>& devices,
                                          std::vector<VarHandle>* reads) {
    if (e.merged.is_none()) e.merged = Empty(e.stored.shape(), e.ctx);
    kernel::GpuCollective c;
    c.kind = kernel::GpuCollective::kReduceSum;
    c.root = RankOf(devices, e.ctx);
    c.n = e.stored.size();
    for (const NDArray& v : values) {
      c.sends.push_back(v.data());
      reads->push_back(v.var());
    }
    c.recv = e.merged.data();
    return c;
  }

  // The NCCL broadcast of e.stored into `outs` (ranked as `devices`); adds
  // the variables it writes to *writes.
  static kernel::GpuCollective BroadcastCall(const Entry& e, const std::vector<NDArray>& outs,
                                             const std::vector<int>& devices,
                                             std::vector<VarHandle>* writes) {
    kernel::GpuCollective c;
    c.kind = kernel::GpuCollective::kBroadcast;
    c.root = RankOf(devices, e.ctx);
    c.n = e.stored.size();
    c.send = e.stored.data();
    for (const NDArray& o : outs) {
      c.recvs.push_back(o.data());
      writes->push_back(o.var());
    }
    return c;
  }

  static int RankOf(const std::vector<int>& devices, Context ctx) {
    return static_cast<int>(std::find(devices.begin(), devices.end(), ctx.device_id) -
                            devices.begin());
  }

  // The sum of a push's copies on the key's context: one NCCL reduce (nccl,
  // NcclRanks), or copies brought there and summed (SumCopies).
  NDArray Reduce(Entry* e, const std::vector<NDArray>& values, int priority) const {
    if (std::optional<std::vector<int>> devices = NcclRanks(values, e->ctx)) {
      std::vector<VarHandle> reads;
      kernel::GpuCollective c = ReduceCall(*e, values, *devices, &reads);
      kernel::PushCollectives(e->push_name.c_str(), e->ctx, *devices, {c}, std::move(reads),
                              {e->merged.var()}, priority);
      return e->merged;
    }
    NDArray sum =
        SumCopies(values, e->stored.shape(), &e->merged, priority, e->push_name.c_str(), e->ctx);
    if (sum.context() == e->ctx) return sum;
    // One copy in host memory of another context (cpu(1), cpu_pinned),
    // which SumCopies reads in place: the update runs on the key's own.
    if (e->merged.is_none()) e->merged = Empty(e->stored.shape(), e->ctx);
    CopyFromTo(sum, e->merged, priority, e->push_name.c_str());
    return e->merged;
  }

  // A push's sum `merged` becomes the key's update (optimizer or updater)
  // or its new value.
  void Apply(Key key, Entry* e, const NDArray& merged, int priority) {
    if (optimizer_ != nullptr) {
      optimizer_->Update(key.id(), e->stored, merged);
    } else if (updater_) {
      updater_(key.id(), merged, &e->stored);
    } else if (merged.SharesStorageWith(e->merged)) {
      // The sum is the new value: swap buffers instead of copying (the
      // engine orders later pulls after the sum, and the next sum after
      // those pulls, through the buffers' variables).
      std::swap(e->stored, e->merged);
    } else {
      CopyFromTo(merged, e->stored, priority, e->push_name.c_str());
    }
  }

  // A pull: one NCCL broadcast (nccl, NcclRanks), or a copy to each output.
  void Spread(const Entry& e, const std::vector<NDArray>& outs, int priority) const {
    if (std::optional<std::vector<int>> devices = NcclRanks(outs, e.ctx)) {
      std::vector<VarHandle> writes;
      kernel::GpuCollective c = BroadcastCall(e, outs, *devices, &writes);
      kernel::PushCollectives(e.pull_name.c_str(), e.ctx, *devices, {c}, {e.stored.var()},
                              std::move(writes), priority);
      return;
    }
    for (const NDArray& out : outs) CopyFromTo(e.stored, out, priority, e.pull_name.c_str());
  }

  const bool on_gpus_;
  const bool nccl_;  // "nccl"
  std::map<int, Entry> store_;
  std::map<int, int64_t> gpu_bytes_;  // bytes of the keys Place put on each GPU
  Updater updater_;
  std::unique_ptr<Optimizer> optimizer_;
};

}  // namespace

NDArray SumCopies(const std::vector<NDArray>& values, const Shape& shape, NDArray* merged,
                  int priority, const char* name, Context ctx) {
  // The CPU reads host memory of every CPU context in place; other copies
  // come to ctx first (pooled temporaries, page-locked when the sum is on
  // the host, so that the GPUs' copies out run on their copy streams).
  auto readable = [ctx](const NDArray& v) {
    return v.context() == ctx || (ctx.is_cpu() && v.context().is_cpu());
  };
  if (values.size() == 1 && readable(values[0])) return values[0];
  if (merged->is_none()) *merged = Empty(shape, ctx);
  if (values.size() == 1) {  // one copy, straight into the sum's buffer
    CopyFromTo(values[0], *merged, priority, name);
    return *merged;
  }
  std::vector<NDArray> here;
  for (const NDArray& v : values) {
    if (readable(v)) {
      here.push_back(v);
      continue;
    }
    here.push_back(Empty(shape, ctx.is_cpu() ? cpu_pinned() : ctx));
    CopyFromTo(v, here.back(), priority, name);
  }
  std::vector<VarHandle> reads;
  std::vector<const float*> ptrs;
  for (const NDArray& v : here) {
    reads.push_back(v.var());
    ptrs.push_back(v.data());
  }
  float* out = merged->data();
  const int64_t n = merged->size();
  if (ctx.is_gpu()) {
    // One operation at the push's priority, adding the copies in order
    // (an Assign and +='s ran at priority 0, behind the backward pass's
    // kernels, while a pull waited on the sum).
    kernel::Push(
        name, ctx, reads, {merged->var()},
        [ptrs, out, n, ctx, name] {
          for (size_t k = 0; k < ptrs.size(); ++k) {
            kernel::Launch<kernel::CopyKernel>(name, ctx, n, {out, ptrs[k], /*add=*/k > 0});
          }
        },
        priority);
    return *merged;
  }
  Engine::Get()->PushSync([ptrs, out, n](RunContext) { SumInto(ptrs, out, n); }, cpu(), reads,
                          {merged->var()}, priority, name);
  return *merged;
}

absl::Status CheckArrays(const Key& key, const char* what, const char* role,
                         const std::vector<NDArray>& arrays, const Shape& shape) {
  if (arrays.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " of key ", key.label(), ": no arrays"));
  }
  for (size_t i = 0; i < arrays.size(); ++i) {
    if (arrays[i].is_none()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " of key ", key.label(), ": ", role, " ", i, " is null"));
    }
    if (arrays[i].shape() != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " of key ", key.label(), ": ", role, " ", i, " has shape ",
          arrays[i].shape().ToString(), " but the key holds ", shape.ToString()));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckReinit(const Key& key, bool held_is_table, const Shape& held, bool as_table,
                         const Shape& shape) {
  if (held_is_table != as_table) return WrongKeyKind(key, "init", held_is_table);
  if (held == shape) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("init of key ", key.label(),
                                                 ": already initialized with shape ",
                                                 held.ToString(), ", now ", shape.ToString()));
}

// No key twice in `keys`, a call (`what`) of several keys.
absl::Status NoKeyTwice(const std::vector<Key>& keys, const char* what) {
  std::set<int> seen;
  for (const Key& k : keys) {
    if (!seen.insert(k.id()).second) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": key ", k.label(), " given twice"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckBucket(const std::vector<Key>& keys,
                         const std::vector<std::vector<NDArray>>& values,
                         const std::vector<std::vector<NDArray>>& outs) {
  if (keys.size() != values.size() || keys.size() != outs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("pushpull: ", keys.size(), " keys but ",
                                                   values.size(), " lists of values and ",
                                                   outs.size(), " of outputs"));
  }
  return NoKeyTwice(keys, "pushpull");
}

absl::Status CheckTable(const Key& key, const Shape& shape, const TableInit& init) {
  if (shape.ndim() < 1 || !shape.IsValid() || shape[0] < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "init of row-sparse key ", key.label(), ": shape ", shape.ToString(),
        " needs at least one dimension and one row"));
  }
  if (!std::isfinite(init.scale) || init.scale < 0) {
    return absl::InvalidArgumentError(absl::StrCat("init of row-sparse key ", key.label(),
                                                   ": scale ", init.scale,
                                                   " must be finite and >= 0"));
  }
  return absl::OkStatus();
}

absl::Status WrongKeyKind(const Key& key, const char* what, bool key_is_table) {
  return absl::InvalidArgumentError(absl::StrCat(
      what, " of key ", key.label(), ": ",
      key_is_table ? "the key is row-sparse (InitRowSparse): push RowSparseNDArrays and pull "
                     "with RowSparsePull"
                   : "the key is dense (Init): push and pull NDArrays"));
}

absl::Status CheckRowSparseValues(const Key& key, const std::vector<RowSparseNDArray>& values,
                                  const Shape& shape) {
  if (values.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("row-sparse push of key ", key.label(), ": no arrays"));
  }
  for (size_t i = 0; i < values.size(); ++i) {
    if (values[i].is_none()) {
      return absl::InvalidArgumentError(
          absl::StrCat("row-sparse push of key ", key.label(), ": value ", i, " is null"));
    }
    if (values[i].shape() != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "row-sparse push of key ", key.label(), ": value ", i, " has shape ",
          values[i].shape().ToString(), " but the key holds ", shape.ToString()));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckTableBucket(const std::vector<Key>& keys,
                              const std::vector<std::vector<RowSparseNDArray>>& values,
                              const std::vector<std::vector<int64_t>>& row_ids) {
  if (keys.size() != values.size() || keys.size() != row_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("row-sparse pushpull: ", keys.size(),
                                                   " keys but ", values.size(),
                                                   " lists of values and ", row_ids.size(),
                                                   " of row ids"));
  }
  return NoKeyTwice(keys, "row-sparse pushpull");
}

RowSparseNDArray SumRowSparse(const std::vector<RowSparseNDArray>& values) {
  std::vector<RowSparseNDArray> here;
  for (const RowSparseNDArray& v : values) {
    here.push_back(v.context() == cpu() ? v : v.Copy(cpu()));
  }
  return here.size() == 1 ? here[0] : Sum(here);
}

std::unique_ptr<KVStore> NewLocalKVStore(const std::string& type) {
  return std::make_unique<LocalKVStore>(type);
}

}  // namespace internal
}  // namespace mx
