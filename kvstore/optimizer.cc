// The Optimizer base (options, multipliers, schedule, state and its
// serialization) and MXNet's six optimizers, each one fused kernel. The
// update rules are written out in kvstore/optimizer.h; the expressions below
// keep MXNet's order of float operations.
#include "kvstore/optimizer.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kvstore/options.h"
#include "ndarray/engine.h"
#include "ndarray/launch.h"
#include "ndarray/update_kernels.h"

namespace mx {
namespace {

using internal::FormatNumber;
using internal::NumberSpec;
using internal::ParseNumber;

constexpr char kSchedulerKey[] = "lr_scheduler";
constexpr char kSchedulerPrefix[] = "lr_scheduler.";

// Options of every optimizer. learning_rate's default is per optimizer.
constexpr NumberSpec kLearningRate{"learning_rate", 0.01, 0.0};
constexpr NumberSpec kWd{"wd", 0.0, 0.0};
constexpr NumberSpec kRescaleGrad{"rescale_grad", 1.0};
constexpr NumberSpec kClipGradient{"clip_gradient", -1.0};
constexpr NumberSpec kSchedulerBaseLr{"lr_scheduler.base_lr", 0.0, 0.0};

// Options of one optimizer each, with MXNet's defaults.
constexpr NumberSpec kMomentum{"momentum", 0.0, 0.0, 1.0};
// The most updates a saved count may claim (2^53: what a double counts
// exactly); beyond, counting on would overflow.
constexpr int64_t kMaxUpdates = int64_t{1} << 53;
constexpr NumberSpec kBeta1{"beta1", 0.9, 0.0, 1.0, /*hi_open=*/true};
constexpr NumberSpec kBeta2{"beta2", 0.999, 0.0, 1.0, /*hi_open=*/true};
constexpr NumberSpec kAdamEpsilon{"epsilon", 1e-8, 0.0};
constexpr NumberSpec kAdagradEps{"eps", 1e-7, 0.0};
constexpr NumberSpec kGamma1{"gamma1", 0.9, 0.0, 1.0};
constexpr NumberSpec kRmspropEpsilon{"epsilon", 1e-8, 0.0};
constexpr NumberSpec kClipWeights{"clip_weights", -1.0};
constexpr NumberSpec kRho{"rho", 0.9, 0.0, 1.0};
constexpr NumberSpec kAdadeltaEpsilon{"epsilon", 1e-5, 0.0};

// Pushes one engine operation on the weight's context that applies Rule
// (ndarray/update_kernels.h) to every element, or with `rows` to those rows
// only (grad then holds one row per position): it reads grad and writes
// weight and the Rule::kStates state arrays. `split`: SplitLargeUpdates.
template <typename Rule>
void PushRule(bool split, const char* name, NDArray& weight, const NDArray& grad,
              const Optimizer::RowPositions& rows, std::vector<NDArray>& states,
              const typename Rule::Args& args) {
  MX_CHECK(static_cast<int>(states.size()) == Rule::kStates);
  float* w = weight.data();
  const float* g = grad.data();
  float* s0 = Rule::kStates > 0 ? states[0].data() : nullptr;
  float* s1 = Rule::kStates > 1 ? states[1].data() : nullptr;
  const Context ctx = weight.context();
  const int64_t n = grad.size();
  std::vector<VarHandle> writes{weight.var()};
  for (const NDArray& s : states) writes.push_back(s.var());
  std::function<void()> fn;
  if (rows == nullptr) {
    const typename kernel::UpdateKernel<Rule>::Params p{w, g, s0, s1, args};
    fn = [=] { kernel::Launch<kernel::UpdateKernel<Rule>>(name, ctx, n, p, split); };
  } else {
    const int64_t dim = weight.shape().RowSize();
    const typename kernel::RowUpdateKernel<Rule>::Params p{w, g, s0, s1, rows->data(), dim, args};
    // The lambda holds `rows` so that the positions outlive the operation.
    fn = [p, rows, name, ctx, n, split] {
      kernel::Launch<kernel::RowUpdateKernel<Rule>>(name, ctx, n, p, split);
    };
  }
  kernel::Push(name, ctx, {grad.var()}, std::move(writes), std::move(fn));
}

// A double read from options already validated by Create (for the few
// hyper-parameters MXNet uses in Python's double precision).
double OptionAsDouble(const Optimizer::Options& options,
                      const NumberSpec& spec) {
  auto it = options.find(spec.key);
  if (it == options.end()) return spec.default_value;
  double v = 0;
  MX_CHECK(absl::SimpleAtod(it->second, &v));
  return v;
}

// ---- The optimizers.

// SGD, optionally with momentum (MXNet's sgd_update / sgd_mom_update).
class Sgd : public Optimizer {
 public:
  explicit Sgd(const Options& options) : Sgd("sgd", options) {}

