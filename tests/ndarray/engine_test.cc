// Tests of the dependency engine (ndarray/engine.h) on private engines made by
// CreateEngine: the threaded engine with 1, 2 and 4 workers and the naive
// engine must all honour the same contract (dependency order, errors stored
// on variables, deletion after pending operations); the threaded engine also
// runs independent reads in parallel and ready operations by priority.
#include "ndarray/engine.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <ostream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/base.h"
#include "ndarray/context.h"

namespace mx {
namespace {

using ::testing::Each;
using ::testing::HasSubstr;

// The status of the mx::Error thrown by f, or OK when it throws nothing.
absl::Status StatusOfCall(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.status();
  }
  return absl::OkStatus();
}

// Runs f on another thread and gives up on the whole test binary when it has
// not returned within `seconds`: a deadlocked engine must fail the test, not
// hang until Bazel's timeout. Exceptions thrown by f are rethrown here.
void RunOrDie(const std::function<void()>& f, int seconds, const char* what) {
  std::future<void> done = std::async(std::launch::async, f);
  if (done.wait_for(std::chrono::seconds(seconds)) !=
      std::future_status::ready) {
    std::fprintf(stderr, "FATAL: %s did not finish within %d s (deadlock?)\n",
                 what, seconds);
    std::fflush(stderr);
    std::_Exit(1);
  }
  done.get();
}

// A one-shot gate: Wait blocks until Open (or until the timeout, returning
// false), so that a test that goes wrong fails instead of hanging.
class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool Wait(std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

void SleepMs(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

// Keeps one of the engine's workers busy, from construction (once an
// operation is running on it) until Release().
class BusyWorker {
 public:
  explicit BusyWorker(Engine* engine) : var_(engine->NewVariable()) {
    engine->PushSync(
        [this](RunContext) {
          started_.Open();
          release_.Wait();
        },
        cpu(), {}, {var_});
    // Running on a worker (a waiting thread may run queued operations itself).
    EXPECT_TRUE(started_.Wait());
  }
  void Release() { release_.Open(); }
  // Its variable, for the test to delete once the engine is done.
  VarHandle var() const { return var_; }

 private:
  VarHandle var_;
  Gate started_, release_;
};

struct EngineParam {
  const char* name;
  EngineOptions options;
};

void PrintTo(const EngineParam& param, std::ostream* os) { *os << param.name; }

EngineOptions Threaded(int workers) {
  EngineOptions o;
  o.kind = EngineOptions::Kind::kThreaded;
  o.num_workers = workers;
  return o;
}

EngineOptions Naive() {
  EngineOptions o;
  o.kind = EngineOptions::Kind::kNaive;
  return o;
}

class EngineTest : public ::testing::TestWithParam<EngineParam> {
 protected:
  void SetUp() override { engine_ = CreateEngine(GetParam().options); }

  void TearDown() override {
    // Tests check the errors they provoke; drain whatever is left.
    try {
      engine_->WaitForAll();
    } catch (...) {
    }
    for (VarHandle v : vars_) {
      engine_->DeleteVariable([](RunContext) {}, cpu(), v);
    }
    RunOrDie([this] { engine_.reset(); }, 60, "engine shutdown");
  }

  VarHandle NewVar() {
    vars_.push_back(engine_->NewVariable());
    return vars_.back();
  }

  bool naive() const {
    return GetParam().options.kind == EngineOptions::Kind::kNaive;
  }

  std::unique_ptr<Engine> engine_;
  std::vector<VarHandle> vars_;
};

TEST_P(EngineTest, ReportsItsKindAndWorkerCount) {
  if (naive()) {
    EXPECT_STREQ(engine_->type(), "NaiveEngine");
    EXPECT_EQ(engine_->num_workers(), 0);
  } else {
    EXPECT_STREQ(engine_->type(), "ThreadedEngine");
    EXPECT_EQ(engine_->num_workers(), GetParam().options.num_workers);
  }
}

TEST_P(EngineTest, ReadsPushedAfterAWriteSeeTheWrite) {
  VarHandle x = NewVar();
  int value = 0;  // guarded by x
  engine_->PushSync(
      [&](RunContext) {
        SleepMs(20);
        value = 42;
      },
      cpu(), {}, {x});
  std::vector<int> seen(8, -1);
  for (int i = 0; i < 8; ++i) {
    engine_->PushSync([&, i](RunContext) { seen[i] = value; }, cpu(), {x}, {});
  }
  engine_->WaitForAll();
  EXPECT_THAT(seen, ::testing::Each(42));
}

TEST_P(EngineTest, WriteAfterReadsWaitsForEveryRead) {
  VarHandle x = NewVar();
  std::atomic<int> reads_done{0};
  int reads_seen_by_write = -1;
  constexpr int kReads = 6;
  for (int i = 0; i < kReads; ++i) {
    engine_->PushSync(
        [&, i](RunContext) {
          SleepMs(2 + 3 * (i % 3));
          reads_done.fetch_add(1);
        },
        cpu(), {x}, {});
  }
  engine_->PushSync(
      [&](RunContext) { reads_seen_by_write = reads_done.load(); }, cpu(), {},
      {x});
  engine_->WaitForAll();
  EXPECT_EQ(reads_seen_by_write, kReads);
}

TEST_P(EngineTest, WritesToOneVariableRunInPushOrder) {
  VarHandle x = NewVar();
  std::vector<int> order;  // guarded by x
  for (int i = 0; i < 300; ++i) {
    engine_->PushSync(
        [&, i](RunContext) {
          if (i % 50 == 0) SleepMs(1);
          order.push_back(i);
        },
        cpu(), {}, {x});
  }
  engine_->WaitForVar(x);
  ASSERT_EQ(order.size(), 300u);
  for (int i = 0; i < 300; ++i) ASSERT_EQ(order[i], i) << "at position " << i;
}

TEST_P(EngineTest, ReadsBetweenWritesSeeTheLatestEarlierWrite) {
  VarHandle x = NewVar();
  int value = 0;  // guarded by x
  std::vector<int> seen(20, -1);
  for (int round = 0; round < 20; ++round) {
    engine_->PushSync([&, round](RunContext) { value = round * 10; }, cpu(), {},
                      {x});
    engine_->PushSync(
        [&, round](RunContext) {
          SleepMs(round % 3);
          seen[round] = value;
        },
        cpu(), {x}, {});
  }
  engine_->WaitForAll();
  for (int round = 0; round < 20; ++round) EXPECT_EQ(seen[round], round * 10);
}

TEST_P(EngineTest, VariableInBothListsCountsAsWritten) {
  VarHandle x = NewVar();
  std::atomic<bool> writer_running{false};
  std::atomic<int> overlaps{0};
  // Reads before and after the read-write op must not overlap with it.
  for (int i = 0; i < 3; ++i) {
    engine_->PushSync(
        [&](RunContext) {
          if (writer_running) ++overlaps;
          SleepMs(5);
          if (writer_running) ++overlaps;
        },
        cpu(), {x}, {});
  }
  engine_->PushSync(
      [&](RunContext) {
        writer_running = true;
        SleepMs(20);
        writer_running = false;
      },
      cpu(), {x}, {x});
  for (int i = 0; i < 3; ++i) {
    engine_->PushSync(
        [&](RunContext) {
          if (writer_running) ++overlaps;
        },
        cpu(), {x}, {});
  }
  engine_->WaitForAll();
  EXPECT_EQ(overlaps.load(), 0);
}

TEST_P(EngineTest, WaitForVarWaitsForPendingWrites) {
  VarHandle x = NewVar();
  std::atomic<int> value{0};
  engine_->PushSync(
      [&](RunContext) {
        SleepMs(50);
        value = 7;
      },
      cpu(), {}, {x});
  engine_->WaitForVar(x);
  EXPECT_EQ(value.load(), 7);
}

TEST_P(EngineTest, WaitForAllWaitsForEveryOperation) {
  std::vector<VarHandle> vars = {NewVar(), NewVar(), NewVar()};
  std::atomic<int> done{0};
  for (int i = 0; i < 60; ++i) {
    engine_->PushSync(
        [&, i](RunContext) {
          if (i % 10 == 0) SleepMs(3);
          done.fetch_add(1);
        },
        cpu(), {vars[(i + 1) % 3]}, {vars[i % 3]});
  }
  engine_->WaitForAll();
  EXPECT_EQ(done.load(), 60);
}

TEST_P(EngineTest, OperationIsToldItsContext) {
  VarHandle x = NewVar();
  Context seen = cpu(0);
  engine_->PushSync([&](RunContext rctx) { seen = rctx.ctx; }, cpu(3), {}, {x});
  engine_->WaitForVar(x);
  EXPECT_EQ(seen, cpu(3));
}

// ---- Stress: random operations against a sequential reference.

// Per-variable bookkeeping that detects an operation running while another
// one conflicts with it.
struct Guarded {
  uint64_t value = 0;
  std::atomic<int> writers{0};
  std::atomic<int> readers{0};
};

struct RandomOp {
  std::vector<int> reads;  // indices into the variables, disjoint from writes
  std::vector<int> writes;
  bool declare_write_as_read_too = false;
  uint64_t salt = 0;
};

// The deterministic, order-sensitive update an operation applies.
uint64_t Mix(uint64_t old, uint64_t read_sum, uint64_t salt, int w) {
  return old * 6364136223846793005ULL + read_sum +
         salt * 1442695040888963407ULL + static_cast<uint64_t>(w);
}

RandomOp MakeRandomOp(std::mt19937& rng, int num_vars, uint64_t salt) {
  std::bernoulli_distribution pick(0.3);
  RandomOp op;
  op.salt = salt;
  for (int v = 0; v < num_vars; ++v) {
    if (pick(rng)) {
      op.reads.push_back(v);
    } else if (pick(rng)) {
      op.writes.push_back(v);
    }
  }
  if (op.writes.empty()) {
    int v = std::uniform_int_distribution<int>(0, num_vars - 1)(rng);
    op.reads.erase(std::remove(op.reads.begin(), op.reads.end(), v),
                   op.reads.end());
    op.writes.push_back(v);
  }
  op.declare_write_as_read_too = std::bernoulli_distribution(0.1)(rng);
  return op;
}

// Applies op to `vars` (the real state, or the reference state).
void ApplyOp(const RandomOp& op, std::vector<Guarded>& vars) {
  uint64_t read_sum = 0;
  for (int r : op.reads) read_sum += vars[r].value;
  for (int w : op.writes)
    vars[w].value = Mix(vars[w].value, read_sum, op.salt, w);
}

// The body of op as an engine operation: applies it and counts any overlap
// with a conflicting operation.
std::function<void(RunContext)> GuardedBody(const RandomOp& op,
                                            std::vector<Guarded>* vars,
                                            std::atomic<int>* violations) {
  return [op, vars, violations](RunContext) {
    std::vector<Guarded>& v = *vars;
    for (int w : op.writes) {
      if (v[w].writers.fetch_add(1) != 0 || v[w].readers.load() != 0) {
        ++*violations;
      }
    }
    for (int r : op.reads) {
      v[r].readers.fetch_add(1);
      if (v[r].writers.load() != 0) ++*violations;
    }
    ApplyOp(op, v);
    for (int r : op.reads) v[r].readers.fetch_sub(1);
    for (int w : op.writes) v[w].writers.fetch_sub(1);
  };
}

void PushRandomOp(Engine* engine, const RandomOp& op,
                  const std::vector<VarHandle>& handles,
                  std::vector<Guarded>* vars, std::atomic<int>* violations,
                  int priority) {
  std::vector<VarHandle> const_vars, mutable_vars;
  for (int r : op.reads) const_vars.push_back(handles[r]);
  for (int w : op.writes) {
    mutable_vars.push_back(handles[w]);
    if (op.declare_write_as_read_too) const_vars.push_back(handles[w]);
  }
  engine->PushSync(GuardedBody(op, vars, violations), cpu(), const_vars,
                   mutable_vars, priority);
}

TEST_P(EngineTest, RandomOperationsFromOneThreadMatchSequentialExecution) {
  constexpr int kVars = 6;
  constexpr int kOps = 5000;
  std::vector<VarHandle> handles;
  for (int i = 0; i < kVars; ++i) handles.push_back(NewVar());
  std::vector<Guarded> state(kVars), reference(kVars);
  for (int i = 0; i < kVars; ++i) state[i].value = reference[i].value = i + 1;

  std::mt19937 rng(20240611);
  std::atomic<int> violations{0};
  for (int i = 0; i < kOps; ++i) {
    RandomOp op = MakeRandomOp(rng, kVars, i);
    ApplyOp(op, reference);
    // Priorities must not reorder conflicting operations.
    int priority = std::uniform_int_distribution<int>(-2, 2)(rng);
    PushRandomOp(engine_.get(), op, handles, &state, &violations, priority);
  }
  RunOrDie([this] { engine_->WaitForAll(); }, 60, "WaitForAll");
  EXPECT_EQ(violations.load(), 0);
  for (int i = 0; i < kVars; ++i) {
    EXPECT_EQ(state[i].value, reference[i].value) << "variable " << i;
  }
}

TEST_P(EngineTest, RandomOperationsFromSeveralThreadsMatchReference) {
  // Each pushing thread owns three variables that its operations read and
  // update in an order-sensitive way (so the result depends on the engine
  // keeping that thread's push order), and every thread's operations also
  // add to two shared variables (commutative, so the final value does not
  // depend on how pushes from different threads interleave).
  constexpr int kThreads = 4;
  constexpr int kOwn = 3;
  constexpr int kShared = 2;
  constexpr int kOpsPerThread = 2000;
  const int num_vars = kThreads * kOwn + kShared;
  std::vector<VarHandle> handles;
  for (int i = 0; i < num_vars; ++i) handles.push_back(NewVar());
  std::vector<Guarded> state(num_vars), reference(num_vars);
  std::atomic<int> violations{0};

  // Operations are generated up front so that the reference is exact.
  struct ThreadOp {
    RandomOp own;             // on the thread's own variables
    std::vector<int> shared;  // indices of the shared variables it adds to
    uint64_t add = 0;
  };
  std::vector<std::vector<ThreadOp>> plans(kThreads);
  uint64_t shared_total[kShared] = {0, 0};
  for (int t = 0; t < kThreads; ++t) {
    std::mt19937 rng(1000 + t);
    for (int i = 0; i < kOpsPerThread; ++i) {
      ThreadOp op;
      op.own = MakeRandomOp(rng, kOwn, static_cast<uint64_t>(t) << 32 | i);
      for (int& r : op.own.reads) r += t * kOwn;
      for (int& w : op.own.writes) w += t * kOwn;
      op.add = static_cast<uint64_t>(t * 100000 + i);
      for (int s = 0; s < kShared; ++s) {
        if (std::bernoulli_distribution(0.5)(rng)) {
          op.shared.push_back(kThreads * kOwn + s);
          shared_total[s] += op.add;
        }
      }
      ApplyOp(op.own, reference);  // one thread's ops, in its push order
      plans[t].push_back(op);
    }
  }

  auto push_all = [&](int t) {
    for (const ThreadOp& op : plans[t]) {
      const std::vector<int>& shared_ids = op.shared;
      std::vector<VarHandle> const_vars, mutable_vars;
      for (int r : op.own.reads) const_vars.push_back(handles[r]);
      for (int w : op.own.writes) mutable_vars.push_back(handles[w]);
      for (int s : shared_ids) mutable_vars.push_back(handles[s]);
      std::function<void(RunContext)> own_body =
          GuardedBody(op.own, &state, &violations);
      const uint64_t add = op.add;
      engine_->PushSync(
          [own_body, shared_ids, add, &state, &violations](RunContext rctx) {
            for (int s : shared_ids) {
              if (state[s].writers.fetch_add(1) != 0) ++violations;
            }
            own_body(rctx);
            for (int s : shared_ids) {
              state[s].value += add;
              state[s].writers.fetch_sub(1);
            }
          },
          cpu(), const_vars, mutable_vars);
    }
  };
  RunOrDie(
      [&] {
        std::vector<std::thread> pushers;
        for (int t = 0; t < kThreads; ++t) pushers.emplace_back(push_all, t);
        for (std::thread& p : pushers) p.join();
        engine_->WaitForAll();
      },
      60, "pushing from several threads and WaitForAll");

  EXPECT_EQ(violations.load(), 0);
  for (int i = 0; i < kThreads * kOwn; ++i) {
    EXPECT_EQ(state[i].value, reference[i].value) << "own variable " << i;
  }
  for (int s = 0; s < kShared; ++s) {
    EXPECT_EQ(state[kThreads * kOwn + s].value, shared_total[s])
        << "shared variable " << s;
  }
}

// ---- Errors.

TEST_P(EngineTest, FailedOperationStoresItsErrorOnEveryWrittenVariable) {
  VarHandle x = NewVar(), y = NewVar(), input = NewVar();
  engine_->PushSync(
      [](RunContext) {
        throw Error(absl::InvalidArgumentError("kernel exploded on row 7"));
      },
      cpu(), {input}, {x, y});
  for (VarHandle v : {x, y}) {
    absl::Status s = StatusOfCall([&] { engine_->WaitForVar(v); });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("kernel exploded on row 7"));
  }
  // Only written variables carry the error.
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForVar(input); }).ok());
}

