#include "ndarray/engine.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>  // std::call_once; std::recursive_mutex, for NaiveEngine only
#include <queue>
#include <string>
#include <thread>

#include "absl/algorithm/container.h"
#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/numbers.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "ndarray/base.h"
#include "ndarray/trace.h"

namespace mx {
namespace engine {

// Operations made so far in the process (NewOpr numbers each): orders an
// operation against the moment an error was reported.
std::atomic<uint64_t> g_made{0};

// A failure shared by every variable it reached.
struct ErrorBox {
  explicit ErrorBox(std::exception_ptr e) : error(std::move(e)) {}

  // Marks it reported to a waiter; true the first time (WaitForAll
  // reports only errors nobody has). From then on it stops only the
  // operations made before (engine.h): those belong to the work that
  // failed, while what the caller makes after hearing of it runs.
  bool Report() {
    if (reported.exchange(true)) return false;
    stops_before = g_made.load();
    return true;
  }
  // Whether it stops (skips) an operation numbered `made`.
  bool Stops(uint64_t made) const { return made < stops_before.load(); }

  std::exception_ptr error;
  std::atomic<bool> reported{false};
  std::atomic<uint64_t> stops_before{UINT64_MAX};
};
using ErrorRef = std::shared_ptr<ErrorBox>;

using VarList = absl::InlinedVector<Var*, 4>;

// Dependency state of one variable, protected by mu.
// Invariants: at most one write runs, and never together with reads;
// `pending` holds the operations that could not start because of this
// variable, in push order, and when it is not empty its first entry is a
// write or is a read held back by a running write.
struct Var {
  struct Pending {
    OprBlock* op;
    bool write;
  };
  // A FIFO that allocates nothing until an operation has to wait (most
  // variables never queue anything, and temporaries are created per op).
  class Queue {
   public:
    bool empty() const { return head_ == items_.size(); }
    const Pending& front() const { return items_[head_]; }
    void push_back(Pending p) { items_.push_back(p); }
    void pop_front() {
      if (++head_ == items_.size()) {
        items_.clear();
        head_ = 0;
      }
    }

