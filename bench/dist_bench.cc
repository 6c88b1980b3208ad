// Distributed KVStore transport: pushpull, push and pull throughput
// (dist_sync) with 1 server and 1 worker and with 2 servers and 2 workers
// on 127.0.0.1 (in this process), one key at a time and 8 keys in flight,
// for 4 KiB, 1 MiB and 16 MiB values, against loopback TCP bandwidth measured in the same run
// by a plain socket sender and receiver; the round-trip latency of a
// small pushpull (p50, p99) and of an MLP training step's communication,
// against loopback TCP round trips of the same bytes; and a server
// completing the steps of two keys on two threads against one. Each
// figure repeats at least 20 times after a warm-up; its line ends with the
// range of the repetitions.
//
// With --job, this process is one worker of a job that deploy/launch.py
// started (mx_server processes for the coordinator and the servers, every
// worker a `dist_bench --job` process: bench/dist_procs_bench.py), and the
// transport's figures are measured as such jobs run, rank 0 reporting
// them with names ending in _procs.
//
// Usage: dist_bench [--job] [SUBSTRING]: only the figures whose names
// contain SUBSTRING.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <spawn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "kvstore/dist_kvstore.h"
#include "rpc/rpc.h"
#include "server/kvstore_service.h"
#include "server/shard.h"

namespace mx::bench {
namespace {

// A listening socket on 127.0.0.1 (a free port, into *port).
int ListenLoopback(int* port) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
      listen(listener, 4) != 0) {
    throw std::runtime_error("loopback baseline: cannot listen");
  }
  *port = ntohs(addr.sin_port);
  return listener;
}

// A connection to 127.0.0.1:port.
int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    throw std::runtime_error("baseline: cannot connect to port " + std::to_string(port));
  }
  return fd;
}

// A loopback TCP connection: {the connecting end, the accepted end}.
std::pair<int, int> LoopbackConnection() {
  int port = 0;
  const int listener = ListenLoopback(&port);
  const int client = Connect(port);
  const int server = accept(listener, nullptr, nullptr);
  close(listener);
  return {client, server};
}

// Reads or writes exactly `bytes` (false at end of file or an error).
bool ReadFully(int fd, char* data, size_t bytes) {
  for (size_t got = 0; got < bytes;) {
    const ssize_t r = read(fd, data + got, bytes - got);
    if (r <= 0) return false;
    got += r;
  }
  return true;
}
bool WriteFully(int fd, const char* data, size_t bytes) {
  for (size_t sent = 0; sent < bytes;) {
    const ssize_t w = write(fd, data + sent, bytes - sent);
    if (w <= 0) return false;
    sent += w;
  }
  return true;
}

// The far end of an echo: writes back what it reads, until end of file.
void Echo(int socket) {
  std::vector<char> buffer(1 << 20);
  for (ssize_t n; (n = read(socket, buffer.data(), buffer.size())) > 0;) {
    if (!WriteFully(socket, buffer.data(), n)) break;
  }
  close(socket);
}

// The throughput baseline: a plain loopback TCP connection, a sender and a
// receiver thread (or, with a port, a receiver in another process: Sink).
// Transfer(bytes) writes `bytes` in writes of up to 1 MiB and returns once
// the receiver has read them all: from and into one 1 MiB buffer each (hot
// in cache: the baseline), or, from_memory, from and into 64 MiB
// rings, as a transfer of tensors larger than the cache touches memory.
class LoopbackLink {
 public:
  explicit LoopbackLink(int far_port = 0) : source_(kRing, 1) {
    if (far_port != 0) {
      sender_ = Connect(far_port);
      // The header and a small transfer go at once (Nagle's algorithm held
      // a 4 KiB transfer behind the header until the delayed ACK, 40 ms).
      const int one = 1;
      setsockopt(sender_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      return;
    }
    sink_.resize(kRing);
    const auto [sender, receiver] = LoopbackConnection();
    sender_ = sender;
    receiver_ = std::thread([this, receiver = receiver] { Receive(receiver); });
  }
  ~LoopbackLink() {
    close(sender_);  // the receiver reads end of file and stops
    if (receiver_.joinable()) receiver_.join();
  }

  void Transfer(size_t bytes, bool from_memory) {
    const bool far = !receiver_.joinable();  // the receiver is a Sink
    if (far) {
      const uint64_t header[2] = {bytes, from_memory};
      if (!WriteFully(sender_, reinterpret_cast<const char*>(header), sizeof(header))) {
        throw std::runtime_error("loopback baseline: write failed");
      }
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      wanted_ = received_ + bytes;
      from_memory_ = from_memory;
    }
    for (size_t sent = 0; sent < bytes;) {
      const size_t at = from_memory ? sent % kRing : 0;
      const ssize_t n = write(sender_, source_.data() + at, std::min({kChunk, bytes - sent, kRing - at}));
      if (n <= 0) throw std::runtime_error("loopback baseline: write failed");
      sent += n;
    }
    if (far) {
      char ack;
      if (!ReadFully(sender_, &ack, 1)) throw std::runtime_error("loopback baseline: far end gone");
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return received_ >= wanted_; });
  }

