#include "graph/symbol.h"

#include <algorithm>
#include <functional>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "graph/node.h"

namespace mx {

using graph::Node;
using graph::NodeEntry;

namespace graph {

Node::~Node() {
  std::vector<std::shared_ptr<Node>> pending;
  for (NodeEntry& e : inputs) pending.push_back(std::move(e.node));
  while (!pending.empty()) {
    std::shared_ptr<Node> n = std::move(pending.back());
    pending.pop_back();
    // The last owner takes the node's inputs before the node goes, so its
    // destructor has none to release.
    if (n.use_count() == 1) {
      for (NodeEntry& e : n->inputs) pending.push_back(std::move(e.node));
    }
  }
}

int Node::num_arguments() const {
  return is_variable() ? 0 : static_cast<int>(op->ListArguments(parsed).size());
}

int Node::num_outputs() const {
  return is_variable() ? 1 : static_cast<int>(op->ListOutputs(parsed).size());
}

int Node::num_visible_outputs() const {
  return is_variable() ? 1 : op->NumVisibleOutputs(parsed);
}

std::vector<std::string> Node::output_names() const {
  if (is_variable()) return {name};
  std::vector<std::string> names;
  for (const std::string& out : op->ListOutputs(parsed)) {
    names.push_back(absl::StrCat(name, "_", out));
  }
  return names;
}

std::vector<Node*> TopoSort(const std::vector<NodeEntry>& outputs) {
  std::vector<Node*> order;
  std::unordered_set<Node*> visited;
  // Iterative DFS: deep graphs must not overflow the stack.
  std::vector<std::pair<Node*, size_t>> stack;
  for (const NodeEntry& out : outputs) {
    if (visited.count(out.node.get())) continue;
    stack.push_back({out.node.get(), 0});
    visited.insert(out.node.get());
    while (!stack.empty()) {
      auto& [node, next] = stack.back();
      if (next < node->inputs.size()) {
        Node* in = node->inputs[next++].node.get();
        if (visited.insert(in).second) stack.push_back({in, 0});
      } else {
        order.push_back(node);
        stack.pop_back();
      }
    }
  }
  return order;
}

std::vector<NodeEntry> AllOutputs(const std::vector<NodeEntry>& heads) {
  // TopoSort yields raw nodes; entries hold the owning pointers.
  std::unordered_map<Node*, std::shared_ptr<Node>> owner_of;
  for (const NodeEntry& e : heads) owner_of[e.node.get()] = e.node;
  std::vector<Node*> order = TopoSort(heads);
  for (Node* n : order) {
    for (const NodeEntry& in : n->inputs) owner_of[in.node.get()] = in.node;
  }
  std::vector<NodeEntry> outs;
  for (Node* n : order) {
    for (int i = 0; i < n->num_outputs(); ++i) outs.push_back({owner_of[n], i});
  }
  return outs;
}

std::vector<Node*> AuxVariables(const std::vector<Node*>& order) {
  std::vector<Node*> aux;
  std::unordered_set<Node*> seen;
  for (Node* n : order) {
    for (size_t i = n->num_arguments(); i < n->inputs.size(); ++i) {
      Node* v = n->inputs[i].node.get();
      if (v->is_variable() && seen.insert(v).second) aux.push_back(v);
    }
  }
  return aux;
}

}  // namespace graph

// ---- Names.

namespace {
thread_local NameManager* current_manager = nullptr;
}  // namespace

std::string NameManager::Next(const std::string& hint) {
  return absl::StrCat(prefix, hint, counters_[hint]++);
}

NameManager& CurrentNameManager() {
  thread_local NameManager default_manager;
  return current_manager != nullptr ? *current_manager : default_manager;
}

NameScope::NameScope(std::string prefix) : previous_(current_manager) {
  manager_.prefix = std::move(prefix);
  current_manager = &manager_;
}

NameScope::~NameScope() { current_manager = previous_; }

// ---- Attributes.

namespace {
thread_local const std::map<std::string, std::string>* current_attrs = nullptr;

// Keys stored as MXNet stores them, "__shape__" for "shape".
const std::string kReservedAttrs[] = {"shape", "lr_mult", "wd_mult", "init", "dtype",
                                      "ctx_group"};

std::string StoredKey(const std::string& key) {
  const bool reserved =
      std::find(std::begin(kReservedAttrs), std::end(kReservedAttrs), key) != std::end(kReservedAttrs);
  return reserved ? absl::StrCat("__", key, "__") : key;
}

bool IsWrapped(const std::string& key) {
  return key.size() > 4 && absl::StartsWith(key, "__") && absl::EndsWith(key, "__");
}

// The attributes every node created now starts with.
const std::map<std::string, std::string>& ScopeAttrs() {
  static const std::map<std::string, std::string> kNone;
  return current_attrs != nullptr ? *current_attrs : kNone;
}
}  // namespace

AttrScope::AttrScope(const VariableAttrs& attrs) : previous_(current_attrs) {
  attrs_ = ScopeAttrs();
  for (const auto& [key, value] : attrs) attrs_[StoredKey(key)] = value;
  current_attrs = &attrs_;
}

AttrScope::~AttrScope() { current_attrs = previous_; }

// ---- Construction.

SymbolInput::SymbolInput(const Symbol& s)
    : symbol(std::make_shared<const Symbol>(s)) {}
SymbolInput::SymbolInput(std::string n, const Symbol& s)
    : name(std::move(n)), symbol(std::make_shared<const Symbol>(s)) {}

namespace {

Symbol FromNode(std::shared_ptr<Node> node) {
  std::vector<NodeEntry> outs;
  for (int i = 0; i < node->num_visible_outputs(); ++i) outs.push_back({node, i});
  return Symbol(std::move(outs));
}

NodeEntry SingleOutput(const Symbol& s, const std::string& op,
                       const std::string& what) {
  MX_THROW_IF_NOT(s.outputs().size() == 1, "operator ", op, ": input ", what,
                  " has ", s.outputs().size(),
                  " outputs; select one with operator[]");
  return s.outputs()[0];
}

}  // namespace

Symbol Variable(const std::string& name, const VariableAttrs& attrs) {
  MX_THROW_IF_NOT(!name.empty(), "Variable: the name must not be empty");
  auto node = std::make_shared<Node>();
  node->name = CurrentNameManager().prefix + name;
  node->attrs = ScopeAttrs();
  for (const auto& [key, value] : attrs) node->attrs[StoredKey(key)] = value;
  return FromNode(std::move(node));
}

Symbol Op(const std::string& op_name, const SymbolInputs& inputs,
          const Params& params, const std::string& name) {
  const OpDef* op = OpRegistry::Find(op_name);
  MX_THROW_IF_NOT(op != nullptr, "unknown operator '", op_name, "'");
  auto node = std::make_shared<Node>();
  node->op = op;
  // An operator's attributes are hidden keys: a scope's plain key ("stage")
  // is stored as "__stage__". MXNet reads an operator's plain keys as its
  // parameters, so a file with one did not load, here or there, and one
  // named as a parameter ("p" over Dropout) replaced it in the file.
  for (const auto& [key, value] : ScopeAttrs()) {
    node->attrs[IsWrapped(key) ? key : absl::StrCat("__", key, "__")] = value;
  }
  // The variables made for its missing inputs get what a Variable made
  // here gets, and the operator's own attributes (as MXNet: lr_mult on a
  // layer is its weight's and bias's).
  std::map<std::string, std::string> var_attrs = ScopeAttrs();
  for (const auto& [key, value] : params) {
    const bool is_param = std::any_of(op->params.begin(), op->params.end(),
                                      [&](const ParamSpec& p) { return p.name == key; });
    const bool is_attr = key == "lr_mult" || key == "wd_mult" || key == "ctx_group" || IsWrapped(key);
    if (!is_param && is_attr) {
      node->attrs[StoredKey(key)] = value.str();
      var_attrs[StoredKey(key)] = value.str();
    } else {
      node->params[key] = value.str();
    }
  }
  absl::StatusOr<ParsedParams> parsed = op->Parse(node->params);
  ThrowIfError(parsed.status());
  node->parsed = *std::move(parsed);
  NameManager& names = CurrentNameManager();
  node->name = name.empty() ? names.Next(op->NameHint()) : names.prefix + name;

  std::vector<std::string> args = op->ListArguments(node->parsed);
  std::vector<std::string> aux = op->ListAuxStates(node->parsed);
  std::vector<std::string> slots = args;
  slots.insert(slots.end(), aux.begin(), aux.end());
  std::vector<std::optional<NodeEntry>> filled(slots.size());
  size_t positional = 0;
  for (const SymbolInput& in : inputs) {
    size_t slot;
    if (in.name.empty()) {
      MX_THROW_IF_NOT(positional < args.size(), "operator ", op_name, " (",
                      node->name, ") takes ", args.size(),
                      " arguments but more were given");
      slot = positional++;
    } else {
      auto it = std::find(slots.begin(), slots.end(), in.name);
      MX_THROW_IF_NOT(it != slots.end(), "operator ", op_name, " (",
                      node->name, ") has no input named '", in.name,
                      "' (inputs: ", absl::StrJoin(slots, ", "), ")");
      slot = it - slots.begin();
    }
    MX_THROW_IF_NOT(!filled[slot].has_value(), "operator ", op_name, " (",
                    node->name, "): input '", slots[slot], "' given twice");
    filled[slot] = SingleOutput(*in.symbol, op_name, slots[slot]);
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    if (filled[i].has_value()) {
      node->inputs.push_back(*filled[i]);
      continue;
    }
    bool required = std::find(op->required_inputs.begin(),
                              op->required_inputs.end(),
                              slots[i]) != op->required_inputs.end();
    MX_THROW_IF_NOT(!required, "operator ", op_name, " (", node->name,
                    "): required input '", slots[i], "' is missing");
    auto var = std::make_shared<Node>();
    var->name = absl::StrCat(node->name, "_", slots[i]);
    var->attrs = var_attrs;
    node->inputs.push_back({var, 0});
  }
  return FromNode(std::move(node));
}

Symbol Group(const std::vector<Symbol>& symbols) {
  std::vector<NodeEntry> outs;
  for (const Symbol& s : symbols) {
    outs.insert(outs.end(), s.outputs().begin(), s.outputs().end());
  }
  return Symbol(std::move(outs));
}

namespace {
Symbol Binary(const char* op, const Symbol& a, const Symbol& b) {
  return Op(op, {a, b});
}
Symbol WithScalar(const char* op, const Symbol& a, float s) {
  return Op(op, {a}, {{"scalar", s}});
}
}  // namespace

Symbol operator+(const Symbol& a, const Symbol& b) { return Binary("elemwise_add", a, b); }
Symbol operator-(const Symbol& a, const Symbol& b) { return Binary("elemwise_sub", a, b); }
Symbol operator*(const Symbol& a, const Symbol& b) { return Binary("elemwise_mul", a, b); }
Symbol operator/(const Symbol& a, const Symbol& b) { return Binary("elemwise_div", a, b); }
Symbol operator+(const Symbol& a, float s) { return WithScalar("_plus_scalar", a, s); }
Symbol operator-(const Symbol& a, float s) { return WithScalar("_minus_scalar", a, s); }
Symbol operator*(const Symbol& a, float s) { return WithScalar("_mul_scalar", a, s); }
Symbol operator/(const Symbol& a, float s) { return WithScalar("_div_scalar", a, s); }
Symbol operator+(float s, const Symbol& a) { return WithScalar("_plus_scalar", a, s); }
Symbol operator-(float s, const Symbol& a) { return WithScalar("_rminus_scalar", a, s); }
Symbol operator*(float s, const Symbol& a) { return WithScalar("_mul_scalar", a, s); }
Symbol operator/(float s, const Symbol& a) { return WithScalar("_rdiv_scalar", a, s); }

// ---- Queries.

std::string Symbol::name() const {
  return outputs_.size() == 1 ? outputs_[0].node->name : "";
}

std::vector<std::string> Symbol::ListArguments() const {
  std::vector<Node*> order = graph::TopoSort(outputs_);
  std::vector<Node*> aux = graph::AuxVariables(order);
  std::vector<std::string> names;
  for (Node* n : order) {
    if (n->is_variable() && std::find(aux.begin(), aux.end(), n) == aux.end()) {
      names.push_back(n->name);
    }
  }
  return names;
}

std::vector<std::string> Symbol::ListAuxiliaryStates() const {
  std::vector<std::string> names;
  for (Node* n : graph::AuxVariables(graph::TopoSort(outputs_))) {
    names.push_back(n->name);
  }
  return names;
}

std::vector<std::string> Symbol::ListInputs() const {
  std::vector<std::string> names;
  for (Node* n : graph::TopoSort(outputs_)) {
    if (n->is_variable()) names.push_back(n->name);
  }
  return names;
}

std::vector<std::string> Symbol::ListOutputs() const {
  std::vector<std::string> names;
  for (const NodeEntry& e : outputs_) {
    names.push_back(e.node->output_names()[e.index]);
  }
  return names;
}

Symbol Symbol::operator[](int i) const {
  MX_THROW_IF_NOT(i >= 0 && i < static_cast<int>(outputs_.size()),
                  "output index ", i, " out of range: the symbol has ",
                  outputs_.size(), " outputs");
  return Symbol({outputs_[i]});
}

Symbol Symbol::operator[](const std::string& output_name) const {
  std::vector<std::string> names = ListOutputs();
  auto it = std::find(names.begin(), names.end(), output_name);
  MX_THROW_IF_NOT(it != names.end(), "no output named '", output_name,
                  "' (outputs: ", absl::StrJoin(names, ", "), ")");
  return (*this)[static_cast<int>(it - names.begin())];
}

Symbol Symbol::GetInternals() const {
  std::vector<NodeEntry> outs;
  for (const NodeEntry& e : graph::AllOutputs(outputs_)) {
    if (e.index < e.node->num_visible_outputs()) outs.push_back(e);
  }
  return Symbol(std::move(outs));
}

std::optional<std::string> Symbol::GetAttr(const std::string& key) const {
  if (outputs_.size() != 1) return std::nullopt;
  const auto& attrs = outputs_[0].node->attrs;
  auto it = attrs.find(key);
  // A key as given, or stored hidden ("lr_mult" as "__lr_mult__"), as
  // MXNet's attr() finds it.
  if (it == attrs.end() && !IsWrapped(key)) it = attrs.find(absl::StrCat("__", key, "__"));
  if (it == attrs.end()) return std::nullopt;
  return it->second;
}

std::map<std::string, std::string> Symbol::ListAttrs() const {
  std::map<std::string, std::string> all;
  for (Node* n : graph::TopoSort(outputs_)) {
    for (const auto& [k, v] : n->attrs) all[absl::StrCat(n->name, "$", k)] = v;
  }
  return all;
}

// ---- Composition.

Symbol Symbol::operator()(const std::map<std::string, Symbol>& inputs,
                          const std::string& name) const {
  std::vector<std::string> args = ListInputs();
  for (const auto& [key, sym] : inputs) {
    MX_THROW_IF_NOT(std::find(args.begin(), args.end(), key) != args.end(),
                    "compose: the symbol has no argument named '", key,
                    "' (arguments: ", absl::StrJoin(args, ", "), ")");
    MX_THROW_IF_NOT(sym.outputs().size() == 1, "compose: the symbol for '",
                    key, "' has ", sym.outputs().size(), " outputs");
  }
  // Copy every node that depends on a replaced variable; share the rest.
  // In one pass over the nodes, inputs before consumers: a recursion per
  // level overflowed the stack on graphs 100,000 nodes deep (which symbol
  // files may hold).
  const std::vector<Node*> order = graph::TopoSort(outputs_);
  std::unordered_map<Node*, std::shared_ptr<Node>> owners, copies;
  for (const NodeEntry& e : outputs_) owners[e.node.get()] = e.node;
  for (Node* n : order) {
    for (const NodeEntry& in : n->inputs) owners[in.node.get()] = in.node;
  }
  // What an entry becomes: a replaced variable's symbol, or the entry of
  // the node's copy (the node itself when nothing it reads changed).
  auto rewrite = [&](const NodeEntry& e) -> NodeEntry {
    Node* n = e.node.get();
    if (!n->is_variable()) return {copies.at(n), e.index};
    auto it = inputs.find(n->name);
    return it != inputs.end() ? it->second.outputs()[0] : e;
  };
  for (Node* n : order) {
    if (n->is_variable()) continue;
    std::vector<NodeEntry> new_inputs;
    bool changed = false;
    for (const NodeEntry& in : n->inputs) {
      NodeEntry r = rewrite(in);
      changed = changed || r.node != in.node || r.index != in.index;
      new_inputs.push_back(std::move(r));
    }
    std::shared_ptr<Node> result = owners.at(n);
    if (changed) {
      result = std::make_shared<Node>(*n);
      result->inputs = std::move(new_inputs);
    }
    copies[n] = std::move(result);
  }
  std::vector<NodeEntry> outs;
  for (const NodeEntry& e : outputs_) outs.push_back(rewrite(e));
  if (!name.empty() && outs.size() == 1 && !outs[0].node->is_variable()) {
    auto renamed = std::make_shared<Node>(*outs[0].node);
    renamed->name = CurrentNameManager().prefix + name;
    outs[0].node = renamed;
  }
  return Symbol(std::move(outs));
}

// ---- Shape inference.

absl::StatusOr<Symbol::Shapes> Symbol::InferShape(
    const std::map<std::string, Shape>& known, bool require_complete) const {
  std::vector<Node*> order = graph::TopoSort(outputs_);
  std::unordered_map<const Node*, ShapeList> shapes;  // per node output
  std::set<std::string> used;
  for (Node* n : order) {
    shapes[n].resize(n->num_outputs());
    if (!n->is_variable()) continue;
    auto it = known.find(n->name);
    if (it != known.end()) {
      shapes[n][0] = it->second;
      used.insert(n->name);
    } else if (auto attr = n->attrs.find("__shape__"); attr != n->attrs.end()) {
      absl::StatusOr<Shape> s = ParseShape(attr->second);
      if (!s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "variable ", n->name, ": bad __shape__ attribute '", attr->second, "'"));
      }
      shapes[n][0] = *s;
    }
  }
  for (const auto& [name, shape] : known) {
    if (!used.count(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "infer_shape: '", name, "' is not an argument of the symbol (arguments: ",
          absl::StrJoin(ListInputs(), ", "), ")"));
    }
  }
  // Passes until nothing changes, forward and backward in turn: operators
  // also infer their inputs (the weight of FullyConnected) from other
  // inputs and their outputs, so knowledge flows both ways (forward passes
  // alone took a pass per level to carry it back, and stopped after 8).
  // Shapes only become better known, so this ends; the bound is a guard.
  for (size_t pass = 0; pass < 2 * order.size() + 2; ++pass) {
    bool changed = false;
    for (size_t j = 0; j < order.size(); ++j) {
      Node* n = order[pass % 2 == 0 ? j : order.size() - 1 - j];
      if (n->is_variable()) continue;
      const int nargs = n->num_arguments();
      ShapeList in, aux;
      for (size_t i = 0; i < n->inputs.size(); ++i) {
        const NodeEntry& e = n->inputs[i];
        (static_cast<int>(i) < nargs ? in : aux).push_back(shapes[e.node.get()][e.index]);
      }
      ShapeList out = shapes[n];
      ShapeList in0 = in, aux0 = aux, out0 = out;
      absl::Status st = n->op->infer_shape(n->parsed, &in, &out, &aux);
      if (!st.ok()) {
        // The operator speaks of its argument slots; name what fills them.
        std::vector<std::string> slots = n->op->ListArguments(n->parsed);
        std::vector<std::string> aux_slots = n->op->ListAuxStates(n->parsed);
        slots.insert(slots.end(), aux_slots.begin(), aux_slots.end());
        std::vector<std::string> filled;
        for (size_t i = 0; i < n->inputs.size() && i < slots.size(); ++i) {
          filled.push_back(absl::StrCat(slots[i], "=", n->inputs[i].node->name));
        }
        return absl::Status(st.code(), absl::StrCat(
            "infer_shape: operator ", n->name, " (", n->op->name, "): ",
            st.message(), " (inputs: ", absl::StrJoin(filled, ", "), ")"));
      }
      // Write back what the operator inferred, checking consistency with
      // what producers already know.
      for (size_t i = 0; i < n->inputs.size(); ++i) {
        const NodeEntry& e = n->inputs[i];
        const Shape& s = static_cast<int>(i) < nargs ? in[i] : aux[i - nargs];
        ShapeList& target = shapes[e.node.get()];
        Shape before = target[e.index];
        absl::Status merged = MergeShape(
            &target, e.index, s,
            absl::StrCat("input ", e.node->name));
        if (!merged.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "infer_shape: operator ", n->name, " (", n->op->name, "): ",
              merged.message()));
        }
        changed = changed || target[e.index] != before;
      }
      changed = changed || out != out0;
      shapes[n] = out;
    }
    if (!changed) break;
  }
  Shapes result;
  std::vector<std::string> missing;
  auto take = [&](const Node* n, int index, std::vector<Shape>* dst) {
    const Shape& s = shapes[n][index];
    if (!IsKnown(s)) missing.push_back(n->output_names()[index]);
    dst->push_back(s);
  };
  std::vector<Node*> aux_vars = graph::AuxVariables(order);
  for (Node* n : order) {
    if (!n->is_variable()) continue;
    bool is_aux = std::find(aux_vars.begin(), aux_vars.end(), n) != aux_vars.end();
    if (!is_aux) take(n, 0, &result.arguments);
  }
  for (const NodeEntry& e : outputs_) take(e.node.get(), e.index, &result.outputs);
  for (Node* n : aux_vars) take(n, 0, &result.aux_states);
  if (require_complete && !missing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "infer_shape: cannot infer the shapes of ", absl::StrJoin(missing, ", "),
        "; give more input shapes"));
  }
  return result;
}

