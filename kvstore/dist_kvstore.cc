#include "kvstore/dist_kvstore.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvstore/compression_wire.h"
#include "kvstore/gradient_compression.h"
#include "kvstore/kvstore_internal.h"
#include "kvstore/placement.h"
#include "ndarray/env.h"
#include "ndarray/trace.h"
#include "proto/mx.grpc.pb.h"
#include "proto/slice_key.h"
#include "proto/wire.h"
#include "rpc/coordinator_client.h"
#include "rpc/metrics.h"
#include "rpc/rpc.h"
#include "rpc/shared_memory.h"
#include "rpc/stream.h"
#include "rpc/stream_tls.h"

namespace mx {

namespace {

// A call's keys on the server and the versions it waits for (-1: none),
// as trace event arguments; "" when tracing is off.
std::string TraceKeys(const std::vector<std::pair<int, int64_t>>& keys) {
  if (!trace::Enabled()) return "";
  std::string k, v;
  for (const auto& [key, version] : keys) {
    absl::StrAppend(&k, k.empty() ? "" : ",", key);
    if (version >= 0) absl::StrAppend(&v, v.empty() ? "" : ",", version);
  }
  return absl::StrCat("\"keys\":[", k, "]", v.empty() ? "" : absl::StrCat(",\"versions\":[", v, "]"));
}

// mx_kvstore_calls_in_flight: this worker's data calls awaiting an answer
// (a queue depth), for /metrics.
metrics::Gauge* InFlightGauge() {
  static metrics::Gauge* g =
      metrics::Registry::Global()
          .AddGauge("mx_kvstore_calls_in_flight",
                    "Calls of this worker's distributed store to servers awaiting an answer")
          ->With({});
  return g;
}

using rpc::FromGrpc;
using rpc::ToGrpc;

// Collects the outcome of several RPCs; the last one to finish reports the
// first error (or success) to the engine.
class Join {
 public:
  // `ok` runs (before `done`) when every call succeeded.
  Join(int calls, std::function<void(std::exception_ptr)> done, std::function<void()> ok = nullptr)
      : left_(calls), done_(std::move(done)), ok_(std::move(ok)) {}
  void Finish(absl::Status s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!s.ok() && first_error_.ok()) first_error_ = std::move(s);
    }
    if (left_.fetch_sub(1) == 1) {
      absl::Status result;
      {
        std::lock_guard<std::mutex> lock(mu_);
        result = first_error_;
      }
      if (result.ok() && ok_) ok_();
      done_(result.ok() ? nullptr : std::make_exception_ptr(Error(result)));
      delete this;
    }
  }

 private:
  std::atomic<int> left_;
  std::function<void(std::exception_ptr)> done_;
  std::function<void()> ok_;
  std::mutex mu_;
  absl::Status first_error_;
};

// Runs functions after a delay, on a thread of its own (calls made again
// after a failover). Destroyed by one of its own functions, it lets its
// thread finish alone.
class Timer {
 public:
  Timer() : state_(std::make_shared<State>()) {
    thread_ = std::thread([st = state_] { Loop(*st); });
  }
  ~Timer() {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->stop = true;
    }
    state_->cv.notify_all();
    if (thread_.get_id() == std::this_thread::get_id()) {
      thread_.detach();
    } else {
      thread_.join();
    }
  }
  void After(absl::Duration delay, std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->due.emplace(absl::Now() + delay, std::move(fn));
    }
    state_->cv.notify_all();
  }

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::multimap<absl::Time, std::function<void()>> due;  // guarded by mu
    bool stop = false;                                     // guarded by mu
  };
  static void Loop(State& st) {
    std::unique_lock<std::mutex> lock(st.mu);
    while (!st.stop) {
      if (st.due.empty()) {
        st.cv.wait(lock);
        continue;
      }
      const absl::Duration wait = st.due.begin()->first - absl::Now();
      if (wait > absl::ZeroDuration()) {
        st.cv.wait_for(lock, absl::ToChronoNanoseconds(wait));
        continue;
      }
      std::function<void()> fn = std::move(st.due.begin()->second);
      st.due.erase(st.due.begin());
      lock.unlock();
      fn();
      fn = nullptr;  // what it holds goes before the lock is taken again
      lock.lock();
    }
  }

  std::shared_ptr<State> state_;
  std::thread thread_;
};

// A push to send again to a server that may not hold it (replicas 2).
struct Resend {
  int key;  // the server's key
  grpc::ByteBuffer request;
  std::function<void(int server)> recorded;  // the server answered it
};

// A data call that survives a failover (Conn::CallHeld).
struct Held {
  std::vector<KeyPart> parts;  // the slices it carries, all held by one server
  std::string method;
  // The request, for each attempt, to the server that attempt goes to.
  std::function<grpc::ByteBuffer(int server)> encode;
  // The pushes `server` may lack that must precede this call there.
  std::function<std::vector<Resend>(int server)> resends;
  // The outcome, and the server that gave it.
  std::function<void(grpc::Status, const grpc::ByteBuffer&, int server)> done;
  std::string trace_args;
  // Where the answer's value goes, read there straight from a stream
  // connection (rpc::AnswerPlacement; Received checks it); none: copied.
  rpc::AnswerPlacement placement;
  absl::Time deadline;
  // An attempt failed: later ones give up after rpc::kKeepalive when their
  // connection is not up (one that cannot connect would otherwise wait for
  // gRPC's 20 s connect deadline, unreported).
  bool retrying = false;
};

const std::string kPushMethod = "/mx.proto.KVStoreService/Push";
const std::string kPullMethod = "/mx.proto.KVStoreService/Pull";
const std::string kPushPullMethod = "/mx.proto.KVStoreService/PushPull";
const std::string kPushPullManyMethod = "/mx.proto.KVStoreService/PushPullMany";

// Shared memory with one server (DistKVStoreOptions::shm_dir): a segment
// it mapped, as number `id`, and the ranges calls hold. Each range starts
// with a release word (ShmRange.release): 1 while the server may read a
// push's value there, which it keeps where it lies until summed; a range
// whose call has ended waits for 0 before it is reused.
struct ShmLink {
  static constexpr size_t kHeader = 64;  // the release word, then the data

  std::unique_ptr<rpc::SharedSegment> segment;
  std::unique_ptr<rpc::RangeAllocator> ranges;
  int id = 0;

  std::atomic<uint32_t>* ReleaseWord(size_t offset) const {
    return reinterpret_cast<std::atomic<uint32_t>*>(segment->data() + offset);
  }
  // A range for `bytes` of data (and its header), backed by memory, or
  // nullopt (no room, or the filesystem is full).
  std::optional<size_t> Allocate(size_t bytes) {
    Reclaim();
    std::optional<size_t> offset = ranges->Allocate(kHeader + bytes);
    if (!offset.has_value()) return std::nullopt;
    if (!segment->Commit(*offset + kHeader + bytes).ok()) {
      ranges->Free(*offset);
      return std::nullopt;
    }
    ReleaseWord(*offset)->store(0, std::memory_order_relaxed);
    return offset;
  }
  // The range's call has ended: free now, or once the server releases it.
  void Release(size_t offset) {
    if (ReleaseWord(offset)->load(std::memory_order_acquire) == 0) return ranges->Free(offset);
    std::lock_guard<std::mutex> lock(mu);
    held.push_back(offset);
  }

 private:
  // Frees the held ranges the server has released.
  void Reclaim() {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = held.begin(); it != held.end();) {
      if (ReleaseWord(*it)->load(std::memory_order_acquire) != 0) {
        ++it;
        continue;
      }
      ranges->Free(*it);
      it = held.erase(it);
    }
  }
  std::mutex mu;
  std::vector<size_t> held;  // guarded by mu
};

// A range of a server's shared memory held by one call: its push's value,
// then the answer's. Free again once the call succeeded (and the server
// released the value); a failed call's server may still read or write it
// late, so its range is never reused.
struct ShmLease {
  std::shared_ptr<ShmLink> link;
  size_t offset = 0, bytes = 0;
  bool reusable = false;  // set when the call succeeded

  ~ShmLease() {
    if (reusable) link->Release(offset);
  }
  char* data() const { return link->segment->data() + offset + ShmLink::kHeader; }
  proto::ShmRange Range() const {
    proto::ShmRange r;
    r.set_segment(link->id);
    r.set_offset(static_cast<int64_t>(offset + ShmLink::kHeader));
    r.set_bytes(static_cast<int64_t>(bytes));
    return r;
  }
  // The range of a push's value, which the server may keep where it lies
  // until it sets the release word to 0.
  proto::ShmRange Held() const {
    link->ReleaseWord(offset)->store(1, std::memory_order_relaxed);  // the call publishes it
    proto::ShmRange r = Range();
    r.set_release(static_cast<int64_t>(offset));
    return r;
  }
};

// Values smaller than this travel in the call: the copy through shared
// memory saves less than nothing there.
constexpr size_t kShmMinBytes = 16 << 10;

struct Conn;

// The shared-memory ranges of one call, one per value it carries, taken
// afresh for each attempt on the server that attempt goes to (with
// replicas 2 a retry may go to the key's other copy). Attempts of a call
// follow one another; a failed attempt's ranges are dropped unreusable
// (ShmLease), the last one's are free again once it succeeded.
class CallLeases {
 public:
  static std::shared_ptr<CallLeases> For(const std::vector<KeyPart>& parts) {
    auto leases = std::make_shared<CallLeases>();
    for (const KeyPart& p : parts) leases->bytes_.push_back((p.end - p.begin) * sizeof(float));
    return leases;
  }
  void Take(const Conn& conn, int server);  // below Conn
  ShmLease* at(size_t i) const { return i < current_.size() ? current_[i].get() : nullptr; }
  // The last attempt succeeded: its ranges may be reused once released.
  void Succeeded() {
    for (const std::shared_ptr<ShmLease>& lease : current_) {
      if (lease != nullptr) lease->reusable = true;
    }
  }

 private:
  std::vector<size_t> bytes_;
  std::vector<std::shared_ptr<ShmLease>> current_;
};

// What operations in flight need: shared with them, so that they may
// outlive the store.
struct Conn : std::enable_shared_from_this<Conn> {
  DistKVStoreOptions options;
  // How pushes travel; set before the first push (SetGradientCompression).
  GradientCompression compression;
  rpc::Caller caller;  // stamped on every call but the data path's
  // The caller's claims as the data path's requests carry them.
  proto::Credential credential;
  // By server rank; replaced (ServerReplaced) under mu, so read them under it.
  std::vector<std::unique_ptr<proto::KVStoreService::Stub>> stubs;
  // Push and Pull go through raw byte buffers (EncodeTensorMessage), over
  // options.connections_per_server connections per server.
  std::vector<std::vector<std::unique_ptr<grpc::GenericStub>>> raw_stubs;
  std::vector<std::string> addresses;  // by rank; guarded by mu once serving
  // Stream endpoints by rank and connection (address "": gRPC), made where
  // addresses change, not per call (with TLS, StreamTargetFor looks the
  // process's TLS up); guarded by mu once serving.
  std::vector<std::vector<rpc::StreamTarget>> stream_targets;

  // The targets of a server whose stream address is `stream_address`, one
  // per connection.
  std::vector<rpc::StreamTarget> StreamTargets(const std::string& stream_address) const {
    std::vector<rpc::StreamTarget> targets;
    for (int c = 0; c < std::max(1, options.connections_per_server); ++c) {
      targets.push_back(rpc::StreamTargetFor(stream_address, c, options.security));
    }
    return targets;
  }