   private:
    std::vector<Pending> items_;
    size_t head_ = 0;
  };
  absl::Mutex mu;
  Queue pending ABSL_GUARDED_BY(mu);
  int running_reads ABSL_GUARDED_BY(mu) = 0;
  bool running_write ABSL_GUARDED_BY(mu) = false;
  // The error of the last write, if it failed: it stays until a write
  // succeeds, stopping the operations made before it was reported
  // (ErrorBox::Stops); `error_thrown` once a WaitForVar on this variable
  // has thrown it, so that the next one does not.
  ErrorRef error ABSL_GUARDED_BY(mu);
  bool error_thrown ABSL_GUARDED_BY(mu) = false;
};

struct OprBlock {
  // Number of variables (plus one for the pusher) not yet granted to this op.
  std::atomic<int> wait{0};
  // Exactly one of the two is set.
  Engine::AsyncFn fn;
  Engine::SyncFn sync_fn;
  Context ctx;
  VarList const_vars;
  VarList mutable_vars;
  int priority = 0;
  uint64_t seq = 0;   // order of entry into its worker pool's queue
  uint64_t made = 0;  // order of making (g_made), for errors
  const char* name = "";
  // Runs even when its variables carry errors (waits and deletions).
  bool always_run = false;
  // Writes nothing (a wait for readers and writers): leaves the errors of
  // mutable_vars as they are.
  bool keeps_errors = false;
  // Frees mutable_vars[0] after completion.
  bool delete_var = false;
  FnProperty prop = FnProperty::kNormal;
  int64_t start_us = 0;  // when Execute began, for traces
};

namespace {

// Removes duplicates, and variables of `mutable_vars` from `const_vars`.
void Dedupe(VarList* const_vars, VarList* mutable_vars) {
  auto unique = [](VarList* v) {
    absl::c_sort(*v);
    v->erase(std::unique(v->begin(), v->end()), v->end());
  };
  unique(mutable_vars);
  unique(const_vars);
  const_vars->erase(
      std::remove_if(const_vars->begin(), const_vars->end(),
                     [&](Var* v) {
                       return std::binary_search(mutable_vars->begin(),
                                                 mutable_vars->end(), v);
                     }),
      const_vars->end());
}

// The first error carried by any variable of op that stops op (one not
// reported before op was made), or null.
ErrorRef InputError(OprBlock* op) {
  if (op->always_run) return nullptr;
  for (const VarList* list : {&op->const_vars, &op->mutable_vars}) {
    for (Var* v : *list) {
      absl::MutexLock lock(&v->mu);
      if (v->error && v->error->Stops(op->made)) return v->error;
    }
  }
  return nullptr;
}

// Stores error (null: success) on a variable op wrote. A successful write
// replaces the value, so it drops an error the variable carried (one
// reported before op was made, or op would have been skipped).
void SetWriteError(Var* v, const ErrorRef& error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(v->mu) {
  v->error = error;
  v->error_thrown = false;
}

// One worker unless told otherwise, as in MXNet: the cores go to the CPU
// pool inside operations, and a second worker mostly took operations over
// from the first, at a wake-up each (on 2 cores the MLP's training loop ran
// 4-9% slower with 2 than with 1).
int WorkersFromEnv(int requested) {
  if (requested > 0) return requested;
  if (const char* v = std::getenv("MX_CPU_WORKER_NTHREADS")) {
    int n = 0;
    if (absl::SimpleAtoi(v, &n) && n > 0 && n <= kMaxEngineWorkers) return n;
    std::fprintf(stderr,
                 "mx: MX_CPU_WORKER_NTHREADS=%s is not a number of threads from 1 to %d; "
                 "using 1\n",
                 v, kMaxEngineWorkers);
  }
  return 1;
}

// Errors recorded by operations, for WaitForAll.
class ErrorLog {
 public:
  void Record(const ErrorRef& e) {
    absl::MutexLock lock(&mu_);
    errors_.push_back(e);
  }
  // Clears the log and rethrows its first unreported error.
  void RethrowFirstUnreported() {
    std::vector<ErrorRef> errors;
    {
      absl::MutexLock lock(&mu_);
      errors.swap(errors_);
    }
    for (const ErrorRef& e : errors) {
      if (e->Report()) std::rethrow_exception(e->error);
    }
  }

 private:
  absl::Mutex mu_;
  std::vector<ErrorRef> errors_ ABSL_GUARDED_BY(mu_);
};

// Rethrows var's error, if it has one that no wait on var has thrown.
void RethrowVarError(Var* var) {
  ErrorRef error;
  {
    absl::MutexLock lock(&var->mu);
    if (var->error_thrown) return;
    error = var->error;
    var->error_thrown = true;
  }
  if (error) {
    error->Report();
    std::rethrow_exception(error->error);
  }
}

// absl's deadlock detection is on in Debian's build of abseil (built
// without NDEBUG). It then updates a process-wide lock graph, under one
// global lock, on every absl::Mutex acquisition; records a stack trace the
// first time a mutex is taken while another is held (every variable's lock
// is, under push_mu_, and temporaries bring new variables with every
// operation); and removes a node from the graph whenever a mutex dies. The
// engine takes several locks per operation, so the first engine created
// turns detection off for the whole process, as mx_train, mx_server and
// the benchmarks do in main(): tests and programs that use the library pay
// what the binaries pay. The price is that absl's lock-order checking does
// not run in those processes either. Turning it off is safe while other
// threads hold locks (turning it back on is not: absl aborts when a thread
// releases a lock it took while detection was off).
void IgnoreMutexDeadlockCyclesOnce() {
  static const bool done = [] {
    absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
    return true;
  }();
  (void)done;
}

OprBlock* NewOpr(Context ctx, const std::vector<VarHandle>& const_vars,
                 const std::vector<VarHandle>& mutable_vars, int priority,
                 const char* name) {
  OprBlock* op = new OprBlock;
  op->ctx = ctx;
  op->const_vars.assign(const_vars.begin(), const_vars.end());
  op->mutable_vars.assign(mutable_vars.begin(), mutable_vars.end());
  Dedupe(&op->const_vars, &op->mutable_vars);
  op->priority = priority;
  op->name = name;
  op->made = g_made.fetch_add(1, std::memory_order_relaxed);
  return op;
}

// The operation this thread runs through the pool (as a worker, or as a
// waiter in RunWhile), if any: the operations that its completion makes
// ready are pushed by a thread that looks for work right after (see
// WorkerPool::Push).
thread_local const OprBlock* t_running = nullptr;

// Set while a WaitWithoutRunning lives on this thread.
thread_local bool t_wait_without_running = false;

// A pool of worker threads that run ready operations, highest priority
// first and in push order among equal priorities.
//
// A thread that is awake keeps the work: a worker that ends an operation
// takes the next ready one itself, and a sleeping worker is woken only for
// work that can start beside what runs (worker 0 first, so that a chain of
// operations stays on one thread as long as nothing runs beside it). A
// wake-up costs the waker a system call and the woken thread 20-40 us in
// VMs before it runs, often on the waker's core, preempting it. Traced on
// 2 cores, the MLP's training step had its cores idle a quarter of the
// time, mostly in hand-offs of a chain to a sleeping thread (a helper ended
// an update that only worker 0 could follow with the next product).
//
// A kCpuParallel operation runs alone (it starts once nothing else runs,
// and nothing starts beside it): it uses every core through the CPU pool
// (ndarray/parallel.h), whose helpers would otherwise compete with the
// other workers. Threads that wait for results may run operations too
// (RunWhile).
//
// With `spin`, a worker that finds nothing to run polls for a push that
// long before it sleeps, so that a push in that time costs neither a system
// call nor a wake-up (20-50 us in VMs). The devices' workers do (see
// PoolIndex): a chain of short GPU operations hands each one from the
// stream's watcher thread to the worker, and a kernel of a few microseconds
// would otherwise wait several times its length for the worker to wake.
// The CPU's workers do not: on a machine with few cores a spinning worker
// takes a core from the threads that compute.
class WorkerPool {
 public:
  WorkerPool(int n, std::function<void(OprBlock*)> run, absl::Duration spin = absl::ZeroDuration())
      : run_(std::move(run)), spin_(spin), sleepers_(static_cast<size_t>(n)) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this, i] { Loop(i); });
  }
  ~WorkerPool() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    for (Sleeper& s : sleepers_) s.cv.Signal();
    for (auto& t : threads_) t.join();
  }
  // `pusher_continues`: the pushing thread (a worker, or a waiter in
  // RunWhile) is ending its operation and looks for the next one right
  // after, so it takes this one; once it has, a worker wakes another for
  // what else can start (Loop), and a waiter does when it stops (RunWhile).
  void Push(OprBlock* op, bool pusher_continues) {
    Sleeper* wake = nullptr;
    {
      absl::MutexLock lock(&mu_);
      op->seq = next_seq_.fetch_add(1, std::memory_order_relaxed);
      queue_.push(op);
      if (!pusher_continues) wake = ClaimSleeperLocked();
    }
    if (wake != nullptr) wake->cv.Signal();
  }
  int size() const { return static_cast<int>(threads_.size()); }

