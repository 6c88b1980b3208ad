// The CPU pool (ParallelFor) and the matrix product on it (Sgemm).
#include "ndarray/parallel.h"

#include <omp.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/base.h"
#include "tests/ndarray/random_values.h"

namespace mx {
namespace {

TEST(ParallelFor, RunsEveryTaskOnceWithSlotsInRange) {
  constexpr int kTasks = 1000;
  std::vector<std::atomic<int>> runs(kTasks);
  std::vector<std::atomic<int>> in_use(CpuThreads());
  std::atomic<bool> shared_slot{false};
  ParallelFor(kTasks, [&](int64_t task, int slot) {
    ASSERT_GE(slot, 0);
    ASSERT_LT(slot, CpuThreads());
    if (in_use[slot].fetch_add(1) != 0) shared_slot = true;
    runs[task].fetch_add(1);
    in_use[slot].fetch_sub(1);
  });
  for (int i = 0; i < kTasks; ++i) EXPECT_EQ(runs[i].load(), 1) << "task " << i;
  EXPECT_FALSE(shared_slot) << "two running tasks had the same slot";
}

TEST(ParallelFor, NestedCallsRunSeriallyOnTheirThread) {
  std::atomic<int> inner{0};
  ParallelFor(4, [&](int64_t, int) {
    const std::thread::id me = std::this_thread::get_id();
    ParallelFor(8, [&](int64_t, int slot) {
      EXPECT_EQ(slot, 0);
      EXPECT_EQ(std::this_thread::get_id(), me);
      ++inner;
    });
  });
  EXPECT_EQ(inner.load(), 32);
}

TEST(ParallelFor, CallsFromSeveralThreadsAllComplete) {
  std::vector<std::thread> threads;
  std::atomic<int64_t> sum{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int rep = 0; rep < 200; ++rep) {
        ParallelFor(16, [&](int64_t task, int) { sum += task; });
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(sum.load(), 4 * 200 * (15 * 16 / 2));
}

TEST(ParallelFor, ZeroTasksDoNothing) {
  ParallelFor(0, [](int64_t, int) { FAIL() << "ran a task"; });
}

TEST(ParallelRanges, CoverEveryIndexOnceInRangesOfAtLeastTheMinimum) {
  constexpr int64_t kMin = 100;
  for (const int64_t n : {1, 99, 199, 200, 301, 1000, 1099, 100003}) {
    SCOPED_TRACE(n);
    std::vector<std::atomic<int>> hits(n);
    std::atomic<int> ranges{0};
    ParallelRanges(n, kMin, [&](int64_t begin, int64_t end) {
      ASSERT_LE(0, begin);
      ASSERT_LT(begin, end);
      ASSERT_LE(end, n);
      if (n >= kMin) EXPECT_GE(end - begin, kMin) << "[" << begin << ", " << end << ")";
      ++ranges;
      for (int64_t i = begin; i < end; ++i) hits[i].fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i;
    EXPECT_LE(ranges.load(), std::max<int64_t>(1, std::min<int64_t>(n / kMin, 4 * CpuThreads())));
    if (n < 2 * kMin) {
      EXPECT_EQ(ranges.load(), 1);
    }
    // More ranges than threads come in a multiple of them (3 on 2 threads
    // would end as late as 2, after one thread has run two).
    if (ranges.load() > CpuThreads()) {
      EXPECT_EQ(ranges.load() % CpuThreads(), 0);
    }
  }
}

TEST(ParallelRanges, NothingToDoRunsNothing) {
  ParallelRanges(0, 10, [](int64_t, int64_t) { FAIL() << "ran a range"; });
}

// C = alpha * op(A) op(B) + beta * C in double, row-major, packed.
std::vector<double> Reference(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                              const std::vector<float>& a, const std::vector<float>& b,
                              float beta, const std::vector<float>& c) {
  std::vector<double> out(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        s += static_cast<double>(ta ? a[p * m + i] : a[i * k + p]) *
             (tb ? b[j * k + p] : b[p * n + j]);
      }
      out[i * n + j] = alpha * s + beta * c[i * n + j];
    }
  }
  return out;
}

struct GemmCase {
  int64_t m, n, k;
};

// Shapes below and above the parallel threshold, split along n (n >= m) or m,
// with sizes that do not divide evenly.
// {4, 6, 0}: an empty sum (a FullyConnected's weight gradient over an
// empty batch) leaves beta * C, zeros for beta 0.
const GemmCase kCases[] = {{3, 5, 7},      {100, 128, 784}, {128, 784, 100}, {500, 64, 20},
                           {101, 37, 300}, {37, 301, 150},  {4, 6, 0}};

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");  // Bazel's, else /tmp
  return dir != nullptr ? dir : "/tmp";
}

// A fake cgroup filesystem under the test's temporary directory.
class CgroupTree {
 public:
  CgroupTree() : root_(TempDir() + "/cgroup" + std::to_string(next_++)) {}
  const std::string& root() const { return root_; }
  // Writes `text` to root/path, creating its directories.
  void Write(const std::string& path, const std::string& text) {
    ::mkdir(root_.c_str(), 0755);
    for (size_t at = 1; (at = path.find('/', at)) != std::string::npos; ++at) {
      ::mkdir((root_ + path.substr(0, at)).c_str(), 0755);
    }
    std::ofstream(root_ + path) << text;
  }

