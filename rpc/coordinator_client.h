// Internal: the one client of the coordinator, which parameter servers and
// workers share: registration, heartbeats (one loop, one rule for when the
// coordinator counts as lost), barriers and leaving the job.
#ifndef MX_RPC_COORDINATOR_CLIENT_H_
#define MX_RPC_COORDINATOR_CLIENT_H_

#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/mx.grpc.pb.h"
#include "rpc/security.h"

namespace mx {
namespace rpc {

class CoordinatorClient {
 public:
  static constexpr absl::Duration kHeartbeatPeriod = absl::Seconds(1);
  static constexpr absl::Duration kHeartbeatDeadline = absl::Seconds(2);
  // How long a node goes on without an answer from the coordinator
  // (MX_COORDINATOR_TIMEOUT_S): long enough for a launcher to restart a
  // dead one, which the node then rejoins.
  static constexpr absl::Duration kLostAfter = absl::Seconds(6);

  struct Options {
    std::string address;  // the coordinator's host:port
    Security security;
    // How long registration waits for the coordinator to start and for
    // every node of the job to register.
    absl::Duration startup_timeout = absl::Seconds(120);
    // The deadline of barriers.
    absl::Duration rpc_timeout = absl::Seconds(30);
    // The coordinator counts as lost when no heartbeat has been answered
    // for this long.
    absl::Duration lost_after = kLostAfter;
  };

  // Heartbeats go out every kHeartbeatPeriod with a deadline of
  // kHeartbeatDeadline. The coordinator holds no parameter state, so the
  // node goes on while it is away: a coordinator restarted on the same
  // address answers the node's next heartbeat NOT_FOUND, and the node
  // rejoins it (keeping its rank and session key, and telling it the dead
  // nodes and finished workers it heard of). Barrier and Leave wait for it
  // up to their deadline. A heartbeat it took but did not answer by its
  // deadline (it runs but hangs, or is cut off) makes the node say, once
  // per silence, "<role> <rank>: the coordinator at ADDRESS has not
  // answered for 2s (hung?)...", which the launcher acts on (it restarts a
  // hung coordinator). When no heartbeat has been answered for
  // Options::lost_after, the coordinator counts as lost.

  // Registers `req` with the coordinator, waiting up to the startup timeout
  // for it to start and for every node to register. Errors start with
  // "registering with the coordinator at ADDRESS: ". One that never
  // answered is UNAVAILABLE saying so; a peer that speaks TLS to a
  // plaintext node, or the reverse, or refuses the TLS handshake, is
  // FAILED_PRECONDITION at once, saying which.
  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Register(
      Options options, const proto::RegisterRequest& req);
  ~CoordinatorClient();  // stops heartbeats

  // The registration's answer: this node, the servers and the workers.
  // (A spare's, until Reassign: itself alone.)
  const proto::RegisterResponse& cluster() const { return cluster_; }
  // What this node says about itself on calls (token, node, session key).
  const Caller& caller() const { return caller_; }
  // A spare server takes a dead server's rank: `assignment` (from a
  // heartbeat answer) is its cluster from now on, and its calls act for
  // that rank. Only while heartbeats are stopped.
  void Reassign(const proto::RegisterResponse& assignment);
  const std::string& address() const { return options_.address; }

  // Heartbeats from a thread until Stop: each answer goes to on_answer;
  // when the coordinator is lost, on_lost gets why ("the coordinator at
  // ADDRESS is unreachable: ...") once, and heartbeats stop. May start
  // again after StopHeartbeats.
  void StartHeartbeats(std::function<void(const proto::HeartbeatResponse&)> on_answer,
                       std::function<void(const absl::Status&)> on_lost);
  // One heartbeat now, handled as the loop handles its own.
  void HeartbeatNow();
  // The same, reporting that this node's calls cannot reach server
  // `server` (HeartbeatRequest.unreachable_servers).
  void ReportUnreachable(int server);
  void StopHeartbeats();

  // Waits until every live worker has entered barrier `epoch`.
  absl::Status Barrier(int64_t epoch);
  // This worker has finished the job (waiting for an absent coordinator
  // up to Options::lost_after).
  absl::Status Leave();

 private:
  CoordinatorClient(Options options, std::unique_ptr<proto::Coordinator::Stub> stub)
      : options_(std::move(options)), stub_(std::move(stub)) {}
  // One heartbeat, none once stopped or lost; whether the coordinator is
  // still there (false: stopped, or lost, which on_lost heard).
  bool Beat(int unreachable_server = -1);
  // Registers again with a restarted coordinator (RegisterRequest.session_key).
  absl::Status Rejoin();
  // `call(ctx)` until the coordinator answers it or `deadline` passes: a
  // call it could not take (UNAVAILABLE: away, or restarting) is made again
  // every 200 ms, one it took before this node rejoined (NOT_FOUND) after
  // rejoining, and one not answered within `attempt` (SaySilent) at once.
  // `what` starts the error.
  absl::Status UntilAnswered(const std::string& what, absl::Time deadline,
                             const std::function<grpc::Status(grpc::ClientContext*)>& call,
                             absl::Duration attempt = absl::InfiniteDuration());
  // Says (once per silence: until the coordinator answers again) that it
  // took a call and did not answer it. Needs mu_.
  void SaySilent();

  const Options options_;
  std::unique_ptr<proto::Coordinator::Stub> stub_;
  proto::RegisterResponse cluster_;
  Caller caller_;

  // Serializes heartbeats' handling; guards the fields below it.
  std::mutex mu_;
  std::function<void(const proto::HeartbeatResponse&)> on_answer_;
  std::function<void(const absl::Status&)> on_lost_;
  absl::Time last_answer_;  // of the coordinator (SteadyNow), to a heartbeat or a (re)registration
  // What heartbeat answers said, which a rejoin tells a restarted coordinator.
  std::map<std::pair<int, int>, proto::NodeInfo> heard_dead_;  // by (role, rank)
  std::set<int> heard_finished_;
  std::map<int, int> heard_incarnation_;  // of servers replaced, by rank
  bool spare_ = false;  // a spare server not assigned a rank yet
  int64_t best_rtt_us_ = -1;  // the fastest heartbeat's round trip
  bool warned_silent_ = false;  // that the coordinator has not answered, since its last answer
  bool lost_ = false;
  bool stop_ = false;
  // The loop sleeps here between heartbeats; StopHeartbeats wakes it.
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  bool stopping_ = false;  // guarded by sleep_mu_
  std::thread heartbeats_;
};

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_COORDINATOR_CLIENT_H_
