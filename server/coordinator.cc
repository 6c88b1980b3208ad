#include "server/coordinator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "ndarray/base.h"
#include "ndarray/trace.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"
#include "rpc/metrics.h"
#include "rpc/rpc.h"

namespace mx {

namespace {

using rpc::FromGrpc;
using rpc::GiveUpBefore;
using rpc::Guard;
using rpc::ToGrpc;

const char* RoleName(proto::Role r) { return r == proto::SERVER ? "server" : "worker"; }
rpc::Role RpcRole(proto::Role r) { return static_cast<rpc::Role>(r); }

// The methods parse their own requests (ParseRequest), so that bytes that
// are no request are INVALID_ARGUMENT saying so. Register and Barrier wait
// for other nodes without holding a thread: a waiting call is kept (with
// its reactor) and answered by the call, death or departure that completes
// it, or by Sweep once it is about to run out of time, saying what was
// missing. The methods run on the server's polling thread (rpc/async.h)
// and never block; each makes one reactor per call.
class Service final {
 public:
  // Nodes are admitted to the guard as they register: a call for a node
  // that has not is refused at once.
  explicit Service(CoordinatorOptions options)
      : options_(options), guard_(options.security.token, /*identities=*/true) {
    guard_.AdmitAll(rpc::Role::kWorker);
    guard_.AdmitAll(rpc::Role::kServer);
    prober_ = std::thread([this] { Probe(); });
  }
  ~Service() {
    {
      absl::MutexLock lock(&mu_);
      closed_ = true;
    }
    prober_.join();
  }
  int64_t refused() const { return guard_.refused(); }

  rpc::UnaryReactor* Register(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                              grpc::ByteBuffer* response) {
    absl::StatusOr<proto::RegisterRequest> req =
        ParseRequest<proto::RegisterRequest>(*request, "register");
    // An open enum on the wire: a role 7 took a worker's rank.
    if (req.ok() && !proto::Role_IsValid(req->role())) {
      req =
          absl::InvalidArgumentError(absl::StrCat("register: role ", static_cast<int>(req->role()),
                                                  " is neither a worker (0) nor a server (1)"));
    }
    if (req.ok() && !req->session_key().empty()) {
      return AnswerAtOnce(ctx, response, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return Rejoin(*req);
      });
    }
    if (req.ok() && req->spare()) {
      return AnswerAtOnce(ctx, response, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return RegisterSpare(*req);
      });
    }
    return Wait(
        ctx, response, &registering_,
        [&](Waiting* w, Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          MX_RETURN_IF_ERROR(guard_.CheckToken(*ctx, "register"));
          MX_RETURN_IF_ERROR(req.status());
          ForgetAbandonedRegistrations(answers);
          return StartRegister(*req, &w->node);
        },
        [&](Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          if (AllRegistered()) AnswerRegistrations(answers);
        });
  }

  rpc::UnaryReactor* Heartbeat(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                               grpc::ByteBuffer* response) {
    absl::StatusOr<Guard::Node> caller;
    return rpc::AnswerRequest<proto::HeartbeatRequest, proto::HeartbeatResponse>(
        *request, response, "heartbeat",
        [&] {
          MX_RETURN_IF_ERROR(KnownHere(*ctx, "heartbeat"));
          return (caller = guard_.IdentifyAny(*ctx, "heartbeat")).status();
        },
        [&](const proto::HeartbeatRequest& req, proto::HeartbeatResponse* resp) {
          MX_RETURN_IF_ERROR(
              guard_.CheckClaim(*ctx, "heartbeat", *caller, RpcRole(req.role()), req.rank()));
          absl::MutexLock lock(&mu_);
          return Beat(req, resp);
        });
  }

  rpc::UnaryReactor* Leave(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                           grpc::ByteBuffer* response) {
    absl::StatusOr<Guard::Node> caller;
    return rpc::AnswerRequest<proto::LeaveRequest, proto::LeaveResponse>(
        *request, response, "leave",
        [&] {
          MX_RETURN_IF_ERROR(KnownHere(*ctx, "leave"));
          return (caller = guard_.Identify(*ctx, "leave", rpc::Role::kWorker)).status();
        },
        [&](const proto::LeaveRequest& req, auto*) {
          MX_RETURN_IF_ERROR(
              guard_.CheckClaim(*ctx, "leave", *caller, rpc::Role::kWorker, req.rank()));
          Answers answers;  // barriers that no longer wait for this worker
          absl::Status s;
          {
            absl::MutexLock lock(&mu_);
            s = Depart(req.rank());
            if (s.ok()) AnswerBarriers(&answers);
          }
          Deliver(answers);
          return s;
        });
  }

  rpc::UnaryReactor* Barrier(rpc::ServerContext* ctx, const grpc::ByteBuffer* request,
                             grpc::ByteBuffer* response) {
    return Wait(
        ctx, response, &in_barrier_,
        [&](Waiting* w, Answers*) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          MX_RETURN_IF_ERROR(KnownHere(*ctx, "barrier"));
          MX_ASSIGN_OR_RETURN(const Guard::Node caller,
                              guard_.Identify(*ctx, "barrier", rpc::Role::kWorker));
          return EnterBarrier(*ctx, caller, *request, &w->epoch);
        },
        [&](Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { AnswerBarriers(answers); });
  }

