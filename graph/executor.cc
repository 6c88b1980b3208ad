#include "graph/executor.h"

#include <algorithm>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "graph/node.h"
#include "ndarray/env.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx {

using graph::Node;
using graph::NodeEntry;

// The bound graph: data entries (variables, node outputs and their copies
// on other contexts), gradient slots, and per run (an operator node, or a
// cross-device copy) the blobs, requests and engine variables of its
// forward and backward operations. Engine operations hold a shared_ptr to
// the plan, so it outlives the executor while they are pending.
struct Executor::Plan {
  // Owns the nodes that NodeRun points to: pending operations may outlive
  // the executor and every other handle of the symbol.
  Symbol symbol;
  struct NodeRun {
    Node* node = nullptr;     // null: a copy of entry in[0] into out[0]
    const OpDef* op = nullptr;  // node's operator, or CopyOp()
    Context ctx;              // where it runs (where out[0] lives)
    std::vector<int> in, out, aux;  // data entry ids
    std::vector<int> in_grad;       // grad slot per argument, -1 for none
    std::vector<int> out_grad;      // grad slot per output, -1 for none
    std::vector<OpReq> bwd_req;
    bool in_backward = false;
    // The row-sparse argument this run reads (Embedding's weight), if any,
    // and the scratch its last forward shares with its backward.
    std::string sparse_arg;
    mutable std::shared_ptr<std::vector<float>> row_positions;
    size_t workspace_floats = 0;
    float* workspace = nullptr;  // its context's workspace, when it needs one
    // Built once the arrays exist.
    std::vector<TBlob> in_blobs, out_blobs, aux_blobs, in_grad_blobs,
        out_grad_blobs;
    std::vector<VarHandle> fwd_reads, fwd_writes, bwd_reads, bwd_writes;
    // A copy whose backward adds to the source's gradient: the gradient
    // brought over to the source's context first.
    NDArray add_buffer;
    // Engine operation names ("fc1", "fc1_backward"), for traces.
    std::string fwd_name, bwd_name;
  };
  std::vector<Shape> entry_shapes;
  std::vector<Context> entry_ctx;  // where each entry lives
  // Entries (and so their gradients) stored in the blocked layout
  // (TBlob::blocked; PlanBuilder::ChooseLayouts).
  std::vector<bool> entry_blocked;
  std::vector<NDArray> entries;    // by data entry id
  std::vector<int> grad_of;        // data entry id -> grad slot, -1 for none
  std::vector<NDArray> grads;      // by grad slot
  std::vector<NodeRun> nodes;      // runs, in execution order
  // Runs pushed together as one engine operation (see "Bulks" in
  // executor.h): every run of forward, in order, falls in one bulk of
  // `forward`, and every run in backward, in backward order, in one of
  // `backward`. A bulk of one run is pushed as that run.
  struct Bulk {
    std::vector<size_t> runs;  // indices into nodes, in push order
    Context ctx;
    std::string name;  // "bulk(<first run> .. <last run>)", for traces and errors
    std::vector<VarHandle> reads, writes;
    FnProperty prop = FnProperty::kNormal;
  };
  std::vector<Bulk> forward, backward;
  std::vector<int> output_entries;
  std::vector<bool> output_needs_head;  // non-loss outputs that need grads
  std::vector<bool> output_head_adds;   // their head gradient is added (Schedule)
  std::vector<int> zero_grads;          // slots no one writes: zero-filled
  std::map<Context, NDArray> workspaces;
};

struct Executor::Placement {
  std::unordered_map<const Node*, Context> where;  // every node of the graph
};

namespace {

constexpr int kForever = std::numeric_limits<int>::max();
using NodeRun = Executor::Plan::NodeRun;
using Bulk = Executor::Plan::Bulk;

std::string ShapeMismatch(const std::string& what, const std::string& name,
                          const Shape& got, const Shape& want) {
  return absl::StrCat(what, " '", name, "' has shape ", got.ToString(),
                      " but the symbol needs ", want.ToString());
}

// A row-sparse argument's array: the table's shape but for the first
// dimension (its capacity), between 1 and the table's rows.
absl::Status CheckRowBlock(const std::string& name, const Shape& block, const Shape& table) {
  Shape rest_block = block, rest_table = table;
  if (block.ndim() == table.ndim() && block.ndim() >= 1) rest_block[0] = rest_table[0] = 0;
  if (block.ndim() >= 1 && rest_block == rest_table && block[0] >= 1 && block[0] <= table[0]) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "bind: row-sparse argument '", name, "' has shape ", block.ToString(),
      " but its table is ", table.ToString(),
      ": it needs the table's shape with 1 to ", table.ndim() >= 1 ? table[0] : 0,
      " rows (its capacity)"));
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

