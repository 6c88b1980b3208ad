// Convolution and pooling on GPUs through cuDNN, for the operators of
// graph/ops (whose CPU kernels are their own). Each function enqueues its
// work on gpu(device)'s compute stream and returns nullptr, or the error's
// text (kernel::ThrowIfLaunchFailed turns it into an mx::Error). `beta`
// selects the request: 0 overwrites the output, 1 adds to it. Defined in
// ndarray/cuda/dnn.cc, or by ndarray/no_cuda.cc where they report that the
// build has no GPU support.
//
// Arithmetic: cuDNN is restricted to FMA math (no TF32 tensor cores) and to
// deterministic algorithms, so results match the CPU's to rounding and are
// the same run after run.
#ifndef MX_NDARRAY_DNN_H_
#define MX_NDARRAY_DNN_H_

#include <cstdint>

namespace mx::kernel {

// A 2-D NCHW convolution: data (n, c, h, w), weight (k, c / groups, kh, kw),
// output (n, k, oh, ow).
struct ConvShape {
  int64_t n, c, h, w;
  int64_t k, kh, kw;
  int64_t pad[2], stride[2], dilate[2];
  int64_t groups;
  int64_t oh, ow;
};

const char* GpuConvForward(int device, const ConvShape& s, const float* x, const float* w,
                           float* y, float beta);
// y[:, f] += bias[f].
const char* GpuConvAddBias(int device, const ConvShape& s, const float* bias, float* y);
const char* GpuConvBackwardData(int device, const ConvShape& s, const float* w, const float* dy,
                                float* dx, float beta);
const char* GpuConvBackwardFilter(int device, const ConvShape& s, const float* x,
                                  const float* dy, float* dw, float beta);
// db[f] = sum of dy[:, f] (+ beta * db).
const char* GpuConvBackwardBias(int device, const ConvShape& s, const float* dy, float* db,
                                float beta);

// 2-D pooling of (n, c, h, w) into (n, c, oh, ow).
struct PoolShape {
  int64_t n, c, h, w;
  int64_t kernel[2], pad[2], stride[2];
  int64_t oh, ow;
  enum class Mode { kMax, kAvgIncludePad, kAvgExcludePad } mode;
};

const char* GpuPoolForward(int device, const PoolShape& s, const float* x, float* y, float beta);
const char* GpuPoolBackward(int device, const PoolShape& s, const float* x, const float* y,
                            const float* dy, float* dx, float beta);

}  // namespace mx::kernel

#endif  // MX_NDARRAY_DNN_H_