  // The far end of a link in another process: per transfer, a header
  // {bytes, from_memory}, the bytes (read into a 1 MiB buffer or a 64 MiB
  // ring, as the local receiver does), then one byte back.
  static void Sink(int socket) {
    std::vector<char> ring(kRing);
    uint64_t header[2];
    while (ReadFully(socket, reinterpret_cast<char*>(header), sizeof(header))) {
      size_t at = 0;
      for (uint64_t got = 0; got < header[0];) {
        const ssize_t n = read(socket, ring.data() + (header[1] ? at : 0),
                               std::min<uint64_t>({kChunk, kRing - at, header[0] - got}));
        if (n <= 0) {
          close(socket);
          return;
        }
        got += n;
        at = (at + n) % kRing;
      }
      if (!WriteFully(socket, "k", 1)) break;
    }
    close(socket);
  }

 private:
  static constexpr size_t kChunk = 1 << 20, kRing = 64 << 20;

  void Receive(int socket) {
    size_t at = 0;  // in the ring
    for (;;) {
      bool ring;
      {
        std::lock_guard<std::mutex> lock(mu_);
        ring = from_memory_;
      }
      const ssize_t n = read(socket, sink_.data() + (ring ? at : 0), std::min(kChunk, kRing - at));
      if (n <= 0) break;
      at = (at + n) % kRing;
      std::lock_guard<std::mutex> lock(mu_);
      received_ += n;
      if (received_ >= wanted_) cv_.notify_all();
    }
    close(socket);
  }

  int sender_;
  std::thread receiver_;
  std::vector<char> source_, sink_;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t received_ = 0, wanted_ = 0;  // guarded by mu_
  bool from_memory_ = false;          // likewise
};

// The latency baseline: a loopback TCP ping-pong, with Nagle's algorithm
// off (as gRPC has it). RoundTrip(bytes) sends `bytes` to an echo thread
// and returns when it has read them back.
class LoopbackEcho {
 public:
  // With a port: the echo is another process's (Echo there).
  explicit LoopbackEcho(int far_port = 0) {
    const int one = 1;
    if (far_port != 0) {
      client_ = Connect(far_port);
      setsockopt(client_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      return;
    }
    const auto [client, server] = LoopbackConnection();
    for (int fd : {client, server}) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    client_ = client;
    echo_ = std::thread([server = server] { Echo(server); });
  }
  ~LoopbackEcho() {
    close(client_);  // the echo reads end of file and stops
    if (echo_.joinable()) echo_.join();
  }

  void RoundTrip(size_t bytes) {
    if (buffer_.size() < bytes) buffer_.resize(bytes);
    if (!WriteFully(client_, buffer_.data(), bytes)) {
      throw std::runtime_error("loopback echo: write failed");
    }
    if (!ReadFully(client_, buffer_.data(), bytes)) {
      throw std::runtime_error("loopback echo: read failed");
    }
  }

 private:
  int client_;
  std::thread echo_;
  std::vector<char> buffer_;
};

// The transport's own latency: a plain gRPC unary call carrying the same
// bytes, to a generic echo service on gRPC's callback API (as servers are
// commonly written), on a channel as mx makes them. The call goes through
// mx's client queue (rpc/async.h): a callback call would give this process
// gRPC's callback pollers, which would slow mx's calls too.
class GrpcEcho {
 public:
  // With a port: the echo service is another process's (Serve there).
  explicit GrpcEcho(int far_port = 0) : port_(far_port != 0 ? far_port : Serve()) {
    stub_ = std::make_unique<grpc::GenericStub>(
        rpc::SharedChannel("127.0.0.1:" + std::to_string(port_), {}));
  }
  int port() const { return port_; }
  ~GrpcEcho() {
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
  }

