#include "rpc/async.h"

#include <chrono>
#include <deque>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "rpc/call_metrics.h"
#include "rpc/server_call.h"

namespace mx {
namespace rpc {
namespace internal {

Pool::~Pool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void Pool::Run(std::function<void()> fn) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(fn));
  if (threads_.empty()) {
    for (int i = 0; i < size_; ++i) threads_.emplace_back([this] { Loop(); });
  }
}

void Pool::Loop() {
  for (;;) {
    std::function<void()> fn;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &Pool::Ready));
      if (queue_.empty()) return;  // stopped
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    fn();
  }
}

Pool& CallbackPool() {
  static Pool* pool = new Pool(2);
  return *pool;
}

void Call::Run(const Handler& handler) {
  UnaryReactor* reactor = handler(context(), &request_, &response_);
  bool cancelled;
  {
    absl::MutexLock lock(&mu_);
    reactor_ = reactor;
    cancelled = cancel_pending_;
  }
  Ref();  // across Attach and OnCancel: Finish may end the call
  reactor->Attach(this);
  if (cancelled) reactor->OnCancel();
  Unref();
}

void Call::Finish(const grpc::Status& status) {
  Ref();  // the sending's
  Send(status);
  Unref();
}

void Call::Cancelled() {
  UnaryReactor* reactor;
  {
    absl::MutexLock lock(&mu_);
    reactor = reactor_;
    if (reactor == nullptr) cancel_pending_ = true;  // Run calls OnCancel
  }
  if (reactor != nullptr) reactor->OnCancel();
}

void Call::Unref() {
  if (refs_.fetch_sub(1) != 1) return;
  if (reactor_ != nullptr) reactor_->OnDone();
  AsyncServer* server = server_;
  delete this;
  server->CallEnded();
}

// What completed on a queue: its poller calls Completed (Poll).
class Event {
 public:
  virtual void Completed(bool ok) = 0;

 protected:
  ~Event() = default;
};

// Runs the events of `queue` until it is shut down and drained.
void Poll(grpc::CompletionQueue* queue) {
  void* tag;
  bool ok;
  while (queue->Next(&tag, &ok)) static_cast<Event*>(tag)->Completed(ok);
}

class ServerCall;

// A server call's events: which call, and what completed.
struct Tag final : Event {
  enum Kind { kRequested, kRead, kFinished, kDone };
  Tag(ServerCall* call, Kind kind) : call(call), kind(kind) {}
  void Completed(bool ok) override;
  ServerCall* const call;
  const Kind kind;
};

// A gRPC call's context as handlers see it.
class GrpcContext final : public ServerContext {
 public:
  grpc::GenericServerContext* grpc() { return &ctx_; }
  const grpc::GenericServerContext& grpc() const { return ctx_; }
  std::string peer() const override { return ctx_.peer(); }
  std::chrono::system_clock::time_point deadline() const override { return ctx_.deadline(); }
  std::string Metadata(const char* key) const override {
    const auto& md = ctx_.client_metadata();
    auto it = md.find(key);
    return it == md.end() ? "" : std::string(it->second.data(), it->second.size());
  }
  bool IsCancelled() const override { return ctx_.IsCancelled(); }

 private:
  grpc::GenericServerContext ctx_;
};

// A gRPC call, from RequestCall to its end. References (Call): the done
// notification and the read (which becomes the handler's) from the match
// on, and WriteAndFinish or Finish until it completes.
class ServerCall final : public Call {
 public:
  explicit ServerCall(AsyncServer* server) : Call(server) {}

  const std::string& method() const override { return ctx_.grpc().method(); }

  // Asks for the server's next call.
  void Request(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* cq) {
    ctx_.grpc()->AsyncNotifyWhenDone(&done_);
    service->RequestCall(ctx_.grpc(), &stream_, cq, cq, &requested_);
  }

