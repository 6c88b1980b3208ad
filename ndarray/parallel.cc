#include "ndarray/parallel.h"

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "ndarray/base.h"
#include "oneapi/dnnl/dnnl.h"

namespace mx {
namespace {

// How long a helper polls for the next job before it sleeps. A training
// step's products follow each other within tens of microseconds, so helpers
// stay awake through a step and sleep between steps.
constexpr auto kSpin = std::chrono::microseconds(100);

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// OpenMP allows a list, one count per nesting level ("4,2"); the pool is
// one level, the first. A value that is not a count is reported and
// skipped, so a typo does not silently change nothing.
int ThreadsFromEnv() {
  for (const char* name : {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"}) {
    const char* v = std::getenv(name);
    if (v == nullptr) continue;
    const absl::string_view value = v;
    int n = 0;
    if (absl::SimpleAtoi(value.substr(0, value.find(',')), &n) && n > 0) return n;
    std::fprintf(stderr, "mx: %s=%s is not a number of threads; ignored\n", name, v);
  }
  return UsableCores();
}

// The whole text of a file, or "" if it cannot be read.
std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The quota in cores that one cgroup directory sets (0: none or unknown).
double QuotaOf(const std::string& dir) {
  std::istringstream v2(ReadFile(dir + "/cpu.max"));  // "max 100000" or "150000 100000"
  std::string quota;
  double period = 0;
  if (v2 >> quota >> period) return quota == "max" || period <= 0 ? 0 : std::atof(quota.c_str()) / period;
  const double v1_quota = std::atof(ReadFile(dir + "/cpu.cfs_quota_us").c_str());  // -1: none
  const double v1_period = std::atof(ReadFile(dir + "/cpu.cfs_period_us").c_str());
  return v1_quota > 0 && v1_period > 0 ? v1_quota / v1_period : 0;
}

// True on a thread that is running a ParallelFor task (or owns the pool):
// nested calls run serially.
thread_local bool t_in_parallel = false;

class CpuPool {
 public:
  explicit CpuPool(int threads) : threads_(threads) {
    for (int slot = 1; slot < threads_; ++slot) {
      // Detached: the pool is never destroyed (see Pool()).
      std::thread([this, slot] { HelperLoop(slot); }).detach();
    }
  }

  int threads() const { return threads_; }

  void Run(int64_t tasks, absl::FunctionRef<void(int64_t, int)> fn) {
    if (tasks <= 0) return;
    if (tasks == 1 || threads_ == 1 || t_in_parallel) {
      RunSerially(tasks, fn);
      return;
    }
    Job job(tasks, fn);
    bool busy, wake = false;
    {
      absl::MutexLock lock(&mu_);
      busy = job_ != nullptr;  // another thread's job holds the pool
      if (!busy) {
        job_ = &job;
        generation_.fetch_add(1, std::memory_order_release);
        wake = sleeping_ > 0;
      }
    }
    if (busy) {
      RunSerially(tasks, fn);
      return;
    }
    if (wake) cv_.SignalAll();

    t_in_parallel = true;
    Work(&job, 0);
    t_in_parallel = false;
    {
      absl::MutexLock lock(&mu_);
      job_ = nullptr;  // no helper joins from now on
    }
    // Every task is claimed (Work returned); the helpers that joined finish
    // the ones they claimed before they leave.
    while (job.users.load(std::memory_order_acquire) != 0) CpuRelax();
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    Job(int64_t n, absl::FunctionRef<void(int64_t, int)> f) : tasks(n), fn(f) {}
    const int64_t tasks;
    absl::FunctionRef<void(int64_t, int)> fn;
    std::atomic<int64_t> next{0};  // the next unclaimed task
    std::atomic<int> users{0};     // helpers inside Work
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // the first failed task's, written by who set failed
  };

  static void RunSerially(int64_t tasks, absl::FunctionRef<void(int64_t, int)> fn) {
    const bool outer = t_in_parallel;
    t_in_parallel = true;
    try {
      for (int64_t i = 0; i < tasks; ++i) fn(i, 0);
    } catch (...) {
      t_in_parallel = outer;
      throw;
    }
    t_in_parallel = outer;
  }

  // Runs the job's tasks until none is left unclaimed. A task's exception
  // must not leave a helper thread (it would end the process) nor the
  // caller's Work (the pool would stay held): the first is kept for Run to
  // rethrow, and the tasks claimed after it are skipped.
  static void Work(Job* job, int slot) {
    for (int64_t i; (i = job->next.fetch_add(1, std::memory_order_relaxed)) < job->tasks;) {
      if (job->failed.load(std::memory_order_relaxed)) continue;
      try {
        job->fn(i, slot);
      } catch (...) {
        if (!job->failed.exchange(true)) job->error = std::current_exception();
      }
    }
  }

  void HelperLoop(int slot) {
    t_in_parallel = true;  // a helper's own calls run serially
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
        CpuRelax();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
      }
      Job* job;
      {
        absl::MutexLock lock(&mu_);
        if (generation_.load(std::memory_order_relaxed) == seen) {
          ++sleeping_;
          do {
            cv_.Wait(&mu_);
          } while (generation_.load(std::memory_order_relaxed) == seen);
          --sleeping_;
        }
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        if (job == nullptr) continue;  // it finished before we came
        job->users.fetch_add(1, std::memory_order_relaxed);
      }
      Work(job, slot);
      job->users.fetch_sub(1, std::memory_order_release);  // its tasks' writes
    }
  }

