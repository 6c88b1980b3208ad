// Learning-rate schedulers with the semantics of MXNet's
// python/mxnet/lr_scheduler.py (FactorScheduler, MultiFactorScheduler,
// CosineScheduler and the warm-up of their base class).
//
// MXNet's schedulers are stateful: they advance a counter on each call,
// relying on num_update never decreasing. These compute the same values
// from num_update alone (so that LearningRate is const and a resumed job
// gets the rate it would have had), in double precision like Python, with
// the reductions applied by repeated multiplication in MXNet's order.
#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kvstore/optimizer.h"
#include "kvstore/options.h"

namespace mx {
namespace {

using internal::FormatNumber;
using internal::kInf;
using internal::NumberSpec;
using internal::ParseInteger;
using internal::ParseNumber;
using OptionMap = std::map<std::string, std::string>;

constexpr char kPrefix[] = "lr_scheduler.";

struct Warmup {
  int64_t steps = 0;
  double begin_lr = 0;
  bool constant = false;  // warmup_mode "constant" rather than "linear"
};

// What every scheduler shares: base_lr and the warm-up.
class Scheduler : public LRScheduler {
 public:
  Scheduler(std::string name, float base_lr, Warmup warmup)
      : name_(std::move(name)), base_lr_(base_lr), warmup_(warmup) {}

  float LearningRate(int64_t num_update) const final {
    if (num_update < warmup_.steps) {
      if (warmup_.constant) return static_cast<float>(warmup_.begin_lr);
      // MXNet: begin + (final - begin) * float(n) / float(steps).
      const double increase = (base_lr_ - warmup_.begin_lr) *
                              static_cast<double>(num_update) /
                              static_cast<double>(warmup_.steps);
      return static_cast<float>(warmup_.begin_lr + increase);
    }
    return static_cast<float>(AfterWarmup(num_update));
  }

  OptionMap Config() const final {
    OptionMap c;
    c["lr_scheduler"] = name_;
    c[absl::StrCat(kPrefix, "base_lr")] =
        internal::FormatFloat(static_cast<float>(base_lr_));
    c[absl::StrCat(kPrefix, "warmup_steps")] = absl::StrCat(warmup_.steps);
    c[absl::StrCat(kPrefix, "warmup_begin_lr")] =
        FormatNumber(warmup_.begin_lr);
    c[absl::StrCat(kPrefix, "warmup_mode")] =
        warmup_.constant ? "constant" : "linear";
    for (auto& [key, value] : OwnOptions()) {
      c[absl::StrCat(kPrefix, key)] = value;
    }
    return c;
  }

 protected:
  virtual double AfterWarmup(int64_t num_update) const = 0;
  // The scheduler's own options, unprefixed.
  virtual OptionMap OwnOptions() const = 0;

  double base_lr() const { return base_lr_; }
  const Warmup& warmup() const { return warmup_; }

 private:
  std::string name_;
  double base_lr_;
  Warmup warmup_;
};

// base_lr * factor^k, k = number of multiples of step strictly below
// num_update, floored at stop_factor_lr.
class FactorScheduler : public Scheduler {
 public:
  FactorScheduler(double base_lr, Warmup warmup, int64_t step, double factor, double stop_factor_lr)
      : Scheduler("factor", base_lr, warmup),
        step_(step),
        factor_(factor),
        stop_factor_lr_(stop_factor_lr),
        lr_(base_lr) {}

 protected:
  double AfterWarmup(int64_t num_update) const override {
    // MXNet: while n > count + step: count += step; lr *= factor (clamped).
    // The same products in the same order, carried on from the last call
    // (counts only grow in training; from the start when one is smaller),
    // so that each costs the reductions since, not all of them again (with
    // a step of 1, training slowed down as it went).
    const int64_t reductions = num_update > 0 ? (num_update - 1) / step_ : 0;
    std::lock_guard<std::mutex> lock(mu_);
    if (reductions < done_) {
      done_ = 0;
      lr_ = base_lr();
      settled_ = false;
    }
    while (done_ < reductions && !settled_) {
      const double next = lr_ * factor_;
      if (next < stop_factor_lr_) {
        lr_ = stop_factor_lr_;
        settled_ = true;
      } else if (next == lr_) {
        settled_ = true;  // a fixed point (factor 1, or 0)
      } else {
        lr_ = next;
        ++done_;
      }
    }
    return lr_;
  }
  OptionMap OwnOptions() const override {
    return {{"step", absl::StrCat(step_)},
            {"factor", FormatNumber(factor_)},
            {"stop_factor_lr", FormatNumber(stop_factor_lr_)}};
  }

