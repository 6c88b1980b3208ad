#include "rpc/rpc.h"

#include <grpc/grpc.h>
#include <grpcpp/generic/generic_stub.h>
#include <malloc.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "rpc/call_metrics.h"
#include "rpc/stream.h"

namespace mx {
namespace rpc {
namespace {

// HTTP/2 settings of every mx connection, client and server side (each
// side announces them to its peer). Measured with dist_bench, 16 MiB values
// sent as 4 MiB slices (alternating runs):
// - A fixed window of 16 MiB per stream, without BDP probing. gRPC starts
//   each stream at 64 KiB and grows the window by probing, so a 4 MiB call
//   spent much of its life waiting for window updates. A receiver holds
//   no more than before: it reads every call's message whole anyway.
// - DATA frames of up to 1 MiB instead of 16 KiB: fewer frames to write
//   and parse. A small call behind a big one waits for at most one frame.
// Together, pushpull one at a time with 1 server and 1 worker went from
// 0.71-0.75 of loopback TCP to 0.89-1.07; small round trips are unchanged.
template <typename SetInt>
void SetTransportArguments(const SetInt& set) {
  set(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  set(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  set(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 1 << 20);
}

std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const Security& security) {
  if (!security.tls()) return grpc::InsecureServerCredentials();
  // Mutual: a client without a certificate signed by the job's CA is
  // refused at the handshake.
  grpc::SslServerCredentialsOptions o(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_root_certs = security.tls_ca;
  o.pem_key_cert_pairs.push_back({security.tls_key, security.tls_cert});
  return grpc::SslServerCredentials(o);
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const Security& security) {
  if (!security.tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = security.tls_ca;
  o.pem_private_key = security.tls_key;
  o.pem_cert_chain = security.tls_cert;
  return grpc::SslCredentials(o);
}

// The allocator's settings of every process that links this module, made
// before main. (One malloc arena per core, against the slow growth of
// servers' resident memory, was tried and dropped: mx_train's dist_sync
// MLP ran 2-18% slower with it, 0.94 of the default on average.)
const bool kMallocTuned = [] {
  // gRPC reads into buffers of up to 4 MiB and frees them once a message
  // is parsed. By default glibc hands such memory back to the kernel (an
  // mmap above its moving threshold, or a trimmed heap top), so the next
  // read page-faults and zero-fills it again: in dist_bench's 16 MiB
  // transfers that was 40% more page faults and about 8% more CPU per
  // byte. Allocations up to 32 MiB now come from the heap, and up to
  // 64 MiB of free heap top is kept.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  return true;
}();

const int64_t kOpenFiles = RaiseOpenFileLimit();

}  // namespace

int64_t RaiseOpenFileLimit() {
  rlimit limit;
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return -1;
  const rlim_t wanted = std::min<rlim_t>(limit.rlim_max, rlim_t{1} << 20);
  if (limit.rlim_cur < wanted) {
    rlimit raised = limit;
    raised.rlim_cur = wanted;
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
  }
  return static_cast<int64_t>(limit.rlim_cur);
}

// gRPC notices a connection attempt's end (a refusal, or the peer taking
// it) only while some thread polls the channel, and where none does (a
// worker, which serves nothing, between its attempts to register) its
// backup poller, every 5 s by default. A node that dialled the coordinator
// a moment before it listened registered 5-10 s late (measured: with the
// coordinator started 0.05-1.2 s after a server and a worker, the job
// formed after 5.3-10.2 s; with 100 ms, 0.4-2.0 s). Set before main, so
// before gRPC starts and reads it; a value in the environment wins.
const bool kBackupPollSet = [] {
  setenv("GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS", "100", /*overwrite=*/0);
  return true;
}();

void KeepGrpcAlive() {
  static const bool initialized = [] {
    grpc_init();  // never shut down (see rpc.h)
    return true;
  }();
  (void)initialized;
}

void Listen(grpc::ServerBuilder* builder, const std::string& bind_address,
            const Security& security, int* port) {
  KeepGrpcAlive();
  builder->AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  SetTransportArguments(
      [&](const char* name, int value) { builder->AddChannelArgument(name, value); });
  // Clients ping every kKeepalive while a call is open (SharedChannel),
  // also while a pull waits without data: allowed, never a strike.
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                              static_cast<int>(absl::ToInt64Milliseconds(kKeepalive) / 2));
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  builder->AddListeningPort(bind_address, ServerCredentials(security), port);
  builder->experimental().SetInterceptorCreators(ServerCallMetrics());
}

std::shared_ptr<grpc::Channel> SharedChannel(const std::string& address, const Security& security,
                                             int connection) {
  KeepGrpcAlive();
  // Keyed by what makes channels differ: a process normally has one
  // security, tests and benchmarks several.
  using Key = std::tuple<std::string, int, std::string, std::string>;
  static std::mutex* mu = new std::mutex;
  static auto* channels = new std::map<Key, std::shared_ptr<grpc::Channel>>;
  std::lock_guard<std::mutex> lock(*mu);
  std::shared_ptr<grpc::Channel>& channel =
      (*channels)[{address, connection, security.tls_cert, security.tls_server_name}];
  if (channel == nullptr) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(kMaxMessageBytes);
    args.SetMaxSendMessageSize(kMaxMessageBytes);
    // Channels whose arguments differ do not share a TCP connection.
    args.SetInt("mx.connection", connection);
    if (security.tls() && !security.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(security.tls_server_name);
    }
    SetTransportArguments([&](const char* name, int value) { args.SetInt(name, value); });
    // Reconnect within 0.1-1 s rather than gRPC's 1-120 s: nodes of a job
    // start together and dial peers that may be a moment from listening;
    // with the default, one that dialled 50 ms early waited a second, and
    // under load several (CI saw a 4 s registration).
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    // A connection whose peer stops answering (a partition, a hung host)
    // fails its open calls UNAVAILABLE within 2 x kKeepalive, instead of at
    // their deadline (pings are answered by the transport, also while the
    // server waits for other workers). (Not GRPC_ARG_MIN_RECONNECT_BACKOFF_MS
    // for the connection attempts that follow: in this gRPC it is also the
    // least time between attempts, and a node that dialled a peer a moment
    // before it listened waited that long; seen in launch_test.)
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(absl::ToInt64Milliseconds(kKeepalive)));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                static_cast<int>(absl::ToInt64Milliseconds(kKeepalive)));
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    // A name whose address changed (a coordinator pod replaced in
    // Kubernetes comes back on another IP) is looked up again within a
    // second of a failed connection, not gRPC's default 30: a restarted
    // coordinator gives up nodes that have not rejoined within its
    // heartbeat timeout.
    args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 1000);
    channel = grpc::experimental::CreateCustomChannelWithInterceptors(
        address, ChannelCredentials(security), args, ClientCallMetrics());
  }
  return channel;
}

