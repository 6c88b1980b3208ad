// Distributed KVStore transport: pushpull throughput (dist_sync) with 1
// server and 1 worker and with 2 servers and 2 workers on 127.0.0.1 (in
// this process), one key at a time and 8 keys in flight, for 4 KiB, 1 MiB
// and 16 MiB values, against loopback TCP bandwidth measured in the same run
// by a plain socket sender and receiver; the round-trip latency of a
// small pushpull (p50, p99); and a server completing the steps of two keys
// on two threads against one.
//
// Usage: dist_bench [SUBSTRING]: only the figures whose names contain it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "kvstore/dist_kvstore.h"
#include "server/kvstore_service.h"
#include "server/shard.h"

namespace mx::bench {
namespace {

// The baseline: a plain loopback TCP connection, a sender and a receiver
// thread. Transfer(bytes) writes `bytes` in writes of up to 1 MiB and
// returns once the receiver has read them all: from and into one 1 MiB
// buffer each (hot in cache: the baseline), or, from_memory, from
// and into 64 MiB rings, as a transfer of tensors larger than the cache
// touches memory.
class LoopbackLink {
 public:
  LoopbackLink() : source_(kRing, 1), sink_(kRing) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        listen(listener, 1) != 0) {
      throw std::runtime_error("loopback baseline: cannot listen");
    }
    sender_ = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(sender_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      throw std::runtime_error("loopback baseline: cannot connect");
    }
    const int receiver = accept(listener, nullptr, nullptr);
    close(listener);
    receiver_ = std::thread([this, receiver] { Receive(receiver); });
  }
  ~LoopbackLink() {
    close(sender_);  // the receiver reads end of file and stops
    receiver_.join();
  }

