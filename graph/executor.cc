#include "graph/executor.h"

#include <algorithm>
#include <limits>
#include <set>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "graph/node.h"
#include "ndarray/launch.h"

namespace mx {

using graph::Node;
using graph::NodeEntry;

// The bound graph: data entries (variables and node outputs), gradient
// slots, and per node the blobs, requests and engine variables of its
// forward and backward operations. Engine operations hold a shared_ptr to
// the plan, so it outlives the executor while they are pending.
struct Executor::Plan {
  // Owns the nodes that NodeRun points to: pending operations may outlive
  // the executor and every other handle of the symbol.
  Symbol symbol;
  struct NodeRun {
    Node* node = nullptr;
    std::vector<int> in, out, aux;  // data entry ids
    std::vector<int> in_grad;       // grad slot per argument, -1 for none
    std::vector<int> out_grad;      // grad slot per output, -1 for none
    std::vector<OpReq> bwd_req;
    bool in_backward = false;
    size_t workspace_floats = 0;
    // Built once the arrays exist.
    std::vector<TBlob> in_blobs, out_blobs, aux_blobs, in_grad_blobs,
        out_grad_blobs;
    std::vector<VarHandle> fwd_reads, fwd_writes, bwd_reads, bwd_writes;
    // Engine operation names ("fc1", "fc1_backward"), for traces.
    std::string fwd_name, bwd_name;
  };
  std::vector<Shape> entry_shapes;
  std::vector<NDArray> entries;  // by data entry id
  std::vector<int> grad_of;      // data entry id -> grad slot, -1 for none
  std::vector<NDArray> grads;    // by grad slot
  std::vector<NodeRun> nodes;    // operator nodes, in execution order
  std::vector<int> output_entries;
  std::vector<bool> output_needs_head;  // non-loss outputs that need grads
  std::vector<int> zero_grads;          // slots no one writes: zero-filled
  NDArray workspace;
};

namespace {

constexpr int kForever = std::numeric_limits<int>::max();

std::string ShapeMismatch(const std::string& what, const std::string& name,
                          const Shape& got, const Shape& want) {
  return absl::StrCat(what, " '", name, "' has shape ", got.ToString(),
                      " but the symbol needs ", want.ToString());
}

// Greedy buffer assignment over the steps of forward and backward. Items
// are allocated at their first step and released after their last; a freed
// buffer is reused by the smallest request it fits (or grown for a larger
// one).
class Planner {
 public:
  int NewItem(int64_t size, int born, int last) {
    items_.push_back({size, born, std::max(born, last), -1, -1});
    return static_cast<int>(items_.size()) - 1;
  }
  // Item `to` takes over `from`'s buffer when it is allocated.
  void ShareWith(int to, int from) { items_[to].inplace_from = from; }
  int64_t size(int item) const { return items_[item].size; }
  int last(int item) const { return items_[item].last; }

  void Run() {
    std::map<int, std::vector<int>> born_at, last_at;
    for (int i = 0; i < static_cast<int>(items_.size()); ++i) {
      born_at[items_[i].born].push_back(i);
      if (items_[i].last != kForever) last_at[items_[i].last].push_back(i);
    }
    std::set<int> steps;
    for (auto& [s, v] : born_at) steps.insert(s);
    for (auto& [s, v] : last_at) steps.insert(s);
    std::set<int> given_away;
    for (int s : steps) {
      for (int i : born_at[s]) {
        Item& it = items_[i];
        if (it.inplace_from >= 0) {
          it.buffer = items_[it.inplace_from].buffer;
          given_away.insert(it.inplace_from);
          continue;
        }
        it.buffer = Take(it.size);
      }
      for (int i : last_at[s]) {
        if (!given_away.count(i)) free_.insert({buffer_sizes_[items_[i].buffer], items_[i].buffer});
      }
    }
  }
  int buffer(int item) const { return items_[item].buffer; }
  const std::vector<int64_t>& buffer_sizes() const { return buffer_sizes_; }

