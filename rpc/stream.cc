#include "rpc/stream.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <iostream>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "ndarray/base.h"
#include "rpc/call_metrics.h"
#include "rpc/rpc.h"
#include "rpc/security.h"
#include "rpc/server_call.h"
#include "rpc/stream_tls.h"

namespace mx {
namespace rpc {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the stream format is little-endian");

namespace {

constexpr char kMagic[4] = {'M', 'X', 'S', '1'};
constexpr uint32_t kMaxTokenBytes = 4096;
constexpr uint32_t kMaxMethodBytes = 256;
constexpr uint32_t kMaxStatusMessageBytes = 1 << 16;
// What a client accepts in an answer (the servers' own limit is theirs).
constexpr uint64_t kMaxAnswerBytes = uint64_t{1} << 32;

struct RequestHeader {
  uint32_t method_bytes;
  uint32_t reserved;
  uint64_t id;
  int64_t timeout_us;
  uint64_t body_bytes;
};
struct AnswerHeader {
  uint64_t id;
  int32_t code;
  uint32_t message_bytes;
  uint64_t body_bytes;
};

// ---- Socket helpers. Sockets block: each direction has a thread, and a
// connection that must end is shut down (shutdown(2)), which wakes both.

std::string Errno(const char* what) { return absl::StrCat(what, ": ", std::strerror(errno)); }

// The reading end of a connection, buffered: a read takes up to kAhead
// bytes of what is there, so that a small message (a header, its method,
// a short body, an acknowledgement) costs one read(2), not one per part;
// what a body has beyond kAhead is read straight into place. With
// `on_quiet` (set through Attach), reads time out after 250 ms without
// data and call it with the time since the last byte came (an error from
// it ends the read): the client's keepalive.
// With TLS (Secure), a read takes up to kSealedAhead bytes of records, and
// a record that a message wants whole is opened straight into place; of
// one it wants in part, the plaintext waits in `ahead`.
struct Reader {
  static constexpr size_t kAhead = 8 << 10;
  static constexpr size_t kSealedAhead = 2 * kMaxSealedRecordBytes;
  int fd = -1;
  std::function<absl::Status(absl::Duration quiet)> on_quiet;
  absl::Time last_data = absl::Now();
  std::unique_ptr<char[]> ahead{new char[kAhead]};
  size_t begin = 0, end = 0;  // the bytes read ahead, not yet taken: ahead[begin, end)
  // TLS: the records' opener, and the records read, not yet opened:
  // sealed[sealed_begin, sealed_end).
  std::unique_ptr<Opener> opener;
  std::unique_ptr<char[]> sealed;
  size_t sealed_begin = 0, sealed_end = 0;

  // Reads records opened by `in` from now on.
  void Secure(std::unique_ptr<Opener> in) {
    opener = std::move(in);
    ahead.reset(new char[kMaxRecordBytes]);
    sealed.reset(new char[kSealedAhead]);
  }

  // Reads from fd, calling on_quiet after each 250 ms without data
  // (SO_RCVTIMEO: a poll(2) before each read cost a system call more).
  absl::Status Attach(int socket, std::function<absl::Status(absl::Duration quiet)> quiet) {
    fd = socket;
    on_quiet = std::move(quiet);
    if (on_quiet == nullptr) return absl::OkStatus();
    const timeval timeout{0, 250 * 1000};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)) != 0) {
      return absl::UnavailableError(Errno("setsockopt(SO_RCVTIMEO)"));
    }
    return absl::OkStatus();
  }
};

// Reads what the socket has, up to n bytes: how many (0 at the end of
// the file), calling on_quiet while none come.
absl::StatusOr<size_t> ReadSome(Reader& in, char* data, size_t n) {
  for (;;) {
    const ssize_t r = read(in.fd, data, n);
    if (r >= 0) {
      if (r > 0 && in.on_quiet != nullptr) in.last_data = absl::Now();
      return static_cast<size_t>(r);
    }
    if ((errno == EAGAIN || errno == EWOULDBLOCK) && in.on_quiet != nullptr) {
      absl::Status s = in.on_quiet(absl::Now() - in.last_data);
      if (!s.ok()) return s;
    } else if (errno != EINTR) {
      return absl::UnavailableError(Errno("recvmsg"));
    }
  }
}

absl::Status EndOfFile(bool mid_message) {
  return absl::UnavailableError(mid_message ? "the peer closed the connection mid-message" : "");
}

// Reads until the next record is whole at in.sealed + in.sealed_begin;
// its plaintext length. `mid_message`: whether an end of file now cuts a
// message.
absl::StatusOr<size_t> NextRecord(Reader& in, bool mid_message) {
  for (;;) {
    const size_t have = in.sealed_end - in.sealed_begin;
    size_t need = kRecordHeaderBytes;
    if (have >= kRecordHeaderBytes) {
      absl::StatusOr<size_t> length = Opener::Length(in.sealed.get() + in.sealed_begin);
      if (!length.ok()) return length.status();
      need += *length + kRecordTagBytes;
      if (have >= need) return *length;
    }
    if (in.sealed_begin + need > Reader::kSealedAhead) {  // room for the record
      std::memmove(in.sealed.get(), in.sealed.get() + in.sealed_begin, have);
      in.sealed_begin = 0;
      in.sealed_end = have;
    }
    absl::StatusOr<size_t> r =
        ReadSome(in, in.sealed.get() + in.sealed_end, Reader::kSealedAhead - in.sealed_end);
    if (!r.ok()) return r.status();
    if (*r == 0) return EndOfFile(mid_message || have > 0);
    in.sealed_end += *r;
  }
}

// ReadFully's, with TLS: the records' plaintext.
absl::Status ReadSealed(Reader& in, char* p, size_t n) {
  size_t got = std::min(n, in.end - in.begin);
  if (got > 0) std::memcpy(p, in.ahead.get() + in.begin, got);
  in.begin += got;
  while (got < n) {
    absl::StatusOr<size_t> length = NextRecord(in, got > 0);
    if (!length.ok()) return length.status();
    const bool straight = n - got >= *length;
    absl::Status s =
        in.opener->Open(in.sealed.get() + in.sealed_begin, straight ? p + got : in.ahead.get());
    if (!s.ok()) return s;
    in.sealed_begin += kRecordHeaderBytes + *length + kRecordTagBytes;
    const size_t take = std::min(*length, n - got);
    if (!straight) {
      std::memcpy(p + got, in.ahead.get(), take);
      in.begin = take;
      in.end = *length;
    }
    got += take;
  }
  return absl::OkStatus();
}

// Reads exactly n bytes; an error names what failed ("" at a clean end of
// file before the first byte).
absl::Status ReadFully(Reader& in, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  if (in.opener != nullptr) return ReadSealed(in, p, n);
  size_t got = std::min(n, in.end - in.begin);
  if (got > 0) std::memcpy(p, in.ahead.get() + in.begin, got);
  in.begin += got;
  while (got < n) {
    const bool straight = n - got >= Reader::kAhead;
    absl::StatusOr<size_t> r =
        straight ? ReadSome(in, p + got, n - got) : ReadSome(in, in.ahead.get(), Reader::kAhead);
    if (!r.ok()) return r.status();
    if (*r == 0) return EndOfFile(got > 0);
    if (straight) {
      got += *r;
      continue;
    }
    const size_t take = std::min(*r, n - got);
    std::memcpy(p + got, in.ahead.get(), take);
    got += take;
    in.begin = take;
    in.end = *r;
  }
  return absl::OkStatus();
}