  // Set when the coordinator reports a dead node: later calls fail with it.
  absl::Status Failure() const {
    std::lock_guard<std::mutex> lock(mu);
    return failure;
  }
  // Also cancels the calls in flight, which then fail with `s`: a node that
  // hangs (stopped, partitioned) keeps its connections open, and calls to
  // it would otherwise wait for their deadline.
  void Fail(absl::Status s) {
    std::vector<std::pair<std::shared_ptr<Call>, std::shared_ptr<rpc::StreamCall>>> calls;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!failure.ok()) return;
      failure = std::move(s);
      for (const std::shared_ptr<Call>& call : in_flight) calls.push_back({call, call->stream});
      // Under the lock, which a control call's context outlives; a
      // blocking call runs no callback of ours when cancelled.
      for (const auto& [ctx, server] : control_calls) ctx->TryCancel();
    }
    // Not under it: a cancelled call's callback, which takes it, may run
    // inside TryCancel.
    for (const auto& [call, stream] : calls) call->Cancel(stream);
  }

  // Replicas 2: server s was declared dead. Its keys are held by their
  // backups from now on: its calls in flight are cancelled (and made again
  // there). If a neighbour of s in the ring died too, both copies of some
  // keys are gone: the store fails, saying so.
  void ServerDied(int s) {
    std::vector<std::pair<std::shared_ptr<Call>, std::shared_ptr<rpc::StreamCall>>> calls;
    absl::Status lost;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!dead_servers.insert(s).second) return;
      // Its segment goes once the leases in flight let go of it (the dead
      // server's mapping went with it: this worker's kept the pages).
      if (s < static_cast<int>(shm.size())) shm[s] = nullptr;
      const int n = static_cast<int>(options.servers.size());
      for (int other : {(s + n - 1) % n, (s + 1) % n}) {
        if (other == s || !dead_servers.count(other)) continue;
        lost = absl::UnavailableError(absl::StrCat(
            "servers ", std::min(s, other), " and ", std::max(s, other),
            " both died: the keys whose two copies they held are lost"));
      }
      for (const std::shared_ptr<Call>& call : in_flight) {
        if (call->server == s) calls.push_back({call, call->stream});
      }
      if (lost.ok()) {
        for (const auto& [ctx, server] : control_calls) {
          if (server == s) ctx->TryCancel();
        }
      }
    }
    if (!lost.ok()) return Fail(lost);
    for (const auto& [call, stream] : calls) call->Cancel(stream);
  }

  bool Dead(int server) const {
    std::lock_guard<std::mutex> lock(mu);
    return dead_servers.count(server) > 0;
  }

  // The incarnation of server rank s: how many spares had taken ranks
  // when the last one took s (0: the first server).
  int64_t Since(int server) const {
    std::lock_guard<std::mutex> lock(mu);
    return SinceLocked(server);
  }

  // Replicas 2: whether `server` in `incarnation` (Since, read before the
  // call), a call to which failed with s, is (or within the store's
  // deadline becomes) declared dead, or was replaced by a spare; it is
  // reported to the coordinator meanwhile. False at once for an error that
  // is no sign of a server's death. Blocks: for control calls.
  // A replaced server is gone as a dead one is: reporting its rank would
  // report the spare that took it (which a hung server's cancelled call,
  // reporting for 5 s, had the coordinator declare dead, "a network
  // partition").
  bool DiedAfter(int server, int64_t incarnation, const absl::Status& s) {
    if (options.replicas < 2 || (s.code() != absl::StatusCode::kUnavailable &&
                                 s.code() != absl::StatusCode::kCancelled &&
                                 s.code() != absl::StatusCode::kDeadlineExceeded)) {
      return false;
    }
    auto gone = [&] { return Dead(server) || Since(server) != incarnation; };
    const absl::Time deadline = absl::Now() + options.rpc_timeout;
    while (!gone() && Failure().ok() && absl::Now() < deadline) {
      if (std::function<void(int)> report = ReporterFor(server)) report(server);
      absl::SleepFor(absl::Milliseconds(100));
    }
    return gone();
  }

  // The server that holds part p now: of its live copies (its primary and
  // backup, or the spares that took their ranks) the one that has held it
  // longest: the primary, or once that died, its backup (which took it
  // over), even after a spare took the primary's rank (the spare is the
  // backup now).
  absl::StatusOr<int> HolderOf(const KeyPart& p) const {
    std::lock_guard<std::mutex> lock(mu);
    std::optional<int> holder;
    for (int server : {p.server, p.backup}) {
      if (server < 0 || dead_servers.count(server)) continue;
      if (!holder.has_value() || SinceLocked(server) < SinceLocked(*holder)) holder = server;
    }
    if (holder.has_value()) return *holder;
    return absl::UnavailableError(absl::StrCat("server ", p.server, " (", addresses[p.server],
                                               ") died, and no other server holds its keys"));
  }
  // The other live copy of part p than its holder, -1 if none.
  int OtherCopyOf(const KeyPart& p, int holder) const {
    std::lock_guard<std::mutex> lock(mu);
    for (int server : {p.server, p.backup}) {
      if (server >= 0 && server != holder && !dead_servers.count(server)) return server;
    }
    return -1;
  }

  // Replicas 2: a spare at `address` (streams at `stream_address`) took
  // the rank of `s`, declared dead before: calls for s go there from now
  // on, where it holds copies of the keys that lost theirs (after those
  // that held them alone).
  void ServerReplaced(int s, const std::string& address, const std::string& stream_address) {
    std::lock_guard<std::mutex> lock(mu);
    stream_targets[s] = StreamTargets(stream_address);
    dead_servers.erase(s);
    // The spare never got this worker's segment: its values go by TCP.
    if (s < static_cast<int>(shm.size())) shm[s] = nullptr;
    since[s] = ++replacements;
    // Calls in flight may hold the old stubs: they stay until the store goes.
    retired.push_back(std::move(stubs[s]));
    for (auto& raw : raw_stubs[s]) retired_raw.push_back(std::move(raw));
    DialLocked(s, address);
  }

  // Points the stubs of server s at `address` (growing the vectors for a
  // new s); returns the channels they use.
  std::vector<std::shared_ptr<grpc::Channel>> DialLocked(size_t s, const std::string& address) {
    if (s >= addresses.size()) {
      addresses.resize(s + 1);
      stubs.resize(s + 1);
      raw_stubs.resize(s + 1);
    }
    addresses[s] = address;
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    raw_stubs[s].clear();
    for (int c = 0; c < std::max(1, options.connections_per_server); ++c) {
      channels.push_back(rpc::SharedChannel(address, options.security, c));
      raw_stubs[s].push_back(std::make_unique<grpc::GenericStub>(channels.back()));
    }
    stubs[s] = proto::KVStoreService::NewStub(channels[0]);  // connection 0's, as before
    return channels;
  }
  // Where server s is now.
  std::string Address(int s) const {
    std::lock_guard<std::mutex> lock(mu);
    return addresses[s];
  }

  // Makes call h on the server that holds its parts now, after the
  // pushes that server may lack (h->resends); h->done gets the outcome.
  // With replicas 2, an attempt that fails UNAVAILABLE or CANCELLED (a
  // server that died, hangs, or does not serve the keys yet) is made again
  // 100 ms later, on whichever server holds the parts then, until
  // h->deadline; a server that did not answer is reported to the
  // coordinator, which checks it and declares it dead if it does not
  // answer either.
  void CallHeld(const std::shared_ptr<Held>& h) {
    absl::StatusOr<int> server = HolderOf(h->parts[0]);
    if (!server.ok()) return h->done(ToGrpc(server.status()), grpc::ByteBuffer(), h->parts[0].server);
    auto resends = std::make_shared<std::vector<Resend>>();
    if (h->resends) *resends = h->resends(*server);
    Attempt(h, *server, resends, 0);
  }

  // CallHeld within the store's deadline, traced with (server key,
  // version) pairs.
  void Send(const std::shared_ptr<Held>& h, const std::vector<std::pair<int, int64_t>>& traced) {
    h->trace_args = TraceKeys(traced);
    h->deadline = absl::Now() + options.rpc_timeout;
    CallHeld(h);
  }

  // A control call (init, set_optimizer, the optimizer's states) of `what`
  // for `key` to `server`, made by call(ctx, stub) with the store's deadline
  // and this worker's claims. Like the data path's calls it is cancelled
  // once the store has a failure (Fail), and then fails with that: a
  // worker waiting on a server that hangs learns of its death from the
  // coordinator at once, not after the deadline.
  absl::Status Control(
      int server, const char* what, const std::string& key,
      const std::function<grpc::Status(grpc::ClientContext*, proto::KVStoreService::Stub*)>& call) {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!failure.ok()) return failure;
      control_calls[&ctx] = server;
    }
    proto::KVStoreService::Stub* stub;
    {
      std::lock_guard<std::mutex> lock(mu);
      stub = stubs[server].get();
    }
    const grpc::Status s = call(&ctx, stub);
    {
      std::lock_guard<std::mutex> lock(mu);
      control_calls.erase(&ctx);
      if (!s.ok() && !failure.ok()) return failure;
    }
    return Named(FromGrpc(s), what, key, server);
  }

  // Starts a call of `method` on `server` through the raw stub, with the
  // store's deadline; `done` receives the status and the response: the
  // store's failure instead of any error once it has one. `key` (the key
  // the server holds) picks the connection: one key's calls keep their
  // order, and the slices of a big key on one server take its connections
  // in turn (keys by bits of their hash that the choice of server did not
  // use).
  // `unconnected_deadline` (when not zero): the call's deadline instead,
  // if its connection is not up.
  // `placement`: where the answer's value may be read straight to, on a
  // stream connection (rpc/stream.h).
  // `incarnation` (when not -1): the server's (SinceLocked) that the
  // request was made for. If a spare has taken the rank since, the call
  // fails ABORTED unsent, and RetryLater makes it again for the spare: the
  // request may refer to shared memory the spare never got (chaos.py saw
  // a job fail so: "worker 1 attached no shared memory segment 1 here").
  void CallRaw(int server, int key, const std::string& method, grpc::ByteBuffer request,
               std::function<void(grpc::Status, const grpc::ByteBuffer&)> done,
               const std::string& trace_args = "",
               absl::Duration unconnected_deadline = absl::ZeroDuration(),
               rpc::AnswerPlacement placement = {}, int64_t incarnation = -1) {
    auto call = std::make_shared<Call>();
    call->server = server;
    if (trace::Enabled()) {
      // The call's span on the job's timeline: the keys (and the versions
      // it waits for) that the caller gave, the server and the bytes sent.
      done = [done = std::move(done), start = trace::NowMicros(), method, server,
              args = absl::StrCat(trace_args, trace_args.empty() ? "" : ",", "\"server\":", server,
                                  ",\"bytes\":", request.Length())](
                 grpc::Status s, const grpc::ByteBuffer& resp) {
        trace::Complete("kvstore", method.substr(method.rfind('/') + 1), start,
                        trace::NowMicros(), args);
        done(s, resp);
      };
    }
    absl::Status failed;
    {
      std::lock_guard<std::mutex> lock(mu);
      failed = failure;
      if (failed.ok() && incarnation >= 0 && SinceLocked(server) != incarnation) {
        failed = absl::AbortedError(absl::StrCat("a spare took the rank of server ", server,
                                                 " after the request was made for it"));
      }
      if (failed.ok()) {
        in_flight.insert(call);
        InFlightGauge()->Add(1);
      }
    }
    if (!failed.ok()) {  // no call
      done(ToGrpc(failed), call->resp);
      return;
    }
    absl::Time deadline = absl::Now() + options.rpc_timeout;
    call->req = std::move(request);
    grpc::GenericStub* stub;
    std::string address;
    rpc::StreamTarget stream;
    size_t connection;
    {
      std::lock_guard<std::mutex> lock(mu);
      const auto& stubs = raw_stubs[server];
      const size_t servers = raw_stubs.size();
      // Slices are dealt round-robin: this server's are SliceOf = s, s +
      // servers, s + 2 * servers, ...
      const size_t turn = KeyHash(BaseKey(key)) / servers + SliceOf(key) / servers;
      connection = turn % stubs.size();
      stub = stubs[connection].get();
      address = addresses[server];
      stream = stream_targets[server][connection];
    }
    if (unconnected_deadline > absl::ZeroDuration() &&
        !(stream.address.empty()
              ? rpc::SharedChannel(address, options.security, static_cast<int>(connection))
                        ->GetState(/*try_to_connect=*/true) == GRPC_CHANNEL_READY
              : rpc::StreamConnected(stream))) {
      deadline = absl::Now() + unconnected_deadline;
    }
    auto finished = [self = shared_from_this(), call, done = std::move(done)](grpc::Status s) {
      absl::Status failed;
      {
        std::lock_guard<std::mutex> lock(self->mu);
        if (self->in_flight.erase(call) > 0) InFlightGauge()->Add(-1);
        failed = self->failure;
      }
      done(s.ok() || failed.ok() ? s : ToGrpc(failed), call->resp);
    };
    if (stream.address.empty()) {
      call->ctx.set_deadline(absl::ToChronoTime(deadline));  // the credential is in the request
      rpc::StartUnaryCall(stub, &call->ctx, method, call->req, &call->resp, std::move(finished));
      return;
    }
    std::shared_ptr<rpc::StreamCall> handle = rpc::StartStreamCall(
        stream, method, call->req, &call->resp, deadline, std::move(finished), placement);
    bool cancel;
    {
      std::lock_guard<std::mutex> lock(mu);
      call->stream = handle;
      // Failed, or its server declared dead, since it was counted in flight:
      // Fail and ServerDied did not see the handle.
      cancel = !failure.ok() || dead_servers.count(call->server) > 0;
    }
    if (cancel) handle->Cancel();
  }

  // Sets what reports a server that does not answer (the coordinator).
  void SetReporter(std::function<void(int server)> report) {
    std::lock_guard<std::mutex> lock(mu);
    reporter = std::move(report);
  }

  // Gives a call the store's deadline and this worker's token and identity.
  void Prepare(grpc::ClientContext* ctx) const {
    SetDeadline(ctx);
    caller.Stamp(ctx);
  }
  void SetDeadline(grpc::ClientContext* ctx) const {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      absl::ToChronoMilliseconds(options.rpc_timeout));
  }
  absl::Status Named(absl::Status s, const char* what, const std::string& key, int server) const {
    if (s.ok()) return s;
    std::string why(s.message());
    // gRPC's own deadline (a server's answers say what they waited for):
    // the call went unanswered, which names both ends of what failed.
    const std::string both_ends = absl::StrCat("server ", server, " hangs, or the network between "
                                               "worker ", options.rank, " and server ", server,
                                               " is broken");
    if (absl::IsDeadlineExceeded(s) && why == "Deadline Exceeded") {
      why = absl::StrCat("no answer within ", absl::FormatDuration(options.rpc_timeout),
                         " (MX_RPC_TIMEOUT_S): ", both_ends);
    } else if (absl::IsUnavailable(s) &&
               (absl::StrContains(why, "keepalive") || absl::StrContains(why, "timed out"))) {
      // Keepalive pings unanswered (gRPC, or the kernel's TCP_USER_TIMEOUT
      // it sets: "recvmsg:Connection timed out").
      why = absl::StrCat("the connection stopped answering (", why, "): ", both_ends);
    }
    return absl::Status(s.code(), absl::StrCat(what, " of key ", key, " on server ", server, " (",
                                               Address(server), "): ", why));
  }

 private:
  struct Call {
    int server;
    grpc::ClientContext ctx;  // a gRPC call's
    grpc::ByteBuffer req, resp;
    std::shared_ptr<rpc::StreamCall> stream;  // a stream call's, set under mu once started

    // Ends the call CANCELLED; `stream` read under mu.
    void Cancel(const std::shared_ptr<rpc::StreamCall>& s) {
      if (s != nullptr) {
        s->Cancel();
      } else {
        ctx.TryCancel();
      }
    }
  };

  // Sends resends[i...], then h's request, to `server`.
  void Attempt(const std::shared_ptr<Held>& h, int server,
               const std::shared_ptr<std::vector<Resend>>& resends, size_t i) {
    auto self = shared_from_this();
    if (i < resends->size()) {
      const Resend& r = (*resends)[i];
      CallRaw(server, r.key, kPushMethod, r.request,
              [self, h, server, resends, i](grpc::Status s, const grpc::ByteBuffer& resp) {
                if (!s.ok()) {
                  if (!self->RetryLater(h, server, s)) h->done(s, resp, server);
                  return;
                }
                (*resends)[i].recorded(server);
                self->Attempt(h, server, resends, i + 1);
              },
              "", h->retrying ? rpc::kKeepalive : absl::ZeroDuration());
      return;
    }
    // Read before the request takes its shared memory (ShmLease), for CallRaw.
    const int64_t incarnation = Since(server);
    CallRaw(
        server, h->parts[0].server_key, h->method, h->encode(server),
        [self, h, server](grpc::Status s, const grpc::ByteBuffer& resp) {
          if (!s.ok() && self->RetryLater(h, server, s)) return;
          h->done(s, resp, server);
        },
        h->trace_args, h->retrying ? rpc::kKeepalive : absl::ZeroDuration(), h->placement,
        incarnation);
  }

  // Whether call h, whose attempt on `server` failed with s, is made again
  // (see CallHeld); if so, schedules it.
  bool RetryLater(const std::shared_ptr<Held>& h, int server, const grpc::Status& s) {
    if (options.replicas < 2 || timer == nullptr) return false;
    // DEADLINE_EXCEEDED before h's deadline: a retry's short wait for a
    // connection (CallRaw's unconnected_deadline). ABORTED: CallRaw's, for
    // a request made for a server that a spare replaced (not unanswered).
    const bool replaced = s.error_code() == grpc::StatusCode::ABORTED;
    if (s.error_code() != grpc::StatusCode::UNAVAILABLE &&
        s.error_code() != grpc::StatusCode::CANCELLED && !replaced &&
        !(s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED && h->retrying)) {
      return false;
    }
    if (!Failure().ok() || absl::Now() >= h->deadline) return false;
    h->retrying = true;
    if (std::function<void(int)> report = replaced ? nullptr : ReporterFor(server)) {
      timer->After(absl::ZeroDuration(), [report, server] { report(server); });
    }
    auto self = shared_from_this();
    timer->After(absl::Milliseconds(100), [self, h] { self->CallHeld(h); });
    return true;
  }

  // What reports `server` to the coordinator, unless it is declared dead
  // or was reported in the last 500 ms (then nullptr): the rate of reports
  // of one server, from data and control calls alike.
  std::function<void(int)> ReporterFor(int server) {
    std::lock_guard<std::mutex> lock(mu);
    absl::Time& last = reported[server];
    if (dead_servers.count(server) || absl::Now() - last <= absl::Milliseconds(500)) return nullptr;
    last = absl::Now();
    return reporter;
  }

 public:
  std::unique_ptr<Timer> timer;  // replicas 2: retries
  // Shared memory with the servers on this host, by server rank (null:
  // none); guarded by mu (a spare that takes a rank has none).
  std::vector<std::shared_ptr<ShmLink>> shm;

  // A range of `bytes` of server s's shared memory for one call, or null
  // when the value travels in the call: no shared memory with s, a value
  // too small to gain, compression (which packs the value), or no room
  // now.
  // Server s's shared memory from now on (null: none).
  void SetShm(int s, std::shared_ptr<ShmLink> link) {
    std::lock_guard<std::mutex> lock(mu);
    shm.resize(options.servers.size());
    shm[s] = std::move(link);
  }

  std::shared_ptr<ShmLease> Lease(int s, size_t bytes) const {
    if (bytes < kShmMinBytes || compression.enabled()) return nullptr;
    std::shared_ptr<ShmLink> link;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (s < static_cast<int>(shm.size())) link = shm[s];
    }
    if (link == nullptr) return nullptr;
    std::optional<size_t> offset = link->Allocate(bytes);
    if (!offset.has_value()) return nullptr;
    auto lease = std::make_shared<ShmLease>();
    lease->link = link;
    lease->offset = *offset;
    lease->bytes = bytes;
    return lease;
  }

 private:
  mutable std::mutex mu;
  absl::Status failure;                           // guarded by mu
  std::set<std::shared_ptr<Call>> in_flight;      // guarded by mu
  std::map<grpc::ClientContext*, int> control_calls;  // to servers; guarded by mu
  std::set<int> dead_servers;                     // guarded by mu
  // Replicas 2: when each server rank's current process took it (0: at the
  // start; the count of replacements so far when a spare did).
  std::map<int, int64_t> since;                   // guarded by mu
  int64_t replacements = 0;                       // guarded by mu
  // The stubs of servers a spare replaced, which calls may still use.
  std::vector<std::unique_ptr<proto::KVStoreService::Stub>> retired;  // guarded by mu
  std::vector<std::unique_ptr<grpc::GenericStub>> retired_raw;        // guarded by mu
  int64_t SinceLocked(int server) const {
    auto it = since.find(server);
    return it == since.end() ? 0 : it->second;
  }
  std::map<int, absl::Time> reported;             // guarded by mu: when, by server
  std::function<void(int)> reporter;              // guarded by mu
};

