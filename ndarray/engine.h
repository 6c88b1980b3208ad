// Engine: runs operations asynchronously in dependency order.
//
// The model is MXNet's. Every operation is pushed with the variables it reads
// (const_vars: used but not mutated) and the variables it writes
// (mutable_vars: mutated). An operation runs once every earlier writer of
// what it reads, and every earlier reader and writer of what it writes, has
// completed; independent operations run in parallel on a pool of CPU worker
// threads. Among ready operations, higher `priority` runs first (the KVStore
// gives communication of the first layers a higher priority).
//
// Errors. An exception thrown by an operation is stored on the variables it
// writes. Later operations that read or write a failed variable are skipped,
// and their written variables carry the same error. WaitForVar rethrows a
// variable's error to its first waiter after the failure; WaitForAll
// rethrows the first error that no WaitForVar has reported. The engine
// keeps running. Once reported (by either), an error stops only the
// operations made before the report (the rest of the work that failed,
// whether or not it has run yet). So, as in MXNet, which clears a reported
// error, a caller that catches it and goes on (with the next training
// step, say) runs normally. A variable keeps its error until an operation
// writes it successfully; until then its first waiter gets the error even
// if another variable's waiter got it before.
//
// Choice of engine: the environment variable MX_ENGINE_TYPE=NaiveEngine runs
// every operation inline in Push (for debugging: errors surface at once and
// stacks are readable); the default is ThreadedEngine.
//
// Who owns the CPU cores. These threads run a process's CPU work:
//  - The engine's workers, MX_CPU_WORKER_NTHREADS of them (default 1, as
//    in MXNet). A thread that ends an operation takes the next ready one
//    itself, so a chain of dependent operations stays on one thread; a
//    sleeping worker is woken (worker 0 first) only for an operation that
//    can start beside those running. A thread blocked in WaitForVar runs
//    ready operations too (unless it holds a WaitWithoutRunning, as the data
//    prefetcher does), and a kInline operation runs on the thread that
//    makes it ready. Reductions, and kernels that touch under 2^16 elements,
//    run on one thread inside their operation: their parallelism comes from
//    independent operations. Larger kernels split over the CPU pool
//    (kernel::Launch, ndarray/launch.h), like Pooling below.
//  - The CPU pool of ndarray/parallel.h: the calling thread and
//    CpuThreads() - 1 helpers (OMP_NUM_THREADS, else OPENBLAS_NUM_THREADS,
//    else UsableCores()), which spin for 100 us after a job, then sleep.
//    kCpuParallel operations (Dot, FullyConnected, Convolution) split
//    themselves over it, and the engine runs each alone, on a worker or on a
//    waiting thread: it starts once no other operation runs, and only
//    kInline ones start beside it, so for its duration the pool owns the
//    cores. oneDNN runs one thread per call and none of its own. A
//    kNormal operation may call ParallelFor too (Pooling does): it then
//    shares the cores with the other workers' operations, and runs
//    serially while another job holds the pool.
//  - One engine worker per GPU in use (see "GPUs" below), which enqueues
//    GPU work and returns at once; idle, it polls for 100 us before it
//    sleeps, so that a chain of short GPU operations reaches it without
//    wake-ups.
//  - One thread per GPU stream in use (ndarray/cuda/cuda_device.cc: each
//    GPU's compute stream, and its copy-in and copy-out streams once copies
//    use them) that waits for the stream: it polls, spinning and then
//    napping, for up to 100 ms before it blocks in the driver, so it takes
//    part of a core while GPU work is in flight. It completes GPU
//    operations, and runs the kInline operations that this makes ready.
// The pool defaults to every usable core: processes that share a machine
// need smaller counts (deploy/launch.py gives each worker its share of the
// cores as OMP_NUM_THREADS).
//
// GPUs. An operation on gpu(i) runs on a worker thread of the device's own
// (started at its first operation; not among MX_CPU_WORKER_NTHREADS), so
// that GPU launches neither wait behind CPU operations nor take CPU
// workers from them. It only enqueues work on the device's compute stream
// (ndarray/launch.h, kernel::Push), or a copy on one of its copy streams
// (NDArray::Assign), and completes, through CallbackOnComplete, when the
// stream has run that work: the engine orders GPU work against CPU work
// and copies by the same variables, and copies overlap computation where
// nothing orders them.
//
// All methods are thread-safe. The first engine created (Get, Shared or
// CreateEngine) turns absl's mutex deadlock detection off for the process,
// as mx_train and mx_server do at start: with it, every lock the engine
// takes updates a global lock graph (engine.cc says more).
#ifndef MX_NDARRAY_ENGINE_H_
#define MX_NDARRAY_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "ndarray/context.h"

namespace mx {

namespace engine {
struct Var;
struct OprBlock;
}  // namespace engine

// The most engine workers a process may ask for (MX_CPU_WORKER_NTHREADS,
// mx_train --threads): more is no plan, and thread creation failed (an
// abort).
constexpr int kMaxEngineWorkers = 1024;

// A variable: the unit of dependency tracking. NDArrays own one each (slices
// and reshapes share their parent's).
using VarHandle = engine::Var*;

// What an operation is told when it runs.
struct RunContext {
  Context ctx;
};

class Engine;

// How an operation uses the CPU.
enum class FnProperty {
  // Runs on one thread, side by side with other operations.
  kNormal,
  // Splits itself over every core through the CPU pool (ParallelFor and
  // Sgemm, ndarray/parallel.h): the engine runs it alone, because threads
  // that spin-wait for each other stall for a whole time slice whenever
  // another thread takes one of their cores (measured with OpenBLAS's own
  // threads, before the pool: a 2-core MLP step ran 20x slower).
  kCpuParallel,
  // Cheap and never blocks (starts RPCs, wakes a waiter): runs on the
  // thread that makes it ready (the one pushing it, or the one ending its
  // last dependency) instead of waking a worker for it. Such a function
  // must not push operations itself.
  kInline,
};

// Handed to an asynchronous operation, which must call it exactly once when
// it is done, from any thread; pass an exception to fail the operation.
class CallbackOnComplete {
 public:
  void operator()(std::exception_ptr error = nullptr) const;

