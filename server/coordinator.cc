#include "server/coordinator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <map>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"

namespace mx {

namespace {

const char* RoleName(proto::Role r) { return r == proto::SERVER ? "server" : "worker"; }

class Service final : public proto::Coordinator::Service {
 public:
  explicit Service(CoordinatorOptions options) : options_(options) {}

  grpc::Status Register(grpc::ServerContext* ctx, const proto::RegisterRequest* req,
                        proto::RegisterResponse* resp) override {
    absl::MutexLock lock(&mu_);
    std::map<int, proto::NodeInfo>& nodes = req->role() == proto::SERVER ? servers_ : workers_;
    absl::StatusOr<int> rank = RankFor(*req, nodes);
    if (!rank.ok()) return ToGrpc(rank.status());
    proto::NodeInfo self;
    self.set_role(req->role());
    self.set_rank(*rank);
    self.set_address(req->address());
    nodes[*rank] = self;
    last_seen_[{req->role(), self.rank()}] = absl::Now();
    auto all_here = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return static_cast<int>(servers_.size()) == options_.num_servers &&
             static_cast<int>(workers_.size()) == options_.num_workers;
    };
    if (!mu_.AwaitWithDeadline(absl::Condition(&all_here), GiveUpBefore(ctx->deadline()))) {
      return ToGrpc(absl::DeadlineExceededError(absl::StrCat(
          "register: only ", servers_.size(), " of ", options_.num_servers, " servers and ",
          workers_.size(), " of ", options_.num_workers, " workers registered in time")));
    }
    *resp->mutable_self() = self;
    for (const auto& [unused, s] : servers_) *resp->add_servers() = s;
    for (const auto& [unused, w] : workers_) *resp->add_workers() = w;
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const proto::HeartbeatRequest* req,
                         proto::HeartbeatResponse* resp) override {
    absl::MutexLock lock(&mu_);
    auto key = std::make_pair(req->role(), req->rank());
    if (!last_seen_.count(key)) {
      return ToGrpc(absl::NotFoundError(absl::StrCat(
          "heartbeat: ", RoleName(req->role()), " ", req->rank(), " never registered")));
    }
    if (!dead_.count(key)) last_seen_[key] = absl::Now();
    for (const auto& [node, info] : dead_) *resp->add_dead() = info;
    for (int rank : left_) resp->add_finished_workers(rank);
    if (req->role() == proto::SERVER && EveryWorkerDone()) {
      resp->set_shutdown(true);
      told_.insert(req->rank());
    }
    return grpc::Status::OK;
  }

  grpc::Status Leave(grpc::ServerContext*, const proto::LeaveRequest* req,
                     proto::LeaveResponse*) override {
    absl::MutexLock lock(&mu_);
    if (!workers_.count(req->rank())) {
      return ToGrpc(absl::InvalidArgumentError(
          absl::StrCat("leave: worker rank ", req->rank(), " is not registered")));
    }
    left_.insert(req->rank());
    last_seen_.erase({proto::WORKER, req->rank()});  // no longer expected
    return grpc::Status::OK;
  }

  // Every worker has finished and every live server has been told to shut
  // down: the coordinator's work is done.
  bool Finished() {
    absl::MutexLock lock(&mu_);
    if (!EveryWorkerDone()) return false;
    for (const auto& [rank, unused] : servers_) {
      if (!told_.count(rank) && !dead_.count({proto::SERVER, rank})) return false;
    }
    return true;
  }

  grpc::Status Barrier(grpc::ServerContext* ctx, const proto::BarrierRequest* req,
                       proto::BarrierResponse*) override {
    absl::MutexLock lock(&mu_);
    const int64_t epoch = req->epoch();
    if (!workers_.count(req->rank())) {
      return ToGrpc(absl::InvalidArgumentError(absl::StrCat(
          "barrier ", epoch, ": worker rank ", req->rank(), " is not registered")));
    }
    entered_[epoch].insert(req->rank());
    auto done = [this, epoch]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return (!options_.elastic && DeadWorkers() > 0) || EveryLiveWorkerEntered(epoch);
    };
    if (!mu_.AwaitWithDeadline(absl::Condition(&done), GiveUpBefore(ctx->deadline()))) {
      return ToGrpc(absl::DeadlineExceededError(
          absl::StrCat("barrier ", epoch, ": worker(s) ", absl::StrJoin(NotEntered(epoch), ", "),
                       " did not arrive in time")));
    }
    if (!options_.elastic && DeadWorkers() > 0) {
      return ToGrpc(absl::UnavailableError(absl::StrCat("barrier: ", DeadList())));
    }
    return grpc::Status::OK;
  }

  // Declares nodes dead whose last heartbeat is older than the timeout.
  void Sweep() {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (const auto& [node, seen] : last_seen_) {
      if (dead_.count(node) || now - seen < options_.heartbeat_timeout) continue;
      proto::NodeInfo info;
      info.set_role(node.first);
      info.set_rank(node.second);
      const auto& nodes = node.first == proto::SERVER ? servers_ : workers_;
      if (auto n = nodes.find(node.second); n != nodes.end()) info.set_address(n->second.address());
      dead_[node] = info;
    }
  }

