// Internal: the RPC plumbing that the parameter servers, the coordinator
// and the distributed KVStore client share: channels and listening ports
// (with the job's credentials and mx's HTTP/2 settings), deadline policy,
// status conversion and the reactor helper of small methods.
// Only kvstore/ and server/ (and their tests and benchmarks) use it.
#ifndef MX_RPC_RPC_H_
#define MX_RPC_RPC_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "proto/wire.h"
#include "rpc/async.h"
#include "rpc/security.h"

namespace mx {
namespace rpc {

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}
inline absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// Raises this process's soft limit on open files to its hard limit (at
// most 2^20) and returns the soft limit then. Every process that links
// this module does so before main: a server holds two connections per
// worker, a worker two per server, and the common default of 1024 would
// refuse connections from a job of 500 workers. A limit it cannot raise
// stays as it was.
int64_t RaiseOpenFileLimit();

// Initializes gRPC once for the life of the process. Clients and servers
// call it before creating channels: otherwise destroying the last channel
// shuts gRPC down while its callback thread may still be finishing a call.
void KeepGrpcAlive();

// Makes `builder` listen on bind_address (host:port; port 0: a free one,
// written to *port once the server starts) with `security`'s credentials:
// mutual TLS when it has certificates, else plaintext. It listens alone:
// without SO_REUSEPORT (gRPC's default sets it), so a port another daemon
// holds is an error instead of being silently shared (a parameter server
// given an ephemeral port could share the coordinator's, and the kernel
// then handed some Register calls to the server). It sets the HTTP/2 flow
// control and framing of every mx connection (as SharedChannel does).
void Listen(grpc::ServerBuilder* builder, const std::string& bind_address,
            const Security& security, int* port);

// The process's channel to `address` with `security`'s credentials,
// created once and kept: channels are expensive, and one that is destroyed
// while gRPC's callback thread finishes a call on it aborted the process
// (gRPC 1.51, grpc_cq_internal_unref). `connection` numbers separate TCP
// connections to one address (each read and parsed by one gRPC thread at a
// time): several let big transfers to one server proceed in parallel.
std::shared_ptr<grpc::Channel> SharedChannel(const std::string& address, const Security& security,
                                             int connection = 0);

// Makes each of `channels` whose last attempt to connect failed try again
// at once, and waits until those connect, at most until `deadline`. For
// a new user of shared channels (a new store): a server may listen now
// where one died (a restarted one; a test's server given a dead one's
// port), and a channel the dead one refused fails every call at once, not
// trying, until its reconnect backoff ends (up to a second).
void Reconnect(const std::vector<std::shared_ptr<grpc::Channel>>& channels, absl::Time deadline);

// Why calls to `address` cannot connect, when the channel's last attempt
// failed in a way that waiting will not mend: the peer speaks TLS and this
// node does not, or the reverse, or the TLS handshake was refused (a
// certificate not signed by the job's CA). OK otherwise (not yet tried,
// connected, or nothing listening yet).
absl::Status ConnectionProblem(const std::string& address, const Security& security);

// Whether the server at `address` answers a grpc.health.v1 check (SERVING
// or not) within `timeout`: false for a process that is gone (the
// connection is refused) or that hangs (stopped, partitioned).
bool HealthCheck(const std::string& address, const Security& security, absl::Duration timeout);

// When a server gives up on a call that waits for other nodes (a pull for
// the workers' pushes, a registration or barrier for the other nodes): a
// tenth of the time left before the caller's `deadline`, at most 0.5 s
// before it, so that its answer saying what was missing reaches the caller
// before the caller's own DEADLINE_EXCEEDED, which says nothing.
// InfiniteFuture for a call without a deadline.
absl::Time GiveUpBefore(std::chrono::system_clock::time_point deadline);

// Now on the steady clock, as an absl::Time: for how long since an event
// only (a heartbeat's arrival, a node's last answer). On the wall clock a
// step (NTP, a VM resumed) made every node look silent at once, and the
// coordinator declared them all dead; a step back hid a dead one. Never a
// deadline: gRPC's are wall-clock (absl::Now()), and the two do not mix.
inline absl::Time SteadyNow() {
  return absl::UnixEpoch() + absl::FromChrono(std::chrono::steady_clock::now().time_since_epoch());
}

// How long servers and workers wait for every node of the job to register,
// unless MX_STARTUP_TIMEOUT_S (or mx_server --startup_timeout_s) says.
constexpr int kDefaultStartupTimeoutSeconds = 120;
// How often a channel with open calls pings its peer, and how long it
// waits for the answer before the connection counts as broken.
constexpr absl::Duration kKeepalive = absl::Seconds(5);

// Answers a raw method without a tensor at once: checks the caller with
// `check` (a Guard check; its error is the answer and the request is not
// read), parses the request (ParseRequest), calls handle(req, &resp) and
// answers with resp or handle's error.
template <class Req, class Resp, class Check, class Handle>
UnaryReactor* AnswerRequest(const grpc::ByteBuffer& request, grpc::ByteBuffer* response,
                            const char* method, const Check& check, const Handle& handle) {
  Resp resp;
  absl::Status s = check();
  if (s.ok()) {
    absl::StatusOr<Req> req = ParseRequest<Req>(request, method);
    s = req.ok() ? handle(*req, &resp) : req.status();
  }
  if (s.ok()) *response = EncodeMessage(resp);
  auto* reactor = new UnaryReactor;
  reactor->Finish(ToGrpc(s));
  return reactor;
}

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_RPC_H_
