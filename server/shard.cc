#include "server/shard.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"
#include "ndarray/trace.h"
#include "proto/slice_key.h"

namespace mx {

ParameterShard::ParameterShard(ShardOptions options) : options_(options) {
  for (int r = 0; r < options_.num_workers; ++r) live_.insert(r);
}

absl::StatusOr<ParameterShard::Key*> ParameterShard::Find(int key) {
  auto it = keys_.find(key);
  if (it == keys_.end()) {
    return absl::NotFoundError(absl::StrCat("key ", key, " was never initialized"));
  }
  return &it->second;
}

void ParameterShard::SetReplicator(ReplicateFn replicate, std::function<void()> flush) {
  absl::MutexLock lock(&mu_);
  replicate_ = std::move(replicate);
  flush_ = std::move(flush);
}

void ParameterShard::QueueReplica(int backup, ReplicaStep step) {
  replicate_(backup, std::move(step));
  flush_due_.store(true, std::memory_order_release);
}

namespace {
// The shard whose ReplicaBatch is open on this thread, if any: another
// shard of the process (tests run several) flushes as usual.
thread_local const ParameterShard* t_batching = nullptr;
}  // namespace

ParameterShard::ReplicaBatch::ReplicaBatch(ParameterShard* shard)
    : shard_(shard), outer_(t_batching) {
  t_batching = shard;
}

ParameterShard::ReplicaBatch::~ReplicaBatch() {
  t_batching = outer_;
  shard_->FlushReplicas();
}

void ParameterShard::FlushReplicas() {
  if (t_batching == this || flush_ == nullptr) return;
  if (flush_due_.exchange(false, std::memory_order_acq_rel)) flush_();
}

absl::Status ParameterShard::Init(int key, const Shape& shape, const std::vector<float>& value,
                                  Copies copies) {
  if (!shape.IsValid() || static_cast<int64_t>(value.size()) != shape.Size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "init of key ", key, ": ", value.size(), " values for shape ", shape.ToString()));
  }
  absl::MutexLock lock(&mu_);
  auto it = keys_.find(key);
  if (tables_in_creation_.count(key) > 0 || (it != keys_.end() && it->second.table)) {
    return absl::InvalidArgumentError(
        absl::StrCat("init of key ", key, ": the key is row-sparse (a table) on this server"));
  }
  if (it != keys_.end()) {
    if (it->second.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "init of key ", key, ": already initialized with shape ",
          it->second.shape.ToString(), ", now ", shape.ToString()));
    }
    return absl::OkStatus();
  }
  int lost_peer = -1;
  MX_ASSIGN_OR_RETURN(copies, CopiesNow(key, copies, &lost_peer));
  Key& k = keys_[key];
  k.shape = shape;
  k.value = Pieces::Of(value);
  k.copies = copies;
  k.lost_peer = lost_peer;
  if (optimizer_ == nullptr) return absl::OkStatus();
  // A slice of a big key takes the name of its key (proto/slice_key.h).
  if (BaseKey(key) != key) optimizer_->SetParamNames(SliceKeyNames());
  absl::Status s = CatchError([&] { CopyWeights(&k); });
  if (!s.ok()) keys_.erase(key);
  return s;
}

absl::StatusOr<Copies> ParameterShard::CopiesNow(int key, Copies copies, int* lost_peer) const {
  if (copies.role == Copies::kPrimary && replicate_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "init of key ", key, ": a backup on server ", copies.peer,
        " was asked for, but this server does not replicate (start it with --replicas=2)"));
  }
  // A copy on a server that died already: this one holds the key alone
  // (until a spare takes that server's rank: ServerReplaced).
  *lost_peer = dead_servers_.count(copies.peer) ? copies.peer : -1;
  if (*lost_peer >= 0 || copies.peer < 0) copies = Copies{};
  return copies;
}

namespace {
// The bytes of a float32 array of `shape`, without overflowing.
double RangeBytes(const Shape& shape) {
  double bytes = sizeof(float);
  for (int64_t d : shape) bytes *= static_cast<double>(d);
  return bytes;
}
}  // namespace

absl::Status ParameterShard::InitTable(int key, const Shape& table, int64_t first_row,
                                       int64_t rows, float init_scale, uint64_t init_seed,
                                       Copies copies) {
  if (table.ndim() < 1 || !table.IsValid() || first_row < 0 || rows < 1 ||
      first_row > table[0] || rows > table[0] - first_row || !std::isfinite(init_scale) ||
      init_scale < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "init of row-sparse key ", key, ": rows [", first_row, ", ", first_row + rows,
        ") of a table ", table.ToString(), " with scale ", init_scale, " are not a valid range"));
  }
  Shape range = table;
  range[0] = rows;
  // A table is not bounded by a message's size, as a dense value is: a
  // range that cannot fit this machine's memory is refused, not attempted.
  const double bytes = RangeBytes(range);
  const double memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  if (!(bytes <= memory)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "init of row-sparse key ", key, ": rows [", first_row, ", ", first_row + rows, ") of ",
        table.ToString(), " need ", bytes / 1e9, " GB, more than this server's memory (",
        memory / 1e9, " GB); add servers"));
  }
  auto same = [&](const Key& k) {
    return k.table && k.table->table == table && k.table->first_row == first_row &&
           k.shape == range;
  };
  absl::MutexLock lock(&mu_);
  // Every worker inits the key, at about the same time: one fills the
  // range, the others wait for it (a second range of gigabytes, even
  // briefly, could exhaust the server's memory).
  struct Created {
    const std::set<int>* creating;
    int key;
    bool Done() const { return creating->count(key) == 0; }
  } created{&tables_in_creation_, key};
  mu_.Await(absl::Condition(&created, &Created::Done));
  int lost_peer = -1;
  MX_RETURN_IF_ERROR(CopiesNow(key, copies, &lost_peer).status());
  auto it = keys_.find(key);
  if (it != keys_.end()) {
    if (same(it->second)) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "init of row-sparse key ", key, ": already initialized here as ",
        it->second.table ? absl::StrCat("rows from ", it->second.table->first_row, " of ",
                                        it->second.table->table.ToString())
                         : absl::StrCat("a dense key ", it->second.shape.ToString()),
        ", now rows [", first_row, ", ", first_row + rows, ") of ", table.ToString()));
  }
  // Filling a range of millions of rows takes a while: outside the lock.
  tables_in_creation_.insert(key);
  mu_.Unlock();
  NDArray weight;
  const absl::Status filled = CatchError([&] {
    weight = Zeros(range);
    if (init_scale > 0) SampleUniformRows(-init_scale, init_scale, init_seed, first_row, &weight);
    weight.WaitToRead();
  });
  mu_.Lock();
  tables_in_creation_.erase(key);
  MX_RETURN_IF_ERROR(filled);
  // As of now: a server may have died meanwhile, and a key's state may
  // have come (ApplyState) while the lock was not held.
  MX_ASSIGN_OR_RETURN(copies, CopiesNow(key, copies, &lost_peer));
  if (keys_.count(key) > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("init of row-sparse key ", key, ": the key was given a state meanwhile"));
  }
  Key& k = keys_[key];
  k.shape = range;
  k.table = TableRange{table, first_row};
  k.weight = std::move(weight);
  k.copies = copies;
  k.lost_peer = lost_peer;
  // A range held under a slice key (replicas 2) takes its table's name.
  if (optimizer_ != nullptr && BaseKey(key) != key) optimizer_->SetParamNames(SliceKeyNames());
  return absl::OkStatus();
}