  // Runs ready operations on the calling thread, highest priority first,
  // while `keep_going` (called under the pool's lock) is true and one may
  // start; then wakes a worker for what can still start. Like a worker, the
  // caller takes what its own operations make ready.
  void RunWhile(absl::FunctionRef<bool()> keep_going) {
    for (;;) {
      OprBlock* op = nullptr;
      Sleeper* wake = nullptr;
      {
        absl::MutexLock lock(&mu_);
        if (keep_going()) op = StartTopLocked();
        if (op == nullptr) wake = ClaimSleeperLocked();
      }
      if (op == nullptr) {
        if (wake != nullptr) wake->cv.Signal();
        return;
      }
      RunAndRelease(op);
    }
  }

 private:
  struct Order {
    bool operator()(const OprBlock* a, const OprBlock* b) const {
      if (a->priority != b->priority) return a->priority < b->priority;
      return a->seq > b->seq;
    }
  };

  // A worker's wake-up: `asleep` is set by the worker before it waits and
  // cleared by the thread that wakes it (or by itself after a spurious
  // wake-up), so that two wake-ups in a row go to two workers.
  struct Sleeper {
    absl::CondVar cv;
    bool asleep = false;
  };

  // Whether the top operation may start now.
  bool TopCanStartLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (queue_.empty() || exclusive_running_) return false;
    return queue_.top()->prop != FnProperty::kCpuParallel || running_ == 0;
  }

  // Pops the top operation if it may start now.
  OprBlock* StartTopLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!TopCanStartLocked()) return nullptr;
    OprBlock* op = queue_.top();
    queue_.pop();
    ++running_;
    exclusive_running_ = op->prop == FnProperty::kCpuParallel;
    return op;
  }

  // The sleeping worker to wake (worker 0 first) when the top operation may
  // start now; null when none is needed or none sleeps. A worker woken for
  // nothing costs a system call and, on 2 cores, a running thread its core.
  Sleeper* ClaimSleeperLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!TopCanStartLocked()) return nullptr;
    for (Sleeper& s : sleepers_) {
      if (s.asleep) {
        s.asleep = false;
        return &s;
      }
    }
    return nullptr;
  }

  // Runs op on the calling thread, which looks for the next operation right
  // after (a worker, or RunWhile): what op's completion makes ready is left
  // for it (see Push).
  void RunAndRelease(OprBlock* op) {
    const bool exclusive = op->prop == FnProperty::kCpuParallel;
    const OprBlock* outer = t_running;  // a wait inside an operation nests
    t_running = op;
    run_(op);  // may complete and free op
    t_running = outer;
    absl::MutexLock lock(&mu_);
    --running_;
    if (exclusive) exclusive_running_ = false;
  }

  void Loop(int index) {
    Sleeper& me = sleepers_[static_cast<size_t>(index)];
    bool spun = spin_ == absl::ZeroDuration();  // since the last operation
    for (;;) {
      OprBlock* op;
      Sleeper* wake = nullptr;
      uint64_t pushes = 0;
      {
        absl::MutexLock lock(&mu_);
        op = StartTopLocked();
        while (op == nullptr && spun) {
          if (stop_ && queue_.empty()) return;
          me.asleep = true;
          me.cv.Wait(&mu_);
          me.asleep = false;  // a spurious wake-up, or stop_
          op = StartTopLocked();
        }
        // More that can start beside this one: wake a worker for it.
        if (op != nullptr) wake = ClaimSleeperLocked();
        pushes = next_seq_.load(std::memory_order_relaxed);
      }
      if (op == nullptr) {  // not asleep, so a push does not wake it
        SpinWhileNoPush(pushes);
        spun = true;
        continue;
      }
      spun = spin_ == absl::ZeroDuration();
      if (wake != nullptr) wake->cv.Signal();
      RunAndRelease(op);
    }
  }

  // Returns once an operation was pushed after the count `pushes`, or
  // after spin_.
  void SpinWhileNoPush(uint64_t pushes) const {
    const absl::Time end = absl::Now() + spin_;
    while (next_seq_.load(std::memory_order_relaxed) == pushes && absl::Now() < end) {
      std::this_thread::yield();
    }
  }

  std::function<void(OprBlock*)> run_;
  const absl::Duration spin_;
  absl::Mutex mu_;
  std::priority_queue<OprBlock*, std::vector<OprBlock*>, Order> queue_ ABSL_GUARDED_BY(mu_);
  // The pushes so far: incremented under mu_ (it orders the queue), read
  // without it by a spinning worker, which takes mu_ before acting on it.
  std::atomic<uint64_t> next_seq_{0};
  // One per worker, indexed as the workers; the flags are guarded by mu_.
  std::vector<Sleeper> sleepers_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;        // operations started and not yet released
  bool exclusive_running_ ABSL_GUARDED_BY(mu_) = false;  // one of them is kCpuParallel
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // written only by the constructor
};

