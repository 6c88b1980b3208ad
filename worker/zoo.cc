#include "worker/zoo.h"

#include "absl/strings/str_cat.h"

namespace mx::zoo {

Symbol Mlp(int num_classes) {
  Symbol net = Variable("data");
  net = Op("FullyConnected", {net}, {{"num_hidden", 128}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
  net = Op("FullyConnected", {net}, {{"num_hidden", 64}}, "fc2");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu2");
  net = Op("FullyConnected", {net}, {{"num_hidden", num_classes}}, "fc3");
  return Op("SoftmaxOutput", {net}, {}, "softmax");
}

Symbol LeNet(int num_classes) {
  const Params pool = {{"pool_type", "max"}, {"kernel", Shape{2, 2}}, {"stride", Shape{2, 2}}};
  Symbol net = Variable("data");
  net = Op("Convolution", {net}, {{"kernel", Shape{5, 5}}, {"num_filter", 20}}, "conv1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu1");
  net = Op("Pooling", {net}, pool, "pool1");
  net = Op("Convolution", {net}, {{"kernel", Shape{5, 5}}, {"num_filter", 50}}, "conv2");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu2");
  net = Op("Pooling", {net}, pool, "pool2");
  net = Op("Flatten", {net}, {}, "flatten");
  net = Op("FullyConnected", {net}, {{"num_hidden", 500}}, "fc1");
  net = Op("Activation", {net}, {{"act_type", "relu"}}, "relu3");
  net = Op("FullyConnected", {net}, {{"num_hidden", num_classes}}, "fc2");
  return Op("SoftmaxOutput", {net}, {}, "softmax");
}

namespace {

Symbol ConvBnRelu(const Symbol& in, int filters, const std::string& name, bool relu) {
  Symbol x = Op("Convolution", {in},
                {{"kernel", Shape{3, 3}}, {"pad", Shape{1, 1}}, {"num_filter", filters},
                 {"no_bias", true}},
                name + "_conv");
  x = Op("BatchNorm", {x}, {{"fix_gamma", false}}, name + "_bn");
  return relu ? Op("Activation", {x}, {{"act_type", "relu"}}, name + "_relu") : x;
}

}  // namespace

Symbol ResNet(int blocks, int num_classes) {
  Symbol net = ConvBnRelu(Variable("data"), 16, "stem", true);
  for (int b = 0; b < blocks; ++b) {
    const std::string name = absl::StrCat("block", b);
    Symbol branch = ConvBnRelu(net, 16, name + "a", true);
    branch = ConvBnRelu(branch, 16, name + "b", false);
    net = Op("Activation", {branch + net}, {{"act_type", "relu"}}, name + "_out");
  }
  net = Op("Pooling", {net}, {{"pool_type", "avg"}, {"global_pool", true}, {"kernel", Shape{1, 1}}},
           "global_pool");
  net = Op("Flatten", {net}, {}, "flatten");
  net = Op("FullyConnected", {net}, {{"num_hidden", num_classes}}, "fc");
  return Op("SoftmaxOutput", {net}, {}, "softmax");
}

Symbol Ctr(int64_t num_features, int embed_dim, bool sparse) {
  const Symbol data = Variable("data");
  const auto features = static_cast<int>(num_features);
  // A table: a variable FeedForward keeps in the KVStore, read row-sparse.
  auto embedding = [&](const std::string& name, int dim) {
    SymbolInputs inputs = {data};
    if (sparse) inputs.push_back(Variable(name + "_weight", {{"__storage_type__", "row_sparse"}}));
    return Op("Embedding", inputs,
              {{"input_dim", features}, {"output_dim", dim}, {"sparse_grad", sparse}}, name);
  };
  Symbol wide = embedding("wide_embed", 2);
  wide = Op("sum", {wide}, {{"axis", Shape{1}}}, "wide_sum");
  Symbol deep = embedding("deep_embed", embed_dim);
  deep = Op("Flatten", {deep}, {}, "deep_flatten");
  deep = Op("FullyConnected", {deep}, {{"num_hidden", 64}}, "deep_fc1");
  deep = Op("Activation", {deep}, {{"act_type", "relu"}}, "deep_relu1");
  deep = Op("FullyConnected", {deep}, {{"num_hidden", 2}}, "deep_fc2");
  return Op("SoftmaxOutput", {wide + deep}, {}, "softmax");
}

absl::StatusOr<Symbol> ByName(const std::string& name, int num_classes) {
  if (name == "mlp") return Mlp(num_classes);
  if (name == "lenet") return LeNet(num_classes);
  if (name == "resnet") return ResNet(2, num_classes);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown network '", name,
                   "' (built in: mlp, lenet, resnet; mx_train also ctr, or a symbol file)"));
}

}  // namespace mx::zoo
