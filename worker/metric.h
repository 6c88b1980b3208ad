// Evaluation metrics, as MXNet's EvalMetric: Update with labels and
// predictions batch by batch, Get the running value, Reset per epoch.
//
// Predictions are the network outputs (probabilities for classification,
// shape (batch, classes)); labels hold class indices or targets. `pad`
// trailing samples of a padded last batch are skipped. Shapes that do not
// fit are mx::Error (kInvalidArgument) naming both shapes.
#ifndef MX_WORKER_METRIC_H_
#define MX_WORKER_METRIC_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "ndarray/ndarray.h"

namespace mx {

class EvalMetric {
 public:
  virtual ~EvalMetric() = default;
  virtual void Update(const std::vector<NDArray>& labels,
                      const std::vector<NDArray>& preds, int pad = 0) = 0;
  virtual void Reset() = 0;
  // (name, value) pairs: one for simple metrics, several for a composite.
  virtual std::vector<std::pair<std::string, double>> Get() const = 0;
};

// "accuracy", "top_k_accuracy" (k), "ce" (cross-entropy), "mse", "mae",
// "rmse", "f1" (binary, positive class 1), and "a,b,c" for a composite of
// several. Unknown names are kInvalidArgument.
absl::StatusOr<std::unique_ptr<EvalMetric>> CreateMetric(const std::string& name,
                                                         int top_k = 5);

}  // namespace mx

#endif  // MX_WORKER_METRIC_H_