 private:
  static inline int next_ = 0;
  std::string root_;
};

TEST(UsableCores, CgroupV2QuotaIsTheSmallestAlongThePath) {
  CgroupTree t;
  t.Write("/cpu.max", "max 100000\n");
  t.Write("/kubepods/cpu.max", "400000 100000\n");        // 4 cores for every pod
  t.Write("/kubepods/pod1/cpu.max", "150000 100000\n");   // 1.5 for this one
  t.Write("/kubepods/pod1/c1/cpu.max", "max 100000\n");
  EXPECT_DOUBLE_EQ(internal::CgroupCpuLimit("0::/kubepods/pod1/c1\n", t.root()), 1.5);
  EXPECT_DOUBLE_EQ(internal::CgroupCpuLimit("0::/kubepods/pod2\n", t.root()), 4);
  EXPECT_DOUBLE_EQ(internal::CgroupCpuLimit("0::/\n", t.root()), 0);  // no limit
}

TEST(UsableCores, CgroupV1QuotaOfTheCpuController) {
  CgroupTree t;
  t.Write("/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
  t.Write("/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  t.Write("/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "250000\n");
  t.Write("/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  t.Write("/memory/docker/abc/cpu.cfs_quota_us", "100000\n");  // not the cpu controller
  const std::string cgroup = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n";
  EXPECT_DOUBLE_EQ(internal::CgroupCpuLimit(cgroup, t.root()), 2.5);
  EXPECT_DOUBLE_EQ(internal::CgroupCpuLimit("4:cpu,cpuacct:/\n", t.root()), 0);
  EXPECT_DOUBLE_EQ(internal::CgroupCpuLimit("garbage\n\n1:cpu:\n", t.root()), 0);
}

TEST(UsableCores, AtLeastOneAndAtMostTheMachines) {
  EXPECT_GE(UsableCores(), 1);
  EXPECT_LE(UsableCores(), static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

// A task's exception reaches the caller (it would end the process on a
// helper thread), and the pool keeps working.
TEST(ParallelFor, RethrowsATasksExceptionToTheCaller) {
  for (int64_t tasks : {1, 64}) {
    try {
      ParallelFor(tasks, [](int64_t task, int) {
        throw Error(absl::ResourceExhaustedError(absl::StrCat("task ", task, " failed")));
      });
      FAIL() << "no exception from " << tasks << " failing tasks";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), absl::StatusCode::kResourceExhausted);
      EXPECT_THAT(e.what(), ::testing::HasSubstr("failed"));
    }
    // Every task of the next call runs once, helpers taking part (a pool
    // left holding the failed call would run it all on the caller). A task
    // waits up to 2 s for a helper to join: under CI's load one started
    // after the caller had run all 200 short tasks itself (a false failure).
    std::vector<std::atomic<int>> runs(200);
    std::atomic<bool> helped{false};
    const auto start = std::chrono::steady_clock::now();
    const bool helpers = CpuThreads() > 1;
    ParallelFor(runs.size(), [&](int64_t task, int slot) {
      runs[task].fetch_add(1);
      if (slot > 0) helped = true;
      while (helpers && !helped &&
             std::chrono::steady_clock::now() - start < std::chrono::seconds(2)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
    for (size_t i = 0; i < runs.size(); ++i) ASSERT_EQ(runs[i].load(), 1) << "task " << i;
    if (helpers) EXPECT_TRUE(helped) << "after " << tasks << " failing tasks";
  }
}

TEST(Sgemm, MatchesTheReferenceWithTransposesAndAccumulation) {
  for (const GemmCase& g : kCases) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        for (float beta : {0.0f, 1.0f}) {
          const auto a = RandomValues(g.m * g.k, 1), b = RandomValues(g.k * g.n, 2), c0 = RandomValues(g.m * g.n, 3);
          std::vector<float> c = c0;
          Sgemm(ta, tb, g.m, g.n, g.k, 0.5f, a.data(), ta ? g.m : g.k, b.data(), tb ? g.k : g.n,
                beta, c.data(), g.n);
          const auto want = Reference(ta, tb, g.m, g.n, g.k, 0.5f, a, b, beta, c0);
          for (int64_t i = 0; i < g.m * g.n; ++i) {
            ASSERT_NEAR(c[i], want[i], 1e-4 * (1 + g.k))
                << "m=" << g.m << " n=" << g.n << " k=" << g.k << " ta=" << ta << " tb=" << tb
                << " beta=" << beta << " element " << i;
          }
        }
      }
    }
  }
}

TEST(Sgemm, RefusesLeadingDimensionsShorterThanARow) {
  std::vector<float> a(3 * 7, 1.0f), b(7 * 5, 1.0f), c(3 * 5, 0.0f);
  try {
    Sgemm(false, false, 3, 5, 7, 1.0f, a.data(), 6, b.data(), 5, 0.0f, c.data(), 5);
    FAIL() << "lda 6 < k 7 was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(e.what(), ::testing::HasSubstr("lda=6"));
  }
  EXPECT_THROW(Sgemm(false, true, 3, 5, 7, 1.0f, a.data(), 7, b.data(), 5, 0.0f, c.data(), 5),
               Error);  // B transposed: ldb must be >= k
  EXPECT_THROW(Sgemm(false, false, 3, 5, 7, 1.0f, a.data(), 7, b.data(), 5, 0.0f, c.data(), 4),
               Error);
  EXPECT_EQ(c, std::vector<float>(3 * 5, 0.0f));  // nothing written
}

// oneDNN runs one OpenMP thread under mx's pool, but the calling thread
// may be the application's, whose own OpenMP setting must survive.
TEST(Sgemm, LeavesTheCallersOpenMpSettingAsItWas) {
  omp_set_num_threads(3);
  const GemmCase small{3, 5, 7}, large{100, 128, 784};  // serial, then split
  for (const GemmCase& g : {small, large}) {
    std::vector<float> a(g.m * g.k, 1.0f), b(g.k * g.n, 1.0f), c(g.m * g.n);
    Sgemm(false, false, g.m, g.n, g.k, 1.0f, a.data(), g.k, b.data(), g.n, 0.0f, c.data(), g.n);
    EXPECT_EQ(c[0], static_cast<float>(g.k));
    EXPECT_EQ(omp_get_max_threads(), 3) << "after a " << g.m << "x" << g.n << " product";
  }
}

TEST(Sgemm, GivesBitIdenticalResultsEveryTime) {
  const GemmCase g{100, 128, 784};
  const auto a = RandomValues(g.m * g.k, 4), b = RandomValues(g.k * g.n, 5);
  std::vector<float> first(g.m * g.n), again(g.m * g.n);
  Sgemm(false, true, g.m, g.n, g.k, 1.0f, a.data(), g.k, b.data(), g.k, 0.0f, first.data(), g.n);
  for (int rep = 0; rep < 20; ++rep) {
    Sgemm(false, true, g.m, g.n, g.k, 1.0f, a.data(), g.k, b.data(), g.k, 0.0f, again.data(),
          g.n);
    ASSERT_EQ(again, first) << "repetition " << rep;
  }
}

}  // namespace
}  // namespace mx