// Reads and drops n bytes.
absl::Status Skip(Reader& in, uint64_t n) {
  char buffer[1 << 16];
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, sizeof(buffer)));
    absl::Status s = ReadFully(in, buffer, chunk);
    if (!s.ok()) return s;
    n -= chunk;
  }
  return absl::OkStatus();
}

// Writes `iov` (advanced past what was written, *written counting it),
// without SIGPIPE: all of it, or with `nonblocking` up to where the socket
// is full.
absl::Status SendSome(int fd, std::vector<iovec>* iov, bool nonblocking, size_t* written) {
  size_t at = 0;
  while (at < iov->size()) {
    msghdr msg{};
    msg.msg_iov = iov->data() + at;
    msg.msg_iovlen = std::min<size_t>(iov->size() - at, 512);
    const ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL | (nonblocking ? MSG_DONTWAIT : 0));
    if (w < 0) {
      if (errno == EINTR) continue;
      if (nonblocking && (errno == EAGAIN || errno == EWOULDBLOCK)) return absl::OkStatus();
      return absl::UnavailableError(Errno("sendmsg"));
    }
    *written += static_cast<size_t>(w);
    size_t left = static_cast<size_t>(w);
    while (at < iov->size() && left >= (*iov)[at].iov_len) left -= (*iov)[at++].iov_len;
    if (left > 0) {
      (*iov)[at].iov_base = static_cast<char*>((*iov)[at].iov_base) + left;
      (*iov)[at].iov_len -= left;
    }
  }
  return absl::OkStatus();
}

// Memory for large bodies, kept for reuse. Why: a fresh buffer of 1 MiB
// is new pages to the kernel more often than not (glibc gives a thread's
// arena back and grows it again), and page faults cost much on these
// virtual machines: reading a 1 MiB answer into fresh memory took 3.8 ms
// (strace), about 0.3 GB/s, against well under 1 ms into memory used
// before.
class BufferPool {
 public:
  static BufferPool& Get() {
    static BufferPool* pool = new BufferPool;
    return *pool;
  }
  // A slice of n bytes (n >= kMinBytes) whose memory comes back here when
  // its last reference goes.
  grpc::Slice Take(size_t n) {
    const size_t size = (n + kGrain - 1) / kGrain * kGrain;
    Buffer* b = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        b = it->second.back();
        it->second.pop_back();
        kept_ -= size;
      }
    }
    if (b == nullptr) b = new Buffer{std::unique_ptr<char[]>(new char[size]), size};
    return grpc::Slice(b->data.get(), n, &BufferPool::Return, b);
  }

  static constexpr size_t kMinBytes = 64 << 10;

 private:
  static constexpr size_t kGrain = 64 << 10;
  // At most this much memory is kept unused.
  static constexpr size_t kMaxKeptBytes = size_t{256} << 20;
  struct Buffer {
    std::unique_ptr<char[]> data;
    size_t size;
  };
  static void Return(void* p) {
    auto* b = static_cast<Buffer*>(p);
    BufferPool& pool = Get();
    {
      std::lock_guard<std::mutex> lock(pool.mu_);
      if (pool.kept_ + b->size <= kMaxKeptBytes) {
        pool.free_[b->size].push_back(b);
        pool.kept_ += b->size;
        return;
      }
    }
    delete b;
  }

  std::mutex mu_;
  std::map<size_t, std::vector<Buffer*>> free_;  // by size
  size_t kept_ = 0;
};

// n bytes read into a new buffer of one slice.
absl::Status ReadBuffer(Reader& in, uint64_t n, grpc::ByteBuffer* out) {
  grpc::Slice slice = n >= BufferPool::kMinBytes ? BufferPool::Get().Take(static_cast<size_t>(n))
                                                 : grpc::Slice(static_cast<size_t>(n));
  if (n > 0) {
    absl::Status s = ReadFully(in, const_cast<uint8_t*>(slice.begin()), static_cast<size_t>(n));
    if (!s.ok()) return s;
  }
  *out = grpc::ByteBuffer(&slice, 1);
  return absl::OkStatus();
}

// A body of n bytes (n >= place.bytes) read as ReadBuffer does, except its
// last place.bytes, which go to place.data: *out is both, in order, the
// second a slice over place.data that does not own it.
absl::Status ReadPlaced(Reader& in, uint64_t n, const AnswerPlacement& place,
                        grpc::ByteBuffer* out) {
  grpc::ByteBuffer head;
  absl::Status s = ReadBuffer(in, n - place.bytes, &head);
  if (s.ok()) s = ReadFully(in, place.data, place.bytes);
  if (!s.ok()) return s;
  std::vector<grpc::Slice> slices;
  if (!head.Dump(&slices).ok()) return absl::InternalError("an answer's buffer");
  slices.emplace_back(place.data, place.bytes, grpc::Slice::STATIC_SLICE);
  *out = grpc::ByteBuffer(slices.data(), slices.size());
  return absl::OkStatus();
}

// One connection's outgoing frames, in order. The thread that sends a
// small frame while nothing is queued or being written writes it at once,
// without blocking (what the socket does not take then is left to the
// writer thread); other frames go through the writer thread (Run). Why:
// handing every answer to a writer thread cost a thread wake-up per call:
// a server's CPU per small call went from 78 to 96 us (bench/scale_bench.py,
// 16 workers and 4 servers) before this.
class Outbox {
 public:
  struct Frame {
    std::string head;               // the header, and the method or message
    std::vector<grpc::Slice> body;  // the message bytes, unchanged
    std::function<void()> done;     // once written or dropped; may be empty
    size_t bytes() const {
      size_t n = head.size();
      for (const grpc::Slice& s : body) n += s.size();
      return n;
    }
  };

  // `ready`: whether the socket is connected (else Ready says when).
  Outbox(int fd, bool ready) : fd_(fd), ready_(ready) {}

  // The socket is connected; with `sealer`, frames go in its records.
  void Ready(int fd, std::unique_ptr<Sealer> sealer = nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    fd_ = fd;
    if (sealer != nullptr) {
      sealer_ = std::move(sealer);
      sealed_.reset(new char[kMaxSealedRecordBytes]);
    }
    ready_ = true;
    wake_.notify_one();
  }

  // Writes or queues `frame`; a closed outbox drops it.
  void Send(Frame frame) {
    std::unique_lock<std::mutex> lock(mu_);
    if (closed_ || !error_.ok()) {
      lock.unlock();
      if (frame.done) frame.done();
      return;
    }
    if (!ready_ || writing_ || !queue_.empty() || frame.bytes() > kInlineBytes) {
      queue_.push_back(std::move(frame));
      wake_.notify_one();
      return;
    }
    writing_ = true;
    lock.unlock();
    size_t offset = 0;
    absl::Status s = WriteSome(frame, &offset, /*nonblocking=*/true);
    lock.lock();
    writing_ = false;
    // The rest, before anything else; unless the outbox closed meanwhile
    // (Close dropped the queue, and Run has ended): dropped too.
    if (s.ok() && !Written(frame, offset) && !closed_ && error_.ok()) {
      queue_.push_front(std::move(frame));
      offset_ = offset;
      wake_.notify_one();
      return;
    }
    if (!s.ok()) error_ = s;
    if (!queue_.empty() || !s.ok()) wake_.notify_one();
    lock.unlock();
    if (frame.done) frame.done();
  }