 protected:
  Sgd(std::string name, const Options& options)
      : Optimizer(std::move(name), options),
        momentum_(GetFloat(kMomentum.key, kMomentum.default_value)) {}

  int NumStates() const override { return momentum_ != 0 ? 1 : 0; }

  void PushUpdate(NDArray& weight, const NDArray& grad, const RowPositions& rows,
                  std::vector<NDArray>& states, float lr, float wd,
                  int64_t) override {
    const kernel::SgdStep step{lr, rescale_grad_, clip_gradient_, lr * rescale_grad_};
    if (momentum_ == 0) {
      PushRule<kernel::SgdRule>(split_updates_, "sgd_update", weight, grad, rows, states,
                                {step, lr, wd});
      return;
    }
    PushRule<kernel::SgdMomentumRule>(split_updates_, "sgd_mom_update", weight, grad, rows, states,
                                      {step, lr, wd, momentum_});
  }

  float momentum_;
};

// Nesterov momentum as MXNet 1.x's nag_mom_update; plain SGD without
// momentum.
class Nag : public Sgd {
 public:
  explicit Nag(const Options& options) : Sgd("nag", options) {}

 protected:
  void PushUpdate(NDArray& weight, const NDArray& grad, const RowPositions& rows,
                  std::vector<NDArray>& states, float lr, float wd,
                  int64_t t) override {
    if (momentum_ == 0) {
      Sgd::PushUpdate(weight, grad, rows, states, lr, wd, t);
      return;
    }
    PushRule<kernel::NagRule>(split_updates_, "nag_mom_update", weight, grad, rows, states,
                              {lr, wd, rescale_grad_, clip_gradient_, momentum_});
  }
};

// Adam with MXNet's bias correction folded into the learning rate.
class Adam : public Optimizer {
 public:
  explicit Adam(const Options& options)
      : Optimizer("adam", options),
        beta1_(GetFloat(kBeta1.key, kBeta1.default_value)),
        beta2_(GetFloat(kBeta2.key, kBeta2.default_value)),
        epsilon_(GetFloat(kAdamEpsilon.key, kAdamEpsilon.default_value)),
        beta1_double_(OptionAsDouble(options, kBeta1)),
        beta2_double_(OptionAsDouble(options, kBeta2)) {}

 protected:
  int NumStates() const override { return 2; }

  void PushUpdate(NDArray& weight, const NDArray& grad, const RowPositions& rows,
                  std::vector<NDArray>& states, float lr, float wd,
                  int64_t t) override {
    // Python's doubles: lr *= sqrt(1 - beta2^t) / (1 - beta1^t).
    const double coef1 = 1.0 - std::pow(beta1_double_, static_cast<double>(t));
    const double coef2 = 1.0 - std::pow(beta2_double_, static_cast<double>(t));
    const float lr_t = static_cast<float>(static_cast<double>(lr) *
                                          (std::sqrt(coef2) / coef1));
    PushRule<kernel::AdamRule>(split_updates_, "adam_update", weight, grad, rows, states,
        {lr_t, wd, rescale_grad_, clip_gradient_, beta1_, beta2_, epsilon_});
  }

 private:
  float beta1_, beta2_, epsilon_;
  double beta1_double_, beta2_double_;
};

// AdaGrad as MXNet 1.x's Python (dense) update.
class AdaGrad : public Optimizer {
 public:
  explicit AdaGrad(const Options& options)
      : Optimizer("adagrad", options),
        eps_(GetFloat(kAdagradEps.key, kAdagradEps.default_value)) {}