absl::Status ParameterShard::AssignRows(int key, std::vector<int64_t> rows, const Pieces& value) {
  absl::MutexLock lock(&mu_);
  MX_ASSIGN_OR_RETURN(Key * k, Find(key));
  RowIds ids = std::move(rows);
  MX_RETURN_IF_ERROR(CheckRows(key, *k, "assign_rows", &ids, /*relative=*/true));
  const int64_t dim = k->shape.RowSize();
  const size_t row_bytes = dim * sizeof(float);
  if (value.bytes() != ids->size() * row_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("assign_rows of key ", key, ": ",
                                                   value.bytes() / sizeof(float), " values for ",
                                                   ids->size(), " rows of ", dim));
  }
  mu_.Await(absl::Condition(k, &Key::idle));  // no step changes the weights meanwhile
  float* w = k->weight.data();
  for (size_t i = 0; i < ids->size(); ++i) value.CopyTo(i * row_bytes, row_bytes, w + (*ids)[i] * dim);
  return absl::OkStatus();
}

void ParameterShard::CopyWeights(Key* k) {
  if (k->table) return;  // a table's weights are its value
  FreshenValue(k);
  k->weight = Empty(k->shape);
  k->value.CopyTo(0, k->value.bytes(), k->weight.data());
  k->grad = Empty(k->shape);
}

void ParameterShard::FreshenValue(Key* k) {
  if (!k->value_stale) return;
  std::vector<float> value = pool_->Take(k->shape.Size());
  k->weight.SyncCopyToCPU(value.data(), value.size());
  k->value = Publish(std::move(value));
  k->value_stale = false;
}

Pieces ParameterShard::Publish(std::vector<float> buffer) {
  auto owned = std::shared_ptr<std::vector<float>>(
      new std::vector<float>(std::move(buffer)), [pool = pool_](std::vector<float>* v) {
        pool->Give(std::move(*v));
        delete v;
      });
  return Pieces::Of(owned->data(), owned->size(), owned);
}

namespace {

// A read position in Pieces, moving forward.
class PieceCursor {
 public:
  explicit PieceCursor(const Pieces& p) : pieces_(&p.pieces) { SkipEnded(); }

  // The bytes from here to the end of the current piece: they lie together.
  const char* data() const { return (*pieces_)[piece_].data() + at_; }
  size_t contiguous() const { return piece_ < pieces_->size() ? (*pieces_)[piece_].size() - at_ : 0; }

  // Copies the next `bytes` (which may span pieces; the pieces hold them) to
  // dst and moves past them.
  void Read(void* dst, size_t bytes) {
    for (char* out = static_cast<char*>(dst); bytes > 0;) {
      const size_t take = std::min(bytes, contiguous());
      std::memcpy(out, data(), take);
      out += take;
      Skip(take);
      bytes -= take;
    }
  }
  // Moves past `bytes` of the current piece (at most contiguous()).
  void Skip(size_t bytes) {
    at_ += bytes;
    SkipEnded();
  }

 private:
  void SkipEnded() {
    while (piece_ < pieces_->size() && at_ == (*pieces_)[piece_].size()) {
      ++piece_;
      at_ = 0;
    }
  }

  const std::vector<absl::Span<const char>>* pieces_;
  size_t piece_ = 0, at_ = 0;
};

// A float at any byte address (network buffers need not align them).
inline float LoadFloat(const char* p) {
  float x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// sum[0, m) = in[0] + in[1] + ..., element by element, added in that order
// (in[p] points to m floats), a block at a time so that the block of the
// sum stays in cache while every input is added to it.
void AddRun(const std::vector<const char*>& in, size_t m, float* sum) {
  constexpr size_t kBlock = 4096;  // floats
  for (size_t begin = 0; begin < m; begin += kBlock) {
    const size_t count = std::min(kBlock, m - begin);
    float* __restrict s = sum + begin;
    const char* first = in[0] + begin * sizeof(float);
    if (in.size() == 1) {
      std::memcpy(s, first, count * sizeof(float));
      continue;
    }
    const char* second = in[1] + begin * sizeof(float);
    for (size_t i = 0; i < count; ++i) {
      s[i] = LoadFloat(first + i * sizeof(float)) + LoadFloat(second + i * sizeof(float));
    }
    for (size_t p = 2; p < in.size(); ++p) {
      const char* next = in[p] + begin * sizeof(float);
      for (size_t i = 0; i < count; ++i) s[i] += LoadFloat(next + i * sizeof(float));
    }
  }
}

// sum = pushes[0] + pushes[1] + ... (n floats each), added in that order
// (the same bits every run). The pushes are read where they lie, without
// copies, in runs that are contiguous in all of them; a float that
// straddles two pieces of a push is assembled on its own.
void Sum(const std::vector<Pieces>& pushes, size_t n, float* sum) {
  std::vector<PieceCursor> cursors;
  for (const Pieces& p : pushes) cursors.emplace_back(p);
  std::vector<const char*> run(pushes.size());
  for (size_t done = 0; done < n;) {
    size_t bytes = (n - done) * sizeof(float);
    for (const PieceCursor& c : cursors) bytes = std::min(bytes, c.contiguous());
    const size_t m = bytes / sizeof(float);
    if (m == 0) {  // the next float straddles pieces in some push
      float total = 0;
      for (size_t p = 0; p < cursors.size(); ++p) {
        float x;
        cursors[p].Read(&x, sizeof(x));
        total = p == 0 ? x : total + x;
      }
      sum[done++] = total;
      continue;
    }
    for (size_t p = 0; p < cursors.size(); ++p) run[p] = cursors[p].data();
    AddRun(run, m, sum + done);
    for (PieceCursor& c : cursors) c.Skip(m * sizeof(float));
    done += m;
  }
}

// A push's answer in the shard's list of answers (which carry pulls'):
// the callback, with a status only.
std::pair<ParameterShard::PullCallback, absl::StatusOr<ParameterShard::Value>> PushAnswer(
    ParameterShard::PushCallback done, absl::Status s) {
  auto answer = [done = std::move(done)](absl::StatusOr<ParameterShard::Value> v) {
    done(v.status());
  };
  if (s.ok()) return {std::move(answer), ParameterShard::Value{}};
  return {std::move(answer), std::move(s)};
}

}  // namespace

absl::Status ParameterShard::Push(int key, int rank, Pieces value, RowIds rows) {
  absl::Notification done;
  absl::Status result;
  PushAsync(
      key, rank, std::move(value),
      [&](absl::Status s) {
        result = std::move(s);
        done.Notify();
      },
      0, std::move(rows));
  done.WaitForNotification();
  return result;
}

void ParameterShard::PushAsync(int key, int rank, Pieces value, PushCallback done, int64_t seq,
                               RowIds rows) {
  Answers answers;
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    refused = Record(key, rank, seq, &value, &done, &rows, &answers);
  }
  if (!refused.ok()) answers.push_back(PushAnswer(std::move(done), std::move(refused)));
  Deliver(std::move(answers));
}

