// The parameter server's gRPC KVStore service over a ParameterShard.
#ifndef MX_SERVER_KVSTORE_SERVICE_H_
#define MX_SERVER_KVSTORE_SERVICE_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/wire.h"
#include "rpc/security.h"
#include "server/shard.h"

namespace mx {

struct ParameterServerOptions {
  // A request larger than this many MiB (1 to 1024) is refused
  // (RESOURCE_EXHAUSTED, from gRPC) and the server goes on serving.
  int max_message_mb = 1024;
  // TLS and the job token; none: plaintext, and any caller's token passes.
  rpc::Security security;
  // Whether every call must come from a registered worker acting for
  // itself (mx_server's servers, which register with a coordinator): calls
  // wait (up to 10 s) until AdmitWorkers names the workers. Off (tests that
  // hand workers the servers' addresses), any rank may be claimed.
  bool identities = false;
  // The directory of the shared memory the workers on this host hand the
  // server (rpc/shared_memory.h, AttachSegment); empty: none taken.
  std::string shm_dir;
  // The port (on the bind address's host; 0: a free one) of the stream
  // connections (rpc/stream.h) that carry the data path's calls (Push,
  // Pull, PushPull, PushPullMany, and replicas' Replicate from the other
  // servers) beside gRPC; -1: none. With TLS configured they are TLS
  // too (rpc/stream_tls.h).
  int stream_port = -1;
};

// Replicas 2 (docs/architecture.md, "Replicas"): where a server sends the
// steps of the keys it holds as primary.
struct ReplicationOptions {
  int rank = -1;                     // this server's
  std::vector<std::string> servers;  // every server's address, by rank
  // Every server's stream address (rpc/stream.h), by rank; "" or missing:
  // none, and steps to that server go through gRPC.
  std::vector<std::string> stream_servers;
  rpc::Security security;
  rpc::Claims claims;  // this server's identity on its calls to backups
  // Called (from the replication thread, which it may block briefly) when
  // a backup does not answer: the coordinator should check it.
  std::function<void(int server)> unreachable;
  absl::Duration rpc_timeout = absl::Seconds(10);  // of each call
  // The most bytes of steps' values one call carries (more go in the next
  // calls). StartReplication sets it from the server's own largest message.
  size_t max_call_bytes = size_t{1} << 30;
};

// A step for a backup as it goes in a ReplicateRequest (its entry in
// `steps`); ReplicaStep::WireBytes bounds its size.
EncodedMessage EncodeReplicaStep(const ReplicaStep& step);

// A running parameter server: a gRPC server on `bind_address` (host:port;
// port 0 picks a free one) serving one shard. Every handler checks the
// caller (rpc/security.h) before it reads the request. Stops when
// destroyed: closes the shard (waiting pulls fail at once, kUnavailable)
// and waits for the calls in flight.
class ParameterServer {
 public:
  static absl::StatusOr<std::unique_ptr<ParameterServer>> Start(
      const std::string& bind_address, ShardOptions options,
      const ParameterServerOptions& server_options = {});
  ~ParameterServer();
  // host:port it listens on, with the port actually bound.
  const std::string& address() const { return address_; }
  // host:port of its stream connections; empty: none.
  const std::string& stream_address() const { return stream_address_; }
  ParameterShard& shard() { return *shard_; }
  // The job's workers, by rank, with the session keys the coordinator gave
  // them (RegisterResponse.worker_keys). The server's grpc.health.v1
  // status turns SERVING (with identities, it is NOT_SERVING until then).
  // Without replication started (StartReplication) by then, calls that
  // claim to come from a server are refused from then on.
  void AdmitWorkers(const std::vector<std::string>& keys);
  // This server's rank, once the coordinator has given it (for its logs and
  // replication).
  void SetRank(int rank);
  // The job's servers' session keys, by rank: a backup accepts replicated
  // steps from its primary alone.
  void AdmitServers(const std::vector<std::string>& keys);
  // Replicas 2: from now on, inits that name this server a key's primary
  // or backup (InitRequest.primary, backup) make it one, and the steps of
  // its primary keys go to their backups.
  void StartReplication(ReplicationOptions options);
  // Server `server` was declared dead: this server takes over the keys it
  // is the backup of, and stops replicating to it. Returns the number of
  // keys taken over.
  int ServerDied(int server);
  // Replicas 2: a new server at `address`, holding `session_key`, took the
  // rank of `server` (dead before): its replicated steps come from it now,
  // and the keys here that lost their copy there get one again
  // (ParameterShard::ServerReplaced). Returns the number of keys.
  int ServerReplaced(int server, const std::string& address, const std::string& stream_address,
                     const std::string& session_key);
  // Worker `rank` was declared dead (elastic jobs go on without it) or
  // left the job: the shard stops counting it, and its shared memory is
  // unmapped once no call holds it.
  void WorkerDied(int rank);
  void WorkerLeft(int rank);
  // Shared memory segments the workers attached and hold here.
  size_t shm_segments() const;
  // Calls refused for a missing or wrong token or identity.
  int64_t refused() const;
  // The time since a thread of the server (every 100 ms) last took the
  // shard's lock, read without a lock: a shard stuck on its lock shows here
  // (mx_server's /livez).
  absl::Duration SinceShardChecked() const;

 private:
  ParameterServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<ParameterShard> shard_;
  std::string address_;
  std::string stream_address_;
};

}  // namespace mx

#endif  // MX_SERVER_KVSTORE_SERVICE_H_
