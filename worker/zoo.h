// Built-in networks for the worker command line and the benchmarks. Each
// ends in SoftmaxOutput named "softmax" (label "softmax_label"); the image
// networks take "data" of shape (N, 1, 28, 28) or (N, 784).
#ifndef MX_WORKER_ZOO_H_
#define MX_WORKER_ZOO_H_

#include <cstdint>
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

// A click-through model over categorical features whose indices lie in
// [0, num_features) ("data" of shape (N, fields), as LibSvmIter gives
// them): wide (an Embedding of 2 per feature, summed over
// the fields: logistic regression) and deep (an Embedding of `embed_dim`
// per feature, flattened, fc 64 relu, fc 2), added, then SoftmaxOutput
// over (no click, click); its cross-entropy is the log-loss. `sparse`
// makes both embedding tables row-sparse (FeedForward keeps them in the
// KVStore and moves only the rows a batch touches).
Symbol Ctr(int64_t num_features, int embed_dim = 16, bool sparse = false);

// "mlp", "lenet" or "resnet"; anything else is kInvalidArgument.
absl::StatusOr<Symbol> ByName(const std::string& name, int num_classes = 10);

}  // namespace mx::zoo

#endif  // MX_WORKER_ZOO_H_
