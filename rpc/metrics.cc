#include "rpc/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>

namespace mx {
namespace metrics {

namespace {

void AtomicAdd(std::atomic<double>* a, double v) {
  double old = a->load(std::memory_order_relaxed);
  while (!a->compare_exchange_weak(old, old + v, std::memory_order_relaxed)) {
  }
}

// A sample value as the text format writes it: integers without a
// fraction, others with full precision.
std::string Number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // The shortest form that reads back as v (0.0005, not
  // 0.00050000000000000001). No printf: the HTTP server's threads have
  // small stacks, and glibc's printf of a double overflowed one.
  // Whole numbers below 2^53 as integers (1000000, not 1e+06), and the
  // rest in the general style (0.0005, not 5e-04: Prometheus matches a
  // bucket's le="0.0005" as the text, as other clients write it).
  char buf[32];
  const std::to_chars_result r =
      std::abs(v) < 9007199254740992.0 && v == std::trunc(v)
          ? std::to_chars(buf, buf + sizeof(buf), static_cast<int64_t>(v))
          : std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::general);
  return std::string(buf, r.ptr);
}

// {a="x",b="y"} for these names and values, with `extra` (already
// formatted, e.g. le="0.5") last; "" when there are none.
std::string Labels(const std::vector<std::string>& names, const std::vector<std::string>& values,
                   const std::string& extra = "") {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    out += out.empty() ? "{" : ",";
    out += names[i] + "=\"" + EscapeLabelValue(values[i]) + "\"";
  }
  if (!extra.empty()) out += (out.empty() ? "{" : ",") + extra;
  return out.empty() ? out : out + "}";
}

// The text format's escaping: \ and newlines always, " in label values.
std::string Escape(const std::string& text, bool quotes) {
  std::string out;
  for (char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && quotes) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

const char* TypeName(Type t) {
  switch (t) {
    case Type::kCounter:
      return "counter";
    case Type::kGauge:
      return "gauge";
    case Type::kHistogram:
      return "histogram";
  }
  return "untyped";
}

}  // namespace

void Counter::Add(double v) { AtomicAdd(&value_, v); }
void Gauge::Add(double v) { AtomicAdd(&value_, v); }

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::Observe(double v) {
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  AtomicAdd(&sum_, v);
}

std::vector<uint64_t> Histogram::counts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  for (size_t i = 0; i < out.size(); ++i) out[i] = counts_[i].load(std::memory_order_relaxed);
  return out;
}

std::vector<double> LatencyBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
          50e-3, 100e-3, 250e-3, 500e-3, 1,    2.5,    5,    10,   30};
}

template <typename M>
M* Family<M>::With(const std::vector<std::string>& values) {
  if (values.size() != labels_.size()) {
    std::cerr << "metrics: " << values.size() << " label values for " << labels_.size()
              << " labels" << std::endl;
    std::abort();  // a programming error, not input
  }
  std::lock_guard<std::mutex> lock(mu_);
  std::unique_ptr<M>& m = members_[values];
  if (m == nullptr) m = make_();
  return m.get();
}

template <typename M>
void Family<M>::ForEach(
    const std::function<void(const std::vector<std::string>&, const M&)>& f) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [values, m] : members_) f(values, *m);
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

Registry& Registry::Global() {
  static Registry* r = new Registry;
  return *r;
}

template <typename M>
Family<M>* Registry::Add(Type type, const std::string& name, const std::string& help,
                         std::vector<std::string> labels,
                         std::function<std::unique_ptr<M>()> make) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = families_.find(name);
  if (it != families_.end()) {
    if (it->second.type != type || it->second.labels != labels) {
      std::cerr << "metrics: " << name << " added twice with different types or labels"
                << std::endl;
      std::abort();  // a programming error, not input
    }
    return static_cast<Family<M>*>(it->second.family.get());
  }
  auto family = std::make_shared<Family<M>>(labels, std::move(make));
  families_[name] = Entry{type, help, std::move(labels), family};
  return family.get();
}

Family<Counter>* Registry::AddCounter(const std::string& name, const std::string& help,
                                      std::vector<std::string> labels) {
  return Add<Counter>(Type::kCounter, name, help, std::move(labels),
                      [] { return std::make_unique<Counter>(); });
}

Family<Gauge>* Registry::AddGauge(const std::string& name, const std::string& help,
                                  std::vector<std::string> labels) {
  return Add<Gauge>(Type::kGauge, name, help, std::move(labels),
                    [] { return std::make_unique<Gauge>(); });
}

Family<Histogram>* Registry::AddHistogram(const std::string& name, const std::string& help,
                                          std::vector<double> bounds,
                                          std::vector<std::string> labels) {
  return Add<Histogram>(Type::kHistogram, name, help, std::move(labels),
                        [bounds] { return std::make_unique<Histogram>(bounds); });
}

void Registry::OnCollect(std::function<void()> refresh) {
  std::lock_guard<std::mutex> lock(mu_);
  refresh_.push_back(std::move(refresh));
}

std::string Registry::Text() const {
  std::vector<std::function<void()>> refresh;
  {
    std::lock_guard<std::mutex> lock(mu_);
    refresh = refresh_;
  }
  for (const auto& r : refresh) r();
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& [name, e] : families_) {
    out += "# HELP " + name + " " + Escape(e.help, /*quotes=*/false) + "\n";
    out += "# TYPE " + name + " " + TypeName(e.type) + "\n";
    switch (e.type) {
      case Type::kCounter:
        static_cast<const Family<Counter>*>(e.family.get())
            ->ForEach([&](const std::vector<std::string>& v, const Counter& c) {
              out += name + Labels(e.labels, v) + " " + Number(c.value()) + "\n";
            });
        break;
      case Type::kGauge:
        static_cast<const Family<Gauge>*>(e.family.get())
            ->ForEach([&](const std::vector<std::string>& v, const Gauge& g) {
              out += name + Labels(e.labels, v) + " " + Number(g.value()) + "\n";
            });
        break;
      case Type::kHistogram:
        static_cast<const Family<Histogram>*>(e.family.get())
            ->ForEach([&](const std::vector<std::string>& v, const Histogram& h) {
              const std::vector<uint64_t> counts = h.counts();
              uint64_t cumulative = 0;
              for (size_t i = 0; i < counts.size(); ++i) {
                cumulative += counts[i];
                const std::string le =
                    i < h.bounds().size() ? Number(h.bounds()[i]) : std::string("+Inf");
                out += name + "_bucket" + Labels(e.labels, v, "le=\"" + le + "\"") + " " +
                       Number(static_cast<double>(cumulative)) + "\n";
              }
              out += name + "_sum" + Labels(e.labels, v) + " " + Number(h.sum()) + "\n";
              out += name + "_count" + Labels(e.labels, v) + " " +
                     Number(static_cast<double>(cumulative)) + "\n";
            });
        break;
    }
  }
  return out;
}

namespace {
std::atomic<bool> enabled{false};
}  // namespace
bool Enabled() { return enabled.load(std::memory_order_relaxed); }
void SetEnabled(bool e) { enabled.store(e, std::memory_order_relaxed); }

void SetNodeInfo(const std::string& role, int rank) {
  Registry::Global()
      .AddGauge("mx_node_info", "This node's role and rank (always 1)", {"role", "rank"})
      ->With({role, rank < 0 ? "" : std::to_string(rank)})
      ->Set(1);
}

std::string EscapeLabelValue(const std::string& v) { return Escape(v, /*quotes=*/true); }

}  // namespace metrics
}  // namespace mx
