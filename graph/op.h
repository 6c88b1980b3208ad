// Operators: the one way to declare what a graph node computes.
//
// An OpDef names the operator, declares its typed parameters (with defaults
// and validation), its argument, auxiliary-state and output names, and
// provides shape inference, the CPU forward and backward kernels, in-place
// options and a workspace size. Operators register themselves at static
// initialization with MX_REGISTER_OP; Symbol and Executor only ever go
// through this table.
//
// Shapes in inference. A Shape with ndim() == 0 is unknown, and a dimension
// equal to 0 is an unknown size (MXNet's convention: data (0, 784) knows only
// the feature size). infer_shape fills what it can, leaves the rest unknown,
// and reports inconsistencies naming the input and both shapes.
//
// Kernels. forward(ctx, params, in, req, out, aux) computes outputs from
// inputs (arguments in list_arguments order) and may update auxiliary states
// when ctx.is_train. backward(ctx, params, out_grad, in, out, req, in_grad,
// aux) computes input gradients; req[i] says whether to write, add to, or
// skip in_grad[i]. Loss operators (is_loss) ignore out_grad.
#ifndef MX_GRAPH_OP_H_
#define MX_GRAPH_OP_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ndarray/base.h"
#include "ndarray/context.h"

namespace mx {

// A parameter value as the user gives it; kept as a string, the way MXNet's
// symbol JSON stores parameters.
class ParamValue {
 public:
  ParamValue(const char* s) : str_(s) {}  // NOLINT: implicit by design
  ParamValue(std::string s) : str_(std::move(s)) {}  // NOLINT
  ParamValue(int v) : str_(std::to_string(v)) {}  // NOLINT
  ParamValue(int64_t v) : str_(std::to_string(v)) {}  // NOLINT
  ParamValue(double v);  // NOLINT
  ParamValue(float v) : ParamValue(static_cast<double>(v)) {}  // NOLINT
  ParamValue(bool v) : str_(v ? "True" : "False") {}  // NOLINT
  ParamValue(const Shape& s) : str_(s.ToString()) {}  // NOLINT
  const std::string& str() const { return str_; }

 private:
  std::string str_;
};

// Operator parameters in the order given.
using Params = std::vector<std::pair<std::string, ParamValue>>;

struct ParamSpec {
  enum class Type { kInt, kFloat, kBool, kString, kShape };
  std::string name;
  Type type;
  // Used when the parameter is not given; ignored when required.
  std::string default_value;
  bool required = false;
  // For kString: the allowed values (empty allows anything).
  std::vector<std::string> choices;
  // For kInt: the allowed range, bounds included.
  int64_t min_int = std::numeric_limits<int64_t>::min();
  int64_t max_int = std::numeric_limits<int64_t>::max();
};

// Parameters after validation against an OpDef: every declared parameter is
// present (given or default) and parses as its type.
class ParsedParams {
 public:
  int64_t GetInt(const std::string& name) const;
  float GetFloat(const std::string& name) const;
  bool GetBool(const std::string& name) const;
  const std::string& GetString(const std::string& name) const;
  // Shapes such as "(5,5)" or "5" (one dimension); "()" is empty.
  Shape GetShape(const std::string& name) const;
  // Every parameter as a string, defaults included.
  const std::map<std::string, std::string>& values() const { return values_; }

