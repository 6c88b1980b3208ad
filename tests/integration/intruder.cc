// An outsider with nothing but the public mx.proto, attacking a running
// job: it pulls the weights, pushes 1e4 into key 0, sets the learning rate
// to 1000, heartbeats for a worker and sends Leave for every worker, each
// with no token, a wrong token, and the right token while claiming worker
// 0's rank (without its session key).
//
//   intruder --coordinator=HOST:PORT --server=HOST:PORT --workers=N [--token_file=F]
//
// Prints one line per attack and its status; exits 0 when every attack was
// refused with UNAUTHENTICATED or PERMISSION_DENIED, 1 when any went
// through or failed otherwise.
#include <grpcpp/grpcpp.h>

#include <fstream>
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "proto/mx.grpc.pb.h"

ABSL_FLAG(std::string, coordinator, "", "the job's coordinator");
ABSL_FLAG(std::string, server, "", "one of the job's parameter servers");
ABSL_FLAG(int, workers, 2, "workers in the job");
ABSL_FLAG(std::string, token_file, "", "the job's token (for the wrong-rank attacks)");

namespace {

using mx::proto::Coordinator;
using mx::proto::KVStoreService;

struct Credentials {
  const char* name;   // how the line names the attempt
  std::string token;  // "" sends none
  bool claim_rank;    // says it is worker 0 (with a made-up session key)
};

int failures = 0;

void Report(const std::string& attack, const Credentials& c, const grpc::Status& s) {
  const bool refused = s.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
                       s.error_code() == grpc::StatusCode::PERMISSION_DENIED;
  std::cout << (refused ? "refused: " : "NOT REFUSED: ") << attack << " (" << c.name
            << "): code " << s.error_code() << " " << s.error_message() << std::endl;
  if (!refused) ++failures;
}

const char kClaimedNode[] = "worker/0:0123456789abcdef0123456789abcdef";

// The credentials in the call's metadata, where mx's control calls carry
// them...
void Prepare(grpc::ClientContext* ctx, const Credentials& c) {
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (!c.token.empty()) ctx->AddMetadata("mx-job-token", c.token);
  if (c.claim_rank) ctx->AddMetadata("mx-node", kClaimedNode);
}

// ...and in the request, where its data path's calls (push, pull) do.
void Sign(mx::proto::Credential* credential, const Credentials& c) {
  credential->set_token(c.token);
  if (c.claim_rank) credential->set_node(kClaimedNode);
}

void Attack(KVStoreService::Stub& server, Coordinator::Stub& coordinator, const Credentials& c) {
  {
    mx::proto::PullRequest req;
    req.set_key(0);
    Sign(req.mutable_credential(), c);
    mx::proto::PullResponse resp;
    grpc::ClientContext ctx;
    Prepare(&ctx, c);
    Report("pull of key 0", c, server.Pull(&ctx, req, &resp));
  }
  {
    mx::proto::PushRequest req;
    req.set_key(0);
    req.set_rank(0);
    Sign(req.mutable_credential(), c);
    mx::proto::Tensor* t = req.mutable_value();
    t->add_shape(1);
    const float poison = 1e4f;
    t->set_data(std::string(reinterpret_cast<const char*>(&poison), sizeof(poison)));
    mx::proto::PushResponse resp;
    grpc::ClientContext ctx;
    Prepare(&ctx, c);
    Report("push of 1e4 into key 0", c, server.Push(&ctx, req, &resp));
  }
  {
    mx::proto::SetOptimizerRequest req;
    req.set_name("sgd");
    (*req.mutable_options())["learning_rate"] = "1000";
    mx::proto::SetOptimizerResponse resp;
    grpc::ClientContext ctx;
    Prepare(&ctx, c);
    Report("set_optimizer lr=1000", c, server.SetOptimizer(&ctx, req, &resp));
  }
  {
    mx::proto::HeartbeatRequest req;
    req.set_role(mx::proto::WORKER);
    req.set_rank(1);
    mx::proto::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    Prepare(&ctx, c);
    Report("heartbeat for worker 1", c, coordinator.Heartbeat(&ctx, req, &resp));
  }
  for (int rank = 0; rank < absl::GetFlag(FLAGS_workers); ++rank) {
    mx::proto::LeaveRequest req;
    req.set_rank(rank);
    mx::proto::LeaveResponse resp;
    grpc::ClientContext ctx;
    Prepare(&ctx, c);
    Report("leave for worker " + std::to_string(rank), c, coordinator.Leave(&ctx, req, &resp));
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::string token;
  if (!absl::GetFlag(FLAGS_token_file).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_token_file));
    std::getline(in, token);
  }
  auto server = KVStoreService::NewStub(
      grpc::CreateChannel(absl::GetFlag(FLAGS_server), grpc::InsecureChannelCredentials()));
  auto coordinator = Coordinator::NewStub(
      grpc::CreateChannel(absl::GetFlag(FLAGS_coordinator), grpc::InsecureChannelCredentials()));
  Attack(*server, *coordinator, {"no token", "", false});
  Attack(*server, *coordinator, {"wrong token", "not-the-job-token", false});
  if (!token.empty()) Attack(*server, *coordinator, {"right token, worker 0's rank", token, true});
  std::cout << failures << " attacks went through" << std::endl;
  return failures == 0 ? 0 : 1;
}