TEST_P(EngineTest, WaitForVarReportsAnErrorOnlyOnce) {
  VarHandle x = NewVar();
  engine_->PushSync(
      [](RunContext) { throw Error(absl::InternalError("once only")); }, cpu(),
      {}, {x});
  EXPECT_EQ(StatusOfCall([&] { engine_->WaitForVar(x); }).code(),
            absl::StatusCode::kInternal);
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForVar(x); }).ok());
}

// As in MXNet: a caller that has been told of an error and goes on is not
// stopped by it again. Variables that carry it still throw it to their own
// waiters until an operation writes them successfully.
TEST_P(EngineTest, AReportedErrorNoLongerSkipsOperations) {
  VarHandle x = NewVar(), y = NewVar(), z = NewVar();
  engine_->PushSync([](RunContext) { throw Error(absl::InternalError("step 3 failed")); }, cpu(),
                    {}, {x, y});
  std::atomic<bool> ran{false};
  engine_->PushSync([&](RunContext) { ran = true; }, cpu(), {y}, {z});
  EXPECT_FALSE(StatusOfCall([&] { engine_->WaitForVar(z); }).ok());
  EXPECT_FALSE(ran.load()) << "ran before anyone was told of the error";
  // z's waiter was told; y still carries the error for its own waiters.
  engine_->PushSync([&](RunContext) { ran = true; }, cpu(), {y}, {z});
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForVar(z); }).ok());
  EXPECT_TRUE(ran.load());
  EXPECT_THAT(std::string(StatusOfCall([&] { engine_->WaitForVar(y); }).message()),
              HasSubstr("step 3 failed"));
  // A successful write clears x's copy of it.
  engine_->PushSync([](RunContext) {}, cpu(), {}, {x});
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForVar(x); }).ok());
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForAll(); }).ok());
}