 private:
  struct Item {
    int64_t size;
    int born, last;
    int inplace_from;
    int buffer;
  };
  int Take(int64_t size) {
    auto fit = free_.lower_bound({size, -1});
    if (fit != free_.end()) {
      int b = fit->second;
      free_.erase(fit);
      return b;
    }
    if (!free_.empty()) {  // grow the largest free buffer
      auto largest = std::prev(free_.end());
      int b = largest->second;
      free_.erase(largest);
      buffer_sizes_[b] = size;
      return b;
    }
    buffer_sizes_.push_back(size);
    return static_cast<int>(buffer_sizes_.size()) - 1;
  }
  std::vector<Item> items_;
  std::vector<int64_t> buffer_sizes_;
  std::set<std::pair<int64_t, int>> free_;
};

std::vector<TBlob> Blobs(const std::vector<NDArray>& arrays,
                         const std::vector<int>& ids) {
  std::vector<TBlob> blobs;
  for (int id : ids) {
    if (id < 0) {
      blobs.push_back(TBlob{});
    } else {
      blobs.push_back(TBlob{arrays[id].data(), arrays[id].shape()});
    }
  }
  return blobs;
}

void AddVars(const std::vector<NDArray>& arrays, const std::vector<int>& ids,
             std::vector<VarHandle>* vars) {
  for (int id : ids) {
    if (id >= 0) vars->push_back(arrays[id].var());
  }
}

// How a node's operations use the CPU (OpenBLAS products use every core).
FnProperty Property(const Executor::Plan::NodeRun& run) {
  return run.node->op->uses_all_cores ? FnProperty::kCpuParallel : FnProperty::kNormal;
}

}  // namespace

Executor::~Executor() = default;

absl::StatusOr<std::unique_ptr<Executor>> Executor::Bind(
    const Symbol& symbol, Context ctx, const std::map<std::string, NDArray>& args,
    const std::map<std::string, NDArray>& args_grad,
    const std::map<std::string, GradReq>& grad_req,
    const std::map<std::string, NDArray>& aux_states) {
  std::unique_ptr<Executor> exec(new Executor());
  MX_RETURN_IF_ERROR(exec->Init(symbol, ctx, args, args_grad, grad_req, aux_states));
  return exec;
}

absl::StatusOr<std::unique_ptr<Executor>> Executor::SimpleBind(
    const Symbol& symbol, Context ctx,
    const std::map<std::string, Shape>& input_shapes, GradReq default_req,
    const std::map<std::string, GradReq>& grad_reqs) {
  absl::StatusOr<Symbol::Shapes> shapes = symbol.InferShape(input_shapes, true);
  if (!shapes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("simple_bind: ", shapes.status().message()));
  }
  std::vector<std::string> arg_names = symbol.ListArguments();
  std::vector<std::string> aux_names = symbol.ListAuxiliaryStates();
  std::map<std::string, NDArray> args, grads, aux;
  std::map<std::string, GradReq> reqs;
  try {
    for (size_t i = 0; i < arg_names.size(); ++i) {
      args[arg_names[i]] = Zeros(shapes->arguments[i], ctx);
      auto it = grad_reqs.find(arg_names[i]);
      GradReq req = it == grad_reqs.end() ? default_req : it->second;
      reqs[arg_names[i]] = req;
      if (req != GradReq::kNull) grads[arg_names[i]] = Zeros(shapes->arguments[i], ctx);
    }
    for (size_t i = 0; i < aux_names.size(); ++i) {
      aux[aux_names[i]] = Zeros(shapes->aux_states[i], ctx);
    }
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat("simple_bind: ", e.what()));
  }
  return Bind(symbol, ctx, args, grads, reqs, aux);
}

absl::StatusOr<std::unique_ptr<Executor>> Executor::Reshape(
    const std::map<std::string, Shape>& input_shapes) const {
  std::map<std::string, Shape> known = input_shapes;
  absl::StatusOr<Symbol::Shapes> shapes = symbol_.InferShape(known, true);
  if (!shapes.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("reshape: ", shapes.status().message()));
  }
  std::vector<std::string> arg_names = symbol_.ListArguments();
  std::map<std::string, NDArray> args, grads;
  try {
    for (size_t i = 0; i < arg_names.size(); ++i) {
      const std::string& name = arg_names[i];
      const Shape& want = shapes->arguments[i];
      const NDArray& old = args_.at(name);
      auto g = grads_.find(name);
      if (old.shape() == want) {
        args[name] = old;
        if (g != grads_.end()) grads[name] = g->second;
        continue;
      }
      if (!input_shapes.count(name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "reshape: argument '", name, "' would change from ",
            old.shape().ToString(), " to ", want.ToString(),
            "; only the given inputs may change shape"));
      }
      args[name] = Zeros(want, ctx_);
      if (g != grads_.end()) grads[name] = Zeros(want, ctx_);
    }
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat("reshape: ", e.what()));
  }
  return Bind(symbol_, ctx_, args, grads, grad_req_, aux_);
}

