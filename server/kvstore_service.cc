#include "server/kvstore_service.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <iostream>
#include <iterator>
#include <map>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "kvstore/compression_wire.h"
#include "kvstore/gradient_compression.h"
#include "ndarray/trace.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"
#include "rpc/metrics.h"
#include "rpc/rpc.h"
#include "rpc/shared_memory.h"
#include "rpc/stream.h"
#include "rpc/stream_tls.h"

namespace mx {

namespace {

// Every method is a raw method of an rpc::AsyncServer (rpc/async.h). Push
// and Pull, which carry tensors: a pushed tensor stays in gRPC's receive
// buffers until the shard has summed it (or, the only push of a step
// without an optimizer, is sent back from there), values go out without
// copies (see EncodeTensorMessage), and a pull waiting for a step holds no
// thread (the shard answers it when the step completes). The data path's
// methods run on the server's polling thread (large requests on its bulk
// pool) and never wait. The small methods parse their requests themselves
// (AnswerRequest), so that bytes that are no request are INVALID_ARGUMENT
// saying so, where gRPC's own parser answers INTERNAL with no message; they
// run on the control pool and wait at most for a step in flight
// (SetOptimizer, the optimizer's state).
using KVService = proto::KVStoreService;

using rpc::GiveUpBefore;
using rpc::Guard;
using rpc::ToGrpc;
constexpr rpc::Role kWorker = rpc::Role::kWorker;
constexpr rpc::Role kServer = rpc::Role::kServer;
constexpr int kStepsField = 1;      // ReplicateRequest.steps
constexpr int kPushCredentialField = 5;       // PushRequest.credential
constexpr int kPullCredentialField = 4;       // PullRequest.credential
constexpr int kManyCredentialField = 2;       // PushPullManyRequest.credential
constexpr int kReplicateCredentialField = 3;  // ReplicateRequest.credential
constexpr int kStepValueField = 3;  // ReplicatedStep.value
const std::string kReplicateMethod = "/mx.proto.KVStoreService/Replicate";

absl::Status Prefix(const absl::Status& s, const char* what, int key) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(what, " of key ", key, ": ", s.message()));
}

// What this process's servers did, for /metrics (rpc/metrics.h).
struct ServerMetrics {
  metrics::Counter* pushes;
  metrics::Counter* pushed_bytes;
  metrics::Counter* pulls;
  metrics::Gauge* pulls_waiting;
  metrics::Histogram* pull_wait;
  metrics::Counter* shm_bytes;

  static const ServerMetrics& Get() {
    static const ServerMetrics m = [] {
      metrics::Registry& r = metrics::Registry::Global();
      return ServerMetrics{
          r.AddCounter("mx_server_pushes_total", "Pushes of one key applied (summed) here")->With({}),
          r.AddCounter("mx_server_pushed_bytes_total", "Value bytes of those pushes")->With({}),
          r.AddCounter("mx_server_pulls_total", "Pulls of one key asked of this server")->With({}),
          r.AddGauge("mx_server_pulls_waiting",
                     "Pulls of one key waiting for their step (a queue depth)")
              ->With({}),
          r.AddHistogram("mx_server_pull_wait_seconds",
                         "Time a pull (of one or several keys) waited for its step: for "
                         "dist_sync, how long the pushes of the other workers took to arrive",
                         metrics::LatencyBuckets())
              ->With({}),
          r.AddCounter("mx_server_shm_bytes_total",
                       "Value bytes of pushes and answers that went through workers' shared "
                       "memory instead of the network")
              ->With({})};
    }();
    return m;
  }
};

// Bytes of a worker's shared-memory segment that a call names (ShmRange),
// checked; the segment stays mapped while this is held.
struct ShmSpan {
  std::shared_ptr<const rpc::SharedSegment> segment;
  char* data = nullptr;
  size_t bytes = 0;
};

// The shared-memory segments the workers on this host attached
// (AttachSegment), by (rank, number). A worker's are dropped when it dies
// or leaves; each is unmapped once no call holds it either.
class Segments {
 public:
  explicit Segments(std::string dir) : dir_(std::move(dir)) {}

  absl::Status Attach(int rank, int id, const std::string& name, int64_t bytes) {
    if (dir_.empty()) {
      return absl::FailedPreconditionError(
          "this server takes no shared memory (start it with --shm_dir or MX_SHM_DIR)");
    }
    if (bytes <= 0 || bytes > kMaxBytes) {
      return absl::InvalidArgumentError(absl::StrCat("a shared memory segment of ", bytes,
                                                     " bytes (1 to ", kMaxBytes, ")"));
    }
    MX_ASSIGN_OR_RETURN(std::unique_ptr<rpc::SharedSegment> segment,
                        rpc::SharedSegment::Open(dir_, name, static_cast<size_t>(bytes)));
    absl::MutexLock lock(&mu_);
    int held = 0;
    for (const auto& [key, s] : segments_) held += key.first == rank;
    if (held >= kMaxPerWorker && !segments_.count({rank, id})) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "worker ", rank, " holds ", held, " shared memory segments here already"));
    }
    segments_[{rank, id}] = std::move(segment);
    return absl::OkStatus();
  }

  // The range `r` of worker `rank`'s segment.
  absl::StatusOr<ShmSpan> Find(int rank, const proto::ShmRange& r) const {
    std::shared_ptr<const rpc::SharedSegment> segment;
    {
      absl::MutexLock lock(&mu_);
      auto it = segments_.find({rank, r.segment()});
      if (it != segments_.end()) segment = it->second;
    }
    if (segment == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "worker ", rank, " attached no shared memory segment ", r.segment(), " here"));
    }
    if (r.offset() < 0 || r.bytes() < 0) {
      return absl::InvalidArgumentError("a shared memory range with a negative offset or size");
    }
    MX_RETURN_IF_ERROR(segment->CheckRange(r.offset(), r.bytes()));
    return ShmSpan{segment, segment->data() + r.offset(), static_cast<size_t>(r.bytes())};
  }

  void Drop(int rank) {
    absl::MutexLock lock(&mu_);
    for (auto it = segments_.begin(); it != segments_.end();) {
      it = it->first.first == rank ? segments_.erase(it) : std::next(it);
    }
  }

  size_t count() const {
    absl::MutexLock lock(&mu_);
    return segments_.size();
  }

 private:
  static constexpr int64_t kMaxBytes = int64_t{64} << 30;
  static constexpr int kMaxPerWorker = 16;
  const std::string dir_;
  mutable absl::Mutex mu_;
  std::map<std::pair<int, int>, std::shared_ptr<const rpc::SharedSegment>> segments_
      ABSL_GUARDED_BY(mu_);
};

class PullReactor;

// Answers pulls that are about to run out of time (PullReactor): one thread
// per service that wakes every 100 ms. It holds a reference to each reactor
// it may answer.
class PullDeadlines {
 public:
  // Every tick (100 ms) it also takes `shard`'s lock (live_workers), so
  // that SinceShardChecked shows a shard stuck on its lock.
  explicit PullDeadlines(ParameterShard* shard) : shard_(shard), thread_([this] { Loop(); }) {}
  ~PullDeadlines();
  // The time since the last tick took the shard's lock; without a lock.
  absl::Duration SinceShardChecked() const {
    return absl::Nanoseconds(absl::GetCurrentTimeNanos() -
                             checked_ns_.load(std::memory_order_relaxed));
  }

  // Adds `r`, to be timed out at `when`, with the reference the caller took
  // for it; false (the caller drops that reference) if `r` has responded.
  bool Add(PullReactor* r, absl::Time when);
  // `r` has responded: drops it (and its reference) if it is here.
  void Remove(PullReactor* r);

 private:
  void Loop();

  ParameterShard* const shard_;
  std::atomic<int64_t> checked_ns_{absl::GetCurrentTimeNanos()};  // the last tick's check
  // Each pull takes mu_ twice (Add, Remove): the thread waits apart from it
  // (stop_), since a thread waiting on a mutex with a condition (Await)
  // sends every unlock of it down absl's slow path.
  absl::Mutex mu_;
  std::map<PullReactor*, absl::Time> when_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread thread_;
};

