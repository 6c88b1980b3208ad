// Parameter initializers with MXNet's name rules: arrays whose names end in
// "bias" or "beta" or "moving_mean" start at 0, "gamma" and "moving_var" at
// 1, "weight" by the initializer's rule. Names that match none of these,
// such as a data input, are kInvalidArgument naming the array.
#ifndef MX_WORKER_INITIALIZER_H_
#define MX_WORKER_INITIALIZER_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ndarray/ndarray.h"

namespace mx {

class Initializer {
 public:
  virtual ~Initializer() = default;
  // Fills *array according to its name (see above). Random draws come from
  // mx's process generator (srand makes them reproducible).
  absl::Status operator()(const std::string& name, NDArray* array) const;
  // Fills *array by the initializer's weight rule whatever its name: what
  // an MXNet variable's __init__ attribute asks for (MXNet applies it so).
  absl::Status InitByRule(const std::string& name, NDArray* array) const;

 protected:
  // The rule for weights.
  virtual void InitWeight(const std::string& name, NDArray* array) const = 0;

 private:
  // Runs `fill` on a non-null *array, its errors (and mx::Error) naming
  // the array.
  static absl::Status Fill(const std::string& name, NDArray* array,
                           const std::function<absl::Status()>& fill);
};

// "uniform" (scale, default 0.07: U(-scale, scale)), "normal" (sigma,
// default 0.01), "xavier" (rnd_type uniform|gaussian, factor_type
// avg|in|out, magnitude 3), "constant" (value). fan_in of a weight of shape
// (out, in, k...) is in * prod(k); fan_out is out * prod(k).
absl::StatusOr<std::unique_ptr<Initializer>> CreateInitializer(
    const std::string& name, const std::map<std::string, std::string>& options = {});

// The initializer of an MXNet variable's "__init__" attribute (a symbol
// file's, or Variable(name, {{"__init__", ...}})), as MXNet's
// Initializer.dumps() writes it: '["normal", {"sigma": 0.5}]', '["zero",
// {}]', '["one", {}]', '["constant", {"value": 2}]', uniform, xavier. Other
// initializers of MXNet (orthogonal, msraprelu, ...) are kInvalidArgument
// naming them.
absl::StatusOr<std::unique_ptr<Initializer>> InitializerFromAttr(const std::string& attr);

}  // namespace mx

#endif  // MX_WORKER_INITIALIZER_H_