absl::Status Executor::Init(const Symbol& symbol, Context ctx,
                            const std::map<std::string, NDArray>& args,
                            const std::map<std::string, NDArray>& args_grad,
                            const std::map<std::string, GradReq>& grad_req,
                            const std::map<std::string, NDArray>& aux_states) {
  symbol_ = symbol;
  ctx_ = ctx;
  const std::vector<std::string> arg_names = symbol.ListArguments();
  const std::vector<std::string> aux_names = symbol.ListAuxiliaryStates();

  // ---- Check the given arrays against the symbol.
  std::map<std::string, Shape> known;
  auto check_names = [&](const std::map<std::string, NDArray>& given,
                         const std::vector<std::string>& names,
                         const char* what) -> absl::Status {
    for (const std::string& n : names) {
      auto it = given.find(n);
      if (it == given.end() || it->second.is_none()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "bind: missing ", what, " '", n, "' (", what, "s: ",
            absl::StrJoin(names, ", "), ")"));
      }
      if (it->second.context() != ctx) {
        return absl::InvalidArgumentError(absl::StrCat(
            "bind: ", what, " '", n, "' is on ", it->second.context().ToString(),
            " but the executor is bound to ", ctx.ToString()));
      }
      known[n] = it->second.shape();
    }
    for (const auto& [n, a] : given) {
      if (std::find(names.begin(), names.end(), n) == names.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "bind: '", n, "' is not a", what[0] == 'a' && what[1] == 'u' ? "n " : " ",
            what, " of the symbol (", what, "s: ", absl::StrJoin(names, ", "), ")"));
      }
    }
    return absl::OkStatus();
  };
  MX_RETURN_IF_ERROR(check_names(args, arg_names, "argument"));
  MX_RETURN_IF_ERROR(check_names(aux_states, aux_names, "auxiliary state"));
  absl::StatusOr<Symbol::Shapes> shapes = symbol.InferShape(known, true);
  if (!shapes.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("bind: ", shapes.status().message()));
  }
  for (size_t i = 0; i < arg_names.size(); ++i) {
    if (args.at(arg_names[i]).shape() != shapes->arguments[i]) {
      return absl::InvalidArgumentError(absl::StrCat("bind: ", ShapeMismatch(
          "argument", arg_names[i], args.at(arg_names[i]).shape(), shapes->arguments[i])));
    }
  }
  args_ = args;
  aux_ = aux_states;
  for (const std::string& n : arg_names) {
    auto req = grad_req.find(n);
    auto grad = args_grad.find(n);
    GradReq r = req != grad_req.end() ? req->second
                                      : (grad != args_grad.end() ? GradReq::kWrite : GradReq::kNull);
    if (r != GradReq::kNull) {
      if (grad == args_grad.end() || grad->second.is_none()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "bind: argument '", n, "' requests a gradient but args_grad has no array for it"));
      }
      if (grad->second.shape() != args.at(n).shape()) {
        return absl::InvalidArgumentError(absl::StrCat("bind: ", ShapeMismatch(
            "gradient of", n, grad->second.shape(), args.at(n).shape())));
      }
      grads_[n] = grad->second;
    }
    grad_req_[n] = r;
  }
  for (const auto& [n, g] : args_grad) {
    if (!args.count(n)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bind: args_grad has '", n, "', which is not an argument"));
    }
  }

  // ---- Entries: one per node output, in execution order.
  auto plan = std::make_shared<Plan>();
  plan->symbol = symbol;
  std::vector<Node*> order = graph::TopoSort(symbol.outputs());
  std::unordered_map<const Node*, int> first_entry;
  // Shapes of every node output, hidden ones included, in execution order.
  Symbol internals(graph::AllOutputs(symbol.outputs()));
  absl::StatusOr<Symbol::Shapes> all = internals.InferShape(known, true);
  if (!all.ok()) return absl::InvalidArgumentError(absl::StrCat("bind: ", all.status().message()));
  plan->entry_shapes = all->outputs;
  std::unordered_map<int, const Node*> variable_at;  // entry id -> variable
  {
    int next = 0;
    for (Node* n : order) {
      first_entry[n] = next;
      if (n->is_variable()) variable_at[next] = n;
      next += n->num_outputs();
    }
  }
  auto entry_of = [&](const NodeEntry& e) { return first_entry.at(e.node.get()) + e.index; };
  const int num_entries = static_cast<int>(plan->entry_shapes.size());
  plan->entries.resize(num_entries);
  plan->grad_of.assign(num_entries, -1);

  // Which entries need gradients: variables with a request, and outputs of
  // operators with such an argument upstream.
  std::vector<bool> needs_grad(num_entries, false);
  for (Node* n : order) {
    if (n->is_variable()) {
      auto it = grad_req_.find(n->name);
      needs_grad[first_entry[n]] = it != grad_req_.end() && it->second != GradReq::kNull;
      continue;
    }
    bool any = false;
    for (int i = 0; i < n->num_arguments(); ++i) any = any || needs_grad[entry_of(n->inputs[i])];
    if (any && n->op->backward == nullptr) {
      return absl::UnimplementedError(absl::StrCat(
          "bind: operator ", n->name, " (", n->op->name, ") has no gradient, but a gradient "
          "is requested for an argument it depends on"));
    }
    for (int j = 0; j < n->num_outputs(); ++j) needs_grad[first_entry[n] + j] = any;
  }

  if (ctx_.is_gpu()) {
    for (Node* n : order) {
      if (n->is_variable() || n->op->gpu) continue;
      return absl::UnimplementedError(absl::StrCat(
          "bind on ", ctx_.ToString(), ": operator ", n->name, " (", n->op->name,
          ") has no GPU implementation yet; bind on a CPU context"));
    }
  }
  for (Node* n : order) {
    if (n->is_variable()) continue;
    Plan::NodeRun run;
    run.node = n;
    run.fwd_name = n->name;
    run.bwd_name = n->name + "_backward";
    for (int i = 0; i < static_cast<int>(n->inputs.size()); ++i) {
      (i < n->num_arguments() ? run.in : run.aux).push_back(entry_of(n->inputs[i]));
    }
    for (int j = 0; j < n->num_outputs(); ++j) run.out.push_back(first_entry[n] + j);
    for (int id : run.in) run.in_backward = run.in_backward || needs_grad[id];
    plan->nodes.push_back(std::move(run));
  }
  for (const NodeEntry& e : symbol.outputs()) plan->output_entries.push_back(entry_of(e));

  // ---- Steps: forward node k runs at step k, the head-gradient copies at
  // F, and node k's backward at 2F - k.
  const int F = static_cast<int>(plan->nodes.size());
  auto bwd_step = [F](int k) { return 2 * F - k; };
  std::vector<int> producer(num_entries, -1);
  for (int k = 0; k < F; ++k) {
    for (int id : plan->nodes[k].out) producer[id] = k;
  }
  std::vector<int> last_use(num_entries, -1);
  for (int k = 0; k < F; ++k) {
    const Plan::NodeRun& run = plan->nodes[k];
    const OpDef* op = run.node->op;
    for (int id : run.out) last_use[id] = std::max(last_use[id], k);
    for (int id : run.in) last_use[id] = std::max(last_use[id], k);
    if (!run.in_backward) continue;
    if (op->backward_uses_outputs) {
      for (int id : run.out) last_use[id] = std::max(last_use[id], bwd_step(k));
    }
    if (op->backward_uses_inputs) {
      for (int id : run.in) last_use[id] = std::max(last_use[id], bwd_step(k));
    }
  }
  for (int id : plan->output_entries) last_use[id] = kForever;

  // Gradient slots, and the request of every backward input gradient (the
  // first contribution writes, later ones add).
  std::vector<int> grad_first(num_entries, kForever);  // first writing step
  std::vector<bool> written(num_entries, false);
  for (size_t i = 0; i < plan->output_entries.size(); ++i) {
    int id = plan->output_entries[i];
    int k = producer[id];
    bool head = needs_grad[id] && k >= 0 && !plan->nodes[k].node->op->is_loss;
    plan->output_needs_head.push_back(head);
    if (head && !written[id]) {
      written[id] = true;
      grad_first[id] = F;
    }
  }
  for (int k = F - 1; k >= 0; --k) {
    Plan::NodeRun& run = plan->nodes[k];
    if (!run.in_backward) continue;
    for (int id : run.in) {
      if (!needs_grad[id]) {
        run.bwd_req.push_back(OpReq::kNull);
        continue;
      }
      OpReq req = OpReq::kAdd;
      if (!written[id]) {
        auto var = variable_at.find(id);
        bool add = var != variable_at.end() &&
                   grad_req_.at(var->second->name) == GradReq::kAdd;
        req = add ? OpReq::kAdd : OpReq::kWrite;
        written[id] = true;
        grad_first[id] = bwd_step(k);
      }
      run.bwd_req.push_back(req);
    }
  }

  // ---- Memory plan.
  Planner planner;
  std::vector<int> data_item(num_entries, -1), grad_item(num_entries, -1);
  for (int id = 0; id < num_entries; ++id) {
    if (producer[id] < 0) continue;  // variables are bound arrays
    data_item[id] = planner.NewItem(plan->entry_shapes[id].Size(), producer[id], last_use[id]);
    if (needs_grad[id]) {
      int born = grad_first[id];
      if (born == kForever) {  // nobody contributes: zero-filled at F
        born = F;
        plan->zero_grads.push_back(id);
      }
      grad_item[id] = planner.NewItem(plan->entry_shapes[id].Size(), born,
                                      bwd_step(producer[id]));
    }
  }
  for (int k = 0; k < F; ++k) {
    const Plan::NodeRun& run = plan->nodes[k];
    std::set<int> taken;
    for (auto [i, j] : run.node->op->inplace) {
      if (i >= static_cast<int>(run.in.size()) || j >= static_cast<int>(run.out.size())) continue;
      int in_id = run.in[i], out_id = run.out[j];
      if (data_item[in_id] < 0 || taken.count(in_id) || last_use[in_id] != k) continue;
      if (planner.size(data_item[in_id]) != planner.size(data_item[out_id])) continue;
      planner.ShareWith(data_item[out_id], data_item[in_id]);
      taken.insert(in_id);
    }
  }
  planner.Run();

  // ---- Arrays.
  try {
    std::vector<NDArray> buffers;
    for (int64_t size : planner.buffer_sizes()) {
      buffers.push_back(Empty(Shape{std::max<int64_t>(size, 1)}, ctx));
      memory_.planned_bytes += size * sizeof(float);
    }
    auto view = [&](int item, const Shape& shape) {
      return buffers[planner.buffer(item)].Slice(0, shape.Size()).Reshape(shape);
    };
    for (Node* n : order) {
      if (!n->is_variable()) continue;
      int id = first_entry[n];
      auto a = args_.find(n->name);
      plan->entries[id] = a != args_.end() ? a->second : aux_.at(n->name);
    }
    for (int id = 0; id < num_entries; ++id) {
      if (data_item[id] >= 0) {
        plan->entries[id] = view(data_item[id], plan->entry_shapes[id]);
        memory_.naive_bytes += plan->entry_shapes[id].Size() * sizeof(float);
      }
      if (!needs_grad[id]) continue;
      plan->grad_of[id] = static_cast<int>(plan->grads.size());
      if (grad_item[id] >= 0) {
        plan->grads.push_back(view(grad_item[id], plan->entry_shapes[id]));
        memory_.naive_bytes += plan->entry_shapes[id].Size() * sizeof(float);
      } else {
        // A variable: its gradient array.
        plan->grads.push_back(grads_.at(variable_at.at(id)->name));
      }
    }
    size_t workspace = 0;
    for (Plan::NodeRun& run : plan->nodes) {
      if (!run.node->op->workspace) continue;
      ShapeList in, out;
      for (int id : run.in) in.push_back(plan->entry_shapes[id]);
      for (int id : run.out) out.push_back(plan->entry_shapes[id]);
      run.workspace_floats =
          (run.node->op->workspace(run.node->parsed, in, out) + sizeof(float) - 1) / sizeof(float);
      workspace = std::max(workspace, run.workspace_floats);
    }
    if (workspace > 0) {
      plan->workspace = Empty(Shape{static_cast<int64_t>(workspace)}, ctx);
      memory_.planned_bytes += workspace * sizeof(float);
      memory_.naive_bytes += workspace * sizeof(float);
    }
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat("bind: ", e.what()));
  }

  // ---- Blobs and engine variables per node.
  for (Plan::NodeRun& run : plan->nodes) {
    const OpDef* op = run.node->op;
    run.in_blobs = Blobs(plan->entries, run.in);
    run.out_blobs = Blobs(plan->entries, run.out);
    run.aux_blobs = Blobs(plan->entries, run.aux);
    AddVars(plan->entries, run.in, &run.fwd_reads);
    AddVars(plan->entries, run.out, &run.fwd_writes);
    AddVars(plan->entries, run.aux, &run.fwd_writes);
    if (run.workspace_floats > 0) run.fwd_writes.push_back(plan->workspace.var());
    if (!run.in_backward) continue;
    for (int id : run.in) run.in_grad.push_back(plan->grad_of[id]);
    for (int id : run.out) run.out_grad.push_back(plan->grad_of[id]);
    run.in_grad_blobs = Blobs(plan->grads, run.in_grad);
    run.out_grad_blobs = Blobs(plan->grads, run.out_grad);
    AddVars(plan->grads, run.out_grad, &run.bwd_reads);
    if (op->backward_uses_inputs) AddVars(plan->entries, run.in, &run.bwd_reads);
    if (op->backward_uses_outputs) AddVars(plan->entries, run.out, &run.bwd_reads);
    AddVars(plan->entries, run.aux, &run.bwd_reads);
    for (size_t i = 0; i < run.in_grad.size(); ++i) {
      if (run.bwd_req[i] != OpReq::kNull) run.bwd_writes.push_back(plan->grads[run.in_grad[i]].var());
    }
    if (run.workspace_floats > 0) run.bwd_writes.push_back(plan->workspace.var());
  }
  for (int id : plan->output_entries) outputs_.push_back(plan->entries[id]);
  plan_ = std::move(plan);
  return absl::OkStatus();
}