// The blobs of arrays[ids[i]] (empty for -1), in the layout of the data
// entry entries[i] (an entry's gradient has the entry's layout).
std::vector<TBlob> Blobs(const std::vector<NDArray>& arrays, const std::vector<int>& ids,
                         const std::vector<int>& entries, const std::vector<bool>& blocked) {
  std::vector<TBlob> blobs;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0) {
      blobs.push_back(TBlob{});
    } else {
      const NDArray& a = arrays[ids[i]];
      blobs.push_back(TBlob{a.data(), a.shape(), static_cast<bool>(blocked[entries[i]])});
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

// A row-major copy of a blocked (N, C, H, W) array (TBlob::blocked).
NDArray RowMajorCopy(const NDArray& blocked) {
  NDArray out = Empty(blocked.shape(), blocked.context());
  const Context ctx = blocked.context();
  kernel::Push("row_major_copy", ctx, {blocked.var()}, {out.var()}, [ctx, blocked, out] {
    const Shape& s = blocked.shape();
    kernel::Launch<kernel::UnblockKernel>("row_major_copy", ctx, s.Size(),
                                          {out.data(), blocked.data(), s[1], s[2] * s[3]});
  });
  return out;
}

// The entries of run's outputs that its backward reads
// (OpDef::backward_uses_outputs).
std::vector<int> OutputsBackwardReads(const NodeRun& run) {
  using Use = OpDef::OutputUse;
  switch (run.op->backward_uses_outputs) {
    case Use::kNone:
      return {};
    case Use::kAllButFirst:
      return std::vector<int>(run.out.begin() + std::min<size_t>(1, run.out.size()), run.out.end());
    case Use::kAll:
      break;
  }
  return run.out;
}

// What an operator of `run` is given: its context, a fresh random seed,
// its context's workspace.
OpContext RunContextFor(const NodeRun& run, bool is_train,
                        std::shared_ptr<const std::vector<int64_t>> rows) {
  OpContext op_ctx;
  op_ctx.rows = std::move(rows);
  op_ctx.ctx = run.ctx;
  op_ctx.is_train = is_train;
  op_ctx.seed = NextRandomSeed();
  op_ctx.workspace = run.workspace;
  return op_ctx;
}

// How a run's operations use the CPU (matrix products use every core).
FnProperty Property(const NodeRun& run) {
  return run.op->uses_all_cores ? FnProperty::kCpuParallel : FnProperty::kNormal;
}

// What a cross-device copy is to the planner: reads nothing in backward
// but its output's gradient. Never registered; the executor runs copies
// with NDArray::Assign.
const OpDef& CopyOp() {
  static const OpDef* const op = [] {
    auto* def = new OpDef;
    def->name = "_CrossDeviceCopy";
    def->backward_uses_inputs = false;
    def->backward_uses_outputs = OpDef::OutputUse::kNone;
    return def;
  }();
  return *op;
}

// The most runs one engine operation holds, per kind of context (Bulks in
// executor.h).
struct BulkLimits {
  int64_t gpu = 15, cpu = 1;
  int64_t For(Context c) const { return c.is_gpu() ? gpu : cpu; }
};

// MX_EXEC_BULK_GPU and MX_EXEC_BULK_CPU, or their defaults.
absl::StatusOr<BulkLimits> BulkLimitsFromEnv() {
  BulkLimits limits;
  MX_ASSIGN_OR_RETURN(const std::optional<int64_t> gpu, EnvInt("MX_EXEC_BULK_GPU", 1, 1000));
  MX_ASSIGN_OR_RETURN(const std::optional<int64_t> cpu, EnvInt("MX_EXEC_BULK_CPU", 1, 1000));
  limits.gpu = gpu.value_or(limits.gpu);
  limits.cpu = cpu.value_or(limits.cpu);
  return limits;
}

// Pushes the work of a bulk's runs (Executor::ForwardWork, BackwardWork), in
// order, as one engine operation; the operation holds the plan, which owns
// the bulk's name.
void PushBulk(std::shared_ptr<const Executor::Plan> plan, const Bulk& bulk,
              std::vector<std::function<void()>> work) {
  kernel::Push(
      bulk.name.c_str(), bulk.ctx, bulk.reads, bulk.writes,
      [plan = std::move(plan), work = std::move(work)] {
        for (const std::function<void()>& w : work) w();
      },
      0, bulk.prop);
}

// The context group2ctx gives the node's "__ctx_group__", if any.
std::optional<Context> GroupContext(const Node& n,
                                    const std::map<std::string, Context>& group2ctx) {
  auto group = n.attrs.find("__ctx_group__");
  if (group == n.attrs.end()) return std::nullopt;
  auto c = group2ctx.find(group->second);
  if (c == group2ctx.end()) return std::nullopt;
  return c->second;
}

// Where every node of `order` runs or lives (the rules in executor.h).
Executor::Placement Place(const std::vector<Node*>& order, Context ctx,
                          const std::map<std::string, Context>& group2ctx) {
  Executor::Placement placement;
  auto& where = placement.where;
  for (Node* n : order) {
    if (n->is_variable()) {
      if (std::optional<Context> c = GroupContext(*n, group2ctx)) where[n] = *c;
      continue;
    }
    const Context here = GroupContext(*n, group2ctx).value_or(ctx);
    where[n] = here;
    for (const NodeEntry& e : n->inputs) {
      if (e.node->is_variable()) where.emplace(e.node.get(), here);  // the first reader's
    }
  }
  for (Node* n : order) where.emplace(n, ctx);  // variables no operator reads
  return placement;
}

// Why a variable belongs on `want`, for bind errors.
std::string WhyThere(const Node& var, Context want, Context bind_ctx,
                     const std::map<std::string, Context>& group2ctx) {
  if (GroupContext(var, group2ctx).has_value()) {
    return absl::StrCat("its ctx_group '", var.attrs.at("__ctx_group__"), "' places it on ",
                        want.ToString());
  }
  if (want != bind_ctx) return absl::StrCat("the operator reading it runs on ", want.ToString());
  return absl::StrCat("the executor is bound to ", want.ToString());
}

// Builds an executor's plan in phases, each a method called in order by
// Executor::Init: Entries (data entries and their shapes), MarkGradients,
// Runs (operators in execution order, with cross-device copies before the
// operators that need them), Schedule (last uses, backward requests),
// PlanMemory, Allocate, Connect (blobs and engine variables).
class PlanBuilder {
 public:
  PlanBuilder(const Symbol& symbol, const Executor::Placement& placement)
      : plan_(std::make_shared<Executor::Plan>()),
        where_(placement.where),
        order_(graph::TopoSort(symbol.outputs())) {
    plan_->symbol = symbol;
  }

  // One entry per node output, in execution order, with its shape.
  absl::Status Entries(const std::map<std::string, Shape>& known) {
    Symbol internals(graph::AllOutputs(plan_->symbol.outputs()));
    absl::StatusOr<Symbol::Shapes> all = internals.InferShape(known, true);
    if (!all.ok()) return absl::InvalidArgumentError(absl::StrCat("bind: ", all.status().message()));
    plan_->entry_shapes = all->outputs;
    for (Node* n : order_) {
      first_entry_[n] = static_cast<int>(plan_->entry_ctx.size());
      if (n->is_variable()) variable_at_[first_entry_[n]] = n;
      for (int j = 0; j < n->num_outputs(); ++j) {
        plan_->entry_ctx.push_back(where_.at(n));
        entry_node_.push_back(n);
      }
    }
    return absl::OkStatus();
  }

  // Which entries need gradients: variables with a request, and outputs of
  // operators with such an argument upstream.
  absl::Status MarkGradients(const std::map<std::string, GradReq>& grad_req) {
    grad_req_ = &grad_req;
    needs_grad_.assign(plan_->entry_shapes.size(), false);
    for (Node* n : order_) {
      if (n->is_variable()) {
        auto it = grad_req.find(n->name);
        needs_grad_[first_entry_[n]] = it != grad_req.end() && it->second != GradReq::kNull;
        continue;
      }
      bool any = false;
      for (int i = 0; i < n->num_arguments(); ++i) any = any || needs_grad_[EntryOf(n->inputs[i])];
      if (any && n->op->backward == nullptr) {
        return absl::UnimplementedError(absl::StrCat(
            "bind: operator ", n->name, " (", n->op->name, ") has no gradient, but a gradient "
            "is requested for an argument it depends on"));
      }
      for (int j = 0; j < n->num_outputs(); ++j) needs_grad_[first_entry_[n] + j] = any;
    }
    return absl::OkStatus();
  }

  // The operator runs in execution order, each preceded by the copies of
  // its inputs that live on another context. Only Embedding(sparse_grad)
  // reads a row-sparse argument, as its weight, where the argument lives.
  absl::Status Runs(const std::set<std::string>& row_sparse) {
    for (Node* n : order_) {
      if (n->is_variable()) continue;
      NodeRun run;
      run.node = n;
      run.op = n->op;
      run.ctx = where_.at(n);
      if (run.ctx.is_gpu() && !n->op->gpu) {
        return absl::UnimplementedError(absl::StrCat(
            "bind on ", run.ctx.ToString(), ": operator ", n->name, " (", n->op->name,
            ") has no GPU implementation yet; bind on a CPU context"));
      }
      run.fwd_name = n->name;
      run.bwd_name = n->name + "_backward";
      for (int i = 0; i < static_cast<int>(n->inputs.size()); ++i) {
        const int id = EntryOf(n->inputs[i]);
        if (i >= n->num_arguments()) {  // an auxiliary state, updated in place
          if (plan_->entry_ctx[id] != run.ctx) {
            return absl::InvalidArgumentError(absl::StrCat(
                "bind: auxiliary state '", n->inputs[i].node->name, "' is on ",
                plan_->entry_ctx[id].ToString(), " but operator ", n->name,
                ", which updates it, runs on ", run.ctx.ToString()));
          }
          run.aux.push_back(id);
          continue;
        }
        const Node* source = n->inputs[i].node.get();
        if (source->is_variable() && row_sparse.count(source->name)) {
          const bool embedding = n->op->name == "Embedding" && i == 1 &&
                                 n->parsed.GetBool("sparse_grad");
          if (run.ctx.is_gpu()) {
            return absl::UnimplementedError(absl::StrCat(
                "bind on ", run.ctx.ToString(), ": row-sparse argument '", source->name,
                "' needs a CPU context for now (row-sparse arrays live on CPUs)"));
          }
          if (!embedding || plan_->entry_ctx[id] != run.ctx) {
            return absl::InvalidArgumentError(absl::StrCat(
                "bind: argument '", source->name, "' is bound row-sparse, but operator ",
                n->name, " (", n->op->name, ") reads it",
                embedding ? " on another context" : "",
                "; only Embedding with sparse_grad=True reads a row-sparse weight"));
          }
          run.sparse_arg = source->name;
        }
        run.in.push_back(OnContext(id, run.ctx));
      }
      for (int j = 0; j < n->num_outputs(); ++j) run.out.push_back(first_entry_[n] + j);
      for (int id : run.in) run.in_backward = run.in_backward || needs_grad_[id];
      plan_->nodes.push_back(std::move(run));
    }
    for (const NodeEntry& e : plan_->symbol.outputs()) plan_->output_entries.push_back(EntryOf(e));
    return absl::OkStatus();
  }

  // Steps: run k forward at step k, the head-gradient copies at F, and run
  // k's backward at 2F - k. Computes each entry's last use and the request
  // of every backward input gradient (the first contribution writes, later
  // ones add).
  void Schedule() {
    const int F = static_cast<int>(plan_->nodes.size());
    const int num_entries = static_cast<int>(plan_->entry_shapes.size());
    producer_.assign(num_entries, -1);
    for (int k = 0; k < F; ++k) {
      for (int id : plan_->nodes[k].out) producer_[id] = k;
    }
    last_use_.assign(num_entries, -1);
    for (int k = 0; k < F; ++k) {
      const NodeRun& run = plan_->nodes[k];
      for (int id : run.out) last_use_[id] = std::max(last_use_[id], k);
      for (int id : run.in) last_use_[id] = std::max(last_use_[id], k);
      if (!run.in_backward) continue;
      for (int id : OutputsBackwardReads(run)) {
        last_use_[id] = std::max(last_use_[id], BackwardStep(k));
      }
      if (run.op->backward_uses_inputs) {
        for (int id : run.in) last_use_[id] = std::max(last_use_[id], BackwardStep(k));
      }
    }
    for (int id : plan_->output_entries) last_use_[id] = kForever;

    grad_first_.assign(num_entries, kForever);
    std::vector<bool> written(num_entries, false);
    for (int id : plan_->output_entries) {
      const int k = producer_[id];
      // A loss needs none; a variable among the outputs gets one too.
      const bool head = needs_grad_[id] && (k < 0 || !plan_->nodes[k].op->is_loss);
      plan_->output_needs_head.push_back(head);
      // Added to its slot when the entry was an output before (the second
      // head gradient replaced the first) or is a variable whose gradient
      // accumulates (grad_req add).
      auto var = variable_at_.find(id);
      plan_->output_head_adds.push_back(
          head && (written[id] || (var != variable_at_.end() &&
                                   grad_req_->at(var->second->name) == GradReq::kAdd)));
      if (head && !written[id]) {
        written[id] = true;
        grad_first_[id] = F;
      }
    }
    for (int k = F - 1; k >= 0; --k) {
      NodeRun& run = plan_->nodes[k];
      if (!run.in_backward) continue;
      for (int id : run.in) {
        if (!needs_grad_[id]) {
          run.bwd_req.push_back(OpReq::kNull);
          continue;
        }
        OpReq req = OpReq::kAdd;
        if (!written[id]) {
          auto var = variable_at_.find(id);
          const bool add = var != variable_at_.end() &&
                           grad_req_->at(var->second->name) == GradReq::kAdd;
          req = add ? OpReq::kAdd : OpReq::kWrite;
          written[id] = true;
          grad_first_[id] = BackwardStep(k);
        }
        run.bwd_req.push_back(req);
      }
    }
  }

  // Which entries live in the blocked layout (TBlob::blocked), saving
  // Convolution its conversions from and to oneDNN's layout: 4-D results
  // on the CPU whose channels fill whole blocks, that callers never see
  // (not graph outputs; Monitor gets row-major copies), and that every run
  // writing or reading them takes blocked (OpDef::blocked). The entries of
  // a uniform run (element-wise, BatchNorm) share one layout: blocked only
  // if each of them can be. Throws mx::Error (an operator's query).
  void ChooseLayouts(bool enabled) {
    const int n = static_cast<int>(plan_->entry_shapes.size());
    plan_->entry_blocked.assign(n, false);
    if (!enabled) return;
    std::vector<bool> can(n);
    for (int id = 0; id < n; ++id) {
      const Shape& s = plan_->entry_shapes[id];
      can[id] = producer_[id] >= 0 && !plan_->entry_ctx[id].is_gpu() && s.ndim() == 4 &&
                s.Size() > 0 && s[1] % kernel::kChannelBlock == 0;
    }
    for (int id : plan_->output_entries) can[id] = false;
    std::vector<int> parent(n);
    for (int id = 0; id < n; ++id) parent[id] = id;
    auto root = [&](int id) {
      while (parent[id] != id) id = parent[id] = parent[parent[id]];
      return id;
    };
    for (const NodeRun& run : plan_->nodes) {
      const BlockedIo io = BlockedIoOf(run);
      std::vector<int> takes;  // the entries this run takes blocked
      auto allow = [&](const std::vector<int>& ids, const std::vector<int>& which) {
        std::vector<bool> ok(ids.size(), false);
        for (int i : which) {
          if (i >= 0 && i < static_cast<int>(ids.size())) ok[i] = true;
        }
        for (size_t i = 0; i < ids.size(); ++i) {
          if (ok[i]) {
            takes.push_back(ids[i]);
          } else {
            can[ids[i]] = false;
          }
        }
      };
      allow(run.in, io.inputs);
      allow(run.out, io.outputs);
      if (!io.uniform) continue;
      for (int id : takes) parent[root(id)] = root(takes[0]);
    }
    std::vector<bool> group_can(n, true);
    for (int id = 0; id < n; ++id) {
      if (!can[id]) group_can[root(id)] = false;
    }
    for (int id = 0; id < n; ++id) plan_->entry_blocked[id] = group_can[root(id)];
  }

  // Buffers for every computed entry and gradient, one planner per
  // context; operators that allow it write over an input in place.
  void PlanMemory() {
    const int F = static_cast<int>(plan_->nodes.size());
    const int num_entries = static_cast<int>(plan_->entry_shapes.size());
    data_item_.assign(num_entries, -1);
    grad_item_.assign(num_entries, -1);
    for (int id = 0; id < num_entries; ++id) {
      if (producer_[id] < 0) continue;  // variables are bound arrays
      Planner& planner = planners_[plan_->entry_ctx[id]];
      const int64_t size = plan_->entry_shapes[id].Size();
      data_item_[id] = planner.NewItem(size, producer_[id], last_use_[id]);
      if (needs_grad_[id]) {
        int born = grad_first_[id];
        if (born == kForever) {  // nobody contributes: zero-filled at F
          born = F;
          plan_->zero_grads.push_back(id);
        }
        grad_item_[id] = planner.NewItem(size, born, BackwardStep(producer_[id]));
      }
    }
    for (int k = 0; k < F; ++k) {
      const NodeRun& run = plan_->nodes[k];
      Planner& planner = planners_[run.ctx];
      std::set<int> taken;
      for (auto [i, j] : run.op->inplace) {
        if (i >= static_cast<int>(run.in.size()) || j >= static_cast<int>(run.out.size())) continue;
        const int in_id = run.in[i], out_id = run.out[j];
        if (data_item_[in_id] < 0 || taken.count(in_id) || last_use_[in_id] != k) continue;
        if (planner.size(data_item_[in_id]) != planner.size(data_item_[out_id])) continue;
        planner.ShareWith(data_item_[out_id], data_item_[in_id]);
        taken.insert(in_id);
      }
    }
    for (auto& [c, planner] : planners_) planner.Run();
  }

  // The arrays: bound ones for variables, views of the planned buffers for
  // the rest, and the workspaces. Throws mx::Error (allocation).
  void Allocate(const std::map<std::string, NDArray>& args,
                const std::map<std::string, NDArray>& aux,
                const std::map<std::string, NDArray>& grads, Executor::MemoryStats* memory) {
    std::map<Context, std::vector<NDArray>> buffers;
    for (const auto& [c, planner] : planners_) {
      for (int64_t size : planner.buffer_sizes()) {
        buffers[c].push_back(Empty(Shape{std::max<int64_t>(size, 1)}, c));
        memory->planned_bytes += size * sizeof(float);
      }
    }
    const int num_entries = static_cast<int>(plan_->entry_shapes.size());
    auto view = [&](int id, int item) {
      const Shape& shape = plan_->entry_shapes[id];
      const Context c = plan_->entry_ctx[id];
      memory->naive_bytes += shape.Size() * sizeof(float);
      return buffers[c][planners_.at(c).buffer(item)].Slice(0, shape.Size()).Reshape(shape);
    };
    plan_->entries.resize(num_entries);
    plan_->grad_of.assign(num_entries, -1);
    for (const auto& [id, var] : variable_at_) {
      auto a = args.find(var->name);
      plan_->entries[id] = a != args.end() ? a->second : aux.at(var->name);
    }
    for (int id = 0; id < num_entries; ++id) {
      if (data_item_[id] >= 0) plan_->entries[id] = view(id, data_item_[id]);
      if (!needs_grad_[id]) continue;
      plan_->grad_of[id] = static_cast<int>(plan_->grads.size());
      // A variable's gradient is its bound gradient array.
      plan_->grads.push_back(grad_item_[id] >= 0 ? view(id, grad_item_[id])
                                                 : grads.at(variable_at_.at(id)->name));
    }
    std::map<Context, size_t> workspace;
    for (NodeRun& run : plan_->nodes) {
      if (!run.op->workspace) continue;
      ShapeList in, out;
      for (int id : run.in) in.push_back(plan_->entry_shapes[id]);
      for (int id : run.out) out.push_back(plan_->entry_shapes[id]);
      run.workspace_floats =
          (run.op->workspace(run.node->parsed, in, out, run.ctx) + sizeof(float) - 1) /
          sizeof(float);
      workspace[run.ctx] = std::max(workspace[run.ctx], run.workspace_floats);
    }
    for (const auto& [c, floats] : workspace) {
      if (floats == 0) continue;
      plan_->workspaces[c] = Empty(Shape{static_cast<int64_t>(floats)}, c);
      memory->planned_bytes += floats * sizeof(float);
      memory->naive_bytes += floats * sizeof(float);
    }
  }

  // Gradient slots of every run in backward; blobs and engine variables of
  // the operator runs (copies go through NDArray::Assign, which declares
  // its own); the buffers of copies whose backward adds.
  void Connect() {
    for (NodeRun& run : plan_->nodes) {
      if (run.in_backward) {
        for (int id : run.in) run.in_grad.push_back(plan_->grad_of[id]);
        for (int id : run.out) run.out_grad.push_back(plan_->grad_of[id]);
      }
      if (run.node == nullptr) {
        if (run.in_backward && run.bwd_req[0] == OpReq::kAdd) {
          const int src = run.in[0];
          run.add_buffer = Empty(plan_->entry_shapes[src], plan_->entry_ctx[src]);
        }
        continue;
      }
      const std::vector<bool>& blocked = plan_->entry_blocked;
      run.in_blobs = Blobs(plan_->entries, run.in, run.in, blocked);
      run.out_blobs = Blobs(plan_->entries, run.out, run.out, blocked);
      run.aux_blobs = Blobs(plan_->entries, run.aux, run.aux, blocked);
      AddVars(plan_->entries, run.in, &run.fwd_reads);
      AddVars(plan_->entries, run.out, &run.fwd_writes);
      AddVars(plan_->entries, run.aux, &run.fwd_writes);
      VarHandle workspace{};
      if (run.workspace_floats > 0) {
        const NDArray& w = plan_->workspaces.at(run.ctx);
        run.workspace = w.data();
        workspace = w.var();
        run.fwd_writes.push_back(workspace);
      }
      if (!run.in_backward) continue;
      run.in_grad_blobs = Blobs(plan_->grads, run.in_grad, run.in, blocked);
      run.out_grad_blobs = Blobs(plan_->grads, run.out_grad, run.out, blocked);
      AddVars(plan_->grads, run.out_grad, &run.bwd_reads);
      if (run.op->backward_uses_inputs) AddVars(plan_->entries, run.in, &run.bwd_reads);
      AddVars(plan_->entries, OutputsBackwardReads(run), &run.bwd_reads);
      AddVars(plan_->entries, run.aux, &run.bwd_reads);
      for (size_t i = 0; i < run.in_grad.size(); ++i) {
        if (run.bwd_req[i] != OpReq::kNull) run.bwd_writes.push_back(plan_->grads[run.in_grad[i]].var());
      }
      if (run.workspace_floats > 0) run.bwd_writes.push_back(workspace);
    }
  }

  // Groups the runs into bulks (Plan::Bulk): a run joins the bulk before it
  // when both are operator runs (a copy stands alone) on the same context
  // and that bulk holds fewer than limits.For(context) runs.
  void MakeBulks(const BulkLimits& limits) {
    std::vector<size_t> forward, backward;
    for (size_t k = 0; k < plan_->nodes.size(); ++k) forward.push_back(k);
    for (size_t k = plan_->nodes.size(); k-- > 0;) {
      if (plan_->nodes[k].in_backward) backward.push_back(k);
    }
    plan_->forward = Bulks(forward, /*backward=*/false, limits);
    plan_->backward = Bulks(backward, /*backward=*/true, limits);
  }

  std::shared_ptr<Executor::Plan> Finish() { return std::move(plan_); }

 private:
  int EntryOf(const NodeEntry& e) const { return first_entry_.at(e.node.get()) + e.index; }

  // What run takes blocked: nothing for copies, operators without
  // OpDef::blocked, and runs off the CPU.
  BlockedIo BlockedIoOf(const NodeRun& run) const {
    if (run.node == nullptr || !run.op->blocked || run.ctx.is_gpu()) return {};
    ShapeList in, out;
    for (int id : run.in) in.push_back(plan_->entry_shapes[id]);
    for (int id : run.out) out.push_back(plan_->entry_shapes[id]);
    return run.op->blocked(run.node->parsed, in, out);
  }
  int BackwardStep(int k) const { return 2 * static_cast<int>(plan_->nodes.size()) - k; }

  // The bulks of the runs `order` (forward's or backward's, as `backward`
  // says), in that order.
  std::vector<Bulk> Bulks(const std::vector<size_t>& order, bool backward,
                          const BulkLimits& limits) const {
    std::vector<Bulk> bulks;
    for (size_t k : order) {
      const NodeRun& run = plan_->nodes[k];
      const Bulk* last = bulks.empty() ? nullptr : &bulks.back();
      const bool joins = last != nullptr && run.node != nullptr &&
                         plan_->nodes[last->runs[0]].node != nullptr && last->ctx == run.ctx &&
                         static_cast<int64_t>(last->runs.size()) < limits.For(run.ctx);
      if (!joins) {
        bulks.emplace_back();
        bulks.back().ctx = run.ctx;
      }
      bulks.back().runs.push_back(k);
    }
    for (Bulk& bulk : bulks) {
      if (bulk.runs.size() > 1) Declare(&bulk, backward);
    }
    return bulks;
  }

  // A bulk's name, variables and property, from its runs': it writes what
  // any of them writes, reads what they read and none writes, and uses
  // every core if one of them does.
  void Declare(Bulk* bulk, bool backward) const {
    auto name = [&](size_t k) -> const std::string& {
      return backward ? plan_->nodes[k].bwd_name : plan_->nodes[k].fwd_name;
    };
    bulk->name =
        absl::StrCat("bulk(", name(bulk->runs.front()), " .. ", name(bulk->runs.back()), ")");
    std::set<VarHandle> reads, writes;
    for (size_t k : bulk->runs) {
      const NodeRun& run = plan_->nodes[k];
      const std::vector<VarHandle>& r = backward ? run.bwd_reads : run.fwd_reads;
      const std::vector<VarHandle>& w = backward ? run.bwd_writes : run.fwd_writes;
      reads.insert(r.begin(), r.end());
      writes.insert(w.begin(), w.end());
      if (Property(run) == FnProperty::kCpuParallel) bulk->prop = FnProperty::kCpuParallel;
    }
    for (VarHandle v : reads) {
      if (!writes.count(v)) bulk->reads.push_back(v);
    }
    bulk->writes.assign(writes.begin(), writes.end());
  }

  // The entry holding entry `id`'s value on context c: id itself, or a copy
  // (made once per entry and context) whose run is added now, before the
  // operator that needs it.
  int OnContext(int id, Context c) {
    if (plan_->entry_ctx[id] == c) return id;
    auto [it, added] = copies_.emplace(std::make_pair(id, c), -1);
    if (!added) return it->second;
    const int copy = static_cast<int>(plan_->entry_shapes.size());
    it->second = copy;
    plan_->entry_shapes.push_back(plan_->entry_shapes[id]);
    plan_->entry_ctx.push_back(c);
    entry_node_.push_back(entry_node_[id]);
    needs_grad_.push_back(needs_grad_[id]);
    NodeRun run;
    run.op = &CopyOp();
    run.ctx = c;
    run.in = {id};
    run.out = {copy};
    run.in_backward = needs_grad_[id];
    run.fwd_name = absl::StrCat(entry_node_[id]->name, "_to_", c.ToString());
    run.bwd_name = run.fwd_name + "_backward";
    plan_->nodes.push_back(std::move(run));
    return copy;
  }

  std::shared_ptr<Executor::Plan> plan_;
  const std::unordered_map<const Node*, Context>& where_;
  const std::vector<Node*> order_;
  const std::map<std::string, GradReq>* grad_req_ = nullptr;
  std::unordered_map<const Node*, int> first_entry_;
  std::unordered_map<int, const Node*> variable_at_;  // entry id -> variable
  std::vector<const Node*> entry_node_;               // entry id -> its node
  std::map<std::pair<int, Context>, int> copies_;
  std::vector<bool> needs_grad_;
  std::vector<int> producer_, last_use_, grad_first_;
  std::vector<int> data_item_, grad_item_;  // planner items, -1 for none
  std::map<Context, Planner> planners_;
};

}  // namespace

