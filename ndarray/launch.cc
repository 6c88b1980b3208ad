#include "ndarray/launch.h"

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "ndarray/device.h"
#include "ndarray/parallel.h"

namespace mx::kernel {

namespace {

// Ends operation `op` (done) once each GPU of `devices` has run the work
// enqueued on its compute stream so far: with `thrown` when the host side
// of the operation threw (after enqueuing part of its work, which must
// still finish before the engine frees what it uses), else with the first
// error a device reports (a failed kernel), named after the operation;
// CUDA reports a failure at the first event after it, so it may have begun
// in earlier work on the stream.
void DoneWhenStreamsDone(const std::vector<int>& devices, CallbackOnComplete done,
                         const std::string& op, std::exception_ptr thrown = nullptr) {
  struct Join {
    std::mutex mu;
    size_t left = 0;
    absl::Status first;
  };
  if (devices.empty()) return done(thrown);  // nothing enqueued anywhere
  auto join = std::make_shared<Join>();
  join->left = devices.size();
  for (int d : devices) {
    internal::DeviceApiFor(gpu(d))->WhenStreamDone(d, [join, done, op, thrown](absl::Status s) {
      absl::Status first;
      {
        std::lock_guard<std::mutex> lock(join->mu);
        if (!s.ok() && join->first.ok()) join->first = s;
        if (--join->left > 0) return;
        first = join->first;
      }
      if (thrown) return done(thrown);
      if (first.ok()) return done(nullptr);
      done(std::make_exception_ptr(
          Error(absl::Status(first.code(), absl::StrCat(op, ": ", first.message())))));
    });
  }
}

}  // namespace

void Push(const char* name, Context ctx, std::vector<VarHandle> reads,
          std::vector<VarHandle> writes, std::function<void()> fn, int priority,
          FnProperty prop) {
  if (!ctx.is_gpu()) {
    Engine::Get()->PushSync([fn = std::move(fn)](RunContext) { fn(); }, ctx, std::move(reads),
                            std::move(writes), priority, name, prop);
    return;
  }
  // On a GPU, fn only enqueues work on the device's compute stream; the
  // operation completes when the stream has run it, and an error the device
  // reports then is stored on the written variables.
  Engine::Get()->PushAsync(
      [fn = std::move(fn), op = std::string(name)](RunContext rctx, CallbackOnComplete done) {
        std::exception_ptr thrown;
        try {
          fn();
        } catch (...) {
          thrown = std::current_exception();
        }
        DoneWhenStreamsDone({rctx.ctx.device_id}, done, op, thrown);
      },
      ctx, std::move(reads), std::move(writes), priority, name, prop);
}

void PushCollectives(const char* name, Context ctx, std::vector<int> devices,
                     std::vector<GpuCollective> calls, std::vector<VarHandle> reads,
                     std::vector<VarHandle> writes, int priority) {
  Engine::Get()->PushAsync(
      [devices = std::move(devices), calls = std::move(calls), op = std::string(name)](
          RunContext, CallbackOnComplete done) {
        // A failed group may have enqueued kernels on some ranks (aborted,
        // but still on their streams): the operation ends, with the error,
        // once the streams have run them, so that nothing they touch is
        // freed or reused under them.
        std::exception_ptr failed;
        if (const char* error = GpuCollectives(devices, calls)) {
          failed =
              std::make_exception_ptr(Error(absl::InternalError(absl::StrCat(op, ": ", error))));
        }
        DoneWhenStreamsDone(devices, done, op, failed);
      },
      ctx, std::move(reads), std::move(writes), priority, name);
}

void ThrowIfLaunchFailed(const char* error, const char* name, Context ctx) {
  if (error == nullptr) return;
  throw Error(absl::InternalError(absl::StrCat(name, " on ", ctx.ToString(), ": ", error)));
}

Shape BroadcastShape(const char* op, const Shape& a, const Shape& b) {
  int nd = std::max(a.ndim(), b.ndim());
  Shape out;
  for (int i = 0; i < nd; ++i) {
    int ia = i - (nd - a.ndim()), ib = i - (nd - b.ndim());
    int64_t da = ia >= 0 ? a[ia] : 1, db = ib >= 0 ? b[ib] : 1;
    MX_THROW_IF_NOT(da == db || da == 1 || db == 1, op, ": shapes ", a.ToString(), " and ",
                    b.ToString(), " cannot be broadcast together");
    out.push_back(da == 1 ? db : da);
  }
  return out;
}

std::vector<int64_t> BroadcastStrides(const Shape& in, const Shape& out) {
  const int pad = out.ndim() - in.ndim();
  std::vector<int64_t> strides(out.ndim(), 0);
  int64_t stride = 1;
  for (int d = out.ndim() - 1; d >= pad; --d) {
    const int64_t dim = in[d - pad];
    strides[d] = dim == 1 && out[d] != 1 ? 0 : stride;
    stride *= dim;
  }
  return strides;
}

BroadcastIndex MakeBroadcastIndex(const char* op, const Shape& out, const Shape& a,
                                  const Shape& b) {
  MX_THROW_IF_NOT(out.ndim() <= kMaxBroadcastDims, op, ": shape ", out.ToString(), " has ",
                  out.ndim(), " dimensions; broadcasting supports at most ",
                  kMaxBroadcastDims);
  BroadcastIndex ix{};
  if (out.ndim() == 0) {  // a scalar: one element, shape (1)
    ix.ndim = 1;
    ix.shape[0] = 1;
    return ix;
  }
  ix.ndim = out.ndim();
  const std::vector<int64_t> sa = BroadcastStrides(a, out), sb = BroadcastStrides(b, out);
  for (int d = 0; d < ix.ndim; ++d) {
    ix.shape[d] = out[d];
    // A dimension of size 1 is never stepped along; stride 0 keeps the
    // kernels' inner-stride cases to 0 and 1.
    ix.sa[d] = out[d] == 1 ? 0 : sa[d];
    ix.sb[d] = out[d] == 1 ? 0 : sb[d];
  }
  return ix;
}

void MakeReductionIndices(const char* op, const Shape& full, const Shape& operand,
                          const Shape& other, BroadcastIndex* outer, BroadcastIndex* inner) {
  MX_THROW_IF_NOT(full.ndim() <= kMaxBroadcastDims, op, ": shape ", full.ToString(), " has ",
                  full.ndim(), " dimensions; broadcasting supports at most ",
                  kMaxBroadcastDims);
  *outer = BroadcastIndex{};
  *inner = BroadcastIndex{};
  outer->ndim = inner->ndim = std::max(full.ndim(), 1);
  for (int d = 0; d < outer->ndim; ++d) outer->shape[d] = inner->shape[d] = 1;
  const std::vector<int64_t> own = BroadcastStrides(operand, full);
  const std::vector<int64_t> theirs = BroadcastStrides(other, full);
  int64_t stride = 1;  // of a contiguous array of shape full
  for (int d = full.ndim() - 1; d >= 0; --d) {
    // Broadcast along d: the operand has size 1 there and full does not.
    const bool reduced = own[d] == 0 && full[d] != 1;
    BroadcastIndex* ix = reduced ? inner : outer;
    ix->shape[d] = full[d];
    ix->sa[d] = full[d] == 1 ? 0 : stride;
    ix->sb[d] = full[d] == 1 ? 0 : theirs[d];
    stride *= full[d];
  }
}

void Gemm(const char* name, Context ctx, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
          float beta, float* c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0) Launch<FillKernel>(name, ctx, m * n, {c, 0.0f});
    return;
  }
  if (ctx.is_gpu()) {
    ThrowIfLaunchFailed(
        GpuSgemm(ctx.device_id,
                 RowMajorAsColMajor(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, n), alpha, beta),
        name, ctx);
    return;
  }
  Sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, n);
}

ColMajorGemm RowMajorAsColMajor(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                                const float* a, int64_t lda, const float* b, int64_t ldb,
                                float* c, int64_t ldc) {
  return ColMajorGemm{trans_b, trans_a, n, m, k, b, ldb, a, lda, c, ldc};
}

}  // namespace mx::kernel