// Operations on gpu(i) run on a worker thread of the device's own, started
// at its first operation: they only enqueue work on the device's streams
// and complete later, so they must neither wait behind the CPU's
// operations (with one CPU worker, a long CPU operation held up every GPU
// launch) nor take a CPU worker from them. kCpuParallel means nothing to
// them there: they do not use the CPU pool.
constexpr int kMaxDevicePools = 64;

// Which pool runs operations on ctx: 0 for the CPU's, 1 + i for gpu(i)'s.
int PoolIndex(Context ctx) {
  if (!ctx.is_gpu() || ctx.device_id < 0 || ctx.device_id >= kMaxDevicePools) return 0;
  return 1 + ctx.device_id;
}

class ThreadedEngine : public Engine {
 public:
  explicit ThreadedEngine(int num_workers)
      : pool_(num_workers, [this](OprBlock* op) { Run(op); }) {}

  ~ThreadedEngine() override {
    WaitForPending();
    // pool_ joins its threads when destroyed.
  }

  VarHandle NewVariable() override { return new Var; }

  void Submit(OprBlock* op) override { Push(op); }

  void DeleteVariable(SyncFn delete_fn, Context ctx, VarHandle var) override {
    OprBlock* op = NewOpr(ctx, {}, {var}, 0, "DeleteVariable");
    op->sync_fn = std::move(delete_fn);
    op->always_run = true;
    op->delete_var = true;
    Push(op);
  }

