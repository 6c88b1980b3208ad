// NDArray operations on gpu(0), each compared with the same operation on the
// same inputs on the CPU (the CPU twins of these tests are in
// ndarray_test.cc and kernel_test.cc). Tolerances: bitwise for data
// movement, Philox's uniform samples and element-wise arithmetic without
// transcendental functions; 2 ulp-scale relative (1e-6) for exp, log, tanh
// and the like, whose GPU and glibc versions may round differently; 1e-5
// relative for reductions (different summation order) and dot (cuBLAS and
// OpenBLAS block differently). Every test is skipped, with the reason, where
// no GPU is usable.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/launch.h"
#include "ndarray/ndarray.h"
#include "ndarray/storage.h"
#include "tests/gpu_skip.h"
#include "tests/ndarray/random_values.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override { MX_SKIP_WITHOUT_GPU(); }

  // An array of random values in [-1, 1) on cpu(0), and its copy on gpu(0).
  static std::pair<NDArray, NDArray> Pair(const Shape& shape, uint32_t seed) {
    NDArray c(shape, cpu());
    c.Assign(RandomValues(shape.Size(), seed));
    return {c, c.Copy(gpu(0))};
  }
};

void ExpectNear(const NDArray& want, const NDArray& got, float rel, const std::string& what) {
  ASSERT_EQ(got.context(), gpu(0)) << what;
  ASSERT_EQ(want.shape(), got.shape()) << what;
  const std::vector<float> w = want.ToVector(), g = got.Copy(cpu()).ToVector();
  for (size_t i = 0; i < w.size(); ++i) {
    if (std::isnan(w[i])) {
      ASSERT_TRUE(std::isnan(g[i])) << what << " at " << i;
      continue;
    }
    const float tol = rel * std::max(1.0f, std::fabs(w[i]));
    ASSERT_NEAR(g[i], w[i], tol) << what << " at " << i;
  }
}

TEST_F(GpuTest, ElementWiseArithmeticMatchesTheCpuBitwise) {
  auto [ac, ag] = Pair({3, 17}, 1);
  auto [bc, bg] = Pair({3, 17}, 2);
  ExpectNear(ac + bc, ag + bg, 0, "add");
  ExpectNear(ac - bc, ag - bg, 0, "subtract");
  ExpectNear(ac * bc, ag * bg, 0, "multiply");
  ExpectNear(ac / bc, ag / bg, 0, "divide");
  ExpectNear(Maximum(ac, bc), Maximum(ag, bg), 0, "maximum");
  ExpectNear(Minimum(ac, bc), Minimum(ag, bg), 0, "minimum");
  ExpectNear(ac * 2.5f, ag * 2.5f, 0, "multiply_scalar");
  ExpectNear(3.0f - ac, 3.0f - ag, 0, "rsubtract_scalar");
  ExpectNear(2.0f / ac, 2.0f / ag, 0, "rdivide_scalar");
  ExpectNear(-ac, -ag, 0, "negative");
  ExpectNear(Maximum(ac, 0.1f), Maximum(ag, 0.1f), 0, "maximum_scalar");
  ExpectNear(Clip(ac, -0.5f, 0.5f), Clip(ag, -0.5f, 0.5f), 0, "clip");
  ExpectNear(Axpby(0.5f, ac, -2.0f, bc), Axpby(0.5f, ag, -2.0f, bg), 0, "Axpby");
  ExpectNear(Square(ac), Square(ag), 0, "square");
  ExpectNear(Abs(ac), Abs(ag), 0, "abs");
  ExpectNear(Sign(ac), Sign(ag), 0, "sign");
  ExpectNear(Relu(ac), Relu(ag), 0, "relu");
}

TEST_F(GpuTest, TranscendentalFunctionsMatchTheCpuWithinRounding) {
  auto [ac, ag] = Pair({1000}, 3);
  NDArray pc = Abs(ac) + 0.01f, pg = Abs(ag) + 0.01f;
  ExpectNear(Exp(ac), Exp(ag), 1e-6f, "exp");
  ExpectNear(Log(pc), Log(pg), 1e-6f, "log");
  ExpectNear(Sqrt(pc), Sqrt(pg), 1e-6f, "sqrt");
  ExpectNear(Sigmoid(ac), Sigmoid(ag), 1e-6f, "sigmoid");
  ExpectNear(Tanh(ac), Tanh(ag), 1e-6f, "tanh");
}