  // The polling thread's handling of `kind`.
  void Handle(Tag::Kind kind, bool ok) {
    switch (kind) {
      case Tag::kRequested:
        if (!ok) {  // the server shuts down: no call matched
          AsyncServer* server = server_;
          delete this;
          server->CallEnded();
          return;
        }
        server_->RequestCall();  // the next call, before this one runs
        refs_.store(2);          // the done notification and the read
        stream_.Read(&request_, &read_);
        break;
      case Tag::kRead:
        if (ok) {
          server_->Dispatch(this);  // the read's reference becomes the handler's
        } else {
          Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call ended before its request"));
        }
        break;
      case Tag::kFinished:
        Unref();
        break;
      case Tag::kDone:
        if (ctx_.IsCancelled()) Cancelled();
        Unref();
        break;
    }
  }

 private:
  ServerContext* context() override { return &ctx_; }
  void Send(const grpc::Status& status) override {
    if (status.ok()) {
      stream_.WriteAndFinish(response_, grpc::WriteOptions(), status, &finished_);
    } else {
      stream_.Finish(status, &finished_);
    }
  }

  GrpcContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_{ctx_.grpc()};
  Tag requested_{this, Tag::kRequested}, read_{this, Tag::kRead}, finished_{this, Tag::kFinished},
      done_{this, Tag::kDone};
};

void Tag::Completed(bool ok) { call->Handle(kind, ok); }

}  // namespace internal

using internal::ServerCall;

void UnaryReactor::Finish(grpc::Status status) {
  internal::Call* call;
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    finished_ = true;
    call = call_;
    if (call == nullptr) {
      pending_ = std::move(status);
      return;
    }
  }
  call->Finish(status);
}

void UnaryReactor::Attach(internal::Call* call) {
  std::optional<grpc::Status> pending;
  {
    absl::MutexLock lock(&mu_);
    call_ = call;
    if (finished_) pending = std::move(pending_);
  }
  if (pending.has_value()) call->Finish(*pending);
}

AsyncServer::AsyncServer(grpc::ServerBuilder* builder)
    : bulk_(std::make_unique<internal::Pool>(2)), control_(std::make_unique<internal::Pool>(2)) {
  builder->RegisterAsyncGenericService(&service_);
  cq_ = builder->AddCompletionQueue();
}

AsyncServer::~AsyncServer() { Shutdown(absl::Now() + absl::Seconds(1)); }

void AsyncServer::Route(const std::string& method, Runs runs, Handler handler) {
  RouteCallMetrics(method);
  routes_[method] = {runs, std::move(handler)};
}

void AsyncServer::Start(std::unique_ptr<grpc::Server> server) {
  server_ = std::move(server);
  if (server_ == nullptr) return;  // the builder failed: nothing to poll
  RequestCall();
  poller_ = std::thread([this] { internal::Poll(cq_.get()); });
}

absl::StatusOr<int> AsyncServer::ServeStreams(const std::string& host, int port,
                                              StreamOptions options) {
  streams_ = std::make_unique<StreamListener>(this, std::move(options));
  return streams_->Listen(host, port);
}

void AsyncServer::RequestCall() {
  CallStarted();
  (new ServerCall(this))->Request(&service_, cq_.get());
}

void AsyncServer::CallStarted() {
  absl::MutexLock lock(&mu_);
  ++open_calls_;
}

void AsyncServer::Dispatch(internal::Call* call) {
  const std::string& method = call->method();
  if (method == "/grpc.health.v1.Health/Check") {
    call->Run([this](ServerContext*, const grpc::ByteBuffer* request, grpc::ByteBuffer* response) {
      return Check(*request, response);
    });
    return;
  }
  auto route = routes_.find(method);
  if (route == routes_.end()) {
    call->Finish(
        grpc::Status(grpc::StatusCode::UNIMPLEMENTED, absl::StrCat("no method ", method, " here")));
    return;
  }
  const Route_& r = route->second;
  if (r.runs == Runs::kControl) {
    control_->Run([call, &r] { call->Run(r.handler); });
  } else if (call->request().Length() >= kLargeMessageBytes) {
    bulk_->Run([call, &r] { call->Run(r.handler); });
  } else {
    call->Run(r.handler);
  }
}