 protected:
  int NumStates() const override { return 1; }

  void PushUpdate(NDArray& weight, const NDArray& grad, const RowPositions& rows,
                  std::vector<NDArray>& states, float lr, float wd,
                  int64_t) override {
    PushRule<kernel::AdaGradRule>(split_updates_, "adagrad_update", weight, grad, rows, states,
                                  {lr, wd, rescale_grad_, clip_gradient_, eps_});
  }

 private:
  float eps_;
};

// RMSProp, Tieleman & Hinton's (MXNet's rmsprop_update, centered=False).
class RmsProp : public Optimizer {
 public:
  explicit RmsProp(const Options& options)
      : Optimizer("rmsprop", options),
        gamma1_(GetFloat(kGamma1.key, kGamma1.default_value)),
        epsilon_(GetFloat(kRmspropEpsilon.key, kRmspropEpsilon.default_value)),
        clip_weights_(GetFloat(kClipWeights.key, kClipWeights.default_value)) {}

 protected:
  int NumStates() const override { return 1; }

  void PushUpdate(NDArray& weight, const NDArray& grad, const RowPositions& rows,
                  std::vector<NDArray>& states, float lr, float wd,
                  int64_t) override {
    PushRule<kernel::RmsPropRule>(split_updates_, "rmsprop_update", weight, grad, rows, states,
        {lr, wd, rescale_grad_, clip_gradient_, gamma1_, epsilon_, clip_weights_});
  }

 private:
  float gamma1_, epsilon_, clip_weights_;
};

// AdaDelta as MXNet 1.x's Python update, which uses no learning rate.
class AdaDelta : public Optimizer {
 public:
  explicit AdaDelta(const Options& options)
      : Optimizer("adadelta", options),
        rho_(GetFloat(kRho.key, kRho.default_value)),
        epsilon_(
            GetFloat(kAdadeltaEpsilon.key, kAdadeltaEpsilon.default_value)) {}

 protected:
  int NumStates() const override { return 2; }

  void PushUpdate(NDArray& weight, const NDArray& grad, const RowPositions& rows,
                  std::vector<NDArray>& states, float, float wd,
                  int64_t) override {
    PushRule<kernel::AdaDeltaRule>(split_updates_, "adadelta_update", weight, grad, rows, states,
                                   {wd, rescale_grad_, clip_gradient_, rho_, epsilon_});
  }