TEST_F(GpuTest, BroadcastingMatchesTheCpu) {
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{4, 5}, {5}}, {{4, 5}, {4, 1}}, {{3, 1, 6}, {1, 4, 1}}, {{1}, {9}}, {{2, 3, 4, 5}, {3, 1, 5}}};
  for (const auto& [sa, sb] : cases) {
    auto [ac, ag] = Pair(sa, 4);
    auto [bc, bg] = Pair(sb, 5);
    const std::string what = sa.ToString() + " op " + sb.ToString();
    ExpectNear(ac + bc, ag + bg, 0, "add " + what);
    ExpectNear(ac / bc, ag / bg, 0, "divide " + what);
    ExpectNear(Minimum(bc, ac), Minimum(bg, ag), 0, "minimum " + what);
  }
}

TEST_F(GpuTest, InPlaceOperationsMatchTheCpu) {
  auto [ac, ag] = Pair({6, 7}, 6);
  auto [bc, bg] = Pair({7}, 7);
  ac += bc;
  ag += bg;
  ac *= 3.0f;
  ag *= 3.0f;
  ac -= ac.Slice(0, 1);  // an overlapping view is read from a copy
  ag -= ag.Slice(0, 1);
  ExpectNear(ac, ag, 0, "in-place chain");
  NDArray z = Zeros({5, 5}, gpu(0));
  z.Assign(2.5f);
  EXPECT_THAT(z.ToVector(), ::testing::Each(2.5f));
}

TEST_F(GpuTest, ReductionsMatchTheCpu) {
  auto [ac, ag] = Pair({7, 300, 5}, 8);
  ExpectNear(Sum(ac), Sum(ag), 1e-5f, "sum");
  ExpectNear(Mean(ac), Mean(ag), 1e-5f, "mean");
  ExpectNear(Max(ac), Max(ag), 0, "max");
  ExpectNear(Min(ac), Min(ag), 0, "min");
  ExpectNear(Norm(ac), Norm(ag), 1e-5f, "norm");
  for (int axis : {0, 1, 2, -1}) {
    const std::string what = " over axis " + std::to_string(axis);
    ExpectNear(Sum(ac, axis), Sum(ag, axis), 1e-5f, "sum" + what);
    ExpectNear(Mean(ac, axis, true), Mean(ag, axis, true), 1e-5f, "mean" + what);
    ExpectNear(Max(ac, axis), Max(ag, axis), 0, "max" + what);
    ExpectNear(Norm(ac, axis), Norm(ag, axis), 1e-5f, "norm" + what);
  }
  auto [big_c, big_g] = Pair({1 << 20}, 9);
  ExpectNear(Sum(big_c), Sum(big_g), 1e-5f, "sum of 2^20");
}

TEST_F(GpuTest, DotThroughCublasMatchesTheCpuForEveryTranspose) {
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      auto [ac, ag] = Pair(ta ? Shape{33, 17} : Shape{17, 33}, 10);
      auto [bc, bg] = Pair(tb ? Shape{9, 33} : Shape{33, 9}, 11);
      ExpectNear(Dot(ac, bc, ta, tb), Dot(ag, bg, ta, tb), 1e-5f,
                 "dot ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
    }
  }
  auto [ec, eg] = Pair({4, 0}, 12);
  auto [fc, fg] = Pair({0, 3}, 13);
  ExpectNear(Dot(ec, fc), Dot(eg, fg), 0, "dot with k = 0");
}

TEST_F(GpuTest, SrandGivesTheSameRandomNumbersOnCpuAndGpu) {
  srand(42);
  NDArray uc = RandomUniform(-1, 1, {1000}, cpu());
  NDArray nc = RandomNormal(0, 2, {1000}, cpu());
  srand(42);
  NDArray ug = RandomUniform(-1, 1, {1000}, gpu(0));
  NDArray ng = RandomNormal(0, 2, {1000}, gpu(0));
  ExpectNear(uc, ug, 0, "uniform");
  ExpectNear(nc, ng, 1e-5f, "normal");
}