// Pulls that may wait for their step: of one key (Pull, PushPull: the
// answer is a PullResponse) or several (PushPullMany: a
// PushPullManyResponse). Answered by the shard once every key is ready, or
// cancelled when the client goes away. A pull still waiting shortly before
// the client's deadline is answered with what it waits for (the workers
// whose pushes are missing), which the client's own DEADLINE_EXCEEDED
// would not say.
class PullReactor : public rpc::UnaryReactor {
 public:
  struct Wanted {
    int key;
    int64_t min_version;
    ParameterShard::RowIds rows;  // a table's pull
    // Where the caller wants the value's data (its shared memory), when
    // they fit exactly; else they travel in the answer.
    std::optional<ShmSpan> reply = std::nullopt;
  };

  PullReactor(ParameterShard* shard, PullDeadlines* deadlines, grpc::ByteBuffer* response,
              bool many)
      : shard_(shard), deadlines_(deadlines), response_(response), many_(many) {}

  void Ref() { refs_.fetch_add(1); }
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  // Answers the pulls still waiting with what they wait for.
  void TimedOut() {
    for (size_t i = 0; i < ids_.size(); ++i) {
      absl::Status s = shard_->TimeOutPull(wanted_[i].key, ids_[i], wanted_[i].min_version);
      if (!s.ok()) Answered(i, s);  // it was still waiting
    }
  }

  // Answers with `error` at once, or with the values of `wanted`, or with
  // what they wait for shortly before the client's `deadline`.
  // May run on another thread than OnCancel, and after it (a PushPull
  // whose push was parked starts when room is made).
  void Start(const absl::Status& error, std::vector<Wanted> wanted,
             std::chrono::system_clock::time_point deadline) {
    absl::Status s = error;
    {
      absl::MutexLock lock(&start_mu_);
      if (s.ok() && cancelled_) s = absl::CancelledError("the call was cancelled before its pull");
      if (s.ok()) StartPulls(std::move(wanted));
    }
    if (!s.ok()) {
      Finish(ToGrpc(s));
      return;
    }
    const absl::Time when = GiveUpBefore(deadline);
    if (when == absl::InfiniteFuture() || !deadlines_->Add(this, when)) Unref();
  }

  void OnCancel() override {
    absl::MutexLock lock(&start_mu_);
    cancelled_ = true;
    // Pulls already answered (CancelPull false) count as they are; none
    // exist before Start.
    for (size_t i = 0; i < ids_.size(); ++i) {
      if (shard_->CancelPull(wanted_[i].key, ids_[i])) {
        Answered(i, absl::CancelledError(
                        absl::StrCat("pull of key ", wanted_[i].key, " cancelled while waiting")));
      }
    }
  }
  void OnDone() override { Unref(); }

 private:
  // Registers the pulls of `wanted` with the shard, holding the reference
  // PullDeadlines will hold. Under start_mu_.
  void StartPulls(std::vector<Wanted> wanted) ABSL_EXCLUSIVE_LOCKS_REQUIRED(start_mu_) {
    wanted_ = std::move(wanted);
    started_ = std::chrono::steady_clock::now();
    if (trace::Enabled()) traced_from_ = trace::NowMicros();
    ServerMetrics::Get().pulls->Add(static_cast<double>(wanted_.size()));
    ServerMetrics::Get().pulls_waiting->Add(static_cast<double>(wanted_.size()));
    values_.resize(wanted_.size());
    ids_.resize(wanted_.size());
    remaining_.store(static_cast<int>(wanted_.size()));
    // The reference PullDeadlines will hold, taken before an answer can
    // end the call.
    Ref();
    for (size_t i = 0; i < wanted_.size(); ++i) {
      ids_[i] = shard_->PullAsync(
          wanted_[i].key, wanted_[i].min_version,
          [this, i](absl::StatusOr<ParameterShard::Value> v) { Answered(i, std::move(v)); },
          wanted_[i].rows);
    }
  }

  void Answered(size_t i, absl::StatusOr<ParameterShard::Value> v) {
    ServerMetrics::Get().pulls_waiting->Add(-1);
    {
      absl::MutexLock lock(&mu_);
      if (!v.ok() && error_.ok()) error_ = v.status();
      values_[i] = std::move(v);
    }
    if (remaining_.fetch_sub(1) == 1) Respond();
  }

  void Respond() {
    deadlines_->Remove(this);
    ServerMetrics::Get().pull_wait->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
    if (traced_from_ != 0) {
      // How long the answer waited for its step (the pushes of the others).
      std::string keys;
      for (const Wanted& w : wanted_) absl::StrAppend(&keys, keys.empty() ? "" : ",", w.key);
      trace::Complete("server", "pull_wait", traced_from_, trace::NowMicros(),
                      absl::StrCat("\"keys\":[", keys, "]"));
    }
    if (!error_.ok()) {
      Finish(ToGrpc(error_));
      return;
    }
    std::vector<EncodedMessage> entries;
    for (size_t i = 0; i < values_.size(); ++i) {
      const ParameterShard::Value& v = *values_[i];
      proto::PullResponse header;
      header.set_version(v.version);
      const std::optional<ShmSpan>& reply = wanted_[i].reply;
      if (reply.has_value() && reply->bytes == v.data.bytes()) {
        v.data.CopyTo(0, v.data.bytes(), reply->data);
        ServerMetrics::Get().shm_bytes->Add(static_cast<double>(v.data.bytes()));
        header.set_in_shm(true);
        entries.push_back(EncodeHeader(header));
        continue;
      }
      proto::Tensor* t = header.mutable_value();
      t->add_shape(static_cast<int64_t>(v.data.bytes() / sizeof(float)));
      t->set_dtype(proto::FLOAT32);
      entries.push_back(EncodeTensorMessage(header, kPullValueField, v.data));
    }
    *response_ = many_ ? EncodeRepeated(kManyEntriesField, entries) : ToByteBuffer(entries[0]);
    values_.clear();  // the response holds the values now
    Finish(grpc::Status::OK);
  }

  friend class PullDeadlines;

  ParameterShard* const shard_;
  PullDeadlines* const deadlines_;
  grpc::ByteBuffer* const response_;
  const bool many_;
  std::vector<Wanted> wanted_;
  std::chrono::steady_clock::time_point started_;
  int64_t traced_from_ = 0;  // when the pull began, if tracing
  std::vector<uint64_t> ids_;
  std::atomic<int> remaining_{0};
  bool responded_ = false;    // guarded by deadlines_->mu_
  std::atomic<int> refs_{1};  // gRPC's (until OnDone) and PullDeadlines'
  // Orders Start's registering of the pulls (wanted_, ids_) and OnCancel.
  absl::Mutex start_mu_;
  bool cancelled_ ABSL_GUARDED_BY(start_mu_) = false;
  absl::Mutex mu_;
  std::vector<absl::StatusOr<ParameterShard::Value>> values_;  // guarded by mu_ until remaining_ is 0
  absl::Status error_;                                         // likewise
};

PullDeadlines::~PullDeadlines() {
  stop_.Notify();
  thread_.join();
  for (const auto& [r, unused] : when_) r->Unref();  // none: the server has stopped
}

bool PullDeadlines::Add(PullReactor* r, absl::Time when) {
  absl::MutexLock lock(&mu_);
  if (r->responded_) return false;
  when_[r] = when;
  return true;
}

void PullDeadlines::Remove(PullReactor* r) {
  bool held;
  {
    absl::MutexLock lock(&mu_);
    r->responded_ = true;
    held = when_.erase(r) > 0;
  }
  if (held) r->Unref();
}

void PullDeadlines::Loop() {
  for (;;) {
    if (stop_.WaitForNotificationWithTimeout(absl::Milliseconds(100))) return;
    shard_->live_workers();
    checked_ns_.store(absl::GetCurrentTimeNanos(), std::memory_order_relaxed);
    std::vector<PullReactor*> due;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      for (auto it = when_.begin(); it != when_.end();) {
        if (it->second > now) {
          ++it;
          continue;
        }
        due.push_back(it->first);
        it = when_.erase(it);
      }
    }
    for (PullReactor* r : due) {
      r->TimedOut();
      r->Unref();
    }
  }
}

