#include "rpc/coordinator_client.h"

#include <algorithm>
#include <iostream>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "ndarray/trace.h"
#include "rpc/rpc.h"

namespace mx {
namespace rpc {

namespace {

std::chrono::system_clock::time_point In(absl::Duration d) {
  return absl::ToChronoTime(absl::Now() + d);
}

// The status with what was being done; the code is kept.
absl::Status Doing(const std::string& what, const absl::Status& s) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(what, s.message()));
}

// "worker 0: the coordinator at ADDRESS has not answered for 2s (hung?);
// ...": a coordinator that took a call and did not answer it runs but
// hangs (or is cut off from this node). deploy/launch.py restarts a hung
// coordinator once at least half of the nodes say so.
void SayCoordinatorSilent(const std::string& who, const std::string& address, absl::Duration silent,
                          const std::string& meanwhile, absl::Duration gives_up_after) {
  std::cerr << who << ": the coordinator at " << address << " has not answered for "
            << absl::FormatDuration(absl::Trunc(silent, absl::Seconds(1))) << " (hung?); "
            << meanwhile << ", giving it up after " << absl::FormatDuration(gives_up_after)
            << std::endl;
}

// While a registration waits (the coordinator answers it once every node
// has come, up to the startup timeout), a health check every heartbeat
// period tells a coordinator that waits from one that hangs: the first
// check it takes and does not answer by the heartbeat deadline makes the
// node say so (SayCoordinatorSilent). Stops when destroyed.
class RegistrationWatch {
 public:
  RegistrationWatch(const CoordinatorClient::Options& options, std::string who)
      : thread_([this, options, who = std::move(who)] { Watch(options, who); }) {}
  ~RegistrationWatch() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

 private:
  void Watch(const CoordinatorClient::Options& o, const std::string& who) {
    const absl::Time start = absl::Now();
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (wake_.wait_for(lock, absl::ToChronoMilliseconds(CoordinatorClient::kHeartbeatPeriod),
                           [this] { return done_; })) {
          return;
        }
      }
      const absl::Time checked = absl::Now();
      const bool answered =
          HealthCheck(o.address, o.security, CoordinatorClient::kHeartbeatDeadline);
      // Not a refused connection (nothing listening yet, or restarting),
      // which fails at once.
      if (!answered && absl::Now() - checked >= CoordinatorClient::kHeartbeatDeadline) {
        std::lock_guard<std::mutex> lock(mu_);
        if (done_) return;
        SayCoordinatorSilent(
            who, o.address, absl::Now() - checked, "registration waits",
            absl::Trunc(o.startup_timeout - (absl::Now() - start), absl::Seconds(1)));
        return;
      }
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  bool done_ = false;   // guarded by mu_
  std::thread thread_;  // last: starts once the rest is made
};

}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Register(
    Options options, const proto::RegisterRequest& req) {
  std::shared_ptr<grpc::Channel> channel = SharedChannel(options.address, options.security);
  std::unique_ptr<CoordinatorClient> client(
      new CoordinatorClient(options, proto::Coordinator::NewStub(channel)));
  const std::string where =
      absl::StrCat("registering with the coordinator at ", options.address, ": ");
  const absl::Time deadline = absl::Now() + options.startup_timeout;
  Caller anonymous{options.security.token};
  const absl::Status silent = absl::UnavailableError(absl::StrCat(
      where, "nothing answered there within ", absl::FormatDuration(options.startup_timeout),
      " (is the coordinator running, and is that its address?)"));
  // Fail-fast attempts until one reaches the coordinator: between them a
  // connection that fails for good (TLS on one side only, a refused
  // handshake) ends registration at once instead of at the deadline.
  RegistrationWatch watch(
      options, absl::StrCat(req.role() == proto::SERVER ? "server " : "worker ",
                            req.has_rank() ? absl::StrCat(req.rank()) : "(registering)"));
  for (;;) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    anonymous.Stamp(&ctx);
    absl::Status s = FromGrpc(client->stub_->Register(&ctx, req, &client->cluster_));
    if (s.ok()) break;
    const bool reached = channel->GetState(false) == GRPC_CHANNEL_READY;
    // UNAVAILABLE after the coordinator took the call: it went away (died,
    // or a launcher restarts it): tried again, as before it listened.
    if (!absl::IsUnavailable(s)) {
      if (absl::IsDeadlineExceeded(s) && !reached) return silent;
      // The coordinator answers a registration that waits too long itself,
      // before the deadline, naming the nodes that did not come
      // (rpc::GiveUpBefore); a bare deadline means it did not answer.
      if (absl::IsDeadlineExceeded(s) && !absl::StartsWith(s.message(), "register:")) {
        return absl::UnavailableError(absl::StrCat(
            where, "the coordinator at ", options.address, " is unreachable: it took the call "
            "but did not answer within ", absl::FormatDuration(options.startup_timeout),
            " (hung?)"));
      }
      // The status with its code: transport errors may carry no message.
      return absl::Status(s.code(), where + s.ToString());
    }
    MX_RETURN_IF_ERROR(Doing(where, ConnectionProblem(options.address, options.security)));
    // A refused handshake, or a certificate without the name dialled.
    if (s.message().find("andshake") != absl::string_view::npos ||
        s.message().find("certificate") != absl::string_view::npos) {
      return absl::FailedPreconditionError(
          absl::StrCat(where, "the TLS handshake failed (are both ends' certificates signed by "
                              "the job's CA, for the name dialled or MX_TLS_SERVER_NAME?): ",
                       s.message()));
    }
    if (absl::Now() + absl::Milliseconds(200) >= deadline) return silent;
    absl::SleepFor(absl::Milliseconds(200));
  }
  Caller& me = client->caller_;
  me.token = options.security.token;
  me.role = static_cast<Role>(client->cluster_.self().role());
  me.rank = client->cluster_.self().rank();
  me.key = client->cluster_.session_key();
  client->last_answer_ = SteadyNow();
  client->spare_ = req.spare();
  return client;
}