Executor::~Executor() = default;

absl::StatusOr<std::unique_ptr<Executor>> Executor::Bind(
    const Symbol& symbol, Context ctx, const std::map<std::string, NDArray>& args,
    const std::map<std::string, NDArray>& args_grad,
    const std::map<std::string, GradReq>& grad_req,
    const std::map<std::string, NDArray>& aux_states,
    const std::map<std::string, Context>& group2ctx,
    const std::set<std::string>& row_sparse) {
  std::unique_ptr<Executor> exec(new Executor());
  exec->row_sparse_ = row_sparse;
  exec->symbol_ = symbol;
  exec->ctx_ = ctx;
  exec->group2ctx_ = group2ctx;
  const Placement placement = Place(graph::TopoSort(symbol.outputs()), ctx, group2ctx);
  std::map<std::string, Shape> known;
  MX_RETURN_IF_ERROR(
      exec->AdoptArrays(placement, args, args_grad, grad_req, aux_states, &known));
  PlanBuilder builder(symbol, placement);
  MX_RETURN_IF_ERROR(builder.Entries(known));
  MX_RETURN_IF_ERROR(builder.MarkGradients(exec->grad_req_));
  MX_RETURN_IF_ERROR(builder.Runs(row_sparse));
  builder.Schedule();
  builder.PlanMemory();
  MX_ASSIGN_OR_RETURN(const std::optional<bool> blocked, EnvBool("MX_BLOCKED_LAYOUT"));
  MX_ASSIGN_OR_RETURN(const BulkLimits bulk_limits, BulkLimitsFromEnv());
  try {
    builder.ChooseLayouts(blocked.value_or(true));
    builder.Allocate(exec->args_, exec->aux_, exec->grads_, &exec->memory_);
    builder.Connect();
    builder.MakeBulks(bulk_limits);
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat("bind: ", e.what()));
  }
  exec->plan_ = builder.Finish();
  for (int id : exec->plan_->output_entries) exec->outputs_.push_back(exec->plan_->entries[id]);
  return exec;
}

