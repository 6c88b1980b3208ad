#include "graph/op.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace mx {

ParamValue::ParamValue(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  str_ = buf;
}

absl::StatusOr<bool> ParseBool(const std::string& s) {
  std::string l = absl::AsciiStrToLower(s);
  if (l == "true" || l == "1") return true;
  if (l == "false" || l == "0") return false;
  return absl::InvalidArgumentError(absl::StrCat("'", s, "' is not a boolean"));
}

// As MXNet's tuples read them: "(5,5)" or "[5,5]" (a trailing comma, as
// Python's "(5,)", and "()" too), a bare "5" for one dimension, "None" for
// none (MXNet writes axis="None" for "all"), and Python 2's long suffix
// ("(3L, 3L)"). Anything else, such as "(5,5", "5,5" or "(3,,3)", is not.
absl::StatusOr<Shape> ParseShape(const std::string& s) {
  const auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat("'", s, "' is not a shape"));
  };
  absl::string_view v = absl::StripAsciiWhitespace(s);
  if (v == "None") return Shape();
  const bool bracketed = (absl::ConsumePrefix(&v, "(") && absl::ConsumeSuffix(&v, ")")) ||
                         (absl::ConsumePrefix(&v, "[") && absl::ConsumeSuffix(&v, "]"));
  std::vector<absl::string_view> parts = absl::StrSplit(v, ',');
  if (!bracketed && parts.size() != 1) return bad();
  // One empty part at the end: "(5,)", or "()" alone.
  if (absl::StripAsciiWhitespace(parts.back()).empty() && (parts.size() > 1 || bracketed)) {
    parts.pop_back();
  }
  Shape shape;
  for (absl::string_view part : parts) {
    part = absl::StripAsciiWhitespace(part);
    if (!absl::ConsumeSuffix(&part, "L")) absl::ConsumeSuffix(&part, "l");
    int64_t d;
    if (!absl::SimpleAtoi(part, &d)) return bad();
    shape.push_back(d);
  }
  return shape;
}

namespace {
const std::string& Lookup(const std::map<std::string, std::string>& values,
                          const std::string& name) {
  auto it = values.find(name);
  // Operators only ask for parameters they declared: a miss is an mx bug.
  MX_CHECK(it != values.end());
  return it->second;
}
}  // namespace

int64_t ParsedParams::GetInt(const std::string& name) const {
  int64_t v = 0;
  MX_CHECK(absl::SimpleAtoi(Lookup(values_, name), &v));
  return v;
}

float ParsedParams::GetFloat(const std::string& name) const {
  float v = 0;
  MX_CHECK(absl::SimpleAtof(Lookup(values_, name), &v));
  return v;
}

bool ParsedParams::GetBool(const std::string& name) const {
  absl::StatusOr<bool> v = ParseBool(Lookup(values_, name));
  MX_CHECK(v.ok());
  return *v;
}

const std::string& ParsedParams::GetString(const std::string& name) const {
  return Lookup(values_, name);
}

Shape ParsedParams::GetShape(const std::string& name) const {
  absl::StatusOr<Shape> v = ParseShape(Lookup(values_, name));
  MX_CHECK(v.ok());
  return *v;
}