// GPU work, a copy to `host`, host work there and a copy back, 50 times
// with no waits in between: the engine must order the streams' work and
// copies against the host's. Both arrays end as the same chain computed on
// the CPU (x -> 2 (x + 1) from 0).
void ExpectChainThroughHostInEngineOrder(Context host) {
  NDArray g = Zeros({1 << 16}, gpu(0));
  NDArray c = Zeros({1 << 16}, host);
  NDArray h = Zeros({1 << 16}, cpu());
  for (int i = 0; i < 50; ++i) {
    g += 1.0f;
    c.Assign(g);
    c *= 2.0f;
    g.Assign(c);
    h += 1.0f;
    h *= 2.0f;
  }
  ExpectNear(h, g, 0, "chain");
  EXPECT_EQ(c.ToVector(), h.ToVector()) << "chain's copy on " << host.ToString();
}

TEST_F(GpuTest, LongChainsAcrossDevicesRunInEngineOrder) {
  ExpectChainThroughHostInEngineOrder(cpu());
}

// The same chain through page-locked host memory, whose copies run on the
// GPU's copy streams asynchronously.
TEST_F(GpuTest, ChainsThroughPinnedHostMemoryRunInEngineOrder) {
  ExpectChainThroughHostInEngineOrder(cpu_pinned());
}

// Many independent round trips at once: host -> GPU on the copy-in stream,
// work on the compute stream, GPU -> host on the copy-out stream, all in
// flight together with no waits; each array gets its own values back.
TEST_F(GpuTest, IndependentCopiesInBothDirectionsOverlapAndKeepTheirValues) {
  constexpr int kArrays = 16;
  std::vector<NDArray> in, on_gpu, out;
  for (int i = 0; i < kArrays; ++i) {
    std::vector<float> values(1 << 18);
    for (size_t j = 0; j < values.size(); ++j) values[j] = static_cast<float>(i * 1000 + j % 997);
    in.push_back(FromVector(values).Copy(cpu_pinned()));
    on_gpu.push_back(Empty(in.back().shape(), gpu(0)));
    out.push_back(Empty(in.back().shape(), i % 2 == 0 ? cpu_pinned() : cpu()));
  }
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < kArrays; ++i) {
      on_gpu[i].Assign(in[i]);
      on_gpu[i] *= 3.0f;
      out[i].Assign(on_gpu[i]);
      in[i].Assign(out[i]);
    }
  }
  for (int i = 0; i < kArrays; ++i) {
    std::vector<float> got = out[i].ToVector();
    ASSERT_EQ(got.size(), size_t{1} << 18);
    for (size_t j = 0; j < got.size(); j += 4099) {
      ASSERT_EQ(got[j], 27.0f * static_cast<float>(i * 1000 + j % 997)) << i << " at " << j;
    }
  }
}

// Assign between overlapping slices of one array moves the values as
// through a temporary, as the CPU's memmove does (its twin is in
// ndarray_test.cc), both ways and for a large array.
TEST_F(GpuTest, AssignBetweenOverlappingSlicesMatchesTheCpu) {
  const int64_t n = 1 << 20;
  auto [c, g] = Pair({n}, 23);
  for (NDArray* a : {&c, &g}) {
    a->Slice(0, n - 7).Assign(a->Slice(7, n));
    a->Slice(5, n).Assign(a->Slice(0, n - 5));
  }
  ExpectNear(c, g, 0, "overlapping slices");
}

// Copies between two GPUs (directly where they reach each other's memory,
// through the host otherwise), both ways and back-to-back with work on
// each: the values arrive whole and in engine order.
TEST_F(GpuTest, CopiesBetweenTwoGpusKeepTheValuesInEngineOrder) {
  if (NumGpus() < 2) GTEST_SKIP() << "needs 2 GPUs; this machine has " << NumGpus();
  std::vector<float> values(1 << 20);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i);
  const NDArray c = FromVector(values);
  NDArray a = c.Copy(gpu(0)), b = Empty(c.shape(), gpu(1));
  for (int i = 0; i < 10; ++i) {
    b.Assign(a);
    b += 1.0f;
    a.Assign(b);
  }
  ExpectNear(c + 10.0f, a, 0, "gpu(0) -> gpu(1) -> gpu(0), 10 times");
  EXPECT_EQ(b.ToVector(), (c + 10.0f).ToVector()) << "on gpu(1)";
}

