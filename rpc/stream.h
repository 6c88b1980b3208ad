// The data path's calls on plain TCP connections ("streams"), beside
// gRPC: the same methods, handlers and serialized messages, framed
// directly on a socket whose two directions each have a thread of their
// own at both ends.
//
// Why: gRPC's HTTP/2 transport reads and writes a connection in turn on
// one thread, so a connection never moves bytes both ways at once, and
// its framing and polling cost a small call about half its round trip.
// Measured across processes on this project's 2-core machines, pushpull
// of 1 MiB values with 8 in flight (each worker push answered with the
// pull) moved 2.1-2.5 GB/s through mx's gRPC transport and 1.0-1.9 GB/s
// through a plain gRPC echo, 0.3-0.6 of one-way loopback TCP (3.5-4.6
// GB/s); the same calls framed on a TCP connection as here moved 3.8-4.5
// GB/s (exp rawpp, 0.9-1.05 of one-way TCP).
//
// Wire format (little-endian):
// - hello, once, client to server: "MXS1", u32 token length, the job
//   token (the server compares it in constant time; a wrong one gets an
//   answer with call id 0 and UNAUTHENTICATED, then the connection ends);
// - request: u32 method length, u32 0, u64 call id (> 0), i64 the
//   caller's time left (microseconds), u64 body length; the method
//   ("/mx.proto.KVStoreService/PushPull"); the body: the serialized
//   request, as a gRPC call carries it;
// - answer: u64 call id, i32 status code, u32 message length, u64 body
//   length; the status message; the body (the response, if OK). Answers
//   come in the order calls finish, not the order they came.
// A client may have an answer's last bytes (a pulled tensor's data) read
// straight into their destination (AnswerPlacement).
// Anything malformed ends the connection, naming the peer in the log;
// the server serves its other connections on.
//
// Trust: the hello's job token (StreamOptions::guard), and the claims
// (node and session key) that every data-path request carries in its
// body, checked by the same handlers as over gRPC. With TLS, each
// connection starts with a mutual TLS 1.3 handshake and everything after
// it (the hello included) travels in sealed records (rpc/stream_tls.h).
//
// Failures: each call has a deadline (DEADLINE_EXCEEDED, "Deadline
// Exceeded", as gRPC says); a connection that breaks (the peer died, a
// read or write failed, or TCP keepalive gave up after about 10 s without
// an answer: a hung peer or a partition) fails its calls UNAVAILABLE,
// and the next call makes a new one. Server side, a broken connection
// cancels its open calls (the reactors' OnCancel).
#ifndef MX_RPC_STREAM_H_
#define MX_RPC_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "rpc/security.h"
#include "rpc/stream_tls.h"

namespace mx {
namespace rpc {

class AsyncServer;
class Guard;

// What a server serves on its stream connections.
struct StreamOptions {
  // Checks the job token of each connection's hello (counted and logged
  // once per peer host as the Guard does for calls); null: none checked.
  // Must outlive the listener.
  Guard* guard = nullptr;
  // A larger request is refused RESOURCE_EXHAUSTED (its bytes read and
  // dropped), as gRPC refuses one over its limit.
  size_t max_message_bytes = size_t{1} << 30;
  // The methods (routed on the AsyncServer) streams may call: those whose
  // requests carry their callers' claims (the data path's). Others are
  // answered UNIMPLEMENTED.
  std::set<std::string> methods;
  // With TLS: every connection shakes hands first (rpc/stream_tls.h), and
  // one that fails is logged and ends.
  std::shared_ptr<const StreamTls> tls;
  // How long a new connection may take to shake hands (TLS) and say its
  // hello; then it ends, so that connections that say nothing do not hold
  // a thread each.
  absl::Duration hello_time = absl::Seconds(10);
  // Connections open at once (each holds two threads): a further one is
  // closed at once, and one the system refuses a thread for is closed too,
  // so that many connections (up to the hello time each, from anyone who
  // reaches the port) cannot end the process. docs/scaling.md's 1,000
  // workers need about 2,000.
  int max_connections = 8192;
};

// A connected TCP socket (blocking, tuned as the data path's: no delay,
// keepalive) to "host:port" (the host a name or [v6]), or why not, within
// `timeout` per address tried: a peer that drops SYNs does not hold it for
// the kernel's minutes of retries. The caller closes it.
absl::StatusOr<int> ConnectTcp(const std::string& address, absl::Duration timeout);

// How long a client's TLS handshake may take.
constexpr absl::Duration kHandshakeTime = absl::Seconds(10);

// A server's stream connections: accepts them on a port of its own and
// dispatches their calls to the AsyncServer's handlers (AsyncServer::
// ServeStreams makes one).
class StreamListener {
 public:
  StreamListener(AsyncServer* server, StreamOptions options);
  ~StreamListener();  // Stop(now)
  // Listens on host:port (port 0: a free one); returns the port.
  absl::StatusOr<int> Listen(const std::string& host, int port);
  // Stops taking connections and requests; the calls open go on until
  // they are answered or `deadline`, when their connections end (their
  // reactors' OnCancel). The AsyncServer waits for the calls to end.
  void Stop(absl::Time deadline);

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

// A client call on a stream connection.
class StreamCall {
 public:
  virtual ~StreamCall() = default;
  // Ends the call CANCELLED, unless it has ended: its callback runs (on
  // this thread, or the connection's). Any thread.
  virtual void Cancel() = 0;
};

// Where stream calls go: a server's stream endpoint (host:port), one of
// several connections to it (calls on one connection start in order), the
// job token its hello carries, and TLS (null: plaintext).
struct StreamTarget {
  std::string address;
  int connection = 0;
  std::string token;
  std::shared_ptr<const StreamTls> tls;
};

// The target of calls to a server whose stream address is `address` (""
// when it serves none), on `connection`, from a process with `security`:
// with TLS when it has TLS. If its TLS files cannot be loaded (which
// servers and workers report at start-up: StreamTls::For), the address is
// "" and calls go through gRPC.
StreamTarget StreamTargetFor(const std::string& address, int connection, const Security& security);

// Whether the process holds a connection to `target` that is open (said
// hello, not broken).
bool StreamConnected(const StreamTarget& target);

// Where an answer's last bytes may go straight from the socket: a pulled
// tensor's data end its answer (proto/wire.h), and reading them into
// their array spares a copy of each byte. An OK answer whose body holds at
// least `bytes` bytes has its last `bytes` read into `data`; the response
// then ends with a slice over `data` (not owned). The caller checks that
// those bytes are what it expected there (they are not when the body is
// otherwise laid out). `data` must be writable, and nobody else's to read
// or write, until the call's `done` has run: a call that ends (deadline,
// Cancel) while its answer is read in completes once the read stops.
struct AnswerPlacement {
  void* data = nullptr;
  size_t bytes = 0;
};

// Starts a call of `method` with `request` on the process's connection to
// `target` (made at the first call, and again after one broke); `done`
// gets its status once `response` holds the answer, at `deadline` at the
// latest: on the connection's thread for answers under kLargeMessageBytes
// (rpc/async.h), which it must not block, else on a pool thread; errors
// on the thread that finds them (a broken connection's, the deadline
// timer's, Cancel's caller). `response` must live until then.
std::shared_ptr<StreamCall> StartStreamCall(const StreamTarget& target, const std::string& method,
                                            const grpc::ByteBuffer& request,
                                            grpc::ByteBuffer* response, absl::Time deadline,
                                            std::function<void(grpc::Status)> done,
                                            AnswerPlacement placement = {});

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_STREAM_H_
