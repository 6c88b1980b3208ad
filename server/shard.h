// ParameterShard: the keys one parameter server holds, and the rules by
// which workers' pushes become new values (DESIGN.md, "Distributed mode").
//
// The shard knows nothing about the network: the gRPC service (next) calls
// it, and tests drive it from threads standing in for workers.
//
// Synchronous mode (dist_sync). For each key and step the shard waits for
// exactly one push from every live worker, counted by rank: a worker that
// pushes again before the step completes has run ahead, and its push is
// queued for the next step (it is never a second vote in this one). At most
// ShardOptions::max_pending_pushes of a worker's pushes of a key wait so;
// one more is parked, neither recorded nor answered, until the key's steps
// make room: the worker, whose next push of that key waits for this one's
// answer, is slowed down, not failed, and the server holds at most
// max_pending_pushes + 1 pushes of each key per worker (+1: the parked
// one; an mx worker sends one push of a key at a time, or after a failover
// those the new primary lacks, and a worker that sends more than
// max(max_pending_pushes, staleness) + 2 without answers is refused). It
// then sums the pushes in rank order, so results are bit-reproducible
// whatever order they arrived in, applies the optimizer once (or, without
// one, stores the sum: the summation service), and bumps the key's version.
// A worker that has pushed v times pulls with min_version = v and gets the
// value that includes its pushes.
//
// Asynchronous mode (dist_async). Each push is applied on arrival and bumps
// the version.
//
// Pulls. PullAsync registers a waiter that is answered when the key reaches
// the version (at once when it already has), so a server needs no thread
// per waiting pull; Pull is the blocking form with a deadline.
//
// Workers that finish. A worker that has left the job (MarkFinished: it
// ran out of data, perhaps a step or more before the others) takes part in
// the steps its queued pushes reach, and steps complete without it after
// that: the others' extra steps do not wait for it. Its later pushes are
// refused.
//
// Failures. MarkDead(rank) removes a worker: waiting pulls fail with
// kUnavailable naming the worker, unless the shard is elastic, in which case
// steps complete with the remaining workers. Every wait has a deadline and
// ends with kDeadlineExceeded naming the key and what was missing. Close()
// (the server is stopping) ends every wait at once with kUnavailable, and
// later pushes and pulls fail the same way.
//
// Replicas (replicas 2; docs/architecture.md, "Replicas"). A key may be
// held as the primary of its copies, which completes its steps and hands
// each to Options::replicate for its backup server, or as the backup,
// which applies the steps its primary sends (ApplyReplicated) the same way,
// so that both hold the same bits, and refuses workers' pushes and pulls
// (kUnavailable) until the primary is declared dead (ServerDied) and it
// takes over. A primary answers the pulls of a dist_sync version, and
// acknowledges a dist_async push, only once the backup holds it
// (Replicated). Each push carries its worker's count of pushes of the key
// (seq); the shard records a (rank, seq) once: a push sent again after a
// failover is acknowledged without being counted twice.
//
// Tables (row-sparse keys; KVStore::InitRowSparse). A table key holds a
// range of the rows of a table (InitTable), which no server holds whole:
// its weights are its value, never published whole. Pushes carry the ids of
// the rows they hold (in the range); a step sums its pushes in rank order
// on the union of their rows and updates those rows lazily
// (Optimizer::UpdateRows), or without an optimizer makes the range that
// sum. Pulls name the rows they want and get them as of the version they
// wait for or a later one (copied under the lock while no step is in
// flight). With replicas a table's range has copies as a dense key does:
// the primary hands its backup each step's rank-order sum with its rows
// (ReplicaStep::rows), which the backup applies with the same lazy update,
// and a new backup gets the whole range (KeyState::table).
// A dense call on a table, a row-sparse one on a dense key, and row ids
// that are unsorted, repeated or outside the range are kInvalidArgument.
//
// Bad requests (unknown key, wrong shape or size, re-init with another
// shape, bad rank) are kInvalidArgument / kNotFound; the shard keeps
// serving. A step whose update fails (optimizer states loaded for another
// shape, a failed engine operation) fails that key's pulls and later
// pushes with the reason; the other keys go on. All methods are
// thread-safe.
#ifndef MX_SERVER_SHARD_H_
#define MX_SERVER_SHARD_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstore/optimizer.h"
#include "ndarray/base.h"
#include "proto/pieces.h"

