#include "graph/ops/dnnl_conv.h"

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "ndarray/base.h"
#include "ndarray/nn_kernels.h"
#include "ndarray/parallel.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace mx::ops::dnnl_conv {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;

// Channels per block of oneDNN's blocked layouts (AVX-512's 16 floats).
constexpr int64_t kBlock = kernel::kChannelBlock;

// Scratch regions start on 64-byte boundaries (the vector width oneDNN's
// kernels load at).
constexpr int64_t kAlignFloats = 16;

int64_t RoundUp(int64_t floats) {
  return (floats + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
}

float* Aligned(float* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>((a + 63) & ~uintptr_t{63});
}

const dnnl::engine& Engine() {
  static const auto* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

memory::desc Plain(const memory::dims& dims, Tag tag) {
  return memory::desc(dims, memory::data_type::f32, tag);
}

// Primitives that take their scratchpad from the caller, so that threads
// can run one primitive at once, each with its own.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Floats that memory of layout d takes in scratch.
int64_t Floats(const memory::desc& d) {
  return RoundUp(static_cast<int64_t>(d.get_size() / sizeof(float)));
}

// How a primitive uses an operand: reads it, writes it, or writes it for
// the caller to have it either written or added to its own.
enum class Use { kRead, kWrite, kWriteOrAdd };

// One operand of a primitive: the caller's layout (`plain`: mx's row-major
// one, or the blocked one the caller chose) and the layout the primitive
// wants. When they differ (or the caller may want a sum), the
// primitive's copy lives in scratch at `at` (floats); `in` / `out` reorder
// between the two layouts and `add` adds the copy to the caller's.
struct Operand {
  memory::desc plain, want;
  int64_t at = 0;
  dnnl::reorder in, out, add;

  bool Same() const { return plain == want; }
};

// A reorder without scratch of its own (so that threads can share it),
// adding to its destination when `add`, or an exception when oneDNN has
// none.
dnnl::reorder MakeReorder(const memory::desc& from, const memory::desc& to, bool add = false) {
  dnnl::primitive_attr attr = UserScratchpad();
  if (add) {
    dnnl::post_ops sum;
    sum.append_sum(1.0f);
    attr.set_post_ops(sum);
  }
  dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, attr);
  if (pd.scratchpad_desc().get_size() != 0) {
    throw dnnl::error(dnnl_unimplemented, "reorder needs a scratchpad");
  }
  return dnnl::reorder(pd);
}

// Places the operand in scratch (advancing *floats) where `use` needs it.
Operand MakeOperand(const memory::desc& plain, const memory::desc& want, Use use, int64_t* floats) {
  Operand o{plain, want};
  if (o.Same() && use != Use::kWriteOrAdd) return o;
  o.at = *floats;
  *floats += Floats(want);
  if (use == Use::kRead) o.in = MakeReorder(plain, want);
  if (use != Use::kRead && !o.Same()) o.out = MakeReorder(want, plain);
  if (use == Use::kWriteOrAdd) o.add = MakeReorder(want, plain, true);
  return o;
}

// The memory the primitive uses for o, whose caller's data is at p: p
// itself, or o's place in scratch, filled from p when `read`. With `add`
// (a kWriteOrAdd operand the caller wants added to), always the place.
memory Bind(const Operand& o, const float* p, float* scratch, bool read, bool add = false) {
  memory user(o.plain, Engine(), const_cast<float*>(p));
  if (o.Same() && !add) return user;
  memory m(o.want, Engine(), scratch + o.at);
  if (read) o.in.execute(Stream(), user, m);
  return m;
}

// Writes (or with `add`, adds) what the primitive wrote into m to the
// caller's p.
void WriteBack(const Operand& o, memory m, float* p, bool add = false) {
  memory user(o.plain, Engine(), p);
  if (add) {
    o.add.execute(Stream(), m, user);
  } else if (!o.Same()) {
    o.out.execute(Stream(), m, user);
  }
}

// oneDNN's scratchpad for a primitive: its layout and place in scratch.
struct Region {
  memory::desc desc;
  int64_t at = 0;
};

memory Scratchpad(const Region& r, float* scratch) {
  return memory(r.desc, Engine(), scratch + r.at);
}

}  // namespace

