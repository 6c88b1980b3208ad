// 2-D convolution on the CPU through oneDNN (Debian's libdnnl), for
// graph/ops/convolution.cc.
//
// Why: oneDNN generates direct-convolution kernels at run time for the
// CPU's widest vectors and works in a layout blocked by 16 channels. On the
// zoo ResNet's 3x3x16 layers (batch 100, 28x28, 2 threads) forward plus
// backward took 3.5 ms, against 11.1 ms for mx's im2col + OpenBLAS products;
// it is also what MXNet's and PyTorch's CPU convolutions use.
//
// Layouts: where the input channels and the filters are multiples of 16,
// the primitives work in the blocked layout; where only the filters are
// (a first layer on 1 or 3 channels), forward reads x plain and writes y
// blocked. Otherwise blocks would be padded with zeros that are computed
// on (LeNet's 5x5x50 layer on 20 channels: 6.9 ms through the blocked
// kernels against 6.6 ms on im2col), so the primitives take mx's plain
// layouts as they are, which oneDNN runs as its own products, without
// reorders.
//
// Each call covers s.n images on the calling thread alone (oneDNN's own
// OpenMP threading is set to one thread on it): the operator splits a
// batch over the CPU pool in chunks of images, as it does for im2col, so
// the results do not depend on timing. The caller holds weights and
// gradients in mx's plain layout (OIHW), and x (dx) and y (dy) in NCHW or
// blocked (graph/op.h's TBlob::blocked; `Layouts`). Each call reorders
// what a primitive wants in another layout into it, and back for what it
// writes, in `scratch`: nothing for x and y where the executor chose the
// layouts the forward primitive wants (WorksBlocked).
//
// Primitives are created once per shape and kept for the process (a few
// per distinct layer and batch size).
#ifndef MX_GRAPH_OPS_DNNL_CONV_H_
#define MX_GRAPH_OPS_DNNL_CONV_H_

#include <cstdint>

#include "ndarray/dnn.h"

namespace mx::ops::dnnl_conv {

// The primitives of convolutions of shape s (s.n images per call), with a
// bias or without, made on first use and kept.
struct Primitives;

// Which operands the caller holds in the blocked layout: x (and dx), and
// y (and dy).
struct Layouts {
  bool x = false, y = false;
};

// The primitives of shape s, or null where oneDNN does not run it: what it
// cannot express (more than one group, negative right padding), shapes it
// has only its reference loops for on this CPU, or primitives it fails to
// create.
const Primitives* Find(const kernel::ConvShape& s, bool bias, Layouts layouts = {});

// Which of x and y p's forward primitive works on in the blocked layout:
// where callers hold them so, forward converts nothing (backward may, where
// its primitives want other layouts: backward data of a first layer).
Layouts WorksBlocked(const Primitives& p);

// Floats of scratch one Forward or Backward call with p needs. Scratch
// needs no alignment beyond float's.
int64_t ScratchFloats(const Primitives& p);

// y = conv(x, w) (+ b[f] on filter f when p has a bias), written, for the
// s.n images of p's shape: x (s.n, c, h, w), w (k, c, kh, kw), y (s.n, k,
// oh, ow).
void Forward(const Primitives& p, const float* x, const float* w, const float* b, float* y,
             float* scratch);

// The gradients of the s.n images of p's shape, each computed when not
// null: dx (as x) from dy and w, written or, with add_dx, added to; dw (as
// w) and db (k, when p has a bias) from x and dy, written.
void Backward(const Primitives& p, const float* x, const float* w, const float* dy, float* dx,
              bool add_dx, float* dw, float* db, float* scratch);

}  // namespace mx::ops::dnnl_conv

#endif  // MX_GRAPH_OPS_DNNL_CONV_H_