  const int threads_;
  absl::Mutex mu_;
  absl::CondVar cv_;  // signalled when a job is published and helpers sleep
  // Bumped, under mu_, when a job is published; read without it by
  // spinning helpers.
  std::atomic<uint64_t> generation_{0};
  Job* job_ ABSL_GUARDED_BY(mu_) = nullptr;  // the job helpers may join
  int sleeping_ ABSL_GUARDED_BY(mu_) = 0;    // helpers waiting on cv_
};

CpuPool& Pool() {
  // Never destroyed (its helpers are never joined): static destructors of
  // other libraries may still run products at exit.
  static CpuPool* pool = new CpuPool(ThreadsFromEnv());
  return *pool;
}

// Products below this many multiply-adds (3-10 us on one core) run on
// the calling thread: handing half to a helper costs more than it saves.
constexpr double kMinParallelMacs = 1 << 18;

// One product on the calling thread, through oneDNN's sgemm (row-major,
// as cblas_sgemm). oneDNN generates its kernel for the CPU it runs on
// (AVX-512 where there is one). OpenBLAS 0.3.21 picks its kernels from a
// table, and environments whose processors an old OpenBLAS miscomputes on
// pin it to an older type (OPENBLAS_CORETYPE=Haswell on the development
// machines): there oneDNN ran the MLP's and LeNet's products 1.5-2.1x
// faster, one thread each. Unpinned, OpenBLAS's AVX-512 kernels were within
// 0.9-1.2x of oneDNN's. oneDNN would spread a product over
// omp_get_max_threads() OpenMP threads of the calling thread; mx's pool
// splits products itself (OneOpenMpThread). Sgemm checks the arguments, so
// a failure left is oneDNN running out of memory for its packing buffers.
void SgemmBlock(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                int64_t ldc) {
  OneOpenMpThread one_thread;
  const dnnl_status_t s = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a,
                                     lda, b, ldb, beta, c, ldc);
  if (s != dnnl_success) {
    throw Error(absl::ResourceExhaustedError(absl::StrCat(
        "Sgemm: oneDNN's sgemm failed (dnnl_status_t ", s, ") for m=", m, " n=", n, " k=", k)));
  }
}

}  // namespace

int CpuThreads() { return Pool().threads(); }

OneOpenMpThread::OneOpenMpThread() : before_(omp_get_max_threads()) {
  if (before_ != 1) omp_set_num_threads(1);
}

OneOpenMpThread::~OneOpenMpThread() {
  if (before_ != 1) omp_set_num_threads(before_);
}

namespace internal {

double CgroupCpuLimit(const std::string& proc_self_cgroup, const std::string& root) {
  double limit = 0;
  std::istringstream lines(proc_self_cgroup);
  for (std::string line; std::getline(lines, line);) {
    // "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1).
    const size_t colon = line.find(':'), second = line.find(':', colon + 1);
    if (colon == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = "," + line.substr(colon + 1, second - colon - 1) + ",";
    std::vector<std::string> mounts;
    if (controllers == ",,") {
      mounts = {root};
    } else if (controllers.find(",cpu,") != std::string::npos) {
      mounts = {root + "/cpu,cpuacct", root + "/cpu"};
    } else {
      continue;
    }
    // The process's cgroup and every one above it: each quota applies.
    for (std::string path = line.substr(second + 1);; path = path.substr(0, path.rfind('/'))) {
      if (!path.empty() && path.back() == '/') path.pop_back();
      for (const std::string& mount : mounts) {
        const double q = QuotaOf(mount + path);
        if (q > 0 && (limit == 0 || q < limit)) limit = q;
      }
      if (path.empty()) break;
    }
  }
  return limit;
}

}  // namespace internal

int UsableCores() {
  static const int cores = [] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
    const double limit = internal::CgroupCpuLimit(ReadFile("/proc/self/cgroup"), "/sys/fs/cgroup");
    if (limit > 0) n = std::min(n, static_cast<int>(std::ceil(limit)));
    return std::max(n, 1);
  }();
  return cores;
}

