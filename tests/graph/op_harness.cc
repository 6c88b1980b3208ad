#include "tests/graph/op_harness.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "ndarray/ndarray.h"

namespace mx::testing {

namespace {

std::vector<OpCase>& Table() {
  static auto* table = new std::vector<OpCase>;
  return *table;
}

struct Bound {
  std::unique_ptr<Executor> exec;
  std::vector<std::string> arg_names, aux_names;
  HostArrays in, aux;
};

uint32_t Seed(const std::string& name) {
  uint32_t h = 2166136261u;
  for (char ch : name) h = (h ^ static_cast<uint8_t>(ch)) * 16777619u;
  return h;
}

HostArrays MakeValues(const OpCase& c, const std::vector<Shape>& shapes,
                      uint32_t seed, bool inputs) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  HostArrays values;
  for (size_t i = 0; i < shapes.size(); ++i) {
    std::vector<float> v(shapes[i].Size());
    for (float& x : v) x = dist(gen);
    if (inputs && c.init) c.init(static_cast<int>(i), &v);
    if (!inputs) {
      for (float& x : v) x = std::fabs(x) + 0.5f;  // variances stay positive
    }
    values.push_back(std::move(v));
  }
  return values;
}

absl::StatusOr<Bound> BindCase(const OpCase& c, GradReq req) {
  SymbolInputs inputs;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    inputs.emplace_back(Variable(absl::StrCat("in", i)));
  }
  Symbol sym;
  try {
    NameScope scope;
    sym = Op(c.op, inputs, c.params, "op");
  } catch (const Error& e) {
    return e.status();
  }
  Bound b;
  b.arg_names = sym.ListArguments();
  b.aux_names = sym.ListAuxiliaryStates();
  if (b.arg_names.size() != c.inputs.size() || b.aux_names.size() != c.aux.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        c.name, ": the case gives ", c.inputs.size(), " inputs and ", c.aux.size(),
        " aux states but the operator has ", b.arg_names.size(), " and ",
        b.aux_names.size()));
  }
  b.in = MakeValues(c, c.inputs, Seed(c.name), true);
  b.aux = MakeValues(c, c.aux, Seed(c.name) + 1, false);
  std::map<std::string, NDArray> args, grads, aux;
  std::map<std::string, GradReq> reqs;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    args[b.arg_names[i]] = FromVector(b.in[i], c.inputs[i]);
    bool no_grad = std::find(c.no_grad.begin(), c.no_grad.end(), i) != c.no_grad.end();
    reqs[b.arg_names[i]] = no_grad ? GradReq::kNull : req;
    if (!no_grad && req != GradReq::kNull) grads[b.arg_names[i]] = Zeros(c.inputs[i]);
  }
  for (size_t i = 0; i < c.aux.size(); ++i) aux[b.aux_names[i]] = FromVector(b.aux[i], c.aux[i]);
  auto exec = Executor::Bind(sym, cpu(), args, grads, reqs, aux);
  if (!exec.ok()) return exec.status();
  b.exec = *std::move(exec);
  return b;
}

HostArrays Outputs(Executor& e) {
  HostArrays out;
  for (const NDArray& o : e.outputs()) out.push_back(o.ToVector());
  return out;
}

std::vector<float> HeadGradient(const OpCase& c, size_t n, size_t index) {
  std::mt19937 gen(Seed(c.name) + 7 + static_cast<uint32_t>(index));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> g(n);
  for (float& x : g) x = dist(gen);
  return g;
}

double Loss(const OpCase& c, const HostArrays& out, const HostArrays& in) {
  if (c.loss) return c.loss(out, in);
  double total = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    std::vector<float> head = HeadGradient(c, out[i].size(), i);
    for (size_t k = 0; k < out[i].size(); ++k) total += double(out[i][k]) * head[k];
  }
  return total;
}

}  // namespace

bool RegisterOpCase(OpCase c) {
  Table().push_back(std::move(c));
  return true;
}

const std::vector<OpCase>& AllOpCases() { return Table(); }