  // Starts the echo service here; returns its port.
  int Serve() {
    grpc::ServerBuilder builder;
    int port = 0;
    rpc::Listen(&builder, "127.0.0.1:0", {}, &port);
    builder.RegisterCallbackGenericService(&service_);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port == 0) throw std::runtime_error("gRPC echo: cannot listen");
    return port;
  }

  void RoundTrip(size_t bytes) {
    grpc::Slice slice(std::string(bytes, 'x'));
    grpc::ByteBuffer request(&slice, 1), response;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status status;
    rpc::StartUnaryCall(stub_.get(), &ctx, "/bench.Echo/Echo", request, &response,
                        [&](grpc::Status s) {
                          std::lock_guard<std::mutex> lock(mu);
                          status = s;
                          done = true;
                          cv.notify_one();
                        });
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
    if (!status.ok()) throw std::runtime_error("gRPC echo: " + status.error_message());
  }

 private:
  // Answers each call with its request.
  class Echo : public grpc::ServerGenericBidiReactor {
   public:
    Echo() { StartRead(&message_); }
    void OnReadDone(bool ok) override {
      if (ok) {
        StartWriteAndFinish(&message_, grpc::WriteOptions(), grpc::Status::OK);
      } else {
        Finish(grpc::Status::OK);
      }
    }
    void OnDone() override { delete this; }

   private:
    grpc::ByteBuffer message_;
  };
  class Service : public grpc::CallbackGenericService {
    grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
      return new Echo;
    }
  };

  Service service_;
  std::unique_ptr<grpc::Server> server_;
  const int port_;
  std::unique_ptr<grpc::GenericStub> stub_;
};

// The baselines' far ends in a process of their own (dist_bench
// --far-end), for the figures measured as jobs run, where mx's calls cross
// processes: a TCP echo, a TCP sink (LoopbackLink::Sink) and a gRPC echo.
// It prints "far-end ECHO SINK GRPC" (their ports) and serves until its
// standard input closes (the process that started it ended).
void RunFarEnd() {
  int echo_port = 0, sink_port = 0;
  for (auto [port, serve] : {std::pair<int*, void (*)(int)>{&echo_port, Echo},
                             std::pair<int*, void (*)(int)>{&sink_port, LoopbackLink::Sink}}) {
    const int listener = ListenLoopback(port);
    std::thread([listener, serve = serve] {
      for (int c; (c = accept(listener, nullptr, nullptr)) >= 0;) {
        const int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        std::thread(serve, c).detach();
      }
    }).detach();
  }
  GrpcEcho grpc;
  std::printf("far-end %d %d %d\n", echo_port, sink_port, grpc.port());
  std::fflush(stdout);
  for (char c; read(0, &c, 1) > 0;) {
  }
  std::_Exit(0);
}