  // The writer thread: writes queued frames until Close (OK) or a write
  // fails (its error).
  absl::Status Run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] {
        return closed_ || !error_.ok() || (ready_ && !writing_ && !queue_.empty());
      });
      if (!error_.ok()) return error_;
      if (closed_) return absl::OkStatus();
      Frame frame = std::move(queue_.front());
      queue_.pop_front();
      size_t offset = offset_;
      offset_ = 0;
      writing_ = true;
      lock.unlock();
      absl::Status s = WriteSome(frame, &offset, /*nonblocking=*/false);
      if (frame.done) frame.done();
      lock.lock();
      writing_ = false;
      if (!s.ok()) error_ = s;
    }
  }

  // Drops what is queued (their done runs) and ends Run.
  void Close() {
    std::deque<Frame> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      dropped.swap(queue_);
    }
    wake_.notify_all();
    for (Frame& f : dropped) {
      if (f.done) f.done();
    }
  }

 private:
  // Frames up to this are written by the thread that sends them when
  // nothing is queued (the rest of one the socket does not take goes to
  // the writer thread): as with handlers (rpc/async.h), work under
  // kLargeMessageBytes stays on the thread that has it, since a hand-off
  // costs more than copying such a frame into the socket.
  static constexpr size_t kInlineBytes = kLargeMessageBytes;

  // Up to `limit` bytes of `frame` from `offset` on.
  static std::vector<iovec> Pieces(const Frame& frame, size_t offset, size_t limit) {
    std::vector<iovec> iov;
    auto add = [&](const void* data, size_t n) {
      if (offset >= n) {
        offset -= n;
        return;
      }
      const size_t take = std::min(n - offset, limit);
      if (take == 0) return;
      iov.push_back({const_cast<char*>(static_cast<const char*>(data)) + offset, take});
      offset = 0;
      limit -= take;
    };
    add(frame.head.data(), frame.head.size());
    for (const grpc::Slice& s : frame.body) add(s.begin(), s.size());
    return iov;
  }

  // Whether `frame`, taken up to `offset`, is all written (a record it
  // was sealed into included).
  bool Written(const Frame& frame, size_t offset) const {
    return offset == frame.bytes() && sealed_at_ == sealed_end_;
  }

  // Writes `frame` from *offset on (advanced); nonblocking: up to where
  // the socket is full. With TLS, *offset counts the bytes sealed, and
  // the rest of their record waits in sealed_.
  absl::Status WriteSome(const Frame& frame, size_t* offset, bool nonblocking) {
    if (sealer_ == nullptr) {
      std::vector<iovec> iov = Pieces(frame, *offset, frame.bytes());
      return SendSome(fd_, &iov, nonblocking, offset);
    }
    for (;;) {
      if (sealed_at_ < sealed_end_) {
        std::vector<iovec> iov = {{sealed_.get() + sealed_at_, sealed_end_ - sealed_at_}};
        absl::Status s = SendSome(fd_, &iov, nonblocking, &sealed_at_);
        if (!s.ok() || sealed_at_ < sealed_end_) return s;  // an error, or the socket is full
      }
      sealed_at_ = sealed_end_ = 0;
      if (*offset == frame.bytes()) return absl::OkStatus();
      const std::vector<iovec> pieces = Pieces(frame, *offset, kMaxRecordBytes);
      sealed_end_ = sealer_->Seal(pieces, sealed_.get());
      *offset += sealed_end_ - kRecordHeaderBytes - kRecordTagBytes;
    }
  }

  int fd_;
  std::mutex mu_;
  std::condition_variable wake_;
  bool ready_;
  std::deque<Frame> queue_;  // front: begun if offset_ > 0
  size_t offset_ = 0;
  bool writing_ = false;  // a thread writes a frame
  bool closed_ = false;
  absl::Status error_;
  // TLS: set by Ready. The record being written, sealed_[sealed_at_,
  // sealed_end_) unsent, is the writing thread's (writing_).
  std::unique_ptr<Sealer> sealer_;
  std::unique_ptr<char[]> sealed_;
  size_t sealed_at_ = 0, sealed_end_ = 0;
};

// A frame's header bytes, then `text` (the method or the status message).
template <class Header>
std::string Head(const Header& h, const std::string& text) {
  std::string head(reinterpret_cast<const char*>(&h), sizeof(h));
  head += text;
  return head;
}

// Both ends: no Nagle delay (requests are written whole); data
// unacknowledged for kKeepalive (5 s) ends the connection, as gRPC's
// keepalive sets it (so a partitioned peer breaks a connection that sends
// within 5 s; the client's pings cover one that only waits); and TCP
// keepalive probes after 5 s idle, 1 s apart, 5 unanswered ending it.
void Tune(int fd) {
  const int one = 1, idle = 5, interval = 1, count = 5;
  const auto user_timeout_ms = static_cast<unsigned int>(absl::ToInt64Milliseconds(kKeepalive));
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
}

// "host:port" split; the host may be a name or [v6].
absl::Status SplitAddress(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not host:port"));
  }
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<int> ConnectTcp(const std::string& address, absl::Duration timeout) {
  std::string host, port;
  absl::Status split = SplitAddress(address, &host, &port);
  if (!split.ok()) return split;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int e = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); e != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", address, ": ", gai_strerror(e)));
  }
  std::string why = "no address";
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      why = Errno("socket");
      continue;
    }
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      why = Errno("connect");
    } else {
      pollfd p{fd, POLLOUT, 0};
      int err = 0;
      socklen_t len = sizeof(err);
      const int ready = poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
      if (ready == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
        Tune(fd);
        break;
      }
      why = ready == 0 ? std::string("connect: timed out")
                       : absl::StrCat("connect: ", std::strerror(err));
    }
    close(fd);
    fd = -1;
  }
  freeaddrinfo(found);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot connect to ", address, ": ", why));
  return fd;
}

namespace {

// "ipv4:127.0.0.1:5000", as gRPC names peers.
std::string PeerOf(const sockaddr_storage& addr) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (addr.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
    return absl::StrCat("ipv4:", host, ":", ntohs(a->sin_port));
  }
  const auto* a = reinterpret_cast<const sockaddr_in6*>(&addr);
  inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
  return absl::StrCat("ipv6:[", host, "]:", ntohs(a->sin6_port));
}

}  // namespace

// ---- Server side.

class ServerConnection;

// A stream call's context: its peer and deadline; no metadata.
class StreamContext final : public ServerContext {
 public:
  StreamContext(std::string peer, std::chrono::system_clock::time_point deadline)
      : peer_(std::move(peer)), deadline_(deadline) {}
  std::string peer() const override { return peer_; }
  std::chrono::system_clock::time_point deadline() const override { return deadline_; }
  std::string Metadata(const char*) const override { return ""; }
  bool IsCancelled() const override { return cancelled_.load(); }
  void SetCancelled() { cancelled_.store(true); }

 private:
  const std::string peer_;
  const std::chrono::system_clock::time_point deadline_;
  std::atomic<bool> cancelled_{false};
};

// One call of a stream connection. References (internal::Call): the
// dispatch's (the handler's), and the answer's until the connection's
// writer has sent or dropped it.
class StreamServerCall final : public internal::Call {
 public:
  StreamServerCall(AsyncServer* server, std::shared_ptr<ServerConnection> connection, uint64_t id,
                   std::string method, StreamContext* ctx, grpc::ByteBuffer request)
      : Call(server),
        connection_(std::move(connection)),
        id_(id),
        method_(std::move(method)),
        ctx_(ctx),
        start_(std::chrono::steady_clock::now()) {
    request_ = std::move(request);
    refs_.store(1);
  }

  const std::string& method() const override { return method_; }
  uint64_t id() const { return id_; }
  const grpc::ByteBuffer& response() const { return response_; }