// The NCCL layer (kernel::PushCollectives) on the GPUs present; one is
// enough to load NCCL, make a communicator, run a group and complete it
// through the engine. A reduce of every GPU's array onto gpu(0), then a
// broadcast of the sum back to each (small integers: exact sums).
TEST_F(GpuTest, NcclReducesAndBroadcastsThroughTheEngine) {
  const int ranks = std::min(NumGpus(), 8);
  const int64_t n = 1 << 16;
  std::vector<float> base(n);
  for (int64_t i = 0; i < n; ++i) base[i] = static_cast<float>(i % 100);
  std::vector<int> devices;
  std::vector<NDArray> sends, recvs;
  kernel::GpuCollective reduce, broadcast;
  std::vector<VarHandle> send_vars, recv_vars;
  for (int d = 0; d < ranks; ++d) {
    devices.push_back(d);
    sends.push_back((FromVector(base) * static_cast<float>(d + 1)).Copy(gpu(d)));
    recvs.push_back(Empty({n}, gpu(d)));
    reduce.sends.push_back(sends.back().data());
    broadcast.recvs.push_back(recvs.back().data());
    send_vars.push_back(sends.back().var());
    recv_vars.push_back(recvs.back().var());
  }
  NDArray sum = Empty({n}, gpu(0));
  reduce.kind = kernel::GpuCollective::kReduceSum;
  reduce.n = n;
  reduce.recv = sum.data();
  broadcast.kind = kernel::GpuCollective::kBroadcast;
  broadcast.n = n;
  broadcast.send = sum.data();
  kernel::PushCollectives("test_nccl_reduce", gpu(0), devices, {reduce}, send_vars, {sum.var()});
  kernel::PushCollectives("test_nccl_broadcast", gpu(0), devices, {broadcast}, {sum.var()},
                          recv_vars);
  const NDArray want = FromVector(base) * static_cast<float>(ranks * (ranks + 1) / 2);
  for (int d = 0; d < ranks; ++d) {
    EXPECT_EQ(recvs[d].ToVector(), want.ToVector()) << "on gpu(" << d << ")";
  }
}

// Where no GPU is usable, a collective fails as an error stored on what it
// writes, named after the operation: no crash, no hang. (A build without
// CUDA says so; a CUDA build fails in NCCL or the runtime.)
TEST(GpuCollectives, AFailureIsAnErrorOnTheWritesNamingTheOperation) {
  if (NumGpus() > 0) GTEST_SKIP() << "checks the failure where no GPU is usable";
  NDArray out = Zeros({4});  // a host array standing in for the written one
  kernel::GpuCollective reduce;
  reduce.n = 4;
  reduce.sends = {out.data()};
  reduce.recv = out.data();
  // Twice: the second finds the device set's failure remembered.
  std::string first;
  for (int attempt = 0; attempt < 2; ++attempt) {
    kernel::PushCollectives("test_collective", cpu(), {0}, {reduce}, {}, {out.var()});
    try {
      out.WaitToRead();
      FAIL() << "a collective without a GPU succeeded";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("test_collective: "));
      if (attempt == 0) first = e.what();
      EXPECT_EQ(e.what(), first);
    }
  }
  std::printf("the collective's error: %s\n", first.c_str());
}

// Calls whose buffers do not fit the device set are refused before NCCL
// is loaded, each saying what it lacks (no GPU needed).
TEST(GpuCollectives, MalformedCallsAreRefusedSayingWhatTheyLack) {
  if (!BuiltWithCuda()) GTEST_SKIP() << "a build without CUDA refuses every collective alike";
  float buffer[4] = {};
  kernel::GpuCollective reduce, broadcast, all_reduce;
  reduce.n = broadcast.n = all_reduce.n = 4;
  reduce.sends = {buffer, buffer};  // no recv
  broadcast.recvs = {buffer};       // one recv for two devices, no send
  broadcast.kind = kernel::GpuCollective::kBroadcast;
  all_reduce.kind = kernel::GpuCollective::kAllReduceSum;
  all_reduce.sends = {buffer, buffer};
  all_reduce.recvs = {buffer};  // one recv for two devices
  const std::pair<kernel::GpuCollective, const char*> cases[] = {
      {reduce, "one send per device and a recv"},
      {broadcast, "a send and one recv per device"},
      {all_reduce, "one send and one recv per device"}};
  for (const auto& [call, lack] : cases) {
    const char* error = kernel::GpuCollectives({0, 1}, {call});
    ASSERT_NE(error, nullptr) << lack;
    EXPECT_THAT(error, HasSubstr(std::string("malformed collective: ") + lack));
  }
}

