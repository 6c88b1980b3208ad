// Every mx server, and the calls of the data path (pushes, pulls,
// replication), on gRPC's asynchronous API: one completion queue per
// server (a server's own calls, replication, complete on it too) and one
// for the other client calls of a process, each polled by one thread,
// with handlers written as reactors like those of gRPC's callback API.
//
// Why not the callback API: in gRPC 1.51 (Debian's, epoll1) it polls from
// two "nexting" threads per process, which hand events to each other; a
// process with any callback service or call has them. Measured across
// processes on this project's 2-core machines (exp echo, medians of 5
// rounds): a small unary round trip took 134 us between callback client
// and server, 78 us with the server on one polled queue, and 60 us with
// the client on one too. So here one thread polls, runs the handlers of
// small requests at once and the callbacks of small answers, and hands
// work that may take long (requests or answers of 1 MiB or more: their
// bytes are summed or copied; methods that may wait) to small pools, so
// that polling goes on meanwhile.
#ifndef MX_RPC_ASYNC_H_
#define MX_RPC_ASYNC_H_

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "rpc/server_context.h"
#include "rpc/stream.h"

namespace mx {
namespace rpc {

// A request or an answer of this many bytes or more is handled off the
// polling thread. Below it, summing or copying the bytes there costs less
// than the hand-off: with 64 KiB, the MLP's gradients (about 220 KB per
// server and worker) went to the pools, and its job of 2 workers and 2
// servers over TCP trained at 67-80k samples/s, against 77-86k with 1 MiB
// (bench/dist_train_bench.py's job, 3 rounds in turns). The 64 KiB past
// 1 MiB keep a message that carries a 1 MiB value (and its header) on
// its thread too: pushpull of 1 MiB values with 8 in flight, 1 server and
// 1 worker as processes, went from 3.1-4.0 GB/s (median 0.93 of one-way
// loopback TCP) to 3.95-4.84 GB/s (median 1.09), 7 rounds in turns, every
// round's ratio above every one of the old threshold's.
constexpr size_t kLargeMessageBytes = (1 << 20) + (64 << 10);

namespace internal {
class Call;
class Pool;
}  // namespace internal
class StreamListener;

// One unary call's server side, which a handler returns (like gRPC's
// ServerUnaryReactor): the handler, or any thread later, ends the call
// with Finish, and the response the handler was given goes out if the
// status is OK.
class UnaryReactor {
 public:
  virtual ~UnaryReactor() = default;
  // Ends the call; later calls are ignored. Any thread, also before the
  // handler has returned this reactor.
  void Finish(grpc::Status status);
  // The client cancelled the call or its deadline passed (on the polling
  // thread); Finish is still expected, and may already have been called.
  virtual void OnCancel() {}
  // The call is over (Finish's answer sent or dropped): the last call on
  // this reactor. The default deletes it.
  virtual void OnDone() { delete this; }

 private:
  friend class internal::Call;
  // The call this reactor ends, once its handler returned it; a Finish
  // made before goes out then.
  void Attach(internal::Call* call);

  absl::Mutex mu_;
  internal::Call* call_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status pending_ ABSL_GUARDED_BY(mu_);  // a Finish before Attach
};

// Handles one call of a method: `request` and `response` (written before
// Finish with an OK status) live until OnDone.
using Handler = std::function<UnaryReactor*(ServerContext* ctx, const grpc::ByteBuffer* request,
                                            grpc::ByteBuffer* response)>;

// Where a method's handlers run.
enum class Runs {
  // On the polling thread, which they must not block; requests of
  // kLargeMessageBytes or more on the bulk pool (2 threads).
  kPolling,
  // On the control pool (2 threads): methods that may wait for the others
  // (a step in flight), which run on the polling thread or the bulk pool.
  kControl,
};

// A gRPC server's unary methods, registered by name, and the standard
// grpc.health.v1.Health/Check (no credentials needed: it says only whether
// the server serves). Usage: construct with the builder, Route every
// method, BuildAndStart, Start; Shutdown (or the destructor) ends it.
class AsyncServer {
 public:
  // Adds the service and its completion queue to `builder`.
  explicit AsyncServer(grpc::ServerBuilder* builder);
  ~AsyncServer();  // Shutdown(now + 1 s), if not done

  // `method`: "/package.Service/Method". Before Start.
  void Route(const std::string& method, Runs runs, Handler handler);
  // Routes methods of `object`, each as /`service`/name (`service`: a
  // generated service's service_full_name()).
  template <class T>
  using Method = UnaryReactor* (T::*)(ServerContext*, const grpc::ByteBuffer*, grpc::ByteBuffer*);
  template <class T>
  void RouteMethods(const std::string& service, Runs runs, T* object,
                    std::initializer_list<std::pair<const char*, Method<T>>> methods) {
    for (const auto& [name, method] : methods) {
      Route("/" + service + "/" + name, runs,
            [object, method = method](ServerContext* ctx, const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) {
              return (object->*method)(ctx, request, response);
            });
    }
  }
  // Serves with `server` (the builder's BuildAndStart), null if it failed.
  void Start(std::unique_ptr<grpc::Server> server);
  // Also serves the routes in options.methods on stream connections
  // (rpc/stream.h) at host:port (0: a free port); returns the port. After
  // Start, once.
  absl::StatusOr<int> ServeStreams(const std::string& host, int port, StreamOptions options);
  grpc::Server* server() const { return server_.get(); }
  // What Check answers: SERVING or NOT_SERVING (the default).
  void SetServing(bool serving) { serving_.store(serving); }
  // Stops taking calls (and ends the stream connections, cancelling their
  // calls), cancels those open at `deadline` and waits until every reactor
  // has finished; the queue is still polled.
  void StopServing(absl::Time deadline);
  // StopServing, then stops polling: client calls on queue() must have
  // ended by then.
  void Shutdown(absl::Time deadline);

  // The queue this server polls, for client calls that a server process
  // makes (StartUnaryCall): a process that serves polls one queue. Valid
  // until Shutdown; calls on it must end before (see Shutdown).
  grpc::CompletionQueue* queue() const { return cq_.get(); }

  // Internal (the transports' calls): asks for the next gRPC call; counts
  // a call's start (streams) and end; runs a call's handler where its
  // route says.
  void RequestCall();
  void CallStarted();
  void CallEnded();
  void Dispatch(internal::Call* call);

 private:
  struct Route_ {
    Runs runs;
    Handler handler;
  };
  UnaryReactor* Check(const grpc::ByteBuffer& request, grpc::ByteBuffer* response);

  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::map<std::string, Route_> routes_;  // fixed once started
  std::unique_ptr<internal::Pool> bulk_, control_;
  std::atomic<bool> serving_{false};
  std::thread poller_;
  std::unique_ptr<StreamListener> streams_;
  absl::Mutex mu_;
  int64_t open_calls_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

// Starts a unary call of `method` through `stub`, on `queue` (a server's,
// AsyncServer::queue) or else the process's client queue; `done` gets its
// status once `response` holds the answer: on the queue's polling thread
// for answers under kLargeMessageBytes, which it must not block, else on a
// pool thread. `ctx` and `response` must live until then.
void StartUnaryCall(grpc::GenericStub* stub, grpc::ClientContext* ctx, const std::string& method,
                    const grpc::ByteBuffer& request, grpc::ByteBuffer* response,
                    std::function<void(grpc::Status)> done, grpc::CompletionQueue* queue = nullptr);

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_ASYNC_H_
