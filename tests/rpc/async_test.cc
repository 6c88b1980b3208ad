// rpc::AsyncServer and rpc::StartUnaryCall (rpc/async.h): answers made at
// once and later from other threads, cancellation, methods that wait
// beside calls that must not, large messages, unknown methods, shutdown.
#include "rpc/async.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "rpc/rpc.h"

namespace mx {
namespace rpc {
namespace {

grpc::ByteBuffer Bytes(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}
std::string String(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  if (!b.Dump(&slices).ok()) return "<undumpable>";
  std::string s;
  for (const grpc::Slice& slice : slices) s.append(slice.begin(), slice.end());
  return s;
}

// A reactor that remembers its cancellation and its end.
struct Waiter : UnaryReactor {
  void OnCancel() override {
    cancelled.Notify();
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "waiter cancelled"));
  }
  void OnDone() override { done->Notify(); }
  absl::Notification cancelled;
  absl::Notification* done;
};

// A server on 127.0.0.1 with the test's methods:
//  /t/Echo     answers with the request at once (polling thread);
//  /t/Later    answers from another thread 20 ms later;
//  /t/Wait     waits until Release (control pool);
//  /t/Park     keeps its call until the client cancels it.
class AsyncServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    Listen(&builder, "127.0.0.1:0", {}, &port);
    server_ = std::make_unique<AsyncServer>(&builder);
    server_->Route("/t/Echo", Runs::kPolling,
                   [](ServerContext*, const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) {
                     *resp = *req;
                     auto* r = new UnaryReactor;
                     r->Finish(grpc::Status::OK);
                     return r;
                   });
    server_->Route("/t/Later", Runs::kPolling,
                   [](ServerContext*, const grpc::ByteBuffer*, grpc::ByteBuffer* resp) {
                     auto* r = new UnaryReactor;
                     std::thread([r, resp] {
                       absl::SleepFor(absl::Milliseconds(20));
                       *resp = Bytes("later");
                       r->Finish(grpc::Status::OK);
                     }).detach();
                     return r;
                   });
    server_->Route("/t/Wait", Runs::kControl,
                   [this](ServerContext*, const grpc::ByteBuffer*, grpc::ByteBuffer* resp) {
                     absl::MutexLock lock(&mu_);
                     mu_.Await(absl::Condition(&released_));
                     *resp = Bytes("released");
                     auto* r = new UnaryReactor;
                     r->Finish(grpc::Status::OK);
                     return r;
                   });
    server_->Route("/t/Park", Runs::kPolling,
                   [this](ServerContext*, const grpc::ByteBuffer*, grpc::ByteBuffer*) {
                     parked_ = new Waiter;
                     parked_->done = &parked_done_;
                     parked_arrived_.Notify();
                     return parked_;
                   });
    server_->Start(builder.BuildAndStart());
    ASSERT_NE(server_->server(), nullptr);
    stub_ = std::make_unique<grpc::GenericStub>(
        SharedChannel("127.0.0.1:" + std::to_string(port), {}));
  }

  // A call of `method` with `request`; *response gets the answer.
  grpc::Status Call(const std::string& method, const std::string& request,
                    std::string* response = nullptr, grpc::ClientContext* ctx = nullptr) {
    grpc::ClientContext own;
    if (ctx == nullptr) ctx = &own;
    if (ctx->deadline() == std::chrono::system_clock::time_point::max()) {
      ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    }
    grpc::ByteBuffer resp;
    absl::Notification done;
    grpc::Status status;
    StartUnaryCall(stub_.get(), ctx, method, Bytes(request), &resp, [&](grpc::Status s) {
      status = s;
      done.Notify();
    });
    done.WaitForNotification();
    if (response != nullptr) *response = String(resp);
    return status;
  }

  void Release() {
    absl::MutexLock lock(&mu_);
    released_ = true;
  }

  std::unique_ptr<AsyncServer> server_;
  std::unique_ptr<grpc::GenericStub> stub_;
  absl::Mutex mu_;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  Waiter* parked_ = nullptr;
  absl::Notification parked_arrived_, parked_done_;
};

TEST_F(AsyncServerTest, AnswersAtOnceAndLaterFromAnotherThread) {
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "hello", &got).ok());
  EXPECT_EQ(got, "hello");
  ASSERT_TRUE(Call("/t/Later", "", &got).ok());
  EXPECT_EQ(got, "later");
}

TEST_F(AsyncServerTest, LargeMessagesGoBothWays) {
  // Over kLargeMessageBytes: the handler runs on the bulk pool, the
  // client's callback on its pool.
  std::string big(3 * kLargeMessageBytes + 7, 'x');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31);
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", big, &got).ok());
  EXPECT_EQ(got, big);
}

TEST_F(AsyncServerTest, AnUnknownMethodIsUnimplemented) {
  const grpc::Status s = Call("/t/Nothing", "");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_NE(s.error_message().find("/t/Nothing"), std::string::npos) << s.error_message();
}

TEST_F(AsyncServerTest, AWaitingControlMethodDoesNotHoldUpTheOthers) {
  absl::Notification waited;
  std::string got;
  std::thread waiter([&] {
    EXPECT_TRUE(Call("/t/Wait", "", &got).ok());
    waited.Notify();
  });
  // While Wait holds a control thread, calls on the polling thread go on.
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(Call("/t/Echo", "x").ok());
  EXPECT_FALSE(waited.HasBeenNotified());
  Release();
  waiter.join();
  EXPECT_EQ(got, "released");
}

TEST_F(AsyncServerTest, ACancelledCallReachesItsReactorWhichEnds) {
  grpc::ClientContext ctx;
  grpc::Status status;
  std::thread caller([&] { status = Call("/t/Park", "", nullptr, &ctx); });
  ASSERT_TRUE(parked_arrived_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ctx.TryCancel();
  caller.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(parked_->cancelled.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(parked_done_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  delete parked_;
}

TEST_F(AsyncServerTest, ShutdownWaitsForReactorsToFinish) {
  absl::Notification answered;
  std::thread caller([&] {
    EXPECT_TRUE(Call("/t/Later", "").ok());
    answered.Notify();
  });
  absl::SleepFor(absl::Milliseconds(5));  // the call is open
  server_->Shutdown(absl::Now() + absl::Seconds(5));
  caller.join();
  EXPECT_TRUE(answered.HasBeenNotified());
  // Calls after the shutdown fail rather than hang.
  EXPECT_FALSE(Call("/t/Echo", "x").ok());
}

TEST_F(AsyncServerTest, HealthIsAnsweredByTheServer) {
  std::string got;
  ASSERT_TRUE(Call("/grpc.health.v1.Health/Check", "", &got).ok());
  EXPECT_EQ(got, std::string("\x08\x02", 2));  // NOT_SERVING
  server_->SetServing(true);
  ASSERT_TRUE(Call("/grpc.health.v1.Health/Check", "", &got).ok());
  EXPECT_EQ(got, std::string("\x08\x01", 2));  // SERVING
  EXPECT_EQ(Call("/grpc.health.v1.Health/Check", "\x0a\x01s").error_code(),
            grpc::StatusCode::NOT_FOUND);  // a named service
}

}  // namespace
}  // namespace rpc
}  // namespace mx