// Everything one shape needs: the three primitives, their operands, and
// where each call's copies and oneDNN's scratchpad lie in the scratch.
struct Primitives {
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights backward_weights;
  memory::desc bias;  // plain, (k); zero when there is none
  // Forward: x, w in; y out.
  Operand f_x, f_w, f_y;
  Region f_pad;  // oneDNN's scratchpad
  // Backward data: dy, w in; dx out. Backward weights: x, dy in; dw out.
  Operand d_dy, d_w, d_dx, w_x, w_dy, w_dw;
  Region d_pad, w_pad;
  // Where a gradient the caller does not want goes (backward weights
  // computes dw and db together).
  int64_t spare_dw = 0, spare_db = 0;
  int64_t floats = 0;  // the larger of forward's and backward's scratch
  Layouts blocked;     // what the primitives work on blocked: x and dx, y and dy

  bool HasBias() const { return !bias.is_zero(); }
};

namespace {

// oneDNN falls back to plain loops ("ref:any") where it has no kernel for
// the CPU or shape; mx's im2col is far faster than those.
void RefuseReference(const char* implementation) {
  if (absl::StrContains(implementation, "ref")) {
    throw dnnl::error(dnnl_unimplemented, implementation);
  }
}

// Creates the primitives of s, or throws dnnl::error.
std::unique_ptr<Primitives> Create(const kernel::ConvShape& s, bool bias, Layouts layouts) {
  OneOpenMpThread one_thread;  // mx divides the batch over its own pool
  const memory::dims x_dims{s.n, s.c, s.h, s.w}, w_dims{s.k, s.c, s.kh, s.kw},
      y_dims{s.n, s.k, s.oh, s.ow}, strides{s.stride[0], s.stride[1]},
      dilates{s.dilate[0] - 1, s.dilate[1] - 1}, pad_l{s.pad[0], s.pad[1]};
  // oneDNN states the padding on each side; MXNet's output size rounds
  // down, so the right (bottom) side may need less than the left (top).
  memory::dims pad_r(2);
  const int64_t in[2] = {s.h, s.w}, out[2] = {s.oh, s.ow}, kernel[2] = {s.kh, s.kw};
  for (int d = 0; d < 2; ++d) {
    pad_r[d] = (out[d] - 1) * s.stride[d] + (kernel[d] - 1) * s.dilate[d] + 1 - in[d] - s.pad[d];
    if (pad_r[d] < 0) throw dnnl::error(dnnl_unimplemented, "negative right padding");
  }
  auto p = std::make_unique<Primitives>();
  // The primitives choose their layouts (blocked) only where the channels
  // and filters fill whole blocks (see the header); or, for y alone, where
  // the filters do (a first layer on 1 or 3 channels, for which oneDNN has
  // kernels that read x plain and write y blocked).
  const bool block_y = s.k % kBlock == 0, block_x = block_y && s.c % kBlock == 0;
  const memory::desc any_x(x_dims, memory::data_type::f32, block_x ? Tag::any : Tag::nchw),
      any_w(w_dims, memory::data_type::f32, block_y ? Tag::any : Tag::oihw),
      any_y(y_dims, memory::data_type::f32, block_y ? Tag::any : Tag::nchw);
  // The caller's layouts.
  const memory::desc x = Plain(x_dims, layouts.x ? Tag::aBcd16b : Tag::nchw),
                     w = Plain(w_dims, Tag::oihw),
                     y = Plain(y_dims, layouts.y ? Tag::aBcd16b : Tag::nchw);
  if (bias) p->bias = Plain({s.k}, Tag::x);
  const dnnl::primitive_attr attr = UserScratchpad();
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fpd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algo, any_x, any_w,
                                      p->bias, any_y, strides, dilates, pad_l, pad_r),
      attr, Engine());
  dnnl::convolution_backward_data::primitive_desc dpd(
      dnnl::convolution_backward_data::desc(algo, any_x, any_w, any_y, strides, dilates, pad_l,
                                            pad_r),
      attr, Engine(), fpd);
  dnnl::convolution_backward_weights::primitive_desc wpd(
      dnnl::convolution_backward_weights::desc(algo, any_x, any_w, p->bias, any_y, strides, dilates,
                                               pad_l, pad_r),
      attr, Engine(), fpd);
  RefuseReference(fpd.impl_info_str());
  RefuseReference(dpd.impl_info_str());
  RefuseReference(wpd.impl_info_str());
  const memory::desc bx = Plain(x_dims, Tag::aBcd16b), by = Plain(y_dims, Tag::aBcd16b);
  p->blocked.x = fpd.src_desc() == bx;
  p->blocked.y = fpd.dst_desc() == by;
  p->forward = dnnl::convolution_forward(fpd);
  p->backward_data = dnnl::convolution_backward_data(dpd);
  p->backward_weights = dnnl::convolution_backward_weights(wpd);

  int64_t f = 0;
  p->f_x = MakeOperand(x, fpd.src_desc(), Use::kRead, &f);
  p->f_w = MakeOperand(w, fpd.weights_desc(), Use::kRead, &f);
  p->f_y = MakeOperand(y, fpd.dst_desc(), Use::kWrite, &f);
  p->f_pad = {fpd.scratchpad_desc(), f};
  f += Floats(fpd.scratchpad_desc());

  int64_t b = 0;
  p->d_dy = MakeOperand(y, dpd.diff_dst_desc(), Use::kRead, &b);
  p->d_w = MakeOperand(w, dpd.weights_desc(), Use::kRead, &b);
  p->d_dx = MakeOperand(x, dpd.diff_src_desc(), Use::kWriteOrAdd, &b);
  p->w_x = MakeOperand(x, wpd.src_desc(), Use::kRead, &b);
  p->w_dy = MakeOperand(y, wpd.diff_dst_desc(), Use::kRead, &b);
  p->w_dw = MakeOperand(w, wpd.diff_weights_desc(), Use::kWrite, &b);
  if (bias && (fpd.bias_desc() != p->bias || wpd.diff_bias_desc() != p->bias)) {
    throw dnnl::error(dnnl_unimplemented, "blocked bias gradient");
  }
  p->spare_dw = b;
  b += RoundUp(s.k * s.c * s.kh * s.kw);
  p->spare_db = b;
  b += RoundUp(s.k);
  // Backward data and backward weights run one after the other and share
  // the place of their scratchpads.
  p->d_pad = {dpd.scratchpad_desc(), b};
  p->w_pad = {wpd.scratchpad_desc(), b};
  b += std::max(Floats(dpd.scratchpad_desc()), Floats(wpd.scratchpad_desc()));
  p->floats = std::max(f, b) + kAlignFloats;  // room to align the start
  return p;
}