// Starts RunFarEnd's process and learns its ports; ends it (closing its
// standard input) when destroyed.
class FarEnd {
 public:
  FarEnd() {
    int in[2], out[2];
    if (pipe(in) != 0 || pipe(out) != 0) throw std::runtime_error("far end: no pipe");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_addclose(&actions, in[1]);
    posix_spawn_file_actions_addclose(&actions, out[0]);
    char self[] = "/proc/self/exe", flag[] = "--far-end";
    char* argv[] = {self, flag, nullptr};
    const int failed = posix_spawn(&pid_, self, &actions, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    close(in[0]);
    close(out[1]);
    to_child_ = in[1];
    std::string line;
    for (char c; line.size() < 100 && read(out[0], &c, 1) == 1 && c != '\n';) line += c;
    close(out[0]);
    if (failed != 0 || std::sscanf(line.c_str(), "far-end %d %d %d", &echo_port, &sink_port,
                                   &grpc_port) != 3) {
      throw std::runtime_error("far end: did not start (" + line + ")");
    }
  }
  ~FarEnd() {
    close(to_child_);
    waitpid(pid_, nullptr, 0);
  }
  int echo_port = 0, sink_port = 0, grpc_port = 0;

 private:
  pid_t pid_ = -1;
  int to_child_ = -1;
};

// The workers a figure runs on. In this process: an in-process Cluster.
// As jobs run: this process is one worker of a job that deploy/launch.py
// started (mx_server processes, every worker a `dist_bench --job`
// process), and every worker process runs the same figures in step.
class Workers {
 public:
  virtual ~Workers() = default;
  // Runs fn(rank, store) for every rank this process drives, at once;
  // returns when all are done.
  virtual void OnEveryWorker(const std::function<void(int, KVStore&)>& fn) = 0;
  // Waits for every worker process of the job (nothing in one process).
  virtual void Sync() {}
  // Whether this process times and reports the figures.
  virtual bool leader() const { return true; }
  // The baselines' far ends, when they must be in another process.
  virtual const FarEnd* far_end() const { return nullptr; }
  // Whether the servers run in this process (whose CPU time is then theirs too).
  virtual bool servers_here() const { return true; }
  virtual int size() const = 0;  // workers in all
};

// A cluster on 127.0.0.1 in this process: `servers` parameter servers
// (dist_sync) and one store per worker, each driven by its own thread.
struct Cluster : Workers {
  std::vector<std::unique_ptr<ParameterServer>> servers;
  std::vector<std::unique_ptr<KVStore>> workers;

  Cluster(int num_servers, int num_workers) {
    DistKVStoreOptions o;
    // Pushes and pulls over stream connections, as mx_server's servers take them.
    ParameterServerOptions streams;
    streams.stream_port = 0;
    for (int i = 0; i < num_servers; ++i) {
      auto s = ParameterServer::Start("127.0.0.1:0", {true, num_workers, false}, streams);
      ThrowIfError(s.status());
      o.servers.push_back((*s)->address());
      o.stream_addresses.push_back((*s)->stream_address());
      servers.push_back(*std::move(s));
    }
    o.num_workers = num_workers;
    o.big_key_bound = 1 << 20;  // 4 MiB: the 16 MiB value is split
    for (int r = 0; r < num_workers; ++r) {
      o.rank = r;
      auto kv = CreateDistKVStore(o);
      ThrowIfError(kv.status());
      workers.push_back(*std::move(kv));
    }
  }

  void OnEveryWorker(const std::function<void(int, KVStore&)>& fn) override {
    std::vector<std::thread> threads;
    for (size_t r = 0; r < workers.size(); ++r) {
      threads.emplace_back([&, r] { fn(static_cast<int>(r), *workers[r]); });
    }
    for (auto& t : threads) t.join();
  }
  int size() const override { return static_cast<int>(workers.size()); }
};

// This process as one worker of a job (the store from the launcher's
// environment); rank 0 times and reports.
class JobWorker : public Workers {
 public:
  JobWorker() {
    absl::StatusOr<std::unique_ptr<KVStore>> kv = KVStore::Create("dist_sync");
    ThrowIfError(kv.status());
    kv_ = *std::move(kv);
    if (leader()) far_end_ = std::make_unique<FarEnd>();
  }
  ~JobWorker() override { ThrowIfError(kv_->Finish()); }
  void OnEveryWorker(const std::function<void(int, KVStore&)>& fn) override {
    fn(kv_->rank(), *kv_);
  }
  void Sync() override { ThrowIfError(kv_->Barrier()); }
  bool leader() const override { return kv_->rank() == 0; }
  int size() const override { return kv_->num_workers(); }
  const FarEnd* far_end() const override { return far_end_.get(); }
  bool servers_here() const override { return false; }