  // Every worker has finished (or every one died), and every live server
  // has been told to shut down (after a failure, at most a heartbeat
  // timeout is spent waiting for them to hear it): the coordinator's work
  // is done.
  bool Finished() {
    absl::MutexLock lock(&mu_);
    if (!EveryWorkerDone() && !Failed()) return false;
    const absl::Time now = rpc::SteadyNow();
    if (Failed() && now - failed_at_ > options_.heartbeat_timeout) return true;
    for (const auto& [rank, unused] : servers_) {
      if (!told_.count(rank) && !dead_.count({proto::SERVER, rank})) return false;
    }
    // Waiting spares hear it at their next heartbeat too, for which the
    // coordinator waits a few heartbeat periods at most (found by
    // tests/chaos: after a coordinator's restart a spare's heartbeat came
    // just after it had gone, and the spare ran on until the launcher
    // stopped it). A silent spare is not waited for.
    if (done_since_ == absl::InfiniteFuture()) done_since_ = now;
    for (const auto& [rank, spare] : spares_) {
      if (spare.assigned >= 0 || spare.silent || told_.count(rank)) continue;
      if (now - done_since_ < kSpareGrace) return false;
    }
    return true;
  }

  // Why the job failed ("" while it has not): every worker died before any
  // finished.
  std::string Failure() {
    absl::MutexLock lock(&mu_);
    return failure_;
  }