  void WaitForVar(VarHandle var) override { Wait(var, /*for_readers=*/false); }
  void WaitForVarIdle(VarHandle var) override { Wait(var, /*for_readers=*/true); }

  // WaitForVar, and with for_readers WaitForVarIdle: an operation that
  // reads (or writes, without writing) var.
  void Wait(VarHandle var, bool for_readers) {
    absl::Notification done;
    OprBlock* op = for_readers ? NewOpr(Context::CPU(), {}, {var}, 0, "WaitForVarIdle")
                               : NewOpr(Context::CPU(), {var}, {}, 0, "WaitForVar");
    op->sync_fn = [&done](RunContext) { done.Notify(); };
    op->always_run = true;
    op->keeps_errors = for_readers;
    // Woken by the thread that ends what it waits for, not via a worker.
    op->prop = FnProperty::kInline;
    Push(op);
    // Help while waiting: running ready operations on this thread saves a
    // worker's wake-up on the common push-then-wait path.
    if (!t_wait_without_running) pool_.RunWhile([&done] { return !done.HasBeenNotified(); });
    done.WaitForNotification();
    RethrowVarError(var);
  }

  void WaitForAll() override {
    WaitForPending();
    errors_.RethrowFirstUnreported();
  }

  int num_workers() const override { return pool_.size(); }
  const char* type() const override { return "ThreadedEngine"; }

 protected:
  void OnComplete(OprBlock* op, std::exception_ptr error) override {
    Trace(op);
    ErrorRef ref;
    if (error) {
      ref = std::make_shared<ErrorBox>(error);
      errors_.Record(ref);
    }
    Complete(op, std::move(ref));
  }

 private:
  void Push(OprBlock* op) {
    pending_ops_.fetch_add(1, std::memory_order_relaxed);
    op->wait.store(
        static_cast<int>(op->const_vars.size() + op->mutable_vars.size()) + 1,
        std::memory_order_relaxed);
    // An op enters the queues of all its variables before the next op enters
    // any: otherwise two threads pushing ops on {a, b} at once can leave op1
    // first on a and op2 first on b, each waiting for the other forever.
    // The last count (the +1 above) is released after the lock: an inline
    // op that is ready at once runs here, and must not hold up other pushes.
    EnterQueues(op);
    DecWait(op);
  }

