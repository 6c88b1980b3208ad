// Optimizers: the updaters that the local KVStore and the parameter servers
// apply to (key, weight, gradient).
//
// An Optimizer updates one weight in place from its gradient with a single
// fused kernel per parameter (no temporaries), pushed to the engine like any
// NDArray operation: Update returns at once and orders correctly with the
// operations that produce the gradient and read the weight.
//
// Common options (MXNet's names): learning_rate, wd (weight decay),
// rescale_grad (gradients are multiplied by it first: MXNet's Model sets it
// to 1/batch_size), clip_gradient (clip the rescaled gradient to
// [-c, c]; off when < 0), lr_scheduler, and per-parameter multipliers of lr
// and wd taken from the symbol attributes __lr_mult__ / __wd_mult__. As in
// MXNet, wd_mult defaults to 0 for parameters whose names do not end in
// "_weight" or "_gamma" (biases and BatchNorm betas are not decayed); a
// parameter without a name gets 1.
//
// Created by name with string options, the form the command line and the
// parameter servers' set_optimizer message use:
//   Optimizer::Create("sgd", {{"learning_rate", "0.1"}, {"momentum", "0.9"}})
// Names: sgd (momentum), nag (Nesterov), adam (beta1, beta2, epsilon),
// adagrad (eps), rmsprop (gamma1, epsilon; centered=False), adadelta (rho,
// epsilon). Unknown names or options, and malformed values, are
// kInvalidArgument errors naming them.
//
// The rules are MXNet 1.x's (python/mxnet/optimizer/optimizer.py and the
// kernels of src/operator/optimizer_op-inl.h), with g = clip(rescale_grad *
// grad) unless said otherwise, lr and wd including their multipliers:
//   sgd       momentum 0: w -= lr * (g + wd * w)
//             else:       m = momentum * m - lr * (g + wd * w);  w += m
//   nag       momentum 0: as sgd
//             else:       m = momentum * m + g + wd * w
//                         w -= lr * (g + wd * w + momentum * m)
//   adam      g = clip(rescale_grad * grad + wd * w)   (wd before the clip)
//             m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) g^2
//             w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
//             with t this parameter's update count (from 1)
//   adagrad   h += g^2;  w -= lr * (g / sqrt(h + eps) + wd * w)
//   rmsprop   g = clip(rescale_grad * grad + wd * w)   (wd before the clip)
//             n = (1 - gamma1) * g^2 + gamma1 * n;  w -= lr * g / sqrt(n + eps)
//             then w is clipped to [-clip_weights, clip_weights] if >= 0
//   adadelta  a = rho * a + (1 - rho) g^2;  d = sqrt(b + eps) / sqrt(a + eps) g
//             b = rho * b + (1 - rho) d^2;  w -= d + wd * w
//             (adadelta ignores learning_rate and the schedule, as MXNet 1.x)
// Defaults: learning_rate 0.01 (adam and rmsprop: 0.001, as MXNet), wd 0,
// rescale_grad 1, clip_gradient -1, momentum 0, beta1 0.9, beta2 0.999,
// adam epsilon 1e-8, adagrad eps 1e-7, gamma1 0.9, rmsprop epsilon 1e-8,
// clip_weights -1, rho 0.9, adadelta epsilon 1e-5. Ranges checked at Create:
// learning_rate, wd, the epsilons >= 0; momentum, rho, gamma1 in [0, 1];
// beta1, beta2 in [0, 1); every number finite.
//
// Learning-rate schedule: the option "lr_scheduler" names one of the
// schedulers below, and its options follow with the prefix
// "lr_scheduler.", e.g.
//   {{"lr_scheduler", "factor"}, {"lr_scheduler.step", "1000"},
//    {"lr_scheduler.factor", "0.9"}}
// Its base_lr is learning_rate unless "lr_scheduler.base_lr" is given. The
// schedule is evaluated at num_update(), counted after the update's own
// increment (MXNet's Optimizer._update_count then _get_lr).
//
// An Optimizer is not thread-safe: one owner (a KVStore or a server shard
// under its lock) calls it.
#ifndef MX_KVSTORE_OPTIMIZER_H_
#define MX_KVSTORE_OPTIMIZER_H_

#include <cstdint>
#include <map>
#include <set>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"