// Waiting for a variable's readers and writers (NDArray::WaitToWrite) is no
// write: once an error was reported through another variable of the failed
// operation, a no-op write ran, cleared x's error, and x's waiters were
// told nothing of it.
TEST_P(EngineTest, WaitingForReadersAndWritersKeepsTheError) {
  VarHandle x = NewVar(), y = NewVar();
  engine_->PushSync([](RunContext) { throw Error(absl::InternalError("the failed step")); }, cpu(),
                    {}, {x, y});
  EXPECT_FALSE(StatusOfCall([&] { engine_->WaitForVar(y); }).ok());
  EXPECT_THAT(std::string(StatusOfCall([&] { engine_->WaitForVarIdle(x); }).message()),
              HasSubstr("the failed step"));
  // Thrown once per variable, as by WaitForVar.
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForVar(x); }).ok());
}

// ... and it waits for the readers too (WaitForVar does not).
TEST_P(EngineTest, WaitingForAVariableIdleWaitsForItsReaders) {
  if (std::string(engine_->type()) == "NaiveEngine") GTEST_SKIP() << "no operation waits";
  VarHandle x = NewVar(), out = NewVar();
  std::function<void()> finish_read;
  absl::Notification reading;
  engine_->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        finish_read = [done] { done(); };
        reading.Notify();
      },
      cpu(), {x}, {out});
  reading.WaitForNotification();
  absl::Notification idle;
  std::thread waiter([&] {
    engine_->WaitForVarIdle(x);
    idle.Notify();
  });
  EXPECT_FALSE(idle.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
  finish_read();
  EXPECT_TRUE(idle.WaitForNotificationWithTimeout(absl::Seconds(10)));
  waiter.join();
  engine_->WaitForAll();
}

