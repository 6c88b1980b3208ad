// Symbol: a symbolic computation graph, composed from variables and
// operators (the MXNet.jl overview's "Symbols and Composition").
//
//   mx::Symbol net = mx::Variable("data");
//   net = mx::Op("FullyConnected", {net}, {{"num_hidden", 128}}, "fc1");
//   net = mx::Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
//   net.ListArguments();   // data, fc1_weight, fc1_bias
//
// A Symbol is a cheap handle to one or more outputs of graph nodes; nodes are
// immutable once created and shared between symbols, so composing never
// changes an existing symbol.
//
// Names. An operator without a name gets `<hint><n>` from the thread's
// NameManager (`fullyconnected0`, `_plus0`); missing arguments become
// variables `<node>_<argument>` (`fc1_weight`, and `fc3_data` for an fc3
// given no input, which composition may fill in, as in MXNet), except
// Concat's inputs, whose absence is an error.
//
// Orders. ListArguments and ListAuxiliaryStates visit the graph depth-first
// from the outputs, inputs in operator order, and list each variable once at
// its first visit; ListOutputs lists `<node>_<output>` for each output.
//
// Errors (unknown operator or parameter, wrong inputs, inconsistent shapes,
// malformed JSON) are absl::Status from the functions that return one and
// mx::Error (kInvalidArgument) from those that return a Symbol.
#ifndef MX_GRAPH_SYMBOL_H_
#define MX_GRAPH_SYMBOL_H_

#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "graph/op.h"
#include "ndarray/base.h"

namespace mx {

namespace graph {
struct Node;
// One output of a node.
struct NodeEntry {
  std::shared_ptr<Node> node;
  int index = 0;
};
}  // namespace graph

class Symbol;

// An input of an operator: positional (`net`) or named (`{"weight", w}`).
struct SymbolInput {
  SymbolInput(const Symbol& s);  // NOLINT: positional
  SymbolInput(std::string name, const Symbol& s);
  std::string name;
  std::shared_ptr<const Symbol> symbol;
};
using SymbolInputs = std::vector<SymbolInput>;

class Symbol {
 public:
  Symbol() = default;

  bool is_none() const { return outputs_.empty(); }
  // The name of the single output's node ("" for a group).
  std::string name() const;

  // ---- Composition.

  // Replaces the variables named in `inputs` by the given symbols in a copy
  // of this graph (the seed's net2(data2=net, name=:composed)); with a
  // name, the output node is renamed. Every key must name an argument.
  Symbol operator()(const std::map<std::string, Symbol>& inputs,
                    const std::string& name = "") const;
  // The i-th output, or the output called `output_name` (as ListOutputs).
  Symbol operator[](int i) const;
  Symbol operator[](const std::string& output_name) const;
  // All outputs of all nodes, as one symbol (a Group of every internal
  // output, variables included).
  Symbol GetInternals() const;

  // ---- Listings (see the header comment for the order).
  std::vector<std::string> ListArguments() const;
  std::vector<std::string> ListOutputs() const;
  std::vector<std::string> ListAuxiliaryStates() const;
  // Arguments and auxiliary states, in visiting order.
  std::vector<std::string> ListInputs() const;

  // ---- Attributes of the output node (variables: "__shape__",
  // "__lr_mult__", "__wd_mult__"; anything else is kept as given; an
  // operator's are all hidden keys, "__key__"). GetAttr finds a key as
  // given or hidden: "lr_mult" finds "__lr_mult__", as MXNet's attr().
  std::optional<std::string> GetAttr(const std::string& key) const;
  // Attributes of every node, as "node$key" -> value.
  std::map<std::string, std::string> ListAttrs() const;

  // ---- Shape inference. Shapes of arguments may be given by name
  // (partially known shapes allowed: 0 is an unknown dimension). On success
  // the vectors follow ListArguments / ListOutputs / ListAuxiliaryStates;
  // shapes that cannot be inferred are left with ndim() == 0 unless
  // `require_complete`, which makes that an error naming them. An
  // inconsistency is kInvalidArgument naming the operator node, the input
  // and both shapes.
  struct Shapes {
    std::vector<Shape> arguments, outputs, aux_states;
  };
  absl::StatusOr<Shapes> InferShape(
      const std::map<std::string, Shape>& known,
      bool require_complete = false) const;

  // ---- Serialization.