 private:
  std::unique_ptr<KVStore> kv_;
  std::unique_ptr<FarEnd> far_end_;  // rank 0's
};

// Times `round` (every worker's part of it at once) and, on the leader,
// each baseline, in turns (so drift on a shared machine hits all alike),
// after a warm-up turn. Workers in separate processes begin each turn
// together (a barrier) and meet again before the leader's baselines, so
// that the leader's timing of its part spans the round's; the barriers are
// not timed. Returns the median seconds (round's first) and the round's
// fastest and slowest; with `cpu`, median CPU seconds of this process.
struct Timed {
  std::vector<double> median;
  double fastest = 0, slowest = 0;
};
Timed Turns(Workers& w, int reps, const std::function<void()>& round,
            const std::vector<std::function<void()>>& baselines, std::vector<double>* cpu) {
  std::vector<std::vector<double>> t(1 + baselines.size()), c(t.size());
  auto timed = [&](size_t f, const std::function<void()>& fn, bool record) {
    const double s = NowSeconds(), cs = CpuSeconds();
    fn();
    if (!record) return;
    t[f].push_back(NowSeconds() - s);
    c[f].push_back(CpuSeconds() - cs);
  };
  for (int i = -1; i < reps; ++i) {
    w.Sync();
    timed(0, round, i >= 0);
    w.Sync();
    if (!w.leader()) continue;
    for (size_t b = 0; b < baselines.size(); ++b) timed(b + 1, baselines[b], i >= 0);
  }
  Timed out;
  if (!w.leader()) return out;
  for (size_t f = 0; f < t.size(); ++f) {
    std::sort(t[f].begin(), t[f].end());
    std::sort(c[f].begin(), c[f].end());
    out.median.push_back(t[f][t[f].size() / 2]);
    if (cpu != nullptr) cpu->push_back(c[f][c[f].size() / 2]);
  }
  out.fastest = t[0].front();
  out.slowest = t[0].back();
  return out;
}

// "range=A-B" (the smaller first), for the end of a BENCH line.
std::string Range(double a, double b) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "range=%.4g-%.4g", std::min(a, b), std::max(a, b));
  return buffer;
}

// Figures whose names contain this (the first command-line argument; all
// when empty) are measured, the others skipped: for profiling one case.
std::string only;
bool Wanted(const std::string& name) { return name.find(only) != std::string::npos; }

// Each figure's baseline is loopback TCP moving the same bytes, measured
// in turns with it (the machine is shared: its speed drifts). A second
// line compares with TCP moving them from and to memory beyond the cache,
// as a transfer of large tensors must: the 1 MiB buffers of the plain
// baseline stay in cache, which makes it faster than any transfer of
// 16 MiB tensors can be. For 16 MiB values a third line compares CPU time
// per byte with the plain baseline's. Three kinds of rounds, each worker
// on its own keys at once: pushpull (what training does), push alone
// (until the servers have it) and pull alone (of values already there).
void Throughput(Workers& c, const std::string& config, int* next_key) {
  enum Op { kPushPull, kPush, kPull };
  const std::vector<std::pair<Op, std::string>> ops = {
      {kPushPull, "pushpull"}, {kPush, "push"}, {kPull, "pull"}};
  const int sink = c.far_end() != nullptr ? c.far_end()->sink_port : 0;
  // The leader's, made for the first figure wanted: connecting makes the
  // far end fill a 64 MiB ring, which must not overlap another figure.
  std::unique_ptr<LoopbackLink> tcp;
  for (const auto& [op, op_name] : ops) {
    for (int64_t bytes : {int64_t{4} << 10, int64_t{1} << 20, int64_t{16} << 20}) {
      const int64_t n = bytes / 4;
      for (int in_flight : {1, 8}) {
        const std::string name = "dist_" + op_name + "_" + std::to_string(bytes >> 10) + "KiB_x" +
                                 std::to_string(in_flight) + "_" + config;
        if (!Wanted(name)) continue;
        if (c.leader() && tcp == nullptr) tcp = std::make_unique<LoopbackLink>(sink);
        std::vector<int> keys;
        for (int k = 0; k < in_flight; ++k) keys.push_back((*next_key)++);
        std::vector<std::vector<NDArray>> values(c.size()), outs(c.size());
        c.OnEveryWorker([&](int r, KVStore& kv) {
          for (int k = 0; k < in_flight; ++k) {
            values[r].push_back(RandomUniform(0, 1, {n}));
            outs[r].push_back(Empty({n}));
            ThrowIfError(kv.Init(keys[k], values[r][k]));
          }
        });
        const int reps = bytes >= (1 << 20) ? 21 : 201;  // at least 20 after the warm-up
        auto round = [&, op = op] {
          c.OnEveryWorker([&](int r, KVStore& kv) {
            for (int k = 0; k < in_flight; ++k) {
              if (op == kPushPull) ThrowIfError(kv.PushPull(keys[k], {values[r][k]}, {outs[r][k]}));
              if (op == kPush) ThrowIfError(kv.Push(keys[k], values[r][k]));
              if (op == kPull) ThrowIfError(kv.Pull(keys[k], {outs[r][k]}));
            }
            // A push has ended when its value may be written again.
            for (const NDArray& v : values[r]) v.WaitToWrite();
            for (const NDArray& o : outs[r]) o.WaitToRead();
          });
        };
        // Each worker's push and pull each move the value once.
        const size_t moved = (op == kPushPull ? 2 : 1) * bytes * in_flight * c.size();
        std::vector<double> cpu;
        const Timed timed = Turns(
            c, reps, round,
            {[&] { tcp->Transfer(moved, false); }, [&] { tcp->Transfer(moved, true); }}, &cpu);
        if (!c.leader()) continue;
        const std::vector<double>& t = timed.median;
        const double rate = moved / t[0], tcp_rate = moved / t[1], memory_rate = moved / t[2];
        // Through shared memory (a job on one host) a large value must
        // move at twice TCP's rate or better (issue 20).
        const bool shm = config.find("_shm") != std::string::npos;
        Report(name, rate / 1e9, "GB/s", tcp_rate / 1e9, rate / tcp_rate,
               bytes >= (16 << 20) ? (shm ? ">=2" : ">=0.8") : "info",
               Range(moved / timed.fastest / 1e9, moved / timed.slowest / 1e9));
        // The same against TCP moving the bytes from and to memory.
        Report(name + "_vs_tcp_from_memory", rate / 1e9, "GB/s", memory_rate / 1e9,
               rate / memory_rate, "info");
        // CPU seconds per GB moved, against the hot TCP baseline's: what a
        // change to the transport costs or saves, less swayed by the
        // machine's other load than the rates (large values only; in one
        // process, where the servers' CPU is this process's too).
        if (bytes >= (16 << 20) && c.servers_here()) {
          const double gb = moved / 1e9;
          Report(name + "_cpu", cpu[0] / gb, "cpu_s/GB", cpu[1] / gb, cpu[1] / cpu[0], "info");
        }
      }
    }
  }
}