absl::Status ParameterShard::NotPrimaryYet(int id, const Key& k, const char* what) {
  return absl::UnavailableError(absl::StrCat(
      what, " of key ", id, ": this server holds the key as the backup of server ", k.copies.peer,
      ", which has not been declared dead here (yet)"));
}

absl::StatusOr<bool> ParameterShard::Seen(int id, Key* k, int rank, int64_t seq) {
  if (seq <= 0) return false;
  int64_t& seen = k->seen[rank];
  if (seq <= seen) return true;
  if (seq != seen + 1) {
    return absl::InvalidArgumentError(absl::StrCat("push of key ", id, " from worker ", rank,
                                                   ": push number ", seq, " after number ", seen));
  }
  seen = seq;
  return false;
}

bool ParameterShard::Servable(const Key& k) const {
  return !options_.sync || k.copies.role != Copies::kPrimary || k.replicated >= k.version;
}

absl::Status ParameterShard::CheckRows(int id, const Key& k, const char* what, RowIds* rows,
                                       bool relative) {
  if (rows->has_value() != k.table.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " of key ", id, ": ",
        k.table ? "the key is row-sparse (a table): the call must name its rows"
                : "the key is dense: a row-sparse call cannot use it"));
  }
  if (!k.table) return absl::OkStatus();
  const int64_t first = k.table->first_row, end = first + k.shape[0];
  std::vector<int64_t>& ids = **rows;
  MX_RETURN_IF_ERROR(CheckRowIds(ids, k.table->table[0], absl::StrCat(what, " of key ", id)));
  if (!ids.empty() && (ids.front() < first || ids.back() >= end)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " of key ", id, ": row id ", ids.front() < first ? ids.front() : ids.back(),
        " is not among this server's rows [", first, ", ", end, ")"));
  }
  if (relative) {
    for (int64_t& r : ids) r -= first;
  }
  return absl::OkStatus();
}

absl::Status ParameterShard::Record(int key, int rank, int64_t seq, Pieces* value,
                                    PushCallback* done, RowIds* rows, Answers* answers) {
  if (rank < 0 || rank >= options_.num_workers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push of key ", key, ": worker rank ", rank, " is outside 0..", options_.num_workers - 1));
  }
  if (dead_.count(rank)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "push of key ", key, ": worker ", rank, " was declared dead"));
  }
  if (finished_.count(rank)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "push of key ", key, ": worker ", rank, " has left the job"));
  }
  if (!closed_.empty()) {
    return absl::UnavailableError(absl::StrCat("push of key ", key, ": ", closed_));
  }
  MX_ASSIGN_OR_RETURN(Key * k, Find(key));
  // dist_async: each push is a step of its own, one at a time per key.
  if (!options_.sync) mu_.Await(absl::Condition(k, &Key::idle));
  if (!k->failed.ok()) {
    return absl::Status(k->failed.code(), absl::StrCat("push of key ", key, ": ", k->failed.message()));
  }
  MX_RETURN_IF_ERROR(CheckRows(key, *k, "push", rows, /*relative=*/true));
  const int64_t expected =
      k->table ? static_cast<int64_t>((*rows)->size()) * k->shape.RowSize() : k->shape.Size();
  if (value->bytes() != expected * sizeof(float)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push of key ", key, " from worker ", rank, ": ", value->bytes() / sizeof(float),
        " values but the key holds ",
        k->table ? absl::StrCat((*rows)->size(), " rows of ", k->shape.RowSize())
                 : absl::StrCat(k->shape.ToString(), " (", k->shape.Size(), ")")));
  }
  std::vector<int64_t> row_ids = rows->has_value() ? std::move(**rows) : std::vector<int64_t>();
  if (k->copies.role == Copies::kBackup) return NotPrimaryYet(key, *k, "push");
  MX_ASSIGN_OR_RETURN(const bool resent, Seen(key, k, rank, seq));
  if (resent) {  // in a step already, or queued for one
    answers->push_back(PushAnswer(std::move(*done), absl::OkStatus()));
    return absl::OkStatus();
  }
  if (options_.sync) {
    // Parked behind the worker's earlier pushes; admitted (and answered)
    // at once if there is room. A worker has at most staleness + 2 pushes
    // of a key unanswered (its own, and those it sends again after a
    // failover): one that sends more, without waiting for answers, is
    // refused rather than held without bound.
    const size_t most_parked = std::max(options_.max_pending_pushes, options_.staleness) + 2;
    if (k->parked[rank].size() >= most_parked) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "push of key ", key, " from worker ", rank, ": ", most_parked,
          " of its pushes of the key wait for room already (a worker sends the next push "
          "of a key once the last is answered)"));
    }
    k->parked[rank].push_back({{std::move(*value), seq, std::move(row_ids)}, std::move(*done)});
    MaybeComplete(key, k, answers);
  } else if (!CompleteStep(key, k, {{std::move(*value), seq, std::move(row_ids)}}, {rank})) {
    // Taken: the key's pulls and later pushes say why it failed.
    TakeAnswered(key, k, answers);
    answers->push_back(PushAnswer(std::move(*done), absl::OkStatus()));
  } else {
    // Answered once the backup holds it, if there is one.
    k->unreplicated.emplace(k->version, std::move(*done));
    TakeAnswered(key, k, answers);
  }
  return absl::OkStatus();
}