namespace mx {

// Learning rate as a function of the number of updates done so far.
class LRScheduler {
 public:
  virtual ~LRScheduler() = default;
  virtual float LearningRate(int64_t num_update) const = 0;
  // The options that recreate it, in the form Optimizer::Create takes them
  // ("lr_scheduler" -> name, "lr_scheduler.base_lr" and every other option
  // as "lr_scheduler.<option>", all explicit). SetLRScheduler copies them
  // into the optimizer's options(), so that a parameter server recreates
  // the same schedule; a custom scheduler that returns {} is not sent.
  virtual std::map<std::string, std::string> Config() const = 0;
};

// Schedulers by name with MXNet's options and semantics, all relative to
// base_lr: "factor" (step, factor = 1, stop_factor_lr = 1e-8): base_lr *
// factor^k with k = number of multiples of step strictly below num_update,
// never below stop_factor_lr; "multifactor" (step as a comma-separated
// increasing list, factor = 1): base_lr * factor^(number of steps strictly
// below num_update); "cosine" (max_update, final_lr = 0): from base_lr at
// warmup_steps to final_lr at max_update along half a cosine, final_lr
// after. Each takes warmup_steps (default 0) and warmup_begin_lr (default 0,
// at most base_lr): below warmup_steps the rate goes linearly from
// warmup_begin_lr towards base_lr (warmup_mode "linear", the default) or
// stays at warmup_begin_lr ("constant"). As in MXNet, factor and
// multifactor count their steps from update 0 (warm-up included) and cosine
// from warmup_steps, which must be below max_update. Bad names, unknown
// options and bad values are kInvalidArgument errors naming them.
absl::StatusOr<std::unique_ptr<LRScheduler>> CreateLRScheduler(
    const std::string& name, float base_lr,
    const std::map<std::string, std::string>& options);

class Optimizer {
 public:
  using Options = std::map<std::string, std::string>;
  // The rows of the weight a lazy update touches, one per row of the
  // compact gradient; null for a dense update.
  using RowPositions = std::shared_ptr<const std::vector<int64_t>>;

  static absl::StatusOr<std::unique_ptr<Optimizer>> Create(
      const std::string& name, const Options& options);
  virtual ~Optimizer() = default;

  // Updates weight in place from grad (same shape, same context) for the
  // parameter with this index; state is created at the first call. Throws
  // mx::Error (kInvalidArgument) when shapes differ from each other or from
  // the first call's, and kUnimplemented for arrays that are not on a CPU.
  void Update(int index, NDArray weight, const NDArray& grad);
  // The lazy update of a row-sparse gradient (MXNet's lazy_update, for every
  // optimizer here): the rule above is applied to the rows grad stores and
  // to those rows of the states; every other row of the weight and of the
  // states stays as it is. That is where it differs from Update with the
  // dense form of grad: rows outside grad get no weight decay and their
  // momentum (or Adam's moments) does not decay. Counts and Adam's t
  // advance once per call, as for Update. `weight` holds rows [first_row,
  // first_row + weight.shape()[0]) of the table grad describes (a parameter
  // server's range of a sharded table; 0 and the whole table otherwise):
  // its other dimensions must equal grad's and grad's ids must lie in that
  // range (kInvalidArgument otherwise, naming the parameter).
  void UpdateRows(int index, NDArray weight, const RowSparseNDArray& grad,
                  int64_t first_row = 0);

  // Names of parameters by index (for lr/wd multipliers and default wd_mult).
  void SetParamNames(const std::map<int, std::string>& names);
  // Multipliers by parameter name, e.g. from the symbol's __lr_mult__.
  void SetLrMult(const std::map<std::string, float>& mult);
  void SetWdMult(const std::map<std::string, float>& mult);
  void SetLRScheduler(std::shared_ptr<LRScheduler> scheduler);

  // The effective learning rate of parameter `index` for its next update.
  float LearningRate(int index) const;
  int64_t num_update() const { return num_update_; }

  const std::string& name() const { return name_; }
  // Everything needed to recreate this optimizer with Create (what
  // set_optimizer sends to parameter servers).
  const Options& options() const { return options_; }
  // What the setters above set (a distributed store sends them to the
  // servers with the options).
  const std::map<int, std::string>& param_names() const { return names_; }
  const std::map<std::string, float>& lr_mult() const { return lr_mult_; }
  const std::map<std::string, float>& wd_mult() const { return wd_mult_; }

