#include "kvstore/dist_kvstore.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdlib>
#include <thread>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "kvstore/kvstore_internal.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"

namespace mx {

int ServerForKey(int key, int num_servers) {
  // A 32-bit mix (murmur3's finalizer): neighbouring keys spread out.
  uint32_t h = static_cast<uint32_t>(key);
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return static_cast<int>(h % static_cast<uint32_t>(num_servers));
}

namespace {

// Collects the outcome of several RPCs; the last one to finish reports the
// first error (or success) to the engine.
class Join {
 public:
  Join(int calls, std::function<void(std::exception_ptr)> done)
      : left_(calls), done_(std::move(done)) {}
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
      done_(result.ok() ? nullptr : std::make_exception_ptr(Error(result)));
      delete this;
    }
  }

 private:
  std::atomic<int> left_;
  std::function<void(std::exception_ptr)> done_;
  std::mutex mu_;
  absl::Status first_error_;
};

// What operations in flight need: shared with them, so that they may
// outlive the store.
struct Conn {
  DistKVStoreOptions options;
  std::vector<std::unique_ptr<proto::KVStoreService::Stub>> stubs;

  // Set when the coordinator reports a dead node: later calls fail with it.
  absl::Status Failure() const {
    std::lock_guard<std::mutex> lock(mu);
    return failure;
  }
  void Fail(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    if (failure.ok()) failure = std::move(s);
  }
  mutable std::mutex mu;
  absl::Status failure;  // guarded by mu

  std::chrono::system_clock::time_point Deadline() const {
    return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options.rpc_timeout);
  }
  absl::Status Named(absl::Status s, const char* what, const std::string& key, int server) const {
    if (s.ok()) return s;
    return absl::Status(s.code(), absl::StrCat(what, " of key ", key, " on server ", server, " (",
                                               options.servers[server], "): ", s.message()));
  }
};

class DistKVStore : public KVStore {
 public:
  explicit DistKVStore(const DistKVStoreOptions& options)
      : KVStore(options.sync ? "dist_sync" : "dist_async"), conn_(std::make_shared<Conn>()) {
    conn_->options = options;
    for (const std::string& address : options.servers) {
      conn_->stubs.push_back(proto::KVStoreService::NewStub(SharedChannel(address)));
    }
  }