void ParallelFor(int64_t tasks, absl::FunctionRef<void(int64_t, int)> fn) {
  Pool().Run(tasks, fn);
}

void ParallelRanges(int64_t n, int64_t min_range,
                    absl::FunctionRef<void(int64_t begin, int64_t end)> fn) {
  if (n <= 0) return;
  const int64_t threads = CpuThreads();
  int64_t ranges = std::clamp<int64_t>(n / std::max<int64_t>(min_range, 1), 1, 4 * threads);
  // A multiple of the threads once there are more ranges than threads:
  // whichever thread is free claims the next range, so 3 equal ranges on 2
  // threads end when one thread has run two of them, as late as 2 ranges
  // would (the MLP's largest weight update, traced: median 10 us, 8 with
  // 2 ranges instead of 3).
  if (ranges > threads) ranges -= ranges % threads;
  if (ranges == 1) {
    fn(0, n);
    return;
  }
  // Range r is [r * n / ranges, (r + 1) * n / ranges): at least
  // n / ranges >= min_range long.
  ParallelFor(ranges, [&](int64_t r, int) { fn(r * n / ranges, (r + 1) * n / ranges); });
}

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc) {
  // As BLAS checks them (row-major): a row of each matrix fits its stride.
  MX_THROW_IF_NOT(m >= 0 && n >= 0 && k >= 0, "Sgemm: negative size m=", m, " n=", n, " k=", k);
  MX_THROW_IF_NOT(lda >= (trans_a ? m : k) && ldb >= (trans_b ? k : n) && ldc >= n,
                  "Sgemm: leading dimensions lda=", lda, " ldb=", ldb, " ldc=", ldc,
                  " too small for m=", m, " n=", n, " k=", k, " trans_a=", trans_a,
                  " trans_b=", trans_b);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta * C (oneDNN would leave C as it is)
    for (int64_t i = 0; i < m; ++i) {
      float* row = c + i * ldc;
      for (int64_t j = 0; j < n; ++j) row[j] = beta == 0 ? 0.0f : beta * row[j];
    }
    return;
  }
  const int threads = CpuThreads();
  const double macs = static_cast<double>(m) * n * k;
  // Blocks of C's rows (in multiples of 4), or of its columns (in multiples
  // of 16, two vector registers) when C is at least twice as wide as it is
  // tall and A is not transposed. Measured on the products of the zoo's
  // networks (exp: each split of each shape, 2 threads): with A transposed
  // (every weight gradient) splitting rows was 15-55% faster whatever the
  // shape; otherwise splitting columns won by 3-20% only when n >= 2m, and
  // splitting rows won by 8-35% on the near-square products of the MLP.
  const bool split_n = !trans_a && n >= 2 * m;
  const int64_t side = split_n ? n : m;
  const int64_t align = split_n ? 16 : 4;
  // Inside a pool task (a Convolution's chunk of images) the blocks would
  // run one after the other: one call is faster than two halves.
  const int64_t blocks = threads == 1 || macs < kMinParallelMacs || t_in_parallel
                             ? 1
                             : std::min<int64_t>(threads, side / align);
  if (blocks <= 1) {
    SgemmBlock(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const int64_t step = (side / blocks + align - 1) / align * align;
  ParallelFor((side + step - 1) / step, [&](int64_t block, int) {
    const int64_t lo = block * step, len = std::min(step, side - lo);
    if (split_n) {
      const float* b_part = trans_b ? b + lo * ldb : b + lo;
      SgemmBlock(trans_a, trans_b, m, len, k, alpha, a, lda, b_part, ldb, beta, c + lo, ldc);
    } else {
      const float* a_part = trans_a ? a + lo : a + lo * lda;
      SgemmBlock(trans_a, trans_b, len, n, k, alpha, a_part, lda, b, ldb, beta, c + lo * ldc, ldc);
    }
  });
}

}  // namespace mx