CoordinatorClient::~CoordinatorClient() { StopHeartbeats(); }

void CoordinatorClient::StartHeartbeats(
    std::function<void(const proto::HeartbeatResponse&)> on_answer,
    std::function<void(const absl::Status&)> on_lost) {
  if (heartbeats_.joinable()) heartbeats_.join();  // stopped before
  {
    std::lock_guard<std::mutex> lock(mu_);
    on_answer_ = std::move(on_answer);
    on_lost_ = std::move(on_lost);
    stop_ = false;
    lost_ = false;
    last_answer_ = SteadyNow();
  }
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    stopping_ = false;
  }
  heartbeats_ = std::thread([this] {
    // The first at once: the coordinator's timeout for this node started
    // when it answered the registration.
    for (;;) {
      // Not after the coordinator is lost: the node's calls have failed,
      // and a heartbeat rejoining a restarted coordinator made it count
      // this node as alive.
      if (!Beat()) return;
      std::unique_lock<std::mutex> lock(sleep_mu_);
      if (wake_.wait_for(lock, absl::ToChronoMilliseconds(kHeartbeatPeriod),
                         [this] { return stopping_; })) {
        return;
      }
    }
  });
}

void CoordinatorClient::HeartbeatNow() { (void)Beat(); }
void CoordinatorClient::ReportUnreachable(int server) { (void)Beat(server); }

void CoordinatorClient::Reassign(const proto::RegisterResponse& assignment) {
  std::lock_guard<std::mutex> lock(mu_);
  cluster_ = assignment;
  caller_.rank = assignment.self().rank();
  caller_.key = assignment.session_key();
  spare_ = false;
}

