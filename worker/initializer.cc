// Initializers as MXNet's python/mxnet/initializer.py: Uniform, Normal,
// Xavier and Constant, with the name rules of Initializer.__call__.
#include "worker/initializer.h"

#include <cmath>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace mx {

absl::Status Initializer::operator()(const std::string& name, NDArray* array) const {
  auto ends = [&](absl::string_view suffix) {
    return absl::EndsWith(name, suffix);
  };
  return Fill(name, array, [&]() -> absl::Status {
    if (ends("bias") || ends("beta") || ends("moving_mean")) {
      array->Assign(0.0f);
    } else if (ends("gamma") || ends("moving_var")) {
      array->Assign(1.0f);
    } else if (ends("weight")) {
      InitWeight(name, array);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "initializer: no rule for array '", name,
          "': names must end in weight, bias, gamma, beta, moving_mean or "
          "moving_var (an input such as data is not a parameter)"));
    }
    return absl::OkStatus();
  });
}

absl::Status Initializer::InitByRule(const std::string& name, NDArray* array) const {
  return Fill(name, array, [&] {
    InitWeight(name, array);
    return absl::OkStatus();
  });
}

absl::Status Initializer::Fill(const std::string& name, NDArray* array,
                               const std::function<absl::Status()>& fill) {
  if (array == nullptr || array->is_none()) {
    return absl::InvalidArgumentError(absl::StrCat("initializer: array '", name, "' is null"));
  }
  try {
    return fill();
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat("initializer: array '", name, "': ", e.what()));
  }
}

namespace {

class Uniform : public Initializer {
 public:
  explicit Uniform(float scale) : scale_(scale) {}

 protected:
  void InitWeight(const std::string&, NDArray* array) const override {
    SampleUniform(-scale_, scale_, array);
  }

 private:
  const float scale_;
};

class Normal : public Initializer {
 public:
  explicit Normal(float sigma) : sigma_(sigma) {}

 protected:
  void InitWeight(const std::string&, NDArray* array) const override {
    SampleNormal(0.0f, sigma_, array);
  }

 private:
  const float sigma_;
};

class Constant : public Initializer {
 public:
  explicit Constant(float value) : value_(value) {}

 protected:
  void InitWeight(const std::string&, NDArray* array) const override {
    array->Assign(value_);
  }

 private:
  const float value_;
};

// scale = sqrt(magnitude / factor), factor from the fans of the weight.
class Xavier : public Initializer {
 public:
  enum class Factor { kAvg, kIn, kOut };
  Xavier(bool gaussian, Factor factor, float magnitude)
      : gaussian_(gaussian), factor_(factor), magnitude_(magnitude) {}

 protected:
  void InitWeight(const std::string& name, NDArray* array) const override {
    const Shape& shape = array->shape();
    MX_THROW_IF_NOT(shape.ndim() >= 2, "xavier cannot initialize '", name,
                    "' of shape ", shape.ToString(),
                    ": it needs at least 2 dimensions (out, in, ...)");
    double receptive = 1;  // the product of the kernel dimensions
    for (int d = 2; d < shape.ndim(); ++d) receptive *= shape[d];
    const double fan_in = shape[1] * receptive;
    const double fan_out = shape[0] * receptive;
    const double factor = factor_ == Factor::kAvg  ? (fan_in + fan_out) / 2
                          : factor_ == Factor::kIn ? fan_in
                                                   : fan_out;
    MX_THROW_IF_NOT(factor > 0, "xavier cannot initialize '", name,
                    "' of shape ", shape.ToString(), ": its fan is 0");
    const float scale = static_cast<float>(std::sqrt(magnitude_ / factor));
    if (gaussian_) {
      SampleNormal(0.0f, scale, array);
    } else {
      SampleUniform(-scale, scale, array);
    }
  }

 private:
  const bool gaussian_;
  const Factor factor_;
  const float magnitude_;
};

// Reads the options of one initializer: each known key at most once, and
// no unknown ones.
class Options {
 public:
  Options(const std::string& init,
          const std::map<std::string, std::string>& options)
      : init_(init), options_(options) {}

  absl::StatusOr<float> Number(const std::string& key, float default_value) {
    known_.insert(key);
    auto it = options_.find(key);
    if (it == options_.end()) return default_value;
    float v;
    if (!absl::SimpleAtof(it->second, &v) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat(
          init_, ": option ", key, "='", it->second, "' is not a number"));
    }
    return v;
  }

