// Embedding, as MXNet's: out[..., :] = weight[index, :] for every index in
// data (indices stored as floats, truncated to integers), with weight of
// shape (input_dim, output_dim) and out of shape data.shape + (output_dim,).
// Indices outside [0, input_dim) are clipped to the nearest row, as MXNet
// does (NaN reads row 0). The weight's gradient adds every output row's
// gradient into the row it read; the indices get none (a requested data
// gradient is zero).
//
// sparse_grad=True lets the executor bind the weight row-sparse
// (graph/executor.h): the weight blob then holds only the table rows
// ctx.rows names, each index is looked up among them (an index not there is
// an error: the caller did not pull that row), and the gradient is written
// to the same rows, never to a dense table. With a dense weight,
// sparse_grad changes nothing.
#include <cstdint>
#include <memory>
#include <vector>

#include "graph/ops/op_util.h"
#include "ndarray/launch.h"
#include "ndarray/nn_kernels.h"

namespace mx::ops {
namespace {

absl::Status Infer(const ParsedParams& p, ShapeList* in, ShapeList* out,
                   ShapeList*) {
  if (p.GetString("dtype") != "float32") {
    return absl::UnimplementedError(absl::StrCat(
        "dtype=", p.GetString("dtype"), " is not supported (only float32)"));
  }
  const int64_t input_dim = p.GetInt("input_dim");
  const int64_t output_dim = p.GetInt("output_dim");
  if (input_dim <= 0 || output_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input_dim (", input_dim, ") and output_dim (", output_dim,
        ") must be positive"));
  }
  MX_RETURN_IF_ERROR(MergeShape(in, 1, Shape{input_dim, output_dim}, "input weight"));
  const Shape& data = (*in)[0];
  if (data.ndim() == 0) return absl::OkStatus();
  Shape o = data;
  o.push_back(output_dim);
  return MergeShape(out, 0, o, "output");
}

// The positions of unique ids, found in constant time: open addressing
// (linear probing) in a power-of-two table at most half full. A binary
// search per index cost 15% of a click-through worker's time.
class IdPositions {
 public:
  explicit IdPositions(const std::vector<int64_t>& ids) {
    int bits = 4;
    while ((size_t{1} << bits) < 2 * ids.size()) ++bits;
    shift_ = 64 - bits;
    slots_.assign(size_t{1} << bits, Slot{-1, 0});
    for (size_t i = 0; i < ids.size(); ++i) {
      size_t h = Hash(ids[i]);
      while (slots_[h].id != -1) h = (h + 1) & (slots_.size() - 1);
      slots_[h] = Slot{ids[i], static_cast<int64_t>(i)};
    }
  }
  // The position of id, or -1.
  int64_t Find(int64_t id) const {
    for (size_t h = Hash(id);; h = (h + 1) & (slots_.size() - 1)) {
      if (slots_[h].id == id) return slots_[h].position;
      if (slots_[h].id == -1) return -1;
    }
  }

 private:
  struct Slot {
    int64_t id, position;
  };
  size_t Hash(int64_t id) const {
    return static_cast<size_t>((static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  int shift_;
  std::vector<Slot> slots_;
};

// For a row-sparse weight: each index's position among ctx.rows (as a
// float, Embedding's index type; positions are below the weight block's
// rows). Throws mx::Error naming the first index whose row is not there.
std::vector<float> Positions(const OpContext& ctx, const TBlob& data, int64_t input_dim) {
  const IdPositions positions(*ctx.rows);
  std::vector<float> pos(data.Size());
  for (int64_t i = 0; i < data.Size(); ++i) {
    const int64_t row = kernel::EmbeddingRow(data.data[i], input_dim);
    const int64_t at = positions.Find(row);
    if (at < 0) {
      throw Error(absl::InvalidArgumentError(absl::StrCat(
          "Embedding: index ", row, " (element ", i, " of the data) is not among the ",
          ctx.rows->size(), " rows of the row-sparse weight; pull the rows of every index of the "
          "batch (UniqueRowIds) before SetRowSparseArg")));
    }
    pos[i] = static_cast<float>(at);
  }
  return pos;
}

// The indices the kernels read and the rows they address: the data and the
// table, or positions among a row-sparse weight's rows and its block.
struct Lookup {
  std::shared_ptr<std::vector<float>> positions;  // row-sparse only
  const float* index;
  int64_t rows;
};

// Forward finds the positions and leaves them in ctx.row_positions, where
// the step's backward finds them.
Lookup LookupFor(const OpContext& ctx, const ParsedParams& p, const std::vector<TBlob>& in) {
  const int64_t input_dim = p.GetInt("input_dim");
  if (ctx.rows == nullptr) return Lookup{nullptr, in[0].data, input_dim};
  auto positions = ctx.row_positions != nullptr ? ctx.row_positions
                                                : std::make_shared<std::vector<float>>();
  if (positions->empty()) *positions = Positions(ctx, in[0], input_dim);
  return Lookup{positions, positions->data(), in[1].shape[0]};
}

void Forward(const OpContext& ctx, const ParsedParams& p,
             const std::vector<TBlob>& in, const std::vector<OpReq>& req,
             const std::vector<TBlob>& out, const std::vector<TBlob>&) {
  if (req[0] == OpReq::kNull) return;
  const Lookup l = LookupFor(ctx, p, in);
  kernel::Launch<kernel::EmbeddingKernel>(
      "Embedding", ctx.ctx, out[0].Size(),
      {out[0].data, l.index, in[1].data, l.rows, p.GetInt("output_dim"),
       req[0] == OpReq::kAdd});
}

void Backward(const OpContext& ctx, const ParsedParams& p,
              const std::vector<TBlob>& out_grad, const std::vector<TBlob>& in,
              const std::vector<TBlob>&, const std::vector<OpReq>& req,
              const std::vector<TBlob>& in_grad, const std::vector<TBlob>&) {
  if (req[0] == OpReq::kWrite) {
    kernel::Launch<kernel::FillKernel>("Embedding", ctx.ctx, in[0].Size(), {in_grad[0].data, 0.0f});
  }
  if (req[1] == OpReq::kNull) return;
  if (req[1] == OpReq::kWrite) {
    kernel::Launch<kernel::FillKernel>("Embedding", ctx.ctx, in_grad[1].Size(),
                                       {in_grad[1].data, 0.0f});
  }
  const int64_t dim = p.GetInt("output_dim");
  const Lookup l = LookupFor(ctx, p, in);
  kernel::Launch<kernel::EmbeddingGradKernel>(
      "Embedding", ctx.ctx, dim,
      {in_grad[1].data, l.index, out_grad[0].data, in[0].Size(), l.rows, dim});
}

OpDef Make() {
  OpDef op;
  op.name = "Embedding";
  op.params = {{"input_dim", ParamSpec::Type::kInt, "", true},
               {"output_dim", ParamSpec::Type::kInt, "", true},
               {"dtype", ParamSpec::Type::kString, "float32", false,
                {"float16", "float32", "float64", "uint8", "int8", "int32", "int64"}},
               {"sparse_grad", ParamSpec::Type::kBool, "False"}};
  op.arguments = Names({"data", "weight"});
  op.infer_shape = Infer;
  op.forward = Forward;
  op.backward = Backward;
  op.backward_uses_outputs = OpDef::OutputUse::kNone;
  op.gpu = true;
  return op;
}

MX_REGISTER_OP(Make());

}  // namespace
}  // namespace mx::ops