absl::StatusOr<ParsedParams> OpDef::Parse(
    const std::map<std::string, std::string>& given) const {
  ParsedParams parsed;
  for (const auto& [key, value] : given) {
    auto spec = std::find_if(params.begin(), params.end(),
                             [&](const ParamSpec& p) { return p.name == key; });
    if (spec == params.end()) {
      std::vector<std::string> names;
      for (const ParamSpec& p : params) names.push_back(p.name);
      return absl::InvalidArgumentError(absl::StrCat(
          "operator ", name, ": unknown parameter '", key, "' (it takes: ",
          names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
    }
    absl::Status bad;
    switch (spec->type) {
      case ParamSpec::Type::kInt: {
        int64_t v;
        if (!absl::SimpleAtoi(value, &v)) {
          bad = absl::InvalidArgumentError("not an integer");
        } else if (v < spec->min_int || v > spec->max_int) {
          bad = absl::InvalidArgumentError(
              absl::StrCat("must be from ", spec->min_int, " to ", spec->max_int));
        }
        break;
      }
      case ParamSpec::Type::kFloat: {
        float v;
        if (!absl::SimpleAtof(value, &v)) bad = absl::InvalidArgumentError("not a number");
        break;
      }
      case ParamSpec::Type::kBool:
        bad = ParseBool(value).status();
        break;
      case ParamSpec::Type::kShape:
        bad = ParseShape(value).status();
        break;
      case ParamSpec::Type::kString:
        if (!spec->choices.empty() &&
            std::find(spec->choices.begin(), spec->choices.end(), value) ==
                spec->choices.end()) {
          bad = absl::InvalidArgumentError(absl::StrCat(
              "must be one of {", absl::StrJoin(spec->choices, ", "), "}"));
        }
        break;
    }
    if (!bad.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("operator ", name, ": parameter ", key, "='", value,
                       "' is invalid: ", bad.message()));
    }
    parsed.values_[key] = value;
  }
  for (const ParamSpec& p : params) {
    if (parsed.values_.count(p.name)) continue;
    if (p.required) {
      return absl::InvalidArgumentError(absl::StrCat(
          "operator ", name, ": required parameter '", p.name, "' is missing"));
    }
    parsed.values_[p.name] = p.default_value;
  }
  return parsed;
}

std::vector<std::string> OpDef::ListArguments(const ParsedParams& p) const {
  return arguments ? arguments(p) : std::vector<std::string>{"data"};
}

std::vector<std::string> OpDef::ListAuxStates(const ParsedParams& p) const {
  return aux_states ? aux_states(p) : std::vector<std::string>{};
}

std::vector<std::string> OpDef::ListOutputs(const ParsedParams& p) const {
  return outputs ? outputs(p) : std::vector<std::string>{"output"};
}

int OpDef::NumVisibleOutputs(const ParsedParams& p) const {
  const int all = static_cast<int>(ListOutputs(p).size());
  return num_visible_outputs ? std::min(num_visible_outputs(p), all) : all;
}

std::string OpDef::NameHint() const {
  return name_hint.empty() ? absl::AsciiStrToLower(name) : name_hint;
}

namespace {
struct Table {
  std::mutex mu;
  std::map<std::string, OpDef> ops;
};
Table& GetTable() {
  static Table* table = new Table;
  return *table;
}
}  // namespace

bool OpRegistry::Register(OpDef op) {
  Table& t = GetTable();
  std::lock_guard<std::mutex> lock(t.mu);
  if (t.ops.count(op.name)) {
    std::fprintf(stderr, "mx: operator %s registered twice\n", op.name.c_str());
    std::abort();
  }
  std::string name = op.name;
  t.ops.emplace(name, std::move(op));
  return true;
}

// MXNet's other names of operators: those of its 0.8 files (_Plus,
// _MulScalar, Softmax) and 1.x's aliases (_add, flatten). Found as the
// operator they name, which symbols save under its own name.
static const std::map<std::string, std::string>& Aliases() {
  static const auto* aliases =
      new std::map<std::string, std::string>{{"_Plus", "elemwise_add"},
                                             {"_add", "elemwise_add"},
                                             {"_plus", "elemwise_add"},
                                             {"_Minus", "elemwise_sub"},
                                             {"_sub", "elemwise_sub"},
                                             {"_minus", "elemwise_sub"},
                                             {"_Mul", "elemwise_mul"},
                                             {"_mul", "elemwise_mul"},
                                             {"_Div", "elemwise_div"},
                                             {"_div", "elemwise_div"},
                                             {"_PlusScalar", "_plus_scalar"},
                                             {"_MinusScalar", "_minus_scalar"},
                                             {"_RMinusScalar", "_rminus_scalar"},
                                             {"_MulScalar", "_mul_scalar"},
                                             {"_DivScalar", "_div_scalar"},
                                             {"_RDivScalar", "_rdiv_scalar"},
                                             {"Softmax", "SoftmaxOutput"},
                                             {"flatten", "Flatten"},
                                             {"concat", "Concat"},
                                             {"reshape", "Reshape"}};
  return *aliases;
}

const OpDef* OpRegistry::Find(const std::string& name) {
  Table& t = GetTable();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.ops.find(name);
  if (it == t.ops.end()) {
    auto alias = Aliases().find(name);
    if (alias != Aliases().end()) it = t.ops.find(alias->second);
  }
  return it == t.ops.end() ? nullptr : &it->second;
}

std::vector<std::string> OpRegistry::ListNames() {
  Table& t = GetTable();
  std::lock_guard<std::mutex> lock(t.mu);
  std::vector<std::string> names;
  for (const auto& [name, op] : t.ops) names.push_back(name);
  return names;
}

bool IsKnown(const Shape& s) {
  if (s.ndim() == 0) return false;
  for (int64_t d : s) {
    if (d == 0) return false;
  }
  return true;
}

absl::Status MergeShape(ShapeList* shapes, size_t i, const Shape& shape,
                        const std::string& what) {
  Shape& cur = (*shapes)[i];
  if (shape.ndim() == 0) return absl::OkStatus();
  if (cur.ndim() == 0) {
    cur = shape;
    return absl::OkStatus();
  }
  if (cur.ndim() != shape.ndim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " has shape ", cur.ToString(), " but ", shape.ToString(),
        " is expected"));
  }
  Shape merged = cur;
  for (int d = 0; d < cur.ndim(); ++d) {
    if (cur[d] == 0) {
      merged[d] = shape[d];
    } else if (shape[d] != 0 && shape[d] != cur[d]) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has shape ", cur.ToString(), " but ", shape.ToString(),
          " is expected"));
    }
  }
  cur = merged;
  return absl::OkStatus();
}

}  // namespace mx