absl::StatusOr<std::unique_ptr<Executor>> Executor::SimpleBind(
    const Symbol& symbol, Context ctx,
    const std::map<std::string, Shape>& input_shapes, GradReq default_req,
    const std::map<std::string, GradReq>& grad_reqs,
    const std::map<std::string, Context>& group2ctx,
    const std::map<std::string, int64_t>& row_sparse) {
  absl::StatusOr<Symbol::Shapes> shapes = symbol.InferShape(input_shapes, true);
  if (!shapes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("simple_bind: ", shapes.status().message()));
  }
  const std::vector<std::string> arg_names = symbol.ListArguments();
  const std::vector<std::string> aux_names = symbol.ListAuxiliaryStates();
  std::map<std::string, Context> var_ctx;
  {
    const std::vector<Node*> order = graph::TopoSort(symbol.outputs());
    const Placement placement = Place(order, ctx, group2ctx);
    for (Node* n : order) {
      if (n->is_variable()) var_ctx[n->name] = placement.where.at(n);
    }
  }
  std::map<std::string, NDArray> args, grads, aux;
  std::map<std::string, GradReq> reqs;
  // Bind checks each name (an argument, read by Embedding) and capacity.
  std::set<std::string> sparse;
  for (const auto& [name, capacity] : row_sparse) sparse.insert(name);
  try {
    for (size_t i = 0; i < arg_names.size(); ++i) {
      const std::string& name = arg_names[i];
      // A row-sparse argument holds `capacity` rows of its table.
      Shape shape = shapes->arguments[i];
      if (auto rs = row_sparse.find(name); rs != row_sparse.end() && shape.ndim() >= 1) {
        shape[0] = rs->second;
      }
      args[name] = Zeros(shape, var_ctx.at(name));
      auto it = grad_reqs.find(name);
      GradReq req = it == grad_reqs.end() ? default_req : it->second;
      reqs[name] = req;
      if (req != GradReq::kNull) grads[name] = Zeros(shape, var_ctx.at(name));
    }
    for (size_t i = 0; i < aux_names.size(); ++i) {
      aux[aux_names[i]] = Zeros(shapes->aux_states[i], var_ctx.at(aux_names[i]));
    }
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat("simple_bind: ", e.what()));
  }
  return Bind(symbol, ctx, args, grads, reqs, aux, group2ctx, sparse);
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
      if (old.shape() == want || row_sparse_.count(name)) {
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
      args[name] = Zeros(want, old.context());
      if (g != grads_.end()) grads[name] = Zeros(want, old.context());
    }
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat("reshape: ", e.what()));
  }
  return Bind(symbol_, ctx_, args, grads, grad_req_, aux_, group2ctx_, row_sparse_);
}

