// The distributed KVStore through shared memory (DistKVStoreOptions::
// shm_dir): the same bits as over the network, values that really skip it,
// nothing left in the directory, and bad references refused.
#include <dirent.h>
#include <stdlib.h>

#include <grpcpp/grpcpp.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/dist_kvstore.h"
#include "ndarray/ndarray.h"
#include "proto/mx.grpc.pb.h"
#include "rpc/metrics.h"
#include "rpc/shared_memory.h"
#include "server/kvstore_service.h"
#include "tests/proto/raw_call.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

std::string TempDir() {
  std::string dir = std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") + "/shmXXXXXX";
  EXPECT_NE(mkdtemp(dir.data()), nullptr);
  return dir;
}

int FilesIn(const std::string& dir) {
  int n = 0;
  DIR* d = opendir(dir.c_str());
  while (dirent* e = d ? readdir(d) : nullptr) n += e->d_name[0] != '.';
  if (d) closedir(d);
  return n;
}

// The servers' count of value bytes that went through shared memory.
double ShmBytes() {
  const std::string text = metrics::Registry::Global().Text();
  const std::string name = "\nmx_server_shm_bytes_total ";
  const size_t at = text.find(name);
  if (at == std::string::npos) return 0;
  double v = 0;
  const size_t end = text.find('\n', at + 1);
  EXPECT_TRUE(absl::SimpleAtod(text.substr(at + name.size(), end - at - name.size()), &v));
  return v;
}

struct Job {
  explicit Job(const std::string& server_shm_dir, int workers = 2) {
    for (int i = 0; i < 2; ++i) {
      ParameterServerOptions po;
      po.shm_dir = server_shm_dir;
      auto s = ParameterServer::Start("127.0.0.1:0", {true, workers, false}, po);
      EXPECT_TRUE(s.ok()) << s.status();
      addresses.push_back((*s)->address());
      servers.push_back(*std::move(s));
    }
  }
  std::unique_ptr<KVStore> Worker(int rank, const std::string& shm_dir) const {
    DistKVStoreOptions o;
    o.servers = addresses;
    o.rank = rank;
    o.num_workers = 2;
    o.rpc_timeout = absl::Seconds(5);
    o.shm_dir = shm_dir;
    o.shm_bytes = 4 << 20;
    auto kv = CreateDistKVStore(o);
    EXPECT_TRUE(kv.ok()) << kv.status();
    return *std::move(kv);
  }
  std::vector<std::unique_ptr<ParameterServer>> servers;
  std::vector<std::string> addresses;
};

// Gradient of `rank` at `step`: values whose float sum depends on the
// order of addition.
std::vector<float> Grad(int rank, int step, int64_t n) {
  std::vector<float> g(n);
  for (int64_t i = 0; i < n; ++i) g[i] = (rank == 0 ? 1e7f : 0.3f) * (1 + (i + step) % 5) - rank;
  return g;
}

// Two workers: Push then Pull, PushPull, and a bucket, of a small key (by
// the network whatever the setting), a key cut in two slices of 80 KB, and
// one of 2 MB, with SGD on the servers. Returns what worker 0 pulled.
std::vector<std::vector<float>> Train(const Job& job, const std::string& shm_dir) {
  const std::vector<int64_t> sizes = {3, 40000, 500000};
  std::vector<std::vector<float>> got;
  std::vector<std::thread> workers;
  for (int r = 0; r < 2; ++r) {
    workers.emplace_back([&, r] {
      auto kv = job.Worker(r, shm_dir);
      auto sgd = Optimizer::Create("sgd", {{"learning_rate", "0.5"}, {"momentum", "0.9"}});
      ASSERT_TRUE(kv->SetOptimizer(*std::move(sgd)).ok());
      std::vector<NDArray> outs;
      for (size_t k = 0; k < sizes.size(); ++k) {
        ASSERT_TRUE(kv->Init(static_cast<int>(k), Ones({sizes[k]})).ok());
        outs.push_back(Empty({sizes[k]}));
      }
      for (int step = 0; step < 3; ++step) {
        for (size_t k = 0; k < sizes.size(); ++k) {
          const NDArray g = FromVector(Grad(r, step, sizes[k]));
          const int key = static_cast<int>(k);
          if (step == 0) {
            ASSERT_TRUE(kv->Push(key, g).ok());
            ASSERT_TRUE(kv->Pull(key, &outs[k]).ok());
          } else if (step == 1) {
            ASSERT_TRUE(kv->PushPull(key, {g}, {outs[k]}).ok());
          }
        }
        if (step == 2) {
          std::vector<std::vector<NDArray>> values, out;
          for (size_t k = 0; k < sizes.size(); ++k) {
            values.push_back({FromVector(Grad(r, step, sizes[k]))});
            out.push_back({outs[k]});
          }
          ASSERT_TRUE(kv->PushPull({0, 1, 2}, values, out).ok());
        }
      }
      if (r == 0) {
        for (const NDArray& o : outs) got.push_back(o.ToVector());
      }
    });
  }
  for (auto& t : workers) t.join();
  return got;
}