  // The MXNet 1.x symbol JSON ("nodes", "arg_nodes", "node_row_ptr",
  // "heads", "attrs"; operator parameters under "attrs").
  std::string ToJSON() const;
  // Reads the 1.x format and the 0.8-era one ("param" and "attr" per node).
  static absl::StatusOr<Symbol> FromJSON(const std::string& json);
  absl::Status Save(const std::string& path) const;
  static absl::StatusOr<Symbol> Load(const std::string& path);

  // The debug print of the seed: "Symbol Outputs:", then every node in
  // topological order ("Variable:x" or "Op:..., Name=..." with Inputs and
  // Attrs).
  std::string DebugString() const;
  // Graphviz DOT text; edges carry shapes when `shapes` lets them be
  // inferred.
  std::string ToGraphviz(const std::map<std::string, Shape>& shapes = {}) const;

  // ---- For the executor.
  const std::vector<graph::NodeEntry>& outputs() const { return outputs_; }
  explicit Symbol(std::vector<graph::NodeEntry> outputs)
      : outputs_(std::move(outputs)) {}

 private:
  std::vector<graph::NodeEntry> outputs_;
};

using VariableAttrs = std::map<std::string, std::string>;

// A placeholder. Keys "shape", "lr_mult", "wd_mult", "init", "dtype" and
// "ctx_group" are stored as MXNet stores them ("__shape__", ...); other keys
// as given. It also gets the current AttrScope's attributes.
Symbol Variable(const std::string& name, const VariableAttrs& attrs = {});

// Applies a registered operator. Positional inputs fill the operator's
// arguments in order, named ones fill the named argument; missing arguments
// other than required inputs become new variables. Besides the operator's
// parameters, `params` may hold user attributes: "lr_mult", "wd_mult",
// "ctx_group" (stored as "__lr_mult__", ...) and any "__key__". The node
// gets them and the current AttrScope's attributes, and so do the
// variables created for its missing arguments (as in MXNet: lr_mult on a
// layer applies to its weight and bias).
Symbol Op(const std::string& op, const SymbolInputs& inputs,
          const Params& params = {}, const std::string& name = "");

// Attributes for every Variable and Op created on this thread while the
// scope lives (MXNet's AttrScope), on top of the enclosing scope's; keys
// are stored as Variable stores them, and on operators as hidden keys
// ("stage" as "__stage__": an operator's plain keys are its parameters in
// MXNet's files). Placing a part of a graph on another
// device (Executor::Bind's group2ctx):
//
//   { mx::AttrScope stage({{"ctx_group", "stage2"}}); fc2 = mx::Op(...); }
class AttrScope {
 public:
  explicit AttrScope(const VariableAttrs& attrs);
  AttrScope(std::initializer_list<std::pair<std::string, std::string>> attrs)
      : AttrScope(VariableAttrs(attrs.begin(), attrs.end())) {}
  ~AttrScope();
  AttrScope(const AttrScope&) = delete;
  AttrScope& operator=(const AttrScope&) = delete;

 private:
  std::map<std::string, std::string> attrs_;
  const std::map<std::string, std::string>* previous_;
};

// Several symbols as one with all their outputs.
Symbol Group(const std::vector<Symbol>& symbols);

// Element-wise arithmetic (operators elemwise_add / _sub / _mul / _div, and
// their _scalar forms with scalar inputs).
Symbol operator+(const Symbol& a, const Symbol& b);
Symbol operator-(const Symbol& a, const Symbol& b);
Symbol operator*(const Symbol& a, const Symbol& b);
Symbol operator/(const Symbol& a, const Symbol& b);
Symbol operator+(const Symbol& a, float s);
Symbol operator-(const Symbol& a, float s);
Symbol operator*(const Symbol& a, float s);
Symbol operator/(const Symbol& a, float s);
Symbol operator+(float s, const Symbol& a);
Symbol operator-(float s, const Symbol& a);
Symbol operator*(float s, const Symbol& a);
Symbol operator/(float s, const Symbol& a);

// Automatic names. Each thread has a current manager; NameScope replaces it
// for its lifetime (tests use this for names that start from 0), and can
// prefix every automatic and explicit name.
class NameManager {
 public:
  // "<hint><n>" with n counting per hint from 0.
  std::string Next(const std::string& hint);
  std::string prefix;

 private:
  std::map<std::string, int> counters_;
};
NameManager& CurrentNameManager();

class NameScope {
 public:
  explicit NameScope(std::string prefix = "");
  ~NameScope();
  NameScope(const NameScope&) = delete;
  NameScope& operator=(const NameScope&) = delete;

 private:
  NameManager manager_;
  NameManager* previous_;
};

}  // namespace mx

#endif  // MX_GRAPH_SYMBOL_H_