absl::Status Executor::AdoptArrays(const Placement& placement,
                                   const std::map<std::string, NDArray>& args,
                                   const std::map<std::string, NDArray>& args_grad,
                                   const std::map<std::string, GradReq>& grad_req,
                                   const std::map<std::string, NDArray>& aux_states,
                                   std::map<std::string, Shape>* known) {
  const std::vector<std::string> arg_names = symbol_.ListArguments();
  const std::vector<std::string> aux_names = symbol_.ListAuxiliaryStates();
  // Two variables of one name would share one array and one gradient, and
  // one's gradient would overwrite the other's (MXNet refuses them too).
  std::set<std::string> seen;
  for (const std::vector<std::string>* names : {&arg_names, &aux_names}) {
    for (const std::string& name : *names) {
      if (!seen.insert(name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("bind: two variables are named '", name,
                         "'; give them different names, or use one variable in both places"));
      }
    }
  }
  std::map<std::string, const Node*> variables;
  for (const auto& [n, c] : placement.where) {
    if (n->is_variable()) variables[n->name] = n;
  }
  // The array's context, against where its variable lives.
  auto check_context = [&](const std::string& what, const std::string& name,
                           const NDArray& a) -> absl::Status {
    const Node* var = variables.at(name);
    const Context want = placement.where.at(var);
    if (a.context() == want) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "bind: ", what, " '", name, "' is on ", a.context().ToString(), " but ",
        WhyThere(*var, want, ctx_, group2ctx_)));
  };
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
      MX_RETURN_IF_ERROR(check_context(what, n, it->second));
      // A row-sparse argument's array is a block of its table: inference
      // derives the table's shape (the plan never allocates variables).
      if (!row_sparse_.count(n)) (*known)[n] = it->second.shape();
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
  for (const std::string& n : row_sparse_) {
    if (std::find(arg_names.begin(), arg_names.end(), n) == arg_names.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bind: row_sparse names '", n, "', which is not an argument (arguments: ",
          absl::StrJoin(arg_names, ", "), ")"));
    }
  }
  MX_RETURN_IF_ERROR(check_names(args, arg_names, "argument"));
  MX_RETURN_IF_ERROR(check_names(aux_states, aux_names, "auxiliary state"));
  absl::StatusOr<Symbol::Shapes> shapes = symbol_.InferShape(*known, true);
  if (!shapes.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("bind: ", shapes.status().message()));
  }
  for (size_t i = 0; i < arg_names.size(); ++i) {
    if (row_sparse_.count(arg_names[i])) {
      MX_RETURN_IF_ERROR(CheckRowBlock(arg_names[i], args.at(arg_names[i]).shape(),
                                       shapes->arguments[i]));
      sparse_rows_[arg_names[i]].table = shapes->arguments[i];
      continue;
    }
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
    if (r == GradReq::kAdd && row_sparse_.count(n)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bind: row-sparse argument '", n, "' cannot add to its gradient (grad_req add): "
          "its rows change with every batch; use write"));
    }
    if (r != GradReq::kNull) {
      if (grad == args_grad.end() || grad->second.is_none()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "bind: argument '", n, "' requests a gradient but args_grad has no array for it"));
      }
      if (grad->second.shape() != args.at(n).shape()) {
        return absl::InvalidArgumentError(absl::StrCat("bind: ", ShapeMismatch(
            "gradient of", n, grad->second.shape(), args.at(n).shape())));
      }
      MX_RETURN_IF_ERROR(check_context("gradient of", n, grad->second));
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
  return absl::OkStatus();
}