// A key's whole state into `header` (ReplicatedStep.state); returns its
// value, which goes as the step's tensor.
Pieces EncodeState(const std::shared_ptr<const KeyState>& shared, proto::ReplicatedStep* header) {
  const KeyState& state = *shared;
  proto::KeyState* out = header->mutable_state();
  for (int64_t d : state.shape) out->add_shape(d);
  for (int64_t d : state.table) out->add_table(d);
  out->set_first_row(state.first_row);
  for (const auto& [rank, seq] : state.seen) {
    header->add_ranks(rank);
    header->add_seqs(seq);
  }
  proto::SetOptimizerRequest* opt = out->mutable_optimizer();
  opt->set_name(state.optimizer);
  for (const auto& [k, v] : state.optimizer_options) (*opt->mutable_options())[k] = v;
  for (const auto& [k, v] : state.param_names) (*opt->mutable_param_names())[k] = v;
  for (const auto& [k, v] : state.lr_mult) (*opt->mutable_lr_mult())[k] = v;
  for (const auto& [k, v] : state.wd_mult) (*opt->mutable_wd_mult())[k] = v;
  out->set_optimizer_states(state.optimizer_states);
  return Pieces::Of(state.value.data(), state.value.size(), shared);
}

}  // namespace

EncodedMessage EncodeReplicaStep(const ReplicaStep& step) {
  proto::ReplicatedStep header;
  header.set_key(step.key);
  header.set_version(step.version);
  for (const auto& [rank, seq] : step.pushes) {
    header.add_ranks(rank);
    header.add_seqs(seq);
  }
  header.mutable_rows()->mutable_ids()->Add(step.rows.begin(), step.rows.end());
  Pieces value = step.value;
  if (step.state != nullptr) value = EncodeState(step.state, &header);
  header.mutable_value()->add_shape(static_cast<int64_t>(value.bytes() / sizeof(float)));
  header.mutable_value()->set_dtype(proto::FLOAT32);
  return EncodeTensorMessage(header, kStepValueField, value);
}

namespace {

// Sends the steps of the keys a server holds as primary to their backups
// (ParameterShard::SetReplicator): for each backup, the steps queued since
// the last call go in one call, except those of a key that a call in
// flight carries, which wait for it, so that a key's steps arrive in order
// while keys completed at different moments do not wait for each other's
// round trip (seen in a job's timeline: with one call in flight per
// backup, a step's later keys waited a whole extra round trip). An answered call
// tells the shard that the backup holds those versions; a failed one is
// sent again 100 ms later (after telling `unreachable`), until the backup
// answers or is declared dead (Drop). Calls start on the threads that
// complete steps (Flush, once the shard's lock is let go) and answers
// (Done), not on a thread of the replicator's woken for each step: in a
// job's timeline a completed step's call started 90 us later (median)
// that way, 18 us now. The replicator's thread sends retries.
class Replicator {
 public:
  // Calls complete on `queue` (the server's: a server polls one queue).
  Replicator(ParameterShard* shard, ReplicationOptions options, grpc::CompletionQueue* queue)
      : shard_(shard), options_(std::move(options)), queue_(queue) {
    const std::vector<std::string>& streams = options_.stream_servers;
    for (size_t b = 0; b < options_.servers.size(); ++b) {
      peers_.emplace_back();
      peers_.back().SetAddress(options_.servers[b], b < streams.size() ? streams[b] : "",
                               options_.security);
    }
    credential_.set_token(options_.claims.token);
    credential_.set_node(options_.claims.node);
    thread_ = std::thread([this] { Loop(); });
  }

