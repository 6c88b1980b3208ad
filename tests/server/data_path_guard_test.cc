// The job token and node identities on the parameter server's data path
// (Push, Pull, PushPull, PushPullMany): these calls carry their claims in
// the request (proto::Credential), not in metadata, and the server reads
// them there only. A call whose claims fail is refused (UNAUTHENTICATED
// without the token, PERMISSION_DENIED for a wrong identity), counted, and
// nothing of it is applied, even when its bytes are malformed.
#include <grpcpp/grpcpp.h>

#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/mx.grpc.pb.h"
#include "proto/wire.h"
#include "rpc/security.h"
#include "rpc/stream.h"
#include "server/kvstore_service.h"
#include "tests/proto/raw_call.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

constexpr char kToken[] = "job-token-0123456789";

proto::Credential CredentialOf(const rpc::Caller& caller) {
  const rpc::Claims claims = caller.claims();
  proto::Credential c;
  c.set_token(claims.token);
  c.set_node(claims.node);
  return c;
}

proto::Tensor TensorOf(const std::vector<float>& v) {
  proto::Tensor t;
  t.add_shape(static_cast<int64_t>(v.size()));
  t.set_data(v.data(), v.size() * sizeof(float));
  return t;
}

std::vector<float> FloatsOf(const proto::Tensor& t) {
  std::vector<float> v(t.data().size() / sizeof(float));
  std::memcpy(v.data(), t.data().data(), v.size() * sizeof(float));
  return v;
}

class DataPathGuard : public ::testing::Test {
 protected:
  void SetUp() override {
    ParameterServerOptions o;
    o.security.token = kToken;
    o.identities = true;
    o.stream_port = 0;  // and stream connections
    // dist_async: one worker's push applies at once.
    auto ps = ParameterServer::Start("127.0.0.1:0", {false, 2, false}, o);
    ASSERT_TRUE(ps.ok()) << ps.status();
    server_ = *std::move(ps);
    keys_ = {rpc::NewSessionKey(), rpc::NewSessionKey()};
    server_->AdmitWorkers(keys_);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    stub_ = proto::KVStoreService::NewStub(channel_);
    // Init is a control call: its claims travel in metadata.
    proto::InitRequest init;
    init.set_key(7);
    *init.mutable_value() = TensorOf({1, 2});
    proto::InitResponse resp;
    grpc::ClientContext ctx;
    Worker(0).Stamp(&ctx);
    ASSERT_TRUE(stub_->Init(&ctx, init, &resp).ok());
  }

  rpc::Caller Worker(int rank) const { return rpc::Caller{kToken, rpc::Role::kWorker, rank, keys_[rank]}; }

  grpc::Status Push(const proto::Credential& credential, int rank, float value) {
    proto::PushRequest req;
    req.set_key(7);
    req.set_rank(rank);
    *req.mutable_value() = TensorOf({value, value});
    *req.mutable_credential() = credential;
    proto::PushResponse resp;
    grpc::ClientContext ctx;
    return stub_->Push(&ctx, req, &resp);
  }

  grpc::Status Pull(const proto::Credential& credential, std::vector<float>* value) {
    proto::PullRequest req;
    req.set_key(7);
    req.set_rank(0);
    *req.mutable_credential() = credential;
    proto::PullResponse resp;
    grpc::ClientContext ctx;
    const grpc::Status s = stub_->Pull(&ctx, req, &resp);
    if (s.ok()) *value = FloatsOf(resp.value());
    return s;
  }

  // What worker 0 pulls.
  std::vector<float> Value() {
    std::vector<float> v;
    EXPECT_TRUE(Pull(CredentialOf(Worker(0)), &v).ok());
    return v;
  }

  // A raw call of `method` with `bytes` and no metadata.
  grpc::Status Raw(const std::string& method, const std::string& bytes) {
    return testing::RawCall(channel_, "/mx.proto.KVStoreService/" + method, bytes);
  }

  std::unique_ptr<ParameterServer> server_;
  std::vector<std::string> keys_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<proto::KVStoreService::Stub> stub_;
};

TEST_F(DataPathGuard, AWorkersCredentialInTheRequestIsAccepted) {
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
  ASSERT_TRUE(Push(CredentialOf(Worker(1)), 1, 5).ok());
  EXPECT_EQ(Value(), (std::vector<float>{5, 5}));  // the check can pass: the push applied
  EXPECT_EQ(server_->refused(), 0);
}

TEST_F(DataPathGuard, ClaimsInMetadataDoNotCountOnTheDataPath) {
  proto::PushRequest req;
  req.set_key(7);
  *req.mutable_value() = TensorOf({9, 9});
  proto::PushResponse resp;
  grpc::ClientContext ctx;
  Worker(0).Stamp(&ctx);  // right token and key, but where control calls put them
  const grpc::Status s = stub_->Push(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("push: no job token"));
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
  EXPECT_EQ(server_->refused(), 1);
}

