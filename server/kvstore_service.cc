#include "server/kvstore_service.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"

namespace mx {

namespace {

// Push and Pull, which carry tensors, are raw callback methods: the tensor
// moves between gRPC's buffers and the shard with one copy (see
// EncodeWithTensor), and a pull waiting for a step holds no thread (the
// shard answers it when the step completes). The other methods are small
// and synchronous.
using ServiceBase = proto::KVStoreService::WithRawCallbackMethod_Push<
    proto::KVStoreService::WithRawCallbackMethod_Pull<
        proto::KVStoreService::WithRawCallbackMethod_PushPull<proto::KVStoreService::Service>>>;

constexpr int kPushValueField = 3;   // PushRequest.value
constexpr int kPullValueField = 1;   // PullResponse.value

absl::Status Prefix(const absl::Status& s, const char* what, int key) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(what, " of key ", key, ": ", s.message()));
}

grpc::ByteBuffer EmptyMessage() {
  grpc::Slice empty;
  return grpc::ByteBuffer(&empty, 1);
}

// A pull that may wait for its step: answered by the shard, or cancelled
// when the client goes away or its deadline passes.
class PullReactor : public grpc::ServerUnaryReactor {
 public:
  PullReactor(ParameterShard* shard, grpc::ByteBuffer* response)
      : shard_(shard), response_(response) {}

  // Answers with `error` at once, or with key's value at min_version.
  void Start(const absl::Status& error, int key, int64_t min_version) {
    if (!error.ok()) {
      Finish(ToGrpc(error));
      return;
    }
    key_ = key;
    id_ = shard_->PullAsync(key_, min_version,
                            [this](absl::StatusOr<ParameterShard::Value> v) { Answer(std::move(v)); });
    started_.store(true);
  }

  void OnCancel() override {
    // Answered already (CancelPull false): that answer's Finish stands.
    if (started_.load() && shard_->CancelPull(key_, id_)) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                          absl::StrCat("pull of key ", key_, " cancelled while waiting")));
    }
  }
  void OnDone() override { delete this; }

 private:
  void Answer(absl::StatusOr<ParameterShard::Value> v) {
    if (!v.ok()) {
      Finish(ToGrpc(v.status()));
      return;
    }
    proto::PullResponse header;
    header.set_version(v->version);
    proto::Tensor* t = header.mutable_value();
    t->add_shape(static_cast<int64_t>(v->data->size()));
    t->set_dtype(proto::FLOAT32);
    *response_ = EncodeWithTensor(header, kPullValueField, v->data->data(),
                                  v->data->size() * sizeof(float), v->data);
    Finish(grpc::Status::OK);
  }

  ParameterShard* const shard_;
  grpc::ByteBuffer* const response_;
  int key_ = 0;
  uint64_t id_ = 0;
  std::atomic<bool> started_{false};
};

class Service final : public ServiceBase {
 public:
  explicit Service(ParameterShard* shard) : shard_(shard) {}

  grpc::Status Init(grpc::ServerContext*, const proto::InitRequest* req,
                    proto::InitResponse*) override {
    absl::StatusOr<HostTensor> t = FromProto(req->value());
    if (!t.ok()) return ToGrpc(Prefix(t.status(), "init", req->key()));
    return ToGrpc(shard_->Init(req->key(), t->shape, t->data));
  }

  grpc::ServerUnaryReactor* Push(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override {
    *response = EmptyMessage();
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    proto::PushRequest req;
    reactor->Finish(ToGrpc(HandlePush(*request, &req)));
    return reactor;
  }

  grpc::ServerUnaryReactor* Pull(grpc::CallbackServerContext*, const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override {
    proto::PullRequest req;
    absl::Status s = DecodeWithTensor(*request, 0, &req, nullptr);
    auto* reactor = new PullReactor(shard_, response);
    reactor->Start(Prefix(s, "pull", req.key()), req.key(), req.min_version());
    return reactor;
  }

  grpc::ServerUnaryReactor* PushPull(grpc::CallbackServerContext*, const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override {
    proto::PushRequest req;
    absl::Status s = HandlePush(*request, &req);
    auto* reactor = new PullReactor(shard_, response);
    reactor->Start(s, req.key(), req.min_version());
    return reactor;
  }

  grpc::Status SetOptimizer(grpc::ServerContext*, const proto::SetOptimizerRequest* req,
                            proto::SetOptimizerResponse*) override {
    Optimizer::Options options(req->options().begin(), req->options().end());
    std::map<int, std::string> names(req->param_names().begin(), req->param_names().end());
    std::map<std::string, float> lr_mult(req->lr_mult().begin(), req->lr_mult().end());
    std::map<std::string, float> wd_mult(req->wd_mult().begin(), req->wd_mult().end());
    return ToGrpc(shard_->SetOptimizer(req->name(), options, names, lr_mult, wd_mult));
  }

  grpc::Status SaveOptimizerStates(grpc::ServerContext*, const proto::SaveOptimizerStatesRequest*,
                                   proto::OptimizerStates* resp) override {
    absl::StatusOr<std::string> states = shard_->SaveOptimizerStates();
    if (!states.ok()) return ToGrpc(states.status());
    resp->set_states(*std::move(states));
    return grpc::Status::OK;
  }

  grpc::Status LoadOptimizerStates(grpc::ServerContext*, const proto::OptimizerStates* req,
                                   proto::LoadOptimizerStatesResponse*) override {
    return ToGrpc(shard_->LoadOptimizerStates(req->states()));
  }

 private:
  // Decodes a push into *req (all but the data) and gives it to the shard.
  absl::Status HandlePush(const grpc::ByteBuffer& request, proto::PushRequest* header) {
    proto::PushRequest& req = *header;
    std::vector<float> data;
    size_t data_bytes = 0;
    absl::Status s = DecodeWithTensor(request, kPushValueField, &req,
                                      [&](size_t bytes) -> absl::StatusOr<void*> {
                                        data_bytes = bytes;
                                        data = shard_->TakeBuffer((bytes + sizeof(float) - 1) / sizeof(float));
                                        return static_cast<void*>(data.data());
                                      });
    if (s.ok()) s = TensorShape(req.value(), data_bytes).status();
    if (!s.ok()) return Prefix(s, "push", req.key());
    return shard_->Push(req.key(), req.rank(), std::move(data));
  }

  ParameterShard* shard_;
};

}  // namespace

struct ParameterServer::Impl {
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
};

absl::StatusOr<std::unique_ptr<ParameterServer>> ParameterServer::Start(
    const std::string& bind_address, ShardOptions options) {
  KeepGrpcAlive();
  std::unique_ptr<ParameterServer> ps(new ParameterServer());
  ps->shard_ = std::make_unique<ParameterShard>(options);
  ps->impl_ = std::make_unique<Impl>();
  ps->impl_->service = std::make_unique<Service>(ps->shard_.get());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(bind_address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(ps->impl_->service.get());
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  ps->impl_->server = builder.BuildAndStart();
  if (ps->impl_->server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", bind_address));
  }
  ps->address_ = absl::StrCat(bind_address.substr(0, bind_address.rfind(':')), ":", port);
  return ps;
}

ParameterServer::~ParameterServer() {
  if (impl_ != nullptr && impl_->server != nullptr) {
    // Pulls waiting in the shard end at once rather than at their deadline
    // (gRPC's Shutdown cancels calls but waits for their handlers).
    shard_->Close("the server is shutting down");
    impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
}

}  // namespace mx
