// The coordinator: rendezvous (ranks and the cluster view), heartbeats and
// barriers for one job.
//
// Nodes register with their role; Register answers once every expected node
// has registered (or the caller's deadline passes). Nodes then heartbeat;
// one not heard from for `heartbeat_timeout` is declared dead, and every
// heartbeat answer lists the dead nodes, so servers and workers learn of a
// failure within a heartbeat interval. Barrier(epoch) returns when every
// live worker has entered it. A worker's death fails every barrier, naming
// it; with `elastic` the dead worker is left out and the barrier completes
// with the live ones (a dead server is not the coordinator's concern: the
// workers that use it fail). A worker that finished calls Leave; once
// every worker has, heartbeat answers tell the servers to shut down, and
// finished() turns true when each has been told.
//
// The coordinator holds no parameter state and may restart: one started
// on the same address answers calls of nodes it does not know NOT_FOUND,
// and they rejoin it (RegisterRequest.session_key), rebuilding its view;
// a node that has not rejoined within the heartbeat timeout of the first
// rejoin is declared dead. Spare servers (RegisterRequest.spare) wait; a
// dead server's rank goes to a live one (its next incarnation), which is
// announced to every node once it serves. A server that nodes keep
// reporting unreachable for a heartbeat timeout is declared dead even if
// it answers the coordinator's health check (a partition).
//
// Every call must carry the job token (when options.security has one);
// Register answers each node with its session key, and every later call
// must come from the node it acts for (rpc/security.h). Its grpc.health.v1
// status is SERVING from the start.
#ifndef MX_SERVER_COORDINATOR_H_
#define MX_SERVER_COORDINATOR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "rpc/security.h"

namespace mx {

struct CoordinatorOptions {
  int num_servers = 1;
  int num_workers = 1;
  absl::Duration heartbeat_timeout = absl::Seconds(5);
  // The job fails when not every node has registered (or rejoined) within
  // this time of the coordinator's start: the nodes gave up by then too
  // (a coordinator restarted after the job ended ends so).
  absl::Duration startup_timeout = absl::Seconds(120);
  bool elastic = false;  // barriers continue without dead workers
  rpc::Security security;  // TLS and the job token; none: plaintext, open
};

class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(
      const std::string& bind_address, CoordinatorOptions options);
  ~CoordinatorServer();
  const std::string& address() const { return address_; }
  // Every worker has finished (Leave) or died, and every live server has
  // been told to shut down.
  bool finished() const;
  // Why the job failed, "" unless it did: every worker died before any
  // finished (declared dead by heartbeat timeout), or not every node
  // registered within the startup timeout. The servers are told, and stop
  // with that error; the coordinator is then finished().
  std::string failure() const;
  // Calls refused for a missing or wrong token or identity.
  int64_t refused() const;
  // The time since the sweep (every 100 ms: heartbeat timeouts, waiting
  // calls' answers) last ended, without a lock: a sweep stuck on the
  // coordinator's lock shows here (mx_server's /livez).
  absl::Duration SinceLastSweep() const;

 private:
  CoordinatorServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string address_;
};

}  // namespace mx

#endif  // MX_SERVER_COORDINATOR_H_