ParameterShard::Held ParameterShard::held(int key) const {
  absl::MutexLock lock(&mu_);
  Held h;
  auto k = keys_.find(key);
  if (k == keys_.end()) return h;
  for (const auto& [r, queued] : k->second.pending) h.pending += static_cast<int>(queued.size());
  for (const auto& [r, queued] : k->second.parked) h.parked += static_cast<int>(queued.size());
  return h;
}

absl::StatusOr<int64_t> ParameterShard::DenseSize(int key) const {
  absl::MutexLock lock(&mu_);
  auto k = keys_.find(key);
  if (k == keys_.end())
    return absl::NotFoundError(absl::StrCat("key ", key, " was never initialized"));
  if (k->second.table) {
    return absl::InvalidArgumentError(absl::StrCat("key ", key, " is row-sparse (a table)"));
  }
  return k->second.shape.Size();
}

void ParameterShard::AdmitParked(int id, Key* k, Answers* answers) {
  const absl::Status stuck = Stuck(id, *k, "push");
  for (auto it = k->parked.begin(); it != k->parked.end();) {
    const int rank = it->first;
    std::deque<Key::Parked>& parked = it->second;
    std::deque<Pending>& pending = k->pending[rank];
    while (!parked.empty()) {
      absl::Status why = stuck;
      if (why.ok() && dead_.count(rank)) {
        why = absl::FailedPreconditionError(
            absl::StrCat("push of key ", id, ": worker ", rank, " was declared dead"));
      }
      if (why.ok() && static_cast<int>(pending.size()) >=
                          std::max(options_.max_pending_pushes, options_.staleness)) {
        break;
      }
      if (why.ok()) pending.push_back(std::move(parked.front().push));
      answers->push_back(PushAnswer(std::move(parked.front().done), std::move(why)));
      parked.pop_front();
    }
    it = parked.empty() ? k->parked.erase(it) : std::next(it);
  }
}

absl::Status ParameterShard::Stuck(int id, const Key& k, const char* what) const {
  if (!closed_.empty()) return absl::UnavailableError(absl::StrCat(what, " of key ", id, ": ", closed_));
  if (!k.failed.ok()) {
    return absl::Status(k.failed.code(), absl::StrCat(what, " of key ", id, ": ", k.failed.message()));
  }
  if (!options_.elastic && !dead_.empty()) {
    return absl::UnavailableError(absl::StrCat(what, " of key ", id, ": worker(s) ", DeadWorkers(),
                                               " died; the step cannot complete (not elastic)"));
  }
  return absl::OkStatus();
}

void ParameterShard::MaybeComplete(int id, Key* k, Answers* answers) {
  if (k->completing) return;  // that thread completes this step too
  if (k->copies.role == Copies::kBackup) return;  // its primary completes them
  // Steps complete while every live worker has a push queued; workers that
  // have left add the pushes they queued before.
  for (;;) {
    AdmitParked(id, k, answers);
    if (AnyPushMissing(k)) break;
    std::vector<int> ranks;  // sorted: rank order gives the same bits every run
    for (const auto& [r, queued] : k->pending) {
      if (!queued.empty() && (live_.count(r) || finished_.count(r))) ranks.push_back(r);
    }
    if (ranks.empty()) break;
    std::vector<Pending> pushes;
    for (int r : ranks) {
      pushes.push_back(std::move(k->pending[r].front()));
      k->pending[r].pop_front();
      k->filled_below = 0;
    }
    if (!CompleteStep(id, k, std::move(pushes), ranks)) break;
  }
  TakeAnswered(id, k, answers);
}

bool ParameterShard::CompleteTableStep(int id, Key* k, std::vector<Pending> pending,
                                       const std::vector<int>& ranks) {
  ReplicaStep step{id, k->version + 1, {}, {}};
  for (size_t i = 0; i < ranks.size(); ++i) step.pushes.push_back({ranks[i], pending[i].seq});
  k->completing = true;
  ++completing_;
  const bool optimize = optimizer_ != nullptr;
  RowSparseNDArray sum;
  mu_.Unlock();
  absl::Status s = CatchError([&] {
    std::vector<RowSparseNDArray> terms;
    for (Pending& p : pending) {
      Shape rows = k->shape;
      rows[0] = static_cast<int64_t>(p.rows.size());
      NDArray data(rows);
      if (rows.Size() > 0) p.value.CopyTo(0, p.value.bytes(), data.data());
      terms.emplace_back(k->shape, std::move(p.rows), std::move(data));
    }
    sum = terms.size() == 1 ? terms[0] : Sum(terms);  // in rank order
  });
  mu_.Lock();
  if (s.ok()) {
    s = CatchError([&] {  // queued
      if (optimize) {
        optimizer_->UpdateRows(id, k->weight, sum);
      } else {
        k->weight.Assign(0.f);
        k->weight += sum;
      }
    });
  }
  mu_.Unlock();
  if (s.ok()) s = CatchError([&] { k->weight.WaitToRead(); });
  mu_.Lock();
  if (!EndStep(id, k, s)) return false;
  if (k->copies.role == Copies::kPrimary && k->copies.peer >= 0) {
    // What the backup applies the same way: the sum (computed: the
    // update read it) and its rows.
    const size_t n = static_cast<size_t>(sum.data().shape().Size());
    if (n > 0) step.value = Pieces::Of(sum.data().data(), n, std::make_shared<RowSparseNDArray>(sum));
    step.rows = sum.indices();
    QueueReplica(k->copies.peer, std::move(step));
  }
  return true;
}

bool ParameterShard::EndStep(int id, Key* k, const absl::Status& s) {
  k->completing = false;
  --completing_;
  if (!s.ok()) {
    FailKey(id, k, s);
    return false;
  }
  ++k->version;
  return true;
}

ParameterShard::Value ParameterShard::TableRows(const Key& k, const std::vector<int64_t>& rows) {
  const int64_t dim = k.shape.RowSize();
  std::vector<float> out = pool_->Take(rows.size() * dim);
  const float* w = k.weight.data();
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(out.data() + i * dim, w + (rows[i] - k.table->first_row) * dim,
                dim * sizeof(float));
  }
  return Value{Publish(std::move(out)), k.version};
}