 private:
  int64_t step_;
  double factor_;
  double stop_factor_lr_;
  // Where AfterWarmup got to: `done_` reductions give lr_; `settled_`
  // once the floor or a fixed point is reached.
  mutable std::mutex mu_;
  mutable int64_t done_ = 0;
  mutable double lr_;
  mutable bool settled_ = false;
};

// base_lr * factor^(number of steps strictly below num_update).
class MultiFactorScheduler : public Scheduler {
 public:
  MultiFactorScheduler(double base_lr, Warmup warmup,
                       std::vector<int64_t> steps, double factor)
      : Scheduler("multifactor", base_lr, warmup),
        steps_(std::move(steps)),
        factor_(factor) {}

 protected:
  double AfterWarmup(int64_t num_update) const override {
    double lr = base_lr();
    for (int64_t s : steps_) {
      if (num_update <= s) break;
      lr *= factor_;
    }
    return lr;
  }
  OptionMap OwnOptions() const override {
    return {{"step", absl::StrJoin(steps_, ",")},
            {"factor", FormatNumber(factor_)}};
  }

 private:
  std::vector<int64_t> steps_;
  double factor_;
};

// Half a cosine from base_lr at warmup_steps to final_lr at max_update.
class CosineScheduler : public Scheduler {
 public:
  CosineScheduler(double base_lr, Warmup warmup, int64_t max_update,
                  double final_lr)
      : Scheduler("cosine", base_lr, warmup),
        max_update_(max_update),
        final_lr_(final_lr) {}

 protected:
  double AfterWarmup(int64_t num_update) const override {
    // Past max_update MXNet keeps the value of max_update: final_lr.
    if (num_update > max_update_) return final_lr_;
    const double max_steps = static_cast<double>(max_update_ - warmup().steps);
    return final_lr_ +
           (base_lr() - final_lr_) *
               (1 + std::cos(M_PI *
                             static_cast<double>(num_update - warmup().steps) /
                             max_steps)) /
               2;
  }
  OptionMap OwnOptions() const override {
    return {{"max_update", absl::StrCat(max_update_)},
            {"final_lr", FormatNumber(final_lr_)}};
  }

 private:
  int64_t max_update_;
  double final_lr_;
};

// Reads the options of one scheduler and reports the ones it never asked
// for as unknown.
class OptionReader {
 public:
  OptionReader(std::string where, const OptionMap& options)
      : where_(std::move(where)), options_(options) {}

  const std::string& where() const { return where_; }

  // nullptr when absent.
  const std::string* Find(const std::string& key) {
    used_.push_back(key);
    auto it = options_.find(key);
    return it == options_.end() ? nullptr : &it->second;
  }
  absl::StatusOr<double> Number(const NumberSpec& spec) {
    const std::string* v = Find(spec.key);
    if (v == nullptr) return spec.default_value;
    return ParseNumber(where_, spec, *v);
  }
  absl::StatusOr<int64_t> Integer(const std::string& key, int64_t lo,
                                  std::optional<int64_t> default_value) {
    const std::string* v = Find(key);
    if (v == nullptr) {
      if (default_value) return *default_value;
      return absl::InvalidArgumentError(
          absl::StrCat(where_, ": option '", key, "' is required"));
    }
    return ParseInteger(where_, key, *v, lo);
  }
  absl::Status CheckAllUsed() const {
    for (const auto& [key, value] : options_) {
      if (std::find(used_.begin(), used_.end(), key) == used_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where_, ": unknown option '", key,
                         "' (known: ", absl::StrJoin(used_, ", "), ")"));
      }
    }
    return absl::OkStatus();
  }

 private:
  std::string where_;
  const OptionMap& options_;
  std::vector<std::string> used_;
};