void Reconnect(const std::vector<std::shared_ptr<grpc::Channel>>& channels, absl::Time deadline) {
  std::vector<grpc::Channel*> failed;
  for (const auto& channel : channels) {
    if (channel->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_TRANSIENT_FAILURE) continue;
    grpc::experimental::ChannelResetConnectionBackoff(channel.get());
    failed.push_back(channel.get());
  }
  for (grpc::Channel* channel : failed) channel->WaitForConnected(absl::ToChronoTime(deadline));
}

namespace {

// What a listener at host:port says first, read through a plain TCP
// connection: a gRPC server without TLS opens with an HTTP/2 SETTINGS frame
// at once; a TLS server waits for the client's hello, and answers bytes
// that are no TLS record with an alert (a record of type 21) or by closing.
enum class Greeting { kUnknown, kHttp2, kTls, kNothing };

Greeting Greet(const std::string& address) {
  const absl::StatusOr<int> connected = ConnectTcp(address, absl::Seconds(1));
  if (!connected.ok()) return Greeting::kUnknown;
  const int fd = *connected;
  Greeting greeting = Greeting::kUnknown;
  // Up to 0.5 s for what the server says unasked.
  auto read_some = [fd](unsigned char* buf, size_t n, int ms) -> ssize_t {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, ms) <= 0) return -1;  // nothing said
    return recv(fd, buf, n, 0);
  };
  unsigned char buf[16];
  ssize_t got = read_some(buf, sizeof(buf), 500);
  if (got >= 4 && buf[3] == 0x04) {
    greeting = Greeting::kHttp2;  // a SETTINGS frame
  } else if (got < 0) {
    // Silent: speak HTTP/2 and see whether TLS objects.
    static const char kPreface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    (void)send(fd, kPreface, sizeof(kPreface) - 1, MSG_NOSIGNAL);
    got = read_some(buf, sizeof(buf), 500);
    greeting = got == 0 || (got > 0 && buf[0] == 21) ? Greeting::kTls : Greeting::kNothing;
  }
  close(fd);
  return greeting;
}

// Whether `address`, which closed an HTTP/2 connection without a word (as
// a TLS server does, and as a server that dies meanwhile does), does so
// again 100 ms later: a dead one then refuses the connection, and one
// restarted meanwhile speaks HTTP/2.
bool StillTls(const std::string& address) {
  absl::SleepFor(absl::Milliseconds(100));
  return Greet(address) == Greeting::kTls;
}

}  // namespace

absl::Status ConnectionProblem(const std::string& address, const Security& security) {
  const Greeting g = Greet(address);
  if (security.tls() && g == Greeting::kHttp2) {
    return absl::FailedPreconditionError(absl::StrCat(
        address, " speaks plaintext, and this node is configured for TLS (MX_TLS_CERT): every "
                 "node of a job must use TLS, or none"));
  }
  if (!security.tls() && g == Greeting::kTls && StillTls(address)) {
    return absl::FailedPreconditionError(absl::StrCat(
        address, " speaks TLS, and this node has no certificate (set MX_TLS_CERT, MX_TLS_KEY and "
                 "MX_TLS_CA, as for the other nodes of the job)"));
  }
  return absl::OkStatus();
}

bool HealthCheck(const std::string& address, const Security& security, absl::Duration timeout) {
  grpc::GenericStub stub(SharedChannel(address, security));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
  grpc::Slice empty;  // HealthCheckRequest{}: every service
  grpc::ByteBuffer req(&empty, 1), resp;
  absl::Notification done;
  grpc::Status status;
  StartUnaryCall(&stub, &ctx, "/grpc.health.v1.Health/Check", req, &resp, [&](grpc::Status s) {
    status = std::move(s);
    done.Notify();
  });
  done.WaitForNotification();
  return status.ok();
}

absl::Time GiveUpBefore(std::chrono::system_clock::time_point deadline) {
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  const absl::Time at = absl::FromChrono(deadline);
  return at - std::min(absl::Milliseconds(500), (at - absl::Now()) / 10);
}

}  // namespace rpc
}  // namespace mx