  // The connection broke: the caller is gone. `Hold` first (under the
  // connection's lock), then Cancel and Release outside it. A call whose
  // last reference went (it is being destroyed, and waits for the lock to
  // leave the connection's open calls) cannot be held: false.
  bool Hold() { return TryRef(); }
  void Cancel() {
    ctx_->SetCancelled();
    Cancelled();
  }
  void Release() { Unref(); }

 private:
  ~StreamServerCall() override;
  ServerContext* context() override { return ctx_.get(); }
  void Send(const grpc::Status& status) override;

  const std::shared_ptr<ServerConnection> connection_;
  const uint64_t id_;
  const std::string method_;
  const std::unique_ptr<StreamContext> ctx_;
  const std::chrono::steady_clock::time_point start_;
};

struct StreamListener::Impl {
  AsyncServer* server;
  StreamOptions options;
  int listener = -1;
  std::thread acceptor;
  std::mutex mu;
  std::list<std::shared_ptr<ServerConnection>> connections;  // guarded by mu
  bool stopped = false;                                      // guarded by mu
  // Its own lock: a connection that fails to start is joined under mu,
  // and its reader may be logging its end.
  std::mutex log_mu;
  std::set<std::string> logged;  // hosts; guarded by log_mu
  enum Refusal { kTooMany, kNoThread };
  std::set<Refusal> warned;  // guarded by mu

  void Accept();
  // Logs a refused connection, once per reason. Under mu.
  void Warn(Refusal why, const std::string& what);
  // Logs why a connection from `peer` ended, once per peer host (a flood
  // of bad connections is not a flood of lines).
  void LogEnd(const std::string& peer, const absl::Status& why) {
    const std::string host = peer.substr(0, peer.rfind(':'));
    {
      std::lock_guard<std::mutex> lock(log_mu);
      if (logged.size() >= 1000 || !logged.insert(host).second) return;
    }
    std::cerr << "mx stream server: a connection from " << peer << " ended: " << why.message()
              << " (later ones from this host are not logged)" << std::endl;
  }
};

// One accepted connection: a reader thread that reads the hello and then
// requests, which it dispatches, and a writer thread that sends answers in
// the order they finish.
class ServerConnection : public std::enable_shared_from_this<ServerConnection> {
 public:
  ServerConnection(StreamListener::Impl* listener, int fd, std::string peer)
      : listener_(listener),
        fd_(fd),
        peer_(std::move(peer)),
        out_(fd, /*ready=*/listener->options.tls == nullptr) {
    (void)in_.Attach(fd, nullptr);  // no keepalive: cannot fail
  }
  ~ServerConnection() { close(fd_); }