// Round-trip times (microseconds) of mx and of its baselines, measured in
// turns: after each of mx's, a loopback TCP round trip of the same bytes
// and a plain gRPC call carrying them.
class RoundTrips {
 public:
  // Far ends in `far`'s process, if any.
  explicit RoundTrips(const FarEnd* far)
      : tcp_link_(far != nullptr ? far->echo_port : 0), grpc_link_(far != nullptr ? far->grpc_port : 0) {}

  // Records mx's round trip of `bytes` (it began at `start`, NowSeconds),
  // then times both baselines moving them.
  void Add(double start, size_t bytes) {
    mx_.push_back((NowSeconds() - start) * 1e6);
    Time(&tcp_, [&] { tcp_link_.RoundTrip(bytes); });
    Time(&grpc_, [&] { grpc_link_.RoundTrip(bytes); });
  }

  // Reports p50 (and p99) of mx's round trips against TCP's (ratio: TCP's
  // time over mx's; a p99 against TCP's p99), and a _vs_grpc line against
  // plain gRPC's.
  void Report(const std::string& name, const std::string& config, bool with_p99) {
    for (std::vector<double>* v : {&mx_, &tcp_, &grpc_}) std::sort(v->begin(), v->end());
    auto at = [](const std::vector<double>& v, double q) {
      return v[static_cast<size_t>(q * (v.size() - 1))];
    };
    for (double q : {0.5, 0.99}) {
      if (q > 0.5 && !with_p99) break;
      const std::string figure = name + (q > 0.5 ? "_p99_" : "_p50_") + config;
      const double mx = at(mx_, q), tcp = at(tcp_, q), grpc = at(grpc_, q);
      bench::Report(figure, mx, "us", tcp, tcp / mx, "info", Range(mx_.front(), mx_.back()));
      bench::Report(figure + "_vs_grpc", mx, "us", grpc, grpc / mx, "info");
    }
  }

 private:
  static void Time(std::vector<double>* times, const std::function<void()>& fn) {
    const double s = NowSeconds();
    fn();
    times->push_back((NowSeconds() - s) * 1e6);
  }