 private:
  friend struct OpDef;
  std::map<std::string, std::string> values_;
};

// Parses MXNet's textual forms; errors name the text.
absl::StatusOr<bool> ParseBool(const std::string& s);
absl::StatusOr<Shape> ParseShape(const std::string& s);

// A view of an array's memory inside a kernel. `blocked`: a 4-D (N, C, H,
// W) array whose C is a multiple of kernel::kChannelBlock (16), stored in
// oneDNN's blocked order (N, C / 16, H, W, 16) instead of row-major. The
// executor gives an operator such blobs only where its OpDef::blocked says
// it takes them; shapes always read (N, C, H, W).
struct TBlob {
  float* data = nullptr;
  Shape shape;
  bool blocked = false;
  int64_t Size() const { return shape.Size(); }
};

enum class OpReq { kNull, kWrite, kAdd };

// Writes or accumulates v into *dst according to req.
inline void Store(OpReq req, float* dst, float v) {
  if (req == OpReq::kWrite) {
    *dst = v;
  } else if (req == OpReq::kAdd) {
    *dst += v;
  }
}

struct OpContext {
  // Where the blobs live; only operators with OpDef::gpu run on a GPU.
  Context ctx = cpu();
  bool is_train = false;
  // Seed for operators that draw random numbers (Dropout); fresh per call.
  uint64_t seed = 0;
  // Scratch memory of at least the OpDef's workspace() bytes.
  float* workspace = nullptr;
  // For an operator that reads a row-sparse argument (Executor's
  // row_sparse; only Embedding(sparse_grad=True) may): the ids of the table
  // rows that argument's blob holds, row i being table row (*rows)[i].
  // Null otherwise.
  std::shared_ptr<const std::vector<int64_t>> rows;
  // With `rows`: scratch that an operator's forward and the backward of the
  // same step share (Embedding keeps its indices' positions among the rows
  // there, so backward need not look them up again). Empty at forward.
  std::shared_ptr<std::vector<float>> row_positions;
};

using ShapeList = std::vector<Shape>;
using NameListFn = std::function<std::vector<std::string>(const ParsedParams&)>;
using InferShapeFn = std::function<absl::Status(
    const ParsedParams&, ShapeList* in, ShapeList* out, ShapeList* aux)>;
using ForwardFn = std::function<void(
    const OpContext&, const ParsedParams&, const std::vector<TBlob>& in,
    const std::vector<OpReq>& req, const std::vector<TBlob>& out,
    const std::vector<TBlob>& aux)>;
using BackwardFn = std::function<void(
    const OpContext&, const ParsedParams&, const std::vector<TBlob>& out_grad,
    const std::vector<TBlob>& in, const std::vector<TBlob>& out,
    const std::vector<OpReq>& req, const std::vector<TBlob>& in_grad,
    const std::vector<TBlob>& aux)>;
// Bytes of scratch memory the operator needs on ctx (shared by the
// operators of a context, one at a time).
using WorkspaceFn = std::function<size_t(const ParsedParams&, const ShapeList& in,
                                         const ShapeList& out, Context ctx)>;

// The inputs and outputs (by index) that an operator reads and writes in
// the blocked layout (TBlob::blocked) when its blobs say so; in backward,
// their gradients have the same layout. `uniform`: all of them always share
// one layout (element-wise operators, BatchNorm); otherwise each may have
// its own (Convolution converts at its edges).
struct BlockedIo {
  std::vector<int> inputs, outputs;
  bool uniform = false;
};
using BlockedIoFn =
    std::function<BlockedIo(const ParsedParams&, const ShapeList& in, const ShapeList& out)>;

struct OpDef {
  std::string name;
  // Prefix of automatic node names (`_plus` gives _plus0); default: the
  // lower-cased operator name.
  std::string name_hint;
  std::vector<ParamSpec> params;
  // Argument names, in order; default {"data"}.
  NameListFn arguments;
  // Auxiliary state names (inputs the operator mutates); default none.
  NameListFn aux_states;
  // Output names; default {"output"}.
  NameListFn outputs;
  // How many of the outputs, from the first, a symbol shows (MXNet's
  // num_visible_outputs); the rest are hidden: the executor allocates them
  // and passes them to forward and backward (Dropout keeps its mask there),
  // but listings, composition and head gradients see only visible ones.
  // Null: every output is visible.
  std::function<int(const ParsedParams&)> num_visible_outputs;
  InferShapeFn infer_shape;
  ForwardFn forward;
  BackwardFn backward;  // null: the operator has no gradient
  // (input, output) pairs whose memory may be shared in forward: the
  // kernel must then work when in[i].data == out[j].data.
  std::vector<std::pair<int, int>> inplace;
  WorkspaceFn workspace;  // bytes; null means none
  // Which blobs may be blocked, for the given shapes, on the CPU; null:
  // none. The executor stores an intermediate result blocked only where
  // every operator that writes or reads it takes it so (executor.h).
  BlockedIoFn blocked;
  // The kernels use the whole CPU pool (ndarray/parallel.h): the engine
  // runs them alone (FnProperty::kCpuParallel).
  bool uses_all_cores = false;
  // forward and backward run on gpu(i) contexts too (through the kernel
  // layer, ndarray/launch.h, and cuBLAS): binding a graph on a GPU refuses
  // operators without it.
  bool gpu = false;
  // A loss: backward needs no head gradient.
  bool is_loss = false;
  // What backward reads, for memory planning: its inputs, and which of its
  // outputs: none, all but the first (Dropout's mask, BatchNorm's
  // statistics: the first, the large one, may then be reused once forward's
  // readers are done), or all.
  enum class OutputUse { kNone, kAllButFirst, kAll };
  bool backward_uses_inputs = true;
  OutputUse backward_uses_outputs = OutputUse::kAll;
  // Arguments that, when missing, are an error rather than an automatically
  // created variable `<node>_<argument>` (Concat's: it joins what it is
  // given). A missing data or lhs is such a variable, as in MXNet, whose
  // composition fills it in later (`fc3_data` of an `fc3` made without
  // input).
  std::vector<std::string> required_inputs;

  // Validates `given` (unknown names, malformed values, missing required
  // parameters, values outside `choices`); errors name the operator and
  // the parameter.
  absl::StatusOr<ParsedParams> Parse(
      const std::map<std::string, std::string>& given) const;
  std::vector<std::string> ListArguments(const ParsedParams& p) const;
  std::vector<std::string> ListAuxStates(const ParsedParams& p) const;
  std::vector<std::string> ListOutputs(const ParsedParams& p) const;
  int NumVisibleOutputs(const ParsedParams& p) const;
  std::string NameHint() const;
};

// The table of operators. Registration happens at static initialization.
class OpRegistry {
 public:
  // Adds op; registering a name twice is a bug (aborts).
  static bool Register(OpDef op);
  // The operator of that name or of an MXNet alias of it ("_Plus",
  // "Softmax"); nullptr when none has it.
  static const OpDef* Find(const std::string& name);
  static std::vector<std::string> ListNames();
};

#define MX_OP_CONCAT_INNER_(a, b) a##b
#define MX_OP_CONCAT_(a, b) MX_OP_CONCAT_INNER_(a, b)
// MX_REGISTER_OP(MakeFullyConnected()) with a function returning an OpDef.
#define MX_REGISTER_OP(def) \
  static const bool MX_OP_CONCAT_(mx_op_registered_, __LINE__) = \
      ::mx::OpRegistry::Register(def)

// Shape inference helper: merges `shape` into (*shapes)[i]. Unknown
// dimensions on either side take the other's value; a conflict is an error
// naming `what` and both shapes.
absl::Status MergeShape(ShapeList* shapes, size_t i, const Shape& shape,
                        const std::string& what);
// True when every dimension is known.
bool IsKnown(const Shape& s);

}  // namespace mx

#endif  // MX_GRAPH_OP_H_