  // Cancels the call in flight and waits for its callback.
  ~Replicator() {
    std::vector<std::shared_ptr<rpc::StreamCall>> streams;
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
      wake_.Signal();
      for (Peer& p : peers_) {
        for (auto& stream : CancelLocked(p.calls)) streams.push_back(std::move(stream));
      }
    }
    Cancel(streams);
    thread_.join();
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(this, &Replicator::Idle));
  }

  // Under the shard's lock: queues only, without waking the thread (Flush
  // follows).
  void Queue(int backup, ReplicaStep step) {
    absl::MutexLock lock(&mu_);
    if (backup < 0 || backup >= static_cast<int>(peers_.size()) || peers_[backup].dropped) return;
    peers_[backup].fresh.push_back(std::move(step));
  }

  // Without the shard's lock, after Queue: starts the calls that can start
  // now, on this thread.
  void Flush() {
    absl::MutexLock lock(&mu_);
    TakeFreshLocked();
    SendLocked();
  }

  // A new server at `address` (streams at `stream_address`, "" none) took
  // the rank of `backup`, dropped before: its steps are sent there from now
  // on.
  void Reinstate(int backup, const std::string& address, const std::string& stream_address) {
    absl::MutexLock lock(&mu_);
    if (backup < 0 || backup >= static_cast<int>(peers_.size())) return;
    Peer& p = peers_[backup];
    mu_.Await(absl::Condition(
        +[](Peer* p) { return p->calls.empty(); }, &p));  // the dead one's calls end
    p.SetAddress(address, stream_address, options_.security);
    p.dropped = false;
    p.logged = false;
    p.fresh.clear();
    p.queued.clear();
  }

  // `backup` was declared dead: its steps are dropped, now and later.
  void Drop(int backup) {
    std::vector<std::shared_ptr<rpc::StreamCall>> streams;
    {
      absl::MutexLock lock(&mu_);
      if (backup < 0 || backup >= static_cast<int>(peers_.size())) return;
      peers_[backup].dropped = true;
      peers_[backup].fresh.clear();
      peers_[backup].queued.clear();
      streams = CancelLocked(peers_[backup].calls);
    }
    Cancel(streams);
  }

 private:
  // A call to a backup, through gRPC or on a stream connection. Started and
  // cancelled without mu_ held: a stream call may end (and run Done, which
  // takes mu_) on the thread that starts or cancels it.
  struct Call {
    grpc::ClientContext ctx;
    grpc::ByteBuffer req, resp;
    std::vector<ReplicaStep> steps;
    std::shared_ptr<rpc::StreamCall> stream;  // set under mu_ once started there
    int64_t started_us = 0;                   // with tracing on (ndarray/trace.h)
  };
  struct Peer {
    std::unique_ptr<grpc::GenericStub> stub;
    std::string address;
    rpc::StreamTarget stream;  // address "": through gRPC
    std::deque<ReplicaStep> fresh;             // queued since the last Flush
    std::deque<ReplicaStep> queued;            // to send, after the calls in flight
    std::vector<std::shared_ptr<Call>> calls;  // in flight
    bool dropped = false;
    bool suspect = false;        // to report to `unreachable`
    bool logged = false;         // a failure was logged
    absl::Time retry_at = absl::InfinitePast();

    // Whether a call in flight carries a step of `key`.
    bool InFlight(int key) const {
      for (const std::shared_ptr<Call>& call : calls) {
        for (const ReplicaStep& step : call->steps) {
          if (step.key == key) return true;
        }
      }
      return false;
    }
    // Whether a step can be sent now.
    bool CanSend(absl::Time now) const {
      if (dropped || now < retry_at) return false;
      for (const ReplicaStep& step : queued) {
        if (!InFlight(step.key)) return true;
      }
      return false;
    }
    // Moves the queued steps of the keys no call in flight carries into
    // `steps`, in their order, up to `max_bytes` of their encoding (at
    // least one step): the backup takes messages of a bounded size, and a
    // spare's first steps carry the whole state of every key it gets.
    void TakeSendable(size_t max_bytes, std::vector<ReplicaStep>* steps) {
      std::deque<ReplicaStep> held;
      std::set<int> left;  // keys with a step held: their later steps wait too
      size_t bytes = 0;
      for (ReplicaStep& step : queued) {
        const size_t step_bytes = step.WireBytes();
        const bool fits = steps->empty() || bytes + step_bytes <= max_bytes;
        if (InFlight(step.key) || left.count(step.key) || !fits) {
          left.insert(step.key);
          held.push_back(std::move(step));
        } else {
          bytes += step_bytes;
          steps->push_back(std::move(step));
        }
      }
      queued = std::move(held);
    }
    void SetAddress(const std::string& grpc_address, const std::string& stream_address,
                    const rpc::Security& security) {
      stub = std::make_unique<grpc::GenericStub>(rpc::SharedChannel(grpc_address, security));
      address = grpc_address;
      // A connection of replication's own, apart from any of a worker in the
      // same process (tests and benchmarks run them together).
      stream = rpc::StreamTargetFor(stream_address, kReplicationConnection, security);
    }
  };
  static constexpr int kReplicationConnection = -1;

  // Cancels `calls`: gRPC's at once (a call not started yet is cancelled
  // when it starts); returns the stream calls', to cancel once mu_ is let
  // go (see Call). Those not started yet are cancelled after they start.
  std::vector<std::shared_ptr<rpc::StreamCall>> CancelLocked(
      const std::vector<std::shared_ptr<Call>>& calls) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::shared_ptr<rpc::StreamCall>> streams;
    for (const std::shared_ptr<Call>& call : calls) {
      call->ctx.TryCancel();
      if (call->stream != nullptr) streams.push_back(call->stream);
    }
    return streams;
  }
  static void Cancel(const std::vector<std::shared_ptr<rpc::StreamCall>>& streams)
      ABSL_LOCKS_EXCLUDED(mu_) {
    for (const auto& stream : streams) stream->Cancel();
  }

  // Whether the thread has something to do.
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (stop_) return true;
    const absl::Time now = absl::Now();
    for (const Peer& p : peers_) {
      if (p.suspect || p.CanSend(now)) return true;
    }
    return false;
  }

  bool Idle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (senders_ > 0) return false;
    for (const Peer& p : peers_) {
      if (!p.calls.empty()) return false;
    }
    return true;
  }

  // Flush and Done start calls themselves; this thread tells `unreachable`
  // of failed calls, sends their retries when due, and sends steps that no
  // Flush took within 100 ms (none should wait that long).
  void Loop() {
    absl::MutexLock lock(&mu_);
    while (!stop_) {
      if (!Ready()) wake_.WaitWithTimeout(&mu_, absl::Milliseconds(100));
      for (int b = 0; b < static_cast<int>(peers_.size()) && !stop_; ++b) {
        if (!peers_[b].suspect) continue;
        peers_[b].suspect = false;
        mu_.Unlock();
        if (options_.unreachable) options_.unreachable(b);
        mu_.Lock();
      }
      TakeFreshLocked();
      SendLocked();
    }
  }

  void TakeFreshLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (Peer& p : peers_) {
      std::move(p.fresh.begin(), p.fresh.end(), std::back_inserter(p.queued));
      p.fresh.clear();
    }
  }

  // Starts a call to each backup that has queued steps it can send now.
  // Lets go of mu_ while the calls start (see Call).
  void SendLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::pair<int, std::shared_ptr<Call>>> starting;  // backup, call
    const absl::Time now = absl::Now();
    for (int b = 0; b < static_cast<int>(peers_.size()) && !stop_; ++b) {
      Peer& p = peers_[b];
      if (!p.CanSend(now)) continue;
      auto call = std::make_shared<Call>();
      p.TakeSendable(options_.max_call_bytes, &call->steps);
      p.calls.push_back(call);
      Encode(call.get());
      starting.push_back({b, call});
    }
    if (starting.empty()) return;
    ++senders_;
    mu_.Unlock();
    std::vector<std::shared_ptr<rpc::StreamCall>> started;
    for (const auto& [b, call] : starting) started.push_back(Start(b, call));
    mu_.Lock();
    --senders_;
    std::vector<std::shared_ptr<rpc::StreamCall>> cancel;
    for (size_t i = 0; i < starting.size(); ++i) {
      starting[i].second->stream = started[i];
      // Dropped or stopping since: CancelLocked did not see the handle.
      if (started[i] != nullptr && (stop_ || peers_[starting[i].first].dropped)) {
        cancel.push_back(started[i]);
      }
    }
    if (cancel.empty()) return;
    ++senders_;
    mu_.Unlock();
    Cancel(cancel);
    mu_.Lock();
    --senders_;
  }

  // The request of `call`, from its steps.
  void Encode(Call* call) const {
    std::vector<EncodedMessage> entries;
    for (const ReplicaStep& step : call->steps) entries.push_back(EncodeReplicaStep(step));
    proto::ReplicateRequest rest;
    rest.set_primary(options_.rank);
    *rest.mutable_credential() = credential_;
    call->req = EncodeRepeated(kStepsField, entries, &rest);
  }

  // Starts `call` to backup b, without mu_ (see Call); returns the stream
  // call, or null when it went through gRPC. The peer's address stays while
  // it has calls in flight (Reinstate waits for them), so it is read here.
  std::shared_ptr<rpc::StreamCall> Start(int b, const std::shared_ptr<Call>& call)
      ABSL_LOCKS_EXCLUDED(mu_) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    const Peer& p = peers_[b];
    const absl::Time deadline = absl::Now() + options_.rpc_timeout;
    if (trace::Enabled()) call->started_us = trace::NowMicros();
    auto done = [this, b, call](grpc::Status s) { Done(b, call, s); };
    if (p.stream.address.empty()) {
      call->ctx.set_deadline(absl::ToChronoTime(deadline));
      rpc::StartUnaryCall(p.stub.get(), &call->ctx, kReplicateMethod, call->req, &call->resp,
                          std::move(done), queue_);
      return nullptr;
    }
    return rpc::StartStreamCall(p.stream, kReplicateMethod, call->req, &call->resp, deadline,
                                std::move(done));
  }

  void Done(int b, const std::shared_ptr<Call>& call, const grpc::Status& s) {
    if (call->started_us != 0) {
      trace::Complete("server", "replicate", call->started_us, trace::NowMicros(),
                      absl::StrCat("\"backup\":", b, ",\"steps\":", call->steps.size(),
                                   ",\"bytes\":", call->req.Length(), ",\"ok\":", s.ok()));
    }
    if (s.ok()) {
      for (const ReplicaStep& step : call->steps) shard_->Replicated(step.key, step.version);
    }
    absl::MutexLock lock(&mu_);
    Peer& p = peers_[b];
    p.calls.erase(std::find(p.calls.begin(), p.calls.end(), call));
    if (stop_ || p.dropped) return;
    if (s.ok()) return SendLocked();  // the key's next steps, if queued
    // Again, before the key's later steps (queued behind it).
    p.queued.insert(p.queued.begin(), std::make_move_iterator(call->steps.begin()),
                    std::make_move_iterator(call->steps.end()));
    p.retry_at = absl::Now() + absl::Milliseconds(100);
    p.suspect = true;
    wake_.Signal();
    if (!p.logged) {
      p.logged = true;
      std::cerr << "mx_server: server " << options_.rank << ": replicating to server " << b << " ("
                << (p.stream.address.empty() ? p.address : p.stream.address)
                << ") failed: " << s.error_message()
                << "; trying again until it answers or is declared dead" << std::endl;
    }
  }

  ParameterShard* const shard_;
  const ReplicationOptions options_;
  grpc::CompletionQueue* const queue_;
  proto::Credential credential_;
  absl::Mutex mu_;
  // Wakes the thread (stop_, a suspect peer). Not an Await on mu_: a waiter
  // with a condition sends every unlock of mu_ down absl's slow path.
  absl::CondVar wake_;
  std::vector<Peer> peers_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Threads in SendLocked with mu_ let go, which lock it again: a call
  // they started may have ended (the replicator looking idle) meanwhile.
  int senders_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

class Service final {
 public:
  Service(ParameterShard* shard, const ParameterServerOptions& o)
      : shard_(shard),
        guard_(o.security.token, o.identities),
        segments_(o.shm_dir),
        deadlines_(shard) {}
  absl::Duration SinceShardChecked() const { return deadlines_.SinceShardChecked(); }
  Guard& guard() { return guard_; }
  Segments& segments() { return segments_; }
  void set_rank(int rank) { rank_.store(rank); }
  void set_servers(int servers) { servers_.store(servers); }