  // Starts the connection's threads; false, with the connection broken and
  // joined, when the system refuses one.
  bool Start() {
    greet_deadline_ = absl::Now() + listener_->options.hello_time;
    auto self = shared_from_this();
    try {
      reader_ = std::thread([self] { self->Read(); });
      writer_ = std::thread([self] { self->Write(); });
      return true;
    } catch (const std::system_error&) {
      Break();
      Join();
      return false;
    }
  }
  // Ends the connection: its open calls are cancelled; unsent answers are
  // dropped. Any thread.
  void Break() {
    std::vector<StreamServerCall*> open;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) return;
      broken_ = true;
      shutdown(fd_, SHUT_RDWR);
      for (const auto& [id, call] : open_) {
        if (call->Hold()) open.push_back(call);
      }
    }
    greeted_cv_.notify_all();
    out_.Close();
    for (StreamServerCall* call : open) {
      call->Cancel();
      call->Release();
    }
  }
  // Takes no more requests: the calls open are still answered.
  void StopReading() {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
    if (!broken_) shutdown(fd_, SHUT_RD);
  }
  // No call open, or the connection broke.
  bool Idle() const {
    std::lock_guard<std::mutex> lock(mu_);
    return broken_ || open_.empty();
  }
  void Join() {
    if (reader_.joinable()) reader_.join();
    if (writer_.joinable()) writer_.join();
  }
  bool finished() const { return finished_.load(); }

  // StreamServerCall's: sends its answer, then releases it (also if the
  // answer is dropped: the connection broke); forgets it once it ends.
  void Answer(StreamServerCall* call, const grpc::Status& status) {
    out_.Send(AnswerFrame(call->id(), status, status.ok() ? &call->response() : nullptr,
                          [call] { call->Release(); }));
  }
  void Ended(StreamServerCall* call) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = open_.find(call->id());
    if (it != open_.end() && it->second == call) open_.erase(it);
  }

 private:
  void Read() {
    absl::Status s = Greet();
    {
      std::lock_guard<std::mutex> lock(mu_);
      greeted_ = true;
    }
    greeted_cv_.notify_all();
    while (s.ok()) s = ReadRequest();
    bool draining;
    {
      std::lock_guard<std::mutex> lock(mu_);
      draining = draining_;
    }
    if (draining) return;  // the calls open are still answered; Stop ends it
    if (!s.message().empty()) listener_->LogEnd(peer_, s);
    Break();
    finished_.store(true);
  }

  // The handshake (TLS) and the hello, within StreamOptions::hello_time of
  // the connection's start: each read times out, and the writer breaks the
  // connection at the deadline (AwaitGreeting).
  absl::Status Greet() {
    const absl::Duration limit = listener_->options.hello_time;
    const absl::Time deadline = greet_deadline_;
    SetSocketTimeouts(fd_, limit);
    absl::Status s = Secure(deadline);
    if (s.ok()) {
      SetSocketTimeouts(fd_, deadline - absl::Now());  // the handshake's end cleared them
      s = Hello();
    }
    if (!s.ok() && absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("no ", listener_->options.tls != nullptr ? "TLS handshake and " : "",
                       "hello within ", absl::FormatDuration(limit), " (", s.message(), ")"));
    }
    if (s.ok()) SetSocketTimeouts(fd_, absl::InfiniteDuration());
    return s;
  }

  // With TLS, the handshake (by `deadline`), before anything else. A client
  // without TLS (its plaintext hello comes first) is told so in its own
  // format.
  absl::Status Secure(absl::Time deadline) {
    const std::shared_ptr<const StreamTls>& tls = listener_->options.tls;
    if (tls == nullptr) return absl::OkStatus();
    char first[sizeof(kMagic)];
    const ssize_t peeked = recv(fd_, first, sizeof(first), MSG_PEEK | MSG_WAITALL);
    if (peeked == sizeof(first) && std::memcmp(first, kMagic, sizeof(kMagic)) == 0) {
      const absl::Status refused = absl::UnauthenticatedError(
          "this server's stream port takes TLS connections only, and this client has no TLS "
          "configured");
      out_.Ready(fd_);
      out_.Send(AnswerFrame(0, ToGrpc(refused)));
      return absl::UnauthenticatedError("a client without TLS (refused, told why)");
    }
    absl::StatusOr<StreamTls::Session> session = tls->Server(fd_, deadline);
    if (!session.ok()) return session.status();
    in_.Secure(std::move(session->in));
    out_.Ready(fd_, std::move(session->out));
    return absl::OkStatus();
  }

  // The hello: the magic and the job token.
  absl::Status Hello() {
    char magic[4];
    uint32_t token_bytes;
    absl::Status s = ReadFully(in_, magic, sizeof(magic));
    if (s.ok() && std::memcmp(magic, kMagic, sizeof(magic)) != 0) {
      return absl::InvalidArgumentError(magic[0] == 0x16 && magic[1] == 0x03
                                            ? "a TLS client, on a stream port without TLS"
                                            : "not an mx stream (no MXS1 hello)");
    }
    if (s.ok()) s = ReadFully(in_, &token_bytes, sizeof(token_bytes));
    if (s.ok() && token_bytes > kMaxTokenBytes) {
      return absl::InvalidArgumentError(absl::StrCat("a hello's token of ", token_bytes, " bytes"));
    }
    std::string token(s.ok() ? token_bytes : 0, '\0');
    if (s.ok()) s = ReadFully(in_, token.data(), token.size());
    if (!s.ok()) return s;
    Guard* guard = listener_->options.guard;
    if (guard == nullptr) return absl::OkStatus();
    const StreamContext hello(peer_, std::chrono::system_clock::now());
    const absl::Status refused = guard->CheckToken(hello, "stream connection", token);
    if (refused.ok()) return refused;
    out_.Send(AnswerFrame(0, ToGrpc(refused)));
    // The guard logged it (once per peer host); the connection just ends.
    return absl::UnauthenticatedError("");
  }

  // One request: read whole, then dispatched (or refused).
  absl::Status ReadRequest() {
    RequestHeader h;
    absl::Status s = ReadFully(in_, &h, sizeof(h));
    if (!s.ok()) return s;
    if (h.method_bytes == 0 && h.body_bytes == 0) {
      if (h.id == 0) {  // a ping: pong
        out_.Send(AnswerFrame(0, grpc::Status::OK));
        return absl::OkStatus();
      }
      CancelCall(h.id);  // a cancel
      return absl::OkStatus();
    }
    if (h.method_bytes == 0 || h.method_bytes > kMaxMethodBytes || h.id == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a malformed request header (method of ", h.method_bytes, " bytes, call id ", h.id, ")"));
    }
    if (IsOpen(h.id)) {  // its cancel or its end could no longer reach the first
      return absl::InvalidArgumentError(
          absl::StrCat("a request with call id ", h.id, ", which is still open"));
    }
    std::string method(h.method_bytes, '\0');
    MX_RETURN_IF_ERROR(ReadFully(in_, method.data(), method.size()));
    // A timeout of a year or more is none: the client's "infinite"
    // (INT64_MAX us) overflowed, added to now, into the past.
    constexpr int64_t kNoDeadlineUs = int64_t{365} * 24 * 3600 * 1000 * 1000;
    const auto deadline = h.timeout_us >= kNoDeadlineUs
                              ? std::chrono::system_clock::time_point::max()
                              : std::chrono::system_clock::now() +
                                    std::chrono::microseconds(std::max<int64_t>(h.timeout_us, 0));
    const StreamOptions& o = listener_->options;
    if (h.body_bytes > o.max_message_bytes) {
      MX_RETURN_IF_ERROR(Skip(in_, h.body_bytes));
      return Refuse(h.id, method, deadline,
                    grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                 absl::StrCat("a request of ", h.body_bytes, " bytes, over the ",
                                              o.max_message_bytes, " this server takes")));
    }
    grpc::ByteBuffer body;
    MX_RETURN_IF_ERROR(ReadBuffer(in_, h.body_bytes, &body));
    if (o.methods.count(method) == 0) {
      return Refuse(h.id, method, deadline,
                    grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                                 absl::StrCat("no method ", method, " on stream connections")));
    }
    StreamServerCall* call = NewCall(h.id, method, deadline, std::move(body));
    listener_->server->Dispatch(call);
    return absl::OkStatus();
  }

  // The client stopped waiting for call `id` (cancelled, or its deadline
  // passed): its reactor's OnCancel, if it is still open.
  void CancelCall(uint64_t id) {
    StreamServerCall* call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = open_.find(id);
      if (it == open_.end() || !it->second->Hold()) return;
      call = it->second;
    }
    call->Cancel();
    call->Release();
  }

  bool IsOpen(uint64_t id) const {
    std::lock_guard<std::mutex> lock(mu_);
    return open_.count(id) > 0;
  }

  StreamServerCall* NewCall(uint64_t id, std::string method,
                            std::chrono::system_clock::time_point deadline, grpc::ByteBuffer body) {
    listener_->server->CallStarted();
    auto* call = new StreamServerCall(listener_->server, shared_from_this(), id, std::move(method),
                                      new StreamContext(peer_, deadline), std::move(body));
    std::lock_guard<std::mutex> lock(mu_);
    open_[id] = call;
    return call;
  }

  // Answers a request with an error, as a call (counted, in order with
  // the others' answers).
  absl::Status Refuse(uint64_t id, std::string method,
                      std::chrono::system_clock::time_point deadline, const grpc::Status& why) {
    NewCall(id, std::move(method), deadline, grpc::ByteBuffer())->Finish(why);
    return absl::OkStatus();
  }

  void Write() {
    if (!AwaitGreeting() || !out_.Run().ok()) Break();
  }

  // The writer's first task: whether the reader finished the greeting (well
  // or not) by its deadline. SO_RCVTIMEO bounds each read of it, not the
  // whole: a client sending a byte every 9 s held a connection, and its two
  // threads, for hours.
  bool AwaitGreeting() {
    std::unique_lock<std::mutex> lock(mu_);
    auto done = [&] { return greeted_ || broken_; };
    if (greet_deadline_ == absl::InfiniteFuture()) {
      greeted_cv_.wait(lock, done);
      return true;
    }
    return greeted_cv_.wait_until(lock, absl::ToChronoTime(greet_deadline_), done);
  }

  // An answer's frame: id 0 is a pong (OK) or the end of the connection.
  static Outbox::Frame AnswerFrame(uint64_t id, const grpc::Status& status,
                                   const grpc::ByteBuffer* body = nullptr,
                                   std::function<void()> done = nullptr) {
    const std::string message = status.error_message().substr(0, kMaxStatusMessageBytes);
    Outbox::Frame f;
    if (body != nullptr && body->Length() > 0) (void)body->Dump(&f.body);
    const AnswerHeader h{id, static_cast<int32_t>(status.error_code()),
                         static_cast<uint32_t>(message.size()),
                         body != nullptr ? body->Length() : 0};
    f.head = Head(h, message);
    f.done = std::move(done);
    return f;
  }

  StreamListener::Impl* const listener_;
  const int fd_;
  const std::string peer_;
  Reader in_;   // the reader thread's
  Outbox out_;  // answers and pongs
  std::thread reader_, writer_;
  std::atomic<bool> finished_{false};
  absl::Time greet_deadline_;  // set by Start, before the threads
  mutable std::mutex mu_;
  std::condition_variable greeted_cv_;          // greeted_ or broken_ turned true
  bool greeted_ = false;                        // guarded by mu_
  bool broken_ = false;                         // guarded by mu_
  bool draining_ = false;                       // guarded by mu_
  std::map<uint64_t, StreamServerCall*> open_;  // guarded by mu_
};

StreamServerCall::~StreamServerCall() { connection_->Ended(this); }

void StreamServerCall::Send(const grpc::Status& status) {
  CountServerCall(method_, static_cast<int>(status.error_code()), start_, request_.Length(),
                  status.ok() ? response_.Length() : 0);
  connection_->Answer(this, status);
}