std::string Key(const kernel::ConvShape& s, bool bias, Layouts layouts) {
  return absl::StrCat(s.n, ",", s.c, ",", s.h, ",", s.w, ",", s.k, ",", s.kh, ",", s.kw, ",",
                      s.pad[0], ",", s.pad[1], ",", s.stride[0], ",", s.stride[1], ",", s.dilate[0],
                      ",", s.dilate[1], ",", s.groups, ",", s.oh, ",", s.ow, ",", bias, ",",
                      layouts.x, ",", layouts.y);
}

// Runs fn, turning oneDNN's exceptions into mx's.
template <typename Fn>
void Run(const char* what, Fn fn) {
  try {
    OneOpenMpThread one_thread;  // mx divides the batch over its own pool
    fn();
  } catch (const dnnl::error& e) {
    throw Error(absl::InternalError(absl::StrCat("oneDNN convolution ", what, ": ", e.what())));
  }
}

}  // namespace

const Primitives* Find(const kernel::ConvShape& s, bool bias, Layouts layouts) {
  static absl::Mutex mu;
  static auto* cache = new absl::flat_hash_map<std::string, std::unique_ptr<Primitives>>;
  const std::string key = Key(s, bias, layouts);
  absl::MutexLock lock(&mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second.get();
  std::unique_ptr<Primitives> p;
  if (s.groups == 1) {
    try {
      p = Create(s, bias, layouts);
    } catch (const dnnl::error&) {
      p = nullptr;  // the operator keeps its own kernels for this shape
    }
  }
  return cache->emplace(key, std::move(p)).first->second.get();
}

int64_t ScratchFloats(const Primitives& p) { return p.floats; }

Layouts WorksBlocked(const Primitives& p) { return p.blocked; }

void Forward(const Primitives& p, const float* x, const float* w, const float* b, float* y,
             float* scratch) {
  Run("forward", [&] {
    float* base = Aligned(scratch);
    const memory mx = Bind(p.f_x, x, base, true), mw = Bind(p.f_w, w, base, true),
                 my = Bind(p.f_y, y, base, false);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, mx},
                                         {DNNL_ARG_WEIGHTS, mw},
                                         {DNNL_ARG_DST, my},
                                         {DNNL_ARG_SCRATCHPAD, Scratchpad(p.f_pad, base)}};
    if (p.HasBias()) args.emplace(DNNL_ARG_BIAS, memory(p.bias, Engine(), const_cast<float*>(b)));
    p.forward.execute(Stream(), args);
    WriteBack(p.f_y, my, y);
  });
}

