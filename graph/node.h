// Internal: graph nodes shared by Symbol and Executor.
#ifndef MX_GRAPH_NODE_H_
#define MX_GRAPH_NODE_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "graph/op.h"
#include "graph/symbol.h"

namespace mx::graph {

struct Node {
  const OpDef* op = nullptr;  // null for a variable
  std::string name;
  // Operator parameters as given (defaults are not stored, as in MXNet).
  std::map<std::string, std::string> params;
  ParsedParams parsed;
  // User attributes ("__shape__", "__lr_mult__", ...).
  std::map<std::string, std::string> attrs;
  // The operator's arguments, then its auxiliary states.
  std::vector<NodeEntry> inputs;

  // Releases the inputs a chain at a time, not recursively: freeing a
  // graph some 100,000 nodes deep (a symbol file's) overflowed the stack.
  ~Node();

  bool is_variable() const { return op == nullptr; }
  int num_arguments() const;
  int num_outputs() const;          // all, hidden ones included
  int num_visible_outputs() const;
  std::vector<std::string> output_names() const;
};

// Every node reachable from `outputs`, inputs before consumers (depth-first
// post-order, inputs in order): the order of listings and execution.
std::vector<Node*> TopoSort(const std::vector<NodeEntry>& outputs);

// Every output of every node reachable from `heads`, hidden outputs
// included, in TopoSort order, with owning pointers.
std::vector<NodeEntry> AllOutputs(const std::vector<NodeEntry>& heads);

// Variables used as auxiliary states (mutated inputs) by some operator.
std::vector<Node*> AuxVariables(const std::vector<Node*>& order);

}  // namespace mx::graph

#endif  // MX_GRAPH_NODE_H_
