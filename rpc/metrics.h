// Metrics in the Prometheus text exposition format (version 0.0.4):
// counters, gauges and histograms, grouped in families whose members differ
// by label values. No gRPC or HTTP here: rpc/metrics_http.h serves a
// registry, rpc/rpc.h counts calls into one.
//
// Cost: a member is looked up once (Family::With takes a lock) and kept;
// Counter::Add and Histogram::Observe are a few relaxed atomic operations,
// so the hot paths (every push, every call) pay nanoseconds.
#ifndef MX_RPC_METRICS_H_
#define MX_RPC_METRICS_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace mx {
namespace metrics {

// A value that only goes up (calls, bytes, seconds spent).
class Counter {
 public:
  void Add(double v = 1);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// A value that goes up and down (queue depth, bytes pooled).
class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double v);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// Observations counted into buckets by upper bound (seconds, bytes).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  // Counts per bucket, not cumulative; the last is above every bound.
  std::vector<uint64_t> counts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }
  const std::vector<double>& bounds() const { return bounds_; }

 private:
  const std::vector<double> bounds_;  // ascending
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;
  std::atomic<double> sum_{0};
};

// Latency buckets from 50 us to 30 s: small round trips on one host take
// ~100 us, a 16 MiB transfer tens of ms, a pull waiting for a slow
// step seconds.
std::vector<double> LatencyBuckets();

enum class Type { kCounter, kGauge, kHistogram };

// The members of one metric name, by label values (in the order of the
// family's label names). Members live as long as the registry.
template <typename M>
class Family {
 public:
  Family(std::vector<std::string> labels, std::function<std::unique_ptr<M>()> make)
      : labels_(std::move(labels)), make_(std::move(make)) {}
  // The member with these label values (as many as the family has label
  // names), created at the first call.
  M* With(const std::vector<std::string>& values);
  const std::vector<std::string>& labels() const { return labels_; }
  // Calls f(values, member) for each member, in label order.
  void ForEach(const std::function<void(const std::vector<std::string>&, const M&)>& f) const;

 private:
  const std::vector<std::string> labels_;
  const std::function<std::unique_ptr<M>()> make_;
  mutable std::mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<M>> members_;
};

// Metric families by name. Adding a family twice with the same name and
// type returns the first (modules may add the same metric independently);
// with another type or other labels is a programming error (aborts).
class Registry {
 public:
  // The process's registry: what its /metrics endpoint shows.
  static Registry& Global();

  Family<Counter>* AddCounter(const std::string& name, const std::string& help,
                              std::vector<std::string> labels = {});
  Family<Gauge>* AddGauge(const std::string& name, const std::string& help,
                          std::vector<std::string> labels = {});
  Family<Histogram>* AddHistogram(const std::string& name, const std::string& help,
                                  std::vector<double> bounds, std::vector<std::string> labels = {});

  // Runs `refresh` before each exposition: for gauges read from elsewhere
  // (the storage pool, queue lengths). It must not add families.
  void OnCollect(std::function<void()> refresh);

  // Every family, in name order, in the text exposition format.
  std::string Text() const;

 private:
  struct Entry {
    Type type;
    std::string help;
    std::vector<std::string> labels;
    std::shared_ptr<void> family;  // a Family<M> of the type's M
  };
  template <typename M>
  Family<M>* Add(Type type, const std::string& name, const std::string& help,
                 std::vector<std::string> labels, std::function<std::unique_ptr<M>()> make);

  mutable std::mutex mu_;
  std::map<std::string, Entry> families_;
  std::vector<std::function<void()>> refresh_;
};

// Whether the process collects per-call RPC metrics (rpc/call_metrics.h).
// Off until a metrics endpoint starts (ServeMetrics), so a process nobody
// scrapes pays nothing per call; the other metrics cost an atomic add and
// are always kept.
bool Enabled();
void SetEnabled(bool enabled);

// Sets mx_node_info{role,rank} 1 in the global registry: which node a
// scrape came from (rank < 0: none, as for the coordinator).
void SetNodeInfo(const std::string& role, int rank);

// The text format's escaping of a label value: \\, \" and \n.
std::string EscapeLabelValue(const std::string& v);

}  // namespace metrics
}  // namespace mx

#endif  // MX_RPC_METRICS_H_