 private:
  friend class Engine;
  CallbackOnComplete(Engine* engine, engine::OprBlock* op)
      : engine_(engine), op_(op) {}
  Engine* engine_;
  engine::OprBlock* op_;
};

// One executed operation in a trace: its name and when it ran, in
// microseconds of a steady clock.
struct TraceEvent {
  std::string name;
  int64_t start_us = 0;
  int64_t end_us = 0;
};

struct EngineOptions {
  enum class Kind { kThreaded, kNaive };
  Kind kind = Kind::kThreaded;
  // Worker threads of the threaded engine; 0 means one per core.
  int num_workers = 0;
};

class Engine {
 public:
  using SyncFn = std::function<void(RunContext)>;
  using AsyncFn = std::function<void(RunContext, CallbackOnComplete)>;

  // The process-wide engine chosen by MX_ENGINE_TYPE. NDArray storage holds
  // Shared() so that the engine outlives every array, even static ones.
  static Engine* Get();
  static std::shared_ptr<Engine> Shared();

  virtual ~Engine() = default;

  // A new variable with no pending operations.
  virtual VarHandle NewVariable() = 0;

  // Pushes an asynchronous operation. fn must call its callback exactly once
  // and must not throw (report failure through the callback). fn and its
  // captures live until fn returns, even when the callback has already run
  // (on another thread). A variable may appear in both lists; it then
  // counts as written.
  void PushAsync(AsyncFn fn, Context ctx, std::vector<VarHandle> const_vars,
                 std::vector<VarHandle> mutable_vars, int priority = 0,
                 const char* name = "", FnProperty prop = FnProperty::kNormal);

  // Pushes a synchronous operation: completion is fn's return; an exception
  // thrown by fn fails the operation.
  void PushSync(SyncFn fn, Context ctx, std::vector<VarHandle> const_vars,
                std::vector<VarHandle> mutable_vars, int priority = 0,
                const char* name = "", FnProperty prop = FnProperty::kNormal);

  // Runs delete_fn once every pending operation on var is complete, then
  // frees var. delete_fn runs even when var carries an error. No operation
  // may be pushed on var afterwards.
  virtual void DeleteVariable(SyncFn delete_fn, Context ctx, VarHandle var) = 0;

  // Blocks until every operation pushed so far that writes var is complete,
  // then rethrows var's error, if any and if no wait on var has yet. While it waits, the
  // calling thread may run ready operations itself (unless a
  // WaitWithoutRunning lives on it), so an operation must not block on
  // something the waiting thread would do after WaitForVar.
  virtual void WaitForVar(VarHandle var) = 0;
  // The same, also waiting for every operation pushed so far that reads
  // var (NDArray::WaitToWrite). The wait is no write: var keeps its error.
  virtual void WaitForVarIdle(VarHandle var) = 0;

  // Blocks until every operation pushed so far is complete, then rethrows the
  // first error not yet reported by WaitForVar.
  virtual void WaitForAll() = 0;

  // Records every operation that completes from now on (tests use this to
  // check the order in which the engine ran work; a timeline view can be
  // built from it). StopTrace returns the events in completion order.
  void StartTrace();
  std::vector<TraceEvent> StopTrace();

  virtual int num_workers() const = 0;
  // "ThreadedEngine" or "NaiveEngine".
  virtual const char* type() const = 0;

 protected:
  // Called (once) through CallbackOnComplete.
  virtual void OnComplete(engine::OprBlock* op, std::exception_ptr error) = 0;
  // Schedules (or, for the naive engine, runs) a new operation.
  virtual void Submit(engine::OprBlock* op) = 0;
  // Runs op's function: a sync one followed by its completion, or an async
  // one with a callback.
  void Execute(engine::OprBlock* op);
  // Adds op to the trace, if one is being recorded; called on completion.
  void Trace(const engine::OprBlock* op);

 private:
  std::atomic<bool> tracing_{false};
  absl::Mutex trace_mu_;
  std::vector<TraceEvent> trace_ ABSL_GUARDED_BY(trace_mu_);
  friend class CallbackOnComplete;
};

// Creates a private engine (tests use this to control the thread count).
std::unique_ptr<Engine> CreateEngine(const EngineOptions& options);

// While one lives on a thread, that thread's waits (WaitForVar, and so
// WaitToRead, WaitToWrite and the host copies) block without running ready
// operations. For threads whose waits are off the path of what the engine
// runs, such as a data prefetcher: a waiter runs queued operations only
// until its own wait ends, so one that took over the training step's chain
// of operations drops it there, and a worker has to be woken to go on
// (traced on 2 cores: gaps of 25-50 us per step in the MLP's loop). Nests.
class WaitWithoutRunning {
 public:
  WaitWithoutRunning();
  ~WaitWithoutRunning();
  WaitWithoutRunning(const WaitWithoutRunning&) = delete;
  WaitWithoutRunning& operator=(const WaitWithoutRunning&) = delete;

 private:
  const bool outer_;
};

}  // namespace mx

#endif  // MX_NDARRAY_ENGINE_H_
