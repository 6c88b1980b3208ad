// Who may talk to a job's nodes: mutual TLS, the job token and the nodes'
// registered identities.
//
// Three checks, each on every RPC of a job:
// - TLS (when configured): every connection is mutual TLS; a peer without a
//   certificate signed by the job's CA is refused at the handshake.
// - The job token (when configured): a secret every node of the job holds
//   (the launcher generates it); each call carries it and servers and the
//   coordinator compare it in constant time. A call without it, or with
//   another, is UNAUTHENTICATED and nothing of it is applied.
// - Identity: at registration the coordinator gives each node a random
//   session key and tells the servers the workers' keys. A call that acts
//   for a worker or server rank (a push, a heartbeat, a barrier) carries its
//   node and key, and is PERMISSION_DENIED unless they are those of the rank
//   it claims.
// A call carries its claims (token, node and key) in its metadata, except
// the data path's (Push, Pull, PushPull, PushPullMany), which carry them in
// the request (proto::Credential): gRPC charges about 5 us per call for any
// custom metadata. A refused call is counted and logged once per peer host
// and reason.
//
// This header includes no gRPC header.
#ifndef MX_RPC_SECURITY_H_
#define MX_RPC_SECURITY_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "absl/status/statusor.h"

#include "rpc/server_context.h"

namespace grpc {
class ClientContext;
}  // namespace grpc

namespace mx {
namespace rpc {

// The roles of a job's nodes, numbered as proto::Role.
enum class Role { kWorker = 0, kServer = 1 };
const char* RoleName(Role role);

// A node's settings for TLS and the job token. Empty fields: not
// configured (plaintext, no token).
struct Security {
  // The job token.
  std::string token;
  // PEM: this node's certificate and private key, and the job's CA.
  std::string tls_cert, tls_key, tls_ca;
  // The name (a DNS SAN) that servers' certificates carry, checked instead
  // of the host of the address dialled; empty: that host. Job-private CAs
  // (launch.py --tls) give every certificate one name, so that the nodes'
  // addresses (pod IPs, IPv6) need not be known when they are issued.
  std::string tls_server_name;

  bool tls() const { return !tls_cert.empty(); }

  // From the environment: MX_JOB_TOKEN, or the first line of the file
  // MX_JOB_TOKEN_FILE; MX_TLS_CERT, MX_TLS_KEY and MX_TLS_CA (file paths,
  // all three or none) and MX_TLS_SERVER_NAME. Errors name the variable and
  // the file.
  static absl::StatusOr<Security> FromEnvironment();
  // A file setting and where it came from ("MX_TLS_CERT", "--tls_cert"),
  // which errors name.
  struct File {
    std::string path;
    std::string from;
  };
  // The same from explicit values: `token_file` when `token` is empty.
  static absl::StatusOr<Security> Load(const std::string& token, const File& token_file,
                                       const File& cert, const File& key, const File& ca,
                                       const std::string& server_name);
};

// A random session key (32 hex digits from the kernel's generator).
std::string NewSessionKey();

// Whether a and b are equal, in time that depends only on their lengths.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

// What a call says about its caller: the job token, and the node it acts
// for ("worker/3:KEY" with its session key, which implies the token, or
// "worker/3" beside the token); either may be empty.
struct Claims {
  std::string token;
  std::string node;

  // A call's claims from its metadata ("mx-job-token", "mx-node").
  static Claims Of(const ServerContext& ctx);
};

// What a client says about itself on each call: the job token and, once
// registered, its node and session key.
struct Caller {
  std::string token;
  Role role = Role::kWorker;
  int rank = -1;    // -1: not registered (only Register may be called)
  std::string key;  // the session key the coordinator gave

  // A registered node (with a key) claims its identity alone, "worker/3:KEY";
  // others the token and the rank they claim, if any.
  Claims claims() const;
  // Adds claims() to a call's metadata.
  void Stamp(grpc::ClientContext* ctx) const;
};

// The server side of the checks: one per server (a parameter server, the
// coordinator), on every handler before it reads the request.
class Guard {
 public:
  // `token`: the job's ("" accepts calls without one: an open job).
  // `identities`: whether calls acting for a node must carry its session
  // key; until the keys of a role are known (Admit), such calls wait for
  // them up to 10 s, then fail UNAVAILABLE.
  Guard(std::string token, bool identities);

  // Node `rank` of `role` holds `key` from now on.
  void Admit(Role role, int rank, const std::string& key);
  // Every node of `role` is admitted: calls waiting for keys go on.
  void AdmitAll(Role role);
  // The session key admitted for a node; "" when none was.
  std::string Key(Role role, int rank) const;

  // A node of the job, as a call's metadata names it.
  struct Node {
    Role role = Role::kWorker;
    int rank = -1;  // -1: unknown (a guard without identity checks)
  };

  // The checks below take the call's claims from its metadata, or, given
  // `claims`, from those (the data path's, from the request); `ctx` names
  // the peer in the log.
  //
  // The job token of a call (Register: before a node has a key); `method`
  // names it in the error.
  absl::Status CheckToken(const ServerContext& ctx, const char* method);
  // The same for a token the call carries elsewhere (a stream's hello).
  absl::Status CheckToken(const ServerContext& ctx, const char* method,
                          const std::string& token);
  // Which registered node of `role` the caller is: its session key, which
  // implies the token. A call without a valid key is refused
  // UNAUTHENTICATED without the job token, else PERMISSION_DENIED.
  // Without identity checks: the token, and a node of rank -1.
  absl::StatusOr<Node> Identify(const ServerContext& ctx, const char* method, Role role);
  absl::StatusOr<Node> Identify(const ServerContext& ctx, const char* method, Role role,
                                const Claims& claims);
  // The same for a node of either role.
  absl::StatusOr<Node> IdentifyAny(const ServerContext& ctx, const char* method);
  // That `caller` (as identified) is node `rank` of `role`, which its
  // request claims to be.
  absl::Status CheckClaim(const ServerContext& ctx, const char* method,
                          const Node& caller, Role role, int rank);

  // Calls refused so far (all reasons).
  int64_t refused() const { return refused_.load(); }

 private:
  // Counts and (once per peer host and reason) logs a refusal; returns it.
  absl::Status Refuse(const ServerContext& ctx, absl::Status why);
  absl::StatusOr<Node> IdentifyAny(const ServerContext& ctx, const char* method,
                                   const Claims& claims);
  absl::StatusOr<std::string> KeyOf(Role role, int rank);

  const std::string token_;
  const bool identities_;
  std::atomic<int64_t> refused_{0};
  // Guards the fields below (std::mutex, as rpc/coordinator_client.h).
  mutable std::mutex mu_;
  std::map<std::pair<Role, int>, std::string> keys_;
  std::set<Role> admitted_all_;
  std::condition_variable admitted_;  // notified by Admit and AdmitAll
  std::set<std::string> logged_;      // "host reason"
};

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_SECURITY_H_
