// Symbol JSON in MXNet's formats. Writing produces the 1.x layout; reading
// accepts 1.x ("attrs" per node) and 0.8-era files ("param" holding operator
// parameters and "attr" holding user attributes). Nodes must be listed
// inputs-first, as MXNet writes them; anything else is an error.
//
// Reading upgrades old files as MXNet's loader does: MXNet's hidden keys
// written bare become "__key__" (ctx_group -> __ctx_group__); an operator's
// "<argument>_<hidden key>" (weight_lr_mult) becomes "__lr_mult__" on that
// argument's variable; and files older than 0.9, which did not list
// auxiliary states, get variables "<node>_<state>" for them, with the
// operator's user attributes.
#include <algorithm>
#include <fstream>
#include <optional>
#include <sstream>
#include <unordered_map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "graph/node.h"
#include "graph/symbol.h"
#include "ndarray/ndarray.h"
#include "nlohmann/json.hpp"

namespace mx {

using graph::Node;
using graph::NodeEntry;
using json = nlohmann::json;

namespace {

constexpr int kMxnetVersion = 10901;  // the 1.9.1 layout
constexpr int kFirstWithAuxStates = 900;  // 0.9.0 listed auxiliary states

bool IsUserAttr(const std::string& key) {
  return absl::StartsWith(key, "__") && absl::EndsWith(key, "__");
}

// Keys MXNet keeps as "__key__" (its kHiddenKeys).
constexpr const char* kHiddenKeys[] = {"ctx_group", "lr_mult", "wd_mult", "force_mirroring",
                                       "mirror_stage"};

bool IsHiddenKey(const std::string& key) {
  for (const char* hidden : kHiddenKeys) {
    if (key == hidden) return true;
  }
  return false;
}

// For "weight_lr_mult": {"weight", "__lr_mult__"}.
std::optional<std::pair<std::string, std::string>> ArgumentAttr(const std::string& key) {
  for (const char* hidden : kHiddenKeys) {
    const std::string suffix = absl::StrCat("_", hidden);
    if (key.size() > suffix.size() && absl::EndsWith(key, suffix)) {
      return std::make_pair(key.substr(0, key.size() - suffix.size()),
                            absl::StrCat("__", hidden, "__"));
    }
  }
  return std::nullopt;
}

absl::Status Bad(size_t node, const std::string& name, const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat(
      "symbol JSON: node ", node, name.empty() ? "" : absl::StrCat(" '", name, "'"),
      ": ", msg));
}

// What a malformed value is, for an error: a number or string as written
// (up to 40 characters), or its kind and size. Never the whole value: a
// deeply nested one would exhaust the stack being printed.
std::string Describe(const json& v) {
  if (v.is_array()) return absl::StrCat("an array of ", v.size(), " element(s)");
  if (v.is_object()) return absl::StrCat("an object of ", v.size(), " key(s)");
  const std::string text = v.dump();
  return text.size() <= 40 ? text : absl::StrCat(text.substr(0, 40), "...");
}

// Reads [node_id, index(, version)] entries.
absl::StatusOr<NodeEntry> ReadEntry(
    const json& e, size_t limit,
    const std::vector<std::shared_ptr<Node>>& nodes, const std::string& where) {
  if (!e.is_array() || e.size() < 2 || !e[0].is_number_integer() ||
      !e[1].is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "symbol JSON: ", where, ": an input must be [node, output(, version)], got ", Describe(e)));
  }
  int64_t id = e[0].get<int64_t>(), index = e[1].get<int64_t>();
  if (id < 0 || static_cast<size_t>(id) >= limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "symbol JSON: ", where, ": input refers to node ", id,
        ", which is not an earlier node (a cycle or a bad index)"));
  }
  const auto& node = nodes[id];
  if (index < 0 || index >= node->num_outputs()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "symbol JSON: ", where, ": node '", node->name, "' has no output ", index));
  }
  return NodeEntry{node, static_cast<int>(index)};
}

// Collects a node's string-valued attributes from the keys a format uses.
absl::StatusOr<std::map<std::string, std::string>> StringMap(
    const json& node, const char* key, size_t id, const std::string& name) {
  std::map<std::string, std::string> out;
  if (!node.contains(key)) return out;
  const json& m = node[key];
  if (!m.is_object()) return Bad(id, name, absl::StrCat("'", key, "' must be an object"));
  for (auto it = m.begin(); it != m.end(); ++it) {
    if (!it.value().is_string()) {
      return Bad(id, name, absl::StrCat("attribute '", it.key(), "' must be a string"));
    }
    out[it.key()] = it.value().get<std::string>();
  }
  return out;
}