absl::Status CheckForward(const OpCase& c) {
  MX_ASSIGN_OR_RETURN(Bound b, BindCase(c, GradReq::kNull));
  b.exec->Forward(c.is_train);
  HostArrays got = Outputs(*b.exec);
  HostArrays want = c.reference(b.in, b.aux);
  if (got.size() < want.size()) {
    return absl::InternalError(absl::StrCat(c.name, ": ", got.size(), " outputs, reference has ",
                                            want.size()));
  }
  for (size_t o = 0; o < want.size(); ++o) {
    if (got[o].size() != want[o].size()) {
      return absl::InternalError(absl::StrCat(c.name, ": output ", o, " has ", got[o].size(),
                                              " elements, reference ", want[o].size()));
    }
    for (size_t k = 0; k < want[o].size(); ++k) {
      double tol = c.forward_tol * (1 + std::fabs(want[o][k]));
      if (!(std::fabs(got[o][k] - want[o][k]) <= tol)) {
        return absl::InternalError(absl::StrCat(c.name, ": output ", o, "[", k, "] = ", got[o][k],
                                                " but the reference gives ", want[o][k]));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckGradient(const OpCase& c) {
  if (!c.check_grad) return absl::OkStatus();
  MX_ASSIGN_OR_RETURN(Bound b, BindCase(c, GradReq::kWrite));
  b.exec->Forward(true);
  std::vector<NDArray> heads;
  HostArrays out0 = Outputs(*b.exec);
  for (size_t i = 0; i < out0.size(); ++i) {
    heads.push_back(c.loss ? NDArray()
                           : FromVector(HeadGradient(c, out0[i].size(), i),
                                        b.exec->outputs()[i].shape()));
  }
  b.exec->Backward(heads);

  // Finite differences on a sample of elements of every input with a grad.
  std::mt19937 gen(Seed(c.name) + 3);
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    if (std::find(c.no_grad.begin(), c.no_grad.end(), i) != c.no_grad.end()) continue;
    std::vector<float> analytic = b.exec->grad_dict().at(b.arg_names[i]).ToVector();
    const size_t n = analytic.size();
    std::vector<size_t> picks;
    for (size_t k = 0; k < std::min<size_t>(n, 12); ++k) {
      picks.push_back(n <= 12 ? k : std::uniform_int_distribution<size_t>(0, n - 1)(gen));
    }
    for (size_t k : picks) {
      const double eps = 1e-2;
      auto eval = [&](double delta) {
        HostArrays in = b.in;
        in[i][k] += static_cast<float>(delta);
        NDArray arg = b.exec->arg_dict().at(b.arg_names[i]);
        arg.Assign(in[i]);
        for (size_t a = 0; a < c.aux.size(); ++a) {
          NDArray aux = b.exec->aux_dict().at(b.aux_names[a]);
          aux.Assign(b.aux[a]);
        }
        b.exec->Forward(c.is_train);
        return Loss(c, Outputs(*b.exec), in);
      };
      double numeric = (eval(eps) - eval(-eps)) / (2 * eps);
      double err = std::fabs(numeric - analytic[k]);
      if (err > c.grad_tol * (1 + std::fabs(numeric))) {
        return absl::InternalError(absl::StrCat(
            c.name, ": gradient of input ", i, " (", b.arg_names[i], ")[", k, "] is ",
            analytic[k], " but finite differences give ", numeric));
      }
    }
    NDArray arg = b.exec->arg_dict().at(b.arg_names[i]);
    arg.Assign(b.in[i]);
  }
  return absl::OkStatus();
}

Timing TimeCase(const OpCase& c, int reps) {
  absl::StatusOr<Bound> b = BindCase(c, GradReq::kWrite);
  ThrowIfError(b.status());
  std::vector<NDArray> heads;
  b->exec->Forward(true);
  for (const NDArray& o : b->exec->outputs()) {
    heads.push_back(c.loss ? NDArray() : Ones(o.shape()));
  }
  auto now = [] { return std::chrono::steady_clock::now(); };
  WaitAll();
  auto start = now();
  for (int r = 0; r < reps; ++r) {
    b->exec->Forward(true);
    if (c.check_grad) b->exec->Backward(heads);
  }
  WaitAll();
  double mx = std::chrono::duration<double>(now() - start).count() / reps;
  start = now();
  for (int r = 0; r < reps; ++r) c.reference(b->in, b->aux);
  double ref = std::chrono::duration<double>(now() - start).count() / reps;
  return {mx, ref};
}

}  // namespace mx::testing
