#include "ndarray/trace.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ndarray/env.h"

namespace mx {
namespace trace {

namespace internal {
std::atomic<bool> enabled{false};
}  // namespace internal

namespace {

struct Event {
  const char* category;
  std::string name;
  int64_t start_us, dur_us;
  int64_t tid;
  std::string args;
};

// The most events kept unless MX_TRACE_MAX_EVENTS says other: about 150
// bytes each, so 150 MB.
constexpr int64_t kDefaultMaxEvents = 1 << 20;

struct State {
  std::mutex mu;
  std::string path;
  std::string process = "mx";
  int64_t offset_us = 0;
  int64_t uncertainty_us = 0;
  // The newest max_events events: a ring once full, whose oldest is at
  // `oldest`; `dropped` counts the events it overwrote.
  std::vector<Event> events;
  size_t max_events = kDefaultMaxEvents;
  size_t oldest = 0;
  int64_t dropped = 0;
};

State& S() {
  static State* s = new State;
  return *s;
}

int64_t ThreadId() {
  thread_local const int64_t tid = static_cast<int64_t>(syscall(SYS_gettid));
  return tid;
}

}  // namespace

void Start(const std::string& path) {
  absl::StatusOr<std::optional<int64_t>> max = EnvInt("MX_TRACE_MAX_EVENTS", 1, int64_t{1} << 30);
  if (!max.ok()) {
    std::fprintf(stderr, "mx: %s; keeping %lld events\n",
                 std::string(max.status().message()).c_str(),
                 static_cast<long long>(kDefaultMaxEvents));
  }
  {
    std::lock_guard<std::mutex> lock(S().mu);
    S().path = path;
    S().max_events = max.ok() && max->has_value() ? **max : kDefaultMaxEvents;
    S().events.reserve(std::min<size_t>(S().max_events, 1 << 16));
  }
  internal::enabled.store(true);
}

absl::Status StartIn(const std::string& dir, const std::string& role) {
  std::string d = dir;
  const char* from = "--trace";
  if (d.empty()) {
    const char* env = std::getenv("MX_TRACE_DIR");
    d = env != nullptr ? env : "";
    from = "MX_TRACE_DIR";
  }
  if (d.empty()) return absl::OkStatus();
  const std::string path = absl::StrCat(d, "/", role, "-", getpid(), ".trace.json");
  // Created and removed: a file left empty by a process killed before
  // Write made deploy/trace_merge.py refuse the whole directory.
  if (std::FILE* f = std::fopen(path.c_str(), "w")) {
    std::fclose(f);
    std::remove(path.c_str());
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(from, "=", d, ": cannot create ", path, ": ", std::strerror(errno)));
  }
  Start(path);
  SetProcessName(role);
  return absl::OkStatus();
}

void Stop() { internal::enabled.store(false); }

size_t EventCount() {
  std::lock_guard<std::mutex> lock(S().mu);
  return S().events.size();
}

void SetProcessName(const std::string& name) {
  std::lock_guard<std::mutex> lock(S().mu);
  S().process = name;
}

void SetClockOffset(int64_t micros, int64_t uncertainty_us) {
  std::lock_guard<std::mutex> lock(S().mu);
  S().offset_us = micros;
  S().uncertainty_us = uncertainty_us;
}

int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void Complete(const char* category, const std::string& name, int64_t start_us, int64_t end_us,
              const std::string& args) {
  if (!Enabled()) return;
  Event e{category, name, start_us, std::max<int64_t>(end_us - start_us, 0), ThreadId(), args};
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.events.size() < s.max_events) {
    s.events.push_back(std::move(e));
    return;
  }
  s.events[s.oldest] = std::move(e);
  s.oldest = (s.oldest + 1) % s.events.size();
  ++s.dropped;
}

int64_t DroppedCount() {
  std::lock_guard<std::mutex> lock(S().mu);
  return S().dropped;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

absl::Status Write() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.path.empty()) return absl::OkStatus();
  std::ofstream f(s.path, std::ios::trunc);
  if (!f) {
    return absl::UnavailableError(
        absl::StrCat("trace: cannot write ", s.path, ": ", std::strerror(errno)));
  }
  const int64_t pid = getpid();
  f << "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"process\":\"" << JsonEscape(s.process)
    << "\",\"clock_offset_us\":" << s.offset_us << ",\"clock_uncertainty_us\":" << s.uncertainty_us
    << ",\"dropped_events\":" << s.dropped << "},\"traceEvents\":[\n";
  f << "{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":" << pid << ",\"args\":{\"name\":\""
    << JsonEscape(s.process) << "\"}}";
  for (size_t i = 0; i < s.events.size(); ++i) {  // oldest first
    const Event& e = s.events[(s.oldest + i) % s.events.size()];
    f << ",\n{\"ph\":\"X\",\"cat\":\"" << e.category << "\",\"name\":\"" << JsonEscape(e.name)
      << "\",\"ts\":" << e.start_us << ",\"dur\":" << e.dur_us << ",\"pid\":" << pid
      << ",\"tid\":" << e.tid << ",\"args\":{" << e.args << "}}";
  }
  f << "\n]}\n";
  f.close();
  if (!f) return absl::UnavailableError(absl::StrCat("trace: writing ", s.path, " failed"));
  return absl::OkStatus();
}

}  // namespace trace
}  // namespace mx