  LoopbackEcho tcp_link_;
  GrpcEcho grpc_link_;
  std::vector<double> mx_, tcp_, grpc_;
};

// Round-trip latency of a small pushpull (dist_sync: every worker's push
// is in the answer), against round trips of its 64 bytes (RoundTrips).
void Latency(Workers& c, const std::string& config, int key) {
  if (!Wanted("dist_small_rtt_" + config)) return;
  std::unique_ptr<RoundTrips> t;  // rank 0's (the leader's)
  if (c.leader()) t = std::make_unique<RoundTrips>(c.far_end());
  c.OnEveryWorker([&](int r, KVStore& kv) {
    ThrowIfError(kv.Init(key, Zeros({16})));
    NDArray small = Ones({16}), out = Empty({16});
    for (int i = 0; i < 500; ++i) {
      const double s = NowSeconds();
      ThrowIfError(kv.PushPull(key, {small}, {out}));
      out.WaitToRead();
      if (r == 0) t->Add(s, 16 * sizeof(float));
    }
  });
  if (c.leader()) t->Report("dist_small_rtt", config, /*with_p99=*/true);
}

// One training step's communication for the MLP 784-128-64-10 as training
// sends it (worker/model.cc, default bucket): one pushpull of every
// parameter (weights and biases, last layer first), then wait. Every
// worker does the same (dist_sync). Against round trips of one worker's
// gradients (RoundTrips).
void MlpStep(Workers& c, const std::string& config, int* next_key) {
  if (!Wanted("dist_mlp_step_comm_" + config)) return;
  const std::vector<int64_t> sizes = {784 * 128, 128, 128 * 64, 64, 64 * 10, 10};
  std::vector<int> keys;
  for (size_t k = 0; k < sizes.size(); ++k) keys.push_back((*next_key)++);
  size_t bytes = 0;
  for (int64_t n : sizes) bytes += n * sizeof(float);
  std::unique_ptr<RoundTrips> t;  // rank 0's (the leader's)
  if (c.leader()) t = std::make_unique<RoundTrips>(c.far_end());
  c.OnEveryWorker([&](int r, KVStore& kv) {
    std::vector<Key> bucket;
    std::vector<std::vector<NDArray>> grads, weights;
    for (size_t k = sizes.size(); k-- > 0;) {  // the last layer first
      bucket.emplace_back(keys[k]);
      grads.push_back({Ones({sizes[k]})});
      weights.push_back({Empty({sizes[k]})});
      ThrowIfError(kv.Init(keys[k], Zeros({sizes[k]})));
    }
    for (int i = 0; i < 300; ++i) {
      const double s = NowSeconds();
      ThrowIfError(kv.PushPull(bucket, grads, weights, /*priority=*/1));
      // Not WaitAll: the workers share this process's engine, and one
      // would wait for the other's next step, which waits for this one.
      for (const std::vector<NDArray>& w : weights) w[0].WaitToRead();
      if (r == 0) t->Add(s, bytes);
    }
  });
  if (c.leader()) t->Report("dist_mlp_step_comm", config, /*with_p99=*/false);
}

// A server completes the steps of different keys at once: two threads
// push two keys of 4 MiB (2 workers each) into a shard, against one thread
// pushing the same; the server sums, or with `optimizer` sums and applies
// it. The target is on the optimizer's figure, which is compute-bound: a
// sum alone runs at about the machine's memory bandwidth on one thread
// (25-30 GB/s of pushes here), so a second thread adds little to it.
void ServerSteps(const std::string& optimizer) {
  const std::string name =
      "dist_server_" + (optimizer.empty() ? std::string("sum") : optimizer) + "_2keys_2threads";
  if (!Wanted(name)) return;
  constexpr int kKeys = 2, kWorkers = 2, kSteps = 20;
  constexpr int64_t kN = 1 << 20;
  ParameterShard shard({true, kWorkers, false});
  for (int k = 0; k < kKeys; ++k) ThrowIfError(shard.Init(k, Shape{kN}, std::vector<float>(kN)));
  if (!optimizer.empty()) {
    ThrowIfError(shard.SetOptimizer(optimizer, {{"learning_rate", "0.01"}, {"momentum", "0.9"}}));
  }
  std::vector<std::vector<float>> values;  // one per key and worker
  for (int i = 0; i < kKeys * kWorkers; ++i) values.emplace_back(kN, 1.0f + i);
  auto push_steps = [&](int key) {
    for (int s = 0; s < kSteps; ++s) {
      for (int w = 0; w < kWorkers; ++w) {
        const std::vector<float>& v = values[key * kWorkers + w];
        ThrowIfError(shard.Push(key, w, Pieces::Of(v.data(), v.size(), nullptr)));
      }
    }
  };
  auto two_threads = [&] {
    std::thread other([&] { push_steps(1); });
    push_steps(0);
    other.join();
  };
  auto one_thread = [&] {
    push_steps(0);
    push_steps(1);
  };
  const std::vector<double> t = MedianTurns(5, {two_threads, one_thread});
  const double bytes = 4.0 * kN * kKeys * kSteps * kWorkers;  // pushes summed
  Report(name, bytes / t[0] / 1e9, "GB/s", bytes / t[1] / 1e9, t[1] / t[0],
         optimizer.empty() ? "info" : ">=1.3");
}