 private:
  float rho_, epsilon_;
};

// ---- The registry: names, options and factories.

struct OptimizerSpec {
  double default_lr;
  std::vector<const NumberSpec*> numbers;
  // Boolean options of MXNet's that only their default, false, supports.
  std::vector<std::string> false_only;
  std::unique_ptr<Optimizer> (*make)(const Optimizer::Options&);
};

template <typename T>
std::unique_ptr<Optimizer> Make(const Optimizer::Options& options) {
  return std::make_unique<T>(options);
}

const std::map<std::string, OptimizerSpec>& Specs() {
  static const auto* const kSpecs = new std::map<std::string, OptimizerSpec>{
      {"sgd", {0.01, {&kMomentum}, {}, &Make<Sgd>}},
      {"nag", {0.01, {&kMomentum}, {}, &Make<Nag>}},
      {"adam", {0.001, {&kBeta1, &kBeta2, &kAdamEpsilon}, {}, &Make<Adam>}},
      {"adagrad", {0.01, {&kAdagradEps}, {}, &Make<AdaGrad>}},
      {"rmsprop",
       {0.001,
        {&kGamma1, &kRmspropEpsilon, &kClipWeights},
        {"centered"},
        &Make<RmsProp>}},
      {"adadelta", {0.01, {&kRho, &kAdadeltaEpsilon}, {}, &Make<AdaDelta>}},
  };
  return *kSpecs;
}

const NumberSpec* const kCommonNumbers[] = {&kLearningRate, &kWd, &kRescaleGrad,
                                            &kClipGradient};

// Checks every option of optimizer `name` except the scheduler's own ones,
// which CreateLRScheduler checks.
absl::Status CheckOptions(const std::string& name, const OptimizerSpec& spec,
                          const Optimizer::Options& options) {
  std::vector<const NumberSpec*> numbers(std::begin(kCommonNumbers),
                                         std::end(kCommonNumbers));
  numbers.insert(numbers.end(), spec.numbers.begin(), spec.numbers.end());
  const bool has_scheduler = options.count(kSchedulerKey) > 0;
  for (const auto& [key, value] : options) {
    if (key == kSchedulerKey) continue;
    if (absl::StartsWith(key, kSchedulerPrefix)) {
      if (!has_scheduler) {
        return absl::InvalidArgumentError(absl::StrCat(name, ": option '", key,
                                                       "' needs the option '",
                                                       kSchedulerKey, "'"));
      }
      if (key == kSchedulerBaseLr.key) {
        MX_RETURN_IF_ERROR(ParseNumber(name, kSchedulerBaseLr, value).status());
      }
      continue;
    }
    auto number =
        std::find_if(numbers.begin(), numbers.end(),
                     [&](const NumberSpec* s) { return key == s->key; });
    if (number != numbers.end()) {
      MX_ASSIGN_OR_RETURN(double v, ParseNumber(name, **number, value));
      if (!std::isfinite(static_cast<float>(v))) {
        return absl::InvalidArgumentError(absl::StrCat(
            name, ": option '", key, "' = ", value, " is out of float range"));
      }
      continue;
    }
    if (std::find(spec.false_only.begin(), spec.false_only.end(), key) !=
        spec.false_only.end()) {
      if (value == "false" || value == "False" || value == "0") continue;
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": option '", key, "' = '", value,
                       "' is not supported (only false is)"));
    }
    std::vector<std::string> known = {kSchedulerKey};
    for (const NumberSpec* s : numbers) known.push_back(s->key);
    known.insert(known.end(), spec.false_only.begin(), spec.false_only.end());
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": unknown option '", key,
                     "' (known: ", absl::StrJoin(known, ", "), ")"));
  }
  return absl::OkStatus();
}

absl::Status BadEntry(const std::string& entry) {
  return absl::InvalidArgumentError(absl::StrCat(
      "unexpected entry '", entry, "': these are not optimizer states"));
}

}  // namespace

// ---- Creation and options.

absl::StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(
    const std::string& name, const Options& options) {
  const auto& specs = Specs();
  auto spec = specs.find(name);
  if (spec == specs.end()) {
    std::vector<std::string> names;
    for (const auto& [known, unused] : specs) names.push_back(known);
    return absl::InvalidArgumentError(
        absl::StrCat("unknown optimizer '", name,
                     "' (known: ", absl::StrJoin(names, ", "), ")"));
  }
  MX_RETURN_IF_ERROR(CheckOptions(name, spec->second, options));
  Options filled = options;
  filled.emplace(kLearningRate.key, FormatNumber(spec->second.default_lr));
  std::unique_ptr<Optimizer> optimizer = spec->second.make(filled);

  auto scheduler_name = options.find(kSchedulerKey);
  if (scheduler_name == options.end()) return optimizer;
  float base_lr = optimizer->base_lr_;
  Options scheduler_options;
  for (const auto& [key, value] : options) {
    if (!absl::StartsWith(key, kSchedulerPrefix)) continue;
    if (key == kSchedulerBaseLr.key) {
      base_lr = optimizer->GetFloat(key, base_lr);
    } else {
      scheduler_options[key.substr(sizeof(kSchedulerPrefix) - 1)] = value;
    }
  }
  absl::StatusOr<std::unique_ptr<LRScheduler>> scheduler =
      CreateLRScheduler(scheduler_name->second, base_lr, scheduler_options);
  if (!scheduler.ok()) {
    return absl::Status(scheduler.status().code(),
                        absl::StrCat(name, ": ", scheduler.status().message()));
  }
  optimizer->SetLRScheduler(std::move(*scheduler));
  return optimizer;
}

Optimizer::Optimizer(std::string name, Options options)
    : name_(std::move(name)), options_(std::move(options)) {
  base_lr_ = GetFloat(kLearningRate.key, kLearningRate.default_value);
  wd_ = GetFloat(kWd.key, kWd.default_value);
  rescale_grad_ = GetFloat(kRescaleGrad.key, kRescaleGrad.default_value);
  clip_gradient_ = GetFloat(kClipGradient.key, kClipGradient.default_value);
}