  rpc::UnaryReactor* Init(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                          grpc::ByteBuffer* response) {
    return rpc::AnswerRequest<proto::InitRequest, proto::InitResponse>(
        *request, response, "init", [&] { return Worker(*ctx, "init").status(); },
        [this](const proto::InitRequest& req, proto::InitResponse*) {
          MX_RETURN_IF_ERROR(Prefix(SameJob(req), "init", req.key()));
          if (req.has_table()) {
            MX_ASSIGN_OR_RETURN(const Copies copies, CopiesOf(req));
            const proto::TableRange& t = req.table();
            return shard_->InitTable(req.key(), Shape(t.shape().begin(), t.shape().end()),
                                     t.first_row(), t.rows(), t.init_scale(), t.init_seed(),
                                     copies);
          }
          absl::StatusOr<HostTensor> t = FromProto(req.value());
          if (!t.ok()) return Prefix(t.status(), "init", req.key());
          MX_ASSIGN_OR_RETURN(const Copies copies, CopiesOf(req));
          return shard_->Init(req.key(), t->shape, t->data, copies);
        });
  }

  rpc::UnaryReactor* Push(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                          grpc::ByteBuffer* response) {
    *response = EncodeMessage(proto::PushResponse());
    rpc::UnaryReactor* reactor = new rpc::UnaryReactor;
    proto::PushRequest req;
    HandlePush(*ctx, *request, &req, [reactor](absl::Status s) { reactor->Finish(ToGrpc(s)); });
    return reactor;
  }

  rpc::UnaryReactor* Pull(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                          grpc::ByteBuffer* response) {
    proto::PullRequest req;
    absl::StatusOr<Guard::Node> caller =
        Worker(*ctx, "pull", PeekCredential(*request, kPullCredentialField));
    absl::Status s = caller.status();
    if (s.ok()) s = DecodeWithTensor(*request, 0, &req, nullptr);  // no tensor
    if (s.ok()) s = guard_.CheckClaim(*ctx, "pull", *caller, kWorker, req.rank());
    std::optional<ShmSpan> reply;
    if (s.ok()) s = ReplyOf(req, &reply);
    auto* reactor = new PullReactor(shard_, &deadlines_, response, /*many=*/false);
    reactor->Start(Prefix(s, "pull", req.key()),
                   {{req.key(), req.min_version(), RowsOf(req), std::move(reply)}},
                   ctx->deadline());
    return reactor;
  }

  rpc::UnaryReactor* PushPull(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                              grpc::ByteBuffer* response) {
    auto req = std::make_shared<proto::PushRequest>();
    auto* reactor = new PullReactor(shard_, &deadlines_, response, /*many=*/false);
    // Once the push is recorded (a parked one: later, on another thread).
    HandlePush(*ctx, *request, req.get(),
               [this, reactor, req, deadline = ctx->deadline()](absl::Status s) {
                 std::optional<ShmSpan> reply;
                 if (s.ok()) s = Prefix(ReplyOf(*req, &reply), "pushpull", req->key());
                 reactor->Start(s, {{req->key(), req->min_version(), PullRowsOf(*req), std::move(reply)}},
                                deadline);
               });
    return reactor;
  }

  rpc::UnaryReactor* PushPullMany(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                                  grpc::ByteBuffer* response) {
    auto* reactor = new PullReactor(shard_, &deadlines_, response, /*many=*/true);
    HandlePushes(*ctx, *request,
                 [reactor, deadline = ctx->deadline()](absl::Status s,
                                                       std::vector<PullReactor::Wanted> wanted) {
                   reactor->Start(s, std::move(wanted), deadline);
                 });
    return reactor;
  }

  // A primary's steps: applied before the answer, which tells the primary
  // that this backup holds them.
  rpc::UnaryReactor* Replicate(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                               grpc::ByteBuffer* response) {
    rpc::UnaryReactor* reactor = new rpc::UnaryReactor;
    *response = EncodeMessage(proto::ReplicateResponse());
    reactor->Finish(ToGrpc(HandleReplicate(*ctx, *request)));
    return reactor;
  }

  rpc::UnaryReactor* SetOptimizer(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                                  grpc::ByteBuffer* response) {
    return rpc::AnswerRequest<proto::SetOptimizerRequest, proto::SetOptimizerResponse>(
        *request, response, "set_optimizer", [&] { return Worker(*ctx, "set_optimizer").status(); },
        [this](const proto::SetOptimizerRequest& req, proto::SetOptimizerResponse*) {
          Optimizer::Options options(req.options().begin(), req.options().end());
          std::map<int, std::string> names(req.param_names().begin(), req.param_names().end());
          std::map<std::string, float> lr_mult(req.lr_mult().begin(), req.lr_mult().end());
          std::map<std::string, float> wd_mult(req.wd_mult().begin(), req.wd_mult().end());
          return shard_->SetOptimizer(req.name(), options, names, lr_mult, wd_mult);
        });
  }

  rpc::UnaryReactor* SaveOptimizerStates(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) {
    return rpc::AnswerRequest<proto::SaveOptimizerStatesRequest, proto::OptimizerStates>(
        *request, response, "save_optimizer_states",
        [&] { return Worker(*ctx, "save_optimizer_states").status(); },
        [this](const proto::SaveOptimizerStatesRequest& req, proto::OptimizerStates* resp) {
          const std::set<int> keys(req.keys().begin(), req.keys().end());
          absl::StatusOr<std::string> states =
              shard_->SaveOptimizerStates(keys.empty() ? nullptr : &keys);
          if (!states.ok()) return states.status();
          resp->set_states(*std::move(states));
          return absl::OkStatus();
        });
  }

  rpc::UnaryReactor* LoadOptimizerStates(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) {
    return rpc::AnswerRequest<proto::OptimizerStates, proto::LoadOptimizerStatesResponse>(
        *request, response, "load_optimizer_states",
        [&] { return Worker(*ctx, "load_optimizer_states").status(); },
        [this](const proto::OptimizerStates& req, proto::LoadOptimizerStatesResponse*) {
          return shard_->LoadOptimizerStates(req.states(), req.merge());
        });
  }

  rpc::UnaryReactor* AttachSegment(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) {
    return rpc::AnswerRequest<proto::AttachSegmentRequest, proto::AttachSegmentResponse>(
        *request, response, "attach_segment",
        [&] { return Worker(*ctx, "attach_segment").status(); },
        [&](const proto::AttachSegmentRequest& req, proto::AttachSegmentResponse*) {
          MX_ASSIGN_OR_RETURN(const Guard::Node caller, Worker(*ctx, "attach_segment"));
          MX_RETURN_IF_ERROR(guard_.CheckClaim(*ctx, "attach_segment", caller, kWorker, req.rank()));
          MX_RETURN_IF_ERROR(segments_.Attach(req.rank(), req.segment(), req.name(), req.bytes()));
          // Once per worker: that co-location works is worth a line (on
          // Kubernetes it depends on where pods land).
          std::cout << "server " << rank_.load() << ": worker " << req.rank()
                    << " shares memory with this server" << std::endl;
          return absl::OkStatus();
        });
  }

 private:
  // The token of a call, and which registered worker makes it: from the
  // call's metadata, or for the data path from the request's credential
  // (proto/mx.proto).
  absl::StatusOr<Guard::Node> Worker(const rpc::ServerContext& ctx, const char* method) {
    return guard_.Identify(ctx, method, kWorker);
  }
  absl::StatusOr<Guard::Node> Worker(const rpc::ServerContext& ctx, const char* method,
                                     const proto::Credential& credential) {
    return guard_.Identify(ctx, method, kWorker, {credential.token(), credential.node()});
  }

  // The role an init gives this server for its key (InitRequest.primary,
  // backup).
  absl::StatusOr<Copies> CopiesOf(const proto::InitRequest& req) const {
    if (!req.has_primary() && !req.has_backup()) return Copies{};
    const int self = rank_.load();
    auto refuse = [&](const std::string& why) {
      return absl::FailedPreconditionError(absl::StrCat(
          "init of key ", req.key(), " with copies on servers ", req.primary(), " and ",
          req.backup(), ": ", why));
    };
    if (self < 0) return refuse("this server does not replicate (start it with --replicas=2)");
    if (req.primary() == req.backup()) return refuse("the two copies must be on two servers");
    const int servers = servers_.load();
    if (servers == 0) return refuse("this server does not replicate (start it with --replicas=2)");
    for (int server : {req.primary(), req.backup()}) {
      if (server < 0 || server >= servers) {
        return refuse(absl::StrCat("the job has servers 0 to ", servers - 1));
      }
    }
    if (self == req.primary()) return Copies{Copies::kPrimary, req.backup()};
    if (self == req.backup()) return Copies{Copies::kBackup, req.primary()};
    return refuse(absl::StrCat("this is server ", self));
  }

