// CPU parallelism inside one operation: a pool of helper threads that join
// the calling thread on a loop of independent tasks, and the matrix product
// built on it.
//
// Why a pool of our own instead of a BLAS's threads: OpenBLAS (mx's BLAS
// until oneDNN's sgemm replaced it) splits each product statically among
// its threads and its helpers spin in sched_yield between products. On 2
// cores a LeNet step ran as fast with one OpenBLAS thread as with two (31 vs
// 29 ms): the code between the products (im2col, col2im, pooling) ran on one
// core while the other spun, and a product waited for whichever helper the
// scheduler had put aside. oneDNN's OpenMP threads would do the same. Here
// each sgemm call runs on one thread, tasks are claimed from a shared counter
// (a late helper costs nothing but its share), and helpers sleep after a
// short spin.
//
// Threads: CpuThreads() counts the caller and the helpers. It is
// OMP_NUM_THREADS if set (MXNet's knob, which deploy/launch.py sets per local
// worker; of a list such as "4,2", the first), else OPENBLAS_NUM_THREADS,
// else UsableCores(). A value that is not a count is reported on stderr.
#ifndef MX_NDARRAY_PARALLEL_H_
#define MX_NDARRAY_PARALLEL_H_

#include <cstdint>
#include <string>

#include "absl/functional/function_ref.h"

namespace mx {

// The cores this process may use, the default of every thread count (this
// pool's, the engine's workers): those of its CPU affinity mask, fewer when
// a cgroup CPU quota allows less (a container's CPU limit, rounded up), at
// least 1. A container limited to 2 CPUs on a 64-core node sees 64 cores;
// 64 spinning threads on a quota of 2 would spend most of it waiting to be
// scheduled again.
int UsableCores();

namespace internal {
// The CPU quota in cores that cgroups put on this process (0: none), given
// the text of /proc/self/cgroup and the directory the cgroup filesystems
// are mounted on (/sys/fs/cgroup): the smallest of the quotas of its cgroup
// and the cgroups above it, from cpu.max (cgroup v2) or cpu.cfs_quota_us /
// cpu.cfs_period_us (v1). Exposed for tests.
double CgroupCpuLimit(const std::string& proc_self_cgroup, const std::string& root);
}  // namespace internal

// Threads ParallelFor may use, the caller included (>= 1).
int CpuThreads();

// Runs fn(task, slot) for every task in [0, tasks) and returns when all
// have run. slot is in [0, CpuThreads()) and unique among this call's tasks
// running at the same moment, so it can index the call's per-thread scratch
// space; which task gets which slot depends on timing, so results must not
// depend on it.
// Runs serially (slot 0) when called from inside a task, and when another
// ParallelFor holds the pool. When a task throws, the tasks not yet started
// are skipped and the first exception is rethrown here once the running
// ones have ended.
void ParallelFor(int64_t tasks, absl::FunctionRef<void(int64_t task, int slot)> fn);

// Runs fn(begin, end) over contiguous ranges of about equal length that
// cover [0, n) exactly once, on the pool (ParallelFor): up to four ranges
// per thread, so that a late helper leaves the others little to wait for,
// and a multiple of the threads when there are more ranges than threads;
// each at least min_range long (so one range, on the caller, when
// n < 2 * min_range).
void ParallelRanges(int64_t n, int64_t min_range,
                    absl::FunctionRef<void(int64_t begin, int64_t end)> fn);

// While alive, OpenMP runtimes (oneDNN's) run on the calling thread alone:
// mx's pool divides the work, and oneDNN's own threads would fight it for
// the cores. The thread's OpenMP setting is restored after, since the
// caller may be the application's thread (waiting threads run operations).
class OneOpenMpThread {
 public:
  OneOpenMpThread();
  ~OneOpenMpThread();
  OneOpenMpThread(const OneOpenMpThread&) = delete;
  OneOpenMpThread& operator=(const OneOpenMpThread&) = delete;

 private:
  int before_;
};

// C = alpha * op(A) * op(B) + beta * C, row-major, with leading dimensions
// lda, ldb, ldc (as cblas_sgemm). Products worth it are split into blocks
// of C's rows or columns that run on the pool; each element of C is computed
// by one call of oneDNN's sgemm over the whole of k, so results do not depend
// on timing. k == 0 leaves beta * C. Throws mx::Error: InvalidArgument for
// a stride shorter than a row (nothing written), ResourceExhausted when
// oneDNN fails.
void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc);

}  // namespace mx

#endif  // MX_NDARRAY_PARALLEL_H_