// A server's cost per worker of a dist_sync step grows no faster than the
// workers (issue 20: 64 workers and more): 1024 workers' pushes and pulls
// of a 1-float key (the server's own bookkeeping alone, in one thread)
// against 64 workers', per worker. Every push had listed every missing
// worker and tried every waiting pull: 29 us per worker at 1024 against
// 2.6 at 64 (ratio 0.09).
void ShardScaling() {
  const std::string name = "dist_server_step_per_worker_1024_vs_64";
  if (!Wanted(name)) return;
  auto steps = [](int workers) {
    return [workers] {
      constexpr int kSteps = 20;
      ParameterShard shard({true, workers, false});
      ThrowIfError(shard.Init(1, Shape{1}, {0}));
      for (int s = 1; s <= kSteps; ++s) {
        for (int r = 0; r < workers; ++r) {
          shard.PushAsync(1, r, Pieces::Of(std::vector<float>{1.0f}), [](absl::Status) {});
          shard.PullAsync(1, s, [](absl::StatusOr<ParameterShard::Value>) {});
        }
      }
    };
  };
  const std::vector<double> t = MedianTurns(5, {steps(1024), steps(64)});
  const double per_worker = t[0] / (20 * 1024) * 1e6, baseline = t[1] / (20 * 64) * 1e6;
  Report(name, per_worker, "us", baseline, baseline / per_worker, ">=0.5");
}

// The transport's figures of one set of workers.
void Transport(Workers& w, const std::string& config) {
  int next_key = 100;
  Throughput(w, config, &next_key);
  Latency(w, config, next_key++);
  MlpStep(w, config, &next_key);
}

void Run() {
  ServerSteps("");
  ServerSteps("sgd");
  ShardScaling();
  for (int nodes : {1, 2}) {
    Cluster c(nodes, nodes);
    Transport(c, std::to_string(nodes) + "servers_" + std::to_string(nodes) + "workers");
  }
}

// As one worker of a job (dist_bench --job): the transport's figures, named
// with _procs, and _shm when values go through shared memory (MX_SHM_DIR;
// bench/dist_procs_bench.py starts the jobs both ways).
void RunAsJobWorker() {
  JobWorker w;
  const char* servers = std::getenv("DMLC_NUM_SERVER");
  const char* shm = std::getenv("MX_SHM_DIR");
  Transport(w, absl::StrCat(servers == nullptr ? "?" : servers, "servers_", w.size(),
                            "workers_procs", shm != nullptr && *shm != '\0' ? "_shm" : ""));
}

}  // namespace
}  // namespace mx::bench

// Usage: dist_bench [FILTER] (in this process), or dist_bench --job
// [FILTER] as a worker of a job that deploy/launch.py starts.
int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--far-end") mx::bench::RunFarEnd();
  const bool job = argc > 1 && std::string(argv[1]) == "--job";
  if (argc > 1 + job) mx::bench::only = argv[1 + job];
  try {
    if (job) {
      mx::bench::RunAsJobWorker();
    } else {
      mx::bench::Run();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dist_bench: %s\n", e.what());
    return 1;
  }
  // A job's workers print only their own figures: judged in-process only.
  return job ? 0 : mx::bench::ExitCode("dist_bench", mx::bench::only);
}