  absl::Status HandleReplicate(const rpc::ServerContext& ctx, const grpc::ByteBuffer& request) {
    trace::Span span("server", "apply_replicated");
    const proto::Credential credential = PeekCredential(request, kReplicateCredentialField);
    MX_ASSIGN_OR_RETURN(
        const Guard::Node caller,
        guard_.Identify(ctx, "replicate", kServer, {credential.token(), credential.node()}));
    std::deque<proto::ReplicatedStep> headers;
    std::deque<PushData> data;
    proto::ReplicateRequest rest;
    MX_RETURN_IF_ERROR(DecodeRepeated(
        request, kStepsField, kStepValueField, [&](int) { return &headers.emplace_back(); },
        [&](int) { return Locate(&data.emplace_back()); }, &rest));
    MX_RETURN_IF_ERROR(guard_.CheckClaim(ctx, "replicate", caller, kServer, rest.primary()));
    MX_ASSIGN_OR_RETURN(const Slices slices, SlicesOf(request));
    std::vector<ReplicaStep> steps;
    for (size_t i = 0; i < headers.size(); ++i) {
      const proto::ReplicatedStep& h = headers[i];
      if (!data[i].received || h.ranks_size() != h.seqs_size()) {
        return absl::InvalidArgumentError(absl::StrCat("replicated step of key ", h.key(),
                                                       ": malformed (no value, or ranks without seqs)"));
      }
      MX_RETURN_IF_ERROR(TensorShape(h.value(), data[i].bytes).status());
      MX_ASSIGN_OR_RETURN(Pieces value, PiecesOf(slices, data[i].offset, data[i].bytes));
      ReplicaStep step{h.key(), h.version(), std::move(value), {}};
      if (h.has_state()) {
        MX_ASSIGN_OR_RETURN(step.state, DecodeState(h, step.value));
        step.value = Pieces();
      } else {
        for (int j = 0; j < h.ranks_size(); ++j) step.pushes.push_back({h.ranks(j), h.seqs(j)});
        step.rows.assign(h.rows().ids().begin(), h.rows().ids().end());
      }
      steps.push_back(std::move(step));
    }
    return shard_->ApplyReplicated(rest.primary(), std::move(steps));
  }

  // The KeyState a step carries (ReplicatedStep.state), its value `value`.
  static absl::StatusOr<std::shared_ptr<const KeyState>> DecodeState(
      const proto::ReplicatedStep& h, const Pieces& value) {
    auto state = std::make_shared<KeyState>();
    state->shape = Shape(h.state().shape().begin(), h.state().shape().end());
    state->table = Shape(h.state().table().begin(), h.state().table().end());
    state->first_row = h.state().first_row();
    if (!state->shape.IsValid() || (state->table.ndim() > 0 && !state->table.IsValid())) {
      return absl::InvalidArgumentError(absl::StrCat("state of key ", h.key(), ": shape ",
                                                     state->shape.ToString(), ", table ",
                                                     state->table.ToString()));
    }
    state->value.resize(value.bytes() / sizeof(float));
    value.CopyTo(0, value.bytes(), state->value.data());
    for (int j = 0; j < h.ranks_size(); ++j) state->seen[h.ranks(j)] = h.seqs(j);
    const proto::SetOptimizerRequest& opt = h.state().optimizer();
    state->optimizer = opt.name();
    state->optimizer_options = {opt.options().begin(), opt.options().end()};
    state->param_names = {opt.param_names().begin(), opt.param_names().end()};
    state->lr_mult = {opt.lr_mult().begin(), opt.lr_mult().end()};
    state->wd_mult = {opt.wd_mult().begin(), opt.wd_mult().end()};
    state->optimizer_states = h.state().optimizer_states();
    return state;
  }

  // Whether the worker's store (as its init says) belongs to a job run as
  // this server is: the same mode, number of workers and staleness.
  absl::Status SameJob(const proto::InitRequest& req) const {
    const ShardOptions& o = shard_->options();
    auto mode = [](bool sync) { return sync ? "dist_sync" : "dist_async"; };
    if (req.has_sync() && req.sync() != o.sync) {
      return absl::FailedPreconditionError(absl::StrCat(
          "this server runs ", mode(o.sync), ", the worker's store is ", mode(req.sync()),
          " (start the servers with --mode=", req.sync() ? "sync" : "async", ")"));
    }
    if (req.has_num_workers() && req.num_workers() != o.num_workers) {
      return absl::FailedPreconditionError(absl::StrCat(
          "this server expects ", o.num_workers, " workers, the worker's job has ",
          req.num_workers(), " (give every node the same --num_workers or DMLC_NUM_WORKER)"));
    }
    if (req.has_staleness() && req.staleness() != o.staleness) {
      return absl::FailedPreconditionError(absl::StrCat(
          "this server allows a staleness of ", o.staleness, ", the worker's store uses ",
          req.staleness(), " (give every node the same --staleness or MX_STALENESS)"));
    }
    return absl::OkStatus();
  }

  // Decodes a push into *req (all but the data, which stay where they
  // arrived), checks the caller and gives it to the shard; `done` gets the
  // outcome once the shard has recorded the push (see PushAsync: a parked
  // push later, on the thread that makes room); HandlePush reads *req
  // only before it returns. A caller that is refused learns nothing of the
  // request, even whether it decoded.
  void HandlePush(const rpc::ServerContext& ctx, const grpc::ByteBuffer& request,
                  proto::PushRequest* req, ParameterShard::PushCallback done) {
    absl::StatusOr<Guard::Node> caller =
        Worker(ctx, "push", PeekCredential(request, kPushCredentialField));
    if (!caller.ok()) return done(caller.status());
    PushData data;
    absl::Status s = DecodeWithTensor(request, kPushValueField, req, Locate(&data));
    if (s.ok()) s = guard_.CheckClaim(ctx, "push", *caller, kWorker, req->rank());
    absl::StatusOr<Slices> slices = SlicesOf(request);
    if (s.ok()) s = slices.status();
    Apply(s, slices.ok() ? *slices : nullptr, *req, data, std::move(done));
  }

  // The same for every entry of a PushPullManyRequest: `done` gets the
  // outcome, the first error of any entry, and what to answer with, once
  // the shard has recorded every entry.
  using PushesDone = std::function<void(absl::Status, std::vector<PullReactor::Wanted>)>;
  void HandlePushes(const rpc::ServerContext& ctx, const grpc::ByteBuffer& request,
                    PushesDone done) {
    absl::StatusOr<Guard::Node> caller =
        Worker(ctx, "pushpull", PeekCredential(request, kManyCredentialField));
    if (!caller.ok()) return done(caller.status(), {});
    std::deque<proto::PushRequest> reqs;  // stable addresses while decoding
    std::deque<PushData> data;
    absl::Status s = DecodeRepeated(
        request, kManyEntriesField, kPushValueField, [&](int) { return &reqs.emplace_back(); },
        [&](int) { return Locate(&data.emplace_back()); });
    if (!s.ok()) return done(absl::Status(s.code(), absl::StrCat("pushpull: ", s.message())), {});
    absl::StatusOr<Slices> slices = SlicesOf(request);  // once for every entry
    if (!slices.ok()) return done(slices.status(), {});
    if (reqs.empty()) return done(absl::InvalidArgumentError("pushpull of no keys"), {});
    std::set<int> keys;
    for (const proto::PushRequest& req : reqs) {  // all checked before any applies
      absl::Status claim = guard_.CheckClaim(ctx, "pushpull", *caller, kWorker, req.rank());
      if (!claim.ok()) return done(claim, {});
      // A second entry of a key would count as the worker's next step.
      if (!keys.insert(req.key()).second) {
        return done(absl::InvalidArgumentError(
                        absl::StrCat("pushpull: key ", req.key(), " given twice in one request")),
                    {});
      }
    }
    // The entries' outcomes, joined: the last to be recorded answers.
    struct Join {
      absl::Mutex mu;
      absl::Status first_error ABSL_GUARDED_BY(mu);
      std::atomic<size_t> remaining;
      std::vector<PullReactor::Wanted> wanted;
      PushesDone done;
    };
    std::vector<PullReactor::Wanted> wanted;
    for (const proto::PushRequest& req : reqs) {
      std::optional<ShmSpan> reply;
      absl::Status bad = ReplyOf(req, &reply);
      if (!bad.ok()) return done(Prefix(bad, "pushpull", req.key()), {});
      wanted.push_back({req.key(), req.min_version(), PullRowsOf(req), std::move(reply)});
    }
    auto join = std::make_shared<Join>();
    join->remaining = reqs.size();
    join->wanted = std::move(wanted);
    join->done = std::move(done);
    ParameterShard::ReplicaBatch batch(shard_);
    for (size_t i = 0; i < reqs.size(); ++i) {
      Apply(absl::OkStatus(), *slices, reqs[i], data[i], [join](absl::Status s) {
        if (!s.ok()) {
          absl::MutexLock lock(&join->mu);
          if (join->first_error.ok()) join->first_error = std::move(s);
        }
        if (join->remaining.fetch_sub(1) != 1) return;
        absl::Status outcome;
        {
          absl::MutexLock lock(&join->mu);
          outcome = join->first_error;
        }
        join->done(std::move(outcome), std::move(join->wanted));
      });
    }
  }