absl::StatusOr<Warmup> ReadWarmup(OptionReader& r, double base_lr) {
  Warmup w;
  MX_ASSIGN_OR_RETURN(w.steps, r.Integer("warmup_steps", 0, 0));
  MX_ASSIGN_OR_RETURN(w.begin_lr, r.Number({"warmup_begin_lr", 0}));
  if (w.begin_lr > base_lr) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.where(), ": warmup_begin_lr ", FormatNumber(w.begin_lr),
                     " is above base_lr ", FormatNumber(base_lr)));
  }
  if (const std::string* mode = r.Find("warmup_mode")) {
    if (*mode != "linear" && *mode != "constant") {
      return absl::InvalidArgumentError(
          absl::StrCat(r.where(), ": option 'warmup_mode' = '", *mode,
                       "' must be 'linear' or 'constant'"));
    }
    w.constant = *mode == "constant";
  }
  return w;
}

// MXNet requires factor <= 1 ("to make lr reduce"); a negative factor would
// flip the sign of the rate.
constexpr NumberSpec kFactor{"factor", 1.0, 0.0, 1.0};

absl::StatusOr<std::unique_ptr<LRScheduler>> CreateFactor(OptionReader& r,
                                                          double base_lr,
                                                          Warmup warmup) {
  MX_ASSIGN_OR_RETURN(int64_t step, r.Integer("step", 1, std::nullopt));
  MX_ASSIGN_OR_RETURN(double factor, r.Number(kFactor));
  MX_ASSIGN_OR_RETURN(double stop, r.Number({"stop_factor_lr", 1e-8, 0.0}));
  return std::make_unique<FactorScheduler>(base_lr, warmup, step, factor, stop);
}

absl::StatusOr<std::unique_ptr<LRScheduler>> CreateMultiFactor(OptionReader& r,
                                                               double base_lr,
                                                               Warmup warmup) {
  const std::string* list = r.Find("step");
  if (list == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.where(), ": option 'step' is required"));
  }
  std::vector<int64_t> steps;
  for (absl::string_view piece : absl::StrSplit(*list, ',')) {
    MX_ASSIGN_OR_RETURN(int64_t s,
                        ParseInteger(r.where(), "step", std::string(piece), 1));
    if (!steps.empty() && s <= steps.back()) {
      return absl::InvalidArgumentError(
          absl::StrCat(r.where(), ": option 'step' = '", *list,
                       "' must be an increasing list"));
    }
    steps.push_back(s);
  }
  MX_ASSIGN_OR_RETURN(double factor, r.Number(kFactor));
  return std::make_unique<MultiFactorScheduler>(base_lr, warmup,
                                                std::move(steps), factor);
}

absl::StatusOr<std::unique_ptr<LRScheduler>> CreateCosine(OptionReader& r,
                                                          double base_lr,
                                                          Warmup warmup) {
  MX_ASSIGN_OR_RETURN(int64_t max_update,
                      r.Integer("max_update", 1, std::nullopt));
  MX_ASSIGN_OR_RETURN(double final_lr, r.Number({"final_lr", 0.0}));
  if (max_update <= warmup.steps) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.where(), ": max_update ", max_update,
                     " must be above warmup_steps ", warmup.steps));
  }
  return std::make_unique<CosineScheduler>(base_lr, warmup, max_update,
                                           final_lr);
}

}  // namespace

absl::StatusOr<std::unique_ptr<LRScheduler>> CreateLRScheduler(
    const std::string& name, float base_lr,
    const std::map<std::string, std::string>& options) {
  using Factory = absl::StatusOr<std::unique_ptr<LRScheduler>> (*)(
      OptionReader&, double, Warmup);
  static const auto* const kFactories = new std::map<std::string, Factory>{
      {"factor", &CreateFactor},
      {"multifactor", &CreateMultiFactor},
      {"cosine", &CreateCosine},
  };
  auto it = kFactories->find(name);
  if (it == kFactories->end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown lr_scheduler '", name,
                     "' (known: cosine, factor, multifactor)"));
  }
  if (!std::isfinite(base_lr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "lr_scheduler ", name, ": base_lr ", base_lr, " is not finite"));
  }
  OptionReader reader(absl::StrCat("lr_scheduler ", name), options);
  MX_ASSIGN_OR_RETURN(Warmup warmup, ReadWarmup(reader, base_lr));
  MX_ASSIGN_OR_RETURN(std::unique_ptr<LRScheduler> scheduler,
                      it->second(reader, base_lr, warmup));
  MX_RETURN_IF_ERROR(reader.CheckAllUsed());
  return scheduler;
}

}  // namespace mx