namespace mx {

struct ShardOptions {
  bool sync = true;           // dist_sync; false: dist_async
  int num_workers = 1;        // ranks 0 .. num_workers-1
  bool elastic = false;       // continue without dead workers
  // dist_sync: a worker's pushes of one key held for later steps before
  // further ones are parked (see above); at least 1.
  int max_pending_pushes = 4;
  // dist_sync with bounded staleness (DistKVStoreOptions::staleness): the
  // steps the job's workers may run ahead of the slowest. The shard holds
  // max(max_pending_pushes, staleness) pending pushes of a key per worker,
  // so a worker that far ahead is not parked; the pulls themselves ask
  // for the older version (min_version), which is all the rest needs.
  int staleness = 0;
  // Replicas 2: the most bytes a key's whole state (its values and
  // optimizer state) may take to reach a new backup, in one message; a
  // bigger one keeps one copy (ServerReplaced).
  size_t max_state_bytes = size_t{1} << 30;
};

// Where a key's copies are, seen from one shard: the only one; the
// primary, replicating to server `peer`; or the backup of server `peer`.
struct Copies {
  enum Role { kOnly, kPrimary, kBackup };
  Role role = kOnly;
  int peer = -1;
};

// A step of a key that a primary completed, for its backup: the value the
// step applied (the rank-order sum of its pushes in dist_sync, the push in
// dist_async), the key's version after it, and the pushes it took in.
struct KeyState;

struct ReplicaStep {
  int key = 0;
  int64_t version = 0;
  Pieces value;
  std::vector<std::pair<int, int64_t>> pushes;  // (rank, seq), in rank order
  // Set: the step carries the key's whole state at `version` instead of a
  // value: the first step a new backup gets (ParameterShard::ServerReplaced).
  std::shared_ptr<const KeyState> state;
  // A table's step: the rows `value` holds, ascending, counted from the
  // range's first row.
  std::vector<int64_t> rows;

  // At least the bytes of its encoding (a ReplicatedStep): a message to a
  // backup is capped by it (ReplicationOptions::max_call_bytes), and so is
  // a key's state for a new backup (ShardOptions::max_state_bytes).
  size_t WireBytes() const;
};

// A key's whole state on its primary: what a new backup needs to hold the
// same bits and take the same later steps.
struct KeyState {
  Shape shape;
  std::vector<float> value;
  // A table's range (shape: its rows): the whole table's shape and the
  // range's first row; ndim 0 for a dense key.
  Shape table;
  int64_t first_row = 0;
  std::map<int, int64_t> seen;  // the highest push seq recorded, by rank
  // The primary's optimizer ("" for none), which a shard without one
  // takes, and the key's states in it (Optimizer::SaveStatesOf).
  std::string optimizer;
  Optimizer::Options optimizer_options;
  std::map<int, std::string> param_names;
  std::map<std::string, float> lr_mult, wd_mult;
  std::string optimizer_states;

  // At least the bytes of its encoding, value included (see
  // ReplicaStep::WireBytes): the optimizer's settings and names count, as
  // does a worker's seq per rank, not only the values.
  size_t WireBytes() const;
};

class ParameterShard {
 public:
  explicit ParameterShard(ShardOptions options);
  const ShardOptions& options() const { return options_; }

  // `replicate` receives each step of a key held as primary, in the order
  // of the key's steps, under the shard's lock (it must only queue it): the
  // caller sends it to server `backup` and calls Replicated once it holds
  // it. `flush` (may be empty) runs without the lock after any call that
  // queued steps, on the thread that made them, which may start sending
  // them there: handing each step to a thread of the replicator's cost a
  // wake-up per step. Set before any key is.
  using ReplicateFn = std::function<void(int backup, ReplicaStep step)>;
  void SetReplicator(ReplicateFn replicate, std::function<void()> flush = nullptr);

  // While one lives on a thread, this shard's calls on that thread leave
  // the steps they queue for its end, which flushes them: the keys of one
  // request reach each backup in one call, not one call per key.
  class ReplicaBatch {
   public:
    explicit ReplicaBatch(ParameterShard* shard);
    ~ReplicaBatch();
    ReplicaBatch(const ReplicaBatch&) = delete;
    ReplicaBatch& operator=(const ReplicaBatch&) = delete;

   private:
    ParameterShard* const shard_;
    const ParameterShard* const outer_;  // the batch open before, if any
  };