void Executor::RequireRowSparseRows(const char* what) const {
  for (const auto& [name, rows] : sparse_rows_) {
    MX_THROW_IF_NOT(rows.ids != nullptr, what, ": row-sparse argument '", name,
                    "' has no rows yet; call SetRowSparseArg first");
  }
}

std::shared_ptr<const std::vector<int64_t>> Executor::RowsFor(
    const std::string& sparse_arg) const {
  if (sparse_arg.empty()) return nullptr;
  return sparse_rows_.at(sparse_arg).ids;
}

const Executor::SparseRows& Executor::SparseRowsOf(const std::string& name,
                                                  const char* what) const {
  auto it = sparse_rows_.find(name);
  MX_THROW_IF_NOT(it != sparse_rows_.end(), what, ": '", name,
                  "' is not a row-sparse argument of this executor");
  return it->second;
}

void Executor::SetRowSparseArg(const std::string& name, const RowSparseNDArray& rows) {
  const Shape& table = SparseRowsOf(name, "SetRowSparseArg").table;
  MX_THROW_IF_NOT(!rows.is_none() && rows.shape() == table, "SetRowSparseArg '",
                  name, "': the rows are of a table ",
                  rows.is_none() ? std::string("(null)") : rows.shape().ToString(),
                  " but the argument's table is ", table.ToString());
  NDArray block = args_.at(name);
  MX_THROW_IF_NOT(rows.nnz() <= block.shape()[0], "SetRowSparseArg '", name, "': ",
                  rows.nnz(), " rows exceed the capacity of ", block.shape()[0],
                  " bound for it");
  if (rows.nnz() > 0) block.Slice(0, rows.nnz()).Assign(rows.data());
  sparse_rows_.at(name).ids = std::make_shared<const std::vector<int64_t>>(rows.indices());
}

