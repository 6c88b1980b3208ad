// Cases for Convolution and Pooling (NCHW), with direct-loop references.
// The LeNet-shaped cases (batch 100) are the ones the benchmark against
// PyTorch times.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "tests/graph/op_harness.h"

namespace mx::testing {
namespace {

// ---- Convolution.

struct ConvSpec {
  Shape data;  // (N, C, H, W)
  int64_t filters;
  int64_t kernel[2];
  int64_t stride[2] = {1, 1};
  int64_t pad[2] = {0, 0};
  int64_t dilate[2] = {1, 1};
  int64_t groups = 1;
  bool no_bias = false;

  int64_t Out(int d) const {
    return (data[2 + d] + 2 * pad[d] - dilate[d] * (kernel[d] - 1) - 1) / stride[d] + 1;
  }
};

HostArrays ConvReference(const ConvSpec& s, const HostArrays& in) {
  const int64_t n_img = s.data[0], chans = s.data[1], h = s.data[2], w = s.data[3];
  const int64_t oh = s.Out(0), ow = s.Out(1);
  const int64_t group_chans = chans / s.groups, group_filters = s.filters / s.groups;
  const Shape out_shape{n_img, s.filters, oh, ow};
  std::vector<float> out(out_shape.Size());
  for (int64_t n = 0; n < n_img; ++n) {
    for (int64_t f = 0; f < s.filters; ++f) {
      const int64_t g = f / group_filters;
      for (int64_t oy = 0; oy < oh; ++oy) {
        for (int64_t ox = 0; ox < ow; ++ox) {
          double acc = s.no_bias ? 0.0 : in[2][f];
          for (int64_t c = 0; c < group_chans; ++c) {
            for (int64_t ky = 0; ky < s.kernel[0]; ++ky) {
              const int64_t iy = oy * s.stride[0] - s.pad[0] + ky * s.dilate[0];
              if (iy < 0 || iy >= h) continue;
              for (int64_t kx = 0; kx < s.kernel[1]; ++kx) {
                const int64_t ix = ox * s.stride[1] - s.pad[1] + kx * s.dilate[1];
                if (ix < 0 || ix >= w) continue;
                const float x = in[0][Offset4(s.data, n, g * group_chans + c, iy, ix)];
                const float k =
                    in[1][((f * group_chans + c) * s.kernel[0] + ky) * s.kernel[1] + kx];
                acc += double(x) * k;
              }
            }
          }
          out[Offset4(out_shape, n, f, oy, ox)] = static_cast<float>(acc);
        }
      }
    }
  }
  return {out};
}

Shape Pair(const int64_t v[2]) { return Shape{v[0], v[1]}; }

// With give_defaults, the spec's stride, pad, dilate, num_group and no_bias
// are passed even at their default values; without, they are left out (and
// the spec must hold the defaults). `extra` parameters come on top.
OpCase Conv(const char* name, ConvSpec s, Params extra = {}, bool give_defaults = true) {
  OpCase c;
  c.name = name;
  c.op = "Convolution";
  c.params = {{"kernel", Pair(s.kernel)}, {"num_filter", s.filters}};
  if (give_defaults) {
    c.params.insert(c.params.end(), {{"stride", Pair(s.stride)},
                                     {"pad", Pair(s.pad)},
                                     {"dilate", Pair(s.dilate)},
                                     {"num_group", s.groups},
                                     {"no_bias", s.no_bias}});
  }
  c.params.insert(c.params.end(), extra.begin(), extra.end());
  c.inputs = {s.data, Shape{s.filters, s.data[1] / s.groups, s.kernel[0], s.kernel[1]}};
  if (!s.no_bias) c.inputs.push_back(Shape{s.filters});
  c.reference = [s](const HostArrays& in, const HostArrays&) { return ConvReference(s, in); };
  return c;
}

MX_OP_CASE(Conv("Convolution", {.data = {2, 3, 7, 6}, .filters = 4, .kernel = {3, 3}}, {},
                false));
MX_OP_CASE(Conv("Convolution_stride_pad_rect_no_bias",
                {.data = {2, 2, 7, 8}, .filters = 3, .kernel = {3, 2}, .stride = {2, 3},
                 .pad = {1, 2}, .no_bias = true}));
MX_OP_CASE(Conv("Convolution_dilate",
                {.data = {1, 2, 9, 9}, .filters = 2, .kernel = {3, 3}, .pad = {2, 1},
                 .dilate = {2, 3}}));
MX_OP_CASE(Conv("Convolution_groups",
                {.data = {2, 4, 5, 5}, .filters = 6, .kernel = {3, 3}, .pad = {1, 1},
                 .groups = 2}));
// "Same" convolutions with stride 1 (output rows as long as input rows):
// im2col and its adjoint move each kernel offset's rows as one block.
MX_OP_CASE(Conv("Convolution_same_rect",
                {.data = {2, 2, 6, 7}, .filters = 3, .kernel = {3, 5}, .pad = {1, 2}}));
MX_OP_CASE(Conv("Convolution_same_dilate",
                {.data = {2, 3, 7, 6}, .filters = 2, .kernel = {3, 3}, .pad = {2, 2},
                 .dilate = {2, 2}}));
MX_OP_CASE(Conv("Convolution_1x1", {.data = {3, 5, 4, 4}, .filters = 2, .kernel = {1, 1}}));
// workspace=0 MB: one image per chunk (products straight into the output).
MX_OP_CASE(Conv("Convolution_image_by_image",
                {.data = {3, 2, 6, 6}, .filters = 3, .kernel = {3, 3}, .stride = {2, 1},
                 .pad = {1, 0}},
                {{"workspace", 0}, {"cudnn_tune", "off"}, {"layout", "NCHW"}}));
// 8x8 outputs give chunks of 4 images: 7 images make a full chunk and a
// partial one, run as two tasks on the CPU pool.
MX_OP_CASE(Conv("Convolution_partial_chunk",
                {.data = {7, 3, 10, 10}, .filters = 4, .kernel = {3, 3}}));
// LeNet: conv 5x5x20 on 1x28x28, then 5x5x50 on 20x12x12, batch 100 (the
// second takes 25 im2col chunks, in several tasks whose weight and bias
// gradients add up: 9 on 2 cores).
MX_OP_CASE(Conv("Convolution_lenet_conv1", {.data = {100, 1, 28, 28}, .filters = 20,
                                            .kernel = {5, 5}}, {}, false));
MX_OP_CASE(Conv("Convolution_lenet_conv2", {.data = {100, 20, 12, 12}, .filters = 50,
                                            .kernel = {5, 5}}, {}, false));
// 16 channels or more run through oneDNN (graph/ops/dnnl_conv.h; LeNet's
// 20-channel layer above in plain layouts, these blocked), in chunks of
// images on the pool: the zoo ResNet's 3x3 layer on a batch of 11 (on 2
// threads, 8 chunks at most: 5 of 2 images and one of 1), then strides,
// padding, a rectangular kernel, dilation and no bias; with stride 2 on an
// even input, the output size rounds down and the bottom and right need
// less padding than the top and left.
MX_OP_CASE(Conv("Convolution_dnnl_resnet_3x3",
                {.data = {11, 16, 8, 8}, .filters = 16, .kernel = {3, 3}, .pad = {1, 1}}));
MX_OP_CASE(Conv("Convolution_dnnl_stride_pad_rect_no_bias",
                {.data = {3, 32, 9, 10}, .filters = 16, .kernel = {3, 2}, .stride = {2, 3},
                 .pad = {1, 2}, .no_bias = true}));
MX_OP_CASE(Conv("Convolution_dnnl_dilate",
                {.data = {2, 16, 9, 9}, .filters = 16, .kernel = {3, 3}, .pad = {2, 1},
                 .dilate = {2, 3}}));
MX_OP_CASE(Conv("Convolution_dnnl_one_image",
                {.data = {1, 16, 5, 5}, .filters = 16, .kernel = {3, 3}, .pad = {1, 1}}));
MX_OP_CASE(Conv("Convolution_dnnl_stride2_even",
                {.data = {3, 16, 8, 8}, .filters = 32, .kernel = {3, 3}, .stride = {2, 2},
                 .pad = {1, 1}}));
// Stride 3 on 10 rows leaves the last row out: oneDNN would need negative
// bottom and right padding, so this layer stays on im2col.
MX_OP_CASE(Conv("Convolution_dnnl_refused_negative_padding",
                {.data = {2, 16, 10, 10}, .filters = 16, .kernel = {3, 3}, .stride = {3, 3}}));
// Plain layouts with strides and no bias; groups stay on im2col.
MX_OP_CASE(Conv("Convolution_dnnl_plain_stride_no_bias",
                {.data = {3, 20, 9, 10}, .filters = 6, .kernel = {3, 2}, .stride = {2, 3},
                 .pad = {1, 2}, .no_bias = true}));
MX_OP_CASE(Conv("Convolution_groups_wide",
                {.data = {2, 32, 5, 5}, .filters = 4, .kernel = {3, 3}, .pad = {1, 1},
                 .groups = 2}));

// ---- Pooling.

struct PoolSpec {
  Shape data;
  const char* type;
  int64_t kernel[2] = {0, 0};  // (0, 0): global pooling
  int64_t stride[2] = {1, 1};
  int64_t pad[2] = {0, 0};
  bool full = false;
  bool count_include_pad = true;