void CallLeases::Take(const Conn& conn, int server) {
  current_.clear();  // a failed attempt's: dropped unreusable
  for (size_t bytes : bytes_) current_.push_back(conn.Lease(server, bytes));
}

class DistKVStore : public KVStore {
 public:
  explicit DistKVStore(const DistKVStoreOptions& options)
      : KVStore(TypeOf(options)), conn_(std::make_shared<Conn>()) {
    conn_->options = options;
    conn_->caller.token = options.security.token;
    if (!options.session_key.empty()) {
      conn_->caller.rank = options.rank;
      conn_->caller.key = options.session_key;
    }
    const rpc::Claims claims = conn_->caller.claims();
    conn_->credential.set_token(claims.token);
    conn_->credential.set_node(claims.node);
    if (options.replicas > 1) conn_->timer = std::make_unique<Timer>();
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (size_t s = 0; s < options.servers.size(); ++s) {
      conn_->stream_targets.push_back(conn_->StreamTargets(
          s < options.stream_addresses.size() ? options.stream_addresses[s] : ""));
      for (auto& channel : conn_->DialLocked(s, options.servers[s])) channels.push_back(channel);
    }
    // The process's channels may have failed to reach these addresses
    // before (see rpc::Reconnect); a second is more than a connection takes.
    rpc::Reconnect(channels, absl::Now() + std::min(options.rpc_timeout, absl::Seconds(1)));
  }

  // Hands each server a segment of shared memory (DistKVStoreOptions::
  // shm_dir); a server that cannot take it (another host, no --shm_dir)
  // gets values over the network, which this says once per server.
  void AttachSharedMemory() {
    const DistKVStoreOptions& o = conn_->options;
    if (o.shm_dir.empty()) return;
    for (int s = 0; s < static_cast<int>(conn_->stubs.size()) && conn_->Failure().ok(); ++s) {
      const absl::Status st = AttachSegment(s);
      if (!st.ok() && conn_->Failure().ok()) {
        std::cerr << "worker " << o.rank << ": no shared memory with server " << s << " ("
                  << conn_->Address(s) << "): " << st.message() << "; values go over the network"
                  << std::endl;
      }
    }
  }

  ~DistKVStore() override {
    conn_->SetReporter(nullptr);
    if (coordinator_ != nullptr) coordinator_->StopHeartbeats();
  }

  // Leaves the job: waits for this worker's operations, stops heartbeats
  // and tells the coordinator, which then neither declares this worker dead
  // nor waits for it at barriers.
  absl::Status Finish() override {
    if (coordinator_ == nullptr) return absl::OkStatus();
    // A failed operation's error (rethrown by the engine) is the answer.
    MX_RETURN_IF_ERROR(CatchError([] { WaitAll(); }));
    coordinator_->StopHeartbeats();
    MX_RETURN_IF_ERROR(coordinator_->Leave());
    // The coordinator has seen this worker finish; a launcher reads this
    // line (deploy/launch.py job_ran): the job ran even if the coordinator
    // dies before it tells the servers.
    std::cerr << "worker " << conn_->options.rank << ": left the job" << std::endl;
    return absl::OkStatus();
  }

  // Joins the cluster through the coordinator: heartbeats every second.
  void AttachCoordinator(std::unique_ptr<rpc::CoordinatorClient> coordinator) {
    coordinator_ = std::move(coordinator);
    conn_->SetReporter([c = std::weak_ptr<rpc::CoordinatorClient>(coordinator_)](int server) {
      if (auto client = c.lock()) client->ReportUnreachable(server);
    });
    coordinator_->StartHeartbeats(
        [this](const proto::HeartbeatResponse& resp) { HeardOfDeaths(resp); },
        [conn = conn_](const absl::Status& why) { conn->Fail(why); });
  }

  int rank() const override { return conn_->options.rank; }
  // Elastic: asks the coordinator now (a heartbeat) rather than waiting
  // for the next one. The servers go on without a worker only once the
  // coordinator has declared it dead, so a step completed without it is
  // never followed by an answer that still counts it alive.
  int first_live_rank() override {
    if (coordinator_ == nullptr || !conn_->options.elastic) return 0;
    coordinator_->HeartbeatNow();
    std::lock_guard<std::mutex> lock(dead_mu_);
    int rank = 0;
    while (dead_workers_.count(rank)) ++rank;
    return rank;
  }
  int64_t bucket_bytes() const override { return conn_->options.bucket_bytes; }
  int num_workers() const override { return conn_->options.num_workers; }