UnaryReactor* AsyncServer::Check(const grpc::ByteBuffer& request, grpc::ByteBuffer* response) {
  auto* reactor = new UnaryReactor;
  // HealthCheckRequest{service = 1}: only the whole server ("") is known,
  // sent as no bytes or (a client that writes the empty string) 0a 00.
  std::string bytes;
  std::vector<grpc::Slice> slices;
  if (request.Length() <= 2 && request.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) {
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  if (request.Length() > 2 || (!bytes.empty() && bytes != std::string("\x0a\x00", 2))) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::NOT_FOUND, "only the empty service name is served"));
    return reactor;
  }
  // HealthCheckResponse{status = 1}: SERVING 1, NOT_SERVING 2.
  const char answer[2] = {0x08, static_cast<char>(serving_.load() ? 1 : 2)};
  grpc::Slice slice(answer, sizeof(answer));
  *response = grpc::ByteBuffer(&slice, 1);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void AsyncServer::CallEnded() {
  absl::MutexLock lock(&mu_);
  --open_calls_;
}

void AsyncServer::StopServing(absl::Time deadline) {
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
  }
  if (streams_ != nullptr) streams_->Stop(deadline);
  if (server_ == nullptr) return;
  server_->Shutdown(absl::ToChronoTime(deadline));
  // Calls whose reactors finish later (from the pools, or the threads
  // that answer waiting pulls) still need the queue.
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int64_t* open) { return *open == 0; }, &open_calls_));
}

void AsyncServer::Shutdown(absl::Time deadline) {
  StopServing(deadline);
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  cq_->Shutdown();
  if (poller_.joinable()) {
    poller_.join();
  } else {
    void* tag;
    bool ok;
    while (cq_->Next(&tag, &ok)) {
    }
  }
  bulk_.reset();
  control_.reset();
}

namespace {

// The process's client queue, polled by one thread, and the pool that runs
// the callbacks of large answers (of calls on any queue). Never destroyed:
// calls may end while the process exits.
class ClientQueue {
 public:
  static ClientQueue& Get() {
    static ClientQueue* queue = new ClientQueue;
    return *queue;
  }
  grpc::CompletionQueue* queue() { return &cq_; }

 private:
  ClientQueue() : poller_([this] { internal::Poll(&cq_); }) {}

  grpc::CompletionQueue cq_;
  std::thread poller_;
};

// One client call, from its start until its callback has run.
class ClientCall final : public internal::Event {
 public:
  ClientCall(grpc::ByteBuffer* response, std::function<void(grpc::Status)> done)
      : response_(response), done_(std::move(done)) {}

  void Start(grpc::GenericStub* stub, grpc::ClientContext* ctx, const std::string& method,
             const grpc::ByteBuffer& request, grpc::CompletionQueue* queue) {
    reader_ = stub->PrepareUnaryCall(ctx, method, request, queue);
    reader_->StartCall();
    reader_->Finish(response_, &status_, this);
  }

  void Completed(bool) override {
    if (response_->Length() >= kLargeMessageBytes) {
      internal::CallbackPool().Run([this] { Done(); });
    } else {
      Done();
    }
  }

 private:
  void Done() {
    // The reader lives in the call's memory, which the caller's
    // ClientContext owns and may free as soon as done_ has run (HealthCheck
    // returns then): it goes first.
    reader_.reset();
    done_(std::move(status_));
    delete this;
  }

  grpc::ByteBuffer* const response_;
  const std::function<void(grpc::Status)> done_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader_;
  grpc::Status status_;
};

}  // namespace

void StartUnaryCall(grpc::GenericStub* stub, grpc::ClientContext* ctx, const std::string& method,
                    const grpc::ByteBuffer& request, grpc::ByteBuffer* response,
                    std::function<void(grpc::Status)> done, grpc::CompletionQueue* queue) {
  auto* call = new ClientCall(response, std::move(done));
  call->Start(stub, ctx, method, request, queue != nullptr ? queue : ClientQueue::Get().queue());
}

}  // namespace rpc
}  // namespace mx
