// Executor: a Symbol bound to arrays on a context (the seed's "Binding and
// Executing").
//
//   auto exec = mx::Executor::Bind(c, mx::cpu(), {{"A", a}, {"B", b}});
//   (*exec)->Forward();
//   (*exec)->outputs()[0].ToVector();   // waits for the result
//
// Forward and Backward push one engine operation per graph node and return
// at once; outputs and gradients are read through the engine (ToVector,
// WaitToRead). Arrays are planned at bind time: intermediate results share
// buffers when their lifetimes (through forward and, when gradients are
// requested, backward) do not overlap, and operators that allow it run in
// place. memory() reports the planned bytes next to the naive sum.
//
// An Executor must not be used from several threads at once.
#ifndef MX_GRAPH_EXECUTOR_H_
#define MX_GRAPH_EXECUTOR_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "graph/symbol.h"
#include "ndarray/ndarray.h"

namespace mx {

// How an argument's gradient is stored: not at all, overwritten, or added
// to what the array holds.
enum class GradReq { kNull, kWrite, kAdd };

class Executor {
 public:
  struct MemoryStats {
    size_t planned_bytes = 0;  // buffers actually allocated for the graph
    size_t naive_bytes = 0;    // one buffer per intermediate result
  };
  // Called with "<node>_<output>" and the array after each node's forward
  // is pushed (read it to wait for the value).
  using MonitorCallback =
      std::function<void(const std::string& name, const NDArray& value)>;

  // Binds every argument of `symbol` (all required, shapes must agree with
  // inference). args_grad holds arrays for the gradients to compute;
  // grad_req defaults to kWrite for arguments in args_grad and kNull for the
  // others. aux_states must hold every auxiliary state. Errors name the
  // argument and the shapes.
  static absl::StatusOr<std::unique_ptr<Executor>> Bind(
      const Symbol& symbol, Context ctx,
      const std::map<std::string, NDArray>& args,
      const std::map<std::string, NDArray>& args_grad = {},
      const std::map<std::string, GradReq>& grad_req = {},
      const std::map<std::string, NDArray>& aux_states = {});

  // Infers every shape from `input_shapes`, allocates zero-filled arrays
  // for arguments, gradients (grad_req for each argument, default_req
  // unless overridden in `grad_reqs`) and auxiliary states, and binds.
  static absl::StatusOr<std::unique_ptr<Executor>> SimpleBind(
      const Symbol& symbol, Context ctx,
      const std::map<std::string, Shape>& input_shapes,
      GradReq default_req = GradReq::kWrite,
      const std::map<std::string, GradReq>& grad_reqs = {});

  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Pushes the forward pass. is_train selects training behaviour (Dropout,
  // BatchNorm statistics) and is required before Backward.
  void Forward(bool is_train = false);
  // Pushes the backward pass. head_grads gives, for each output in order,
  // the gradient flowing into it; outputs of loss operators need none, and
  // may be given a null NDArray. Throws mx::Error when a needed head
  // gradient is missing or mis-shaped, or without a training Forward.
  void Backward(const std::vector<NDArray>& head_grads = {});

  const std::vector<NDArray>& outputs() const { return outputs_; }
  const std::map<std::string, NDArray>& arg_dict() const { return args_; }
  const std::map<std::string, NDArray>& grad_dict() const { return grads_; }
  const std::map<std::string, NDArray>& aux_dict() const { return aux_; }
  const Symbol& symbol() const { return symbol_; }
  Context context() const { return ctx_; }
  MemoryStats memory() const { return memory_; }

  // A new executor for other input shapes (another batch size) that shares
  // this one's parameter, gradient and auxiliary arrays. Only arguments in
  // `input_shapes` may change shape.
  absl::StatusOr<std::unique_ptr<Executor>> Reshape(
      const std::map<std::string, Shape>& input_shapes) const;

  void SetMonitorCallback(MonitorCallback callback) {
    monitor_ = std::move(callback);
  }

  struct Plan;  // internal

 private:
  Executor() = default;
  absl::Status Init(const Symbol& symbol, Context ctx,
                    const std::map<std::string, NDArray>& args,
                    const std::map<std::string, NDArray>& args_grad,
                    const std::map<std::string, GradReq>& grad_req,
                    const std::map<std::string, NDArray>& aux_states);

  Symbol symbol_;
  Context ctx_;
  std::map<std::string, NDArray> args_, grads_, aux_;
  std::map<std::string, GradReq> grad_req_;
  std::vector<NDArray> outputs_;
  std::shared_ptr<Plan> plan_;
  MemoryStats memory_;
  MonitorCallback monitor_;
  bool trained_forward_ = false;
};

}  // namespace mx

#endif  // MX_GRAPH_EXECUTOR_H_
