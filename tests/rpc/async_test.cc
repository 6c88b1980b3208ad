// rpc::AsyncServer and its two transports, gRPC (rpc::StartUnaryCall,
// rpc/async.h) and stream connections (rpc::StartStreamCall, rpc/stream.h):
// answers made at once and later from other threads, cancellation,
// deadlines, methods that wait beside calls that must not, large messages,
// unknown methods, shutdown; for streams also the job token, malformed
// and oversized requests.
#include "rpc/async.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "rpc/rpc.h"
#include "rpc/security.h"
#include "rpc/stream_tls.h"
#include "tests/rpc/test_tls.h"

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

enum class Transport { kGrpc, kStream, kStreamTls };

std::shared_ptr<const StreamTls> TestStreamTlsFor(const Security& security) {
  absl::StatusOr<std::shared_ptr<const StreamTls>> made = StreamTls::For(security);
  EXPECT_TRUE(made.ok()) << made.status();
  return made.ok() ? *made : nullptr;
}

// The TLS of every kStreamTls test (made once: openssl takes a while).
std::shared_ptr<const StreamTls> TestStreamTls() {
  static const auto* tls =
      new std::shared_ptr<const StreamTls>(TestStreamTlsFor(test::MakeTls("async-test-ca")));
  return *tls;
}

// A server on 127.0.0.1 with the test's methods, called over the
// transport the test's parameter names:
//  /t/Echo     answers with the request at once (polling thread);
//  /t/Deadline answers "far" for a deadline over 300 days away, else "near";
//  /t/Later    answers from another thread 20 ms later;
//  /t/Wait     waits until Release (control pool);
//  /t/Park     keeps its call until the client cancels it.
// Its streams take the job token "secret", requests up to 8 MiB, a
// second for a connection's handshake (TLS) and hello, and kMaxConnections
// connections at once.
constexpr int kMaxConnections = 24;

class AsyncServerTest : public ::testing::TestWithParam<Transport> {
 protected:
  bool stream() const { return GetParam() != Transport::kGrpc; }
  bool tls() const { return GetParam() == Transport::kStreamTls; }

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
    server_->Route("/t/Deadline", Runs::kPolling,
                   [](ServerContext* ctx, const grpc::ByteBuffer*, grpc::ByteBuffer* resp) {
                     const bool far = ctx->deadline() > std::chrono::system_clock::now() +
                                                            std::chrono::hours(24 * 300);
                     *resp = Bytes(far ? "far" : "near");
                     auto* r = new UnaryReactor;
                     r->Finish(grpc::Status::OK);
                     return r;
                   });
    server_->Route("/t/Later", Runs::kPolling,
                   [this](ServerContext*, const grpc::ByteBuffer*, grpc::ByteBuffer* resp) {
                     if (!later_seen_.exchange(true)) later_arrived_.Notify();
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
    if (stream()) {
      StreamOptions o;
      o.guard = &guard_;
      o.max_message_bytes = 8 << 20;
      o.methods = {"/t/Echo", "/t/Deadline", "/t/Later", "/t/Wait", "/t/Park"};
      o.hello_time = absl::Seconds(1);
      o.max_connections = kMaxConnections;
      if (tls()) {
        o.tls = TestStreamTls();
        ASSERT_NE(o.tls, nullptr);
      }
      absl::StatusOr<int> p = server_->ServeStreams("127.0.0.1", 0, o);
      ASSERT_TRUE(p.ok()) << p.status();
      stream_port_ = *p;
      // A connection per test: the process keeps its connections by target.
      static int connection = 0;
      target_ = {"127.0.0.1:" + std::to_string(stream_port_), connection++, "secret", o.tls};
    }
  }

  // A call of `method` with `request` over the test's transport, within
  // `timeout`; *response gets the answer. *cancel (if given) is set, before
  // the call waits, to what cancels it.
  grpc::Status Call(const std::string& method, const std::string& request,
                    std::string* response = nullptr, std::function<void()>* cancel = nullptr,
                    absl::Duration timeout = absl::Seconds(10)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    grpc::ByteBuffer resp;
    absl::Notification done;
    grpc::Status status;
    auto finished = [&](grpc::Status s) {
      status = s;
      done.Notify();
    };
    if (stream()) {
      std::shared_ptr<StreamCall> call =
          StartStreamCall(target_, method, Bytes(request), &resp, absl::Now() + timeout, finished);
      if (cancel != nullptr) *cancel = [call] { call->Cancel(); };
    } else {
      if (cancel != nullptr) *cancel = [&ctx] { ctx.TryCancel(); };
      StartUnaryCall(stub_.get(), &ctx, method, Bytes(request), &resp, finished);
    }
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
  Guard guard_{"secret", /*identities=*/false};
  int stream_port_ = 0;
  StreamTarget target_;
  absl::Mutex mu_;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  Waiter* parked_ = nullptr;
  absl::Notification parked_arrived_, parked_done_, later_arrived_;
  std::atomic<bool> later_seen_{false};
};

TEST_P(AsyncServerTest, AnswersAtOnceAndLaterFromAnotherThread) {
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "hello", &got).ok());
  EXPECT_EQ(got, "hello");
  ASSERT_TRUE(Call("/t/Later", "", &got).ok());
  EXPECT_EQ(got, "later");
}

TEST_P(AsyncServerTest, LargeMessagesGoBothWays) {
  // Over kLargeMessageBytes: the handler runs on the bulk pool, the
  // client's callback on its pool.
  std::string big(3 * kLargeMessageBytes + 7, 'x');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31);
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", big, &got).ok());
  EXPECT_EQ(got, big);
}

TEST_P(AsyncServerTest, AnUnknownMethodIsUnimplemented) {
  const grpc::Status s = Call("/t/Nothing", "");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_NE(s.error_message().find("/t/Nothing"), std::string::npos) << s.error_message();
}

