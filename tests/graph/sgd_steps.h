// Shared by executor tests that compare two ways of running one graph.
#ifndef MX_TESTS_GRAPH_SGD_STEPS_H_
#define MX_TESTS_GRAPH_SGD_STEPS_H_

#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "graph/executor.h"

namespace mx {

// Every array of `steps` SGD steps (learning rate 0.1; "data" and
// "softmax_label" are not updated): the output, gradients and auxiliary
// states after each, as "step<i>_output", "step<i>_grad_<name>" and
// "step<i>_<aux>"; then an inference forward's output, "inference_output".
inline std::map<std::string, std::vector<float>> SgdSteps(Executor* exec, int steps) {
  std::map<std::string, std::vector<float>> seen;
  for (int step = 0; step < steps; ++step) {
    exec->Forward(true);
    exec->Backward();
    const std::string at = absl::StrCat("step", step, "_");
    seen[at + "output"] = exec->outputs()[0].ToVector();
    for (const auto& [name, grad] : exec->grad_dict()) {
      if (grad.is_none()) continue;
      seen[at + "grad_" + name] = grad.ToVector();
      if (name == "data" || name == "softmax_label") continue;
      NDArray weight = exec->arg_dict().at(name);
      weight -= grad * 0.1f;
    }
    for (const auto& [name, aux] : exec->aux_dict()) seen[at + name] = aux.ToVector();
  }
  exec->Forward(false);
  seen["inference_output"] = exec->outputs()[0].ToVector();
  return seen;
}

}  // namespace mx

#endif  // MX_TESTS_GRAPH_SGD_STEPS_H_