bool ParameterShard::CompleteStep(int id, Key* k, std::vector<Pending> pending,
                                  const std::vector<int>& ranks) {
  if (k->table) return CompleteTableStep(id, k, std::move(pending), ranks);
  // What the backup needs to take the same step: the value applied.
  const bool replicate = k->copies.role == Copies::kPrimary && k->copies.peer >= 0;
  ReplicaStep step{id, k->version + 1, {}, {}};
  std::vector<Pieces> pushes;
  for (size_t i = 0; i < pending.size(); ++i) {
    pushes.push_back(std::move(pending[i].value));
    if (i < ranks.size()) step.pushes.push_back({ranks[i], pending[i].seq});
  }
  if (pushes.size() == 1 && replicate) step.value = pushes[0];
  auto replicated = [&] {
    if (replicate) QueueReplica(k->copies.peer, std::move(step));
    return true;
  };
  if (optimizer_ == nullptr && pushes.size() == 1) {
    ++k->version;
    k->value = std::move(pushes[0]);  // as it arrived
    return replicated();
  }
  // Summing reads every push, and an update takes its time on the engine:
  // other keys need not wait for either. The key (a map node: its address
  // is stable) keeps its version meanwhile, and the optimizer stays
  // (SetOptimizer waits for completing_ to drop to 0).
  k->completing = true;
  ++completing_;
  const bool optimize = optimizer_ != nullptr;
  const int64_t traced_from = trace::Enabled() ? trace::NowMicros() : 0;
  const size_t n = k->shape.Size();
  // A backup's step changes only its weights (Key::value_stale).
  const bool weights_only = optimize && k->copies.role == Copies::kBackup;
  std::vector<float> next = weights_only ? std::vector<float>() : pool_->Take(n);
  // The sum, when the backup needs it and the update will not keep it.
  const bool copy_sum = replicate && optimize && pushes.size() > 1;
  std::vector<float> sum = copy_sum ? pool_->Take(n) : std::vector<float>();
  mu_.Unlock();
  absl::Status s = CatchError([&] {
    if (optimize) k->grad.WaitToWrite();  // the last update has read it
    Sum(pushes, n, optimize ? k->grad.data() : next.data());
    if (copy_sum) std::memcpy(sum.data(), k->grad.data(), n * sizeof(float));
  });
  mu_.Lock();
  if (s.ok() && optimize) {
    s = CatchError([&] { optimizer_->Update(id, k->weight, k->grad); });  // queued
    mu_.Unlock();
    // The answers of the last version may still hold its buffer: the new
    // version is a copy.
    if (s.ok()) {
      s = CatchError(
          [&] { weights_only ? k->weight.WaitToRead() : k->weight.SyncCopyToCPU(next.data(), n); });
    }
    mu_.Lock();
  }
  if (!EndStep(id, k, s)) return false;
  if (weights_only) {
    k->value = Pieces();  // its buffer goes back to the pool
    k->value_stale = true;
  } else {
    k->value = Publish(std::move(next));
  }
  if (traced_from != 0) {
    trace::Complete("server", optimize ? "sum+update" : "sum", traced_from, trace::NowMicros(),
                    absl::StrCat("\"key\":", id, ",\"version\":", k->version,
                                 ",\"pushes\":", pushes.size()));
  }
  if (copy_sum) step.value = Publish(std::move(sum));
  if (replicate && pushes.size() > 1 && !optimize) step.value = k->value;  // the sum
  return replicated();
}

void ParameterShard::FailKey(int id, Key* k, const absl::Status& s) {
  if (k->failed.ok()) {
    k->failed = absl::Status(s.code(), absl::StrCat("step ", k->version + 1, " of key ", id,
                                                    " failed: ", s.message()));
  }
  k->pending.clear();
  k->filled_below = 0;
}

std::vector<float> ParameterShard::BufferPool::Take(size_t n) {
  {
    absl::MutexLock lock(&mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->size() != n) continue;
      std::vector<float> buffer = std::move(*it);
      free_.erase(it);
      free_bytes_ -= n * sizeof(float);
      return buffer;
    }
  }
  return std::vector<float>(n);
}

void ParameterShard::BufferPool::Give(std::vector<float> buffer) {
  // Enough for a few steps of every key of a typical model; beyond that,
  // memory goes back to the allocator.
  constexpr size_t kMaxFreeBytes = size_t{256} << 20;
  const size_t bytes = buffer.size() * sizeof(float);
  absl::MutexLock lock(&mu_);
  if (bytes == 0 || free_bytes_ + bytes > kMaxFreeBytes) return;
  free_bytes_ += bytes;
  free_.push_back(std::move(buffer));
}

std::optional<absl::StatusOr<ParameterShard::Value>> ParameterShard::Answer(
    int id, Key* key, int64_t min_version, const RowIds& rows) {
  const Key& k = *key;
  if (!closed_.empty() || !k.failed.ok()) return Stuck(id, k, "pull");
  if (k.copies.role == Copies::kBackup) return NotPrimaryYet(id, k, "pull");
  if (k.table && k.version >= min_version && Servable(k)) {
    if (k.completing) return std::nullopt;  // its weights are changing
    return TableRows(k, *rows);
  }
  if (k.version >= min_version && Servable(k)) return Value{k.value, k.version};
  if (absl::Status stuck = Stuck(id, k, "pull"); !stuck.ok()) return stuck;
  return std::nullopt;
}

void ParameterShard::TakeAnswered(int id, Key* k, Answers* answers) {
  AdmitParked(id, k, answers);  // or fails them, as the pulls below
  // dist_async pushes the backup holds (or that fail, as the pulls below).
  const bool one_copy = k->copies.role != Copies::kPrimary || k->copies.peer < 0;
  const absl::Status stuck = Stuck(id, *k, "push");
  for (auto it = k->unreplicated.begin(); it != k->unreplicated.end();) {
    if (stuck.ok() && !one_copy && it->first > k->replicated) break;
    answers->push_back(PushAnswer(std::move(it->second), stuck));
    it = k->unreplicated.erase(it);
  }
  if (!WaitersMayBeAnswered(*k)) return;
  k->min_waiting = std::numeric_limits<int64_t>::max();
  for (auto it = k->waiters.begin(); it != k->waiters.end();) {
    std::optional<absl::StatusOr<Value>> answer =
        Answer(id, k, it->second.min_version, it->second.rows);
    if (!answer.has_value()) {
      k->min_waiting = std::min(k->min_waiting, it->second.min_version);
      ++it;
      continue;
    }
    answers->emplace_back(std::move(it->second.done), *std::move(answer));
    it = k->waiters.erase(it);
  }
}