// The report divides by when operations were made, not when they run: one
// made before it, still waiting when the error is reported, is skipped
// (the naive engine runs every operation at once, so it has none such).
TEST_P(EngineTest, AnOperationMadeBeforeTheReportIsSkippedEvenIfItRunsAfter) {
  if (std::string(engine_->type()) == "NaiveEngine") GTEST_SKIP() << "no operation waits";
  VarHandle x = NewVar(), gate = NewVar(), z = NewVar();
  std::function<void()> open_gate;
  absl::Notification gate_running;
  engine_->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        open_gate = [done] { done(); };
        gate_running.Notify();
      },
      cpu(), {}, {gate});
  gate_running.WaitForNotification();
  engine_->PushSync([](RunContext) { throw Error(absl::InternalError("the failed step")); }, cpu(),
                    {}, {x});
  std::atomic<bool> ran{false};
  engine_->PushSync([&](RunContext) { ran = true; }, cpu(), {x, gate}, {z});
  EXPECT_FALSE(StatusOfCall([&] { engine_->WaitForVar(x); }).ok());
  open_gate();
  EXPECT_THAT(std::string(StatusOfCall([&] { engine_->WaitForVar(z); }).message()),
              HasSubstr("the failed step"));
  EXPECT_FALSE(ran.load());
}

TEST_P(EngineTest, ForeignExceptionTypeIsRethrownUnchanged) {
  VarHandle x = NewVar();
  engine_->PushSync([](RunContext) { throw std::out_of_range("index 12 > 3"); },
                    cpu(), {}, {x});
  try {
    engine_->WaitForVar(x);
    FAIL() << "WaitForVar did not throw";
  } catch (const std::out_of_range& e) {
    EXPECT_STREQ(e.what(), "index 12 > 3");
  }
}

TEST_P(EngineTest, EngineKeepsRunningAfterAFailure) {
  VarHandle x = NewVar(), other = NewVar();
  engine_->PushSync([](RunContext) { throw Error(absl::AbortedError("boom")); },
                    cpu(), {}, {x});
  EXPECT_EQ(StatusOfCall([&] { engine_->WaitForVar(x); }).code(),
            absl::StatusCode::kAborted);
  int value = 0;
  engine_->PushSync([&](RunContext) { value = 5; }, cpu(), {}, {x});
  engine_->WaitForVar(x);
  EXPECT_EQ(value, 5);
  int other_value = 0;
  engine_->PushSync([&](RunContext) { other_value = 9; }, cpu(), {}, {other});
  engine_->WaitForVar(other);
  EXPECT_EQ(other_value, 9);
}

TEST_P(EngineTest,
       OperationReadingAFailedVariableIsSkippedAndPassesTheErrorOn) {
  VarHandle x = NewVar(), z = NewVar(), w = NewVar();
  engine_->PushSync(
      [](RunContext) { throw Error(absl::DataLossError("bad input batch 3")); },
      cpu(), {}, {x});
  std::atomic<bool> ran{false};
  engine_->PushSync([&](RunContext) { ran = true; }, cpu(), {x}, {z});
  // And further down the chain.
  engine_->PushSync([&](RunContext) { ran = true; }, cpu(), {z}, {w});
  absl::Status s = StatusOfCall([&] { engine_->WaitForVar(w); });
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("bad input batch 3"));
  s = StatusOfCall([&] { engine_->WaitForVar(z); });
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(ran.load());
}

TEST_P(EngineTest, OperationWritingAFailedVariableIsSkipped) {
  VarHandle x = NewVar();
  engine_->PushSync(
      [](RunContext) {
        throw Error(absl::InternalError("first write failed"));
      },
      cpu(), {}, {x});
  std::atomic<bool> ran{false};
  engine_->PushSync([&](RunContext) { ran = true; }, cpu(), {}, {x});
  absl::Status s = StatusOfCall([&] { engine_->WaitForVar(x); });
  EXPECT_THAT(std::string(s.message()), HasSubstr("first write failed"));
  EXPECT_FALSE(ran.load());
}

TEST_P(EngineTest, WaitForAllRethrowsAnErrorNobodyWaitedFor) {
  VarHandle x = NewVar();
  engine_->PushSync(
      [](RunContext) { throw Error(absl::UnavailableError("lost worker 2")); },
      cpu(), {}, {x});
  absl::Status s = StatusOfCall([&] { engine_->WaitForAll(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(s.message()), HasSubstr("lost worker 2"));
  // Reported once.
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForAll(); }).ok());
}