float Optimizer::GetFloat(const std::string& key, float default_value) const {
  auto it = options_.find(key);
  if (it == options_.end()) return default_value;
  float v = 0;
  // Create has checked every option: a failure here is a bug in mx.
  MX_CHECK(absl::SimpleAtof(it->second, &v));
  return v;
}

void Optimizer::SetParamNames(const std::map<int, std::string>& names) {
  names_ = names;
}

void Optimizer::SetLrMult(const std::map<std::string, float>& mult) {
  lr_mult_ = mult;
}

void Optimizer::SetWdMult(const std::map<std::string, float>& mult) {
  wd_mult_ = mult;
}

void Optimizer::SetLRScheduler(std::shared_ptr<LRScheduler> scheduler) {
  for (auto it = options_.begin(); it != options_.end();) {
    if (it->first == kSchedulerKey ||
        absl::StartsWith(it->first, kSchedulerPrefix)) {
      it = options_.erase(it);
    } else {
      ++it;
    }
  }
  if (scheduler != nullptr) {
    for (auto& [key, value] : scheduler->Config()) options_[key] = value;
  }
  scheduler_ = std::move(scheduler);
}

// ---- Learning rate and weight decay of one parameter.

float Optimizer::MultFor(const std::map<std::string, float>& mult, int index,
                         float fallback) const {
  auto name = names_.find(index);
  if (name == names_.end()) return fallback;
  auto m = mult.find(name->second);
  return m == mult.end() ? fallback : m->second;
}

float Optimizer::WdFor(int index) const {
  float fallback = 1.0f;
  auto name = names_.find(index);
  if (name != names_.end() && !absl::EndsWith(name->second, "_weight") &&
      !absl::EndsWith(name->second, "_gamma")) {
    fallback = 0.0f;
  }
  return wd_ * MultFor(wd_mult_, index, fallback);
}

float Optimizer::LearningRate(int index) const {
  auto param = params_.find(index);
  const int64_t count = param == params_.end() ? 0 : param->second.count;
  const int64_t num_update = std::max(num_update_, count + 1);
  const float lr =
      scheduler_ != nullptr ? scheduler_->LearningRate(num_update) : base_lr_;
  return lr * MultFor(lr_mult_, index, 1.0f);
}

std::string Optimizer::ParamLabel(int index) const {
  auto name = names_.find(index);
  if (name == names_.end()) return absl::StrCat("parameter ", index);
  return absl::StrCat("parameter ", index, " ('", name->second, "')");
}

// ---- Update.

void Optimizer::Update(int index, NDArray weight, const NDArray& grad) {
  const std::string what =
      absl::StrCat(name_, " update of ", ParamLabel(index));
  MX_THROW_IF_NOT(!weight.is_none() && !grad.is_none(), what,
                  ": the weight or the gradient is a null NDArray");
  MX_THROW_IF_NOT(weight.shape() == grad.shape(), what,
                  ": the weight has shape ", weight.shape().ToString(),
                  " but the gradient ", grad.shape().ToString());
  MX_THROW_IF_NOT(weight.context() == grad.context(), what,
                  ": the weight is on ", weight.context().ToString(),
                  " but the gradient on ", grad.context().ToString());
  Apply(index, weight, grad, nullptr, what);
}

void Optimizer::UpdateRows(int index, NDArray weight, const RowSparseNDArray& grad,
                           int64_t first_row) {
  const std::string what =
      absl::StrCat(name_, " lazy update of ", ParamLabel(index));
  MX_THROW_IF_NOT(!weight.is_none() && !grad.is_none() && weight.ndim() >= 1, what,
                  ": the weight or the gradient is null, or the weight has no rows");
  MX_THROW_IF_NOT(weight.context() == grad.context(), what,
                  ": the weight is on ", weight.context().ToString(),
                  " but the gradient on ", grad.context().ToString());
  Shape rest_w = weight.shape(), rest_g = grad.shape();
  rest_w[0] = rest_g[0] = 0;
  const int64_t rows = weight.shape()[0];
  MX_THROW_IF_NOT(rest_w == rest_g && first_row >= 0 && first_row + rows <= grad.num_rows(),
                  what, ": the weight ", weight.shape().ToString(), " is not rows [",
                  first_row, ", ", first_row + rows, ") of the gradient's table ",
                  grad.shape().ToString());
  auto pos = std::make_shared<std::vector<int64_t>>(grad.indices());
  for (int64_t& id : *pos) {
    MX_THROW_IF_NOT(id >= first_row && id < first_row + rows, what, ": row id ", id,
                    " of the gradient is outside the weight's rows [", first_row, ", ",
                    first_row + rows, ")");
    id -= first_row;
  }
  Apply(index, weight, grad.data(), std::move(pos), what);
}