RowSparseNDArray Executor::row_sparse_grad(const std::string& name) const {
  const SparseRows& rows = SparseRowsOf(name, "row_sparse_grad");
  MX_THROW_IF_NOT(grads_.count(name), "row_sparse_grad: '", name, "' has no gradient");
  RequireRowSparseRows("row_sparse_grad");
  const int64_t nnz = static_cast<int64_t>(rows.ids->size());
  return RowSparseNDArray(rows.table, *rows.ids, grads_.at(name).Slice(0, nnz));
}

const Shape& Executor::RowSparseTable(const std::string& name) const {
  return SparseRowsOf(name, "RowSparseTable").table;
}

absl::StatusOr<std::string> Executor::RowSparseIndexInput(const std::string& name) const {
  if (!row_sparse_.count(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", name, "' is not a row-sparse argument of this executor"));
  }
  std::set<std::string> inputs;
  for (const Plan::NodeRun& run : plan_->nodes) {
    if (run.sparse_arg != name) continue;
    const graph::Node* index = run.node->inputs[0].node.get();
    if (!index->is_variable()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the indices of ", run.node->name, ", which reads row-sparse '", name,
          "', are computed by ", index->name, ": the rows a batch needs cannot be known "
          "before Forward; feed the Embedding an input"));
    }
    inputs.insert(index->name);
  }
  if (inputs.size() != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "row-sparse '", name, "' is read with indices from ", inputs.size(),
        " inputs; one is supported"));
  }
  return *inputs.begin();
}