  // Servers hold slices of big keys under key + s * 2^24: a key that high
  // would share a server key with a slice of a lower one.
  static absl::Status CheckKeyId(const Key& key) {
    if (key.id() < (1 << kSliceKeyShift)) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "init of key ", key.label(), ": the distributed stores take keys below ",
        1 << kSliceKeyShift, " (those above name slices of big keys on the servers)"));
  }

  absl::Status Init(Key key, const NDArray& value) override {
    if (value.is_none()) return absl::InvalidArgumentError(absl::StrCat("init of key ", key.label(), ": null array"));
    MX_RETURN_IF_ERROR(CheckKeyId(key));
    auto it = keys_.find(key.id());
    if (it != keys_.end()) {
      return internal::CheckReinit(key, it->second->table, it->second->shape, false,
                                   value.shape());
    }
    std::shared_ptr<Entry> entry;
    std::vector<float> data;
    MX_RETURN_IF_ERROR(CatchError([&] {
      data = value.ToVector();
      entry = NewEntry(key, value.shape());
    }));
    Entry& e = *entry;
    e.parts = Partition(key.id(), value.size());
    for (const KeyPart& p : e.parts) {
      proto::InitRequest req = JobInit(p.server_key);
      ToProto(data.data() + p.begin, Shape{p.end - p.begin}, req.mutable_value());
      MX_RETURN_IF_ERROR(InitCopies(p, std::move(req), e.label));
    }
    keys_.emplace(key.id(), std::move(entry));
    return absl::OkStatus();
  }

  // Inits part p (req holds its value or range) on each of its copies: one
  // server, or with replicas 2 the copies as they are now: after a failover
  // (and a spare) the holder is the primary; a server holding a copy that
  // died takes the key alone (and a spare that takes that rank gets a copy).
  absl::Status InitCopies(const KeyPart& p, proto::InitRequest req, const std::string& label) {
    if (p.backup >= 0) {
      absl::StatusOr<int> holder = conn_->HolderOf(p);
      const int primary = holder.ok() ? *holder : p.server;
      req.set_primary(primary);
      req.set_backup(primary == p.server ? p.backup : p.server);
    }
    proto::InitResponse resp;
    return ToEveryCopy(p, "init", label, [&](auto* ctx, auto* stub) {
      return stub->Init(ctx, req, &resp);
    });
  }

  // A control call of `what` for key `label` to every live copy of part
  // p; with replicas 2 a copy whose server died is left out (the other
  // holds the key alone). Fails if no copy took it.
  absl::Status ToEveryCopy(
      const KeyPart& p, const char* what, const std::string& label,
      const std::function<grpc::Status(grpc::ClientContext*, proto::KVStoreService::Stub*)>& call) {
    absl::Status first_error;
    int copies = 0;
    for (int server : {p.server, p.backup}) {
      if (server < 0 || conn_->Dead(server)) continue;
      const int64_t incarnation = conn_->Since(server);
      absl::Status s = conn_->Control(server, what, label, call);
      if (s.ok()) {
        ++copies;
      } else if (!conn_->DiedAfter(server, incarnation, s)) {
        return s;
      } else if (first_error.ok()) {
        first_error = s;
      }
    }
    if (copies > 0) return absl::OkStatus();
    return first_error.ok() ? absl::UnavailableError(absl::StrCat(
                                  what, " of key ", label, ": both servers of its copies died"))
                            : first_error;
  }

  absl::Status Push(Key key, const std::vector<NDArray>& values, int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "push"));
    MX_RETURN_IF_ERROR(internal::CheckArrays(key, "push", "value", values, e->shape));
    return CatchError([&] {
      NDArray merged = Merge(*e, values, priority);
      const int64_t seq = ++e->pushes;
      Engine::Get()->PushAsync(
          [conn = conn_, e, merged, seq](RunContext, CallbackOnComplete done) {
            // Answered at once, before its step is replicated.
            const PushSource source =
                KeptUntilReplicated(*conn, *e, seq, 0, SourceOf(*conn, *e, merged), merged.size());
            const float* base = source.data;
            std::shared_ptr<const void> owner = source.owner;
            auto* join = new Join(static_cast<int>(e->parts.size()), done);
            for (const KeyPart& p : e->parts) {
              auto h = std::make_shared<Held>();
              h->parts = {p};
              h->method = kPushMethod;
              auto leases = CallLeases::For({p});
              h->encode = [conn, p, base, owner, seq, leases](int server) {
                leases->Take(*conn, server);
                return ToByteBuffer(EncodePush(*conn, p, base, owner, 0, seq, true, leases->at(0)));
              };
              h->resends = [conn, e, p, seq](int server) { return Resends(conn, e, p, seq - 1, server); };
              h->done = [conn, join, e, p, seq, leases](grpc::Status s, const grpc::ByteBuffer&,
                                                        int server) {
                if (s.ok()) Recorded(*e, seq, p.index, server);
                if (s.ok()) leases->Succeeded();
                join->Finish(conn->Named(FromGrpc(s), "push", e->label, server));
              };
              conn->Send(h, {{p.server_key, -1}});
            }
          },
          cpu(), {merged.var()}, {e->token.var()}, priority, e->push_name.c_str(),
          FnProperty::kInline);
    });
  }

  absl::Status Pull(Key key, const std::vector<NDArray>& outs, int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "pull"));
    MX_RETURN_IF_ERROR(internal::CheckArrays(key, "pull", "output", outs, e->shape));
    return CatchError([&] {
      const int64_t min_version = PullVersion(e->pushes);
      const Landing landing = LandingOf(*e, outs);
      const std::vector<float*>& dsts = landing.dsts;
      Engine::Get()->PushAsync(
          [conn = conn_, e, min_version, dsts](RunContext, CallbackOnComplete done) {
            auto* join = new Join(static_cast<int>(e->parts.size()), done,
                                  [e, min_version] { Acked(*e, min_version); });
            for (const KeyPart& p : e->parts) {
              auto h = std::make_shared<Held>();
              h->parts = {p};
              h->method = kPullMethod;
              h->placement = PlacementOf(p, dsts);
              auto leases = CallLeases::For({p});
              h->encode = [conn, p, min_version, leases](int server) {
                leases->Take(*conn, server);
                const ShmLease* lease = leases->at(0);
                proto::PullRequest header;
                header.set_key(p.server_key);
                header.set_min_version(min_version);
                header.set_rank(conn->options.rank);
                *header.mutable_credential() = conn->credential;
                if (lease != nullptr) *header.mutable_shm_reply() = lease->Range();
                return EncodeMessage(header);
              };
              h->resends = [conn, e, p, min_version](int server) {
                return Resends(conn, e, p, min_version, server);
              };
              h->done = [conn, join, e, dsts, p, leases](grpc::Status s, const grpc::ByteBuffer& resp,
                                                         int server) {
                if (s.ok()) leases->Succeeded();
                join->Finish(Received(*conn, *e, "pull", s, resp, On(p, server), dsts, leases->at(0)));
              };
              conn->Send(h, {{p.server_key, min_version}});
            }
          },
          cpu(), {e->token.var()}, landing.writes, priority, e->pull_name.c_str(),
          FnProperty::kInline);
      Spread(*e, landing, outs, priority);
    });
  }

  // One round trip per slice: the server answers the push with the value of
  // the step that includes it.
  absl::Status PushPull(Key key, const std::vector<NDArray>& values,
                        const std::vector<NDArray>& outs, int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "pushpull"));
    MX_RETURN_IF_ERROR(internal::CheckArrays(key, "pushpull", "value", values, e->shape));
    MX_RETURN_IF_ERROR(internal::CheckArrays(key, "pushpull", "output", outs, e->shape));
    return CatchError([&] {
      NDArray merged = Merge(*e, values, priority);
      const Landing landing = LandingOf(*e, outs);
      const int64_t seq = ++e->pushes;
      const int64_t min_version = PullVersion(seq);
      const std::vector<float*>& dsts = landing.dsts;
      std::vector<VarHandle> writes = landing.writes;
      writes.push_back(e->token.var());
      const std::vector<VarHandle> reads = ReadsBesides({merged}, writes);
      Engine::Get()->PushAsync(
          [conn = conn_, e, merged, seq, min_version, dsts](RunContext, CallbackOnComplete done) {
            auto* join = new Join(static_cast<int>(e->parts.size()), done,
                                  [e, min_version] { Acked(*e, min_version); });
            const PushSource source = KeptUntilReplicated(
                *conn, *e, seq, min_version, SourceOf(*conn, *e, merged), merged.size());
            for (const KeyPart& p : e->parts) {
              auto h = std::make_shared<Held>();
              h->parts = {p};
              h->method = kPushPullMethod;
              // Not into the pushed array (pushpull in place): an answer
              // cut off midway would leave a retry of the push half
              // overwritten.
              if (!Overlaps(source.data, merged.size(), dsts[0], merged.size())) {
                h->placement = PlacementOf(p, dsts);
              }
              auto leases = CallLeases::For({p});
              h->encode = [conn, p, source, min_version, seq, leases](int server) {
                leases->Take(*conn, server);
                return ToByteBuffer(EncodePush(*conn, p, source.data, source.owner, min_version,
                                               seq, true, leases->at(0)));
              };
              h->resends = [conn, e, p, seq](int server) { return Resends(conn, e, p, seq - 1, server); };
              h->done = [conn, join, e, dsts, p, seq, leases](
                            grpc::Status s, const grpc::ByteBuffer& resp, int server) {
                if (s.ok()) Recorded(*e, seq, p.index, server);
                if (s.ok()) leases->Succeeded();
                join->Finish(
                    Received(*conn, *e, "pushpull", s, resp, On(p, server), dsts, leases->at(0)));
              };
              conn->Send(h, {{p.server_key, min_version}});
            }
          },
          cpu(), reads, writes, priority, e->pushpull_name.c_str(), FnProperty::kInline);
      Spread(*e, landing, outs, priority);
    });
  }

  // Several keys in one engine operation, one call per server: a bucket of
  // a training step's gradients pays one round trip, not one per key.
  absl::Status PushPull(const std::vector<Key>& keys, const std::vector<std::vector<NDArray>>& values,
                        const std::vector<std::vector<NDArray>>& outs, int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_RETURN_IF_ERROR(internal::CheckBucket(keys, values, outs));
    if (keys.empty()) return absl::OkStatus();  // no operation, which would wait for no call
    std::vector<std::shared_ptr<Entry>> entries;
    for (size_t i = 0; i < keys.size(); ++i) {
      MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(keys[i], "pushpull"));
      MX_RETURN_IF_ERROR(internal::CheckArrays(keys[i], "pushpull", "value", values[i], e->shape));
      MX_RETURN_IF_ERROR(internal::CheckArrays(keys[i], "pushpull", "output", outs[i], e->shape));
      entries.push_back(std::move(e));
    }
    return CatchError([&] {
      std::vector<Item> items;
      std::vector<Landing> landings;
      std::vector<VarHandle> writes, reads;
      std::map<int, std::vector<ItemPart>> by_server;
      std::vector<NDArray> merged;
      for (size_t i = 0; i < entries.size(); ++i) {
        merged.push_back(Merge(*entries[i], values[i], priority));
        landings.push_back(LandingOf(*entries[i], outs[i]));
      }
      // Counted once every key's arrays exist (see Merge).
      for (size_t i = 0; i < entries.size(); ++i) {
        Entry& e = *entries[i];
        const int64_t seq = ++e.pushes;
        items.push_back({entries[i], merged[i], seq, PullVersion(seq), landings[i].dsts});
        writes.insert(writes.end(), landings[i].writes.begin(), landings[i].writes.end());
        writes.push_back(e.token.var());
        for (const KeyPart& p : e.parts) by_server[p.server].push_back({i, p});
      }
      std::vector<NDArray> pushed;
      for (const Item& item : items) pushed.push_back(item.merged);
      reads = ReadsBesides(pushed, writes);
      Engine::Get()->PushAsync(
          [conn = conn_, items, by_server](RunContext, CallbackOnComplete done) {
            auto* join = new Join(static_cast<int>(by_server.size()), done, [items] {
              for (const Item& item : items) Acked(*item.e, item.min_version);
            });
            auto sources = std::make_shared<std::vector<PushSource>>();
            for (const Item& item : items) {
              sources->push_back(KeptUntilReplicated(*conn, *item.e, item.seq, item.min_version,
                                                     SourceOf(*conn, *item.e, item.merged),
                                                     item.merged.size()));
            }
            for (const auto& [server, parts] : by_server) {
              std::vector<std::pair<int, int64_t>> traced;
              for (const ItemPart& ip : parts) {
                traced.push_back({ip.part.server_key, items[ip.item].min_version});
              }
              auto h = std::make_shared<Held>();
              for (const ItemPart& ip : parts) h->parts.push_back(ip.part);
              h->method = kPushPullManyMethod;
              std::vector<KeyPart> carried;
              for (const ItemPart& ip : parts) carried.push_back(ip.part);
              auto leases = CallLeases::For(carried);
              h->encode = [conn, items, sources, leases, parts = parts](int server) {
                leases->Take(*conn, server);
                std::vector<EncodedMessage> messages;
                for (size_t j = 0; j < parts.size(); ++j) {
                  const ItemPart& ip = parts[j];
                  const Item& item = items[ip.item];
                  const PushSource& source = (*sources)[ip.item];
                  messages.push_back(EncodePush(*conn, ip.part, source.data, source.owner,
                                                item.min_version, item.seq,
                                                /*with_credential=*/false, leases->at(j)));
                }
                proto::PushPullManyRequest rest;
                *rest.mutable_credential() = conn->credential;
                return EncodeRepeated(kManyEntriesField, messages, &rest);
              };
              h->resends = [conn, items, parts = parts](int server) {
                return BucketResends(conn, items, parts, server);
              };
              h->done = [conn, join, items, leases, parts = parts](
                            grpc::Status s, const grpc::ByteBuffer& resp, int server) {
                if (s.ok()) {
                  leases->Succeeded();
                  for (const ItemPart& ip : parts) {
                    Recorded(*items[ip.item].e, items[ip.item].seq, ip.part.index, server);
                  }
                }
                join->Finish(ReceivedMany(*conn, items, parts, s, resp, server, *leases));
              };
              conn->Send(h, traced);
            }
          },
          cpu(), reads, writes, priority, "dist_pushpull_bucket", FnProperty::kInline);
      for (size_t i = 0; i < entries.size(); ++i) {
        Spread(*entries[i], landings[i], outs[i], priority);
      }
    });
  }

  // ---- Row-sparse keys: tables split by row ranges over every server
  // (PlaceTable); each server creates and updates its range. Pushes carry
  // only the rows touched (every server of the table gets one per step, its
  // vote, with no rows if none of its range was touched); pulls ask each
  // server for the wanted rows of its range only.

  absl::Status InitRowSparse(Key key, const Shape& shape, const TableInit& init) override {
    MX_RETURN_IF_ERROR(CheckKeyId(key));
    MX_RETURN_IF_ERROR(internal::CheckTable(key, shape, init));
    if (auto it = keys_.find(key.id()); it != keys_.end()) {
      return internal::CheckReinit(key, it->second->table, it->second->shape, true, shape);
    }
    const int servers = static_cast<int>(conn_->stubs.size());
    if (conn_->options.replicas > 1 && !CanSliceKey(key.id(), servers)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "init of key ", key.label(), ": with replicas 2 a table spreads over at most ",
          kMaxSliceKeySlices, " servers, this job has ", servers));
    }
    auto entry = NewEntry(key, shape);
    entry->table = true;
    entry->parts = PlaceTable(key.id(), shape[0], servers, conn_->options.replicas);
    for (const KeyPart& p : entry->parts) {
      proto::InitRequest req = JobInit(p.server_key);
      proto::TableRange* t = req.mutable_table();
      for (int64_t d : shape) t->add_shape(d);
      t->set_first_row(p.begin);
      t->set_rows(p.end - p.begin);
      t->set_init_scale(init.scale);
      t->set_init_seed(init.seed);
      MX_RETURN_IF_ERROR(InitCopies(p, std::move(req), entry->label));
    }
    keys_.emplace(key.id(), std::move(entry));
    return absl::OkStatus();
  }

  absl::Status PushRowSparse(Key key, const std::vector<RowSparseNDArray>& values,
                             int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "row-sparse push", true));
    MX_RETURN_IF_ERROR(internal::CheckRowSparseValues(key, values, e->shape));
    return CatchError([&] {
      const RowSparseNDArray merged = internal::SumRowSparse(values);
      const int64_t seq = ++e->pushes;
      Engine::Get()->PushAsync(
          [conn = conn_, e, merged, seq](RunContext, CallbackOnComplete done) {
            auto* join = new Join(static_cast<int>(e->parts.size()), done);
            const PushedRows rows = RowsToPush(*conn, *e, seq, merged);
            for (const KeyPart& p : e->parts) {
              auto h = std::make_shared<Held>();
              h->parts = {p};
              h->method = kPushMethod;
              h->encode = [conn, e, p, rows, seq](int) {
                return ToByteBuffer(EncodeTablePush(*conn, *e, p, rows, seq, nullptr, 0));
              };
              h->resends = [conn, e, p, seq](int server) { return Resends(conn, e, p, seq - 1, server); };
              h->done = [conn, join, e, p, seq](grpc::Status s, const grpc::ByteBuffer&, int server) {
                if (s.ok()) Recorded(*e, seq, p.index, server);
                join->Finish(conn->Named(FromGrpc(s), "row-sparse push", e->label, server));
              };
              conn->Send(h, {{p.server_key, -1}});
            }
          },
          cpu(), {merged.data().var()}, {e->token.var()}, priority, e->push_name.c_str(),
          FnProperty::kInline);
    });
  }

  absl::Status AssignRows(Key key, const RowSparseNDArray& rows) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "assign_rows", true));
    MX_RETURN_IF_ERROR(internal::CheckRowSparseValues(key, {rows}, e->shape));
    std::vector<float> values;
    MX_RETURN_IF_ERROR(CatchError([&] { values = rows.data().ToVector(); }));
    const int64_t dim = rows.row_size();
    for (const KeyPart& p : e->parts) {
      const auto [lo, hi] = RowsIn(rows.indices(), p);
      if (hi == lo) continue;
      proto::PushRequest req;
      *req.mutable_credential() = conn_->credential;
      req.set_key(p.server_key);
      req.set_rank(conn_->options.rank);
      req.set_assign(true);
      AddIdsIn(rows.indices(), p, req.mutable_rows());
      Shape shape = e->shape;
      shape[0] = hi - lo;
      ToProto(values.data() + lo * dim, shape, req.mutable_value());
      proto::PushResponse resp;
      MX_RETURN_IF_ERROR(ToEveryCopy(p, "assign_rows", e->label, [&](auto* ctx, auto* stub) {
        return stub->Push(ctx, req, &resp);
      }));
    }
    return absl::OkStatus();
  }

  // Every table's push and its next rows in one PushPullMany call per
  // server.
  absl::Status PushPullRowSparse(const std::vector<Key>& keys,
                                 const std::vector<std::vector<RowSparseNDArray>>& values,
                                 std::vector<std::vector<int64_t>> row_ids,
                                 std::vector<RowSparseNDArray>* outs, int priority) override {
    const char* what = "row-sparse pushpull";
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_RETURN_IF_ERROR(internal::CheckTableBucket(keys, values, row_ids));
    if (keys.empty()) {  // no operation, which would wait for no call
      outs->clear();
      return absl::OkStatus();
    }
    std::vector<std::shared_ptr<Entry>> entries;
    for (size_t i = 0; i < keys.size(); ++i) {
      MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(keys[i], what, true));
      MX_RETURN_IF_ERROR(internal::CheckRowSparseValues(keys[i], values[i], e->shape));
      MX_RETURN_IF_ERROR(
          CheckRowIds(row_ids[i], e->shape[0], absl::StrCat(what, " of key ", e->label)));
      entries.push_back(std::move(e));
    }
    return CatchError([&] {
      std::vector<TableItem> items;
      std::vector<VarHandle> reads, writes;
      std::map<int, std::vector<ItemPart>> by_server;
      // Each push is numbered once every item's arrays exist: an
      // allocation that threw after a key's count went up left that key
      // a push number ahead of its server for good.
      for (size_t i = 0; i < entries.size(); ++i) {
        items.push_back({entries[i], internal::SumRowSparse(values[i]), 0, 0,
                         RowsToPull(*entries[i], std::move(row_ids[i]))});
      }
      for (size_t i = 0; i < entries.size(); ++i) {
        Entry& e = *entries[i];
        items[i].seq = ++e.pushes;
        items[i].min_version = PullVersion(items[i].seq);
        reads.push_back(items[i].merged.data().var());
        writes.push_back(e.token.var());
        writes.push_back(items[i].pulled.data().var());
        for (const KeyPart& p : e.parts) by_server[p.server].push_back({i, p});
      }
      Engine::Get()->PushAsync(
          [conn = conn_, items, by_server](RunContext, CallbackOnComplete done) {
            auto* join = new Join(static_cast<int>(by_server.size()), done, [items] {
              for (const TableItem& item : items) Acked(*item.e, item.min_version);
            });
            auto rows = std::make_shared<std::vector<PushedRows>>();
            for (const TableItem& t : items) rows->push_back(RowsToPush(*conn, *t.e, t.seq, t.merged));
            for (const auto& [server, parts] : by_server) {
              auto h = std::make_shared<Held>();
              std::vector<std::pair<int, int64_t>> traced;
              for (const ItemPart& ip : parts) {
                h->parts.push_back(ip.part);
                traced.push_back({ip.part.server_key, items[ip.item].min_version});
              }
              h->method = kPushPullManyMethod;
              h->encode = [conn, items, rows, parts = parts](int) {
                std::vector<EncodedMessage> messages;
                for (const ItemPart& ip : parts) {
                  const TableItem& t = items[ip.item];
                  messages.push_back(EncodeTablePush(*conn, *t.e, ip.part, (*rows)[ip.item], t.seq,
                                                     &t.pulled, t.min_version,
                                                     /*with_credential=*/false));
                }
                proto::PushPullManyRequest rest;
                *rest.mutable_credential() = conn->credential;
                return EncodeRepeated(kManyEntriesField, messages, &rest);
              };
              h->resends = [conn, items, parts = parts](int server) {
                return BucketResends(conn, items, parts, server);
              };
              h->done = [conn, join, items, parts = parts](grpc::Status s,
                                                           const grpc::ByteBuffer& resp,
                                                           int server) {
                join->Finish(ReceivedTables(*conn, items, parts, s, resp, server));
              };
              conn->Send(h, traced);
            }
          },
          cpu(), reads, writes, priority, "dist_pushpull_tables", FnProperty::kInline);
      outs->clear();
      for (const TableItem& item : items) outs->push_back(item.pulled);
    });
  }

  absl::Status RowSparsePull(Key key, std::vector<int64_t> row_ids, RowSparseNDArray* out,
                             int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "row_sparse_pull", true));
    MX_RETURN_IF_ERROR(
        CheckRowIds(row_ids, e->shape[0], absl::StrCat("row_sparse_pull of key ", e->label)));
    return CatchError([&] {
      const RowSparseNDArray pulled = RowsToPull(*e, std::move(row_ids));
      const int64_t min_version = PullVersion(e->pushes);
      Engine::Get()->PushAsync(
          [conn = conn_, e, pulled, min_version](RunContext, CallbackOnComplete done) {
            // The servers holding wanted rows; with replicas 2 (dist_sync)
            // every server, so that the pull acknowledges this worker's
            // pushes up to min_version on all (a pull of no rows waits for
            // the version).
            const bool all = conn->options.replicas > 1 && conn->options.sync;
            std::vector<KeyPart> asked;
            for (const KeyPart& p : e->parts) {
              const auto [lo, hi] = RowsIn(pulled.indices(), p);
              if (hi > lo || all) asked.push_back(p);
            }
            if (asked.empty()) return done(nullptr);
            auto* join = new Join(static_cast<int>(asked.size()), done,
                                  [e, min_version] { Acked(*e, min_version); });
            for (const KeyPart& p : asked) {
              auto h = std::make_shared<Held>();
              h->parts = {p};
              h->method = kPullMethod;
              h->encode = [conn, p, pulled, min_version](int) {
                proto::PullRequest header;
                header.set_key(p.server_key);
                header.set_min_version(min_version);
                header.set_rank(conn->options.rank);
                *header.mutable_credential() = conn->credential;
                AddIdsIn(pulled.indices(), p, header.mutable_rows());
                return EncodeMessage(header);
              };
              h->resends = [conn, e, p, min_version](int server) {
                return Resends(conn, e, p, min_version, server);
              };
              h->done = [conn, join, e, p, pulled](grpc::Status s, const grpc::ByteBuffer& resp,
                                                    int server) {
                join->Finish(ReceivedRows(*conn, *e, s, resp, On(p, server), pulled));
              };
              conn->Send(h, {{p.server_key, min_version}});
            }
          },
          cpu(), {e->token.var()}, {pulled.data().var()}, priority, e->pull_name.c_str(),
          FnProperty::kInline);
      *out = pulled;
    });
  }

  void SetUpdater(Updater) override {
    // Updates run on the servers (SetOptimizer); a C++ callable cannot be
    // sent there.
    throw Error(absl::UnimplementedError(
        "SetUpdater: a distributed store updates on the servers; use SetOptimizer"));
  }

  absl::Status UseGradientCompression(const GradientCompression& c) override {
    for (const auto& [key, e] : keys_) {
      if (e->pushes > 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "set gradient compression before the first push (key ", e->label, " was pushed)"));
      }
    }
    // The calls in flight (pulls: a pull's shared-memory lease reads it)
    // end before it changes.
    MX_RETURN_IF_ERROR(CatchError([&] {
      for (const auto& [key, e] : keys_) e->token.WaitToWrite();
    }));
    conn_->compression = c;
    return absl::OkStatus();
  }

  absl::Status SetOptimizer(std::unique_ptr<Optimizer> optimizer) override {
    for (size_t s = 0; s < conn_->stubs.size(); ++s) {
      if (conn_->Dead(static_cast<int>(s))) continue;  // its keys' backups have it
      proto::SetOptimizerRequest req;
      req.set_name(optimizer->name());
      for (const auto& [k, v] : optimizer->options()) (*req.mutable_options())[k] = v;
      for (const auto& [k, v] : optimizer->param_names()) (*req.mutable_param_names())[k] = v;
      for (const auto& [k, v] : optimizer->lr_mult()) (*req.mutable_lr_mult())[k] = v;
      for (const auto& [k, v] : optimizer->wd_mult()) (*req.mutable_wd_mult())[k] = v;
      proto::SetOptimizerResponse resp;
      const int64_t incarnation = conn_->Since(static_cast<int>(s));
      const absl::Status st = conn_->Control(static_cast<int>(s), "set_optimizer", "-",
                                             [&](auto* ctx, auto* stub) {
                                               return stub->SetOptimizer(ctx, req, &resp);
                                             });
      if (!st.ok() && !conn_->DiedAfter(static_cast<int>(s), incarnation, st)) return st;
    }
    return absl::OkStatus();
  }

  // One file with every server's state, in server order. With replicas 2
  // entry i holds the states of the keys whose primary is server i, saved
  // from the copy that holds them now (after a failover, the backup), so
  // the file does not depend on which servers died.
  absl::Status SaveOptimizerStates(const std::string& path) const override {
    proto::ClusterOptimizerStates all;
    const std::map<int, std::vector<KeyPart>> by_primary = PartsByPrimary();
    for (int s = 0; s < static_cast<int>(conn_->stubs.size()); ++s) {
      proto::SaveOptimizerStatesRequest req;
      proto::OptimizerStates resp;
      const std::function<grpc::Status(grpc::ClientContext*, proto::KVStoreService::Stub*)> save =
          [&](auto* ctx, auto* stub) { return stub->SaveOptimizerStates(ctx, req, &resp); };
      if (conn_->options.replicas < 2) {
        MX_RETURN_IF_ERROR(conn_->Control(s, "save_optimizer_states", "-", save));
      } else if (auto parts = by_primary.find(s); parts != by_primary.end()) {
        for (const KeyPart& p : parts->second) req.add_keys(p.server_key);
        MX_RETURN_IF_ERROR(OnHolder(parts->second[0], "save_optimizer_states", save));
      }  // else no key: no state
      all.add_servers(resp.states());
    }
    return WriteFileAtomically(path, all.SerializeAsString());
  }

  absl::Status LoadOptimizerStates(const std::string& path) override {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
    proto::ClusterOptimizerStates all;
    if (!all.ParseFromIstream(&in)) {
      return absl::DataLossError(absl::StrCat(path, ": not a distributed optimizer state file"));
    }
    if (all.servers_size() != static_cast<int>(conn_->stubs.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, " holds the state of ", all.servers_size(), " servers; this job has ",
          conn_->stubs.size()));
    }
    const std::map<int, std::vector<KeyPart>> by_primary = PartsByPrimary();
    for (int s = 0; s < static_cast<int>(conn_->stubs.size()); ++s) {
      proto::OptimizerStates req;
      req.set_states(all.servers(s));
      // None: a file saved with replicas 2 where server s was no key's
      // primary (an empty entry, which a server cannot parse).
      if (req.states().empty()) continue;
      std::vector<int> copies = {s};
      if (conn_->options.replicas > 1) {
        // Into every copy of server s's keys, keeping the states of the
        // other keys there.
        auto parts = by_primary.find(s);
        if (parts == by_primary.end()) continue;
        req.set_merge(true);
        MX_ASSIGN_OR_RETURN(const int holder, conn_->HolderOf(parts->second[0]));
        copies = {holder};
        if (int other = conn_->OtherCopyOf(parts->second[0], holder); other >= 0) {
          copies.push_back(other);
        }
      }
      for (int server : copies) {
        proto::LoadOptimizerStatesResponse resp;
        const int64_t incarnation = conn_->Since(server);
        const absl::Status st = conn_->Control(server, "load_optimizer_states", "-",
                                               [&](auto* ctx, auto* stub) {
                                                 return stub->LoadOptimizerStates(ctx, req, &resp);
                                               });
        // A copy whose server died meanwhile needs no state (replicas 2).
        if (!st.ok() && !conn_->DiedAfter(server, incarnation, st)) return st;
      }
    }
    return absl::OkStatus();
  }

  // Replicas 2: a control call of `what` to the server that holds part p's
  // keys, made again on the next holder if that one dies meanwhile.
  absl::Status OnHolder(
      const KeyPart& p, const char* what,
      const std::function<grpc::Status(grpc::ClientContext*, proto::KVStoreService::Stub*)>& call)
      const {
    for (;;) {
      MX_ASSIGN_OR_RETURN(const int holder, conn_->HolderOf(p));
      const int64_t incarnation = conn_->Since(holder);
      const absl::Status s = conn_->Control(holder, what, "-", call);
      if (s.ok() || !conn_->DiedAfter(holder, incarnation, s)) return s;
    }
  }

  // The parts of every key, by their primary's rank.
  std::map<int, std::vector<KeyPart>> PartsByPrimary() const {
    std::map<int, std::vector<KeyPart>> by_primary;
    for (const auto& [id, e] : keys_) {
      for (const KeyPart& p : e->parts) by_primary[p.server].push_back(p);
    }
    return by_primary;
  }

  absl::Status Barrier() override {
    if (coordinator_ == nullptr) {
      return absl::FailedPreconditionError("Barrier: this store was not created through a coordinator");
    }
    MX_RETURN_IF_ERROR(CatchError([] { WaitAll(); }));
    return coordinator_->Barrier(barriers_++);
  }

 private:
  // A copy of a table push's rows, kept for resends.
  struct KeptRows {
    std::vector<int64_t> ids;
    std::vector<float> data;
  };
  struct Entry {
    Shape shape;
    // Parts: element ranges of a dense key; row ranges of a table.
    std::vector<KeyPart> parts;
    bool table = false;  // a row-sparse key (InitRowSparse)
    NDArray token;   // written by pushes, read by pulls: orders them
    NDArray merged;  // the sum of a multi-device push (on sum_ctx)
    // Device copies (Merge, LandingOf): where they are summed, fixed at the
    // first push; the host copy of a sum made on a GPU, which the push
    // sends; and the host array a pull's answer lands in when an output is
    // not in host memory. Each is allocated once, when first needed. Host
    // arrays that a GPU copies to or from are page-locked (cpu_pinned), so
    // those copies run on the GPU's copy streams at the bus's speed.
    std::optional<Context> sum_ctx;
    NDArray staged, landing;
    int slot = 0;  // the key's id: keys take the copies' devices in turn
    int64_t pushes = 0;
    // Gradient compression: what this worker's pushes lost so far, added
    // to the next (error feedback). Only push operations touch it, and the
    // engine runs them one at a time (they write token).
    std::vector<float> residual;
    std::string label, push_name, pull_name, pushpull_name;
    // Replicas 2, dist_sync: the pushes (by seq) whose step's pull has not
    // returned, and for each part the server that recorded it (-1: none
    // yet): if that server dies, they are sent again to the backup.
    struct Unacked {
      std::shared_ptr<const std::vector<float>> data;  // a dense key's push
      std::shared_ptr<const KeptRows> rows;            // a table's push
      std::vector<int> recorded_on;
    };
    std::mutex mu;
    std::map<int64_t, Unacked> unacked;  // guarded by mu
  };

  // Creates segment number s for server s, has the server map it, and
  // removes its name: the memory goes with the last of the two processes.
  absl::Status AttachSegment(int s) {
    const DistKVStoreOptions& o = conn_->options;
    const std::string name = absl::StrCat("mx-w", o.rank, "-s", s, "-", getpid(), "-",
                                          std::random_device()());
    MX_ASSIGN_OR_RETURN(std::unique_ptr<rpc::SharedSegment> segment,
                        rpc::SharedSegment::Create(o.shm_dir, name, o.shm_bytes));
    proto::AttachSegmentRequest req;
    req.set_name(name);
    req.set_segment(s);
    req.set_bytes(o.shm_bytes);
    req.set_rank(o.rank);
    proto::AttachSegmentResponse resp;
    const absl::Status attached = conn_->Control(s, "attach_segment", "-", [&](auto* ctx, auto* stub) {
      return stub->AttachSegment(ctx, req, &resp);
    });
    const absl::Status unlinked = segment->Unlink();  // attached or not
    MX_RETURN_IF_ERROR(attached);
    MX_RETURN_IF_ERROR(unlinked);
    auto link = std::make_shared<ShmLink>();
    link->segment = std::move(segment);
    link->ranges = std::make_unique<rpc::RangeAllocator>(o.shm_bytes);
    link->id = s;
    conn_->SetShm(s, std::move(link));
    return absl::OkStatus();
  }

  // An init of server key `key` with this job's settings, which the server
  // checks against its own.
  proto::InitRequest JobInit(int key) const {
    proto::InitRequest req;
    req.set_key(key);
    req.set_sync(conn_->options.sync);
    req.set_num_workers(conn_->options.num_workers);
    req.set_staleness(conn_->options.staleness);
    return req;
  }

  // The ids of sorted `ids` that part p's rows hold, into `out`.
  static void AddIdsIn(const std::vector<int64_t>& ids, const KeyPart& p, proto::RowIds* out) {
    const auto [lo, hi] = RowsIn(ids, p);
    out->mutable_ids()->Add(ids.begin() + lo, ids.begin() + hi);
  }

  // A new entry for key (parts to be set), with its names and token.
  static std::shared_ptr<Entry> NewEntry(const Key& key, const Shape& shape) {
    auto e = std::make_shared<Entry>();
    e->shape = shape;
    e->label = key.label();
    e->push_name = "dist_push:" + e->label;
    e->pull_name = "dist_pull:" + e->label;
    e->pushpull_name = "dist_pushpull:" + e->label;
    e->token = Zeros({1});
    e->slot = key.id();
    return e;
  }

  // A row-sparse array of table e's shape for the rows `ids`, its data to
  // be filled by a pull.
  static RowSparseNDArray RowsToPull(const Entry& e, std::vector<int64_t> ids) {
    Shape rows = e.shape;
    rows[0] = static_cast<int64_t>(ids.size());
    return RowSparseNDArray(e.shape, std::move(ids), NDArray(rows));
  }

  // A table push's rows: their ids (ascending) and values, row after row,
  // alive while `owner` is.
  struct PushedRows {
    const std::vector<int64_t>* ids;
    const float* data;
    std::shared_ptr<const void> owner;
  };
  // Push number `seq` of table e's rows in part p (none, if the push
  // touched none there: the server still counts the vote), without copying
  // them; with `pulled`, a PushPull that answers with pulled's rows in p.
  static EncodedMessage EncodeTablePush(const Conn& conn, const Entry& e, const KeyPart& p,
                                        const PushedRows& rows, int64_t seq,
                                        const RowSparseNDArray* pulled, int64_t min_version,
                                        bool with_credential = true) {
    const auto [lo, hi] = RowsIn(*rows.ids, p);
    proto::PushRequest header;
    if (with_credential) *header.mutable_credential() = conn.credential;
    header.set_key(p.server_key);
    header.set_rank(conn.options.rank);
    header.set_seq(seq);
    header.set_min_version(min_version);
    AddIdsIn(*rows.ids, p, header.mutable_rows());
    if (pulled != nullptr) AddIdsIn(pulled->indices(), p, header.mutable_pull_rows());
    proto::Tensor* t = header.mutable_value();
    t->add_shape(hi - lo);
    for (int d = 1; d < e.shape.ndim(); ++d) t->add_shape(e.shape[d]);
    t->set_dtype(proto::FLOAT32);
    const int64_t dim = e.shape.RowSize();
    return EncodeTensorMessage(header, kPushValueField,
                               Pieces::Of(rows.data + lo * dim, (hi - lo) * dim, rows.owner));
  }

  // Push `seq` of table e, `merged` (read in an engine operation that
  // reads it): the array itself, or with replicas 2 (dist_sync) a copy
  // kept until its step's pull returns, for resends (the caller may
  // overwrite the array before then).
  static PushedRows RowsToPush(const Conn& conn, Entry& e, int64_t seq,
                               const RowSparseNDArray& merged) {
    if (conn.options.replicas < 2 || !conn.options.sync) {
      auto owner = std::make_shared<const RowSparseNDArray>(merged);
      return {&owner->indices(), owner->data().data(), owner};
    }
    auto kept = std::make_shared<KeptRows>();
    kept->ids = merged.indices();
    const float* data = merged.data().data();
    kept->data.assign(data, data + kept->ids.size() * e.shape.RowSize());
    {
      std::lock_guard<std::mutex> lock(e.mu);
      e.unacked[seq] = {nullptr, kept, std::vector<int>(e.parts.size(), -1)};
    }
    return Pushed(kept);
  }
  static PushedRows Pushed(const std::shared_ptr<const KeptRows>& kept) {
    return {&kept->ids, kept->data.data(), kept};
  }

  // KeyPart p as held by `server` (which errors name).
  static KeyPart On(KeyPart p, int server) {
    p.server = server;
    return p;
  }

  // Keeps push `seq` of e until its step's pull returns (Acked).
  static void Keep(Entry& e, int64_t seq, std::shared_ptr<const std::vector<float>> data) {
    std::lock_guard<std::mutex> lock(e.mu);
    e.unacked[seq] = {std::move(data), nullptr, std::vector<int>(e.parts.size(), -1)};
  }
  // `server` recorded part `index` of push `seq`.
  static void Recorded(Entry& e, int64_t seq, int index, int server) {
    std::lock_guard<std::mutex> lock(e.mu);
    auto it = e.unacked.find(seq);
    if (it != e.unacked.end()) it->second.recorded_on[index] = server;
  }
  // The pushes up to `seq` are in a step whose value was pulled.
  static void Acked(Entry& e, int64_t seq) {
    std::lock_guard<std::mutex> lock(e.mu);
    e.unacked.erase(e.unacked.begin(), e.unacked.upper_bound(seq));
  }
  // The kept pushes of part p, up to `seq`, that `server` has not recorded.
  static std::vector<Resend> Resends(const std::shared_ptr<Conn>& conn, const std::shared_ptr<Entry>& e,
                                     const KeyPart& p, int64_t seq, int server) {
    std::vector<Resend> resends;
    std::lock_guard<std::mutex> lock(e->mu);
    for (auto it = e->unacked.begin(); it != e->unacked.end() && it->first <= seq; ++it) {
      if (it->second.recorded_on[p.index] == server) continue;
      const int64_t pushed = it->first;
      const Entry::Unacked& u = it->second;
      resends.push_back(
          {p.server_key,
           ToByteBuffer(u.rows != nullptr
                            ? EncodeTablePush(*conn, *e, p, Pushed(u.rows), pushed, nullptr, 0)
                            : EncodePush(*conn, p, u.data->data(), u.data, 0, pushed)),
           [e, pushed, index = p.index](int server) { Recorded(*e, pushed, index, server); }});
    }
    return resends;
  }

  static std::string TypeOf(const DistKVStoreOptions& o) {
    if (!o.sync) return "dist_async";
    return o.device_sums ? "dist_device_sync" : "dist_sync";
  }

  // The sum of a push's device copies, in host memory for the push to send
  // (engine operations: copies, and the sum when there are several). The
  // caller counts the push (e.pushes) only after this and every other
  // allocation the push needs: one that throws (a GPU or page-locked
  // buffer that does not fit) then leaves the count alone, and the next
  // push still carries the number the server expects. dist_sync and
  // dist_async sum on the CPU, device copies brought to the host first;
  // dist_device_sync sums on the device of one copy (key k on copy k mod
  // n's, as "device" spreads keys over GPUs) and moves only the sum.
  NDArray Merge(Entry& e, const std::vector<NDArray>& values, int priority) const {
    if (!e.sum_ctx.has_value()) {
      const bool any_gpu = std::any_of(values.begin(), values.end(),
                                       [](const NDArray& v) { return v.context().is_gpu(); });
      e.sum_ctx = conn_->options.device_sums ? values[e.slot % values.size()].context()
                  : any_gpu                  ? cpu_pinned()
                                             : cpu();
    }
    NDArray sum =
        internal::SumCopies(values, e.shape, &e.merged, priority, e.push_name.c_str(), *e.sum_ctx);
    if (sum.context().is_cpu()) return sum;
    if (e.staged.is_none()) e.staged = Empty(e.shape, cpu_pinned());
    CopyFromTo(sum, e.staged, priority, e.push_name.c_str());
    return e.staged;
  }

  // Where a pull's answer goes (Received writes it to every dsts entry)
  // and what the pull's operation writes: the outputs themselves when all
  // are in host memory, else the entry's landing array, which Spread then
  // copies to the outputs.
  struct Landing {
    std::vector<float*> dsts;
    std::vector<VarHandle> writes;
    bool spread = false;
  };
  static Landing LandingOf(Entry& e, const std::vector<NDArray>& outs) {
    Landing l;
    const bool host = std::all_of(outs.begin(), outs.end(),
                                  [](const NDArray& o) { return o.context().is_cpu(); });
    if (host) {
      for (const NDArray& o : outs) {
        l.dsts.push_back(o.data());
        l.writes.push_back(o.var());
      }
      return l;
    }
    if (e.landing.is_none()) e.landing = Empty(e.shape, cpu_pinned());
    l.dsts = {e.landing.data()};
    l.writes = {e.landing.var()};
    l.spread = true;
    return l;
  }

  // After a pull that landed in e.landing: copies it to the outputs, in
  // engine order. One copy crosses to the first output on a GPU; the
  // others on GPUs come from that one (peer copies where the devices
  // allow), those on the CPU from the landing array.
  static void Spread(const Entry& e, const Landing& landing, const std::vector<NDArray>& outs,
                     int priority) {
    if (!landing.spread) return;
    const NDArray* first_gpu = nullptr;
    for (const NDArray& o : outs) {
      const NDArray& from = o.context().is_cpu() || first_gpu == nullptr ? e.landing : *first_gpu;
      CopyFromTo(from, o, priority, e.pull_name.c_str());
      if (first_gpu == nullptr && !o.context().is_cpu()) first_gpu = &o;
    }
  }

  static std::vector<VarHandle> Vars(const std::vector<NDArray>& arrays) {
    std::vector<VarHandle> vars;
    for (const NDArray& a : arrays) vars.push_back(a.var());
    return vars;
  }

  // The variables of `pushed` an operation reads, leaving out those it also
  // writes (an output may be a pushed array itself: written, hence read).
  static std::vector<VarHandle> ReadsBesides(const std::vector<NDArray>& pushed,
                                             const std::vector<VarHandle>& writes) {
    std::vector<VarHandle> reads;
    for (const NDArray& a : pushed) {
      if (std::find(writes.begin(), writes.end(), a.var()) == writes.end()) reads.push_back(a.var());
    }
    return reads;
  }

  // Slice p of the key's values at `base` (kept alive by `owner`) as this
  // worker's push number `seq` of the key, without copying the data; with
  // the caller's credential unless it is an entry of a PushPullMany (whose
  // request carries it once).
  // With `lease`, the value goes through shared memory (copied there), and
  // a PushPull's answer comes back the same way.
  static EncodedMessage EncodePush(const Conn& conn, const KeyPart& p, const float* base,
                                   std::shared_ptr<const void> owner, int64_t min_version,
                                   int64_t seq, bool with_credential = true,
                                   const ShmLease* lease = nullptr) {
    proto::PushRequest header;
    if (with_credential) *header.mutable_credential() = conn.credential;
    header.set_key(p.server_key);
    header.set_rank(conn.options.rank);
    header.set_min_version(min_version);
    header.set_seq(seq);
    proto::Tensor* t = header.mutable_value();
    t->add_shape(p.end - p.begin);
    const GradientCompression& c = conn.compression;
    DescribePacked(c, t);
    if (lease != nullptr) {
      std::memcpy(lease->data(), base + p.begin, lease->bytes);
      *header.mutable_shm_value() = lease->Held();
      // The answer there too: the server writes it once the value is summed.
      *header.mutable_shm_reply() = lease->Range();
      return EncodeHeader(header);
    }
    if (!c.enabled()) {
      return EncodeTensorMessage(header, kPushValueField,
                                 Pieces::Of(base + p.begin, p.end - p.begin, std::move(owner)));
    }
    // Packed for each attempt: exact for quantized values, so a push sent
    // again carries the same ones.
    auto packed = std::make_shared<std::vector<uint8_t>>(PackedBytes(c, p.end - p.begin));
    Pack(c, base + p.begin, p.end - p.begin, packed->data());
    Pieces data;
    data.pieces.emplace_back(reinterpret_cast<const char*>(packed->data()), packed->size());
    data.owner = packed;
    return EncodeTensorMessage(header, kPushValueField, data);
  }

  // What a push sends: the merged gradient where it lies, or, compressed,
  // its quantized copy (which also updates e's residual: call it once per
  // push, in the push's engine operation).
  struct PushSource {
    const float* data;
    std::shared_ptr<const void> owner;
    std::shared_ptr<const std::vector<float>> quantized;  // compressed pushes only
  };
  static PushSource SourceOf(const Conn& conn, Entry& e, const NDArray& merged) {
    if (!conn.compression.enabled()) {
      return {merged.data(), std::make_shared<NDArray>(merged), nullptr};
    }
    const int64_t n = merged.size();
    if (e.residual.empty()) e.residual.assign(n, 0.0f);
    auto q = std::make_shared<std::vector<float>>(n);
    Quantize(conn.compression, merged.data(), n, e.residual.data(), q->data());
    return {q->data(), q, q};
  }
  // With replicas in dist_sync, push `seq` of e, answered once version
  // `answered_at` is replicated (0: at once, as Push; a PushPull's
  // min_version), is kept until a pull of its step returns (Acked) when
  // that answer may come before its own step is replicated: after a
  // failover it is sent to the backup again (Resends). Bounded staleness
  // answers a PushPull s steps early. Returns what to send: the kept copy
  // (the caller may overwrite its array meanwhile; a compressed push is
  // already one), or `source` when nothing is kept.
  static PushSource KeptUntilReplicated(const Conn& conn, Entry& e, int64_t seq,
                                        int64_t answered_at, PushSource source, int64_t n) {
    if (conn.options.replicas < 2 || !conn.options.sync || answered_at >= seq) return source;
    std::shared_ptr<const std::vector<float>> copy =
        source.quantized != nullptr
            ? source.quantized
            : std::make_shared<const std::vector<float>>(source.data, source.data + n);
    Keep(e, seq, copy);
    return {copy->data(), copy, source.quantized};
  }

  // Where a pulled slice p goes: the first output, after checking its size;
  // `received` records that it came.
  static TensorSink SliceSink(const Conn& conn, const KeyPart& p, const std::vector<float*>& dsts,
                              bool* received) {
    return [&conn, p, dst = dsts[0] + p.begin, received](size_t, size_t bytes) -> absl::StatusOr<void*> {
      const size_t expected = (p.end - p.begin) * sizeof(float);
      if (bytes != expected) {
        return absl::DataLossError(absl::StrCat("server ", conn.Address(p.server), " sent ",
                                                bytes, " bytes, expected ", expected));
      }
      *received = true;
      return static_cast<void*>(dst);
    };
  }

  // An answer whose value the server wrote to the call's shared memory
  // (PullResponse.in_shm): into the first output.
  static absl::Status FromShm(const Conn& conn, const KeyPart& p, const proto::PullResponse& h,
                              const ShmLease* lease, const std::vector<float*>& dsts,
                              bool* received) {
    if (!h.in_shm()) return absl::OkStatus();
    const size_t bytes = (p.end - p.begin) * sizeof(float);
    if (lease == nullptr || lease->bytes != bytes || *received) {
      return absl::DataLossError(absl::StrCat("server ", conn.Address(p.server),
                                              " said it answered in shared memory the call did "
                                              "not offer for it"));
    }
    std::memcpy(dsts[0] + p.begin, lease->data(), bytes);
    *received = true;
    return absl::OkStatus();
  }

  // Copies slice p from the first output to the others.
  static void CopyToOtherOutputs(const KeyPart& p, const std::vector<float*>& dsts) {
    for (size_t i = 1; i < dsts.size(); ++i) {
      std::memcpy(dsts[i] + p.begin, dsts[0] + p.begin, (p.end - p.begin) * sizeof(float));
    }
  }

  // Whether [a, a + n) and [b, b + m) share memory.
  static bool Overlaps(const float* a, int64_t n, const float* b, int64_t m) {
    return a < b + m && b < a + n;
  }

  // Where a stream connection may read slice p of the value straight to:
  // the first output (Received checks that the value lay there).
  static rpc::AnswerPlacement PlacementOf(const KeyPart& p, const std::vector<float*>& dsts) {
    return {dsts[0] + p.begin, (p.end - p.begin) * sizeof(float)};
  }

  // The outcome of a call that answers with slice p of the value: copied to
  // every output.
  static absl::Status Received(const Conn& conn, const Entry& e, const char* what,
                               const grpc::Status& status, const grpc::ByteBuffer& resp,
                               const KeyPart& p, const std::vector<float*>& dsts,
                               const ShmLease* lease) {
    MX_RETURN_IF_ERROR(conn.Named(FromGrpc(status), what, e.label, p.server));
    bool received = false;
    proto::PullResponse header;
    const TensorSink copy = SliceSink(conn, p, dsts, &received);
    // Read with p's placement (the connection read the answer's last bytes
    // into the first output, rpc::AnswerPlacement), the value lies where it
    // belongs if it ends the answer, as mx's servers encode it. Otherwise
    // a copy of the answer is decoded, apart from the output it goes to.
    absl::StatusOr<Slices> slices = SlicesOf(resp);
    const bool placed = slices.ok() && !(*slices)->empty() &&
                        (*slices)->back().begin() == PlacementOf(p, dsts).data;
    bool misplaced = false;
    auto sink = [&](size_t offset, size_t bytes) -> absl::StatusOr<void*> {
      MX_ASSIGN_OR_RETURN(void* dst, copy(offset, bytes));
      if (!placed) return dst;
      if (offset + bytes == resp.Length()) return nullptr;  // there already
      misplaced = true;
      return absl::AbortedError("misplaced");
    };
    absl::Status s =
        slices.ok() ? DecodeWithTensor(resp, kPullValueField, &header, sink) : slices.status();
    if (misplaced) {
      std::string all;
      for (const grpc::Slice& slice : **slices) {
        all.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
      }
      grpc::Slice bytes(all);
      header.Clear();
      s = DecodeWithTensor(grpc::ByteBuffer(&bytes, 1), kPullValueField, &header, copy);
    }
    if (s.ok()) s = FromShm(conn, p, header, lease, dsts, &received);
    if (s.ok() && !received) s = absl::DataLossError("the server sent no value");
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat(what, " of key ", e.label, ": ", s.message()));
    CopyToOtherOutputs(p, dsts);
    return absl::OkStatus();
  }

  // One key of a PushPull of several.
  struct Item {
    std::shared_ptr<Entry> e;
    NDArray merged;
    int64_t seq;  // this push's
    int64_t min_version;
    std::vector<float*> dsts;
  };
  struct ItemPart {
    size_t item;
    KeyPart part;
  };

  // The kept pushes a call of a bucket (`parts` of `items`, dense or
  // tables) must be preceded by on `server`: each part's before its item's
  // push.
  template <typename BucketItem>
  static std::vector<Resend> BucketResends(const std::shared_ptr<Conn>& conn,
                                           const std::vector<BucketItem>& items,
                                           const std::vector<ItemPart>& parts, int server) {
    std::vector<Resend> all;
    for (const ItemPart& ip : parts) {
      const BucketItem& item = items[ip.item];
      for (Resend& r : Resends(conn, item.e, ip.part, item.seq - 1, server)) {
        all.push_back(std::move(r));
      }
    }
    return all;
  }

  // Decodes the answer (call status `status`) of a PushPullMany of `n`
  // entries, entry i's data going to sink(i, &received[i]); an answer with
  // more entries, or fewer received, is DATA_LOSS.
  static absl::Status DecodeAnswers(
      const grpc::Status& status, const grpc::ByteBuffer& resp, size_t n,
      const std::function<TensorSink(size_t, bool*)>& sink,
      const std::function<absl::Status(size_t, const proto::PullResponse&, bool*)>& from_shm =
          nullptr) {
    absl::Status s = FromGrpc(status);
    if (!s.ok()) return s;
    std::deque<proto::PullResponse> headers;
    std::unique_ptr<bool[]> received(new bool[n]());
    s = DecodeRepeated(
        resp, kManyEntriesField, kPullValueField, [&](int) { return &headers.emplace_back(); },
        [&](int i) -> TensorSink {
          if (static_cast<size_t>(i) >= n) {
            return [](size_t, size_t) -> absl::StatusOr<void*> {
              return absl::DataLossError("the server sent more values than asked for");
            };
          }
          return sink(i, &received[i]);
        });
    for (size_t i = 0; s.ok() && i < n; ++i) {
      if (i < headers.size() && from_shm) s = from_shm(i, headers[i], &received[i]);
      if (s.ok() && (i >= headers.size() || !received[i])) {
        s = absl::DataLossError("the server sent too few values");
      }
    }
    return s;
  }

  // One table of a PushPullRowSparse of several: its push and its pull.
  struct TableItem {
    std::shared_ptr<Entry> e;
    RowSparseNDArray merged;
    int64_t seq, min_version;
    RowSparseNDArray pulled;
  };

  // The outcome of a PushPullMany of tables to `server`, answering with
  // each entry's rows of `parts` in order.
  static absl::Status ReceivedTables(const Conn& conn, const std::vector<TableItem>& items,
                                     const std::vector<ItemPart>& parts,
                                     const grpc::Status& status, const grpc::ByteBuffer& resp,
                                     int server) {
    std::vector<std::string> labels;
    for (const ItemPart& ip : parts) labels.push_back(items[ip.item].e->label);
    // An entry of no rows may come without data; one of rows must bring
    // them (DecodeAnswers: DATA_LOSS otherwise), as a row-sparse pull's.
    const absl::Status s = DecodeAnswers(status, resp, parts.size(), [&](size_t i, bool* received) {
      const RowSparseNDArray& pulled = items[parts[i].item].pulled;
      const auto [lo, hi] = RowsIn(pulled.indices(), parts[i].part);
      *received = hi == lo;
      const TensorSink sink = RowsSink(conn, On(parts[i].part, server), pulled);
      return [sink, received](size_t offset, size_t bytes) {
        *received = true;
        return sink(offset, bytes);
      };
    });
    return conn.Named(s, "row-sparse pushpull", absl::StrJoin(labels, ", "), server);
  }

  // Where a server's answer of its rows (part p) of `pulled` goes.
  static TensorSink RowsSink(const Conn& conn, const KeyPart& p, const RowSparseNDArray& pulled) {
    const auto [lo, hi] = RowsIn(pulled.indices(), p);
    const int64_t dim = pulled.row_size();
    return [&conn, p, lo = lo, hi = hi, dim,
            dst = pulled.data().data()](size_t, size_t bytes) -> absl::StatusOr<void*> {
      const size_t expected = (hi - lo) * dim * sizeof(float);
      if (bytes != expected) {
        return absl::DataLossError(absl::StrCat("server ", conn.Address(p.server), " sent ",
                                                bytes, " bytes, expected ", expected));
      }
      return static_cast<void*>(dst + lo * dim);
    };
  }

  // The outcome of a PushPullMany call to `server`, answering with the
  // slices `parts` in order.
  static absl::Status ReceivedMany(const Conn& conn, const std::vector<Item>& items,
                                   const std::vector<ItemPart>& parts, const grpc::Status& status,
                                   const grpc::ByteBuffer& resp, int server,
                                   const CallLeases& leases) {
    std::vector<std::string> labels;
    for (const ItemPart& ip : parts) labels.push_back(items[ip.item].e->label);
    const absl::Status s = DecodeAnswers(
        status, resp, parts.size(),
        [&](size_t i, bool* received) {
          return SliceSink(conn, On(parts[i].part, server), items[parts[i].item].dsts, received);
        },
        [&](size_t i, const proto::PullResponse& h, bool* received) {
          return FromShm(conn, On(parts[i].part, server), h, leases.at(i),
                         items[parts[i].item].dsts, received);
        });
    MX_RETURN_IF_ERROR(conn.Named(s, "pushpull", absl::StrJoin(labels, ", "), server));
    for (const ItemPart& ip : parts) CopyToOtherOutputs(ip.part, items[ip.item].dsts);
    return absl::OkStatus();
  }

  std::vector<KeyPart> Partition(int key, int64_t n) const {
    const DistKVStoreOptions& o = conn_->options;
    return PlaceKey(key, n, {static_cast<int>(conn_->stubs.size()), o.big_key_bound, o.min_slice, o.replicas});
  }

  // The version a pull after `pushes` pushes of a key asks for: in
  // dist_sync the step that includes them, or with bounded staleness s the
  // step s before it (so this worker waits only while the slowest is more
  // than s steps behind); in dist_async any (a push is applied before it
  // is answered, and the engine orders the pull after it through the
  // key's token).
  int64_t PullVersion(int64_t pushes) const {
    if (!conn_->options.sync) return 0;
    return std::max<int64_t>(pushes - conn_->options.staleness, 0);
  }

  // The entry of key for `what`, which uses it as a table (row-sparse) or
  // as a dense key.
  absl::StatusOr<std::shared_ptr<Entry>> Find(const Key& key, const char* what,
                                              bool as_table = false) {
    auto it = keys_.find(key.id());
    if (it == keys_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " of key ", key.label(), ": the key was never initialized (call ",
          as_table ? "InitRowSparse" : "Init", " first)"));
    }
    if (it->second->table != as_table) {
      return internal::WrongKeyKind(key, what, it->second->table);
    }
    return it->second;
  }

  // The positions [lo, hi) of the sorted ids that fall in part p's rows.
  static std::pair<int64_t, int64_t> RowsIn(const std::vector<int64_t>& ids, const KeyPart& p) {
    const auto lo = std::lower_bound(ids.begin(), ids.end(), p.begin);
    const auto hi = std::lower_bound(lo, ids.end(), p.end);
    return {lo - ids.begin(), hi - ids.begin()};
  }

  // The outcome of a row-sparse pull from part p's server: its rows of
  // `pulled`, written into pulled's data.
  static absl::Status ReceivedRows(const Conn& conn, const Entry& e, const grpc::Status& status,
                                   const grpc::ByteBuffer& resp, const KeyPart& p,
                                   const RowSparseNDArray& pulled) {
    MX_RETURN_IF_ERROR(conn.Named(FromGrpc(status), "row_sparse_pull", e.label, p.server));
    const auto [lo, hi] = RowsIn(pulled.indices(), p);
    bool received = false;
    proto::PullResponse header;
    const TensorSink sink = RowsSink(conn, p, pulled);
    absl::Status s = DecodeWithTensor(resp, kPullValueField, &header,
                                      [&](size_t offset, size_t bytes) {
                                        received = true;
                                        return sink(offset, bytes);
                                      });
    if (s.ok() && !received && hi > lo) s = absl::DataLossError("the server sent no rows");
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("row_sparse_pull of key ", e.label, ": ",
                                                 s.message()));
    }
    return absl::OkStatus();
  }

  // The optimizer's state file holds each server's part: after a failover
  // (replicas 2) a dead server's part is on its backup, mixed with the
  // backup's own, which the file's layout cannot say yet.
  // What a heartbeat's answer says of dead nodes, and of spares that took
  // dead servers' ranks.
  void HeardOfDeaths(const proto::HeartbeatResponse& resp) {
    for (const proto::NodeInfo& dead : resp.dead()) {
      const bool worker = dead.role() == proto::WORKER;
      if (worker && dead.rank() == conn_->options.rank) {
        // The servers refuse its pushes now: say why, not "push refused".
        conn_->Fail(absl::UnavailableError(absl::StrCat(
            "the coordinator declared this worker (rank ", dead.rank(),
            ") dead: its heartbeats did not arrive in time")));
        continue;
      }
      // Elastic: the servers complete steps without a dead worker.
      if (worker && conn_->options.elastic) {
        std::lock_guard<std::mutex> lock(dead_mu_);
        dead_workers_.insert(dead.rank());
        continue;
      }
      const std::string address =
          dead.address().empty() ? "" : absl::StrCat(" (", dead.address(), ")");
      if (!worker && conn_->options.replicas > 1) {
        std::lock_guard<std::mutex> lock(dead_mu_);
        // News of a server's death once, and none of an incarnation that a
        // spare replaced since.
        if (dead.incarnation() < incarnation_[dead.rank()] ||
            !dead_servers_.insert({dead.rank(), dead.incarnation()}).second) {
          continue;
        }
        std::cerr << "worker " << conn_->options.rank << ": server " << dead.rank() << address
                  << " was declared dead; its keys are served by their backups" << std::endl;
        conn_->ServerDied(dead.rank());
        continue;
      }
      conn_->Fail(absl::UnavailableError(absl::StrCat(
          worker ? "worker " : "server ", dead.rank(), address,
          " died: it stopped sending heartbeats")));
    }
    for (const proto::NodeInfo& r : resp.replacements()) {
      std::lock_guard<std::mutex> lock(dead_mu_);
      if (conn_->options.replicas < 2 || r.rank() < 0 ||
          r.rank() >= static_cast<int>(conn_->options.servers.size()) ||
          r.incarnation() <= incarnation_[r.rank()]) {
        continue;
      }
      incarnation_[r.rank()] = r.incarnation();
      std::cerr << "worker " << conn_->options.rank << ": a spare took the rank of server "
                << r.rank() << " (" << r.address() << "); its keys have two copies again"
                << std::endl;
      conn_->ServerReplaced(r.rank(), r.address(), r.stream_address());
    }
  }

  std::shared_ptr<Conn> conn_;
  std::map<int, std::shared_ptr<Entry>> keys_;
  std::shared_ptr<rpc::CoordinatorClient> coordinator_;
  int64_t barriers_ = 0;
  std::mutex dead_mu_;
  std::set<int> dead_workers_;  // elastic: workers declared dead; guarded by dead_mu_
  // Replicas 2, guarded by dead_mu_: servers declared dead (rank,
  // incarnation), and the latest incarnation of each rank (spares).
  std::set<std::pair<int, int>> dead_servers_;
  std::map<int, int> incarnation_;
};

}  // namespace