void StreamListener::Impl::Accept() {
  for (;;) {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    const int fd = accept4(listener, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC);
    std::lock_guard<std::mutex> lock(mu);
    if (stopped) {
      if (fd >= 0) close(fd);
      return;
    }
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
        if (errno == EMFILE || errno == ENFILE)
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      std::cerr << "mx stream server: " << Errno("accept") << "; no more stream connections"
                << std::endl;
      return;
    }
    Tune(fd);
    // Reap the connections that ended.
    for (auto it = connections.begin(); it != connections.end();) {
      if ((*it)->finished()) {
        (*it)->Break();
        (*it)->Join();
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
    if (static_cast<int>(connections.size()) >= options.max_connections) {
      Warn(kTooMany, absl::StrCat(options.max_connections,
                                  " stream connections are open; closing further ones (from ",
                                  PeerOf(addr), " first)"));
      close(fd);
      continue;
    }
    auto connection = std::make_shared<ServerConnection>(this, fd, PeerOf(addr));
    if (!connection->Start()) {
      Warn(kNoThread, absl::StrCat("no thread for a stream connection from ", PeerOf(addr), " (",
                                   connections.size(), " open); closing it and any that follow"));
      continue;
    }
    connections.push_back(std::move(connection));
  }
}

void StreamListener::Impl::Warn(Refusal why, const std::string& what) {
  if (!warned.insert(why).second) return;
  std::cerr << "mx stream server: " << what << " (said once)" << std::endl;
}

StreamListener::StreamListener(AsyncServer* server, StreamOptions options)
    : impl_(std::make_shared<Impl>()) {
  impl_->server = server;
  impl_->options = std::move(options);
}

StreamListener::~StreamListener() { Stop(absl::Now()); }

absl::StatusOr<int> StreamListener::Listen(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  const char* node = host.empty() || host == "0.0.0.0" || host == "[::]" ? nullptr : host.c_str();
  std::string bare = host;
  if (bare.size() > 2 && bare.front() == '[' && bare.back() == ']')
    bare = bare.substr(1, bare.size() - 2);
  if (node != nullptr) node = bare.c_str();
  if (const int e = getaddrinfo(node, service.c_str(), &hints, &found); e != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream port: cannot resolve ", host, ": ", gai_strerror(e)));
  }
  // Any address: IPv6's, taking IPv4 too (as gRPC listens on 0.0.0.0 and
  // [::], so that pods that advertise an IPv6 address are reached), else
  // IPv4's alone.
  std::vector<addrinfo*> candidates;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) candidates.push_back(a);
  if (node == nullptr) {
    std::stable_partition(candidates.begin(), candidates.end(),
                          [](const addrinfo* a) { return a->ai_family == AF_INET6; });
  }
  std::string why = "no address";
  int fd = -1;
  for (size_t i = 0; i < candidates.size() && fd < 0; ++i) {
    const addrinfo* a = candidates[i];
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (node == nullptr && a->ai_family == AF_INET6) {
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    }
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 128) != 0) {
      why = Errno("bind");
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("stream port: cannot listen on ", host, ":", port, ": ", why));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int bound =
      ntohs(addr.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&addr)->sin_port
                                      : reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  impl_->listener = fd;
  Impl* impl = impl_.get();
  impl_->acceptor = std::thread([impl] { impl->Accept(); });
  return bound;
}

void StreamListener::Stop(absl::Time deadline) {
  std::list<std::shared_ptr<ServerConnection>> connections;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->stopped) return;
    impl_->stopped = true;
    connections.swap(impl_->connections);
  }
  if (impl_->listener >= 0) shutdown(impl_->listener, SHUT_RDWR);  // wakes accept
  if (impl_->acceptor.joinable()) impl_->acceptor.join();
  if (impl_->listener >= 0) close(impl_->listener);
  for (const auto& c : connections) c->StopReading();
  auto idle = [&] {
    return std::all_of(connections.begin(), connections.end(),
                       [](const auto& c) { return c->Idle(); });
  };
  while (!idle() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(2));
  for (const auto& c : connections) c->Break();
  for (const auto& c : connections) c->Join();
}

// ---- Client side.

namespace {

class ClientConnection;
class ClientCall;

// The deadlines of the process's stream calls, ended by one thread.
class Deadlines {
 public:
  using Entry = std::multimap<absl::Time, std::weak_ptr<ClientCall>>::iterator;
  static Deadlines& Get() {
    static Deadlines* d = new Deadlines;
    return *d;
  }
  // Wakes the thread only for a deadline before the time it sleeps until.
  // Why: calls often start when none is in flight (one step's pushes and
  // pulls, then the next's), and waking the thread for each cost a thread
  // switch per call.
  Entry Add(absl::Time at, std::weak_ptr<ClientCall> call) {
    std::lock_guard<std::mutex> lock(mu_);
    Entry e = calls_.emplace(at, std::move(call));
    if (at < sleeping_until_) wake_.notify_one();
    return e;
  }
  // An entry still there (Run removes only those of calls gone).
  void Remove(Entry e) {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.erase(e);
  }

 private:
  Deadlines() : thread_([this] { Run(); }) {}
  void Run();

  std::mutex mu_;
  std::condition_variable wake_;
  std::multimap<absl::Time, std::weak_ptr<ClientCall>> calls_;
  // When the thread wakes by itself (InfinitePast while it runs): the
  // earliest deadline when it went to sleep, kept while calls come and go,
  // so that a call added after the others ended does not wake it.
  absl::Time sleeping_until_ = absl::InfinitePast();
  std::thread thread_;
};

class ClientCall final : public StreamCall, public std::enable_shared_from_this<ClientCall> {
 public:
  ClientCall(std::string method, grpc::ByteBuffer request, absl::Time deadline,
             grpc::ByteBuffer* response, std::function<void(grpc::Status)> done,
             AnswerPlacement placement)
      : method(std::move(method)),
        request(std::move(request)),
        deadline(deadline),
        placement(placement),
        response_(response),
        done_(std::move(done)),
        start_(std::chrono::steady_clock::now()) {}

  void Cancel() override;
  // Ends the call with `status` (and `answer` as its response) unless it
  // has ended; false if it had. While its answer is read into
  // placement.data, an end without an answer waits for StopReceiving.
  bool End(const grpc::Status& status, grpc::ByteBuffer* answer = nullptr);

  // The connection's reader: whether it may read the answer into
  // placement.data (the call has not ended); if so it must StopReceiving.
  bool StartReceiving() {
    std::lock_guard<std::mutex> lock(mu_);
    receiving_ = !ended_;
    return receiving_;
  }
  // The read into placement.data is over. If the call ended meanwhile
  // (deadline, Cancel), it completes now as it ended, and this says true.
  bool StopReceiving() {
    grpc::Status ended_as;
    {
      std::lock_guard<std::mutex> lock(mu_);
      receiving_ = false;
      if (!ended_) return false;
      ended_as = deferred_;
    }
    Complete(ended_as, nullptr);
    return true;
  }
  bool ended() {
    std::lock_guard<std::mutex> lock(mu_);
    return ended_;
  }
  // Ends the call at its deadline (unless it has ended by then). After
  // the connection took it (Send), which sets id and connection.
  void Arm() {
    std::lock_guard<std::mutex> lock(mu_);
    if (ended_) return;
    entry_ = Deadlines::Get().Add(deadline, weak_from_this());
    armed_ = true;
  }

  const std::string method;
  const grpc::ByteBuffer request;
  const absl::Time deadline;
  const AnswerPlacement placement;
  uint64_t id = 0;                             // set by ClientConnection::Send
  std::weak_ptr<ClientConnection> connection;  // set by ClientConnection::Send

 private:
  // Runs `done` with `status` (`answer` the response, if given), once.
  void Complete(const grpc::Status& status, grpc::ByteBuffer* answer);

