// Built-in networks for the worker command line and the benchmarks. Each
// ends in SoftmaxOutput named "softmax" (label "softmax_label") and takes
// "data" of shape (N, 1, 28, 28) or (N, 784).
#ifndef MX_WORKER_ZOO_H_
#define MX_WORKER_ZOO_H_

#include <string>

#include "absl/status/statusor.h"
#include "graph/symbol.h"

namespace mx::zoo {

// 784-128(relu)-64(relu)-10.
Symbol Mlp(int num_classes = 10);
// conv 5x5x20, relu, max-pool 2, conv 5x5x50, relu, max-pool 2, fc 500,
// relu, fc num_classes.
Symbol LeNet(int num_classes = 10);
// A small residual network: a 3x3x16 stem, `blocks` residual blocks (two
// 3x3 convolutions with BatchNorm, identity shortcut), global average
// pooling and a classifier.
Symbol ResNet(int blocks = 2, int num_classes = 10);

// "mlp", "lenet" or "resnet"; anything else is kInvalidArgument.
absl::StatusOr<Symbol> ByName(const std::string& name, int num_classes = 10);

}  // namespace mx::zoo

#endif  // MX_WORKER_ZOO_H_