  // States (momentum buffers, update counts) as a byte string in the mx
  // NDArray file format, and back. Loading checks the optimizer name and
  // the shapes (against earlier updates, else against `shapes`: parameters'
  // shapes as the caller knows them, such as a server's keys), with errors
  // naming the parameter, and replaces every state (and num_update) only
  // when all of it is valid. Hyper-parameters are not saved: they come from
  // the options the optimizer was created with.
  //
  // Entries (all but the states are empty arrays whose names carry the
  // values, so that 64-bit counts are exact):
  //   "optimizer:<name>", "num_update:<n>",
  //   "param:<index>:count:<n>" and "param:<index>:state:<k>" (k < NumStates)
  absl::StatusOr<std::string> SaveStates() const;
  absl::Status LoadStates(const std::string& bytes,
                          const std::map<int, Shape>& shapes = {});
  // The same for some parameters: SaveStatesOf writes those of `indices`
  // (with num_update), and MergeStates replaces the states of the
  // parameters the bytes hold, keeping the others (num_update becomes the
  // larger of the two): how a parameter server hands a key's state to
  // another.
  absl::StatusOr<std::string> SaveStatesOf(const std::set<int>& indices) const;
  absl::Status MergeStates(const std::string& bytes, const std::map<int, Shape>& shapes = {});
  absl::Status SaveStatesToFile(const std::string& path) const;
  // `shapes` as for LoadStates: the parameters' (a store's keys').
  absl::Status LoadStatesFromFile(const std::string& path, const std::map<int, Shape>& shapes = {});

  // Updates of 2^16 elements or more on the CPU split over the CPU pool
  // (kernel::Launch's split, ndarray/launch.h). For a trainer that updates
  // its own weights (FeedForward without a store): a large weight's update
  // then stands between one step's backward and the next forward with
  // nothing beside it (the MLP's 784 x 128 first layer: 57 -> 25-31 us of
  // update per step). Off by default, as on parameter servers, which run
  // many keys' updates at once and share hosts with workers.
  void SplitLargeUpdates(bool on) { split_updates_ = on; }

 protected:
  Optimizer(std::string name, Options options);
  // Per-optimizer hyper-parameters are parsed by subclasses from options().
  float GetFloat(const std::string& key, float default_value) const;

  // Number of state arrays per parameter (momentum: 1, adam: 2, ...).
  virtual int NumStates() const = 0;
  // Pushes the fused update. lr and wd already include multipliers and the
  // schedule; `t` counts this parameter's updates from 1 (for Adam). With
  // `rows`, grad holds only those rows of the weight (a lazy update).
  virtual void PushUpdate(NDArray& weight, const NDArray& grad, const RowPositions& rows,
                          std::vector<NDArray>& states, float lr, float wd,
                          int64_t t) = 0;

  float rescale_grad_ = 1.0f;
  float clip_gradient_ = -1.0f;
  bool split_updates_ = false;  // SplitLargeUpdates

 private:
  // Per-parameter state. The shape is fixed by the first update (or by
  // loaded states); states live on the context of the last update's weight.
  struct Param {
    std::optional<Shape> shape;
    std::vector<NDArray> states;  // NumStates() arrays, created lazily
    int64_t count = 0;            // updates of this parameter
  };

  float WdFor(int index) const;
  // What Update and UpdateRows share once the arrays are checked: the
  // schedule, the states and the count.
  void Apply(int index, NDArray& weight, const NDArray& grad, const RowPositions& rows,
             const std::string& what);
  float MultFor(const std::map<std::string, float>& mult, int index,
                float fallback) const;
  // "parameter 3 ('fc1_weight')", for error messages.
  std::string ParamLabel(int index) const;
  // The states as named arrays (the format SaveStates documents), and back.
  // `only`: those parameters' (nullptr: every one).
  NamedArrays StateArrays(const std::set<int>* only = nullptr) const;
  // `merge`: keeps the parameters the arrays do not hold.
  absl::Status RestoreStates(const NamedArrays& arrays,
                             const std::map<int, Shape>& shapes, bool merge = false);

  std::string name_;
  Options options_;
  float base_lr_ = 0.01f;
  float wd_ = 0.0f;
  std::shared_ptr<LRScheduler> scheduler_;
  std::map<int, std::string> names_;
  std::map<std::string, float> lr_mult_, wd_mult_;
  std::map<int, Param> params_;
  int64_t num_update_ = 0;  // max over parameters' counts, as in MXNet
};

}  // namespace mx

#endif  // MX_KVSTORE_OPTIMIZER_H_