  // Where a push's data lie in the request.
  struct PushData {
    size_t offset = 0, bytes = 0;
    bool received = false;
  };
  // A sink that leaves the data in the request's buffers and notes where.
  static TensorSink Locate(PushData* data) {
    return [data](size_t offset, size_t bytes) -> absl::StatusOr<void*> {
      *data = {offset, bytes, true};
      return nullptr;
    };
  }
  // A push's value as float32: where it lies in the request, or, sent
  // compressed (kvstore/gradient_compression.h), decompressed into a
  // buffer of its own.
  absl::StatusOr<Pieces> PushedValue(const Slices& request, int key, const proto::Tensor& t,
                                     const PushData& data) const {
    MX_ASSIGN_OR_RETURN(const GradientCompression c, CompressionOf(t));
    if (!c.enabled()) {
      MX_RETURN_IF_ERROR(TensorShape(t, data.bytes).status());
      return PiecesOf(request, data.offset, data.bytes);
    }
    MX_ASSIGN_OR_RETURN(const Shape shape, TensorDims(t));
    // Before anything is allocated for the shape the request claims (a
    // 50-byte request claimed 2^30 floats, zero-filled; 256 MiB of 2-bit
    // values unpack to 4 GiB): the packing's size, and the key's.
    MX_RETURN_IF_ERROR(CheckPacked(c, data.bytes, shape.Size()));
    MX_ASSIGN_OR_RETURN(const int64_t held, shard_->DenseSize(key));
    if (shape.Size() != held) {
      return absl::InvalidArgumentError(
          absl::StrCat(shape.Size(), " values but the key holds ", held));
    }
    MX_ASSIGN_OR_RETURN(const Pieces packed, PiecesOf(request, data.offset, data.bytes));
    std::vector<uint8_t> bytes(data.bytes);
    packed.CopyTo(0, bytes.size(), bytes.data());
    std::vector<float> values(shape.Size());
    MX_RETURN_IF_ERROR(Unpack(c, bytes.data(), bytes.size(), shape.Size(), values.data()));
    return Pieces::Of(std::move(values));
  }

  // Checks a decoded push (decode status `s`) and gives it to the shard:
  // its data as they lie in the request's slices, which the shard holds;
  // `done` gets the outcome (see HandlePush).
  void Apply(absl::Status s, const Slices& request, const proto::PushRequest& req,
             const PushData& data, ParameterShard::PushCallback done) {
    // A value in shared memory comes with the tensor's shape, no data.
    if (s.ok() && req.has_shm_value() && data.bytes > 0) {
      s = absl::InvalidArgumentError("a value both in the request and in shared memory");
    } else if (s.ok() && !req.has_shm_value() && !data.received) {
      s = absl::InvalidArgumentError("no value");
    }
    if (!s.ok()) return done(Prefix(s, "push", req.key()));
    if (req.has_rows() && req.value().dtype() != proto::FLOAT32) {
      return done(Prefix(absl::InvalidArgumentError("a row-sparse push travels uncompressed"),
                         "push", req.key()));
    }
    absl::StatusOr<Pieces> pieces =
        req.has_shm_value() ? ShmValue(req) : PushedValue(request, req.key(), req.value(), data);
    if (!pieces.ok()) return done(Prefix(pieces.status(), "push", req.key()));
    if (req.assign()) {
      if (!req.has_rows()) {
        return done(Prefix(absl::InvalidArgumentError("an assign needs the rows it sets"),
                           "assign_rows", req.key()));
      }
      return done(shard_->AssignRows(req.key(), *RowsOf(req), *pieces));
    }
    // As they travelled: packed when compressed.
    const size_t bytes = req.has_shm_value() ? pieces->bytes() : data.bytes;
    shard_->PushAsync(
        req.key(), req.rank(), *std::move(pieces),
        [bytes, done = std::move(done)](absl::Status s) {
          if (s.ok()) {
            ServerMetrics::Get().pushes->Add();
            ServerMetrics::Get().pushed_bytes->Add(static_cast<double>(bytes));
          }
          done(std::move(s));
        },
        req.seq(), RowsOf(req));
  }

  // A push's value that lies in the worker's shared memory: held where it
  // lies until the shard drops it, then released to the worker through
  // its release word (ShmRange.release); without one, copied out at once
  // (the worker reuses the range once the call is answered).
  absl::StatusOr<Pieces> ShmValue(const proto::PushRequest& req) const {
    if (req.value().dtype() != proto::FLOAT32) {
      return absl::InvalidArgumentError("a value in shared memory travels uncompressed");
    }
    const proto::ShmRange& r = req.shm_value();
    MX_ASSIGN_OR_RETURN(const ShmSpan span, segments_.Find(req.rank(), r));
    MX_RETURN_IF_ERROR(TensorShape(req.value(), span.bytes).status());
    if (reinterpret_cast<uintptr_t>(span.data) % alignof(float) != 0) {
      return absl::InvalidArgumentError("a value in shared memory at an unaligned offset");
    }
    ServerMetrics::Get().shm_bytes->Add(static_cast<double>(span.bytes));
    const size_t n = span.bytes / sizeof(float);
    if (r.has_release()) {
      proto::ShmRange word;
      word.set_segment(r.segment());
      word.set_offset(r.release());
      word.set_bytes(sizeof(uint32_t));
      MX_ASSIGN_OR_RETURN(const ShmSpan release, segments_.Find(req.rank(), word));
      if (r.release() % sizeof(uint32_t) != 0) {
        return absl::InvalidArgumentError("a release word at an unaligned offset");
      }
      // Holds the segment mapped; tells the worker when the value is no
      // longer read.
      std::shared_ptr<const void> owner(release.segment.get(), [release](const void*) {
        reinterpret_cast<std::atomic<uint32_t>*>(release.data)->store(0, std::memory_order_release);
      });
      return Pieces::Of(reinterpret_cast<const float*>(span.data), n, std::move(owner));
    }
    // Not zeroed first: a pass over 16 MiB costs as much as the copy.
    std::shared_ptr<float[]> value(new float[n]);
    std::memcpy(value.get(), span.data, span.bytes);
    return Pieces::Of(value.get(), n, value);
  }
  // Where a pull (or pushpull) asks for its answer's data: the caller's
  // shared memory, or (no shm_reply) the answer.
  template <typename Request>
  absl::Status ReplyOf(const Request& req, std::optional<ShmSpan>* reply) const {
    if (!req.has_shm_reply()) return absl::OkStatus();
    MX_ASSIGN_OR_RETURN(*reply, segments_.Find(req.rank(), req.shm_reply()));
    return absl::OkStatus();
  }