  // Creates key with a value. A second Init with the same shape is a no-op
  // (every worker may init); another shape is an error naming both.
  absl::Status Init(int key, const Shape& shape, const std::vector<float>& value,
                    Copies copies = {});
  // Creates table key holding rows [first_row, first_row + rows) of a table
  // of `table`'s shape, uniform in [-init_scale, init_scale) by element
  // index in the whole table (SampleUniformRows; zeros for 0), with its
  // copies as Init's. A second InitTable with the same range is a no-op;
  // anything else is an error.
  absl::Status InitTable(int key, const Shape& table, int64_t first_row, int64_t rows,
                         float init_scale, uint64_t init_seed, Copies copies = {});
  // A table's row ids in a push or pull: absent for dense keys.
  using RowIds = std::optional<std::vector<int64_t>>;
  // Sets rows (global ids, ascending, in this range) of table key to
  // `value`, outside any step (no optimizer, no vote): restoring a
  // checkpoint's table. Waits for a step in flight to end.
  absl::Status AssignRows(int key, std::vector<int64_t> rows, const Pieces& value);

  // One worker's contribution to key: floats where they lie (the pieces of
  // the network buffers it arrived in), held until its step is summed.
  // Calls `done` exactly once, never under the shard's lock: when the push
  // is recorded (sync) or applied (async), or with the error that refuses
  // it. A parked push (sync, its worker too far ahead) is answered once the
  // key's steps make room for it, or with the error that stops them (a
  // failed step, a dead worker when not elastic, Close). The new value may
  // be pending until the step completes.
  // `seq`: the worker's count of pushes of the key, this one included (0:
  // not counted); a push whose (rank, seq) was recorded before is answered
  // OK and not counted again.
  using PushCallback = std::function<void(absl::Status)>;
  // `rows`: a table's push, the ids of the rows value holds.
  void PushAsync(int key, int rank, Pieces value, PushCallback done, int64_t seq = 0,
                 RowIds rows = std::nullopt);
  // The blocking form; for floats in a vector (tests; callers without a
  // network).
  absl::Status Push(int key, int rank, Pieces value, RowIds rows = std::nullopt);
  absl::Status Push(int key, int rank, std::vector<float> value) {
    return Push(key, rank, Pieces::Of(std::move(value)));
  }
  // Pushes of `key` held for later steps and parked, over all workers
  // (tests, metrics).
  struct Held {
    int pending = 0;
    int parked = 0;
  };
  Held held(int key) const;
  // The number of floats a dense key holds, for checks before a push is
  // unpacked (a compressed push claims its size): NOT_FOUND for a key never
  // initialized, INVALID_ARGUMENT for a table.
  absl::StatusOr<int64_t> DenseSize(int key) const;

  // A version of a key's value; every pull of that version shares it, and
  // it never changes (the next version is other memory). Without an
  // optimizer, a step of one push publishes that push as it arrived (also
  // where it lies in a worker's shared memory, which the worker then
  // leaves alone: see kvstore_service.cc); a sum is a buffer of the
  // shard's, which it reuses once the last answer holding it is sent.
  struct Value {
    Pieces data;
    int64_t version = 0;
  };
  // The value of key once its version reaches min_version, waiting at most
  // until `deadline`.
  // `rows`: a table's pull, the rows wanted (the value holds them in order).
  absl::StatusOr<Value> Pull(int key, int64_t min_version, absl::Time deadline,
                             RowIds rows = std::nullopt);

  // Calls `done` exactly once, on the calling thread or on the thread whose
  // push (or MarkDead) completes the step, never under the shard's lock:
  // with the value once key's version reaches min_version, or with the
  // error that prevents it (unknown key, a dead worker). Returns an id for
  // CancelPull.
  using PullCallback = std::function<void(absl::StatusOr<Value>)>;
  uint64_t PullAsync(int key, int64_t min_version, PullCallback done,
                     RowIds rows = std::nullopt);
  // Drops a waiting pull. True if it was still waiting: `done` will not be
  // called. False if it was answered or is being answered now.
  bool CancelPull(int key, uint64_t id);
  // Drops a waiting pull that ran out of time: if it was still waiting
  // (`done` will not be called), the kDeadlineExceeded error that says
  // what it waited for (the version, and the workers whose pushes are
  // missing); OK if it was answered or is being answered now.
  absl::Status TimeOutPull(int key, uint64_t id, int64_t min_version);