TEST_P(AsyncServerTest, AWaitingControlMethodDoesNotHoldUpTheOthers) {
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

TEST_P(AsyncServerTest, ACancelledCallReachesItsReactorWhichEnds) {
  std::function<void()> cancel;
  grpc::Status status;
  std::thread caller([&] { status = Call("/t/Park", "", nullptr, &cancel); });
  ASSERT_TRUE(parked_arrived_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  cancel();
  caller.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(parked_->cancelled.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(parked_done_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  delete parked_;
}

TEST_P(AsyncServerTest, ShutdownWaitsForReactorsToFinish) {
  absl::Notification answered;
  std::thread caller([&] {
    EXPECT_TRUE(Call("/t/Later", "").ok());
    answered.Notify();
  });
  // The call is open (its answer comes 20 ms after it arrived).
  ASSERT_TRUE(later_arrived_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  server_->Shutdown(absl::Now() + absl::Seconds(5));
  caller.join();
  EXPECT_TRUE(answered.HasBeenNotified());
  // Calls after the shutdown fail rather than hang.
  EXPECT_FALSE(Call("/t/Echo", "x").ok());
}

TEST_P(AsyncServerTest, ACallPastItsDeadlineFailsAndItsReactorIsCancelled) {
  const absl::Time start = absl::Now();
  const grpc::Status s = Call("/t/Park", "", nullptr, nullptr, absl::Milliseconds(300));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  EXPECT_EQ(s.error_message(), "Deadline Exceeded");
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  ASSERT_TRUE(parked_arrived_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(parked_->cancelled.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(parked_done_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  delete parked_;
}

TEST_P(AsyncServerTest, AShortDeadlineAfterALongOneEndsOnTime) {
  // A call with a long deadline that ended leaves the deadline thread
  // asleep until then; a later call with a short one must wake it.
  ASSERT_TRUE(Call("/t/Echo", "x", nullptr, nullptr, absl::Seconds(60)).ok());
  const absl::Time start = absl::Now();
  const grpc::Status s = Call("/t/Park", "", nullptr, nullptr, absl::Milliseconds(300));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  ASSERT_TRUE(parked_arrived_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(parked_done_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  delete parked_;
}

TEST_P(AsyncServerTest, ManyCallsInFlightEachGetTheirOwnAnswer) {
  // Answers come back in the order calls finish (Later's after Echo's).
  constexpr int kCalls = 64;
  std::vector<std::string> got(kCalls);
  std::vector<grpc::Status> status(kCalls);
  std::vector<std::thread> callers;
  for (int i = 0; i < kCalls; ++i) {
    callers.emplace_back([&, i] {
      status[i] =
          Call(i % 3 == 0 ? "/t/Later" : "/t/Echo", std::string(i * 1000, 'a' + i % 26), &got[i]);
    });
  }
  for (std::thread& t : callers) t.join();
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(status[i].ok()) << i << ": " << status[i].error_message();
    EXPECT_EQ(got[i], i % 3 == 0 ? "later" : std::string(i * 1000, 'a' + i % 26)) << i;
  }
}

TEST_P(AsyncServerTest, MessagesOfEverySizeAroundTheReadAheadArriveWhole) {
  // Streams read up to 8 KiB ahead (several small answers in one read) and
  // larger bodies straight into place; with TLS, records hold up to 128
  // KiB, and those a body wants whole are opened in place: sizes on both
  // sides of each, in flight together, each answered with its own bytes.
  std::vector<size_t> sizes = {0, 1, 2, 31, 32, 33, 100, 16383, 16384, 16385, 200000, 400000};
  for (size_t n = 8180; n <= 8200; ++n) sizes.push_back(n);
  for (size_t n = kMaxRecordBytes - 80; n <= kMaxRecordBytes + 8; n += 4) sizes.push_back(n);
  std::vector<std::string> got(sizes.size());
  std::vector<grpc::Status> status(sizes.size());
  std::vector<std::thread> callers;
  for (size_t i = 0; i < sizes.size(); ++i) {
    callers.emplace_back([&, i] {
      status[i] = Call("/t/Echo", std::string(sizes[i], static_cast<char>('a' + i % 26)), &got[i]);
    });
  }
  for (std::thread& t : callers) t.join();
  for (size_t i = 0; i < sizes.size(); ++i) {
    ASSERT_TRUE(status[i].ok()) << sizes[i] << ": " << status[i].error_message();
    EXPECT_EQ(got[i], std::string(sizes[i], static_cast<char>('a' + i % 26))) << sizes[i];
  }
}

TEST_P(AsyncServerTest, HealthIsAnsweredByTheServer) {
  if (stream()) {  // a gRPC service: streams serve only the routes named
    EXPECT_EQ(Call("/grpc.health.v1.Health/Check", "").error_code(),
              grpc::StatusCode::UNIMPLEMENTED);
    return;
  }
  std::string got;
  ASSERT_TRUE(Call("/grpc.health.v1.Health/Check", "", &got).ok());
  EXPECT_EQ(got, std::string("\x08\x02", 2));  // NOT_SERVING
  server_->SetServing(true);
  ASSERT_TRUE(Call("/grpc.health.v1.Health/Check", "", &got).ok());
  EXPECT_EQ(got, std::string("\x08\x01", 2));  // SERVING
  // The empty name written out (service = ""), as some clients send it:
  // the whole server too (it was NOT_FOUND).
  ASSERT_TRUE(Call("/grpc.health.v1.Health/Check", std::string("\x0a\x00", 2), &got).ok());
  EXPECT_EQ(got, std::string("\x08\x01", 2));
  EXPECT_EQ(Call("/grpc.health.v1.Health/Check", "\x0a\x01s").error_code(),
            grpc::StatusCode::NOT_FOUND);  // a named service
}

std::string TransportName(const ::testing::TestParamInfo<Transport>& info) {
  return info.param == Transport::kGrpc     ? "Grpc"
         : info.param == Transport::kStream ? "Stream"
                                            : "StreamTls";
}

INSTANTIATE_TEST_SUITE_P(Transports, AsyncServerTest,
                         ::testing::Values(Transport::kGrpc, Transport::kStream,
                                           Transport::kStreamTls),
                         TransportName);

// ---- Streams alone.

using StreamTest = AsyncServerTest;

// A raw connection to the server's stream port.
int RawConnection(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  return fd;
}

// Sends `bytes` (none: nothing) on a new raw connection to `port`, then
// reads until the server closes it or `wait` passes without data: the
// last read's result (0: the server closed it).
ssize_t SendAndReadToEnd(int port, const std::string& bytes, absl::Duration wait) {
  const int fd = RawConnection(port);
  if (!bytes.empty()) {
    EXPECT_EQ(write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  }
  const timeval tv = absl::ToTimeval(wait);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  char buffer[256];
  ssize_t r;
  while ((r = read(fd, buffer, sizeof(buffer))) > 0) {
  }
  close(fd);
  return r;
}

TEST_P(StreamTest, AWrongOrMissingTokenIsRefusedSayingSo) {
  for (const std::string token : {"wrong", ""}) {
    StreamTarget other = target_;
    other.token = token;
    other.connection += 1000;
    grpc::ByteBuffer resp;
    absl::Notification done;
    grpc::Status status;
    StartStreamCall(other, "/t/Echo", Bytes("x"), &resp, absl::Now() + absl::Seconds(10),
                    [&](grpc::Status s) {
                      status = s;
                      done.Notify();
                    });
    ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << status.error_message();
    EXPECT_NE(status.error_message().find(token.empty() ? "no job token" : "wrong job token"),
              std::string::npos)
        << status.error_message();
  }
  EXPECT_EQ(guard_.refused(), 2);  // counted as the guard counts refused calls
  // The server serves on.
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "still", &got).ok());
  EXPECT_EQ(got, "still");
}

TEST_P(StreamTest, ACallbackThatHoldsItsCallsHandleLetsItGo) {
  // As the distributed store does: its record of the call holds the
  // handle, and the callback holds the record. Once the callback has run,
  // nothing may hold the call (a cycle kept every call's buffers: a leak).
  std::weak_ptr<StreamCall> gone;
  {
    struct Record {
      std::shared_ptr<StreamCall> handle;
      grpc::ByteBuffer response;
    };
    auto record = std::make_shared<Record>();
    absl::Notification done;
    record->handle =
        StartStreamCall(target_, "/t/Echo", Bytes(std::string(2 << 20, 'x')), &record->response,
                        absl::Now() + absl::Seconds(10), [record, &done](grpc::Status s) {
                          EXPECT_TRUE(s.ok()) << s.error_message();
                          done.Notify();
                        });
    gone = record->handle;
    ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  }
  const absl::Time until = absl::Now() + absl::Seconds(5);
  while (!gone.expired() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_TRUE(gone.expired());
}

TEST_P(StreamTest, AnOversizedRequestIsRefusedAndTheConnectionGoesOn) {
  const grpc::Status s = Call("/t/Echo", std::string((8 << 20) + 1, 'x'));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "after", &got).ok());
  EXPECT_EQ(got, "after");
}

TEST_P(StreamTest, GarbageEndsOnlyItsOwnConnection) {
  // Not a hello; then a hello and a request header with a method of 2^31
  // bytes: each connection is closed by the server (after an answer that
  // says why, or with TLS an alert), which serves on.
  const std::vector<std::string> garbage = {std::string("GET / HTTP/1.1\r\n\r\n"),
                                            std::string("MXS1\x06\0\0\0secret", 14) +
                                                std::string("\0\0\0\x80", 4) +
                                                std::string(28, '\x01')};
  for (const std::string& bytes : garbage) {
    EXPECT_EQ(SendAndReadToEnd(stream_port_, bytes, absl::Seconds(10)), 0)
        << "the server should close the connection";
  }
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "fine", &got).ok());
  EXPECT_EQ(got, "fine");
}

// A request whose call id is still open is malformed: it used to replace
// the first call in the connection's list, so the connection's end could
// no longer cancel that one, which kept its reactor (and the connection)
// until the server stopped.
TEST_P(StreamTest, ARequestWithTheIdOfAnOpenCallEndsTheConnection) {
  if (tls()) GTEST_SKIP() << "raw bytes: the plain transport only";
  const uint32_t method_bytes = 7;  // "/t/Park"
  struct {
    uint32_t method_bytes, reserved = 0;
    uint64_t id = 5;
    int64_t timeout_us = int64_t{60} * 1000 * 1000;
    uint64_t body_bytes = 0;
  } header{method_bytes};
  static_assert(sizeof(header) == 32, "the stream format's request header");
  const std::string request =
      std::string(reinterpret_cast<const char*>(&header), sizeof(header)) + "/t/Park";
  const int fd = RawConnection(stream_port_);
  const std::string first = std::string("MXS1\x06\0\0\0secret", 14) + request;
  ASSERT_EQ(write(fd, first.data(), first.size()), static_cast<ssize_t>(first.size()));
  ASSERT_TRUE(parked_arrived_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  Waiter* parked = parked_;
  ASSERT_EQ(write(fd, request.data(), request.size()), static_cast<ssize_t>(request.size()));
  // The server ends the connection (an answer may come first), and the
  // first call's reactor is cancelled and ends.
  const timeval tv = absl::ToTimeval(absl::Seconds(10));
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  char buffer[256];
  ssize_t r;
  while ((r = read(fd, buffer, sizeof(buffer))) > 0) {
  }
  const int read_errno = errno;
  close(fd);
  // A close with bytes of ours still unread there arrives as a reset.
  EXPECT_TRUE(r == 0 || (r < 0 && read_errno == ECONNRESET))
      << "the server should close the connection: " << (r < 0 ? strerror(read_errno) : "");
  EXPECT_TRUE(parked->cancelled.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(parked_done_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(parked_, parked) << "the second request was dispatched";
  delete parked;
}

TEST_P(StreamTest, AConnectionThatSaysNothingEndsAfterTheHelloTime) {
  // Silent, then half a hello (with TLS, the start of a handshake's first
  // record): each is closed by the server about a second (its hello time)
  // after it connected, without holding a thread longer.
  const std::string half =
      tls() ? std::string("\x16\x03\x01", 3) : std::string("MXS1\x06\0\0\0sec", 11);
  for (const std::string& bytes : {std::string(), half}) {
    const absl::Time start = absl::Now();
    EXPECT_EQ(SendAndReadToEnd(stream_port_, bytes, absl::Seconds(20)), 0)
        << "the server should close the connection";
    const absl::Duration took = absl::Now() - start;
    EXPECT_GE(took, absl::Milliseconds(900)) << bytes.size() << " bytes sent";
    EXPECT_LT(took, absl::Seconds(5)) << bytes.size() << " bytes sent";
  }
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "after", &got).ok());
  EXPECT_EQ(got, "after");
}

// Sends `bytes` on a new raw connection to `port`, one byte every
// `every`, until the server closes it: how long that took after the
// connect (InfiniteDuration: not closed by the last byte).
absl::Duration TrickleUntilClosed(int port, const std::string& bytes, absl::Duration every) {
  const int fd = RawConnection(port);
  const absl::Time start = absl::Now();
  absl::Duration closed = absl::InfiniteDuration();
  for (size_t i = 0; i < bytes.size() && closed == absl::InfiniteDuration(); ++i) {
    if (send(fd, bytes.data() + i, 1, MSG_NOSIGNAL) != 1) {
      closed = absl::Now() - start;
      break;
    }
    pollfd p{fd, POLLIN | POLLRDHUP, 0};
    if (poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(every))) <= 0) continue;
    char buffer[256];
    while (read(fd, buffer, sizeof(buffer)) > 0) {  // an answer or alert, then the end
    }
    closed = absl::Now() - start;
  }
  close(fd);
  return closed;
}

TEST_P(StreamTest, AConnectionThatTricklesItsHelloEndsAfterTheHelloTime) {
  // A byte every 200 ms: each read is quick, the whole hello is not. Each
  // read's timeout alone let such a client hold the connection (and its
  // two threads) for hours.
  const std::string hello = tls()
                                ? std::string("\x16\x03\x01\x02\x00", 5) + std::string(512, '\x01')
                                : std::string("MXS1\x40\0\0\0", 8) + std::string(64, 's');
  const absl::Duration closed = TrickleUntilClosed(stream_port_, hello, absl::Milliseconds(200));
  EXPECT_GE(closed, absl::Milliseconds(900));
  EXPECT_LT(closed, absl::Seconds(3)) << "hello time 1 s";
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "after", &got).ok());
  EXPECT_EQ(got, "after");
}

// A call without a deadline has none on the server either: over a stream,
// the client's "infinite" (INT64_MAX us) overflowed into a deadline in the
// past, and a waiting handler gave up at once.
TEST_P(AsyncServerTest, ACallWithoutADeadlineHasNoneThere) {
  std::string got;
  ASSERT_TRUE(Call("/t/Deadline", "", &got, nullptr, absl::InfiniteDuration()).ok());
  EXPECT_EQ(got, "far");
  ASSERT_TRUE(Call("/t/Deadline", "", &got, nullptr, absl::Seconds(10)).ok());
  EXPECT_EQ(got, "near");
}

// Connections beyond the listener's limit are closed at once (each open
// one holds two threads; a flood of them from anyone who reaches the port
// once ended the process when the system refused a thread), and the
// server serves again once the silent ones reach their hello time.
TEST_P(StreamTest, ConnectionsBeyondTheLimitAreClosedAtOnce) {
  std::vector<int> silent;
  for (int i = 0; i < kMaxConnections; ++i) silent.push_back(RawConnection(stream_port_));
  // The listener takes them in turn: a raw connection refused at once
  // tells that the limit is reached.
  absl::Duration took = absl::InfiniteDuration();
  for (int attempt = 0; attempt < 50 && took >= absl::Milliseconds(500); ++attempt) {
    const absl::Time start = absl::Now();
    EXPECT_EQ(SendAndReadToEnd(stream_port_, "", absl::Seconds(5)), 0);
    took = absl::Now() - start;
  }
  EXPECT_LT(took, absl::Milliseconds(500)) << "no connection was refused before its hello time";
  for (int fd : silent) close(fd);
  std::string got;
  ASSERT_TRUE(Call("/t/Echo", "after", &got).ok());
  EXPECT_EQ(got, "after");
}

TEST_P(StreamTest, CallsToAServerThatStoppedFailUnavailable) {
  server_->Shutdown(absl::Now() + absl::Seconds(5));
  const absl::Time start = absl::Now();
  const grpc::Status s = Call("/t/Echo", "x");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("127.0.0.1:" + std::to_string(stream_port_)), std::string::npos)
      << s.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// A socket listening on 127.0.0.1 (a free port, in *port): a "server"
// that a test plays by hand.
int RawListener(int* port) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  EXPECT_EQ(listen(listener, 1), 0);
  socklen_t len = sizeof(addr);
  getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  return listener;
}

// Starts a call of /t/Echo with "x" on a stream connection to `port`,
// ending by `deadline`: *status gets its status, then `done` is notified.
// `response` must outlive the call.
void StartEchoX(int port, absl::Time deadline, grpc::ByteBuffer* response, grpc::Status* status,
                absl::Notification* done, AnswerPlacement placement = {}) {
  StartStreamCall(
      {"127.0.0.1:" + std::to_string(port), 0, "secret"}, "/t/Echo", Bytes("x"), response, deadline,
      [status, done](grpc::Status s) {
        *status = s;
        done->Notify();
      },
      placement);
}

TEST_P(StreamTest, KeepalivePingsBreakAConnectionToAHungPeerButNotToAWaitingOne) {
  // A "server" that takes the connection and reads, but never answers.
  int port = 0;
  const int listener = RawListener(&port);
  std::thread hung([listener] {
    const int fd = accept(listener, nullptr, nullptr);
    char buffer[4096];
    while (read(fd, buffer, sizeof(buffer)) > 0) {
    }
    close(fd);
  });
  // Meanwhile a call that waits on a live server, past the keepalive time.
  grpc::Status parked;
  std::function<void()> cancel;
  std::thread waiter([&] { parked = Call("/t/Park", "", nullptr, &cancel, absl::Seconds(60)); });
  const absl::Time start = absl::Now();
  grpc::ByteBuffer resp;
  absl::Notification done;
  grpc::Status status;
  StartEchoX(port, absl::Now() + absl::Seconds(60), &resp, &status, &done);
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_NE(status.error_message().find("timed out"), std::string::npos) << status.error_message();
  EXPECT_GE(took, absl::Seconds(9));  // 5 s quiet, then 5 s for the ping's answer
  EXPECT_LE(took, absl::Seconds(15));
  // The parked call's connection answered its pings: it still waits.
  ASSERT_TRUE(parked_arrived_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_FALSE(parked_->cancelled.HasBeenNotified());
  cancel();
  waiter.join();
  EXPECT_EQ(parked.error_code(), grpc::StatusCode::CANCELLED) << parked.error_message();
  EXPECT_TRUE(parked_done_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  delete parked_;
  shutdown(listener, SHUT_RDWR);
  close(listener);
  hung.join();
}

// Takes a connection on `listener` and reads its hello and one call (54
// bytes: "MXS1", the token's length and "secret"; the request's header,
// "/t/Echo" and "x"). Returns the connection.
int AcceptCall(int listener) {
  const int fd = accept(listener, nullptr, nullptr);
  char buffer[4096];
  for (size_t got = 0; got < 54;) {
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  return fd;
}

// Plays a server on `listener`: takes a connection, its hello and one call
// (AcceptCall), answers call 1 with a header that promises
// 1 MiB of body and sends the first 100 KB of it ('v'). Returns the
// connection.
int AnswerPartly(int listener) {
  const int fd = AcceptCall(listener);
  struct {
    uint64_t id = 1;
    int32_t code = 0;
    uint32_t message_bytes = 0;
    uint64_t body_bytes = 1 << 20;
  } header;
  static_assert(sizeof(header) == 24, "the stream format's answer header");
  const std::string part(100000, 'v');
  EXPECT_EQ(write(fd, &header, sizeof(header)), static_cast<ssize_t>(sizeof(header)));
  EXPECT_EQ(write(fd, part.data(), part.size()), static_cast<ssize_t>(part.size()));
  return fd;
}

TEST_P(StreamTest, AnAnswerCutOffMidwayFailsItsCallAtOnce) {
  // A "server" that sends 100 KB of a promised 1 MiB answer and closes the
  // connection: as a server killed while it sends.
  int port = 0;
  const int listener = RawListener(&port);
  std::thread cut([listener] { close(AnswerPartly(listener)); });
  const absl::Time start = absl::Now();
  grpc::ByteBuffer resp;
  absl::Notification done;
  grpc::Status status;
  StartEchoX(port, absl::Now() + absl::Seconds(60), &resp, &status, &done);
  // At once, not at the call's deadline: the call had been taken off the
  // connection's list of calls waiting for answers when its body started.
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(20)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_NE(status.error_message().find("broke"), std::string::npos) << status.error_message();
  cut.join();
  close(listener);
}

TEST_P(StreamTest, APongWithABodyBreaksTheConnectionInsteadOfAnsweringACall) {
  // A "server" that sends a pong (id 0, OK) carrying a body: an answer
  // header for call 1 and its 4 bytes. Read as a pong, the body was taken
  // for the next answer, and call 1 completed with what it forged.
  int port = 0;
  const int listener = RawListener(&port);
  std::thread forger([listener] {
    const int fd = AcceptCall(listener);
    struct Header {
      uint64_t id;
      int32_t code;
      uint32_t message_bytes;
      uint64_t body_bytes;
    };
    const Header pong{0, 0, 0, sizeof(Header) + 4}, forged{1, 0, 0, 4};
    std::string bytes(reinterpret_cast<const char*>(&pong), sizeof(pong));
    bytes.append(reinterpret_cast<const char*>(&forged), sizeof(forged));
    bytes += "evil";
    EXPECT_EQ(write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    absl::SleepFor(absl::Seconds(1));
    close(fd);
  });
  grpc::ByteBuffer resp;
  absl::Notification done;
  grpc::Status status;
  StartEchoX(port, absl::Now() + absl::Seconds(20), &resp, &status, &done);
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(20)));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << String(resp);
  EXPECT_NE(status.error_message().find("a malformed answer (a pong with a body)"),
            std::string::npos)
      << status.error_message();
  forger.join();
  close(listener);
}

TEST_P(StreamTest, AnAnswersLastBytesAreReadIntoItsPlacement) {
  // 3 MiB echoed: the last 1 MiB go straight to `placed`, and the response
  // ends with a slice over it.
  const std::string request = std::string(2 << 20, 'a') + std::string(1 << 20, 'b');
  std::vector<char> placed(1 << 20, 0);
  grpc::ByteBuffer resp;
  absl::Notification done;
  grpc::Status status;
  StartStreamCall(
      target_, "/t/Echo", Bytes(request), &resp, absl::Now() + absl::Seconds(10),
      [&](grpc::Status s) {
        status = s;
        done.Notify();
      },
      AnswerPlacement{placed.data(), placed.size()});
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(std::string(placed.begin(), placed.end()), std::string(1 << 20, 'b'));
  EXPECT_EQ(String(resp), request);
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(resp.Dump(&slices).ok());
  EXPECT_EQ(static_cast<const void*>(slices.back().begin()), placed.data());
  // An answer shorter than the placement is read as any other.
  std::fill(placed.begin(), placed.end(), 0);
  absl::Notification short_done;
  StartStreamCall(
      target_, "/t/Echo", Bytes("short"), &resp, absl::Now() + absl::Seconds(10),
      [&](grpc::Status s) {
        status = s;
        short_done.Notify();
      },
      AnswerPlacement{placed.data(), placed.size()});
  ASSERT_TRUE(short_done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(String(resp), "short");
  EXPECT_EQ(placed[0], 0);
}

TEST_P(StreamTest, ACallThatEndsWhileItsAnswerIsReadInPlaceCompletesOnceTheReadStops) {
  // A "server" that answers call 1 with a header promising 1 MiB, sends
  // 100 KB, and stalls. The call's deadline (1 s) passes meanwhile: it must
  // complete (DEADLINE_EXCEEDED) once the stalled read is given up (the
  // connection ends), and nothing may reach its placement after that.
  int port = 0;
  const int listener = RawListener(&port);
  absl::Notification called_back;
  std::atomic<bool> rest_sent{false};
  std::thread stall([&] {
    const int fd = AnswerPartly(listener);
    const std::string rest((1 << 20) - 100000, 'z');
    EXPECT_TRUE(called_back.WaitForNotificationWithTimeout(absl::Seconds(20)));
    // Too late: the connection is gone (or nobody reads into the placement).
    (void)!send(fd, rest.data(), rest.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    rest_sent = true;
    close(fd);
  });
  std::vector<char> placed(1 << 20, 0);
  const absl::Time start = absl::Now();
  grpc::ByteBuffer resp;
  grpc::Status status;
  StartEchoX(port, absl::Now() + absl::Seconds(1), &resp, &status, &called_back,
             AnswerPlacement{placed.data(), placed.size()});
  ASSERT_TRUE(called_back.WaitForNotificationWithTimeout(absl::Seconds(20)));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  EXPECT_GE(took, absl::Seconds(1));
  EXPECT_LT(took, absl::Seconds(5));
  EXPECT_EQ(placed[0], 'v');
  stall.join();
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_TRUE(rest_sent);
  EXPECT_EQ(std::count(placed.begin(), placed.end(), 'z'), 0);
  close(listener);
}

INSTANTIATE_TEST_SUITE_P(Streams, StreamTest,
                         ::testing::Values(Transport::kStream, Transport::kStreamTls),
                         TransportName);

// The worker's calls and the servers' replication take their targets
// from here: with TLS when the process has TLS.
TEST(StreamTarget, CarriesTheProcesssTls) {
  Security plain;
  plain.token = "t";
  const StreamTarget p = StreamTargetFor("127.0.0.1:4711", 2, plain);
  EXPECT_EQ(p.address, "127.0.0.1:4711");
  EXPECT_EQ(p.connection, 2);
  EXPECT_EQ(p.token, "t");
  EXPECT_EQ(p.tls, nullptr);
  Security tls = test::MakeTls("target-ca");
  tls.token = "t";
  const StreamTarget t = StreamTargetFor("127.0.0.1:4711", 2, tls);
  EXPECT_EQ(t.address, "127.0.0.1:4711");
  EXPECT_EQ(t.tls, TestStreamTlsFor(tls));
  EXPECT_NE(t.tls, nullptr);
  // Files that do not load: gRPC's TLS takes the calls (and says why).
  Security broken = plain;
  broken.tls_cert = "-----BEGIN CERTIFICATE-----";
  broken.tls_key = broken.tls_ca = "x";
  EXPECT_EQ(StreamTargetFor("127.0.0.1:4711", 2, broken).address, "");
  EXPECT_FALSE(StreamTls::For(broken).ok());
  EXPECT_EQ(StreamTargetFor("", 0, plain).address, "");  // a server without streams
}

// ---- TLS alone.

// One call of /t/Echo with `request` to `target`, within 10 s.
grpc::Status EchoOn(const StreamTarget& target, const std::string& request,
                    std::string* got = nullptr) {
  grpc::ByteBuffer resp;
  absl::Notification done;
  grpc::Status status;
  StartStreamCall(target, "/t/Echo", Bytes(request), &resp, absl::Now() + absl::Seconds(10),
                  [&](grpc::Status s) {
                    status = s;
                    done.Notify();
                  });
  EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(15)));
  if (got != nullptr) *got = String(resp);
  return status;
}

using StreamTlsTest = AsyncServerTest;

TEST_P(StreamTlsTest, ACertificateOfAnotherCaIsRefusedAtTheHandshake) {
  StreamTarget stranger = target_;
  stranger.connection += 1000;
  stranger.tls = *StreamTls::For(test::MakeTls("stranger-ca"));
  const grpc::Status s = EchoOn(stranger, "let me in");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  // The client checks the server first: the server's certificate is not
  // its CA's.
  EXPECT_NE(s.error_message().find("TLS handshake: the server's certificate"), std::string::npos)
      << s.error_message();
  std::string got;
  ASSERT_TRUE(EchoOn(target_, "still", &got).ok());
  EXPECT_EQ(got, "still");
}

TEST_P(StreamTlsTest, AClientWithoutTlsIsToldSo) {
  StreamTarget plain = target_;
  plain.connection += 1000;
  plain.tls = nullptr;
  const grpc::Status s = EchoOn(plain, "hello");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_NE(s.error_message().find("takes TLS connections only"), std::string::npos)
      << s.error_message();
  std::string got;
  ASSERT_TRUE(EchoOn(target_, "still", &got).ok());
  EXPECT_EQ(got, "still");
}

TEST(StreamTls, ATlsClientOfAServerWithoutTlsSaysSo) {
  grpc::ServerBuilder builder;
  int port = 0;
  Listen(&builder, "127.0.0.1:0", {}, &port);
  AsyncServer server(&builder);
  server.Start(builder.BuildAndStart());
  StreamOptions o;
  absl::StatusOr<int> stream_port = server.ServeStreams("127.0.0.1", 0, o);
  ASSERT_TRUE(stream_port.ok()) << stream_port.status();
  const grpc::Status s =
      EchoOn({"127.0.0.1:" + std::to_string(*stream_port), 0, "", TestStreamTls()}, "x");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("TLS handshake: the server closed the connection"),
            std::string::npos)
      << s.error_message();
}

INSTANTIATE_TEST_SUITE_P(Streams, StreamTlsTest, ::testing::Values(Transport::kStreamTls),
                         TransportName);

// Both ends of a handshake on a socket pair.
struct Handshaken {
  StreamTls::Session client, server;
};
Handshaken ShakeHands() {
  int fds[2];
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  const std::shared_ptr<const StreamTls> tls = TestStreamTls();
  absl::StatusOr<StreamTls::Session> server;
  std::thread accept([&] { server = tls->Server(fds[1], absl::Now() + absl::Seconds(10)); });
  absl::StatusOr<StreamTls::Session> client =
      tls->Client(fds[0], "127.0.0.1", absl::Now() + absl::Seconds(10));
  accept.join();
  close(fds[0]);
  close(fds[1]);
  EXPECT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(server.ok()) << server.status();
  Handshaken h;
  if (client.ok() && server.ok()) h = {*std::move(client), *std::move(server)};
  return h;
}

std::string SealOne(Sealer& sealer, const std::string& plaintext) {
  std::string record(plaintext.size() + kRecordHeaderBytes + kRecordTagBytes, '\0');
  std::vector<iovec> pieces = {{const_cast<char*>(plaintext.data()), plaintext.size()}};
  record.resize(sealer.Seal(pieces, record.data()));
  return record;
}

TEST(StreamTls, RecordsOpenOnlyWholeInOrderAndWithTheirDirectionsKeys) {
  Handshaken h = ShakeHands();
  ASSERT_NE(h.client.out, nullptr);
  const std::string text = "the weights of key 7";
  std::string out(text.size(), '\0');
  const std::string first = SealOne(*h.client.out, text);
  EXPECT_EQ(first.find(text), std::string::npos) << "sealed, not in the clear";
  ASSERT_TRUE(h.server.in->Open(first.data(), out.data()).ok());
  EXPECT_EQ(out, text);
  // A changed byte, anywhere: the length, the ciphertext or the tag.
  for (size_t at : {size_t{0}, kRecordHeaderBytes + 3, first.size() - 1}) {
    std::string changed = SealOne(*h.client.out, text);
    changed[at] ^= 1;
    EXPECT_FALSE(h.server.in->Open(changed.data(), out.data()).ok()) << "byte " << at;
  }
  // Replayed (record 0 again, where record 4 is due) or from the other
  // direction: neither opens.
  Handshaken fresh = ShakeHands();
  const std::string zero = SealOne(*fresh.client.out, text);
  ASSERT_TRUE(fresh.server.in->Open(zero.data(), out.data()).ok());
  EXPECT_FALSE(fresh.server.in->Open(zero.data(), out.data()).ok());
  const std::string reverse = SealOne(*fresh.server.out, text);
  EXPECT_FALSE(fresh.server.in->Open(reverse.data(), out.data()).ok());
  // Another handshake's keys do not open this one's records.
  EXPECT_FALSE(fresh.client.in->Open(SealOne(*h.server.out, text).data(), out.data()).ok());
}

// OpenSSL's AES-128-GCM of record `i` of `plaintext` under key and iv
// (the record format of rpc/stream_tls.h, sealed independently of
// Sealer's library).
std::string OpenSslRecord(const uint8_t* key, const uint8_t* iv, uint64_t i,
                          const std::string& plaintext) {
  uint8_t nonce[kStreamIvBytes];
  std::memcpy(nonce, iv, kStreamIvBytes);
  for (int b = 0; b < 8; ++b) nonce[kStreamIvBytes - 1 - b] ^= static_cast<uint8_t>(i >> (8 * b));
  std::string record(kRecordHeaderBytes + plaintext.size() + kRecordTagBytes, '\0');
  const uint32_t length = static_cast<uint32_t>(plaintext.size());
  std::memcpy(record.data(), &length, kRecordHeaderBytes);
  auto* at = reinterpret_cast<uint8_t*>(record.data());
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  int n = 0;
  EXPECT_EQ(EVP_EncryptInit_ex(ctx, EVP_aes_128_gcm(), nullptr, key, nonce), 1);
  EXPECT_EQ(EVP_EncryptUpdate(ctx, nullptr, &n, at, kRecordHeaderBytes), 1);
  EXPECT_EQ(EVP_EncryptUpdate(ctx, at + kRecordHeaderBytes, &n,
                              reinterpret_cast<const uint8_t*>(plaintext.data()), length),
            1);
  EXPECT_EQ(EVP_EncryptFinal_ex(ctx, at + kRecordHeaderBytes + length, &n), 1);
  EXPECT_EQ(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, kRecordTagBytes,
                                at + kRecordHeaderBytes + length),
            1);
  EVP_CIPHER_CTX_free(ctx);
  return record;
}

// Records are plain AES-128-GCM: what Sealer writes is byte for byte what
// OpenSSL makes of the same record, and Opener opens OpenSSL's, for sizes
// around GCM's 16-byte blocks and pieces that split blocks (a sealer
// carries a partial block from one piece into the next).
TEST(StreamTls, RecordsAreAes128GcmAsOpenSslSealsThem) {
  ASSERT_NE(TestStreamTls(), nullptr);  // the cipher runs on this CPU
  uint8_t key[kStreamKeyBytes], iv[kStreamIvBytes];
  for (size_t i = 0; i < kStreamKeyBytes; ++i) key[i] = static_cast<uint8_t>(17 * i + 3);
  for (size_t i = 0; i < kStreamIvBytes; ++i) iv[i] = static_cast<uint8_t>(29 * i + 5);
  Sealer sealer(key, iv);
  Opener opener(key, iv);
  uint64_t record = 0;
  for (size_t size : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{255}, size_t{4103},
                      kMaxRecordBytes}) {
    std::string text(size, '\0');
    for (size_t i = 0; i < size; ++i) text[i] = static_cast<char>((i * 131 + size) & 0xff);
    // In one piece, and in pieces of 1, 7, 33, ... bytes (then the rest).
    std::vector<iovec> pieces;
    for (size_t at = 0, piece = 1; at < size; at += piece, piece = piece * 4 + 3) {
      pieces.push_back({text.data() + at, std::min(piece, size - at)});
    }
    for (const std::vector<iovec>& split : {std::vector<iovec>{{text.data(), size}}, pieces}) {
      std::string sealed(size + kRecordHeaderBytes + kRecordTagBytes, '\0');
      ASSERT_EQ(sealer.Seal(split, sealed.data()), sealed.size());
      const std::string expected = OpenSslRecord(key, iv, record, text);
      EXPECT_TRUE(sealed == expected) << size << " bytes in " << split.size() << " pieces";
      std::string out(size, '\0');
      ASSERT_TRUE(opener.Open(expected.data(), out.data()).ok()) << size;
      EXPECT_TRUE(out == text) << size;
      ++record;
    }
  }
}

