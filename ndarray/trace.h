// One timeline across a job's processes: each process records Chrome trace
// events ("complete" events: a name, a category, a start and a duration in
// microseconds, the thread, and arguments) while tracing is on, and writes
// them to one JSON file when it ends. deploy/trace_merge.py merges the
// files of a job into one that chrome://tracing and Perfetto open.
//
// Times are the system clock's (CLOCK_REALTIME, microseconds), so the
// processes of one host agree; each file carries its process's estimated
// offset to the coordinator's clock (rpc/coordinator_client.cc measures it
// from heartbeats), which the merge adds, so hosts agree too.
//
// Off (the default) an event site costs one relaxed atomic load.
#ifndef MX_NDARRAY_TRACE_H_
#define MX_NDARRAY_TRACE_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace mx {
namespace trace {

namespace internal {
extern std::atomic<bool> enabled;
}  // namespace internal

inline bool Enabled() { return internal::enabled.load(std::memory_order_relaxed); }

// Starts recording; the events go to `path` at Write. A process keeps
// the newest MX_TRACE_MAX_EVENTS events (default 1048576, about 150 MB):
// a long job's timeline ends with its last stretch, and the file says how
// many earlier events it dropped ("dropped_events").
void Start(const std::string& path);
// Starts recording into DIR/ROLE-PID.trace.json as process `role` when
// `dir` (a --trace flag) or else MX_TRACE_DIR names a directory; nothing
// otherwise. The file is tried now (created and removed): one that cannot
// be (no such directory) is an error at start, not after the run, and
// nothing records.
absl::Status StartIn(const std::string& dir, const std::string& role);
// Stops recording; what was recorded stays for Write.
void Stop();
// The number of events held, and of those dropped to hold the newest.
size_t EventCount();
int64_t DroppedCount();

// The name the merged timeline shows for this process ("worker 1").
void SetProcessName(const std::string& name);
// Microseconds to add to this process's times to get the coordinator's,
// known to within +-uncertainty_us (half the round trip it was measured
// over). The merge applies an offset only when it exceeds its
// uncertainty: within it, the clocks agree as far as can be told (the
// processes of one host share one clock).
void SetClockOffset(int64_t micros, int64_t uncertainty_us);

// Microseconds on the system clock.
int64_t NowMicros();

// Records an event of `category` named `name` from `start_us` to `end_us`
// on the calling thread; `args` is the inside of a JSON object
// ("\"key\":3,\"version\":7") or empty. Nothing when tracing is off.
void Complete(const char* category, const std::string& name, int64_t start_us, int64_t end_us,
              const std::string& args = "");

// Records [construction, destruction) as one event.
class Span {
 public:
  Span(const char* category, std::string name, std::string args = "")
      : on_(Enabled()), category_(category) {
    if (!on_) return;
    name_ = std::move(name);
    args_ = std::move(args);
    start_ = NowMicros();
  }
  ~Span() {
    if (on_) Complete(category_, name_, start_, NowMicros(), args_);
  }
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  const bool on_;
  const char* const category_;
  std::string name_, args_;
  int64_t start_ = 0;
};

// Writes the events recorded so far to Start's path, as a Chrome trace
// JSON object with the process name and clock offset in "otherData";
// nothing (OK) when tracing was never started. Errors name the file.
absl::Status Write();

// JSON string escaping, for names and arguments.
std::string JsonEscape(const std::string& s);

}  // namespace trace
}  // namespace mx

#endif  // MX_NDARRAY_TRACE_H_