// "weight_lr_mult" on an operator: "__lr_mult__" for its argument `index`.
struct ArgumentAttribute {
  size_t index;
  std::string key;       // "__lr_mult__"
  std::string original;  // "weight_lr_mult"
  std::string value;
};

// Sorts an operator node's non-parameter keys into user attributes and
// per-argument attributes; bare keys from a 0.8-era "attr" object stay user
// attributes as they are.
absl::Status SortKeys(const std::map<std::string, std::string>& given,
                      const std::map<std::string, std::string>& attr, size_t id, Node* node,
                      const std::vector<std::string>& arguments,
                      std::vector<ArgumentAttribute>* per_argument) {
  for (const auto& [k, v] : given) {
    if (IsUserAttr(k)) {
      node->attrs[k] = v;
    } else if (IsHiddenKey(k)) {
      node->attrs[absl::StrCat("__", k, "__")] = v;
    } else if (auto arg = ArgumentAttr(k); arg.has_value() &&
               std::find(arguments.begin(), arguments.end(), arg->first) != arguments.end()) {
      const size_t index = std::find(arguments.begin(), arguments.end(), arg->first) - arguments.begin();
      per_argument->push_back({index, arg->second, k, v});
    } else if (attr.count(k)) {
      node->attrs[k] = v;
    } else {
      return Bad(id, node->name, absl::StrCat("unknown attribute '", k, "' for operator ",
                                              node->op->name));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Node>> ReadNode(
    const json& j, size_t id, const std::vector<std::shared_ptr<Node>>& nodes, int version) {
  if (!j.is_object() || !j.contains("op") || !j["op"].is_string() ||
      !j.contains("name") || !j["name"].is_string()) {
    return Bad(id, "", "needs string fields 'op' and 'name'");
  }
  auto node = std::make_shared<Node>();
  node->name = j["name"].get<std::string>();
  const std::string op_name = j["op"].get<std::string>();

  std::map<std::string, std::string> given;  // params and attributes mixed
  for (const char* key : {"attrs", "attr", "param"}) {
    MX_ASSIGN_OR_RETURN(auto m, StringMap(j, key, id, node->name));
    given.insert(m.begin(), m.end());
  }
  MX_ASSIGN_OR_RETURN(const auto attr, StringMap(j, "attr", id, node->name));  // 0.8-era
  std::vector<ArgumentAttribute> per_argument;
  if (op_name == "null") {
    for (const auto& [k, v] : given) node->attrs[IsHiddenKey(k) ? absl::StrCat("__", k, "__") : k] = v;
  } else {
    node->op = OpRegistry::Find(op_name);
    if (node->op == nullptr) return Bad(id, node->name, absl::StrCat("unknown operator '", op_name, "'"));
    std::map<std::string, std::string> rest;
    for (auto& [k, v] : given) {
      const bool is_param = std::any_of(node->op->params.begin(), node->op->params.end(),
                                        [&](const ParamSpec& p) { return p.name == k; });
      (is_param ? node->params : rest)[k] = v;
    }
    absl::StatusOr<ParsedParams> parsed = node->op->Parse(node->params);
    if (!parsed.ok()) return Bad(id, node->name, std::string(parsed.status().message()));
    node->parsed = *std::move(parsed);
    MX_RETURN_IF_ERROR(SortKeys(rest, attr, id, node.get(),
                                node->op->ListArguments(node->parsed), &per_argument));
  }

  // By reference: a copy of a value nested a million deep (json's copy
  // recurses) overflowed the stack.
  static const json kNoInputs = json::array();
  const json& inputs = j.contains("inputs") ? j["inputs"] : kNoInputs;
  if (!inputs.is_array()) return Bad(id, node->name, "'inputs' must be an array");
  for (const json& e : inputs) {
    MX_ASSIGN_OR_RETURN(NodeEntry entry,
                        ReadEntry(e, id, nodes, absl::StrCat("node ", id, " '", node->name, "'")));
    node->inputs.push_back(std::move(entry));
  }
  if (node->is_variable()) {
    if (!node->inputs.empty()) return Bad(id, node->name, "a variable cannot have inputs");
    return node;
  }
  const std::vector<std::string> aux = node->op->ListAuxStates(node->parsed);
  const size_t arguments = node->op->ListArguments(node->parsed).size();
  if (version < kFirstWithAuxStates && node->inputs.size() == arguments) {
    for (const std::string& state : aux) {  // not listed before 0.9
      auto var = std::make_shared<Node>();
      var->name = absl::StrCat(node->name, "_", state);
      for (const auto& [k, v] : node->attrs) {
        if (IsUserAttr(k)) var->attrs[k] = v;
      }
      node->inputs.push_back({var, 0});
    }
  }
  if (node->inputs.size() != arguments + aux.size()) {
    return Bad(id, node->name, absl::StrCat("operator ", op_name, " takes ", arguments + aux.size(),
                                            " inputs but ", node->inputs.size(), " are given"));
  }
  for (const ArgumentAttribute& a : per_argument) {
    Node* input = node->inputs[a.index].node.get();
    // Kept on the operator, as MXNet keeps it, when the input is computed.
    (input->is_variable() ? input->attrs[a.key] : node->attrs[a.original]) = a.value;
  }
  return node;
}

// The mxnet_version a file records (root "attrs": {"mxnet_version":
// ["int", 10901]}); files without one are 0.8-era (800).
int FileVersion(const json& root) {
  if (!root.contains("attrs") || !root["attrs"].is_object()) return 800;
  const json& attrs = root["attrs"];
  if (!attrs.contains("mxnet_version")) return 800;
  const json& v = attrs["mxnet_version"];
  if (v.is_array() && v.size() == 2 && v[1].is_number_integer()) return v[1].get<int>();
  if (v.is_number_integer()) return v.get<int>();
  return 800;
}

}  // namespace

std::string Symbol::ToJSON() const {
  std::vector<Node*> order = graph::TopoSort(outputs_);
  std::unordered_map<const Node*, int> id;
  json nodes = json::array(), arg_nodes = json::array(), row_ptr = json::array();
  int rows = 0;
  row_ptr.push_back(0);
  for (Node* n : order) {
    id[n] = static_cast<int>(nodes.size());
    json j;
    j["op"] = n->is_variable() ? "null" : n->op->name;
    j["name"] = n->name;
    json attrs = json::object();
    for (const auto& [k, v] : n->params) attrs[k] = v;
    for (const auto& [k, v] : n->attrs) attrs[k] = v;
    if (!attrs.empty()) j["attrs"] = attrs;
    json inputs = json::array();
    for (const NodeEntry& e : n->inputs) inputs.push_back({id.at(e.node.get()), e.index, 0});
    j["inputs"] = inputs;
    if (n->is_variable()) arg_nodes.push_back(id[n]);
    rows += n->num_outputs();
    row_ptr.push_back(rows);
    nodes.push_back(std::move(j));
  }
  json heads = json::array();
  for (const NodeEntry& e : outputs_) heads.push_back({id.at(e.node.get()), e.index, 0});
  json root;
  root["nodes"] = nodes;
  root["arg_nodes"] = arg_nodes;
  root["node_row_ptr"] = row_ptr;
  root["heads"] = heads;
  root["attrs"] = {{"mxnet_version", {"int", kMxnetVersion}}};
  return root.dump(2);
}

absl::StatusOr<Symbol> Symbol::FromJSON(const std::string& text) {
  json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError("symbol JSON: not valid JSON");
  }
  if (!root.is_object() || !root.contains("nodes") || !root["nodes"].is_array() ||
      !root.contains("heads") || !root["heads"].is_array()) {
    return absl::InvalidArgumentError(
        "symbol JSON: expected an object with arrays 'nodes' and 'heads'");
  }
  const json& jnodes = root["nodes"];
  const int version = FileVersion(root);
  std::vector<std::shared_ptr<Node>> nodes;
  std::unordered_map<std::string, size_t> variable_names;
  for (size_t i = 0; i < jnodes.size(); ++i) {
    MX_ASSIGN_OR_RETURN(std::shared_ptr<Node> node, ReadNode(jnodes[i], i, nodes, version));
    if (node->is_variable()) {
      auto [it, inserted] = variable_names.emplace(node->name, i);
      if (!inserted) {
        return Bad(i, node->name, absl::StrCat("duplicate argument name (also node ",
                                               it->second, ")"));
      }
    }
    nodes.push_back(std::move(node));
  }
  std::vector<NodeEntry> heads;
  for (const json& h : root["heads"]) {
    MX_ASSIGN_OR_RETURN(NodeEntry e, ReadEntry(h, nodes.size(), nodes, "heads"));
    heads.push_back(std::move(e));
  }
  if (heads.empty()) return absl::InvalidArgumentError("symbol JSON: no heads");
  return Symbol(std::move(heads));
}

absl::Status Symbol::Save(const std::string& path) const {
  return WriteFileAtomically(path, ToJSON());
}

absl::StatusOr<Symbol> Symbol::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open symbol file ", path));
  std::stringstream buf;
  buf << in.rdbuf();
  absl::StatusOr<Symbol> s = FromJSON(buf.str());
  if (!s.ok()) {
    return absl::Status(s.status().code(), absl::StrCat(path, ": ", s.status().message()));
  }
  return s;
}

}  // namespace mx