void Optimizer::Apply(int index, NDArray& weight, const NDArray& grad, const RowPositions& rows,
                      const std::string& what) {
  auto existing = params_.find(index);
  if (existing != params_.end() && existing->second.shape.has_value()) {
    MX_THROW_IF_NOT(*existing->second.shape == weight.shape(), what,
                    ": the weight has shape ", weight.shape().ToString(),
                    " but earlier updates (or loaded states) had ",
                    existing->second.shape->ToString());
  }

  // MXNet counts the update first, then evaluates the schedule.
  const float lr = LearningRate(index);
  const float wd = WdFor(index);
  Param& param = params_[index];
  param.shape = weight.shape();
  const Context ctx = weight.context();
  if (param.states.empty()) {
    for (int k = 0; k < NumStates(); ++k) {
      param.states.push_back(Zeros(weight.shape(), ctx));
    }
  } else {
    for (NDArray& s : param.states) {
      if (s.context() != ctx) s = s.Copy(ctx);
    }
  }
  ++param.count;
  num_update_ = std::max(num_update_, param.count);
  PushUpdate(weight, grad, rows, param.states, lr, wd, param.count);
}

// ---- States.

NamedArrays Optimizer::StateArrays(const std::set<int>* only) const {
  const NDArray empty = Empty({0});
  NamedArrays out;
  out.emplace_back(absl::StrCat("optimizer:", name_), empty);
  out.emplace_back(absl::StrCat("num_update:", num_update_), empty);
  for (const auto& [index, param] : params_) {
    if (only != nullptr && !only->count(index)) continue;
    out.emplace_back(absl::StrCat("param:", index, ":count:", param.count),
                     empty);
    for (size_t k = 0; k < param.states.size(); ++k) {
      out.emplace_back(absl::StrCat("param:", index, ":state:", k),
                       param.states[k]);
    }
  }
  return out;
}