  grpc::ByteBuffer* const response_;
  std::function<void(grpc::Status)> done_;  // moved out by Complete
  const std::chrono::steady_clock::time_point start_;
  std::mutex mu_;
  bool ended_ = false;      // guarded by mu_
  bool armed_ = false;      // guarded by mu_
  bool receiving_ = false;  // guarded by mu_: the answer is being read into placement.data
  grpc::Status deferred_;   // guarded by mu_: how it ended while receiving_
  Deadlines::Entry entry_;
};

void Deadlines::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  absl::Time target = absl::InfiniteFuture();  // the last deadline it slept until
  for (;;) {
    const absl::Time now = absl::Now();
    if (calls_.empty() || now < calls_.begin()->first) {
      if (!calls_.empty()) target = calls_.begin()->first;
      if (target <= now) target = absl::InfiniteFuture();  // no call: until one comes
      sleeping_until_ = target;
      if (target == absl::InfiniteFuture()) {
        wake_.wait(lock);
      } else {
        wake_.wait_until(lock, absl::ToChronoTime(target));
      }
      sleeping_until_ = absl::InfinitePast();
      continue;
    }
    const auto first = calls_.begin();
    std::shared_ptr<ClientCall> call = first->second.lock();
    if (call == nullptr) {
      calls_.erase(first);
      continue;
    }
    lock.unlock();
    // Removes the entry (End), or another thread's End did.
    call->End(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded"));
    lock.lock();
  }
}

// The process's connection to one stream endpoint: a writer thread that
// connects, says hello, and sends queued calls in order; a reader thread
// that completes calls with their answers. A connection that breaks fails
// its calls and is replaced at the next call.
class ClientConnection : public std::enable_shared_from_this<ClientConnection> {
 public:
  explicit ClientConnection(StreamTarget target) : target_(std::move(target)) {}
  ~ClientConnection() {
    if (fd_ >= 0) close(fd_);
  }

  // The process's connection for `target`, made (and its threads started)
  // if there is none or it broke, when `make`; else null if none.
  static std::shared_ptr<ClientConnection> For(const StreamTarget& target, bool make = true) {
    using Key = std::tuple<std::string, int, std::string, const StreamTls*>;
    static std::mutex* mu = new std::mutex;
    static auto* connections = new std::map<Key, std::shared_ptr<ClientConnection>>;
    std::lock_guard<std::mutex> lock(*mu);
    const Key key{target.address, target.connection, target.token, target.tls.get()};
    if (!make) {
      auto it = connections->find(key);
      return it == connections->end() ? nullptr : it->second;
    }
    std::shared_ptr<ClientConnection>& c = (*connections)[key];
    if (c == nullptr || c->broken()) {
      c = std::make_shared<ClientConnection>(target);
      auto self = c;
      try {
        std::thread([self] { self->Write(); }).detach();
      } catch (const std::system_error& e) {  // its calls fail at once, the next call retries
        c->Break(c->NoThread(e));
      }
    }
    return c;
  }

  bool broken() const {
    std::lock_guard<std::mutex> lock(mu_);
    return broken_;
  }
  // Said hello and not broken.
  bool open() const {
    std::lock_guard<std::mutex> lock(mu_);
    return opened_ && !broken_;
  }