TEST(SharedMemory, ValuesSkipTheNetworkWithTheSameBitsAndLeaveNoFile) {
  const std::string dir = TempDir();
  const std::vector<std::vector<float>> network = Train(Job(""), "");
  Job job(dir);
  const double before = ShmBytes();
  const std::vector<std::vector<float>> shared = Train(job, dir);
  ASSERT_EQ(shared.size(), network.size());
  for (size_t k = 0; k < shared.size(); ++k) {
    ASSERT_EQ(shared[k].size(), network[k].size());
    EXPECT_EQ(0, std::memcmp(shared[k].data(), network[k].data(), shared[k].size() * 4)) << k;
  }
  // Every push and answer of the two big keys went through it: 2 workers
  // x 3 steps x (push + answer) x 540000 floats.
  EXPECT_EQ(ShmBytes() - before, 2 * 3 * 2 * 540000 * 4.0);
  EXPECT_EQ(FilesIn(dir), 0);  // unlinked once attached
  // Each server maps one segment per worker until it hears the worker is
  // gone.
  EXPECT_EQ(job.servers[0]->shm_segments(), 2u);
  job.servers[0]->WorkerDied(1);
  job.servers[0]->WorkerLeft(0);
  EXPECT_EQ(job.servers[0]->shm_segments(), 0u);
}

// A server that takes no shared memory (no --shm_dir, or on another host)
// gets values over the network as before.
TEST(SharedMemory, AServerWithoutItGetsValuesOverTheNetwork) {
  const std::string dir = TempDir();
  const std::vector<std::vector<float>> network = Train(Job(""), "");
  Job job("");
  const double before = ShmBytes();
  EXPECT_EQ(Train(job, dir), network);
  EXPECT_EQ(ShmBytes(), before);
  EXPECT_EQ(job.servers[0]->shm_segments(), 0u);
  EXPECT_EQ(FilesIn(dir), 0);
}

// References to memory the caller did not attach, or outside it, are
// refused naming what is wrong; the server goes on serving.
TEST(SharedMemory, BadReferencesAreRefused) {
  const std::string dir = TempDir();
  Job job(dir, 1);
  auto stub = proto::KVStoreService::NewStub(
      grpc::CreateChannel(job.addresses[0], grpc::InsecureChannelCredentials()));
  auto attach = [&](const std::string& name, int64_t bytes) {
    proto::AttachSegmentRequest req;
    req.set_name(name);
    req.set_segment(1);
    req.set_bytes(bytes);
    proto::AttachSegmentResponse resp;
    grpc::ClientContext ctx;
    return stub->AttachSegment(&ctx, req, &resp);
  };
  EXPECT_THAT(attach("../etc", 4096).error_message(), HasSubstr("not a plain file name"));
  EXPECT_THAT(attach("none", 4096).error_message(), HasSubstr("cannot open shared memory"));
  auto seg = rpc::SharedSegment::Create(dir, "seg", 4096);
  ASSERT_TRUE(seg.ok());
  EXPECT_THAT(attach("seg", 1 << 20).error_message(), HasSubstr("holds 4096 bytes, not the"));
  ASSERT_TRUE(attach("seg", 4096).ok());
  proto::Tensor value;
  value.add_shape(4);
  value.set_dtype(proto::FLOAT32);
  auto init = [&] {
    proto::InitRequest req;
    req.set_key(3);
    *req.mutable_value() = value;
    req.mutable_value()->set_data(std::string(16, '\0'));
    proto::InitResponse resp;
    grpc::ClientContext ctx;
    return stub->Init(&ctx, req, &resp);
  };
  ASSERT_TRUE(init().ok());
  auto push = [&](int segment, int64_t offset, int64_t bytes) {
    proto::PushRequest req;
    req.set_key(3);
    *req.mutable_value() = value;
    req.mutable_shm_value()->set_segment(segment);
    req.mutable_shm_value()->set_offset(offset);
    req.mutable_shm_value()->set_bytes(bytes);
    std::string resp;
    return testing::RawCall(grpc::CreateChannel(job.addresses[0], grpc::InsecureChannelCredentials()),
                            "/mx.proto.KVStoreService/Push", req.SerializeAsString(), &resp);
  };
  EXPECT_THAT(push(7, 0, 16).error_message(), HasSubstr("worker 0 attached no shared memory segment 7"));
  EXPECT_THAT(push(1, 4090, 16).error_message(), HasSubstr("lie outside the shared memory segment"));
  EXPECT_THAT(push(1, -16, 16).error_message(), HasSubstr("negative"));
  EXPECT_THAT(push(1, 0, 12).error_message(), HasSubstr("push of key 3"));  // 3 floats for 4
  // A good one is applied: the server reads the floats where they lie.
  const float four[] = {1, 2, 3, 4};
  std::memcpy((*seg)->data() + 64, four, sizeof(four));
  ASSERT_TRUE(push(1, 64, 16).ok());
  auto v = job.servers[0]->shard().Pull(3, 1, absl::Now() + absl::Seconds(2));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->data.ToFloats(), std::vector<float>({1, 2, 3, 4}));
}

}  // namespace
}  // namespace mx
