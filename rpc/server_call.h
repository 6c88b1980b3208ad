// Internal to rpc/: what rpc/async.cc (gRPC) and rpc/stream.cc (stream
// connections) share: the pools that run work off a transport's threads,
// and a server call's life from its dispatch to its answer.
#ifndef MX_RPC_SERVER_CALL_H_
#define MX_RPC_SERVER_CALL_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "rpc/async.h"

namespace mx {
namespace rpc {
namespace internal {

// `size` threads, started at the first Run, that run functions in order.
class Pool {
 public:
  explicit Pool(int size) : size_(size) {}
  ~Pool();
  void Run(std::function<void()> fn);

 private:
  void Loop();
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); }

  const int size_;
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // started under mu_, joined by the destructor
};

// The pool that runs the callbacks of large answers, of calls on any
// queue or stream connection. Never destroyed.
Pool& CallbackPool();

// One server call, from its dispatch (AsyncServer::Dispatch) until its
// answer is sent or dropped. Counted references: the transport's (whose
// own events it may await), the handler's (from the dispatch until
// Finish) and the sending of the answer; the last one ends the call
// (OnDone, then AsyncServer::CallEnded).
class Call {
 public:
  explicit Call(AsyncServer* server) : server_(server) {}

  virtual const std::string& method() const = 0;
  const grpc::ByteBuffer& request() const { return request_; }

  // Runs the handler (the dispatch's reference becomes its reactor's) and
  // attaches its reactor.
  void Run(const Handler& handler);
  // Sends the answer: the response too if `status` is OK. Releases the
  // handler's reference.
  void Finish(const grpc::Status& status);

 protected:
  virtual ~Call() = default;
  virtual ServerContext* context() = 0;
  // Sends `status` (and the response if OK), then Unref (also if the
  // answer cannot be sent).
  virtual void Send(const grpc::Status& status) = 0;
  // The caller cancelled the call or is gone: the reactor's OnCancel.
  void Cancelled();
  void Ref() { refs_.fetch_add(1); }
  // A reference if the call still has one (it is not being destroyed).
  bool TryRef() {
    int n = refs_.load();
    while (n > 0) {
      if (refs_.compare_exchange_weak(n, n + 1)) return true;
    }
    return false;
  }
  void Unref();

  AsyncServer* const server_;
  grpc::ByteBuffer request_, response_;
  std::atomic<int> refs_{0};

 private:
  absl::Mutex mu_;
  UnaryReactor* reactor_ = nullptr;  // set under mu_, once; read unlocked after the last Unref
  bool cancel_pending_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace internal
}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_SERVER_CALL_H_