TEST_P(EngineTest, WaitForAllDoesNotRethrowAnErrorReportedByWaitForVar) {
  VarHandle x = NewVar(), y = NewVar();
  engine_->PushSync(
      [](RunContext) {
        throw Error(absl::InternalError("seen by WaitForVar"));
      },
      cpu(), {}, {x});
  EXPECT_FALSE(StatusOfCall([&] { engine_->WaitForVar(x); }).ok());
  engine_->PushSync([](RunContext) {}, cpu(), {}, {y});
  EXPECT_TRUE(StatusOfCall([&] { engine_->WaitForAll(); }).ok());
}

TEST_P(EngineTest, WaitForAllReportsTheUnreportedErrorAmongSeveral) {
  VarHandle x = NewVar(), y = NewVar();
  engine_->PushSync(
      [](RunContext) { throw Error(absl::InternalError("error on x")); }, cpu(),
      {}, {x});
  engine_->PushSync(
      [](RunContext) { throw Error(absl::InternalError("error on y")); }, cpu(),
      {}, {y});
  EXPECT_THAT(
      std::string(StatusOfCall([&] { engine_->WaitForVar(x); }).message()),
      HasSubstr("error on x"));
  absl::Status s = StatusOfCall([&] { engine_->WaitForAll(); });
  EXPECT_THAT(std::string(s.message()), HasSubstr("error on y"));
}

// ---- Deletion.

TEST_P(EngineTest, DeleteVariableRunsAfterPendingWritesAndReads) {
  VarHandle x = engine_->NewVariable();  // deleted by the test itself
  std::atomic<int> writes{0}, reads{0};
  std::atomic<int> writes_seen{-1}, reads_seen{-1};
  for (int i = 0; i < 3; ++i) {
    engine_->PushSync(
        [&](RunContext) {
          SleepMs(5);
          writes.fetch_add(1);
        },
        cpu(), {}, {x});
  }
  for (int i = 0; i < 3; ++i) {
    engine_->PushSync(
        [&](RunContext) {
          SleepMs(5);
          reads.fetch_add(1);
        },
        cpu(), {x}, {});
  }
  std::atomic<bool> deleted{false};
  engine_->DeleteVariable(
      [&](RunContext) {
        writes_seen = writes.load();
        reads_seen = reads.load();
        deleted = true;
      },
      cpu(), x);
  engine_->WaitForAll();
  EXPECT_TRUE(deleted.load());
  EXPECT_EQ(writes_seen.load(), 3);
  EXPECT_EQ(reads_seen.load(), 3);
}

TEST_P(EngineTest, DeleteVariableRunsEvenWhenTheVariableCarriesAnError) {
  VarHandle x = engine_->NewVariable();
  engine_->PushSync(
      [](RunContext) { throw Error(absl::InternalError("dead")); }, cpu(), {},
      {x});
  std::atomic<bool> deleted{false};
  engine_->DeleteVariable([&](RunContext) { deleted = true; }, cpu(), x);
  // The error nobody waited for is still reported.
  EXPECT_THAT(
      std::string(StatusOfCall([&] { engine_->WaitForAll(); }).message()),
      HasSubstr("dead"));
  EXPECT_TRUE(deleted.load());
}

// ---- Asynchronous operations.

TEST_P(EngineTest,
       AsyncOperationCompletesWhenItsCallbackIsCalledFromAnotherThread) {
  VarHandle x = NewVar();
  std::atomic<int> value{0};
  std::mutex threads_mu;
  std::vector<std::thread> threads;
  engine_->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        std::lock_guard<std::mutex> lock(threads_mu);
        threads.emplace_back([&value, done] {
          SleepMs(30);
          value = 11;
          done();
        });
      },
      cpu(), {}, {x});
  int seen = -1;
  engine_->PushSync([&](RunContext) { seen = value.load(); }, cpu(), {x}, {});
  engine_->WaitForAll();
  EXPECT_EQ(seen, 11);
  std::lock_guard<std::mutex> lock(threads_mu);
  for (std::thread& t : threads) t.join();
}

// An async function that starts work which completes at once (the callback
// runs before the function returns, as when the last RPC it starts answers
// first) still has its captures until it returns: the engine does not
// destroy a running function when the operation completes.
TEST_P(EngineTest, AsyncFunctionOutlivesAnEarlyCallback) {
  VarHandle x = NewVar();
  struct Watch {
    explicit Watch(std::atomic<bool>* d) : destroyed(d) {}
    ~Watch() { destroyed->store(true); }
    std::atomic<bool>* destroyed;
  };
  std::atomic<bool> destroyed{false};
  std::atomic<bool> alive_after_done{false};
  auto watch = std::make_shared<Watch>(&destroyed);
  engine_->PushAsync(
      [watch, &destroyed, &alive_after_done](RunContext, CallbackOnComplete done) {
        done();
        SleepMs(20);  // the engine has completed (and freed) the operation
        alive_after_done = !destroyed.load() && watch->destroyed != nullptr;
      },
      cpu(), {}, {x});
  watch.reset();  // the function's capture is now the only owner
  engine_->WaitForAll();
  SleepMs(40);
  EXPECT_TRUE(alive_after_done.load());
  EXPECT_TRUE(destroyed.load());  // and freed once it returned
}

TEST_P(EngineTest, AsyncOperationFailsThroughItsCallback) {
  VarHandle x = NewVar();
  std::mutex threads_mu;
  std::vector<std::thread> threads;
  engine_->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        std::lock_guard<std::mutex> lock(threads_mu);
        threads.emplace_back([done] {
          SleepMs(10);
          done(std::make_exception_ptr(
              Error(absl::DeadlineExceededError("rpc timed out after 10 ms"))));
        });
      },
      cpu(), {}, {x});
  absl::Status s = StatusOfCall([&] { engine_->WaitForVar(x); });
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(s.message()), HasSubstr("rpc timed out"));
  std::lock_guard<std::mutex> lock(threads_mu);
  for (std::thread& t : threads) t.join();
}

INSTANTIATE_TEST_SUITE_P(
    AllEngines, EngineTest,
    ::testing::Values(EngineParam{"Threaded1", Threaded(1)},
                      EngineParam{"Threaded2", Threaded(2)},
                      EngineParam{"Threaded4", Threaded(4)},
                      EngineParam{"Naive", Naive()}),
    [](const ::testing::TestParamInfo<EngineParam>& info) {
      return std::string(info.param.name);
    });

// ---- Behaviour specific to the threaded engine.