  // Sets the updater applied to the sum of each step (or each async push),
  // with the parameter names and multipliers it applies per key. The same
  // optimizer set again (each worker sets it) keeps its states and counts.
  absl::Status SetOptimizer(const std::string& name, const Optimizer::Options& options,
                            const std::map<int, std::string>& param_names = {},
                            const std::map<std::string, float>& lr_mult = {},
                            const std::map<std::string, float>& wd_mult = {});

  // The optimizer's state, and back (see Optimizer::SaveStates): of the
  // keys `keys` names (nullptr: all); `merge` keeps the states of keys the
  // bytes do not hold (Optimizer::MergeStates).
  absl::StatusOr<std::string> SaveOptimizerStates(const std::set<int>* keys = nullptr) const;
  absl::Status LoadOptimizerStates(const std::string& bytes, bool merge = false);

  // The backup's side: applies steps its primary (server `primary`)
  // completed, in order; a step it already holds is skipped. Refused
  // (kFailedPrecondition) for a key this shard does not hold as the backup
  // of `primary`, such as one it took over since.
  absl::Status ApplyReplicated(int primary, std::vector<ReplicaStep> steps);
  // The primary's side: the backup holds key up to `version`.
  void Replicated(int key, int64_t version);
  // Server `server` was declared dead: this shard takes over the keys it
  // was the backup of (serving them from the version it holds) and stops
  // replicating to it (its keys then have one copy). Returns the number of
  // keys taken over.
  int ServerDied(int server);
  // A new server took the rank of `server`, declared dead before: every key
  // here that lost its other copy with it gets one there again. This shard
  // holds each as the primary with `server` as its backup, and hands the
  // replicator first the key's whole state (a step with a KeyState), then
  // its later steps; a dist_sync pull waits for the new backup to hold the
  // version as always. A key whose state is over
  // ShardOptions::max_state_bytes (a table's range of gigabytes) keeps one
  // copy, logged. Returns the number of keys.
  int ServerReplaced(int server);

  // Removes a worker from the live set (its death was detected).
  void MarkDead(int rank);
  // The worker has left the job (see "Workers that finish" above).
  void MarkFinished(int rank);

  // Stops serving: waiting pulls and every later Push and Pull fail with
  // kUnavailable and `reason` ("the server is shutting down"). The first
  // reason stays; later calls do nothing.
  void Close(const std::string& reason);
  std::set<int> live_workers() const;

