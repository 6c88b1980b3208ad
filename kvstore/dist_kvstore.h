// The distributed KVStore client (dist_sync, dist_async): a worker's view of
// the parameter servers.
//
// Keys are partitioned across servers by kvstore/placement.h: a key is cut
// into slices (one per server for keys of 64 KB or more per server; at most
// `big_key_bound` elements each), dealt round-robin from the server its
// hash picks; small keys live whole on that server. Slices on different
// servers are pushed and pulled in parallel.
// Pushes and pulls are engine operations with gRPC calls in flight; every
// call has a deadline, and a failure (a server that died, a bad request) is
// stored on the pull's outputs with a message naming the server and key.
//
// This header includes no gRPC or protobuf header.
#ifndef MX_KVSTORE_DIST_KVSTORE_H_
#define MX_KVSTORE_DIST_KVSTORE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvstore/kvstore.h"
#include "rpc/security.h"

namespace mx {

struct DistKVStoreOptions {
  std::vector<std::string> servers;  // host:port, by server rank
  // Where each server (by rank) takes its stream connections (host:port,
  // rpc/stream.h), which then carry pushes and pulls instead of gRPC;
  // empty, or "" for a server: gRPC. With TLS, they are TLS too.
  std::vector<std::string> stream_addresses;
  int rank = 0;                      // this worker
  int num_workers = 1;
  bool sync = true;                  // dist_sync, else dist_async
  // dist_device_sync (with sync): a push's device copies are summed on the
  // GPU of one of them (keys take the copies' devices in turn), and only the
  // sum crosses to the host; dist_sync copies each to the host and sums
  // there. Either way values and outputs may be on any context.
  bool device_sums = false;
  // Placement (kvstore/placement.h), in elements; every worker of a job
  // must use the same values.
  int64_t big_key_bound = 1 << 20;   // keys this big are cut at this size
  int64_t min_slice = 16 << 10;      // smaller keys are not cut smaller
  // Training sends gradients in buckets of about this many bytes, each one
  // call per server (KVStore::bucket_bytes): every call costs a round trip
  // of fixed overhead, so small keys travel together.
  int64_t bucket_bytes = 4 << 20;
  // TCP connections to each server; keys are spread over them.
  int connections_per_server = 2;
  absl::Duration rpc_timeout = absl::Seconds(30);
  // Copies of each key's state on the servers: 1, or 2 (a primary and a
  // backup, the next server; docs/architecture.md, "Replicas"). With 2, a
  // server the coordinator declares dead is no failure: its keys' calls go
  // to their backups, after the pushes those may lack (the store keeps
  // each dist_sync push until the pull of its step returns); a server that
  // does not answer is reported to the coordinator, which checks it.
  int replicas = 1;
  // dist_sync with bounded staleness (stale synchronous parallel): a pull
  // after this worker's t-th push of a key waits only for step t - s, so a
  // worker runs at most s steps ahead of the slowest live worker, and its
  // pulls may return values that lack up to s steps (the newest the
  // server holds). Steps are still summed in rank order, so s = 0 is
  // dist_sync, bit for bit. The servers must be started with the same s.
  int staleness = 0;
  // Elastic job: a worker the coordinator declares dead is ignored (the
  // servers finish steps without it); a dead server or an unreachable
  // coordinator still fails the store.
  bool elastic = false;
  // TLS and the job token of every call (rpc/security.h).
  rpc::Security security;
  // This worker's session key from the coordinator, sent with every call
  // as its identity; empty: none (servers that check no identities).
  std::string session_key;
  // Shared memory with the servers on this host (docs/architecture.md,
  // "Shared memory"): a directory both reach; empty: none. The store makes
  // one segment of shm_bytes per server there and hands it over
  // (AttachSegment); dense values of at least 16 KiB then travel through
  // it, and only where they lie goes over the network. A server that
  // cannot take it (another host, no --shm_dir) gets values as before.
  // Not for compressed pushes (packed), nor to a spare that took a dead
  // server's rank (it was never handed a segment).
  // The segments are sparse: memory backs only what calls have used at
  // once (held values included), committed as it is first needed.
  std::string shm_dir;
  int64_t shm_bytes = int64_t{1} << 30;
};

absl::StatusOr<std::unique_ptr<KVStore>> CreateDistKVStore(const DistKVStoreOptions& options);

// KVStore::Create("dist_sync" | "dist_async") for a worker started by the
// launcher: registers with the coordinator at MX_COORDINATOR (host:port) or
// DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT, asking for rank MX_RANK if set (the
// launcher sets it to the index that labels the worker's log lines; else the
// lowest rank free), learns its rank and the servers, and
// heartbeats every second; a node the coordinator declares dead makes the
// calls in flight and later calls fail with its role, rank and address, and
// so does losing the coordinator (rpc::CoordinatorClient's rule). TLS and
// the job token come from MX_TLS_* and MX_JOB_TOKEN(_FILE)
// (rpc::Security::FromEnvironment).
// MX_RPC_TIMEOUT_S bounds every call (default 30). MX_REPLICAS=2 (set by
// `launch.py --replicas=2`) keeps two copies of every key
// (DistKVStoreOptions::replicas); the servers must run with --replicas=2. MX_ELASTIC=1 (set by
// `launch.py --elastic`) makes the store ignore dead workers
// (DistKVStoreOptions::elastic); the servers and the coordinator must then
// run with --elastic too. MX_SHM_DIR (set by launch.py for jobs on one
// host) and MX_SHM_MB give DistKVStoreOptions::shm_dir and shm_bytes.
absl::StatusOr<std::unique_ptr<KVStore>> CreateDistKVStoreFromEnvironment(const std::string& type);

}  // namespace mx

#endif  // MX_KVSTORE_DIST_KVSTORE_H_
