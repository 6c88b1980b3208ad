#include "server/kvstore_service.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"

namespace mx {

namespace {

class Service final : public proto::KVStoreService::Service {
 public:
  explicit Service(ParameterShard* shard) : shard_(shard) {}

  grpc::Status Init(grpc::ServerContext*, const proto::InitRequest* req,
                    proto::InitResponse*) override {
    absl::StatusOr<HostTensor> t = FromProto(req->value());
    if (!t.ok()) return ToGrpc(Prefix(t.status(), "init", req->key()));
    return ToGrpc(shard_->Init(req->key(), t->shape, t->data));
  }

  grpc::Status Push(grpc::ServerContext*, const proto::PushRequest* req,
                    proto::PushResponse*) override {
    absl::StatusOr<HostTensor> t = FromProto(req->value());
    if (!t.ok()) return ToGrpc(Prefix(t.status(), "push", req->key()));
    return ToGrpc(shard_->Push(req->key(), req->rank(), t->data));
  }

  grpc::Status Pull(grpc::ServerContext* ctx, const proto::PullRequest* req,
                    proto::PullResponse* resp) override {
    // A client without a deadline still gets an answer within kMaxWait.
    constexpr absl::Duration kMaxWait = absl::Minutes(5);
    absl::Time deadline = std::min(absl::FromChrono(ctx->deadline()), absl::Now() + kMaxWait);
    absl::StatusOr<ParameterShard::Value> v = shard_->Pull(req->key(), req->min_version(), deadline);
    if (!v.ok()) return ToGrpc(v.status());
    resp->set_version(v->version);
    ToProto(v->data, resp->mutable_value());
    return grpc::Status::OK;
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
  static absl::Status Prefix(const absl::Status& s, const char* what, int key) {
    return absl::Status(s.code(), absl::StrCat(what, " of key ", key, ": ", s.message()));
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