void Backward(const Primitives& p, const float* x, const float* w, const float* dy, float* dx,
              bool add_dx, float* dw, float* db, float* scratch) {
  Run("backward", [&] {
    float* base = Aligned(scratch);
    memory d_dy;  // dy in backward data's layout, kept for backward weights
    if (dx != nullptr) {
      d_dy = Bind(p.d_dy, dy, base, true);
      const memory mw = Bind(p.d_w, w, base, true), mdx = Bind(p.d_dx, dx, base, false, add_dx);
      p.backward_data.execute(Stream(), {{DNNL_ARG_DIFF_DST, d_dy},
                                         {DNNL_ARG_WEIGHTS, mw},
                                         {DNNL_ARG_DIFF_SRC, mdx},
                                         {DNNL_ARG_SCRATCHPAD, Scratchpad(p.d_pad, base)}});
      WriteBack(p.d_dx, mdx, dx, add_dx);
    }
    if (dw == nullptr && db == nullptr) return;
    const bool reuse_dy = dx != nullptr && p.w_dy.want == p.d_dy.want;
    const memory mx = Bind(p.w_x, x, base, true),
                 w_dy = reuse_dy ? d_dy : Bind(p.w_dy, dy, base, true);
    // Without a destination of the caller's, a gradient lands in scratch.
    float* dw_to = dw != nullptr ? dw : base + p.spare_dw;
    const memory mdw = Bind(p.w_dw, dw_to, base, false);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, mx},
                                         {DNNL_ARG_DIFF_DST, w_dy},
                                         {DNNL_ARG_DIFF_WEIGHTS, mdw},
                                         {DNNL_ARG_SCRATCHPAD, Scratchpad(p.w_pad, base)}};
    if (p.HasBias()) {
      args.emplace(DNNL_ARG_DIFF_BIAS,
                   memory(p.bias, Engine(), db != nullptr ? db : base + p.spare_db));
    }
    p.backward_weights.execute(Stream(), args);
    if (dw != nullptr) WriteBack(p.w_dw, mdw, dw);
  });
}

}  // namespace mx::ops::dnnl_conv