TEST_F(GpuTest, MixingContextsIsRefusedNamingBoth) {
  NDArray a = Ones({2}, cpu());
  NDArray b = Ones({2}, gpu(0));
  try {
    a + b;
    FAIL() << "added cpu(0) and gpu(0) arrays";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("cpu(0)"));
    EXPECT_THAT(e.what(), HasSubstr("gpu(0)"));
  }
}

TEST_F(GpuTest, AMissingDeviceIsRefusedSayingHowManyThereAre) {
  const int n = NumGpus();
  try {
    Zeros({2}, gpu(n));
    FAIL() << "created an array on gpu(" << n << ")";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("gpu(" + std::to_string(n) + ")"));
    EXPECT_THAT(e.what(), HasSubstr(std::to_string(n) + " usable GPU"));
  }
}

TEST_F(GpuTest, ExhaustedMemorySaysHowMuchWasAskedAndHowMuchIsFree) {
  try {
    Empty({int64_t{1} << 40}, gpu(0));  // 4 TiB
    FAIL() << "allocated 4 TiB on gpu(0)";
  } catch (const Error& e) {
    EXPECT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted) << e.what();
    EXPECT_THAT(e.what(), HasSubstr("gpu(0)"));
    EXPECT_THAT(e.what(), HasSubstr(std::to_string(int64_t{4} << 40)));
    EXPECT_THAT(e.what(), HasSubstr("bytes free"));
  }
  // The device keeps working.
  NDArray a = Ones({4}, gpu(0));
  EXPECT_THAT((a + a).ToVector(), ::testing::Each(2.0f));
}

// Writes through an unmapped address in an operation that writes `a`
// (which the fault is then stored on): a sticky CUDA fault.
void FaultGpu0(const NDArray& a) {
  a.WaitToRead();
  float* unmapped = reinterpret_cast<float*>(uintptr_t{64});
  kernel::Push("bad_fill", gpu(0), {}, {a.var()}, [unmapped] {
    kernel::Launch<kernel::FillKernel>("bad_fill", gpu(0), 1 << 20, {unmapped, 1.0f});
  });
}

// A kernel that fails on the device stores its error on the arrays its
// operation writes; waiting on them throws it, naming the operation and the
// GPU. CUDA's error is sticky (the process's GPU context is lost), so this
// runs in a child process started afresh.
TEST_F(GpuTest, AFailedKernelIsAnErrorNamingTheOperationAndTheGpu) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        NDArray a = Zeros({16}, gpu(0));
        FaultGpu0(a);
        try {
          a.WaitToRead();
        } catch (const Error& e) {
          std::fprintf(stderr, "%s\n", e.what());
          std::_Exit(3);
        }
        std::_Exit(0);
      },
      // The fault shows at the stream's next event: the one after the kernel
      // ("GPU work") or, if it is already known, the recording of it.
      ::testing::ExitedWithCode(3), "bad_fill: (GPU work|cudaEventRecord) on gpu\\(0\\)");
}

// After such a fault an allocation fails for the fault, not for memory:
// it said "out of memory" (and released the pool first), sending users to
// look for a memory problem.
TEST_F(GpuTest, AnAllocationAfterAFaultSaysSoNotOutOfMemory) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        NDArray a = Zeros({16}, gpu(0));
        FaultGpu0(a);
        try {
          a.WaitToRead();
        } catch (const Error&) {
        }
        absl::StatusOr<StorageHandle> h = Storage::Get()->Alloc(1 << 20, gpu(0));
        std::fprintf(stderr, "code %d: %s\n", static_cast<int>(h.status().code()),
                     std::string(h.status().message()).c_str());
        std::_Exit(h.ok() || absl::IsResourceExhausted(h.status()) ? 1 : 3);
      },
      ::testing::ExitedWithCode(3), "allocating 1048576 bytes on gpu\\(0\\)");
}

}  // namespace
}  // namespace mx