  bool global() const { return kernel[0] == 0; }
  int64_t Out(int d) const {
    if (global()) return 1;
    const int64_t span = data[2 + d] + 2 * pad[d] - kernel[d];
    return 1 + (full ? (span + stride[d] - 1) / stride[d] : span / stride[d]);
  }
};

HostArrays PoolReference(const PoolSpec& s, const HostArrays& in) {
  const int64_t h = s.data[2], w = s.data[3];
  const int64_t kh = s.global() ? h : s.kernel[0], kw = s.global() ? w : s.kernel[1];
  const int64_t oh = s.Out(0), ow = s.Out(1);
  const Shape out_shape{s.data[0], s.data[1], oh, ow};
  std::vector<float> out(out_shape.Size());
  for (int64_t n = 0; n < s.data[0]; ++n) {
    for (int64_t c = 0; c < s.data[1]; ++c) {
      for (int64_t oy = 0; oy < oh; ++oy) {
        for (int64_t ox = 0; ox < ow; ++ox) {
          double sum = 0, max = -std::numeric_limits<double>::infinity();
          int64_t real = 0, padded = 0;
          for (int64_t ky = 0; ky < kh; ++ky) {
            for (int64_t kx = 0; kx < kw; ++kx) {
              const int64_t iy = oy * s.stride[0] - s.pad[0] + ky;
              const int64_t ix = ox * s.stride[1] - s.pad[1] + kx;
              // The padded area counts for avg; beyond it nothing does.
              if (iy < h + s.pad[0] && ix < w + s.pad[1]) ++padded;
              if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
              const float v = in[0][Offset4(s.data, n, c, iy, ix)];
              sum += v;
              max = std::max<double>(max, v);
              ++real;
            }
          }
          double v = sum;
          if (std::string(s.type) == "max") v = max;
          if (std::string(s.type) == "avg") v = sum / (s.count_include_pad ? padded : real);
          out[Offset4(out_shape, n, c, oy, ox)] = static_cast<float>(v);
        }
      }
    }
  }
  return {out};
}

OpCase Pool(const char* name, PoolSpec s) {
  OpCase c;
  c.name = name;
  c.op = "Pooling";
  c.params = {{"pool_type", s.type}};
  if (s.global()) {
    c.params.push_back({"global_pool", true});
  } else {
    c.params.insert(c.params.end(), {{"kernel", Pair(s.kernel)},
                                     {"stride", Pair(s.stride)},
                                     {"pad", Pair(s.pad)}});
  }
  if (s.full) c.params.push_back({"pooling_convention", "full"});
  if (!s.count_include_pad) c.params.push_back({"count_include_pad", false});
  c.inputs = {s.data};
  if (std::string(s.type) == "max") {
    // Values at least 0.05 apart inside any window of up to 3x3 on rows of
    // up to 28 (finite differences must not swap the maximum).
    c.init = [](int, std::vector<float>* v) {
      for (size_t i = 0; i < v->size(); ++i) (*v)[i] = 0.05f * ((i * 7) % 41) - 1.0f;
    };
  }
  c.reference = [s](const HostArrays& in, const HostArrays&) { return PoolReference(s, in); };
  return c;
}

MX_OP_CASE(Pool("Pooling_max", {.data = {2, 3, 6, 6}, .type = "max", .kernel = {2, 2},
                                .stride = {2, 2}}));
MX_OP_CASE(Pool("Pooling_max_overlap_pad", {.data = {2, 2, 7, 7}, .type = "max",
                                            .kernel = {3, 3}, .stride = {2, 2},
                                            .pad = {1, 1}}));
MX_OP_CASE(Pool("Pooling_max_full", {.data = {2, 2, 8, 8}, .type = "max", .kernel = {3, 3},
                                     .stride = {2, 2}, .full = true}));
MX_OP_CASE(Pool("Pooling_avg_pad", {.data = {2, 2, 6, 5}, .type = "avg", .kernel = {3, 3},
                                    .stride = {2, 2}, .pad = {1, 1}}));
MX_OP_CASE(Pool("Pooling_avg_pad_exclude", {.data = {2, 2, 6, 5}, .type = "avg",
                                            .kernel = {3, 3}, .stride = {2, 2},
                                            .pad = {1, 1}, .count_include_pad = false}));
MX_OP_CASE(Pool("Pooling_avg_full_pad", {.data = {1, 2, 8, 8}, .type = "avg",
                                         .kernel = {3, 3}, .stride = {2, 2}, .pad = {1, 1},
                                         .full = true}));
MX_OP_CASE(Pool("Pooling_sum", {.data = {1, 3, 5, 5}, .type = "sum", .kernel = {2, 3},
                                .stride = {1, 2}}));
MX_OP_CASE(Pool("Pooling_global_max", {.data = {2, 3, 4, 5}, .type = "max"}));
MX_OP_CASE(Pool("Pooling_global_avg", {.data = {2, 3, 4, 5}, .type = "avg"}));
// LeNet's first pooling: max 2x2 stride 2 on the 20x24x24 maps, batch 100.
MX_OP_CASE(Pool("Pooling_lenet_pool1", {.data = {100, 20, 24, 24}, .type = "max",
                                        .kernel = {2, 2}, .stride = {2, 2}}));

}  // namespace
}  // namespace mx::testing