  // Declares nodes dead whose last heartbeat is older than the timeout,
  // then answers the barriers that this decides and the waiting calls
  // that are about to run out of time.
  void Sweep() {
    Answers answers;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time now = rpc::SteadyNow();
      for (const auto& [node, seen] : last_seen_) {
        if (dead_.count(node) || now - seen < options_.heartbeat_timeout) continue;
        DeclareDead(node);
      }
      SweepSpares(now);
      FailForLastDeadWorker(now);
      if (!Failed() && EveryWorkerDied()) {
        failure_ = absl::StrCat("every worker of the job died: ", DeadList(proto::WORKER));
        failed_at_ = now;
      }
      if (!Failed() && !AllRegistered() && now - started_ > options_.startup_timeout) {
        failure_ = absl::StrCat("register: ", Unregistered(), " did not register within ",
                                absl::FormatDuration(options_.startup_timeout),
                                " of the coordinator's start");
        failed_at_ = now;
      }
      AnswerBarriers(&answers);
      TimeOut(absl::Now(), &answers);  // callers' deadlines: wall-clock
    }
    Deliver(answers);
  }

  // Checks the servers that nodes reported unreachable (suspects_), one at
  // a time, until the coordinator closes: one that does not answer a
  // health check within a second is declared dead at once, rather than
  // after the heartbeat timeout (replicas 2: its backups take over its
  // keys).
  void Probe() {
    absl::MutexLock lock(&mu_);
    for (;;) {
      mu_.Await(absl::Condition(
          +[](Service* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
            return s->closed_ || !s->suspects_.empty();
          },
          this));
      if (closed_) return;
      const int rank = *suspects_.begin();
      const std::string address = servers_[rank].address();
      mu_.Unlock();
      const bool answered = rpc::HealthCheck(address, options_.security, absl::Seconds(1));
      mu_.Lock();
      suspects_.erase(rank);
      const auto node = std::make_pair(proto::SERVER, rank);
      if (dead_.count(node)) continue;
      if (!answered) {
        std::cerr << "mx_server: coordinator: server " << rank << " (" << address
                  << ") was reported unreachable and did not answer a health check; declaring "
                     "it dead"
                  << std::endl;
        DeclareDead(node);
        continue;
      }
      // It answers here, but others keep failing to reach it: a partition.
      // A job with replicas (the only one whose nodes report) goes on
      // without it; every node then stops calling it, and it stops itself.
      const Reports& r = reports_[rank];
      if (rpc::SteadyNow() - r.since < options_.heartbeat_timeout) continue;
      std::cerr << "mx_server: coordinator: server " << rank << " (" << address
                << ") answers the coordinator, but " << absl::StrJoin(r.by, ", ")
                << " could not reach it for "
                << absl::FormatDuration(absl::Trunc(rpc::SteadyNow() - r.since, absl::Seconds(1)))
                << " (a network partition?); declaring it dead" << std::endl;
      DeclareDead(node);
    }
  }

  // The coordinator is stopping: every waiting call is answered UNAVAILABLE
  // saying so, and so are later ones.
  void Close() {
    Answers answers;
    {
      absl::MutexLock lock(&mu_);
      closed_ = true;
      for (const Waiting& w : registering_) answers.push_back({w.reactor, Closing()});
      for (const Waiting& w : in_barrier_) answers.push_back({w.reactor, Closing()});
      registering_.clear();
      in_barrier_.clear();
    }
    Deliver(answers);
  }

 private:
  // A call that waits for other nodes: a registration (of `node`) or a
  // barrier (of `epoch`). Its answer goes to `response`; it gives up at
  // `give_up`.
  struct Waiting {
    rpc::UnaryReactor* reactor;
    grpc::ByteBuffer* response;
    absl::Time give_up;
    rpc::ServerContext* ctx;  // alive until the reactor finishes
    proto::NodeInfo node;
    int64_t epoch = 0;
  };
  static absl::Status Closing() {
    return absl::UnavailableError("the coordinator is shutting down");
  }
  // Calls to finish, and how, once the lock is released.
  using Answers = std::vector<std::pair<rpc::UnaryReactor*, absl::Status>>;
  static void Deliver(const Answers& answers) {
    for (const auto& [reactor, status] : answers) reactor->Finish(ToGrpc(status));
  }

  // A call that may wait for other nodes: start(&w, &answers) records it
  // (or refuses it; it may also finish other calls); then it joins
  // `waiting`, and answer(&answers) answers what is now decided, this call
  // perhaps among them.
  template <class Start, class Answer>
  rpc::UnaryReactor* Wait(rpc::ServerContext* ctx, grpc::ByteBuffer* response,
                          std::vector<Waiting>* waiting, const Start& start, const Answer& answer) {
    rpc::UnaryReactor* reactor = new rpc::UnaryReactor;
    Answers answers;
    {
      absl::MutexLock lock(&mu_);
      Waiting w{reactor, response, GiveUpBefore(ctx->deadline()), ctx};
      const absl::Status s = closed_ ? Closing() : start(&w, &answers);
      if (s.ok()) {
        waiting->push_back(w);
        answer(&answers);
      } else {
        answers.push_back({reactor, s});
      }
    }
    Deliver(answers);
    return reactor;
  }

  // mx_coordinator_nodes{role,state}: nodes registered, declared dead, and
  // workers finished, for /metrics.
  static metrics::Gauge* NodeGauge(proto::Role role, const char* state) {
    static metrics::Family<metrics::Gauge>* nodes = metrics::Registry::Global().AddGauge(
        "mx_coordinator_nodes",
        "Nodes of the job by role and state: registered (ever), dead (declared so), finished "
        "(workers that left)",
        {"role", "state"});
    return nodes->With({RoleName(role), state});
  }

  // Before the job has formed, a node whose registration call was
  // cancelled (it died, or gave up, while waiting for the others) held
  // nothing yet: its rank is freed, so that the node started again (the
  // launcher restarts a server killed before it served) may take it.
  void ForgetAbandonedRegistrations(Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto abandoned = [&](const Waiting& w) {
      if (!w.ctx->IsCancelled()) return false;
      std::map<int, proto::NodeInfo>& nodes = w.node.role() == proto::SERVER ? servers_ : workers_;
      nodes.erase(w.node.rank());
      NodeGauge(w.node.role(), "registered")->Add(-1);
      answers->push_back({w.reactor, absl::CancelledError("register: cancelled")});
      return true;
    };
    registering_.erase(std::remove_if(registering_.begin(), registering_.end(), abandoned),
                       registering_.end());
  }

  // Where others reach the node that registered with `req`.
  static void SetEndpoints(const proto::RegisterRequest& req, proto::NodeInfo* info) {
    info->set_address(req.address());
    info->set_stream_address(req.stream_address());
  }

  // Records the node of a registration (rank, address) in *node.
  absl::Status StartRegister(const proto::RegisterRequest& req, proto::NodeInfo* node)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::map<int, proto::NodeInfo>& nodes = req.role() == proto::SERVER ? servers_ : workers_;
    MX_ASSIGN_OR_RETURN(const int rank, RankFor(req, nodes));
    node->set_role(req.role());
    node->set_rank(rank);
    SetEndpoints(req, node);
    nodes[rank] = *node;
    NodeGauge(req.role(), "registered")->Add(1);
    // The guard holds the node's session key; the answer gives it out.
    guard_.Admit(RpcRole(req.role()), rank, rpc::NewSessionKey());
    return absl::OkStatus();
  }
  // Answers a registration that waits for no other node (a rejoin, a
  // spare's) with what `answer()` returns under the lock, once the call
  // carries the job token.
  template <class Answer>
  rpc::UnaryReactor* AnswerAtOnce(rpc::ServerContext* ctx, grpc::ByteBuffer* response,
                                  const Answer& answer) {
    rpc::UnaryReactor* reactor = new rpc::UnaryReactor;
    absl::Status s = guard_.CheckToken(*ctx, "register");
    if (s.ok()) {
      absl::MutexLock lock(&mu_);
      absl::StatusOr<proto::RegisterResponse> resp = closed_ ? Closing() : answer();
      if (resp.ok()) *response = EncodeMessage(*resp);
      s = resp.status();
    }
    reactor->Finish(ToGrpc(s));
    return reactor;
  }

  // Takes a node back that registered with an earlier coordinator of the
  // job (RegisterRequest.session_key) with its rank and key, and what it
  // heard of the job (dead nodes, finished workers); answers it with
  // itself and its key. The first rejoin makes every node not yet known
  // here awaited: one that has not rejoined within the heartbeat timeout
  // is declared dead (Sweep).
  absl::StatusOr<proto::RegisterResponse> Rejoin(const proto::RegisterRequest& req)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MX_RETURN_IF_ERROR(req.spare() ? RejoinSpare(req) : RejoinNode(req));
    proto::RegisterResponse resp;
    resp.mutable_self()->set_role(req.role());
    resp.mutable_self()->set_rank(req.rank());
    SetEndpoints(req, resp.mutable_self());
    resp.set_session_key(req.session_key());
    return resp;
  }
  absl::Status RejoinNode(const proto::RegisterRequest& req) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const char* role = RoleName(req.role());
    const int expected = req.role() == proto::SERVER ? options_.num_servers : options_.num_workers;
    if (!req.has_rank() || req.rank() < 0 || req.rank() >= expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          "register (rejoin): ", role, " rank ", req.has_rank() ? req.rank() : -1,
          " is outside 0..", expected - 1, " (the job has ", expected, " ", role, "s)"));
    }
    const auto node = std::make_pair(req.role(), req.rank());
    if (dead_.count(node)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "register (rejoin): ", role, " ", req.rank(), " was declared dead (it did not rejoin "
          "the restarted coordinator within the heartbeat timeout)"));
    }
    const std::string key = guard_.Key(RpcRole(req.role()), req.rank());
    if (!key.empty()) {
      if (rpc::ConstantTimeEquals(key, req.session_key())) return absl::OkStatus();  // again
      return absl::AlreadyExistsError(absl::StrCat("register (rejoin): ", role, " rank ",
                                                   req.rank(), " has rejoined already"));
    }
    MergeHeard(req);
    std::map<int, proto::NodeInfo>& nodes = req.role() == proto::SERVER ? servers_ : workers_;
    proto::NodeInfo& info = nodes[req.rank()];
    info.set_role(req.role());
    info.set_rank(req.rank());
    SetEndpoints(req, &info);
    info.set_incarnation(req.incarnation());
    if (req.incarnation() > 0) replacements_[req.rank()] = info;
    guard_.Admit(RpcRole(req.role()), req.rank(), req.session_key());
    NodeGauge(req.role(), "registered")->Add(1);
    if (!rebuilding_) AwaitTheOthers();
    if (!left_.count(req.rank()) || req.role() == proto::SERVER)
      last_seen_[node] = rpc::SteadyNow();
    std::cerr << "mx_server: coordinator: " << role << " " << req.rank() << " rejoined"
              << std::endl;
    return absl::OkStatus();
  }
  // A spare that registered with an earlier coordinator: it waits again,
  // with its identity.
  absl::Status RejoinSpare(const proto::RegisterRequest& req) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int rank = req.has_rank() ? req.rank() : -1;
    if (req.role() != proto::SERVER || rank < options_.num_servers ||
        rank - options_.num_servers >= kMaxSpares) {
      return absl::InvalidArgumentError(absl::StrCat(
          "register (rejoin): a spare server's rank is past the job's ", options_.num_servers,
          " servers (by less than ", kMaxSpares, "), not ", rank));
    }
    const std::string key = guard_.Key(rpc::Role::kServer, rank);
    if (!key.empty()) {
      if (rpc::ConstantTimeEquals(key, req.session_key())) return absl::OkStatus();  // again
      return absl::AlreadyExistsError(
          absl::StrCat("register (rejoin): spare server ", rank, " has rejoined already"));
    }
    AddSpare(rank, req, req.session_key());
    std::cerr << "mx_server: coordinator: the spare server at " << req.address() << " rejoined"
              << std::endl;
    AssignVacantRanks();
    return absl::OkStatus();
  }

  // Spare server `rank` (past the job's servers), registered with `req`,
  // proving it with `key`, waits from now on.
  void AddSpare(int rank, const proto::RegisterRequest& req, const std::string& key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Spare& spare = spares_[rank];
    spare.info.set_role(proto::SERVER);
    spare.info.set_rank(rank);
    SetEndpoints(req, &spare.info);
    spare.seen = rpc::SteadyNow();
    next_spare_ = std::max(next_spare_, rank - options_.num_servers + 1);
    guard_.Admit(rpc::Role::kServer, rank, key);
  }

  // The newest incarnation of server `rank` known here: the one that
  // serves as it, or that rejoins with `req`; -1 when none is.
  int64_t NewestIncarnation(const proto::RegisterRequest& req, int rank) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int64_t newest = -1;
    if (auto n = servers_.find(rank); n != servers_.end()) newest = n->second.incarnation();
    if (req.role() == proto::SERVER && req.rank() == rank) {
      newest = std::max<int64_t>(newest, req.incarnation());
    }
    return newest;
  }

  // What a rejoining node heard: dead nodes and finished workers.
  void MergeHeard(const proto::RegisterRequest& req) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const proto::NodeInfo& d : req.dead()) {
      const int expected = d.role() == proto::SERVER ? options_.num_servers : options_.num_workers;
      if (!proto::Role_IsValid(d.role()) || d.rank() < 0 || d.rank() >= expected ||
          dead_.count({d.role(), d.rank()})) {
        continue;
      }
      if (d.role() == proto::SERVER && d.incarnation() < NewestIncarnation(req, d.rank())) {
        continue;  // news of a server whose rank a replacement took since
      }
      (d.role() == proto::SERVER ? servers_ : workers_).emplace(d.rank(), d);
      DeclareDead({d.role(), d.rank()});
    }
    for (int rank : req.finished_workers()) {
      if (rank < 0 || rank >= options_.num_workers || dead_.count({proto::WORKER, rank})) continue;
      proto::NodeInfo& info = workers_[rank];
      info.set_role(proto::WORKER);
      info.set_rank(rank);
      Depart(rank).IgnoreError();  // registered just above
    }
  }
  // The coordinator restarted and a first node has rejoined: the job runs.
  // Every node not known here yet is expected to rejoin within the
  // heartbeat timeout, as a registered node is expected to heartbeat.
  void AwaitTheOthers() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    rebuilding_ = true;
    const absl::Time now = rpc::SteadyNow();
    auto await = [&](proto::Role role, int expected, std::map<int, proto::NodeInfo>& nodes) {
      for (int rank = 0; rank < expected; ++rank) {
        if (nodes.count(rank)) continue;
        proto::NodeInfo& info = nodes[rank];  // no address until it rejoins
        info.set_role(role);
        info.set_rank(rank);
        last_seen_[{role, rank}] = now;
      }
    };
    await(proto::SERVER, options_.num_servers, servers_);
    await(proto::WORKER, options_.num_workers, workers_);
  }

  // A call of a node of the job this coordinator does not know (it has
  // restarted since the node registered, and the node has not rejoined)
  // is NOT_FOUND, which tells the node to rejoin; other calls go on to
  // the guard. The call carries the node's session key, which implies the
  // token, but that key is not known here yet: the answer gives nothing
  // away, and the rejoin must carry the token.
  absl::Status KnownHere(const rpc::ServerContext& ctx, const char* method) const {
    const rpc::Claims claims = rpc::Claims::Of(ctx);
    const size_t colon = claims.node.find(':');
    if (colon == std::string::npos || colon + 1 == claims.node.size()) {
      return absl::OkStatus();  // no session key: not a node that registered
    }
    const std::vector<std::string> parts =
        absl::StrSplit(claims.node.substr(0, colon), absl::MaxSplits('/', 1));
    int rank = -1;
    if (parts.size() != 2 || (parts[0] != "worker" && parts[0] != "server") ||
        !absl::SimpleAtoi(parts[1], &rank)) {
      return absl::OkStatus();
    }
    const bool server = parts[0] == "server";
    const rpc::Role role = server ? rpc::Role::kServer : rpc::Role::kWorker;
    // Servers' ranks past the job's are spares'.
    if (rank < 0 || (!server && rank >= options_.num_workers) || !guard_.Key(role, rank).empty()) {
      return absl::OkStatus();
    }
    return absl::NotFoundError(absl::StrCat(method, ": ", parts[0], " ", rank,
                                            " is not registered with this coordinator (it "
                                            "restarted since?): rejoin"));
  }

  bool AllRegistered() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return static_cast<int>(servers_.size()) == options_.num_servers &&
           static_cast<int>(workers_.size()) == options_.num_workers;
  }
  // Server `server` was reported unreachable by `by` ("worker 0"): reports
  // at most kReportGap apart make a streak, which the prober weighs.
  void Reported(int server, const std::string& by) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    static constexpr absl::Duration kReportGap = absl::Seconds(8);  // > rpc::kKeepalive
    const absl::Time now = rpc::SteadyNow();
    Reports& r = reports_[server];
    if (now - r.last > kReportGap) r = Reports{now, now, {}};
    r.last = now;
    r.by.insert(by);
  }

  // Declares `node` dead: heartbeat answers list it from now on.
  void DeclareDead(const std::pair<proto::Role, int>& node) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    proto::NodeInfo info;
    info.set_role(node.first);
    info.set_rank(node.second);
    const auto& nodes = node.first == proto::SERVER ? servers_ : workers_;
    if (auto n = nodes.find(node.second); n != nodes.end()) info.set_address(n->second.address());
    if (node.first == proto::SERVER) {
      if (auto n = servers_.find(node.second); n != servers_.end()) {
        info.set_incarnation(n->second.incarnation());
      }
    }
    dead_[node] = info;
    NodeGauge(node.first, "dead")->Add(1);
    if (node.first == proto::SERVER) AssignSpare(node.second);
  }

  // Without --elastic: the job fails when a worker died and every other
  // one has finished. No worker is left to fail naming it (found by
  // tests/chaos: a worker hung just before it finished, after the other
  // had; the job was "finished" and the daemons exited 0), so the servers
  // and the coordinator do ("worker(s) 1 died ..."), and the launcher
  // blames the dead worker.
  void FailForLastDeadWorker(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // While one still runs, it will say so itself.
    if (Failed() || options_.elastic || DeadWorkers() == 0 || !EveryWorkerLeftOrDead()) return;
    std::vector<int> dead;
    for (const auto& [node, info] : dead_) {
      if (node.first == proto::WORKER) dead.push_back(node.second);
    }
    failure_ =
        absl::StrCat("worker(s) ", absl::StrJoin(dead, ", "),
                     " died before finishing, after the others had: ", DeadList(proto::WORKER));
    failed_at_ = now;
  }

  // A waiting spare silent for the heartbeat timeout (hung, or cut off)
  // will not take a rank (AssignSpare): said once, for the launcher, which
  // kills such a process. One that heartbeats again may take one again.
  void SweepSpares(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (auto& [rank, spare] : spares_) {
      if (spare.assigned >= 0 || spare.silent || now - spare.seen < options_.heartbeat_timeout) {
        continue;
      }
      spare.silent = true;
      std::cerr << "mx_server: coordinator: the spare server at " << spare.info.address()
                << " stopped sending heartbeats; it will not take a dead server's rank"
                << std::endl;
    }
  }

  // A spare server: an identity of its own (a rank past the job's
  // servers) and its key.
  // Spare ranks a job hands out, over its life: a bound on what spares'
  // registrations (each a record and a key) can take, and on their ranks.
  static constexpr int kMaxSpares = 1 << 16;

  absl::StatusOr<proto::RegisterResponse> RegisterSpare(const proto::RegisterRequest& req)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (req.role() != proto::SERVER) {
      return absl::InvalidArgumentError("register: only a server may be a spare");
    }
    if (next_spare_ >= kMaxSpares) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "register: ", kMaxSpares, " spare servers have registered with this job already"));
    }
    const int rank = options_.num_servers + next_spare_;
    AddSpare(rank, req, rpc::NewSessionKey());
    proto::RegisterResponse resp;
    *resp.mutable_self() = spares_[rank].info;
    resp.set_session_key(guard_.Key(rpc::Role::kServer, rank));
    std::cerr << "mx_server: coordinator: a spare server (" << req.address()
              << ") waits for a server's death" << std::endl;
    AssignVacantRanks();
    return resp;
  }

  // Server `d` was declared dead: a live spare, if any, takes its rank (the
  // next incarnation), proving it with its own session key (the dead
  // one's is void from now on), and is expected to heartbeat as that rank
  // within the heartbeat timeout. Its next heartbeat answer tells it.
  void AssignSpare(int d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const absl::Time now = rpc::SteadyNow();
    for (auto& [rank, spare] : spares_) {
      if (spare.assigned >= 0 || now - spare.seen > options_.heartbeat_timeout) continue;
      spare.assigned = d;
      auto dead = dead_.find({proto::SERVER, d});
      replaced_dead_.push_back(dead->second);
      proto::NodeInfo info = spare.info;
      info.set_rank(d);
      info.set_incarnation(dead->second.incarnation() + 1);
      dead_.erase(dead);
      servers_[d] = info;
      guard_.Admit(rpc::Role::kServer, d, guard_.Key(rpc::Role::kServer, rank));
      last_seen_[{proto::SERVER, d}] = now;
      std::cerr << "mx_server: coordinator: the spare server at " << info.address()
                << " takes the rank of server " << d << " (incarnation " << info.incarnation()
                << ")" << std::endl;
      return;
    }
  }

  // Servers declared dead while no live spare waited keep their ranks
  // vacant (their keys have one copy): a spare that registers, rejoins or
  // heartbeats again after a silence takes one.
  void AssignVacantRanks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (EveryWorkerDone() || Failed()) return;  // nothing left to serve
    std::vector<int> vacant;
    for (const auto& [node, info] : dead_) {
      if (node.first == proto::SERVER) vacant.push_back(node.second);
    }
    for (int d : vacant) AssignSpare(d);
  }

  // What a spare assigned rank `d` needs, as a registering server gets it.
  proto::RegisterResponse Assignment(int spare, int d) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    proto::RegisterResponse resp;
    *resp.mutable_self() = servers_.at(d);
    resp.set_session_key(guard_.Key(rpc::Role::kServer, spare));
    for (const auto& [rank, info] : servers_) {
      *resp.add_servers() = info;
      resp.add_server_keys(guard_.Key(rpc::Role::kServer, rank));
    }
    for (const auto& [rank, info] : workers_) {
      *resp.add_workers() = info;
      resp.add_worker_keys(guard_.Key(rpc::Role::kWorker, rank));
    }
    return resp;
  }

  // Server `rank` heartbeats: a replacement that does so serves, and is
  // announced to every node from now on.
  void Serving(int rank) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = servers_.find(rank);
    if (it == servers_.end() || it->second.incarnation() == 0) return;
    auto [known, added] = replacements_.try_emplace(rank, it->second);
    if (!added && known->second.incarnation() == it->second.incarnation()) return;
    known->second = it->second;
    std::cerr << "mx_server: coordinator: server " << rank << " (" << it->second.address()
              << ", incarnation " << it->second.incarnation() << ") serves" << std::endl;
  }

  // Answers every waiting registration with the cluster view. A node
  // heartbeats only once it has this answer, so its heartbeat timeout
  // starts now, not at its own registration (which may be long before the
  // last node's).
  void AnswerRegistrations(Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const absl::Time now = rpc::SteadyNow();
    for (const Waiting& w : registering_) {
      proto::RegisterResponse resp;
      *resp.mutable_self() = w.node;
      resp.set_session_key(guard_.Key(RpcRole(w.node.role()), w.node.rank()));
      for (const auto& [rank, s] : servers_) {
        *resp.add_servers() = s;
        if (w.node.role() == proto::SERVER) {
          resp.add_server_keys(guard_.Key(rpc::Role::kServer, rank));
        }
      }
      for (const auto& [rank, n] : workers_) {
        *resp.add_workers() = n;
        if (w.node.role() == proto::SERVER) {
          resp.add_worker_keys(guard_.Key(rpc::Role::kWorker, rank));
        }
      }
      *w.response = EncodeMessage(resp);
      answers->push_back({w.reactor, absl::OkStatus()});
      last_seen_[{w.node.role(), w.node.rank()}] = now;
    }
    registering_.clear();
  }

  absl::Status Beat(const proto::HeartbeatRequest& req, proto::HeartbeatResponse* resp)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto key = std::make_pair(req.role(), req.rank());
    const auto& nodes = req.role() == proto::SERVER ? servers_ : workers_;
    const bool spare = req.role() == proto::SERVER && spares_.count(req.rank());
    if (spare) {
      spares_[req.rank()].seen = rpc::SteadyNow();
      spares_[req.rank()].silent = false;
      if (spares_[req.rank()].assigned < 0) AssignVacantRanks();  // it may have been silent
      if (const auto d = spares_[req.rank()].assigned; d >= 0) *resp->mutable_assignment() = Assignment(req.rank(), d);
    } else if (!nodes.count(req.rank())) {
      return absl::NotFoundError(absl::StrCat("heartbeat: ", RoleName(req.role()), " ", req.rank(),
                                              " never registered"));
    }
    // Not for a worker that has left (no longer expected) or one declared
    // dead (which stays dead).
    if (auto it = last_seen_.find(key); it != last_seen_.end() && !dead_.count(key)) {
      it->second = rpc::SteadyNow();
    }
    if (req.role() == proto::SERVER && !spare) Serving(req.rank());
    for (int server : req.unreachable_servers()) {
      // Not for one a restarted coordinator awaits (no address yet): it is
      // given up if it does not rejoin within the heartbeat timeout.
      auto it = servers_.find(server);
      if (it == servers_.end() || it->second.address().empty() ||
          dead_.count({proto::SERVER, server})) {
        continue;
      }
      suspects_.insert(server);
      Reported(server, absl::StrCat(RoleName(req.role()), " ", req.rank()));
    }
    for (const auto& [node, info] : dead_) *resp->add_dead() = info;
    for (const proto::NodeInfo& info : replaced_dead_) *resp->add_dead() = info;
    for (const auto& [rank, info] : replacements_) {
      *resp->add_replacements() = info;
      if (req.role() == proto::SERVER) {
        resp->add_replacement_keys(guard_.Key(rpc::Role::kServer, rank));
      }
    }
    resp->set_time_us(trace::NowMicros());
    for (int rank : left_) resp->add_finished_workers(rank);
    if (req.role() == proto::SERVER && (EveryWorkerDone() || Failed())) {
      resp->set_shutdown(true);
      resp->set_failure(failure_);
      told_.insert(req.rank());
    }
    return absl::OkStatus();
  }

  absl::Status Depart(int rank) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!workers_.count(rank)) {
      return absl::InvalidArgumentError(
          absl::StrCat("leave: worker rank ", rank, " is not registered"));
    }
    if (left_.insert(rank).second) NodeGauge(proto::WORKER, "finished")->Add(1);
    last_seen_.erase({proto::WORKER, rank});  // no longer expected
    return absl::OkStatus();
  }

  // Parses a barrier request of `caller` and records its worker's arrival
  // at *epoch.
  absl::Status EnterBarrier(const rpc::ServerContext& ctx, const Guard::Node& caller,
                            const grpc::ByteBuffer& request, int64_t* epoch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MX_ASSIGN_OR_RETURN(const proto::BarrierRequest req,
                        ParseRequest<proto::BarrierRequest>(request, "barrier"));
    MX_RETURN_IF_ERROR(guard_.CheckClaim(ctx, "barrier", caller, rpc::Role::kWorker, req.rank()));
    *epoch = req.epoch();
    if (!workers_.count(req.rank())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "barrier ", *epoch, ": worker rank ", req.rank(), " is not registered"));
    }
    entered_[*epoch].insert(req.rank());
    return absl::OkStatus();
  }
  // Answers the waiting barriers that are decided: every live worker has
  // entered, or (not elastic) a worker died.
  void AnswerBarriers(Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const bool failed = !options_.elastic && DeadWorkers() > 0;
    auto decided = [&](const Waiting& w) {
      if (failed) {
        answers->push_back(
            {w.reactor, absl::AbortedError(absl::StrCat("barrier: ", DeadList()))});
        return true;
      }
      if (!EveryLiveWorkerEntered(w.epoch)) return false;
      *w.response = EncodeMessage(proto::BarrierResponse());
      answers->push_back({w.reactor, absl::OkStatus()});
      return true;
    };
    in_barrier_.erase(std::remove_if(in_barrier_.begin(), in_barrier_.end(), decided),
                      in_barrier_.end());
  }

  // Answers the waiting calls whose time is up, saying what is missing.
  void TimeOut(absl::Time now, Answers* answers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto expired_registration = [&](const Waiting& w) {
      if (w.give_up > now) return false;
      answers->push_back({w.reactor, absl::DeadlineExceededError(absl::StrCat(
                                         "register: ", Unregistered(), " did not register in time (",
                                         servers_.size(), " of ", options_.num_servers,
                                         " servers and ", workers_.size(), " of ",
                                         options_.num_workers, " workers did)"))});
      return true;
    };
    registering_.erase(
        std::remove_if(registering_.begin(), registering_.end(), expired_registration),
        registering_.end());
    auto expired_barrier = [&](const Waiting& w) {
      if (w.give_up <= now) {
        answers->push_back(
            {w.reactor, absl::DeadlineExceededError(absl::StrCat(
                            "barrier ", w.epoch, ": worker(s) ",
                            absl::StrJoin(NotEntered(w.epoch), ", "), " did not arrive in time"))});
        return true;
      }
      // A call its client gave up: one without a deadline was held on to,
      // and such calls piled up, each swept every 100 ms.
      if (!w.ctx->IsCancelled()) return false;
      answers->push_back({w.reactor, absl::CancelledError("barrier: cancelled")});
      return true;
    };
    in_barrier_.erase(std::remove_if(in_barrier_.begin(), in_barrier_.end(), expired_barrier),
                      in_barrier_.end());
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

  // The ranks not registered yet, by role: "server 1 and workers 0, 2".
  // Launchers give each node its rank (MX_RANK), so these name the nodes
  // that have not come.
  std::string Unregistered() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::string> parts;
    auto missing = [&](const char* role, int expected, const std::map<int, proto::NodeInfo>& nodes) {
      std::vector<int> ranks;
      for (int rank = 0; rank < expected; ++rank) {
        if (!nodes.count(rank)) ranks.push_back(rank);
      }
      if (ranks.empty()) return;
      parts.push_back(absl::StrCat(role, ranks.size() > 1 ? "s " : " ", absl::StrJoin(ranks, ", ")));
    };
    missing("server", options_.num_servers, servers_);
    missing("worker", options_.num_workers, workers_);
    return absl::StrJoin(parts, " and ");
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
  bool Failed() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !failure_.empty(); }
  // Whether every worker registered and then died, none finishing.
  bool EveryWorkerDied() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!left_.empty() || static_cast<int>(workers_.size()) < options_.num_workers) return false;
    for (int rank = 0; rank < options_.num_workers; ++rank) {
      if (!dead_.count({proto::WORKER, rank})) return false;
    }
    return true;
  }
  // Whether every worker has finished or (elastic) died, at least one
  // finished. Without --elastic a dead worker is the job's failure, even
  // when it was the last one running (FailForLastDeadWorker).
  bool EveryWorkerDone() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return EveryWorkerLeftOrDead() && (options_.elastic || DeadWorkers() == 0);
  }
  // Whether every worker has finished or died, at least one finished.
  bool EveryWorkerLeftOrDead() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (left_.empty() || static_cast<int>(workers_.size()) < options_.num_workers) return false;
    for (int rank = 0; rank < options_.num_workers; ++rank) {
      if (!left_.count(rank) && !dead_.count({proto::WORKER, rank})) return false;
    }
    return true;
  }
  // "worker 1 (addr), server 0 (addr) stopped sending heartbeats": the dead
  // nodes, of `role` or of every role.
  std::string DeadList(std::optional<proto::Role> role = std::nullopt) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::string> names;
    for (const auto& [node, info] : dead_) {
      if (role.has_value() && info.role() != *role) continue;
      names.push_back(absl::StrCat(RoleName(info.role()), " ", info.rank(),
                                   info.address().empty() ? "" : absl::StrCat(" (", info.address(), ")")));
    }
    return absl::StrCat(absl::StrJoin(names, ", "), " stopped sending heartbeats");
  }

  const CoordinatorOptions options_;
  Guard guard_;
  absl::Mutex mu_;
  // Registered nodes by rank.
  std::map<int, proto::NodeInfo> servers_ ABSL_GUARDED_BY(mu_), workers_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<proto::Role, int>, absl::Time> last_seen_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<proto::Role, int>, proto::NodeInfo> dead_ ABSL_GUARDED_BY(mu_);
  std::string failure_ ABSL_GUARDED_BY(mu_);  // why the job failed, "" if it has not
  absl::Time failed_at_ ABSL_GUARDED_BY(mu_);
  const absl::Time started_ = rpc::SteadyNow();
  std::map<int64_t, std::set<int>> entered_ ABSL_GUARDED_BY(mu_);
  std::set<int> left_ ABSL_GUARDED_BY(mu_);  // workers that finished
  // How long a finished job's coordinator waits for waiting spares to
  // hear it (they heartbeat every second).
  static constexpr absl::Duration kSpareGrace = absl::Seconds(3);
  // When Finished first found the job's work done.
  absl::Time done_since_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  std::set<int> told_ ABSL_GUARDED_BY(mu_);  // servers told to shut down
  std::vector<Waiting> registering_ ABSL_GUARDED_BY(mu_);  // until all have registered
  std::vector<Waiting> in_barrier_ ABSL_GUARDED_BY(mu_);   // until all have entered
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // Spare servers by their own rank (past the job's servers).
  struct Spare {
    proto::NodeInfo info;
    absl::Time seen;    // its last heartbeat
    int assigned = -1;  // the dead server's rank it took
    bool silent = false;  // said to have stopped heartbeating (until it heartbeats again)
  };
  std::map<int, Spare> spares_ ABSL_GUARDED_BY(mu_);
  int next_spare_ ABSL_GUARDED_BY(mu_) = 0;
  // Dead servers whose rank a spare took (still listed as dead), and the
  // replacements that serve, by rank.
  std::vector<proto::NodeInfo> replaced_dead_ ABSL_GUARDED_BY(mu_);
  std::map<int, proto::NodeInfo> replacements_ ABSL_GUARDED_BY(mu_);
  // A node has rejoined (this coordinator restarted during the job).
  bool rebuilding_ ABSL_GUARDED_BY(mu_) = false;
  std::set<int> suspects_ ABSL_GUARDED_BY(mu_);  // servers reported unreachable
  // The current streak of reports of each server (Reported).
  struct Reports {
    absl::Time since = absl::InfinitePast();
    absl::Time last = absl::InfinitePast();
    std::set<std::string> by;  // who reported it
  };
  std::map<int, Reports> reports_ ABSL_GUARDED_BY(mu_);
  std::thread prober_;                           // Probe
};

}  // namespace