  void EnterQueues(OprBlock* op) ABSL_LOCKS_EXCLUDED(push_mu_) {
    absl::MutexLock push_lock(&push_mu_);
    for (Var* v : op->const_vars) {
      bool ready;
      {
        absl::MutexLock lock(&v->mu);
        ready = !v->running_write && v->pending.empty();
        if (ready) {
          ++v->running_reads;
        } else {
          v->pending.push_back({op, false});
        }
      }
      if (ready) DecWait(op);
    }
    for (Var* v : op->mutable_vars) {
      bool ready;
      {
        absl::MutexLock lock(&v->mu);
        ready = !v->running_write && v->running_reads == 0 && v->pending.empty();
        if (ready) {
          v->running_write = true;
        } else {
          v->pending.push_back({op, true});
        }
      }
      if (ready) DecWait(op);
    }
  }

  // `pusher_continues`: see WorkerPool::Push.
  void DecWait(OprBlock* op, bool pusher_continues = false) {
    if (op->wait.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    if (op->prop == FnProperty::kInline) {
      Run(op);
    } else {
      PoolFor(PoolIndex(op->ctx))->Push(op, pusher_continues);
    }
  }

  WorkerPool* PoolFor(int index) {
    if (index == 0) return &pool_;
    std::call_once(device_pool_once_[index - 1], [this, index] {
      device_pools_[index - 1] = std::make_unique<WorkerPool>(
          1, [this](OprBlock* op) { Run(op); }, absl::Microseconds(100));
    });
    return device_pools_[index - 1].get();
  }

  void Run(OprBlock* op) {
    ErrorRef input_error = InputError(op);
    if (input_error) {
      Complete(op, std::move(input_error));
      return;
    }
    Execute(op);
  }

  // Releases op's variables, starts what became ready, and frees op.
  void Complete(OprBlock* op, ErrorRef error) {
    // A worker ending its own operation returns to its loop next.
    const bool continues = t_running == op;
    absl::InlinedVector<OprBlock*, 8> ready;
    for (Var* v : op->const_vars) {
      absl::MutexLock lock(&v->mu);
      if (--v->running_reads == 0 && !v->pending.empty()) {
        // The head of the queue is then a write (see Var's invariants).
        ready.push_back(v->pending.front().op);
        v->pending.pop_front();
        v->running_write = true;
      }
    }
    for (Var* v : op->mutable_vars) {
      {
        absl::MutexLock lock(&v->mu);
        if (!op->keeps_errors) SetWriteError(v, error);
        v->running_write = false;
        if (!v->pending.empty() && v->pending.front().write) {
          ready.push_back(v->pending.front().op);
          v->pending.pop_front();
          v->running_write = true;
        } else {
          while (!v->pending.empty() && !v->pending.front().write) {
            ready.push_back(v->pending.front().op);
            v->pending.pop_front();
            ++v->running_reads;
          }
        }
        if (op->delete_var) MX_CHECK(v->pending.empty() && v->running_reads == 0);
      }
      if (op->delete_var) delete v;
    }
    // The thread goes on in its own pool only.
    const int pool = PoolIndex(op->ctx);
    for (OprBlock* r : ready) DecWait(r, continues && PoolIndex(r->ctx) == pool);
    delete op;
    CountOut();
  }

  // Counts an operation out of pending_ops_. The count reaches zero only
  // under finish_mu_, so a WaitForPending that sees zero returns (and the
  // engine may be destroyed) only once the last thread out, which may be a
  // GPU stream's watcher that the engine does not join, is done with it.
  void CountOut() {
    int64_t n = pending_ops_.load(std::memory_order_acquire);
    while (n > 1) {
      if (pending_ops_.compare_exchange_weak(n, n - 1, std::memory_order_acq_rel)) return;
    }
    absl::MutexLock lock(&finish_mu_);
    if (pending_ops_.fetch_sub(1, std::memory_order_acq_rel) == 1) finish_cv_.SignalAll();
  }

  void WaitForPending() ABSL_LOCKS_EXCLUDED(finish_mu_) {
    absl::MutexLock lock(&finish_mu_);
    while (pending_ops_.load(std::memory_order_acquire) != 0) finish_cv_.Wait(&finish_mu_);
  }

  // Serializes EnterQueues (see Push). Taken before any Var::mu, never
  // after one.
  absl::Mutex push_mu_;
  // Operations pushed and not yet completed. Atomic, so that Push and
  // Complete need no common lock; finish_mu_ guards no state and only
  // orders the step to zero (CountOut), so a waiter that has seen a
  // nonzero count is already waiting when it is signalled.
  std::atomic<int64_t> pending_ops_{0};
  absl::Mutex finish_mu_;
  absl::CondVar finish_cv_;
  ErrorLog errors_;
  // Last: their threads stop before the state above dies (the devices'
  // first).
  WorkerPool pool_;
  std::array<std::once_flag, kMaxDevicePools> device_pool_once_;
  std::array<std::unique_ptr<WorkerPool>, kMaxDevicePools> device_pools_;
};

// Runs every operation inline, in Push. Async operations are waited for.
class NaiveEngine : public Engine {
 public:
  VarHandle NewVariable() override { return new Var; }