TEST(ThreadedEngine, IndependentReadsOfOneVariableRunConcurrently) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  VarHandle x = engine->NewVariable();
  std::atomic<int> arrived{0};
  std::atomic<int> met{0};
  for (int i = 0; i < 2; ++i) {
    engine->PushSync(
        [&](RunContext) {
          arrived.fetch_add(1);
          // Each read waits (bounded) for the other to have started.
          for (int spin = 0; spin < 10000 && arrived.load() < 2; ++spin) {
            SleepMs(1);
          }
          if (arrived.load() == 2) met.fetch_add(1);
        },
        cpu(), {x}, {});
  }
  engine->WaitForAll();
  EXPECT_EQ(met.load(), 2) << "reads of one variable were serialized";
  engine->DeleteVariable([](RunContext) {}, cpu(), x);
}

TEST(ThreadedEngine, HigherPriorityReadyOperationRunsFirst) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(1));
  VarHandle blocker_var = engine->NewVariable();
  VarHandle low_var = engine->NewVariable();
  VarHandle high_var = engine->NewVariable();
  Gate started, release;
  engine->PushSync(
      [&](RunContext) {
        started.Open();
        release.Wait();
      },
      cpu(), {}, {blocker_var});
  ASSERT_TRUE(started.Wait());
  std::mutex mu;
  std::vector<std::string> order;
  engine->PushSync(
      [&](RunContext) {
        std::lock_guard<std::mutex> lock(mu);
        order.push_back("low");
      },
      cpu(), {}, {low_var}, /*priority=*/0);
  engine->PushSync(
      [&](RunContext) {
        std::lock_guard<std::mutex> lock(mu);
        order.push_back("high");
      },
      cpu(), {}, {high_var}, /*priority=*/10);
  release.Open();
  engine->WaitForAll();
  EXPECT_THAT(order, ::testing::ElementsAre("high", "low"));
  for (VarHandle v : {blocker_var, low_var, high_var}) {
    engine->DeleteVariable([](RunContext) {}, cpu(), v);
  }
}

TEST(ThreadedEngine, ReadyOperationsRunByPriorityThenPushOrder) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(1));
  VarHandle blocker_var = engine->NewVariable();
  Gate started, release;
  engine->PushSync(
      [&](RunContext) {
        started.Open();
        release.Wait();
      },
      cpu(), {}, {blocker_var});
  ASSERT_TRUE(started.Wait());
  const std::vector<int> priorities = {1, 5, -3, 5, 0, 1, 7};
  std::vector<VarHandle> vars;
  std::vector<int> order;  // only the single worker appends
  for (size_t i = 0; i < priorities.size(); ++i) {
    vars.push_back(engine->NewVariable());
    engine->PushSync([&order, i](RunContext) { order.push_back(i); }, cpu(), {},
                     {vars.back()}, priorities[i]);
  }
  release.Open();
  engine->WaitForAll();
  // 7 (#6), 5 (#1, #3 in push order), 1 (#0, #5), 0 (#4), -3 (#2).
  EXPECT_THAT(order, ::testing::ElementsAre(6, 1, 3, 0, 5, 4, 2));
  vars.push_back(blocker_var);
  for (VarHandle v : vars) engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

TEST(ThreadedEngine, PriorityDoesNotReorderDependentOperations) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  VarHandle x = engine->NewVariable();
  std::vector<int> order;  // guarded by x
  for (int i = 0; i < 10; ++i) {
    engine->PushSync([&order, i](RunContext) { order.push_back(i); }, cpu(), {},
                     {x}, /*priority=*/i);
  }
  engine->WaitForAll();
  EXPECT_THAT(order, ::testing::ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9));
  engine->DeleteVariable([](RunContext) {}, cpu(), x);
}

TEST(ThreadedEngine, DestructorFinishesPendingOperations) {
  std::atomic<int> done{0};
  {
    std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
    VarHandle x = engine->NewVariable();
    for (int i = 0; i < 20; ++i) {
      engine->PushSync(
          [&](RunContext) {
            SleepMs(1);
            done.fetch_add(1);
          },
          cpu(), {}, {x});
    }
    engine->DeleteVariable([](RunContext) {}, cpu(), x);
  }
  EXPECT_EQ(done.load(), 20);
}

TEST(ThreadedEngine, WaitForVarReturnsWhileUnrelatedWorkIsBlocked) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  BusyWorker busy(engine.get());
  VarHandle x = engine->NewVariable();
  int value = 0;
  engine->PushSync([&](RunContext) { value = 3; }, cpu(), {}, {x});
  RunOrDie([&] { engine->WaitForVar(x); }, 10, "WaitForVar");
  EXPECT_EQ(value, 3);
  busy.Release();
  engine->WaitForAll();
  for (VarHandle v : {busy.var(), x}) engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

// The end of an asynchronous operation (an RPC answered on a network
// thread) wakes its waiter from that thread: the waiter does not wait for a
// worker, even when every worker is busy.
TEST(ThreadedEngine, AWaiterWakesWhenItsOperationEndsWhileEveryWorkerIsBusy) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(1));
  BusyWorker busy(engine.get());  // the only worker
  VarHandle x = engine->NewVariable();
  std::thread network;
  engine->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        network = std::thread([done] {
          SleepMs(20);
          done();
        });
      },
      cpu(), {}, {x});
  RunOrDie([&] { engine->WaitForVar(x); }, 10, "WaitForVar while the worker is busy");
  busy.Release();
  network.join();
  engine->WaitForAll();
  for (VarHandle v : {busy.var(), x}) engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

// A kInline operation (one that only starts RPCs) runs on the thread that
// makes it ready: the pusher when it is ready at once, else the thread that
// ends its last dependency; never on a worker (here the only one is busy).
TEST(ThreadedEngine, InlineOperationsRunWhereTheyBecomeReady) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(1));
  BusyWorker busy(engine.get());  // the only worker
  VarHandle x = engine->NewVariable(), y = engine->NewVariable();
  std::thread::id ran_on;
  engine->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        ran_on = std::this_thread::get_id();
        done();
      },
      cpu(), {}, {x}, 0, "ready at once", FnProperty::kInline);
  EXPECT_EQ(ran_on, std::this_thread::get_id()) << "not run by its pusher";

  std::thread network;
  std::thread::id network_id;
  Gate pushed;
  engine->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        network = std::thread([&, done] {
          network_id = std::this_thread::get_id();
          pushed.Wait();
          done();
        });
      },
      cpu(), {}, {y}, 0, "ends on another thread", FnProperty::kInline);
  engine->PushAsync(
      [&](RunContext, CallbackOnComplete done) {
        ran_on = std::this_thread::get_id();
        done();
      },
      cpu(), {y}, {x}, 0, "after it", FnProperty::kInline);
  pushed.Open();
  RunOrDie([&] { engine->WaitForVar(x); }, 10, "WaitForVar while the worker is busy");
  network.join();
  EXPECT_EQ(ran_on, network_id) << "not run by the thread that ended its dependency";
  busy.Release();
  engine->WaitForAll();
  for (VarHandle v : {busy.var(), x, y}) engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

