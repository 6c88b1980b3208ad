// Executor: a Symbol bound to arrays on a context (the seed's "Binding and
// Executing").
//
//   auto exec = mx::Executor::Bind(c, mx::cpu(), {{"A", a}, {"B", b}});
//   (*exec)->Forward();
//   (*exec)->outputs()[0].ToVector();   // waits for the result
//
// Forward and Backward push engine operations and return at once; outputs
// and gradients are read through the engine (ToVector, WaitToRead).
//
// Bulks. On a CPU each graph node is one engine operation, so that
// independent nodes run on separate cores. On a GPU, consecutive nodes
// (up to 15, in forward and in backward order) are one engine operation
// that enqueues their kernels on the device's stream one after another, as
// MXNet's bulk execution does: an operation completes only once the stream
// has run it, and a chain of one operation per node paid that wait (and a
// worker's wake-up) per node, about 28 us each against 9.5 for kernels
// launched back to back (LeNet on an H200). A bulk writes what its nodes
// write, so a gradient is ready when its bulk is. MX_EXEC_BULK_GPU and
// MX_EXEC_BULK_CPU set the most nodes per operation (1 to 1000; defaults
// 15 and 1) for executors bound from then on; copies between contexts and
// runs with a monitor set are never bulked. Arrays are planned at bind time: intermediate results
// share buffers when their lifetimes (through forward and, when gradients are requested, backward)
// do not overlap, and operators that allow it run in place. memory() reports the planned bytes next
// to the naive sum.
//
// Device placement (MXNet's group2ctx). An operator whose "__ctx_group__"
// attribute (ctx_group in 0.8-era files, mx::AttrScope, Op and Variable
// attributes) names a group in `group2ctx` runs on that group's context;
// every other operator runs on the bind context. A variable lives where its
// own group says, else with the first operator that reads it, else on the
// bind context; its argument, gradient and auxiliary arrays must be there
// (SimpleBind allocates them there). Where an operator reads a result that
// lives elsewhere, the executor copies it over before the operator runs and
// carries the gradient back in backward; memory is planned per context.
// This works with CPU contexts (cpu(1), cpu(2)) as well as GPUs.
//
// Row-sparse arguments (embedding tables too big to hold). An argument
// bound row-sparse (Bind's and SimpleBind's row_sparse) is a table of which
// the executor holds only a compact block of `capacity` rows: the caller
// sets which table rows those are before each batch (SetRowSparseArg, with
// the rows a KVStore's RowSparsePull returned for the batch's
// UniqueRowIds), Embedding reads its indices through them (an index
// outside them is an error stored on the output), and Backward writes the
// table's gradient row-sparse on the same rows (row_sparse_grad), never
// dense. Only Embedding with sparse_grad=True may read such an argument,
// on the context it is bound to; its gradient request is kWrite or kNull.
//
// Blocked layouts (CPU). Convolutions run through oneDNN, which works on
// data blocked by 16 channels. An intermediate result that only such
// operators and ones that take it too (element-wise, BatchNorm, global
// avg/sum and 2x2 max Pooling: OpDef::blocked) write and read is stored
// blocked,
// as its gradient is, so that no conversion runs between them (the zoo
// ResNet's step ran 30% faster). Results are the same to the bit either
// way; callers see only row-major arrays (outputs, arguments, gradients,
// and Monitor's copies). MX_BLOCKED_LAYOUT=0 turns this off for executors
// bound from then on.
//
// An Executor must not be used from several threads at once.
#ifndef MX_GRAPH_EXECUTOR_H_
#define MX_GRAPH_EXECUTOR_H_

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "graph/symbol.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"

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
  // argument and the shapes. group2ctx places groups of operators on other
  // contexts (see the header comment). Arguments in `row_sparse` are
  // bound row-sparse (see the header comment): their arrays (and
  // gradients) have the table's shape but for the first dimension, the
  // capacity, at most the table's rows.
  static absl::StatusOr<std::unique_ptr<Executor>> Bind(
      const Symbol& symbol, Context ctx,
      const std::map<std::string, NDArray>& args,
      const std::map<std::string, NDArray>& args_grad = {},
      const std::map<std::string, GradReq>& grad_req = {},
      const std::map<std::string, NDArray>& aux_states = {},
      const std::map<std::string, Context>& group2ctx = {},
      const std::set<std::string>& row_sparse = {});

  // Infers every shape from `input_shapes`, allocates zero-filled arrays
  // for arguments, gradients (grad_req for each argument, default_req
  // unless overridden in `grad_reqs`) and auxiliary states, each on its
  // variable's context, and binds. `row_sparse` binds those arguments
  // row-sparse with the given capacity (rows held at once).
  static absl::StatusOr<std::unique_ptr<Executor>> SimpleBind(
      const Symbol& symbol, Context ctx,
      const std::map<std::string, Shape>& input_shapes,
      GradReq default_req = GradReq::kWrite,
      const std::map<std::string, GradReq>& grad_reqs = {},
      const std::map<std::string, Context>& group2ctx = {},
      const std::map<std::string, int64_t>& row_sparse = {});

  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Pushes the forward pass. is_train selects training behaviour (Dropout,
  // BatchNorm statistics) and is required before Backward.
  void Forward(bool is_train = false);
  // Pushes the backward pass. head_grads gives, for each output in order,
  // the gradient flowing into it; outputs of loss operators need none, and
  // may be given a null NDArray. Throws mx::Error when a needed head
  // gradient is missing or mis-shaped, or without a training Forward since
  // the last Backward (one Backward per Forward: the forward's values it
  // reads share memory with gradients, so a second gave wrong ones).
  void Backward(const std::vector<NDArray>& head_grads = {});

  const std::vector<NDArray>& outputs() const { return outputs_; }
  const std::map<std::string, NDArray>& arg_dict() const { return args_; }
  const std::map<std::string, NDArray>& grad_dict() const { return grads_; }
  const std::map<std::string, NDArray>& aux_dict() const { return aux_; }
  const Symbol& symbol() const { return symbol_; }
  // The bind context (operators outside group2ctx's groups run there).
  Context context() const { return ctx_; }
  const std::map<std::string, Context>& group2ctx() const { return group2ctx_; }
  MemoryStats memory() const { return memory_; }
  // The node outputs ("<node>_<output>", as Monitor names them) stored in
  // the blocked layout (see the header comment).
  std::vector<std::string> blocked_outputs() const;

  // A new executor for other input shapes (another batch size) that shares
  // this one's parameter, gradient and auxiliary arrays. Only arguments in
  // `input_shapes` may change shape.
  absl::StatusOr<std::unique_ptr<Executor>> Reshape(
      const std::map<std::string, Shape>& input_shapes) const;

  // The table rows the row-sparse argument `name` holds from now on:
  // rows.shape() is the table's, rows.nnz() at most the capacity; the
  // values are copied in through the engine. Throws mx::Error
  // (kInvalidArgument) naming the argument otherwise.
  void SetRowSparseArg(const std::string& name, const RowSparseNDArray& rows);
  // The gradient of a row-sparse argument after Backward: on the rows last
  // set, a view of the executor's gradient block (valid until the next
  // Backward, like grad_dict's arrays).
  RowSparseNDArray row_sparse_grad(const std::string& name) const;
  const std::set<std::string>& row_sparse_args() const { return row_sparse_; }
  // The table shape of row-sparse argument `name` (its array holds a block
  // of it). Throws mx::Error for a name that is not one.
  const Shape& RowSparseTable(const std::string& name) const;
  // The argument whose values index the row-sparse argument `name` (the
  // Embedding's data): what a trainer reads to know which rows a batch
  // needs before Forward. kFailedPrecondition when the indices are
  // computed by the graph (or come from several inputs), which a trainer
  // cannot read ahead; kInvalidArgument for a name that is not one.
  absl::StatusOr<std::string> RowSparseIndexInput(const std::string& name) const;

  void SetMonitorCallback(MonitorCallback callback) {
    monitor_ = std::move(callback);
  }

  struct Plan;       // internal
  struct Placement;  // internal

 private:
  Executor() = default;
  // Checks the arrays against the symbol; sets args_, aux_, grads_ and
  // grad_req_. `known` receives the argument and auxiliary shapes.
  absl::Status AdoptArrays(const Placement& placement,
                           const std::map<std::string, NDArray>& args,
                           const std::map<std::string, NDArray>& args_grad,
                           const std::map<std::string, GradReq>& grad_req,
                           const std::map<std::string, NDArray>& aux_states,
                           std::map<std::string, Shape>* known);
  // Throws unless every row-sparse argument has rows set.
  void RequireRowSparseRows(const char* what) const;
  // The current row ids of a row-sparse argument; null for "".
  std::shared_ptr<const std::vector<int64_t>> RowsFor(const std::string& sparse_arg) const;
  // Pushes run k's forward (backward) as an engine operation of its own.
  void PushForward(size_t k, bool is_train) const;
  void PushBackward(size_t k) const;
  // The work of run k's forward (backward), set up now (random seed,
  // row-sparse rows) and run later by an engine operation.
  std::function<void()> ForwardWork(size_t k, bool is_train) const;
  std::function<void()> BackwardWork(size_t k) const;

  Symbol symbol_;
  Context ctx_;
  std::map<std::string, Context> group2ctx_;
  std::map<std::string, NDArray> args_, grads_, aux_;
  std::map<std::string, GradReq> grad_req_;
  std::set<std::string> row_sparse_;
  // The table shape and current rows of each row-sparse argument.
  struct SparseRows {
    Shape table;
    std::shared_ptr<const std::vector<int64_t>> ids;  // null until set
  };
  std::map<std::string, SparseRows> sparse_rows_;
  // The SparseRows of `name`; throws mx::Error naming `what` for a name
  // that is not a row-sparse argument.
  const SparseRows& SparseRowsOf(const std::string& name, const char* what) const;
  std::vector<NDArray> outputs_;
  std::shared_ptr<Plan> plan_;
  MemoryStats memory_;
  MonitorCallback monitor_;
  bool trained_forward_ = false;
};

}  // namespace mx

#endif  // MX_GRAPH_EXECUTOR_H_