  void Submit(OprBlock* op) override { RunInline(op); }

  void DeleteVariable(SyncFn delete_fn, Context ctx, VarHandle var) override {
    std::lock_guard<std::recursive_mutex> lock(run_mu_);
    delete_fn(RunContext{ctx});
    delete var;
  }

  void WaitForVar(VarHandle var) override {
    std::lock_guard<std::recursive_mutex> lock(run_mu_);
    RethrowVarError(var);
  }
  // Everything pushed ran already.
  void WaitForVarIdle(VarHandle var) override { WaitForVar(var); }

  void WaitForAll() override {
    std::lock_guard<std::recursive_mutex> lock(run_mu_);
    errors_.RethrowFirstUnreported();
  }

  int num_workers() const override { return 0; }
  const char* type() const override { return "NaiveEngine"; }

 protected:
  void OnComplete(OprBlock* op, std::exception_ptr error) override {
    Trace(op);
    absl::MutexLock lock(&mu_);
    done_ops_.push_back({op, std::move(error)});
    cv_.SignalAll();
  }

 private:
  void RunInline(OprBlock* op) {
    std::lock_guard<std::recursive_mutex> lock(run_mu_);
    ErrorRef error = InputError(op);
    if (!error) {
      Execute(op);
      std::exception_ptr e = AwaitCompletion(op);
      if (e) {
        error = std::make_shared<ErrorBox>(e);
        errors_.Record(error);
      }
    }
    for (Var* v : op->mutable_vars) {
      absl::MutexLock lock(&v->mu);
      SetWriteError(v, error);
    }
    delete op;
  }

  std::exception_ptr AwaitCompletion(OprBlock* op) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    for (;;) {
      for (auto it = done_ops_.begin(); it != done_ops_.end(); ++it) {
        if (it->first == op) {
          std::exception_ptr e = it->second;
          done_ops_.erase(it);
          return e;
        }
      }
      cv_.Wait(&mu_);
    }
  }

  // Held while an operation runs, so that operations pushed from different
  // threads never run at once (the threaded engine would order them; a
  // debugging engine must not add races). Recursive: operations may push.
  // The thread that completes an async operation must therefore call its
  // callback before it pushes anything. The one std:: lock of the engine:
  // absl::Mutex is not reentrant, and run_mu_ guards no data (it
  // serializes execution), so there is nothing for the analysis to check.
  std::recursive_mutex run_mu_;
  absl::Mutex mu_;
  absl::CondVar cv_;  // signalled when done_ops_ grows
  // Completed operations that AwaitCompletion has not yet collected.
  std::vector<std::pair<OprBlock*, std::exception_ptr>> done_ops_ ABSL_GUARDED_BY(mu_);
  ErrorLog errors_;
};

}  // namespace
}  // namespace engine

WaitWithoutRunning::WaitWithoutRunning() : outer_(engine::t_wait_without_running) {
  engine::t_wait_without_running = true;
}

WaitWithoutRunning::~WaitWithoutRunning() { engine::t_wait_without_running = outer_; }

void CallbackOnComplete::operator()(std::exception_ptr error) const {
  engine_->OnComplete(op_, std::move(error));
}