  // Sends `call` (written at once, or queued); fails it at once if the
  // connection broke.
  void Send(const std::shared_ptr<ClientCall>& call) {
    grpc::Status why;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!broken_) {
        call->id = next_id_++;
        call->connection = weak_from_this();
        pending_[call->id] = call;
      }
      why = broken_ ? why_ : grpc::Status::OK;
    }
    if (why.ok()) {
      out_.Send(RequestFrame(*call));
    } else {
      call->End(why);
    }
  }
  // A call that ended otherwise (its deadline, Cancel): the server is told
  // (its reactor's OnCancel), as gRPC does.
  void Forget(uint64_t id) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (pending_.erase(id) == 0 || broken_) return;
    }
    out_.Send(ControlFrame(id));
  }

 private:
  void Write() {
    std::unique_ptr<Sealer> sealer;
    absl::Status s = Open(&sealer);
    if (!s.ok())
      return Break(grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(s.message())));
    {
      std::lock_guard<std::mutex> lock(mu_);
      opened_ = true;
    }
    s = in_.Attach(fd_, [this](absl::Duration quiet) { return Quiet(quiet); });
    if (!s.ok())
      return Break(grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(s.message())));
    auto self = shared_from_this();
    try {
      std::thread([self] { self->Read(); }).detach();
    } catch (const std::system_error& e) {  // on this thread of its own: not std::terminate
      return Break(NoThread(e));
    }
    out_.Ready(fd_, std::move(sealer));
    s = out_.Run();
    if (!s.ok()) {
      Break(grpc::Status(
          grpc::StatusCode::UNAVAILABLE,
          absl::StrCat("stream connection to ", target_.address, " broke: ", s.message())));
    }
  }

  // Connects (within 10 s; the calls' deadlines end them sooner), shakes
  // hands with TLS (within kHandshakeTime more; *sealer gets what seals
  // the requests) and says hello.
  absl::Status Open(std::unique_ptr<Sealer>* sealer) {
    absl::StatusOr<int> fd = ConnectTcp(target_.address, absl::Seconds(10));
    if (!fd.ok()) return fd.status();
    {
      std::lock_guard<std::mutex> lock(mu_);
      fd_ = *fd;
      if (broken_) shutdown(fd_, SHUT_RDWR);
    }
    const uint32_t token_bytes = static_cast<uint32_t>(target_.token.size());
    std::vector<iovec> hello = {{const_cast<char*>(kMagic), sizeof(kMagic)},
                                {const_cast<uint32_t*>(&token_bytes), sizeof(token_bytes)},
                                {const_cast<char*>(target_.token.data()), target_.token.size()}};
    std::string record;
    if (target_.tls != nullptr) {
      std::string host, port;
      MX_RETURN_IF_ERROR(SplitAddress(target_.address, &host, &port));
      absl::StatusOr<StreamTls::Session> session =
          target_.tls->Client(*fd, host, absl::Now() + kHandshakeTime);
      if (!session.ok()) {
        return absl::Status(session.status().code(),
                            absl::StrCat(target_.address, ": ", session.status().message()));
      }
      in_.Secure(std::move(session->in));
      *sealer = std::move(session->out);
      record.resize(kRecordHeaderBytes + sizeof(kMagic) + sizeof(token_bytes) +
                    target_.token.size() + kRecordTagBytes);
      record.resize((*sealer)->Seal(hello, record.data()));
      hello = {{record.data(), record.size()}};
    }
    size_t written = 0;
    return SendSome(*fd, &hello, /*nonblocking=*/false, &written);
  }

  static Outbox::Frame RequestFrame(const ClientCall& call) {
    const absl::Duration left = call.deadline - absl::Now();
    const RequestHeader h{static_cast<uint32_t>(call.method.size()), 0, call.id,
                          left == absl::InfiniteDuration()
                              ? std::numeric_limits<int64_t>::max()
                              : std::max<int64_t>(0, absl::ToInt64Microseconds(left)),
                          call.request.Length()};
    Outbox::Frame f;
    f.head = Head(h, call.method);
    if (call.request.Length() > 0) (void)call.request.Dump(&f.body);
    return f;
  }

  // A request header without method or body: "stop waiting for `id`", or
  // with id 0 a ping.
  static Outbox::Frame ControlFrame(uint64_t id) {
    Outbox::Frame f;
    f.head = Head(RequestHeader{0, 0, id, 0, 0}, "");
    return f;
  }

  void Read() {
    absl::Status s;
    while (s.ok()) s = ReadAnswer();
    Break(grpc::Status(absl::IsUnauthenticated(s) ? grpc::StatusCode::UNAUTHENTICATED
                                                  : grpc::StatusCode::UNAVAILABLE,
                       absl::StrCat("stream connection to ", target_.address, " broke: ",
                                    s.message().empty() ? "the server closed it" : s.message())));
  }

  absl::Status ReadAnswer() {
    AnswerHeader h;
    absl::Status s = ReadFully(in_, &h, sizeof(h));
    if (!s.ok()) return s;
    if (h.message_bytes > kMaxStatusMessageBytes || h.body_bytes > kMaxAnswerBytes) {
      return absl::InternalError(absl::StrCat("a malformed answer (", h.message_bytes,
                                              " bytes of message, ", h.body_bytes, " of body)"));
    }
    std::string message(h.message_bytes, '\0');
    s = ReadFully(in_, message.data(), message.size());
    if (!s.ok()) return s;
    if (h.id == 0) {  // a pong, or the server ends the connection saying why
      if (h.code == 0 && h.body_bytes == 0) return absl::OkStatus();
      // An OK status here would read on, the body's bytes taken for the
      // next answer's header.
      if (h.code == 0) return absl::InternalError("a malformed answer (a pong with a body)");
      return absl::Status(static_cast<absl::StatusCode>(h.code), message);
    }
    std::shared_ptr<ClientCall> call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(h.id);
      if (it != pending_.end()) {
        call = std::move(it->second);
        pending_.erase(it);
      }
    }
    if (call == nullptr) return Skip(in_, h.body_bytes);  // ended before (deadline, cancel)
    grpc::ByteBuffer body;
    const AnswerPlacement& place = call->placement;
    if (h.code == 0 && place.bytes > 0 && h.body_bytes >= place.bytes && call->StartReceiving()) {
      placed_call_ = call.get();
      s = ReadPlaced(in_, h.body_bytes, place, &body);
      placed_call_ = nullptr;
      if (call->StopReceiving()) return s;  // it ended meanwhile
    } else {
      s = ReadBuffer(in_, h.body_bytes, &body);
    }
    if (!s.ok()) {
      // Back among the waiting calls, which Break fails with the others
      // (unless it has: then as it did them).
      grpc::Status why;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!broken_) {
          pending_[h.id] = std::move(call);
          return s;
        }
        why = why_;
      }
      call->End(why);
      return s;
    }
    call->End(grpc::Status(static_cast<grpc::StatusCode>(h.code), message), &body);
    return absl::OkStatus();
  }

  // Keepalive, as gRPC's (rpc::kKeepalive): while calls await answers, a
  // connection quiet for kKeepalive is pinged, and one whose ping is not
  // answered within kKeepalive more is broken ("timed out"). Without it a
  // partitioned peer was noticed only when TCP gave up retransmitting, up
  // to 25 s later. On the reader thread (Reader::on_quiet).
  absl::Status Quiet(absl::Duration quiet) {
    // A call that ended while its answer was read into its placement
    // completes only once that read stops: the connection is given up.
    if (placed_call_ != nullptr && placed_call_->ended()) {
      return absl::UnavailableError(
          "the answer of a call that ended (its deadline, or cancelled) stopped coming in");
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (pending_.empty() || quiet < kKeepalive) return absl::OkStatus();
    if (ping_at_ < in_.last_data) {  // none since the last byte came
      ping_at_ = absl::Now();
      out_.Send(ControlFrame(0));
      return absl::OkStatus();
    }
    if (absl::Now() - ping_at_ < kKeepalive) return absl::OkStatus();
    return absl::UnavailableError(absl::StrCat("keepalive ping unanswered within ",
                                               absl::FormatDuration(kKeepalive),
                                               ": the connection timed out"));
  }

  // Fails every call of the connection with `why` and shuts it.
  // The status of calls on a connection whose thread could not start.
  grpc::Status NoThread(const std::system_error& e) const {
    return grpc::Status(
        grpc::StatusCode::UNAVAILABLE,
        absl::StrCat("no thread for the stream connection to ", target_.address, ": ", e.what()));
  }
  void Break(const grpc::Status& why) {
    std::map<uint64_t, std::shared_ptr<ClientCall>> pending;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) return;
      broken_ = true;
      why_ = why;
      pending.swap(pending_);
      if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
    }
    out_.Close();
    for (auto& [id, call] : pending) call->End(why);
  }

  const StreamTarget target_;
  mutable std::mutex mu_;
  int fd_ = -1;  // set once by the writer, under mu_
  bool broken_ = false;
  bool opened_ = false;
  grpc::Status why_;
  Reader in_;                                  // the reader thread's
  ClientCall* placed_call_ = nullptr;          // the reader thread's: whose answer it reads in place
  absl::Time ping_at_ = absl::InfinitePast();  // the last ping's
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::shared_ptr<ClientCall>> pending_;  // sent (or queued), not answered
  Outbox out_{-1, /*ready=*/false};  // requests, cancels and pings; ready once connected
};

void ClientCall::Cancel() { End(grpc::Status(grpc::StatusCode::CANCELLED, "Cancelled")); }

bool ClientCall::End(const grpc::Status& status, grpc::ByteBuffer* answer) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ended_) return false;
    ended_ = true;
    if (armed_) Deadlines::Get().Remove(entry_);
    armed_ = false;
    if (receiving_) {  // the reader still writes placement.data: it completes the call
      deferred_ = status;
      return true;
    }
  }
  Complete(status, answer);
  return true;
}

void ClientCall::Complete(const grpc::Status& status, grpc::ByteBuffer* answer) {
  if (std::shared_ptr<ClientConnection> c = connection.lock()) c->Forget(id);
  if (answer != nullptr) *response_ = std::move(*answer);
  CountClientCall(method, static_cast<int>(status.error_code()), start_, request.Length());
  // Moved out, so that what the callback holds (often this call's handle)
  // goes once it has run.
  std::function<void(grpc::Status)> done = std::move(done_);
  if (response_->Length() >= kLargeMessageBytes) {
    internal::CallbackPool().Run([done = std::move(done), status] { done(status); });
  } else {
    done(status);
  }
}

}  // namespace

bool StreamConnected(const StreamTarget& target) {
  std::shared_ptr<ClientConnection> c = ClientConnection::For(target, /*make=*/false);
  return c != nullptr && c->open();
}

StreamTarget StreamTargetFor(const std::string& address, int connection, const Security& security) {
  StreamTarget target{address, connection, security.token, nullptr};
  if (security.tls() && !address.empty()) {
    absl::StatusOr<std::shared_ptr<const StreamTls>> tls = StreamTls::For(security);
    if (tls.ok()) {
      target.tls = *std::move(tls);
    } else {
      target.address = "";  // gRPC's TLS says what is wrong with the files
    }
  }
  return target;
}

std::shared_ptr<StreamCall> StartStreamCall(const StreamTarget& target, const std::string& method,
                                            const grpc::ByteBuffer& request,
                                            grpc::ByteBuffer* response, absl::Time deadline,
                                            std::function<void(grpc::Status)> done,
                                            AnswerPlacement placement) {
  auto call = std::make_shared<ClientCall>(method, request, deadline, response, std::move(done),
                                           placement);
  ClientConnection::For(target)->Send(call);
  call->Arm();
  return call;
}

}  // namespace rpc
}  // namespace mx