 private:
  struct Waiter {
    int64_t min_version;
    PullCallback done;
    RowIds rows;  // a table's pull: the rows wanted (global ids)
  };
  struct Pending {
    Pieces value;
    int64_t seq = 0;
    std::vector<int64_t> rows;  // a table's push: its rows, from the range's first
  };
  // Where a table key's rows lie in the table.
  struct TableRange {
    Shape table;
    int64_t first_row = 0;
  };
  struct Key {
    // A dense key's shape; a table's range: (rows held, row dimensions...).
    Shape shape;
    // Set for a table key (its weight holds the rows; value is unused).
    std::optional<TableRange> table;
    // The current value, as pulls get it. A backup with an optimizer leaves
    // it empty after its steps (value_stale), which change only its
    // weights: nothing reads it until the backup takes the key over, and
    // without publishing a copy of each step the job with replicas 2 went
    // from 87.5k to 95.5k samples/s (medians, rounds in turns). FreshenValue
    // makes it again.
    Pieces value;
    bool value_stale = false;
    int64_t version = 0;
    // With an optimizer: the weights it updates in place (equal to `value`
    // between steps) and the step's summed gradient.
    NDArray weight, grad;
    Copies copies;
    // The server whose death left the key with one copy here (-1: none).
    int lost_peer = -1;
    // Replicas: the version the backup holds (a primary's), and for each
    // worker the highest push seq recorded.
    int64_t replicated = 0;
    std::map<int, int64_t> seen;
    // dist_async with a backup: pushes applied, answered once the backup
    // holds their version.
    std::multimap<int64_t, PushCallback> unreplicated;
    // Pushes not yet in a completed step, by rank, oldest first.
    std::map<int, std::deque<Pending>> pending;
    // Every live rank below it has a push pending (AnyPushMissing goes on
    // from there: pushes only add until a step takes them, which resets it).
    int filled_below = 0;
    // Pushes beyond max_pending_pushes, by rank, oldest first: not
    // answered until they move to `pending`.
    struct Parked {
      Pending push;
      PushCallback done;
    };
    std::map<int, std::deque<Parked>> parked;
    std::map<uint64_t, Waiter> waiters;  // pulls waiting for a version
    // At most the least version a waiter waits for (a waiter cancelled
    // leaves it lower): below it, a new version answers none of them.
    int64_t min_waiting = std::numeric_limits<int64_t>::max();
    // A thread is completing a step of this key outside the lock; in
    // dist_sync it also completes the steps that become ready meanwhile
    // (in order), in dist_async the next push waits.
    bool completing = false;
    bool idle() const { return !completing; }
    // Why a step failed (the optimizer refused the arrays, an engine
    // operation failed): the key's pulls and pushes fail with it since.
    absl::Status failed;
  };
  // Answers to give once the lock is released.
  using Answers = std::vector<std::pair<PullCallback, absl::StatusOr<Value>>>;
  // Flushes the steps queued for backups (FlushReplicas), then gives the
  // answers.
  void Deliver(Answers answers) ABSL_LOCKS_EXCLUDED(mu_);
  // Hands a primary's step to replicate_, to send once the lock is let go.
  void QueueReplica(int backup, ReplicaStep step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ServerReplaced under the lock: queues each key's state for `server`.
  int RestoreCopies(int server) ABSL_LOCKS_EXCLUDED(mu_);
  // Runs flush_ if steps were queued since it last ran.
  void FlushReplicas() ABSL_LOCKS_EXCLUDED(mu_);

  absl::StatusOr<Key*> Find(int key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // PushAsync under the lock: records *value (and *done, which answers go
  // to) or returns why not, leaving them.
  absl::Status Record(int key, int rank, int64_t seq, Pieces* value, PushCallback* done,
                      RowIds* rows, Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks that a call (`what`) uses key as the kind it is (rows for a
  // table, none for a dense key) and that a table's row ids are ascending,
  // unique and in its range; makes them relative to the range when
  // `relative`.
  static absl::Status CheckRows(int id, const Key& k, const char* what, RowIds* rows,
                                bool relative);
  // Ends a step completed outside the lock (CompleteStep's): clears
  // `completing`; with an error fails the key (false), else the version
  // advances.
  bool EndStep(int id, Key* key, const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Rows (global ids) of table key k, copied from its weights.
  Value TableRows(const Key& k, const std::vector<int64_t>& rows);
  // CompleteStep for a table: the rank-order sum of the pushes' rows, then
  // the lazy update (or the range becomes the sum); a primary hands the
  // sum and its rows to the replicator.
  bool CompleteTableStep(int id, Key* key, std::vector<Pending> pushes,
                         const std::vector<int>& ranks) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The copies a key inited now gets: `copies`, or one, here, when its
  // other server died already (*lost_peer: that server; else -1). Refused
  // for a primary on a shard that does not replicate.
  absl::StatusOr<Copies> CopiesNow(int key, Copies copies, int* lost_peer) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks a replicated step's value (and a table's rows) against key k.
  static absl::Status CheckReplicaStep(const ReplicaStep& step, const Key& k);
  // Whether a push (rank, seq) of key was recorded before (a resend); an
  // error if it skips one.
  absl::StatusOr<bool> Seen(int id, Key* k, int rank, int64_t seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the key's current version may be served: a primary's once
  // its backup holds it (dist_sync).
  bool Servable(const Key& k) const;
  // kUnavailable for a worker's `what` of a key held as a backup.
  static absl::Status NotPrimaryYet(int id, const Key& k, const char* what);
  // The answer to a pull of key at min_version, or nullopt while it must wait.
  std::optional<absl::StatusOr<Value>> Answer(int id, Key* key, int64_t min_version,
                                              const RowIds& rows = std::nullopt)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A value whose buffer returns to pool_ when its last holder drops it.
  Pieces Publish(std::vector<float> buffer);
  // The optimizer's weights of a key: a copy of its value.
  void CopyWeights(Key* key);
  // Makes a stale value (Key::value_stale) from the key's weights.
  void FreshenValue(Key* key);
  // Moves the waiters of key that can be answered now to `answers`.
  void TakeAnswered(int id, Key* key, Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // dist_sync: completes key's steps while every live worker has pushed,
  // admitting parked pushes as steps make room.
  void MaybeComplete(int id, Key* key, Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves parked pushes of key to `pending` while there is room, and
  // fails those that can no longer be (see PushAsync).
  void AdmitParked(int id, Key* key, Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Why key's steps cannot go on (closed, failed, a dead worker when not
  // elastic), for a pull or push of it (`what`); OK while they can.
  absl::Status Stuck(int id, const Key& key, const char* what) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Completes a step of key from `pushes` (in rank order; one in
  // dist_async): their sum becomes the value, or the optimizer's update
  // with it. It sums, and waits for the update, outside the lock
  // (releasing and retaking it), so that a server's cores sum different
  // keys' steps at once; the update is pushed under it (on the
  // NaiveEngine, which mx_server runs, it runs there, inline). False if
  // the step failed (FailKey).
  bool CompleteStep(int id, Key* key, std::vector<Pending> pushes,
                    const std::vector<int>& ranks) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The key's whole state, for a new backup.
  absl::StatusOr<std::shared_ptr<const KeyState>> StateOf(int id, const Key& k) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The numbered pushes of `rank` recorded for k but in no completed step
  // (pending or parked).
  static int64_t Unapplied(const Key& k, int rank);
  // The backup's side of a step that carries a KeyState: creates the key
  // (or, sent again, leaves it) as the backup of `primary`.
  absl::Status ApplyState(int primary, const ReplicaStep& step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes `opt` the shard's optimizer (SetOptimizer's work under the lock).
  absl::Status InstallOptimizer(std::unique_ptr<Optimizer> opt,
                                const std::map<int, std::string>& param_names)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records that a step of key failed with `s` (see Key::failed).
  static void FailKey(int id, Key* key, const absl::Status& s);
  // True while no step completes outside the lock (completing_ is 0).
  absl::Condition NoStepInFlight() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return absl::Condition(+[](const int* completing) { return *completing == 0; }, &completing_);
  }
  std::string DeadWorkers() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // param_names_, and for each slice key held, the name of its key.
  std::map<int, std::string> SliceKeyNames() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The live workers without a push queued for the key's next step.
  std::vector<int> MissingPushes(const Key& key) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether MissingPushes is not empty, without making the list (per push:
  // it was a list of every live worker, so a step cost workers^2).
  bool AnyPushMissing(Key* key) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether TakeAnswered may answer a waiter of `key` (Answer's cases):
  // every push used to try every waiter, so a step cost workers^2.
  bool WaitersMayBeAnswered(const Key& key) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ShardOptions options_;
  ReplicateFn replicate_;               // set before any key is
  std::function<void()> flush_;         // the same
  std::atomic<bool> flush_due_{false};  // QueueReplica since the last flush
  mutable absl::Mutex mu_;
  std::map<int, Key> keys_ ABSL_GUARDED_BY(mu_);
  std::set<int> live_ ABSL_GUARDED_BY(mu_);
  std::set<int> dead_ ABSL_GUARDED_BY(mu_);
  std::set<int> finished_ ABSL_GUARDED_BY(mu_);  // workers that left the job
  std::set<int> dead_servers_ ABSL_GUARDED_BY(mu_);  // ServerDied's
  std::string closed_ ABSL_GUARDED_BY(mu_);  // Close's reason; empty: open
  std::unique_ptr<Optimizer> optimizer_ ABSL_GUARDED_BY(mu_);
  std::map<int, std::string> param_names_ ABSL_GUARDED_BY(mu_);  // as the workers sent them
  uint64_t next_waiter_ ABSL_GUARDED_BY(mu_) = 0;
  int completing_ ABSL_GUARDED_BY(mu_) = 0;  // keys with Key::completing set
  std::set<int> tables_in_creation_ ABSL_GUARDED_BY(mu_);  // InitTable filling them

  // Spent sum buffers, kept for the next sums: a fresh 16 MiB buffer costs
  // page faults and zero-fill on the order of a copy of it. Shared with
  // the values published, which may outlive the shard (an answer still
  // being sent).
  class BufferPool {
   public:
    std::vector<float> Take(size_t n);
    // Keeps `buffer` (up to a bound on the bytes kept).
    void Give(std::vector<float> buffer);

   private:
    absl::Mutex mu_;
    std::vector<std::vector<float>> free_ ABSL_GUARDED_BY(mu_);
    size_t free_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  };
  const std::shared_ptr<BufferPool> pool_ = std::make_shared<BufferPool>();
};

}  // namespace mx

#endif  // MX_SERVER_SHARD_H_