bool ParameterShard::WaitersMayBeAnswered(const Key& k) const {
  if (k.waiters.empty()) return false;
  // Answer's cases: the key stuck or held as a backup answers every
  // waiter; else a servable version answers those that wait for it.
  if (!closed_.empty() || !k.failed.ok() || (!options_.elastic && !dead_.empty()) ||
      k.copies.role == Copies::kBackup) {
    return true;
  }
  return Servable(k) && k.version >= k.min_waiting;
}

void ParameterShard::Deliver(Answers answers) {
  FlushReplicas();  // first: the pulls of these steps wait for their backups
  for (auto& [done, value] : answers) done(std::move(value));
}

uint64_t ParameterShard::PullAsync(int key, int64_t min_version, PullCallback done,
                                   RowIds rows) {
  std::optional<absl::StatusOr<Value>> answer;
  uint64_t id;
  {
    absl::MutexLock lock(&mu_);
    id = next_waiter_++;
    absl::StatusOr<Key*> k = Find(key);
    absl::Status bad = k.ok() ? CheckRows(key, **k, "pull", &rows, /*relative=*/false)
                              : k.status();
    if (!bad.ok()) {
      answer = bad;
    } else {
      answer = Answer(key, *k, min_version, rows);
      if (!answer.has_value()) {
        (*k)->waiters.emplace(id, Waiter{min_version, std::move(done), std::move(rows)});
        (*k)->min_waiting = std::min((*k)->min_waiting, min_version);
      }
    }
  }
  if (answer.has_value()) done(*std::move(answer));
  return id;
}

bool ParameterShard::CancelPull(int key, uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto k = keys_.find(key);
  return k != keys_.end() && k->second.waiters.erase(id) > 0;
}

absl::StatusOr<ParameterShard::Value> ParameterShard::Pull(int key, int64_t min_version,
                                                           absl::Time deadline, RowIds rows) {
  struct Result {
    absl::Notification done;
    absl::StatusOr<Value> value;
  };
  auto result = std::make_shared<Result>();
  const uint64_t id = PullAsync(
      key, min_version,
      [result](absl::StatusOr<Value> v) {
        result->value = std::move(v);
        result->done.Notify();
      },
      std::move(rows));
  if (!result->done.WaitForNotificationWithDeadline(deadline)) {
    absl::Status timed_out = TimeOutPull(key, id, min_version);
    if (!timed_out.ok()) return timed_out;
  }
  result->done.WaitForNotification();  // answered, perhaps just now
  return std::move(result->value);
}

absl::Status ParameterShard::TimeOutPull(int key, uint64_t id, int64_t min_version) {
  absl::MutexLock lock(&mu_);
  auto k = keys_.find(key);
  if (k == keys_.end() || k->second.waiters.erase(id) == 0) return absl::OkStatus();
  const Key& held = k->second;
  if (held.version >= min_version) {  // not Servable
    return absl::DeadlineExceededError(absl::StrCat(
        "pull of key ", key, ": version ", held.version, " was not acknowledged by the key's backup, server ",
        held.copies.peer, ", by the deadline (it holds version ", held.replicated,
        "; is it reachable from this server?)"));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "pull of key ", key, ": version ", min_version, " not reached by the deadline (at ",
      held.version, "; waiting for pushes from worker(s) ",
      absl::StrJoin(MissingPushes(held), ", "), ")"));
}

bool ParameterShard::AnyPushMissing(Key* k) const {
  for (auto r = live_.lower_bound(k->filled_below); r != live_.end(); ++r) {
    auto it = k->pending.find(*r);
    if (it == k->pending.end() || it->second.empty()) {
      k->filled_below = *r;
      return true;
    }
  }
  k->filled_below = std::numeric_limits<int>::max();
  return false;
}

std::vector<int> ParameterShard::MissingPushes(const Key& k) const {
  std::vector<int> missing;
  for (int r : live_) {
    auto it = k.pending.find(r);
    if (it == k.pending.end() || it->second.empty()) missing.push_back(r);
  }
  return missing;
}

absl::Status ParameterShard::SetOptimizer(const std::string& name,
                                          const Optimizer::Options& options,
                                          const std::map<int, std::string>& param_names,
                                          const std::map<std::string, float>& lr_mult,
                                          const std::map<std::string, float>& wd_mult) {
  MX_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> opt, Optimizer::Create(name, options));
  opt->SetLrMult(lr_mult);
  opt->SetWdMult(wd_mult);
  absl::MutexLock lock(&mu_);
  // A step completing outside the lock uses the optimizer it started with
  // (or none): let it land before the weights are copied from the values.
  mu_.Await(NoStepInFlight());
  // The optimizer it has, set again (every worker sets it; in dist_async a
  // late worker's did so after the others' updates): its states and update
  // counts are kept. Replaced, they restarted momentum and the schedule.
  if (optimizer_ != nullptr && optimizer_->name() == opt->name() &&
      optimizer_->options() == opt->options() && param_names_ == param_names &&
      optimizer_->lr_mult() == opt->lr_mult() && optimizer_->wd_mult() == opt->wd_mult()) {
    return absl::OkStatus();
  }
  return InstallOptimizer(std::move(opt), param_names);
}

absl::Status ParameterShard::InstallOptimizer(std::unique_ptr<Optimizer> opt,
                                              const std::map<int, std::string>& param_names) {
  param_names_ = param_names;
  optimizer_ = std::move(opt);
  optimizer_->SetParamNames(SliceKeyNames());
  absl::Status s = CatchError([&] {
    for (auto& [id, k] : keys_) CopyWeights(&k);
  });
  if (!s.ok()) optimizer_ = nullptr;
  return s;
}

std::map<int, std::string> ParameterShard::SliceKeyNames() const {
  std::map<int, std::string> names = param_names_;
  for (const auto& [id, key] : keys_) {
    auto base = param_names_.find(BaseKey(id));
    if (BaseKey(id) != id && base != param_names_.end()) names[id] = base->second;
  }
  return names;
}

absl::StatusOr<std::string> ParameterShard::SaveOptimizerStates(const std::set<int>* keys) const {
  absl::MutexLock lock(&mu_);
  mu_.Await(NoStepInFlight());  // its update would change the state
  if (optimizer_ == nullptr) {
    return absl::FailedPreconditionError("no optimizer is set on this server");
  }
  if (keys == nullptr) return optimizer_->SaveStates();
  for (int key : *keys) {
    if (!keys_.count(key)) {
      return absl::NotFoundError(absl::StrCat("key ", key, " is not on this server"));
    }
  }
  return optimizer_->SaveStatesOf(*keys);
}