namespace {
// The timeline's clock (the system clock), so that engine operations line
// up with the other events of a job's trace.
int64_t NowMicros() { return trace::NowMicros(); }
}  // namespace

void Engine::StartTrace() {
  absl::MutexLock lock(&trace_mu_);
  trace_.clear();
  tracing_ = true;
}

std::vector<TraceEvent> Engine::StopTrace() {
  tracing_ = false;
  absl::MutexLock lock(&trace_mu_);
  return std::move(trace_);
}

void Engine::Trace(const engine::OprBlock* op) {
  // The job's timeline (ndarray/trace.h), and StartTrace's record.
  if (trace::Enabled()) trace::Complete("engine", op->name, op->start_us, NowMicros());
  if (!tracing_.load(std::memory_order_relaxed)) return;
  TraceEvent e{op->name, op->start_us, NowMicros()};
  absl::MutexLock lock(&trace_mu_);
  trace_.push_back(std::move(e));
}

void Engine::PushAsync(AsyncFn fn, Context ctx, std::vector<VarHandle> const_vars,
                       std::vector<VarHandle> mutable_vars, int priority,
                       const char* name, FnProperty prop) {
  engine::OprBlock* op = engine::NewOpr(ctx, const_vars, mutable_vars, priority, name);
  op->prop = prop;
  op->fn = std::move(fn);
  Submit(op);
}

void Engine::PushSync(SyncFn fn, Context ctx, std::vector<VarHandle> const_vars,
                      std::vector<VarHandle> mutable_vars, int priority,
                      const char* name, FnProperty prop) {
  engine::OprBlock* op = engine::NewOpr(ctx, const_vars, mutable_vars, priority, name);
  op->prop = prop;
  op->sync_fn = std::move(fn);
  Submit(op);
}

void Engine::Execute(engine::OprBlock* op) {
  if (trace::Enabled() || tracing_.load(std::memory_order_relaxed)) op->start_us = NowMicros();
  if (op->sync_fn) {
    std::exception_ptr error;
    try {
      op->sync_fn(RunContext{op->ctx});
    } catch (...) {
      error = std::current_exception();
    }
    OnComplete(op, std::move(error));
    return;
  }
  // The function runs from a local: its `done` may complete the op (and
  // free it) before the function returns, e.g. when the last of several
  // RPCs it starts answers at once, and its captures must outlive it.
  const Engine::AsyncFn fn = std::move(op->fn);
  try {
    fn(RunContext{op->ctx}, CallbackOnComplete(this, op));
  } catch (...) {
    // Contract violation by an async fn; treat it as the op's failure.
    OnComplete(op, std::current_exception());
  }
}

std::unique_ptr<Engine> CreateEngine(const EngineOptions& options) {
  engine::IgnoreMutexDeadlockCyclesOnce();
  if (options.kind == EngineOptions::Kind::kNaive) {
    return std::make_unique<engine::NaiveEngine>();
  }
  return std::make_unique<engine::ThreadedEngine>(
      engine::WorkersFromEnv(options.num_workers));
}

std::shared_ptr<Engine> Engine::Shared() {
  // Destroyed at exit once the last NDArray chunk lets go of it; its
  // destructor finishes pending operations and joins the workers.
  static std::shared_ptr<Engine> engine = [] {
    EngineOptions options;
    // MXNet's names; its ThreadedEnginePerDevice is this threaded engine.
    const std::string type = std::getenv("MX_ENGINE_TYPE") ? std::getenv("MX_ENGINE_TYPE") : "";
    if (type == "NaiveEngine") {
      options.kind = EngineOptions::Kind::kNaive;
    } else if (!type.empty() && type != "ThreadedEngine" && type != "ThreadedEnginePerDevice") {
      std::fprintf(stderr, "mx: MX_ENGINE_TYPE=%s is not NaiveEngine or ThreadedEngine; "
                   "using ThreadedEngine\n", type.c_str());
    }
    return std::shared_ptr<Engine>(CreateEngine(options));
  }();
  return engine;
}

Engine* Engine::Get() { return Shared().get(); }

}  // namespace mx