// A peer that goes away during the handshake ends it with an error on
// either end, never with SIGPIPE, which would kill the process (chaos.py
// saw a worker killed so when a server died; a client that closes at once
// could do it to a server). Unix sockets raise it on the first write to
// a closed peer.
TEST(StreamTls, APeerThatGoesAwayMidHandshakeIsAnErrorNotSigpipe) {
  const std::shared_ptr<const StreamTls> tls = TestStreamTls();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  // The client writes its hello to a closed peer.
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  close(fds[1]);
  EXPECT_FALSE(tls->Client(fds[0], "127.0.0.1", deadline).ok());
  close(fds[0]);
  // The server answers a client's hello after the client closed: the
  // hello of a real client, which then goes.
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  std::thread client([&] { (void)tls->Client(fds[0], "127.0.0.1", deadline); });
  std::string hello(4096, '\0');
  const ssize_t n = read(fds[1], hello.data(), hello.size());
  ASSERT_GT(n, 0);
  hello.resize(n);
  shutdown(fds[1], SHUT_RDWR);
  client.join();
  close(fds[0]);
  close(fds[1]);
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  ASSERT_EQ(write(fds[0], hello.data(), hello.size()), static_cast<ssize_t>(hello.size()));
  close(fds[0]);
  EXPECT_FALSE(tls->Server(fds[1], deadline).ok());
  close(fds[1]);
}