void Executor::Forward(bool is_train) {
  RequireRowSparseRows("Forward");
  for (const Plan::Bulk& bulk : plan_->forward) {
    // A monitor sees each node's outputs as they are pushed.
    if (bulk.runs.size() == 1 || monitor_) {
      for (size_t k : bulk.runs) PushForward(k, is_train);
      continue;
    }
    std::vector<std::function<void()>> work;
    for (size_t k : bulk.runs) work.push_back(ForwardWork(k, is_train));
    PushBulk(plan_, bulk, std::move(work));
  }
  trained_forward_ = is_train;
}

std::function<void()> Executor::ForwardWork(size_t k, bool is_train) const {
  const Plan::NodeRun& run = plan_->nodes[k];
  OpContext op_ctx = RunContextFor(run, is_train, RowsFor(run.sparse_arg));
  if (op_ctx.rows != nullptr) {
    // This step's scratch, for its backward too (see OpContext).
    run.row_positions = std::make_shared<std::vector<float>>();
    op_ctx.row_positions = run.row_positions;
  }
  std::vector<OpReq> req(run.out.size(), OpReq::kWrite);
  return [plan = plan_, k, op_ctx, req = std::move(req)] {
    const Plan::NodeRun& r = plan->nodes[k];
    r.op->forward(op_ctx, r.node->parsed, r.in_blobs, req, r.out_blobs, r.aux_blobs);
  };
}

void Executor::PushForward(size_t k, bool is_train) const {
  const Plan::NodeRun& run = plan_->nodes[k];
  if (run.node == nullptr) {  // a copy to another context
    NDArray to = plan_->entries[run.out[0]];
    to.Assign(plan_->entries[run.in[0]]);
    return;
  }
  kernel::Push(run.fwd_name.c_str(), run.ctx, run.fwd_reads, run.fwd_writes,
               ForwardWork(k, is_train), 0, Property(run));
  if (monitor_) {
    std::vector<std::string> names = run.node->output_names();
    for (size_t j = 0; j < run.out.size(); ++j) {
      const int id = run.out[j];
      const NDArray& value = plan_->entries[id];
      monitor_(names[j], plan_->entry_blocked[id] ? RowMajorCopy(value) : value);
    }
  }
}

std::vector<std::string> Executor::blocked_outputs() const {
  std::vector<std::string> blocked;
  for (const Plan::NodeRun& run : plan_->nodes) {
    if (run.node == nullptr) continue;
    const std::vector<std::string> names = run.node->output_names();
    for (size_t j = 0; j < run.out.size(); ++j) {
      if (plan_->entry_blocked[run.out[j]]) blocked.push_back(names[j]);
    }
  }
  return blocked;
}

void Executor::Backward(const std::vector<NDArray>& head_grads) {
  if (!trained_forward_) {
    throw Error(absl::FailedPreconditionError(
        "Backward needs a preceding Forward(is_train=true): one Backward per "
        "Forward(is_train=true) "
        "(the forward's values it reads share memory with gradients)"));
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
    if (plan_->output_head_adds[i]) {
      slot += head_grads[i];
    } else {
      slot.Assign(head_grads[i]);
    }
  }
  for (int id : plan_->zero_grads) {
    NDArray slot = plan_->grads[plan_->grad_of[id]];
    slot.Assign(0.0f);
  }
  // The forward's values are spent: buffers of those it read last are
  // gradients' now (the plan shares memory along the whole step).
  trained_forward_ = false;
  for (const Plan::Bulk& bulk : plan_->backward) {
    if (bulk.runs.size() == 1) {
      PushBackward(bulk.runs[0]);
      continue;
    }
    std::vector<std::function<void()>> work;
    for (size_t k : bulk.runs) work.push_back(BackwardWork(k));
    PushBulk(plan_, bulk, std::move(work));
  }
}

std::function<void()> Executor::BackwardWork(size_t k) const {
  const Plan::NodeRun& run = plan_->nodes[k];
  OpContext op_ctx = RunContextFor(run, /*is_train=*/true, RowsFor(run.sparse_arg));
  op_ctx.row_positions = run.row_positions;
  return [plan = plan_, k, op_ctx] {
    const Plan::NodeRun& r = plan->nodes[k];
    r.op->backward(op_ctx, r.node->parsed, r.out_grad_blobs, r.in_blobs, r.out_blobs, r.bwd_req,
                   r.in_grad_blobs, r.aux_blobs);
  };
}

void Executor::PushBackward(size_t k) const {
  const Plan::NodeRun& run = plan_->nodes[k];
  if (run.node == nullptr) {  // a copy: the gradient goes back to the source
    const NDArray& from = plan_->grads[run.out_grad[0]];
    NDArray to = plan_->grads[run.in_grad[0]];
    if (run.bwd_req[0] == OpReq::kWrite) {
      to.Assign(from);
    } else if (run.bwd_req[0] == OpReq::kAdd) {
      NDArray here = run.add_buffer;
      here.Assign(from);
      to += here;
    }
    return;
  }
  kernel::Push(run.bwd_name.c_str(), run.ctx, run.bwd_reads, run.bwd_writes, BackwardWork(k), 0,
               Property(run));
}

}  // namespace mx