absl::Status ParameterShard::LoadOptimizerStates(const std::string& bytes, bool merge) {
  absl::MutexLock lock(&mu_);
  mu_.Await(NoStepInFlight());  // its update reads the state
  if (optimizer_ == nullptr) {
    return absl::FailedPreconditionError("set the optimizer before loading its state");
  }
  // A state of another shape than its key (saved by another model, or with
  // another big-key bound) is refused now, not at the key's next step.
  std::map<int, Shape> shapes;
  for (const auto& [id, k] : keys_) shapes.emplace(id, k.shape);
  return merge ? optimizer_->MergeStates(bytes, shapes) : optimizer_->LoadStates(bytes, shapes);
}

absl::Status ParameterShard::ApplyReplicated(int primary, std::vector<ReplicaStep> steps) {
  absl::MutexLock lock(&mu_);
  for (ReplicaStep& step : steps) {
    if (step.state != nullptr) {
      MX_RETURN_IF_ERROR(ApplyState(primary, step));
      continue;
    }
    MX_ASSIGN_OR_RETURN(Key * k, Find(step.key));
    // A step being applied (outside the lock) by a call the primary sent
    // again, its first having failed on its side, is not applied twice.
    mu_.Await(absl::Condition(k, &Key::idle));
    if (k->copies.role != Copies::kBackup || k->copies.peer != primary) {
      return absl::FailedPreconditionError(absl::StrCat(
          "replicated step of key ", step.key, " from server ", primary,
          ": this server does not hold the key as its backup",
          k->copies.role == Copies::kOnly ? " (any more: it took the key over)" : ""));
    }
    if (!k->failed.ok()) return Stuck(step.key, *k, "replicated step");
    if (step.version <= k->version) continue;  // sent again
    if (step.version != k->version + 1) {
      return absl::DataLossError(absl::StrCat("replicated step of key ", step.key, ": version ",
                                              step.version, " after ", k->version));
    }
    MX_RETURN_IF_ERROR(CheckReplicaStep(step, *k));
    if (!CompleteStep(step.key, k, {{std::move(step.value), 0, std::move(step.rows)}}, {})) {
      return Stuck(step.key, *k, "replicated step");
    }
    for (const auto& [rank, seq] : step.pushes) {
      k->seen[rank] = std::max(k->seen[rank], seq);
    }
  }
  return absl::OkStatus();
}

absl::Status ParameterShard::CheckReplicaStep(const ReplicaStep& step, const Key& k) {
  const std::string what = absl::StrCat("replicated step of key ", step.key);
  if (!k.table) {
    if (!step.rows.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": rows for a dense key"));
    if (step.value.bytes() == k.shape.Size() * sizeof(float)) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", step.value.bytes() / sizeof(float),
                                                   " values for a key of ", k.shape.Size()));
  }
  // Ids from the range's first row.
  MX_RETURN_IF_ERROR(CheckRowIds(step.rows, k.shape[0], what));
  if (step.value.bytes() == step.rows.size() * k.shape.RowSize() * sizeof(float)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", step.value.bytes() / sizeof(float),
                                                 " values for ", step.rows.size(), " rows of ",
                                                 k.shape.RowSize()));
}

void ParameterShard::Replicated(int key, int64_t version) {
  Answers answers;
  {
    absl::MutexLock lock(&mu_);
    auto k = keys_.find(key);
    if (k == keys_.end()) return;
    k->second.replicated = std::max(k->second.replicated, version);
    TakeAnswered(key, &k->second, &answers);
  }
  Deliver(std::move(answers));
}

int ParameterShard::ServerDied(int server) {
  Answers answers;
  int taken = 0;
  {
    absl::MutexLock lock(&mu_);
    mu_.Await(NoStepInFlight());  // a replicated step being applied lands first
    dead_servers_.insert(server);
    for (auto& [id, k] : keys_) {
      if (k.copies.peer != server || k.copies.role == Copies::kOnly) continue;
      if (k.copies.role == Copies::kBackup) ++taken;
      k.copies = Copies{};  // one copy, here
      k.lost_peer = server;
      if (absl::Status s = CatchError([&] { FreshenValue(&k); }); !s.ok()) FailKey(id, &k, s);
      MaybeComplete(id, &k, &answers);
    }
  }
  Deliver(std::move(answers));
  return taken;
}

namespace {

// Protobuf's bound for an entry of each kind: a tag, a varint length and,
// in a map, the entry's own tags (a key or value of up to 10 bytes).
constexpr size_t kFieldBytes = 16;
constexpr size_t kVarintBytes = 10;  // an int64, packed

template <class Map>
size_t MapBytes(const Map& map) {
  size_t bytes = 0;
  for (const auto& [k, v] : map) {
    bytes += kFieldBytes + 2 * kVarintBytes;
    if constexpr (std::is_same_v<std::decay_t<decltype(k)>, std::string>) bytes += k.size();
    if constexpr (std::is_same_v<std::decay_t<decltype(v)>, std::string>) bytes += v.size();
  }
  return bytes;
}

}  // namespace

size_t KeyState::WireBytes() const {
  return kFieldBytes * 8 + value.size() * sizeof(float) + optimizer_states.size() +
         optimizer.size() + (shape.ndim() + table.ndim() + 1) * kVarintBytes +
         seen.size() * 2 * kVarintBytes + MapBytes(optimizer_options) + MapBytes(param_names) +
         MapBytes(lr_mult) + MapBytes(wd_mult);
}

size_t ReplicaStep::WireBytes() const {
  if (state != nullptr) return state->WireBytes();
  return kFieldBytes * 8 + value.bytes() + (rows.size() + 3) * kVarintBytes +
         pushes.size() * 2 * kVarintBytes;
}

int ParameterShard::ServerReplaced(int server) {
  const int restored = RestoreCopies(server);
  FlushReplicas();
  return restored;
}

int ParameterShard::RestoreCopies(int server) {
  absl::MutexLock lock(&mu_);
  mu_.Await(NoStepInFlight());  // the state sent is that of a completed step
  if (!dead_servers_.erase(server) || replicate_ == nullptr) return 0;
  int restored = 0;
  for (auto& [id, k] : keys_) {
    if (k.lost_peer != server || k.copies.role != Copies::kOnly || !k.failed.ok()) continue;
    absl::StatusOr<std::shared_ptr<const KeyState>> state = StateOf(id, k);
    if (!state.ok()) {
      FailKey(id, &k, state.status());
      continue;
    }
    const size_t bytes = (*state)->WireBytes();
    if (bytes > options_.max_state_bytes) {
      std::cerr << "mx_server: key " << id << " keeps one copy: its state (" << bytes / 1e6
                << " MB) is more than a message to server " << server << " may carry ("
                << options_.max_state_bytes / 1e6 << " MB)" << std::endl;
      continue;
    }
    k.copies = Copies{Copies::kPrimary, server};
    k.lost_peer = -1;
    ReplicaStep step{id, k.version, {}, {}, *std::move(state)};
    QueueReplica(server, std::move(step));
    ++restored;
  }
  return restored;
}