// Voluntary context switches of every thread of this process but the
// calling one.
long OtherThreadsSleeps() {
  rusage all, self;
  getrusage(RUSAGE_SELF, &all);
  getrusage(RUSAGE_THREAD, &self);
  return all.ru_nvcsw - self.ru_nvcsw;
}

// While a product (kCpuParallel) holds the cores no other operation may
// start, so operations pushed meanwhile must not wake the other workers:
// each such wake-up found no work and cost two context switches (in VMs
// 10-50 us each; about half of the MLP training loop's switches).
TEST(ThreadedEngine, OperationsPushedDuringAProductWakeNoWorker) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  VarHandle p = engine->NewVariable();
  Gate started, release;
  engine->PushSync(
      [&](RunContext) {
        started.Open();
        release.Wait();
      },
      cpu(), {}, {p}, 0, "product", FnProperty::kCpuParallel);
  ASSERT_TRUE(started.Wait());
  SleepMs(20);  // the other worker is asleep by now
  std::vector<VarHandle> vars;
  std::atomic<int> ran{0};
  const long before = OtherThreadsSleeps();
  for (int i = 0; i < 50; ++i) {
    vars.push_back(engine->NewVariable());
    engine->PushSync([&](RunContext) { ran.fetch_add(1); }, cpu(), {}, {vars.back()});
    // Spin (not sleep: that would switch this thread) long enough for a
    // woken worker to look and fall asleep again.
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(300);
    while (std::chrono::steady_clock::now() < until) {}
  }
  const long woken = OtherThreadsSleeps() - before;
  EXPECT_EQ(ran.load(), 0) << "an operation started beside the product";
  EXPECT_LT(woken, 10) << "workers were woken while no operation could start";
  release.Open();
  engine->WaitForAll();
  EXPECT_EQ(ran.load(), 50);
  vars.push_back(p);
  for (VarHandle v : vars) engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

// A worker that ends an operation takes the next ready one itself, so the
// operations that its completion makes ready must not wake another worker
// for the first of them: the woken thread found the work taken (or took it
// and left this one idle), and in VMs it was often placed on the waker's
// core, preempting it; in the MLP's training loop that was a context-switch
// pair for most of a step's small operations.
TEST(ThreadedEngine, AChainOfOperationsWakesNoOtherWorker) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  VarHandle v = engine->NewVariable();
  Gate release;
  engine->PushSync([&](RunContext) { release.Wait(); }, cpu(), {}, {v}, 0, "gate");
  constexpr int kOps = 200;
  std::vector<int> order;
  for (int i = 0; i < kOps; ++i) {
    engine->PushSync(
        [&order, i](RunContext) {
          order.push_back(i);
          const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
          while (std::chrono::steady_clock::now() < until) {}
        },
        cpu(), {}, {v});
  }
  SleepMs(20);  // the other worker is asleep by now
  const long before = OtherThreadsSleeps();
  release.Open();
  engine->WaitForAll();
  const long woken = OtherThreadsSleeps() - before;
  ASSERT_EQ(order.size(), static_cast<size_t>(kOps));
  for (int i = 0; i < kOps; ++i) ASSERT_EQ(order[i], i);
  EXPECT_LT(woken, 10) << "a chain of " << kOps << " operations woke the other worker";
  engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

// A worker that ends an operation takes the next ready one itself,
// whichever worker it is, products included: the chain does not move to
// worker 0 when worker 0 frees up (each move cost a wake-up, 20-40 us in
// VMs, during which nothing ran).
TEST(ThreadedEngine, AChainStaysOnTheWorkerThatRunsIt) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  BusyWorker busy(engine.get());  // worker 0, woken first
  VarHandle v = engine->NewVariable();
  constexpr int kOps = 20;
  std::vector<std::thread::id> ran(kOps);
  for (int i = 0; i < kOps; ++i) {
    engine->PushSync(
        [&, i](RunContext) {
          ran[i] = std::this_thread::get_id();
          if (i == 0) {
            busy.Release();
            SleepMs(20);  // worker 0 ends its operation and falls asleep
          }
        },
        cpu(), {}, {v}, 0, "chain", i % 2 == 1 ? FnProperty::kCpuParallel : FnProperty::kNormal);
  }
  engine->WaitForAll();
  for (int i = 1; i < kOps; ++i) {
    EXPECT_EQ(ran[i], ran[0]) << "operation " << i << " moved to another thread";
  }
  for (VarHandle x : {busy.var(), v}) engine->DeleteVariable([](RunContext) {}, cpu(), x);
}

// Operations on gpu(i) (which only enqueue work on the device's streams)
// run on a worker of that device's own: with the only CPU worker busy they
// still run, each device's on one thread, none on the waiting thread. The
// engine does not touch the device, so this runs without a GPU.
TEST(ThreadedEngine, GpuOperationsRunOnTheirDevicesOwnWorker) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(1));
  BusyWorker busy(engine.get());  // the only CPU worker
  VarHandle x = engine->NewVariable(), y = engine->NewVariable();
  std::vector<std::thread::id> on_gpu0, on_gpu1;
  for (int i = 0; i < 5; ++i) {
    engine->PushSync([&](RunContext) { on_gpu0.push_back(std::this_thread::get_id()); }, gpu(0), {},
                     {x});
    engine->PushSync([&](RunContext) { on_gpu1.push_back(std::this_thread::get_id()); }, gpu(1), {},
                     {y});
  }
  RunOrDie([&] { engine->WaitForVar(x); }, 10, "WaitForVar on gpu(0)'s operations");
  RunOrDie([&] { engine->WaitForVar(y); }, 10, "WaitForVar on gpu(1)'s operations");
  ASSERT_EQ(on_gpu0.size(), 5u);
  ASSERT_EQ(on_gpu1.size(), 5u);
  EXPECT_THAT(on_gpu0, Each(on_gpu0[0]));
  EXPECT_THAT(on_gpu1, Each(on_gpu1[0]));
  EXPECT_NE(on_gpu0[0], on_gpu1[0]);
  EXPECT_NE(on_gpu0[0], std::this_thread::get_id());
  busy.Release();
  engine->WaitForAll();
  for (VarHandle v : {busy.var(), x, y}) engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