void Executor::Forward(bool is_train) {
  for (size_t k = 0; k < plan_->nodes.size(); ++k) {
    const Plan::NodeRun& run = plan_->nodes[k];
    OpContext op_ctx;
    op_ctx.ctx = ctx_;
    op_ctx.is_train = is_train;
    op_ctx.seed = NextRandomSeed();
    op_ctx.workspace = run.workspace_floats > 0 ? plan_->workspace.data() : nullptr;
    std::vector<OpReq> req(run.out.size(), OpReq::kWrite);
    kernel::Push(
        run.fwd_name.c_str(), ctx_, run.fwd_reads, run.fwd_writes,
        [plan = plan_, k, op_ctx, req = std::move(req)] {
          const Plan::NodeRun& r = plan->nodes[k];
          r.node->op->forward(op_ctx, r.node->parsed, r.in_blobs, req, r.out_blobs,
                              r.aux_blobs);
        },
        0, Property(run));
    if (monitor_) {
      std::vector<std::string> names = run.node->output_names();
      for (size_t j = 0; j < run.out.size(); ++j) monitor_(names[j], plan_->entries[run.out[j]]);
    }
  }
  trained_forward_ = is_train;
}

void Executor::Backward(const std::vector<NDArray>& head_grads) {
  if (!trained_forward_) {
    throw Error(absl::FailedPreconditionError(
        "Backward needs a preceding Forward(is_train=true)"));
  }
  // Validate every head gradient before pushing anything.
  const std::vector<std::string> names = symbol_.ListOutputs();
  for (size_t i = 0; i < plan_->output_entries.size(); ++i) {
    if (!plan_->output_needs_head[i]) continue;
    MX_THROW_IF_NOT(i < head_grads.size() && !head_grads[i].is_none(),
                    "Backward: output '", names[i],
                    "' is not a loss, so it needs a head gradient");
    MX_THROW_IF_NOT(head_grads[i].shape() == outputs_[i].shape(),
                    "Backward: head gradient for '", names[i], "' has shape ",
                    head_grads[i].shape().ToString(), " but the output is ",
                    outputs_[i].shape().ToString());
  }
  for (size_t i = 0; i < plan_->output_entries.size(); ++i) {
    if (!plan_->output_needs_head[i]) continue;
    NDArray slot = plan_->grads[plan_->grad_of[plan_->output_entries[i]]];
    slot.Assign(head_grads[i]);
  }
  for (int id : plan_->zero_grads) {
    NDArray slot = plan_->grads[plan_->grad_of[id]];
    slot.Assign(0.0f);
  }
  for (size_t k = plan_->nodes.size(); k-- > 0;) {
    const Plan::NodeRun& run = plan_->nodes[k];
    if (!run.in_backward) continue;
    OpContext op_ctx;
    op_ctx.ctx = ctx_;
    op_ctx.is_train = true;
    op_ctx.seed = NextRandomSeed();
    op_ctx.workspace = run.workspace_floats > 0 ? plan_->workspace.data() : nullptr;
    kernel::Push(
        run.bwd_name.c_str(), ctx_, run.bwd_reads, run.bwd_writes,
        [plan = plan_, k, op_ctx] {
          const Plan::NodeRun& r = plan->nodes[k];
          r.node->op->backward(op_ctx, r.node->parsed, r.out_grad_blobs, r.in_blobs,
                               r.out_blobs, r.bwd_req, r.in_grad_blobs, r.aux_blobs);
        },
        0, Property(run));
  }
}

}  // namespace mx