// ---- Printing.

std::string Symbol::DebugString() const {
  std::ostringstream os;
  os << "Symbol Outputs:\n";
  for (size_t i = 0; i < outputs_.size(); ++i) {
    os << "\toutput[" << i << "]=" << outputs_[i].node->name << "("
       << outputs_[i].index << ")\n";
  }
  for (Node* n : graph::TopoSort(outputs_)) {
    if (n->is_variable()) {
      os << "Variable:" << n->name << "\n";
      continue;
    }
    os << "--------------------\n";
    os << "Op:" << n->op->name << ", Name=" << n->name << "\n";
    os << "Inputs:\n";
    for (size_t i = 0; i < n->inputs.size(); ++i) {
      const NodeEntry& e = n->inputs[i];
      os << "\targ[" << i << "]=" << e.node->name << "(" << e.index << ")";
      if (e.node->is_variable()) os << " version=0";
      os << "\n";
    }
    if (!n->params.empty()) {
      os << "Attrs:\n";
      for (const auto& [k, v] : n->params) os << "\t" << k << "=" << v << "\n";
    }
  }
  return os.str();
}

std::string Symbol::ToGraphviz(const std::map<std::string, Shape>& known) const {
  std::unordered_map<const Node*, ShapeList> shapes;
  // Shapes per node output, when inference succeeds for the given inputs.
  std::vector<Node*> order = graph::TopoSort(outputs_);
  if (!known.empty()) {
    Symbol internals = GetInternals();
    absl::StatusOr<Shapes> s = internals.InferShape(known);
    if (s.ok()) {
      const auto& outs = internals.outputs();
      for (size_t i = 0; i < outs.size(); ++i) {
        ShapeList& list = shapes[outs[i].node.get()];
        list.resize(outs[i].node->num_outputs());
        list[outs[i].index] = s->outputs[i];
      }
    }
  }
  std::ostringstream os;
  os << "digraph mx {\n  rankdir=BT;\n  node [shape=box, style=rounded];\n";
  std::unordered_map<const Node*, int> id;
  for (Node* n : order) {
    int k = static_cast<int>(id.size());
    id[n] = k;
    if (n->is_variable()) {
      os << "  n" << k << " [label=\"" << n->name << "\", shape=oval];\n";
    } else {
      os << "  n" << k << " [label=\"" << n->name << "\\n" << n->op->name;
      for (const auto& [key, v] : n->params) os << "\\n" << key << "=" << v;
      os << "\"];\n";
    }
  }
  for (Node* n : order) {
    for (const NodeEntry& e : n->inputs) {
      os << "  n" << id[e.node.get()] << " -> n" << id[n];
      auto it = shapes.find(e.node.get());
      if (it != shapes.end() && IsKnown(it->second[e.index])) {
        os << " [label=\"" << it->second[e.index].ToString() << "\"]";
      }
      os << ";\n";
    }
  }
  os << "}\n";
  return os.str();
}

}  // namespace mx