 private:
  // The rank a registering node gets: the one it asks for, if that is in
  // range and free, else (it asks for none) the lowest free one.
  absl::StatusOr<int> RankFor(const proto::RegisterRequest& req,
                              const std::map<int, proto::NodeInfo>& nodes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const char* role = RoleName(req.role());
    const int expected = req.role() == proto::SERVER ? options_.num_servers : options_.num_workers;
    if (!req.has_rank()) {
      for (int rank = 0; rank < expected; ++rank) {
        if (!nodes.count(rank)) return rank;
      }
      return absl::FailedPreconditionError(
          absl::StrCat("register: all ", expected, " ", role, "s have already registered"));
    }
    const int rank = req.rank();
    if (rank < 0 || rank >= expected) {
      return absl::InvalidArgumentError(absl::StrCat("register: ", role, " rank ", rank,
                                                     " is outside 0..", expected - 1, " (the job has ",
                                                     expected, " ", role, "s)"));
    }
    if (auto taken = nodes.find(rank); taken != nodes.end()) {
      const std::string& by = taken->second.address();
      return absl::AlreadyExistsError(absl::StrCat("register: ", role, " rank ", rank,
                                                   " is already taken",
                                                   by.empty() ? "" : absl::StrCat(" by ", by)));
    }
    return rank;
  }

  int DeadWorkers() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return static_cast<int>(std::count_if(dead_.begin(), dead_.end(), [](const auto& d) {
      return d.first.first == proto::WORKER;
    }));
  }
  // Whether every worker not declared dead (or finished) has entered
  // barrier `epoch` (a dead worker that entered before dying does not
  // matter).
  bool EveryLiveWorkerEntered(int64_t epoch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return NotEntered(epoch).empty();
  }
  // The live workers that have not entered barrier `epoch`.
  std::vector<int> NotEntered(int64_t epoch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::set<int>& entered = entered_[epoch];
    std::vector<int> missing;
    for (int rank = 0; rank < options_.num_workers; ++rank) {
      if (!dead_.count({proto::WORKER, rank}) && !left_.count(rank) && !entered.count(rank)) {
        missing.push_back(rank);
      }
    }
    return missing;
  }
  // Whether every worker has finished or died, at least one finished.
  bool EveryWorkerDone() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (left_.empty() || static_cast<int>(workers_.size()) < options_.num_workers) return false;
    for (int rank = 0; rank < options_.num_workers; ++rank) {
      if (!left_.count(rank) && !dead_.count({proto::WORKER, rank})) return false;
    }
    return true;
  }
  std::string DeadList() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::string> names;
    for (const auto& [node, info] : dead_) {
      names.push_back(absl::StrCat(RoleName(info.role()), " ", info.rank(), " (", info.address(), ")"));
    }
    return absl::StrCat(absl::StrJoin(names, ", "), " stopped sending heartbeats");
  }

  const CoordinatorOptions options_;
  absl::Mutex mu_;
  // Registered nodes by rank.
  std::map<int, proto::NodeInfo> servers_ ABSL_GUARDED_BY(mu_), workers_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<proto::Role, int>, absl::Time> last_seen_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<proto::Role, int>, proto::NodeInfo> dead_ ABSL_GUARDED_BY(mu_);
  std::map<int64_t, std::set<int>> entered_ ABSL_GUARDED_BY(mu_);
  std::set<int> left_ ABSL_GUARDED_BY(mu_);  // workers that finished
  std::set<int> told_ ABSL_GUARDED_BY(mu_);  // servers told to shut down
};

}  // namespace

struct CoordinatorServer::Impl {
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  absl::Mutex mu;
  bool stop ABSL_GUARDED_BY(mu) = false;
  std::thread sweeper;
};

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    const std::string& bind_address, CoordinatorOptions options) {
  KeepGrpcAlive();
  std::unique_ptr<CoordinatorServer> c(new CoordinatorServer());
  c->impl_ = std::make_unique<Impl>();
  c->impl_->service = std::make_unique<Service>(options);
  grpc::ServerBuilder builder;
  int port = 0;
  ListenExclusively(&builder, bind_address, &port);
  builder.RegisterService(c->impl_->service.get());
  c->impl_->server = builder.BuildAndStart();
  if (c->impl_->server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("coordinator cannot listen on ", bind_address));
  }
  c->address_ = absl::StrCat(bind_address.substr(0, bind_address.rfind(':')), ":", port);
  Impl* impl = c->impl_.get();
  const absl::Duration period = std::max(options.heartbeat_timeout / 5, absl::Milliseconds(50));
  impl->sweeper = std::thread([impl, period] {
    absl::MutexLock lock(&impl->mu);
    auto stopped = [impl]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl->mu) { return impl->stop; };
    while (!impl->mu.AwaitWithTimeout(absl::Condition(&stopped), period)) {
      impl->service->Sweep();
    }
  });
  return c;
}

bool CoordinatorServer::finished() const { return impl_->service->Finished(); }

CoordinatorServer::~CoordinatorServer() {
  if (impl_ == nullptr) return;
  {
    absl::MutexLock lock(&impl_->mu);
    impl_->stop = true;
  }
  if (impl_->sweeper.joinable()) impl_->sweeper.join();
  if (impl_->server != nullptr) {
    impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
}

}  // namespace mx