  void Transfer(size_t bytes, bool from_memory) {
    std::unique_lock<std::mutex> lock(mu_);
    wanted_ = received_ + bytes;
    from_memory_ = from_memory;
    lock.unlock();
    for (size_t sent = 0; sent < bytes;) {
      const size_t at = from_memory ? sent % kRing : 0;
      const ssize_t n = write(sender_, source_.data() + at, std::min({kChunk, bytes - sent, kRing - at}));
      if (n <= 0) throw std::runtime_error("loopback baseline: write failed");
      sent += n;
    }
    lock.lock();
    cv_.wait(lock, [&] { return received_ >= wanted_; });
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

// A cluster on 127.0.0.1 in this process: `servers` parameter servers
// (dist_sync) and one store per worker, each driven by its own thread.
struct Cluster {
  std::vector<std::unique_ptr<ParameterServer>> servers;
  std::vector<std::unique_ptr<KVStore>> workers;

  Cluster(int num_servers, int num_workers) {
    DistKVStoreOptions o;
    for (int i = 0; i < num_servers; ++i) {
      auto s = ParameterServer::Start("127.0.0.1:0", {true, num_workers, false});
      ThrowIfError(s.status());
      o.servers.push_back((*s)->address());
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

  // Runs fn(rank, store) on every worker at once; returns when all are done.
  void OnEveryWorker(const std::function<void(int, KVStore&)>& fn) {
    std::vector<std::thread> threads;
    for (size_t r = 0; r < workers.size(); ++r) {
      threads.emplace_back([&, r] { fn(static_cast<int>(r), *workers[r]); });
    }
    for (auto& t : threads) t.join();
  }
};

// Figures whose names contain this (the first command-line argument; all
// when empty) are measured, the others skipped: for profiling one case.
std::string only;
bool Wanted(const std::string& name) { return name.find(only) != std::string::npos; }

// Each figure's baseline is loopback TCP moving the same bytes, measured
// in turns with it (the machine is shared: its speed drifts). A second
// line compares with TCP moving them from and to memory beyond the cache,
// as a transfer of large tensors must: the 1 MiB buffers of the plain
// baseline stay in cache, which makes it faster than any transfer of
// 16 MiB tensors can be.
void Throughput(Cluster& c, const std::string& config, int* next_key) {
  LoopbackLink tcp;
  for (int64_t bytes : {int64_t{4} << 10, int64_t{1} << 20, int64_t{16} << 20}) {
    const int64_t n = bytes / 4;
    for (int in_flight : {1, 8}) {
      const std::string name = "dist_pushpull_" + std::to_string(bytes >> 10) + "KiB_x" +
                               std::to_string(in_flight) + "_" + config;
      if (!Wanted(name)) continue;
      std::vector<int> keys;
      for (int k = 0; k < in_flight; ++k) keys.push_back((*next_key)++);
      std::vector<std::vector<NDArray>> values(c.workers.size()), outs(c.workers.size());
      c.OnEveryWorker([&](int r, KVStore& kv) {
        for (int k = 0; k < in_flight; ++k) {
          values[r].push_back(RandomUniform(0, 1, {n}));
          outs[r].push_back(Empty({n}));
          ThrowIfError(kv.Init(keys[k], values[r][k]));
        }
      });
      const int reps = bytes >= (16 << 20) ? 15 : (bytes >= (1 << 20) ? 20 : 200);
      auto round = [&] {
        c.OnEveryWorker([&](int r, KVStore& kv) {
          for (int k = 0; k < in_flight; ++k) {
            ThrowIfError(kv.PushPull(keys[k], {values[r][k]}, {outs[r][k]}));
          }
          for (const NDArray& o : outs[r]) o.WaitToRead();
        });
      };
      // Each worker's push and pull each move the value once.
      const size_t moved = 2 * bytes * in_flight * c.workers.size();
      const std::vector<double> t = MedianTurns(
          reps, {round, [&] { tcp.Transfer(moved, false); }, [&] { tcp.Transfer(moved, true); }});
      const double rate = moved / t[0], tcp_rate = moved / t[1], memory_rate = moved / t[2];
      Report(name, rate / 1e9, "GB/s", tcp_rate / 1e9, rate / tcp_rate,
             bytes >= (16 << 20) ? ">=0.8" : "info");
      // The same against TCP moving the bytes from and to memory.
      Report(name + "_vs_tcp_from_memory", rate / 1e9, "GB/s", memory_rate / 1e9,
             rate / memory_rate, "info");
    }
  }
}

// Round-trip latency of a small pushpull (dist_sync: every worker's push
// is in the answer).
void Latency(Cluster& c, const std::string& config, int key) {
  if (!Wanted("dist_small_rtt_" + config)) return;
  std::vector<double> lat;
  c.OnEveryWorker([&](int r, KVStore& kv) {
    ThrowIfError(kv.Init(key, Zeros({16})));
    NDArray small = Ones({16}), out = Empty({16});
    for (int i = 0; i < 500; ++i) {
      const double s = NowSeconds();
      ThrowIfError(kv.PushPull(key, {small}, {out}));
      out.WaitToRead();
      if (r == 0) lat.push_back((NowSeconds() - s) * 1e6);
    }
  });
  std::sort(lat.begin(), lat.end());
  Report("dist_small_rtt_p50_" + config, lat[250], "us", 0, 0, "info");
  Report("dist_small_rtt_p99_" + config, lat[495], "us", 0, 0, "info");
}

// One training step's communication for the MLP 784-128-64-10: a
// pushpull of each parameter (weights and biases), all in flight, then
// wait. Every worker does the same (dist_sync).
void MlpStep(Cluster& c, const std::string& config, int* next_key) {
  if (!Wanted("dist_mlp_step_comm_" + config)) return;
  const std::vector<int64_t> sizes = {784 * 128, 128, 128 * 64, 64, 64 * 10, 10};
  std::vector<int> keys;
  for (size_t k = 0; k < sizes.size(); ++k) keys.push_back((*next_key)++);
  std::vector<double> lat;
  c.OnEveryWorker([&](int r, KVStore& kv) {
    std::vector<NDArray> grads, weights;
    for (size_t k = 0; k < sizes.size(); ++k) {
      grads.push_back(Ones({sizes[k]}));
      weights.push_back(Empty({sizes[k]}));
      ThrowIfError(kv.Init(keys[k], Zeros({sizes[k]})));
    }
    for (int i = 0; i < 300; ++i) {
      const double s = NowSeconds();
      // Backward produces the last layer's gradients first.
      for (size_t k = sizes.size(); k-- > 0;) {
        ThrowIfError(kv.PushPull(keys[k], {grads[k]}, {weights[k]}, static_cast<int>(k)));
      }
      // Not WaitAll: the workers share this process's engine, and one
      // would wait for the other's next step, which waits for this one.
      for (const NDArray& w : weights) w.WaitToRead();
      if (r == 0) lat.push_back((NowSeconds() - s) * 1e6);
    }
  });
  std::sort(lat.begin(), lat.end());
  Report("dist_mlp_step_comm_p50_" + config, lat[150], "us", 0, 0, "info");
}

// A server completes the steps of different keys at once: two threads
// push two keys of 4 MiB (2 workers each) into a shard, against one thread
// pushing the same; the server sums, or with `optimizer` sums and applies
// it.
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
  Report(name, bytes / t[0] / 1e9, "GB/s", bytes / t[1] / 1e9, t[1] / t[0], ">=1.3");
}

void Run() {
  ServerSteps("");
  ServerSteps("sgd");
  int next_key = 100;
  for (int nodes : {1, 2}) {
    Cluster c(nodes, nodes);
    const std::string config = std::to_string(nodes) + "servers_" + std::to_string(nodes) + "workers";
    Throughput(c, config, &next_key);
    Latency(c, config, next_key++);
    MlpStep(c, config, &next_key);
  }
}

}  // namespace
}  // namespace mx::bench

int main(int argc, char** argv) {
  if (argc > 1) mx::bench::only = argv[1];
  mx::bench::Run();
  return 0;
}