// A server without replication takes no calls from servers, so a claim
// to be one is refused at once: it used to wait 10 s for servers' keys
// that never come, on the thread that serves every call (an outsider
// without the token could stall the server that way, call after call).
TEST_F(DataPathGuard, AServersClaimIsRefusedAtOnceWithoutReplication) {
  proto::Credential claim;
  claim.set_node("server/0:not-a-key");
  proto::PushRequest req;
  req.set_key(7);
  req.set_rank(0);
  *req.mutable_value() = TensorOf({9, 9});
  *req.mutable_credential() = claim;
  proto::PushResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  const grpc::Status s = stub_->Push(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("no job token"));
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
}

TEST_F(DataPathGuard, WrongClaimsAreRefusedAndNothingApplies) {
  proto::Credential none, wrong_token, token_only, wrong_key, other_rank;
  wrong_token.set_token("not-the-job-token");
  token_only.set_token(kToken);
  token_only.set_node("worker/0");  // the token, but not worker 0's session key
  wrong_key.set_token(kToken);  // a key that fails implies no token
  wrong_key.set_node("worker/1:" + keys_[0]);
  other_rank = CredentialOf(Worker(0));
  struct Case {
    const char* name;
    proto::Credential credential;
    int rank;  // the rank the push acts for
    grpc::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"no credential", none, 0, grpc::StatusCode::UNAUTHENTICATED},
      {"wrong token", wrong_token, 0, grpc::StatusCode::UNAUTHENTICATED},
      {"token without key", token_only, 0, grpc::StatusCode::PERMISSION_DENIED},
      {"worker 0's key for worker 1", wrong_key, 1, grpc::StatusCode::PERMISSION_DENIED},
      {"worker 0 acting for worker 1", other_rank, 1, grpc::StatusCode::PERMISSION_DENIED},
  };
  for (const Case& c : cases) {
    const grpc::Status push = Push(c.credential, c.rank, 1e4f);
    EXPECT_EQ(push.error_code(), c.code) << c.name << ": " << push.error_message();
    std::vector<float> pulled;
    const grpc::Status pull = Pull(c.credential, &pulled);
    if (c.rank == 0) {
      EXPECT_EQ(pull.error_code(), c.code) << c.name << ": " << pull.error_message();
    } else {  // worker 0 pulling as itself is fine
      EXPECT_TRUE(pull.ok() || pull.error_code() == c.code) << c.name;
    }
  }
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
  EXPECT_GE(server_->refused(), 8);
}

TEST_F(DataPathGuard, PushPullManyCountsTheRequestsCredentialNotAnEntrys) {
  proto::PushRequest entry;
  entry.set_key(7);
  entry.set_rank(0);
  *entry.mutable_value() = TensorOf({3, 3});
  proto::PushPullManyRequest many;
  *many.add_entries() = entry;
  many.mutable_entries(0)->mutable_credential()->CopyFrom(CredentialOf(Worker(0)));
  proto::PushPullManyResponse resp;
  {
    grpc::ClientContext ctx;
    const grpc::Status s = stub_->PushPullMany(&ctx, many, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  }
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
  *many.mutable_credential() = CredentialOf(Worker(0));
  {
    grpc::ClientContext ctx;
    const grpc::Status s = stub_->PushPullMany(&ctx, many, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_EQ(resp.entries_size(), 1);
  EXPECT_EQ(FloatsOf(resp.entries(0).value()), (std::vector<float>{3, 3}));
}

// Bytes that do not decode, from a caller without the token: refused for
// the token, not answered with what is wrong with them.
TEST_F(DataPathGuard, MalformedRequestsOfOutsidersAreRefusedNotDiagnosed) {
  const std::string garbage("\x1a\x7f\x01", 3);  // a truncated field
  for (const char* method : {"Push", "Pull", "PushPull", "PushPullMany"}) {
    const grpc::Status s = Raw(method, garbage);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << method << ": " << s.error_message();
  }
  EXPECT_EQ(server_->refused(), 4);
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
}

// The peak resident memory of this process (bytes) since ResetPeakMemory.
int64_t PeakMemory() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}
void ResetPeakMemory() { std::ofstream("/proc/self/clear_refs") << "5"; }

// A protobuf varint.
std::string Varint(uint64_t v) {
  std::string out;
  do {
    out.push_back(static_cast<char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0)));
    v >>= 7;
  } while (v > 0);
  return out;
}