  static std::vector<int64_t> IdsOf(const proto::RowIds& rows) {
    return std::vector<int64_t>(rows.ids().begin(), rows.ids().end());
  }
  // The row ids of a table's push or pull; none for a dense key's.
  template <typename Request>
  static ParameterShard::RowIds RowsOf(const Request& req) {
    if (!req.has_rows()) return std::nullopt;
    return IdsOf(req.rows());
  }
  // The rows a PushPull of a table answers with: pull_rows, else the
  // pushed rows.
  static ParameterShard::RowIds PullRowsOf(const proto::PushRequest& req) {
    if (!req.has_pull_rows()) return RowsOf(req);
    return IdsOf(req.pull_rows());
  }

  ParameterShard* shard_;
  Guard guard_;
  Segments segments_;
  std::atomic<int> rank_{-1};  // this server's (SetRank); -1 before
  std::atomic<int> servers_{0};  // the job's (StartReplication)
  PullDeadlines deadlines_;
};

}  // namespace

struct ParameterServer::Impl {
  std::unique_ptr<Service> service;
  std::unique_ptr<rpc::AsyncServer> server;
  std::unique_ptr<Replicator> replicator;  // replicas 2
  size_t max_state_bytes = 0;              // ShardOptions::max_state_bytes
};

namespace {

// Routes the service's methods on `server`. The data path's methods never
// wait; the others may wait for a step in flight (or take long: an init's
// value, a table's rows).
void RouteMethods(Service* service, rpc::AsyncServer* server) {
  const std::string name = KVService::service_full_name();
  server->RouteMethods<Service>(name, rpc::Runs::kPolling, service,
                                {{"Push", &Service::Push},
                                 {"Pull", &Service::Pull},
                                 {"PushPull", &Service::PushPull},
                                 {"PushPullMany", &Service::PushPullMany},
                                 {"Replicate", &Service::Replicate}});
  server->RouteMethods<Service>(name, rpc::Runs::kControl, service,
                                {{"Init", &Service::Init},
                                 {"SetOptimizer", &Service::SetOptimizer},
                                 {"SaveOptimizerStates", &Service::SaveOptimizerStates},
                                 {"LoadOptimizerStates", &Service::LoadOptimizerStates},
                                 {"AttachSegment", &Service::AttachSegment}});
}

}  // namespace

absl::StatusOr<std::unique_ptr<ParameterServer>> ParameterServer::Start(
    const std::string& bind_address, ShardOptions options,
    const ParameterServerOptions& server_options) {
  const int max_message_mb = server_options.max_message_mb;
  std::unique_ptr<ParameterServer> ps(new ParameterServer());
  // A key's whole state goes to a new backup in one message, which the
  // spare (started alike) receives up to max_message_mb; 64 KiB for the
  // rest of the message.
  options.max_state_bytes = std::max<size_t>((size_t{1} << 20) * max_message_mb, 1 << 16) - (1 << 16);
  ps->shard_ = std::make_unique<ParameterShard>(options);
  ps->impl_ = std::make_unique<Impl>();
  ps->impl_->max_state_bytes = options.max_state_bytes;
  ps->impl_->service = std::make_unique<Service>(ps->shard_.get(), server_options);
  grpc::ServerBuilder builder;
  int port = 0;
  rpc::Listen(&builder, bind_address, server_options.security, &port);
  ps->impl_->server = std::make_unique<rpc::AsyncServer>(&builder);
  RouteMethods(ps->impl_->service.get(), ps->impl_->server.get());
  if (max_message_mb < 1 || max_message_mb > kMaxMessageBytes >> 20) {
    return absl::InvalidArgumentError(absl::StrCat("the largest message must be 1 to ",
                                                   kMaxMessageBytes >> 20, " MiB, not ",
                                                   max_message_mb));
  }
  builder.SetMaxReceiveMessageSize(max_message_mb << 20);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  ps->impl_->server->Start(builder.BuildAndStart());
  if (ps->impl_->server->server() == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", bind_address));
  }
  const std::string host = bind_address.substr(0, bind_address.rfind(':'));
  ps->address_ = absl::StrCat(host, ":", port);
  if (server_options.stream_port >= 0) {
    rpc::StreamOptions streams;
    if (server_options.security.tls()) {
      absl::StatusOr<std::shared_ptr<const rpc::StreamTls>> tls =
          rpc::StreamTls::For(server_options.security);
      if (!tls.ok()) return tls.status();
      streams.tls = *std::move(tls);
    }
    streams.guard = &ps->impl_->service->guard();
    streams.max_message_bytes = (size_t{1} << 20) * static_cast<size_t>(max_message_mb);
    const std::string name = KVService::service_full_name();
    for (const char* method : {"Push", "Pull", "PushPull", "PushPullMany", "Replicate"}) {
      streams.methods.insert(absl::StrCat("/", name, "/", method));
    }
    absl::StatusOr<int> stream_port =
        ps->impl_->server->ServeStreams(host, server_options.stream_port, std::move(streams));
    if (!stream_port.ok()) return stream_port.status();
    ps->stream_address_ = absl::StrCat(host, ":", *stream_port);
  }
  // A server that checks identities serves once it knows the workers.
  ps->impl_->server->SetServing(!server_options.identities);
  return ps;
}

void ParameterServer::AdmitWorkers(const std::vector<std::string>& keys) {
  for (size_t rank = 0; rank < keys.size(); ++rank) {
    impl_->service->guard().Admit(kWorker, static_cast<int>(rank), keys[rank]);
  }
  impl_->service->guard().AdmitAll(kWorker);
  // A server that does not replicate takes calls from no server: a claim
  // to be one is refused at once rather than waiting (on the thread that
  // serves every call) for servers' keys that never come.
  if (impl_->replicator == nullptr) impl_->service->guard().AdmitAll(kServer);
  impl_->server->SetServing(true);
}

int64_t ParameterServer::refused() const { return impl_->service->guard().refused(); }
absl::Duration ParameterServer::SinceShardChecked() const {
  return impl_->service->SinceShardChecked();
}

void ParameterServer::AdmitServers(const std::vector<std::string>& keys) {
  for (size_t rank = 0; rank < keys.size(); ++rank) {
    impl_->service->guard().Admit(kServer, static_cast<int>(rank), keys[rank]);
  }
  impl_->service->guard().AdmitAll(kServer);
}

void ParameterServer::SetRank(int rank) { impl_->service->set_rank(rank); }

void ParameterServer::StartReplication(ReplicationOptions options) {
  impl_->service->set_rank(options.rank);
  impl_->service->set_servers(static_cast<int>(options.servers.size()));
  // Backups are started alike: they take the messages this server takes.
  options.max_call_bytes = impl_->max_state_bytes;
  impl_->replicator =
      std::make_unique<Replicator>(shard_.get(), std::move(options), impl_->server->queue());
  Replicator* r = impl_->replicator.get();
  shard_->SetReplicator([r](int backup, ReplicaStep step) { r->Queue(backup, std::move(step)); },
                        [r] { r->Flush(); });
}

int ParameterServer::ServerReplaced(int server, const std::string& address,
                                    const std::string& stream_address,
                                    const std::string& session_key) {
  if (impl_->replicator == nullptr) return 0;
  impl_->service->guard().Admit(rpc::Role::kServer, server, session_key);
  impl_->replicator->Reinstate(server, address, stream_address);
  return shard_->ServerReplaced(server);
}

void ParameterServer::WorkerDied(int rank) {
  shard_->MarkDead(rank);
  impl_->service->segments().Drop(rank);
}

void ParameterServer::WorkerLeft(int rank) {
  shard_->MarkFinished(rank);
  impl_->service->segments().Drop(rank);
}

size_t ParameterServer::shm_segments() const { return impl_->service->segments().count(); }

int ParameterServer::ServerDied(int server) {
  if (impl_->replicator != nullptr) impl_->replicator->Drop(server);
  return shard_->ServerDied(server);
}

ParameterServer::~ParameterServer() {
  if (impl_ != nullptr && impl_->server != nullptr) {
    // Pulls waiting in the shard end at once rather than at their deadline
    // (gRPC's Shutdown cancels calls but waits for their handlers).
    shard_->Close("the server is shutting down");
    impl_->server->StopServing(absl::Now() + absl::Seconds(1));
  }
  // Its callbacks call the shard, and its calls end through the server's
  // queue, which stops after.
  if (impl_ != nullptr) impl_->replicator.reset();
  impl_.reset();  // the service's threads call the shard: they end first
}

}  // namespace mx