// A device's worker polls for work for 100 us after its last operation,
// then sleeps: an idle process burns no CPU.
TEST(ThreadedEngine, AnIdleDeviceWorkerSleeps) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(1));
  VarHandle x = engine->NewVariable();
  engine->PushSync([](RunContext) {}, gpu(0), {}, {x});
  engine->WaitForVar(x);
  SleepMs(20);  // past the poll
  auto cpu_seconds = [] {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
  };
  const double before = cpu_seconds();
  SleepMs(200);
  EXPECT_LT(cpu_seconds() - before, 0.05) << "a worker kept running while the engine was idle";
  engine->DeleteVariable([](RunContext) {}, cpu(), x);
}

// A chain of operations on one variable that moves between the CPU's
// workers and two devices' runs in push order.
TEST(ThreadedEngine, AChainAcrossCpuAndDeviceWorkersRunsInOrder) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  VarHandle v = engine->NewVariable();
  std::vector<int> order;
  const Context where[] = {cpu(), gpu(0), gpu(1), gpu(0), cpu(1)};
  for (int i = 0; i < 200; ++i) {
    engine->PushSync([&order, i](RunContext) { order.push_back(i); }, where[i % 5], {}, {v}, 0,
                     "chain", i % 7 == 0 ? FnProperty::kCpuParallel : FnProperty::kNormal);
  }
  RunOrDie([&] { engine->WaitForAll(); }, 10, "the chain");
  ASSERT_EQ(order.size(), 200u);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(order[i], i);
  engine->DeleteVariable([](RunContext) {}, cpu(), v);
}

// A thread with a WaitWithoutRunning (a data prefetcher) waits without
// taking queued operations over: they stay with the workers, since such a
// waiter would drop a chain of them where its own wait ended. Once the
// guard is gone, the thread's waits run operations again.
TEST(ThreadedEngine, AWaiterWithoutRunningLeavesOperationsToTheWorkers) {
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(1));
  VarHandle x = engine->NewVariable();
  std::thread::id ran_on;
  auto push_recording_op = [&] {
    ran_on = std::thread::id();
    engine->PushSync([&](RunContext) { ran_on = std::this_thread::get_id(); }, cpu(), {}, {x});
  };
  std::thread::id waiter_id;
  std::atomic<bool> waited{false};
  Gate guarded_wait_done, second_part;
  BusyWorker first(engine.get());  // the only worker
  push_recording_op();
  std::thread waiter([&] {
    waiter_id = std::this_thread::get_id();
    {
      WaitWithoutRunning outer;
      { WaitWithoutRunning inner; }  // nested: the outer one still holds
      engine->WaitForVar(x);
      waited = true;
    }
    guarded_wait_done.Open();
    second_part.Wait();
    engine->WaitForVar(x);  // the guard is gone: this wait runs the operation
  });
  SleepMs(50);
  EXPECT_FALSE(waited.load()) << "the waiter ran the operation while the worker was busy";
  first.Release();
  ASSERT_TRUE(guarded_wait_done.Wait());
  EXPECT_NE(ran_on, waiter_id) << "the operation ran on the waiter";
  EXPECT_NE(ran_on, std::thread::id()) << "the operation did not run";

  BusyWorker second(engine.get());
  push_recording_op();
  second_part.Open();
  waiter.join();
  EXPECT_EQ(ran_on, waiter_id) << "without the guard, the waiter left the operation to a worker";
  second.Release();
  engine->WaitForAll();
  for (VarHandle v : {first.var(), second.var(), x}) {
    engine->DeleteVariable([](RunContext) {}, cpu(), v);
  }
}

// The engine runs one worker unless told otherwise (MXNet's default): the
// cores go to the CPU pool inside operations.
TEST(CreateEngine, RunsOneWorkerUnlessTold) {
  unsetenv("MX_CPU_WORKER_NTHREADS");
  EXPECT_EQ(CreateEngine(Threaded(0))->num_workers(), 1);
  setenv("MX_CPU_WORKER_NTHREADS", "3", 1);
  EXPECT_EQ(CreateEngine(Threaded(0))->num_workers(), 3);
  unsetenv("MX_CPU_WORKER_NTHREADS");
}

TEST(ThreadedEngine, ManyShortWaitsDoNotHang) {
  // WaitForVar right after a push: the operation often completes before the
  // waiter blocks, which must be handled without losing the wake-up.
  std::unique_ptr<Engine> engine = CreateEngine(Threaded(2));
  VarHandle x = engine->NewVariable();
  int value = 0;
  RunOrDie(
      [&] {
        for (int i = 0; i < 3000; ++i) {
          engine->PushSync([&value, i](RunContext) { value = i; }, cpu(), {},
                           {x});
          engine->WaitForVar(x);
          ASSERT_EQ(value, i);
        }
      },
      60, "3000 push/wait rounds");
  engine->DeleteVariable([](RunContext) {}, cpu(), x);
}

TEST(CreateEngine, HonoursTheRequestedWorkerCount) {
  for (int n : {1, 2, 4}) {
    EXPECT_EQ(CreateEngine(Threaded(n))->num_workers(), n);
  }
  EXPECT_GE(CreateEngine(Threaded(0))->num_workers(), 1);
  EXPECT_STREQ(CreateEngine(Naive())->type(), "NaiveEngine");
}

TEST(EngineGet, KindFollowsMxEngineType) {
  const char* type = std::getenv("MX_ENGINE_TYPE");
  const bool naive = type != nullptr && std::string(type) == "NaiveEngine";
  EXPECT_STREQ(Engine::Get()->type(), naive ? "NaiveEngine" : "ThreadedEngine");
  EXPECT_EQ(Engine::Get(), Engine::Shared().get());
}

TEST(NaiveEngine, RunsEachOperationInsidePush) {
  std::unique_ptr<Engine> engine = CreateEngine(Naive());
  VarHandle x = engine->NewVariable();
  const std::thread::id caller = std::this_thread::get_id();
  std::thread::id ran_on;
  bool ran = false;
  engine->PushSync(
      [&](RunContext) {
        ran = true;
        ran_on = std::this_thread::get_id();
      },
      cpu(), {}, {x});
  EXPECT_TRUE(ran);  // before any wait
  EXPECT_EQ(ran_on, caller);
  engine->DeleteVariable([](RunContext) {}, cpu(), x);
}

}  // namespace
}  // namespace mx
