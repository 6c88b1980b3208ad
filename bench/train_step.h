// A network bound for training-step benchmarks: data (batch, 1, 28, 28)
// without a gradient, labels 0..9 in turn, every parameter drawn from
// N(0, 0.05).
#ifndef MX_BENCH_TRAIN_STEP_H_
#define MX_BENCH_TRAIN_STEP_H_

#include <memory>
#include <vector>

#include "graph/executor.h"
#include "graph/symbol.h"
#include "ndarray/ndarray.h"

namespace mx::bench {

inline std::unique_ptr<Executor> BindTrainStep(const Symbol& net, Context ctx, int batch) {
  auto exec = Executor::SimpleBind(net, ctx, {{"data", Shape{batch, 1, 28, 28}}},
                                   GradReq::kWrite,
                                   {{"data", GradReq::kNull}, {"softmax_label", GradReq::kNull}});
  ThrowIfError(exec.status());
  for (const auto& [name, a] : (*exec)->arg_dict()) {
    NDArray x = a;
    if (name == "softmax_label") {
      std::vector<float> labels(batch);
      for (int i = 0; i < batch; ++i) labels[i] = static_cast<float>(i % 10);
      x.Assign(labels);
    } else {
      SampleNormal(0, 0.05f, &x);
    }
  }
  return *std::move(exec);
}

}  // namespace mx::bench

#endif  // MX_BENCH_TRAIN_STEP_H_