absl::Status Optimizer::RestoreStates(const NamedArrays& arrays,
                                      const std::map<int, Shape>& shapes, bool merge) {
  std::optional<std::string> saved_name;
  std::optional<int64_t> saved_num_update;
  std::map<int, int64_t> counts;
  std::map<int, std::map<int64_t, NDArray>> states;
  for (const auto& [entry, array] : arrays) {
    std::vector<std::string> parts = absl::StrSplit(entry, ':');
    if (parts.size() == 2 && parts[0] == "optimizer") {
      saved_name = parts[1];
      continue;
    }
    if (parts.size() == 2 && parts[0] == "num_update") {
      int64_t n = 0;
      if (!absl::SimpleAtoi(parts[1], &n) || n < 0) return BadEntry(entry);
      saved_num_update = n;
      continue;
    }
    int index = 0;
    int64_t value = 0;
    if (parts.size() != 4 || parts[0] != "param" || !absl::SimpleAtoi(parts[1], &index) ||
        !absl::SimpleAtoi(parts[3], &value) || value < 0 || value > kMaxUpdates) {
      return BadEntry(entry);
    }
    if (parts[2] == "count") {
      if (!counts.emplace(index, value).second) return BadEntry(entry);
    } else if (parts[2] == "state") {
      if (!states[index].emplace(value, array).second) return BadEntry(entry);
    } else {
      return BadEntry(entry);
    }
  }
  if (!saved_name.has_value()) {
    return absl::InvalidArgumentError(
        "no 'optimizer:<name>' entry: these are not optimizer states");
  }
  if (*saved_name != name_) {
    return absl::InvalidArgumentError(
        absl::StrCat("the states were saved by optimizer '", *saved_name,
                     "', but this optimizer is '", name_, "'"));
  }
  if (!saved_num_update.has_value()) {
    return absl::InvalidArgumentError("no 'num_update:<n>' entry");
  }
  for (const auto& [index, unused] : states) {
    if (counts.count(index) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          ParamLabel(index), ": states were saved without an update count"));
    }
  }

  std::map<int, Param> loaded;
  int64_t num_update = *saved_num_update;
  for (const auto& [index, count] : counts) {
    Param param;
    param.count = count;
    num_update = std::max(num_update, count);
    auto saved = states.find(index);
    const int num_saved =
        saved == states.end() ? 0 : static_cast<int>(saved->second.size());
    if (saved != states.end() && saved->second.rbegin()->first >= NumStates()) {
      return absl::InvalidArgumentError(absl::StrCat(
          ParamLabel(index), ": state ", saved->second.rbegin()->first,
          " was saved, but ", name_, " with these options keeps ", NumStates(),
          " per parameter (were the states saved with other "
          "options, such as momentum?)"));
    }
    if (num_saved != NumStates()) {
      return absl::InvalidArgumentError(absl::StrCat(
          ParamLabel(index), ": ", num_saved, " state arrays were saved, but ",
          name_, " with these options keeps ", NumStates()));
    }
    if (saved != states.end()) {
      for (const auto& [k, array] : saved->second) {
        if (param.shape.has_value() && *param.shape != array.shape()) {
          return absl::InvalidArgumentError(absl::StrCat(
              ParamLabel(index), ": its saved states have different shapes, ",
              param.shape->ToString(), " and ", array.shape().ToString()));
        }
        param.shape = array.shape();
        param.states.push_back(array);
      }
    }
    // The parameter's shape: from earlier updates, or as the caller knows it.
    std::optional<Shape> shape;
    auto current = params_.find(index);
    if (current != params_.end()) shape = current->second.shape;
    if (auto known = shapes.find(index); !shape.has_value() && known != shapes.end()) {
      shape = known->second;
    }
    if (shape.has_value()) {
      if (param.shape.has_value() && *param.shape != *shape) {
        return absl::InvalidArgumentError(
            absl::StrCat(ParamLabel(index), ": the saved states have shape ",
                         param.shape->ToString(),
                         " but the parameter has shape ", shape->ToString()));
      }
      param.shape = shape;
    }
    loaded.emplace(index, std::move(param));
  }
  if (merge) {
    for (auto& [index, param] : loaded) params_[index] = std::move(param);
    num_update_ = std::max(num_update_, num_update);
    return absl::OkStatus();
  }
  params_ = std::move(loaded);
  num_update_ = num_update;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Optimizer::SaveStates() const {
  return SerializeArrays(StateArrays());
}

absl::Status Optimizer::LoadStates(const std::string& bytes,
                                   const std::map<int, Shape>& shapes) {
  absl::StatusOr<NamedArrays> arrays = DeserializeArrays(bytes);
  absl::Status status = arrays.ok() ? RestoreStates(*arrays, shapes) : arrays.status();
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat("LoadStates: ", status.message()));
}

absl::StatusOr<std::string> Optimizer::SaveStatesOf(const std::set<int>& indices) const {
  return SerializeArrays(StateArrays(&indices));
}

absl::Status Optimizer::MergeStates(const std::string& bytes, const std::map<int, Shape>& shapes) {
  absl::StatusOr<NamedArrays> arrays = DeserializeArrays(bytes);
  absl::Status status = arrays.ok() ? RestoreStates(*arrays, shapes, /*merge=*/true)
                                    : arrays.status();
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat("MergeStates: ", status.message()));
}

absl::Status Optimizer::SaveStatesToFile(const std::string& path) const {
  return Save(path, StateArrays());
}

absl::Status Optimizer::LoadStatesFromFile(const std::string& path,
                                           const std::map<int, Shape>& shapes) {
  MX_ASSIGN_OR_RETURN(NamedArrays arrays, Load(path));
  absl::Status status = RestoreStates(arrays, shapes);
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat("LoadStatesFromFile ", path,
                                                  ": ", status.message()));
}

}  // namespace mx