TEST(StreamListen, AnyAddressTakesIPv4AndIPv6) {
  grpc::ServerBuilder builder;
  int port = 0;
  Listen(&builder, "127.0.0.1:0", {}, &port);
  AsyncServer server(&builder);
  server.Route("/t/Echo", Runs::kPolling,
               [](ServerContext*, const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) {
                 *resp = *req;
                 auto* r = new UnaryReactor;
                 r->Finish(grpc::Status::OK);
                 return r;
               });
  server.Start(builder.BuildAndStart());
  StreamOptions o;
  o.methods = {"/t/Echo"};
  absl::StatusOr<int> stream_port = server.ServeStreams("0.0.0.0", 0, o);
  ASSERT_TRUE(stream_port.ok()) << stream_port.status();
  // IPv6 where the machine has a loopback address for it (::1 can be bound).
  const int probe = socket(AF_INET6, SOCK_STREAM, 0);
  sockaddr_in6 lo{};
  lo.sin6_family = AF_INET6;
  lo.sin6_addr = in6addr_loopback;
  const bool ipv6 = probe >= 0 && bind(probe, reinterpret_cast<sockaddr*>(&lo), sizeof(lo)) == 0;
  if (probe >= 0) close(probe);
  for (const std::string host : {"127.0.0.1", "[::1]"}) {
    if (host == "[::1]" && !ipv6) GTEST_SKIP() << "no IPv6 loopback address on this machine";
    grpc::ByteBuffer resp;
    absl::Notification done;
    grpc::Status status;
    StartStreamCall({host + ":" + std::to_string(*stream_port), 0, ""}, "/t/Echo", Bytes(host),
                    &resp, absl::Now() + absl::Seconds(10), [&](grpc::Status s) {
                      status = s;
                      done.Notify();
                    });
    ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
    ASSERT_TRUE(status.ok()) << host << ": " << status.error_message();
    EXPECT_EQ(String(resp), host);
  }
}

}  // namespace
}  // namespace rpc
}  // namespace mx