namespace {
// A store of `options`, checked, not yet handed shared memory.
absl::StatusOr<std::unique_ptr<DistKVStore>> NewDistKVStore(const DistKVStoreOptions& options) {
  if (options.servers.empty()) return absl::InvalidArgumentError("dist kvstore: no servers");
  if (options.replicas < 1 || options.replicas > 2) {
    return absl::InvalidArgumentError(absl::StrCat("dist kvstore: replicas must be 1 or 2, not ",
                                                   options.replicas));
  }
  if (options.replicas > static_cast<int>(options.servers.size())) {
    return absl::InvalidArgumentError(absl::StrCat("dist kvstore: replicas ", options.replicas,
                                                   " need as many servers; the job has ",
                                                   options.servers.size()));
  }
  if (options.device_sums && !options.sync) {
    return absl::InvalidArgumentError(
        "dist kvstore: device sums (dist_device_sync) apply to dist_sync only");
  }
  if (options.staleness < 0 || (options.staleness > 0 && !options.sync)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dist kvstore: staleness ", options.staleness,
        ": must be 0 or more, and applies to dist_sync only (dist_async pulls do not wait)"));
  }
  if (options.rank < 0 || options.rank >= options.num_workers) {
    return absl::InvalidArgumentError(absl::StrCat("dist kvstore: rank ", options.rank,
                                                   " outside 0..", options.num_workers - 1));
  }
  if (options.shm_bytes < 1 << 20) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dist kvstore: shared memory of ", options.shm_bytes, " bytes per server (1 MiB or more)"));
  }
  // As MX_RPC_TIMEOUT_S allows: every call has a deadline.
  if (options.rpc_timeout < absl::Seconds(1) || options.rpc_timeout > absl::Hours(24)) {
    return absl::InvalidArgumentError(absl::StrCat("dist kvstore: rpc_timeout ",
                                                   absl::FormatDuration(options.rpc_timeout),
                                                   ": must be from 1s to 24h"));
  }
  if (options.security.tls()) {  // the files the stream connections load
    absl::Status tls = rpc::StreamTls::For(options.security).status();
    if (!tls.ok()) return tls;
  }
  return std::make_unique<DistKVStore>(options);
}
}  // namespace