bool CoordinatorClient::Beat(int unreachable_server) {
  proto::HeartbeatRequest req;
  grpc::ClientContext ctx;
  {
    std::lock_guard<std::mutex> lock(mu_);  // Reassign may change them
    // Stopped (a worker that left, a server shutting down) or lost: none,
    // which could rejoin a restarted coordinator.
    if (lost_ || stop_) return false;
    req.set_role(cluster_.self().role());
    req.set_rank(cluster_.self().rank());
    caller_.Stamp(&ctx);
  }
  if (unreachable_server >= 0) req.add_unreachable_servers(unreachable_server);
  proto::HeartbeatResponse resp;
  ctx.set_deadline(In(kHeartbeatDeadline));
  const int64_t sent_us = trace::NowMicros();
  absl::Status s = FromGrpc(stub_->Heartbeat(&ctx, req, &resp));
  const int64_t answered_us = trace::NowMicros();
  const bool rejoin = absl::IsNotFound(s);
  if (rejoin) s = Rejoin();
  std::lock_guard<std::mutex> lock(mu_);
  if (lost_ || stop_) return false;
  if (rejoin && s.ok()) return true;  // the next heartbeat goes to the restarted coordinator
  if (s.ok()) {
    last_answer_ = SteadyNow();
    warned_silent_ = false;
    for (const proto::NodeInfo& dead : resp.dead()) {
      auto [it, added] = heard_dead_.try_emplace({dead.role(), dead.rank()}, dead);
      if (!added && dead.incarnation() > it->second.incarnation()) it->second = dead;
    }
    heard_finished_.insert(resp.finished_workers().begin(), resp.finished_workers().end());
    for (const proto::NodeInfo& r : resp.replacements()) {
      int& known = heard_incarnation_[r.rank()];
      known = std::max(known, r.incarnation());
    }
    // The coordinator's clock read halfway through the round trip, from
    // the fastest round trip so far (the least uncertain): this node's
    // offset for the job's timeline.
    const int64_t rtt = answered_us - sent_us;
    if (resp.time_us() > 0 && (best_rtt_us_ < 0 || rtt < best_rtt_us_)) {
      best_rtt_us_ = rtt;
      trace::SetClockOffset(resp.time_us() - (sent_us + answered_us) / 2, (rtt + 1) / 2);
    }
    if (on_answer_) on_answer_(resp);
    return true;
  }
  // A refusal (a wrong token or key, or a rejoin refused) will not mend.
  const bool refused = absl::IsUnauthenticated(s) || absl::IsPermissionDenied(s) ||
                       (rejoin && !absl::IsUnavailable(s) && !absl::IsDeadlineExceeded(s));
  const absl::Duration silent = SteadyNow() - last_answer_;
  if (!refused && silent < options_.lost_after) {
    if (absl::IsDeadlineExceeded(s)) SaySilent();
    return true;
  }
  lost_ = true;
  if (!on_lost_) return false;
  if (refused) {
    on_lost_(absl::UnavailableError(absl::StrCat(
        "the coordinator at ", options_.address,
        rejoin ? " refused this node's rejoining: " : " refused this node's heartbeat: ",
        s.message())));
  } else {
    on_lost_(absl::UnavailableError(absl::StrCat(
        "the coordinator at ", options_.address, " is unreachable: no answer for ",
        absl::FormatDuration(absl::Trunc(silent, absl::Seconds(1))), ": ", s.message())));
  }
  return false;
}

void CoordinatorClient::SaySilent() {
  if (warned_silent_) return;
  warned_silent_ = true;
  SayCoordinatorSilent(
      absl::StrCat(caller_.role == Role::kServer ? "server " : "worker ", caller_.rank),
      options_.address, SteadyNow() - last_answer_, "going on without it", options_.lost_after);
}

