// Distributed KVStore transport: push+pull throughput of one worker against
// parameter servers on 127.0.0.1 (in this process), one request at a time
// and 8 keys in flight, for 4 KiB, 1 MiB and 16 MiB values, against loopback
// TCP bandwidth measured in the same run by a plain socket sender and
// receiver; and the round-trip latency of a small push+pull (p50, p99).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "kvstore/dist_kvstore.h"
#include "server/kvstore_service.h"

namespace mx::bench {
namespace {

// Bytes per second over a loopback TCP connection, 256 MiB in 1 MiB writes.
double LoopbackTcp() {
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  listen(listener, 1);
  constexpr size_t kChunk = 1 << 20, kTotal = 256u << 20;
  std::thread receiver([listener] {
    int c = accept(listener, nullptr, nullptr);
    std::vector<char> buf(kChunk);
    size_t got = 0;
    while (got < kTotal) {
      ssize_t n = read(c, buf.data(), buf.size());
      if (n <= 0) break;
      got += n;
    }
    close(c);
  });
  int s = socket(AF_INET, SOCK_STREAM, 0);
  connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  std::vector<char> buf(kChunk, 1);
  const double start = NowSeconds();
  for (size_t sent = 0; sent < kTotal;) {
    ssize_t n = write(s, buf.data(), buf.size());
    if (n <= 0) break;
    sent += n;
  }
  close(s);
  receiver.join();
  const double seconds = NowSeconds() - start;
  close(listener);
  return kTotal / seconds;
}

void Run() {
  const double tcp = LoopbackTcp();
  std::vector<std::unique_ptr<ParameterServer>> servers;
  DistKVStoreOptions o;
  for (int i = 0; i < 2; ++i) {
    auto s = ParameterServer::Start("127.0.0.1:0", {true, 1, false});
    ThrowIfError(s.status());
    o.servers.push_back((*s)->address());
    servers.push_back(*std::move(s));
  }
  for (int num_servers : {1, 2}) {
    DistKVStoreOptions opts = o;
    opts.servers.resize(num_servers);
    opts.big_key_bound = 1 << 20;  // 4 MiB: the 16 MiB value is split
    auto kv = CreateDistKVStore(opts);
    ThrowIfError(kv.status());
    int next_key = num_servers * 100;
    for (int64_t bytes : {int64_t{4} << 10, int64_t{1} << 20, int64_t{16} << 20}) {
      const int64_t n = bytes / 4;
      for (int in_flight : {1, 8}) {
        std::vector<int> keys;
        std::vector<NDArray> values, outs;
        for (int k = 0; k < in_flight; ++k) {
          keys.push_back(next_key++);
          values.push_back(RandomUniform(0, 1, {n}));
          outs.push_back(Empty({n}));
          ThrowIfError((*kv)->Init(keys.back(), values.back()));
        }
        const int reps = bytes >= (16 << 20) ? 5 : (bytes >= (1 << 20) ? 20 : 200);
        auto round = [&] {
          for (int k = 0; k < in_flight; ++k) {
            ThrowIfError((*kv)->Push(keys[k], values[k]));
            ThrowIfError((*kv)->Pull(keys[k], &outs[k]));
          }
          WaitAll();
        };
        double t = MedianSeconds(reps, round);
        // A push and a pull each move the value once.
        const double rate = 2.0 * bytes * in_flight / t;
        Report("dist_pushpull_" + std::to_string(bytes >> 10) + "KiB_x" + std::to_string(in_flight) +
                   "_servers" + std::to_string(num_servers),
               rate / 1e9, "GB/s", tcp / 1e9, rate / tcp,
               bytes >= (16 << 20) ? ">=0.8" : "info");
      }
    }
    // Small round trips: latency distribution.
    ThrowIfError((*kv)->Init(7, Zeros({16})));
    NDArray small = Ones({16}), out = Empty({16});
    std::vector<double> lat;
    for (int i = 0; i < 500; ++i) {
      const double s = NowSeconds();
      ThrowIfError((*kv)->Push(7, small));
      ThrowIfError((*kv)->Pull(7, &out));
      out.WaitToRead();
      lat.push_back((NowSeconds() - s) * 1e6);
    }
    std::sort(lat.begin(), lat.end());
    Report("dist_small_rtt_p50_servers" + std::to_string(num_servers), lat[250], "us", 0, 0, "info");
    Report("dist_small_rtt_p99_servers" + std::to_string(num_servers), lat[495], "us", 0, 0, "info");
  }
}

}  // namespace
}  // namespace mx::bench

int main() {
  mx::bench::Run();
  return 0;
}