absl::StatusOr<std::unique_ptr<KVStore>> CreateDistKVStoreFromEnvironment(const std::string& type) {
  auto prefixed = [&type](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("kvstore ", type, ": ", s.message()));
  };
  std::string coordinator = EnvString("MX_COORDINATOR");
  if (coordinator.empty() && !EnvString("DMLC_PS_ROOT_URI").empty()) {
    coordinator = absl::StrCat(EnvString("DMLC_PS_ROOT_URI"), ":", EnvString("DMLC_PS_ROOT_PORT"));
  }
  if (coordinator.empty()) {
    return prefixed(absl::FailedPreconditionError(
        "set MX_COORDINATOR=host:port (or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT); "
        "deploy/launch.py does this"));
  }
  DistKVStoreOptions options;
  options.sync = type != "dist_async";
  options.device_sums = type == "dist_device_sync";
  absl::Status bad;
  auto setting = [&](auto v) {
    if (!v.ok() && bad.ok()) bad = prefixed(v.status());
    using T = typename decltype(v)::value_type;
    return v.ok() ? *std::move(v) : T{};
  };
  const auto rpc_timeout = setting(EnvInt("MX_RPC_TIMEOUT_S", 1, 86400));
  const auto startup_timeout = setting(EnvInt("MX_STARTUP_TIMEOUT_S", 1, 86400));
  const auto bucket_kb = setting(EnvInt("MX_BUCKET_KB", 0, 1 << 20));
  const auto elastic = setting(EnvBool("MX_ELASTIC"));
  const auto replicas = setting(EnvInt("MX_REPLICAS", 1, 2));
  const auto staleness = setting(EnvInt("MX_STALENESS", 0, 1000));
  const auto coordinator_timeout = setting(EnvInt("MX_COORDINATOR_TIMEOUT_S", 2, 86400));
  const auto rank = setting(EnvInt("MX_RANK", 0, 1 << 20));
  const auto shm_mb = setting(EnvInt("MX_SHM_MB", 1, 1 << 20));
  const rpc::Security security = setting(rpc::Security::FromEnvironment());
  MX_RETURN_IF_ERROR(bad);
  if (rpc_timeout) options.rpc_timeout = absl::Seconds(*rpc_timeout);
  if (bucket_kb) options.bucket_bytes = *bucket_kb << 10;
  options.elastic = elastic.value_or(false);
  options.replicas = static_cast<int>(replicas.value_or(1));
  options.staleness = static_cast<int>(staleness.value_or(0));
  options.security = security;
  options.shm_dir = EnvString("MX_SHM_DIR");
  if (shm_mb) options.shm_bytes = *shm_mb << 20;
  proto::RegisterRequest req;
  req.set_role(proto::WORKER);
  if (rank) req.set_rank(static_cast<int>(*rank));
  rpc::CoordinatorClient::Options co;
  co.address = coordinator;
  co.security = security;
  // Every node of the job must start and register within this time.
  co.startup_timeout = absl::Seconds(startup_timeout.value_or(rpc::kDefaultStartupTimeoutSeconds));
  co.rpc_timeout = options.rpc_timeout;
  if (coordinator_timeout) co.lost_after = absl::Seconds(*coordinator_timeout);
  MX_ASSIGN_OR_RETURN(std::unique_ptr<rpc::CoordinatorClient> client,
                      rpc::CoordinatorClient::Register(co, req));
  const proto::RegisterResponse& resp = client->cluster();
  options.rank = resp.self().rank();
  options.num_workers = resp.workers_size();
  options.session_key = resp.session_key();
  for (const proto::NodeInfo& server : resp.servers()) {
    options.servers.push_back(server.address());
    options.stream_addresses.push_back(server.stream_address());
  }
  MX_ASSIGN_OR_RETURN(std::unique_ptr<DistKVStore> kv, NewDistKVStore(options));
  // Heartbeats first: a server that hangs while it is handed shared
  // memory is then declared dead, which ends that call, rather than this
  // worker, silent meanwhile.
  kv->AttachCoordinator(std::move(client));
  kv->AttachSharedMemory();
  return std::unique_ptr<KVStore>(std::move(kv));
}

namespace {
// KVStore::Create checks first that dist_device_sync has GPUs to sum on.
const bool kRegistered =
    KVStore::RegisterType("dist_sync", CreateDistKVStoreFromEnvironment) &&
    KVStore::RegisterType("dist_async", CreateDistKVStoreFromEnvironment) &&
    KVStore::RegisterType("dist_device_sync", CreateDistKVStoreFromEnvironment);
}  // namespace

absl::StatusOr<std::unique_ptr<KVStore>> CreateDistKVStore(const DistKVStoreOptions& options) {
  MX_ASSIGN_OR_RETURN(std::unique_ptr<DistKVStore> store, NewDistKVStore(options));
  store->AttachSharedMemory();
  return std::unique_ptr<KVStore>(std::move(store));
}


}  // namespace mx