absl::Status CoordinatorClient::Rejoin() {
  proto::RegisterRequest req;
  Role role;
  int rank;
  {
    std::lock_guard<std::mutex> lock(mu_);
    req.set_role(cluster_.self().role());
    req.set_rank(cluster_.self().rank());
    req.set_address(cluster_.self().address());
    // Without it a restarted coordinator told everyone this server takes
    // no stream connections, and they fell back to gRPC.
    req.set_stream_address(cluster_.self().stream_address());
    req.set_incarnation(cluster_.self().incarnation());
    req.set_session_key(caller_.key);
    req.set_spare(spare_);
    role = caller_.role;
    rank = caller_.rank;
    for (const auto& [node, info] : heard_dead_) {
      // Not a server whose rank a replacement took since.
      auto replaced = heard_incarnation_.find(info.rank());
      if (info.role() == proto::SERVER && replaced != heard_incarnation_.end() &&
          replaced->second > info.incarnation()) {
        continue;
      }
      *req.add_dead() = info;
    }
    for (int finished : heard_finished_) req.add_finished_workers(finished);
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(In(kHeartbeatDeadline));
  Caller{options_.security.token}.Stamp(&ctx);  // the token alone, as at registration
  proto::RegisterResponse resp;
  const absl::Status s = FromGrpc(stub_->Register(&ctx, req, &resp));
  if (s.ok()) {
    std::cerr << (role == Role::kServer ? "server " : "worker ") << rank
              << ": rejoined the coordinator at " << options_.address << " (it had restarted)"
              << std::endl;
    std::lock_guard<std::mutex> lock(mu_);
    last_answer_ = SteadyNow();
    warned_silent_ = false;
  }
  return s;
}

absl::Status CoordinatorClient::UntilAnswered(
    const std::string& what, absl::Time deadline,
    const std::function<grpc::Status(grpc::ClientContext*)>& call, absl::Duration attempt) {
  std::optional<absl::Time> away_since;  // the first call it could not take
  for (;;) {
    grpc::ClientContext ctx;
    const absl::Time attempt_deadline = std::min(deadline, absl::Now() + attempt);
    ctx.set_deadline(absl::ToChronoTime(attempt_deadline));
    {
      std::lock_guard<std::mutex> lock(mu_);
      caller_.Stamp(&ctx);
    }
    absl::Status s = FromGrpc(call(&ctx));
    if (absl::IsNotFound(s)) {
      const absl::Status rejoined = Rejoin();
      if (rejoined.ok()) {
        away_since.reset();  // it is back: a later outage has its own time
        continue;
      }
      if (!absl::IsUnavailable(rejoined)) return Doing(what, rejoined);
    } else if (absl::IsDeadlineExceeded(s) && attempt_deadline < deadline &&
               absl::Now() >= attempt_deadline) {
      // An attempt it took and did not answer: hung (the launcher may
      // restart it), or slow; made again. (Not its own answer of
      // DEADLINE_EXCEEDED, such as a barrier's that a worker missed.)
      away_since.reset();  // it took the call
      std::lock_guard<std::mutex> lock(mu_);
      SaySilent();
      continue;
    } else if (absl::IsDeadlineExceeded(s) && absl::Now() >= deadline) {
      // The coordinator answers a call that waits too long itself, before
      // the deadline (rpc::GiveUpBefore): this one it took and never answered.
      return absl::UnavailableError(absl::StrCat(
          what, "the coordinator at ", options_.address, " is unreachable: it took the call but "
          "did not answer by the deadline (hung?)"));
    } else if (!absl::IsUnavailable(s)) {
      return Doing(what, s);
    }
    // Away: waited for up to the deadline, and for no longer than a
    // heartbeat would wait for it.
    const absl::Time now = absl::Now();
    if (!away_since.has_value()) away_since = now;
    if (now + absl::Milliseconds(200) >= std::min(deadline, *away_since + options_.lost_after)) {
      return absl::UnavailableError(absl::StrCat(
          what, "the coordinator at ", options_.address, " is unreachable: away (or restarting) for ",
          absl::FormatDuration(absl::Trunc(now - *away_since, absl::Seconds(1))), ": ",
          s.message()));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
}

void CoordinatorClient::StopHeartbeats() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (heartbeats_.joinable()) heartbeats_.join();
}

absl::Status CoordinatorClient::Barrier(int64_t epoch) {
  trace::Span span("coordinator", "barrier", absl::StrCat("\"epoch\":", epoch));
  proto::BarrierRequest req;
  req.set_rank(caller_.rank);
  req.set_epoch(epoch);
  proto::BarrierResponse resp;
  return UntilAnswered("barrier: ", absl::Now() + options_.rpc_timeout,
                       [&](grpc::ClientContext* ctx) { return stub_->Barrier(ctx, req, &resp); });
}

absl::Status CoordinatorClient::Leave() {
  proto::LeaveRequest req;
  req.set_rank(caller_.rank);
  proto::LeaveResponse resp;
  // Answered at once by a coordinator that runs: a hung one is given up as
  // heartbeats give it up, and each attempt waits as long as a heartbeat
  // does (the node then says the coordinator is silent, and the launcher
  // may restart it meanwhile).
  return UntilAnswered(
      "leaving the job: ", absl::Now() + options_.lost_after,
      [&](grpc::ClientContext* ctx) { return stub_->Leave(ctx, req, &resp); }, kHeartbeatDeadline);
}

}  // namespace rpc
}  // namespace mx