int64_t ParameterShard::Unapplied(const Key& k, int rank) {
  int64_t n = 0;
  if (auto it = k.pending.find(rank); it != k.pending.end()) {
    for (const Pending& p : it->second) n += p.seq > 0;
  }
  if (auto it = k.parked.find(rank); it != k.parked.end()) {
    for (const Key::Parked& p : it->second) n += p.push.seq > 0;
  }
  return n;
}

absl::StatusOr<std::shared_ptr<const KeyState>> ParameterShard::StateOf(int id,
                                                                       const Key& k) const {
  auto state = std::make_shared<KeyState>();
  state->shape = k.shape;
  state->value.resize(k.shape.Size());
  if (k.table) {  // its weights are its value (between steps: in sync)
    std::memcpy(state->value.data(), k.weight.data(), state->value.size() * sizeof(float));
    state->table = k.table->table;
    state->first_row = k.table->first_row;
  } else {  // fresh: only a backup's goes stale, and ServerDied freshens it
    k.value.CopyTo(0, k.value.bytes(), state->value.data());
  }
  // Only the pushes of completed steps: those pending or parked here are
  // not in the value, and their workers send them again to whichever copy
  // takes the key over (a push is numbered one above the last recorded).
  state->seen = k.seen;
  for (auto& [rank, seen] : state->seen) seen -= Unapplied(k, rank);
  if (optimizer_ != nullptr) {
    state->optimizer = optimizer_->name();
    state->optimizer_options = optimizer_->options();
    state->param_names = param_names_;
    state->lr_mult = optimizer_->lr_mult();
    state->wd_mult = optimizer_->wd_mult();
    MX_ASSIGN_OR_RETURN(state->optimizer_states, optimizer_->SaveStatesOf({id}));
  }
  return state;
}

absl::Status ParameterShard::ApplyState(int primary, const ReplicaStep& step) {
  const KeyState& state = *step.state;
  const std::string what = absl::StrCat("state of key ", step.key, " from server ", primary);
  if (auto it = keys_.find(step.key); it != keys_.end()) {
    const Key& k = it->second;
    if (k.copies.role == Copies::kBackup && k.copies.peer == primary && k.version >= step.version) {
      return absl::OkStatus();  // sent again
    }
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": this server holds the key already"));
  }
  const std::optional<int64_t> size = state.shape.CheckedSize();
  if (!state.shape.IsValid() || !size.has_value() ||
      static_cast<int64_t>(state.value.size()) != *size) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", state.value.size(),
                                                   " values for shape ", state.shape.ToString()));
  }
  const bool table = state.table.ndim() > 0;
  if (table && (state.shape.ndim() != state.table.ndim() || state.first_row < 0 ||
                state.first_row > state.table[0] - state.shape[0] ||
                state.shape.RowSize() != state.table.RowSize())) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": rows ", state.shape.ToString(),
                                                   " from ", state.first_row,
                                                   " are not a range of a table ",
                                                   state.table.ToString()));
  }
  if (optimizer_ == nullptr && !state.optimizer.empty()) {
    MX_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> opt,
                        Optimizer::Create(state.optimizer, state.optimizer_options));
    opt->SetLrMult(state.lr_mult);
    opt->SetWdMult(state.wd_mult);
    MX_RETURN_IF_ERROR(InstallOptimizer(std::move(opt), state.param_names));
  }
  Key& k = keys_[step.key];
  k.shape = state.shape;
  if (table) {
    k.table = TableRange{state.table, state.first_row};
    absl::Status s = CatchError([&] {
      k.weight = Empty(k.shape);
      std::memcpy(k.weight.data(), state.value.data(), state.value.size() * sizeof(float));
    });
    if (!s.ok()) {
      keys_.erase(step.key);
      return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
    }
  } else {
    k.value = Pieces::Of(state.value);
  }
  k.version = step.version;
  k.seen = state.seen;
  k.copies = Copies{Copies::kBackup, primary};
  absl::Status s = absl::OkStatus();
  if (optimizer_ != nullptr) {
    if (BaseKey(step.key) != step.key) optimizer_->SetParamNames(SliceKeyNames());
    s = CatchError([&] { CopyWeights(&k); });
    if (s.ok() && !state.optimizer_states.empty()) {
      s = optimizer_->MergeStates(state.optimizer_states, {{step.key, k.shape}});
    }
  }
  if (!s.ok()) {
    keys_.erase(step.key);
    return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
  }
  return absl::OkStatus();
}

void ParameterShard::MarkDead(int rank) {
  Answers answers;
  {
    absl::MutexLock lock(&mu_);
    if (!live_.erase(rank)) return;
    dead_.insert(rank);
    // Elastic: steps may now complete without it. Otherwise waiting pulls
    // fail (see Answer). Either way its pushes queued for later steps never
    // count: let go of them (and of the buffers they hold) now.
    for (auto& [id, k] : keys_) {
      k.pending.erase(rank);
      if (options_.elastic) {
        MaybeComplete(id, &k, &answers);
      } else {
        TakeAnswered(id, &k, &answers);
      }
    }
  }
  Deliver(std::move(answers));
}

void ParameterShard::Close(const std::string& reason) {
  Answers answers;
  {
    absl::MutexLock lock(&mu_);
    if (!closed_.empty()) return;
    closed_ = reason.empty() ? "the server is shutting down" : reason;
    for (auto& [id, k] : keys_) TakeAnswered(id, &k, &answers);
  }
  Deliver(std::move(answers));
}

void ParameterShard::MarkFinished(int rank) {
  Answers answers;
  {
    absl::MutexLock lock(&mu_);
    if (!live_.erase(rank)) return;
    finished_.insert(rank);
    for (auto& [id, k] : keys_) MaybeComplete(id, &k, &answers);
  }
  Deliver(std::move(answers));
}

std::set<int> ParameterShard::live_workers() const {
  absl::MutexLock lock(&mu_);
  return live_;
}

std::string ParameterShard::DeadWorkers() const { return absl::StrJoin(dead_, ", "); }

}  // namespace mx