  ~DistKVStore() override {
    if (heartbeat_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(stop_mu_);
        stop_ = true;
      }
      stop_cv_.notify_all();
      heartbeat_.join();
    }
  }

  // Joins the cluster through the coordinator: heartbeats every second.
  void AttachCoordinator(std::unique_ptr<proto::Coordinator::Stub> coordinator) {
    coordinator_ = std::move(coordinator);
    heartbeat_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(stop_mu_);
      while (!stop_cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stop_; })) {
        lock.unlock();
        Heartbeat();
        lock.lock();
      }
    });
  }

  int rank() const override { return conn_->options.rank; }
  int num_workers() const override { return conn_->options.num_workers; }

  absl::Status Init(Key key, const NDArray& value) override {
    if (value.is_none()) return absl::InvalidArgumentError(absl::StrCat("init of key ", key.label(), ": null array"));
    auto it = keys_.find(key.id());
    if (it != keys_.end()) {
      if (it->second->shape != value.shape()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "init of key ", key.label(), ": already initialized with shape ",
            it->second->shape.ToString(), ", now ", value.shape().ToString()));
      }
      return absl::OkStatus();
    }
    auto entry = std::make_shared<Entry>();
    Entry& e = *entry;
    e.shape = value.shape();
    e.parts = Partition(key.id(), value.size());
    e.label = key.label();
    e.push_name = "dist_push:" + e.label;
    e.pull_name = "dist_pull:" + e.label;
    std::vector<float> data;
    MX_RETURN_IF_ERROR(internal::Guard([&] {
      data = value.ToVector();
      e.token = Zeros({1});
    }));
    for (const Part& p : e.parts) {
      proto::InitRequest req;
      req.set_key(key.id());
      ToProto(data.data() + p.begin, Shape{p.end - p.begin}, req.mutable_value());
      proto::InitResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(conn_->Deadline());
      MX_RETURN_IF_ERROR(conn_->Named(FromGrpc(conn_->stubs[p.server]->Init(&ctx, req, &resp)), "init",
                               e.label, p.server));
    }
    keys_.emplace(key.id(), std::move(entry));
    return absl::OkStatus();
  }

  absl::Status Push(Key key, const std::vector<NDArray>& values, int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "push"));
    MX_RETURN_IF_ERROR(internal::CheckArrays(key, "push", "value", values, e->shape));
    return internal::Guard([&] {
      NDArray merged =
          internal::SumCopies(values, e->shape, &e->merged, priority, e->push_name.c_str());
      ++e->pushes;
      const int id = key.id();
      const float* data = merged.data();
      Engine::Get()->PushAsync(
          [conn = conn_, e, id, data](RunContext, CallbackOnComplete done) {
            auto* join = new Join(static_cast<int>(e->parts.size()), done);
            for (const Part& p : e->parts) {
              struct Call {
                grpc::ClientContext ctx;
                proto::PushRequest req;
                proto::PushResponse resp;
              };
              auto* call = new Call;
              call->ctx.set_deadline(conn->Deadline());
              call->req.set_key(id);
              call->req.set_rank(conn->options.rank);
              ToProto(data + p.begin, Shape{p.end - p.begin}, call->req.mutable_value());
              const int server = p.server;
              conn->stubs[server]->async()->Push(&call->ctx, &call->req, &call->resp,
                                            [conn, call, join, e, server](grpc::Status s) {
                                              join->Finish(conn->Named(FromGrpc(s), "push", e->label, server));
                                              delete call;
                                            });
            }
          },
          cpu(), {merged.var()}, {e->token.var()}, priority, e->push_name.c_str());
    });
  }

  absl::Status Pull(Key key, const std::vector<NDArray>& outs, int priority) override {
    MX_RETURN_IF_ERROR(conn_->Failure());
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Entry> e, Find(key, "pull"));
    MX_RETURN_IF_ERROR(internal::CheckArrays(key, "pull", "output", outs, e->shape));
    return internal::Guard([&] {
      for (const NDArray& o : outs) internal::RequireHostMemory(o, "pull");
      // dist_sync: the step that includes this worker's pushes. dist_async
      // applies a push before answering it, and the engine orders this pull
      // after it (through the key's token).
      const int64_t min_version = conn_->options.sync ? e->pushes : 0;
      const int id = key.id();
      std::vector<float*> dsts;
      std::vector<VarHandle> writes;
      for (const NDArray& o : outs) {
        dsts.push_back(o.data());
        writes.push_back(o.var());
      }
      Engine::Get()->PushAsync(
          [conn = conn_, e, id, min_version, dsts](RunContext, CallbackOnComplete done) {
            // Every output receives each slice as it arrives.
            auto* join = new Join(static_cast<int>(e->parts.size()), done);
            for (const Part& p : e->parts) {
              struct Call {
                grpc::ClientContext ctx;
                proto::PullRequest req;
                proto::PullResponse resp;
              };
              auto* call = new Call;
              call->ctx.set_deadline(conn->Deadline());
              call->req.set_key(id);
              call->req.set_min_version(min_version);
              call->req.set_rank(conn->options.rank);
              const int server = p.server;
              float* dst = dsts[0] + p.begin;
              const int64_t len = p.end - p.begin;
              std::vector<float*> others(dsts.begin() + 1, dsts.end());
              conn->stubs[server]->async()->Pull(
                  &call->ctx, &call->req, &call->resp,
                  [conn, call, join, e, server, dst, len, others, begin = p.begin](grpc::Status s) {
                    absl::Status st = conn->Named(FromGrpc(s), "pull", e->label, server);
                    if (st.ok()) {
                      const std::string& bytes = call->resp.value().data();
                      if (bytes.size() != static_cast<size_t>(len) * sizeof(float)) {
                        st = absl::DataLossError(absl::StrCat(
                            "pull of key ", e->label, ": server ", conn->options.servers[server],
                            " sent ", bytes.size(), " bytes, expected ", len * sizeof(float)));
                      } else {
                        std::memcpy(dst, bytes.data(), bytes.size());
                        for (float* o : others) std::memcpy(o + begin, bytes.data(), bytes.size());
                      }
                    }
                    join->Finish(st);
                    delete call;
                  });
            }
          },
          cpu(), {e->token.var()}, writes, priority, e->pull_name.c_str());
    });
  }

  void SetUpdater(Updater) override {
    // Updates run on the servers (SetOptimizer); a C++ callable cannot be
    // sent there.
    throw Error(absl::UnimplementedError(
        "SetUpdater: a distributed store updates on the servers; use SetOptimizer"));
  }

  absl::Status SetOptimizer(std::unique_ptr<Optimizer> optimizer) override {
    for (size_t s = 0; s < conn_->stubs.size(); ++s) {
      proto::SetOptimizerRequest req;
      req.set_name(optimizer->name());
      for (const auto& [k, v] : optimizer->options()) (*req.mutable_options())[k] = v;
      for (const auto& [k, v] : optimizer->param_names()) (*req.mutable_param_names())[k] = v;
      for (const auto& [k, v] : optimizer->lr_mult()) (*req.mutable_lr_mult())[k] = v;
      for (const auto& [k, v] : optimizer->wd_mult()) (*req.mutable_wd_mult())[k] = v;
      proto::SetOptimizerResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(conn_->Deadline());
      MX_RETURN_IF_ERROR(conn_->Named(FromGrpc(conn_->stubs[s]->SetOptimizer(&ctx, req, &resp)),
                               "set_optimizer", "-", static_cast<int>(s)));
    }
    return absl::OkStatus();
  }

  // One file with every server's state, in server order.
  absl::Status SaveOptimizerStates(const std::string& path) const override {
    proto::ClusterOptimizerStates all;
    for (size_t s = 0; s < conn_->stubs.size(); ++s) {
      proto::SaveOptimizerStatesRequest req;
      proto::OptimizerStates resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(conn_->Deadline());
      MX_RETURN_IF_ERROR(conn_->Named(FromGrpc(conn_->stubs[s]->SaveOptimizerStates(&ctx, req, &resp)),
                                      "save_optimizer_states", "-", static_cast<int>(s)));
      all.add_servers(resp.states());
    }
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out || !all.SerializeToOstream(&out)) {
      return absl::InternalError(absl::StrCat("cannot write optimizer states to ", path));
    }
    return absl::OkStatus();
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
    for (size_t s = 0; s < conn_->stubs.size(); ++s) {
      proto::OptimizerStates req;
      req.set_states(all.servers(static_cast<int>(s)));
      proto::LoadOptimizerStatesResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(conn_->Deadline());
      MX_RETURN_IF_ERROR(conn_->Named(FromGrpc(conn_->stubs[s]->LoadOptimizerStates(&ctx, req, &resp)),
                                      "load_optimizer_states", "-", static_cast<int>(s)));
    }
    return absl::OkStatus();
  }

  absl::Status Barrier() override {
    if (coordinator_ == nullptr) {
      return absl::FailedPreconditionError("Barrier: this store was not created through a coordinator");
    }
    WaitAll();
    proto::BarrierRequest req;
    req.set_rank(conn_->options.rank);
    req.set_epoch(barriers_++);
    proto::BarrierResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(conn_->Deadline());
    absl::Status s = FromGrpc(coordinator_->Barrier(&ctx, req, &resp));
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("barrier: ", s.message()));
    return absl::OkStatus();
  }

 private:
  struct Part {
    int server;
    int64_t begin, end;  // element range of the flattened key
  };
  struct Entry {
    Shape shape;
    std::vector<Part> parts;
    NDArray token;   // written by pushes, read by pulls: orders them
    NDArray merged;  // the sum of a multi-device push
    int64_t pushes = 0;
    std::string label, push_name, pull_name;
  };

  std::vector<Part> Partition(int key, int64_t n) const {
    const int servers = static_cast<int>(conn_->stubs.size());
    if (n < conn_->options.big_key_bound || servers == 1) {
      return {{ServerForKey(key, servers), 0, n}};
    }
    std::vector<Part> parts;
    for (int s = 0; s < servers; ++s) parts.push_back({s, n * s / servers, n * (s + 1) / servers});
    return parts;
  }

  absl::StatusOr<std::shared_ptr<Entry>> Find(const Key& key, const char* what) {
    auto it = keys_.find(key.id());
    if (it == keys_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " of key ", key.label(), ": the key was never initialized (call Init first)"));
    }
    return it->second;
  }

  void Heartbeat() {
    proto::HeartbeatRequest req;
    req.set_role(proto::WORKER);
    req.set_rank(conn_->options.rank);
    proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::Status s = coordinator_->Heartbeat(&ctx, req, &resp);
    if (!s.ok()) {
      conn_->Fail(absl::UnavailableError(absl::StrCat("the coordinator is unreachable: ",
                                                      s.error_message())));
      return;
    }
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
      if (worker && conn_->options.elastic) continue;
      const std::string address =
          dead.address().empty() ? "" : absl::StrCat(" (", dead.address(), ")");
      conn_->Fail(absl::UnavailableError(absl::StrCat(
          worker ? "worker " : "server ", dead.rank(), address,
          " died: it stopped sending heartbeats")));
    }
  }

  std::shared_ptr<Conn> conn_;
  std::map<int, std::shared_ptr<Entry>> keys_;
  std::unique_ptr<proto::Coordinator::Stub> coordinator_;
  std::thread heartbeat_;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;  // guarded by stop_mu_
  int64_t barriers_ = 0;
};

}  // namespace

namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

}  // namespace

absl::StatusOr<std::unique_ptr<KVStore>> CreateDistKVStoreFromEnvironment(const std::string& type) {
  std::string coordinator = Env("MX_COORDINATOR");
  if (coordinator.empty() && !Env("DMLC_PS_ROOT_URI").empty()) {
    coordinator = absl::StrCat(Env("DMLC_PS_ROOT_URI"), ":", Env("DMLC_PS_ROOT_PORT"));
  }
  if (coordinator.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "kvstore ", type, ": set MX_COORDINATOR=host:port (or DMLC_PS_ROOT_URI and "
        "DMLC_PS_ROOT_PORT); deploy/launch.py does this"));
  }
  DistKVStoreOptions options;
  options.sync = type != "dist_async";
  if (std::string t = Env("MX_RPC_TIMEOUT_S"); !t.empty()) {
    options.rpc_timeout = absl::Seconds(std::max(1, std::atoi(t.c_str())));
  }
  if (std::string e = Env("MX_ELASTIC"); !e.empty()) {
    if (e != "0" && e != "1") {
      return absl::InvalidArgumentError(absl::StrCat(
          "kvstore ", type, ": MX_ELASTIC must be 0 or 1, not '", e, "'"));
    }
    options.elastic = e == "1";
  }
  auto stub = proto::Coordinator::NewStub(SharedChannel(coordinator));
  proto::RegisterRequest req;
  req.set_role(proto::WORKER);
  proto::RegisterResponse resp;
  grpc::ClientContext ctx;
  // Every node of the job must start and register within this time.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  ctx.set_wait_for_ready(true);  // the coordinator may still be starting
  absl::Status s = FromGrpc(stub->Register(&ctx, req, &resp));
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat("registering with the coordinator at ",
                                               coordinator, ": ", s.message()));
  }
  options.rank = resp.self().rank();
  options.num_workers = resp.workers_size();
  for (const proto::NodeInfo& server : resp.servers()) options.servers.push_back(server.address());
  MX_ASSIGN_OR_RETURN(std::unique_ptr<KVStore> kv, CreateDistKVStore(options));
  static_cast<DistKVStore*>(kv.get())->AttachCoordinator(std::move(stub));
  return kv;
}

namespace {
const bool kRegistered = KVStore::RegisterType("dist_sync", CreateDistKVStoreFromEnvironment) &&
                         KVStore::RegisterType("dist_async", CreateDistKVStoreFromEnvironment);
}  // namespace

absl::StatusOr<std::unique_ptr<KVStore>> CreateDistKVStore(const DistKVStoreOptions& options) {
  if (options.servers.empty()) return absl::InvalidArgumentError("dist kvstore: no servers");
  if (options.rank < 0 || options.rank >= options.num_workers) {
    return absl::InvalidArgumentError(absl::StrCat("dist kvstore: rank ", options.rank,
                                                   " outside 0..", options.num_workers - 1));
  }
  return std::unique_ptr<KVStore>(new DistKVStore(options));
}

}  // namespace mx