// Decoding allocates per entry (about a hundred bytes for a 2-byte empty
// entry) and per packed row id (8 bytes for 1): an outsider's request is
// refused before it is decoded, so refusing it costs no more memory than
// its bytes. Both requests below used to cost the server over 500 MB.
TEST_F(DataPathGuard, AnOutsidersRequestIsRefusedBeforeItIsDecoded) {
  constexpr int kEntries = 8 << 20;
  std::string many;
  many.reserve(2 * kEntries);
  for (int i = 0; i < kEntries; ++i) many.append("\x0a\x00", 2);  // empty entries
  // A push whose rows (field 7) hold 64M packed ids of one byte each.
  constexpr int kIds = 64 << 20;
  const std::string ids = "\x0a" + Varint(kIds) + std::string(kIds, '\x01');
  const std::string push = "\x3a" + Varint(ids.size()) + ids;
  ResetPeakMemory();
  const int64_t before = PeakMemory();
  ASSERT_GT(before, 0);
  using Request = std::pair<const char*, const std::string*>;
  for (const auto& [method, bytes] : {Request{"PushPullMany", &many}, Request{"Push", &push}}) {
    const grpc::Status s = Raw(method, *bytes);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED)
        << method << ": " << s.error_message();
  }
  // The larger request's bytes (64 MB) held by the client's copy and the
  // server's, and little more: decoding them would take over 500 MB.
  EXPECT_LT(PeakMemory() - before, 300 << 20);
  EXPECT_EQ(server_->refused(), 2);
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
}

// A compressed push claims its size: 64 MiB of 2-bit values claim 2^28
// floats, which were unpacked (1 GiB) before the key's size refused them.
TEST_F(DataPathGuard, ACompressedPushIsCheckedAgainstTheKeyBeforeItIsUnpacked) {
  constexpr int64_t kClaimed = int64_t{1} << 28;
  proto::PushRequest req;
  req.set_key(7);
  req.set_rank(0);
  req.mutable_value()->add_shape(kClaimed);
  req.mutable_value()->set_dtype(proto::TWO_BIT);
  req.mutable_value()->set_threshold(0.5f);
  req.mutable_value()->set_data(std::string(kClaimed / 4, '\0'));  // 4 bytes per 16 values
  *req.mutable_credential() = CredentialOf(Worker(0));
  ResetPeakMemory();
  const int64_t before = PeakMemory();
  proto::PushResponse resp;
  grpc::ClientContext ctx;
  const grpc::Status s = stub_->Push(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("268435456 values but the key holds 2"));
  EXPECT_LT(PeakMemory() - before, 512 << 20);  // the request's copies, not 1 GiB more
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
}

// PushPullMany carries at most one entry per key: a second would count as
// the worker's push of its next step (the shard numbers a worker's pushes
// in order). The request is refused, and nothing of it applies.
TEST_F(DataPathGuard, PushPullManyRefusesAKeyTwice) {
  proto::PushRequest entry;
  entry.set_key(7);
  entry.set_rank(0);
  *entry.mutable_value() = TensorOf({3, 3});
  proto::PushPullManyRequest many;
  *many.add_entries() = entry;
  *many.add_entries() = entry;
  *many.mutable_credential() = CredentialOf(Worker(0));
  proto::PushPullManyResponse resp;
  grpc::ClientContext ctx;
  const grpc::Status s = stub_->PushPullMany(&ctx, many, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("key 7 given twice"));
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
}

// Replicate, which servers also send on stream connections (replicas 2),
// is a server's call: a worker of the job with the right token on its
// connection and its own credential is refused, counted, and the step it
// carries is not applied.
TEST_F(DataPathGuard, AWorkersReplicateOnAStreamIsRefused) {
  ASSERT_FALSE(server_->stream_address().empty());
  proto::ReplicateRequest req;
  req.set_primary(1);
  *req.mutable_credential() = CredentialOf(Worker(0));
  proto::ReplicatedStep* step = req.add_steps();
  step->set_key(7);
  step->set_version(1);
  *step->mutable_value() = TensorOf({9, 9});
  const grpc::ByteBuffer request = EncodeMessage(req);
  grpc::ByteBuffer response;
  grpc::Status status;
  absl::Notification done;
  auto call = rpc::StartStreamCall({server_->stream_address(), 0, kToken},
                                   "/mx.proto.KVStoreService/Replicate", request, &response,
                                   absl::Now() + absl::Seconds(10), [&](grpc::Status s) {
                                     status = s;
                                     done.Notify();
                                   });
  done.WaitForNotification();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("replicate"));
  EXPECT_EQ(server_->refused(), 1);
  EXPECT_EQ(Value(), (std::vector<float>{1, 2}));
}

}  // namespace
}  // namespace mx