struct CoordinatorServer::Impl {
  std::unique_ptr<Service> service;
  std::unique_ptr<rpc::AsyncServer> server;
  absl::Mutex mu;
  bool stop ABSL_GUARDED_BY(mu) = false;
  std::atomic<int64_t> swept_ns{absl::GetCurrentTimeNanos()};  // when the last sweep ended
  std::thread sweeper;
};

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    const std::string& bind_address, CoordinatorOptions options) {
  std::unique_ptr<CoordinatorServer> c(new CoordinatorServer());
  c->impl_ = std::make_unique<Impl>();
  c->impl_->service = std::make_unique<Service>(options);
  grpc::ServerBuilder builder;
  int port = 0;
  rpc::Listen(&builder, bind_address, options.security, &port);
  c->impl_->server = std::make_unique<rpc::AsyncServer>(&builder);
  // Every method answers at once or keeps its call waiting: none blocks.
  c->impl_->server->RouteMethods<Service>(proto::Coordinator::service_full_name(),
                                          rpc::Runs::kPolling, c->impl_->service.get(),
                                          {{"Register", &Service::Register},
                                           {"Heartbeat", &Service::Heartbeat},
                                           {"Barrier", &Service::Barrier},
                                           {"Leave", &Service::Leave}});
  c->impl_->server->Start(builder.BuildAndStart());
  if (c->impl_->server->server() == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("coordinator cannot listen on ", bind_address));
  }
  c->address_ = absl::StrCat(bind_address.substr(0, bind_address.rfind(':')), ":", port);
  c->impl_->server->SetServing(true);
  Impl* impl = c->impl_.get();
  // Often enough that a waiting call's answer beats its caller's deadline
  // (GiveUpBefore leaves it at least a tenth of the call's time).
  const absl::Duration period = absl::Milliseconds(100);
  impl->sweeper = std::thread([impl, period] {
    absl::MutexLock lock(&impl->mu);
    auto stopped = [impl]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl->mu) { return impl->stop; };
    while (!impl->mu.AwaitWithTimeout(absl::Condition(&stopped), period)) {
      impl->service->Sweep();
      impl->swept_ns.store(absl::GetCurrentTimeNanos(), std::memory_order_relaxed);
    }
  });
  return c;
}

bool CoordinatorServer::finished() const { return impl_->service->Finished(); }
std::string CoordinatorServer::failure() const { return impl_->service->Failure(); }
int64_t CoordinatorServer::refused() const { return impl_->service->refused(); }
absl::Duration CoordinatorServer::SinceLastSweep() const {
  return absl::Nanoseconds(absl::GetCurrentTimeNanos() -
                           impl_->swept_ns.load(std::memory_order_relaxed));
}

CoordinatorServer::~CoordinatorServer() {
  if (impl_ == nullptr) return;
  {
    absl::MutexLock lock(&impl_->mu);
    impl_->stop = true;
  }
  if (impl_->sweeper.joinable()) impl_->sweeper.join();
  impl_->service->Close();
  if (impl_->server != nullptr) impl_->server->Shutdown(absl::Now() + absl::Seconds(1));
}

}  // namespace mx