  // One of `choices`, the first being the default.
  absl::StatusOr<std::string> Choice(const std::string& key,
                                     const std::vector<std::string>& choices) {
    known_.insert(key);
    auto it = options_.find(key);
    if (it == options_.end()) return choices[0];
    for (const std::string& c : choices) {
      if (it->second == c) return c;
    }
    return absl::InvalidArgumentError(
        absl::StrCat(init_, ": option ", key, "='", it->second,
                     "' is not one of ", absl::StrJoin(choices, ", ")));
  }

  bool Has(const std::string& key) const { return options_.count(key) > 0; }

  // Call after reading every option.
  absl::Status CheckNoOthers() const {
    for (const auto& [key, value] : options_) {
      if (known_.count(key) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(init_, ": unknown option '", key,
                         "' (known: ", absl::StrJoin(known_, ", "), ")"));
      }
    }
    return absl::OkStatus();
  }

 private:
  const std::string init_;
  const std::map<std::string, std::string>& options_;
  std::set<std::string> known_;
};

absl::Status NotNegative(const std::string& what, float v) {
  if (v >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " must not be negative, not ", v));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Initializer>> CreateInitializer(
    const std::string& name,
    const std::map<std::string, std::string>& options) {
  Options opts(name, options);
  std::unique_ptr<Initializer> init;
  if (name == "uniform") {
    MX_ASSIGN_OR_RETURN(float scale, opts.Number("scale", 0.07f));
    MX_RETURN_IF_ERROR(NotNegative("uniform: scale", scale));
    init = std::make_unique<Uniform>(scale);
  } else if (name == "normal") {
    MX_ASSIGN_OR_RETURN(float sigma, opts.Number("sigma", 0.01f));
    MX_RETURN_IF_ERROR(NotNegative("normal: sigma", sigma));
    init = std::make_unique<Normal>(sigma);
  } else if (name == "xavier") {
    MX_ASSIGN_OR_RETURN(std::string rnd,
                        opts.Choice("rnd_type", {"uniform", "gaussian"}));
    MX_ASSIGN_OR_RETURN(std::string factor,
                        opts.Choice("factor_type", {"avg", "in", "out"}));
    MX_ASSIGN_OR_RETURN(float magnitude, opts.Number("magnitude", 3.0f));
    MX_RETURN_IF_ERROR(NotNegative("xavier: magnitude", magnitude));
    init = std::make_unique<Xavier>(rnd == "gaussian",
                                    factor == "avg"  ? Xavier::Factor::kAvg
                                    : factor == "in" ? Xavier::Factor::kIn
                                                     : Xavier::Factor::kOut,
                                    magnitude);
  } else if (name == "constant") {
    if (!opts.Has("value")) {
      return absl::InvalidArgumentError("constant: option 'value' is required");
    }
    MX_ASSIGN_OR_RETURN(float value, opts.Number("value", 0.0f));
    init = std::make_unique<Constant>(value);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown initializer '", name,
                     "' (known: uniform, normal, xavier, constant)"));
  }
  MX_RETURN_IF_ERROR(opts.CheckNoOthers());
  return init;
}

absl::StatusOr<std::unique_ptr<Initializer>> InitializerFromAttr(const std::string& attr) {
  const nlohmann::json j = nlohmann::json::parse(attr, nullptr, /*allow_exceptions=*/false);
  if (!j.is_array() || j.size() != 2 || !j[0].is_string() || !j[1].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "__init__ '", attr, "' is not an MXNet initializer (a list [name, {options}])"));
  }
  const std::string name = j[0].get<std::string>();
  std::map<std::string, std::string> options;
  for (const auto& [key, value] : j[1].items()) {
    options[key] = value.is_string() ? value.get<std::string>() : value.dump();
  }
  if (name == "zero" || name == "one") {
    if (!options.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("__init__ '", attr, "': ", name, " takes no options"));
    }
    return CreateInitializer("constant", {{"value", name == "zero" ? "0" : "1"}});
  }
  absl::StatusOr<std::unique_ptr<Initializer>> init = CreateInitializer(name, options);
  if (!init.ok()) {
    return absl::Status(init.status().code(),
                        absl::StrCat("__init__ '", attr, "': ", init.status().message()));
  }
  return init;
}

}  // namespace mx
