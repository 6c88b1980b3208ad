// Convolution and pooling through cuDNN (see ndarray/dnn.h): one handle per
// device bound to its compute stream; descriptors made per call (cheap);
// workspaces from stream-ordered memory. Compiled only with CUDA.
#include "ndarray/dnn.h"

#include <cuda_runtime.h>
#include <cudnn.h>

#include <array>
#include <mutex>

#include "ndarray/cuda/stream.h"

namespace mx::kernel {

namespace {

constexpr int kMaxDevices = 64;

// The handle of gpu(device) on its compute stream, or nullptr with *error.
cudnnHandle_t Handle(int device, const char** error) {
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<cudnnHandle_t, kMaxDevices> handles{};
  static std::array<cudnnStatus_t, kMaxDevices> status{};
  std::call_once(once[device], [device] {
    status[device] = cudnnCreate(&handles[device]);
    if (status[device] == CUDNN_STATUS_SUCCESS) {
      status[device] = cudnnSetStream(handles[device], internal::cuda::ComputeStream(device));
    }
  });
  if (status[device] != CUDNN_STATUS_SUCCESS) {
    *error = cudnnGetErrorString(status[device]);
    return nullptr;
  }
  return handles[device];
}

struct ConvDescriptors {
  cudnnTensorDescriptor_t x, y;
  cudnnFilterDescriptor_t filter;
  cudnnConvolutionDescriptor_t conv;
};

// Owns the descriptors of one call and turns the first failure into its text.
class Call {
 public:
  explicit Call(int device) : device_(device) {
    if (device < 0 || device >= kMaxDevices) {
      error_ = "no such device";
      return;
    }
    const cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) {
      error_ = cudaGetErrorString(err);
      return;
    }
    handle_ = Handle(device, &error_);
  }
  ~Call() {
    for (int i = 0; i < tensors_used_; ++i) cudnnDestroyTensorDescriptor(tensors_[i]);
    if (filter_ != nullptr) cudnnDestroyFilterDescriptor(filter_);
    if (conv_ != nullptr) cudnnDestroyConvolutionDescriptor(conv_);
    if (pool_ != nullptr) cudnnDestroyPoolingDescriptor(pool_);
    if (workspace_ != nullptr) cudaFreeAsync(workspace_, internal::cuda::ComputeStream(device_));
  }

  bool ok() const { return error_ == nullptr; }
  const char* error() const { return error_; }
  cudnnHandle_t handle() const { return handle_; }

  // Records a failure (the first one counts).
  bool Check(cudnnStatus_t s) {
    if (s != CUDNN_STATUS_SUCCESS && error_ == nullptr) error_ = cudnnGetErrorString(s);
    return ok();
  }
  bool Check(cudaError_t e) {
    if (e != cudaSuccess && error_ == nullptr) error_ = cudaGetErrorString(e);
    return ok();
  }

  cudnnTensorDescriptor_t Tensor(int64_t n, int64_t c, int64_t h, int64_t w) {
    cudnnTensorDescriptor_t d = nullptr;
    if (!ok() || !Check(cudnnCreateTensorDescriptor(&d))) return nullptr;
    tensors_[tensors_used_++] = d;
    Check(cudnnSetTensor4dDescriptor(d, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, int(n), int(c),
                                     int(h), int(w)));
    return d;
  }

  // The data, output, filter and convolution descriptors of s.
  ConvDescriptors Conv(const ConvShape& s) {
    ConvDescriptors d{Tensor(s.n, s.c, s.h, s.w), Tensor(s.n, s.k, s.oh, s.ow), nullptr, nullptr};
    if (!ok() || !Check(cudnnCreateFilterDescriptor(&filter_))) return d;
    d.filter = filter_;
    Check(cudnnSetFilter4dDescriptor(filter_, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, int(s.k),
                                     int(s.c / s.groups), int(s.kh), int(s.kw)));
    if (!ok() || !Check(cudnnCreateConvolutionDescriptor(&conv_))) return d;
    d.conv = conv_;
    Check(cudnnSetConvolution2dDescriptor(conv_, int(s.pad[0]), int(s.pad[1]), int(s.stride[0]),
                                          int(s.stride[1]), int(s.dilate[0]), int(s.dilate[1]),
                                          CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    Check(cudnnSetConvolutionGroupCount(conv_, int(s.groups)));
    Check(cudnnSetConvolutionMathType(conv_, CUDNN_FMA_MATH));
    return d;
  }

  cudnnPoolingDescriptor_t Pool(const PoolShape& s) {
    if (!ok() || !Check(cudnnCreatePoolingDescriptor(&pool_))) return nullptr;
    const cudnnPoolingMode_t mode =
        s.mode == PoolShape::Mode::kMax ? CUDNN_POOLING_MAX_DETERMINISTIC
        : s.mode == PoolShape::Mode::kAvgIncludePad ? CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING
                                                    : CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING;
    Check(cudnnSetPooling2dDescriptor(pool_, mode, CUDNN_NOT_PROPAGATE_NAN, int(s.kernel[0]),
                                      int(s.kernel[1]), int(s.pad[0]), int(s.pad[1]),
                                      int(s.stride[0]), int(s.stride[1])));
    return pool_;
  }

  // Stream-ordered scratch memory of `bytes`, freed when the call ends.
  void* Workspace(size_t bytes) {
    if (!ok() || bytes == 0) return nullptr;
    Check(cudaMallocAsync(&workspace_, bytes, internal::cuda::ComputeStream(device_)));
    return workspace_;
  }

 private:
  const int device_;
  const char* error_ = nullptr;
  cudnnHandle_t handle_ = nullptr;
  std::array<cudnnTensorDescriptor_t, 4> tensors_{};
  int tensors_used_ = 0;
  cudnnFilterDescriptor_t filter_ = nullptr;
  cudnnConvolutionDescriptor_t conv_ = nullptr;
  cudnnPoolingDescriptor_t pool_ = nullptr;
  void* workspace_ = nullptr;
};

// The first deterministic algorithm cuDNN's heuristics rank as working.
template <typename Perf>
bool PickDeterministic(const Perf* perf, int count, Perf* chosen) {
  for (int i = 0; i < count; ++i) {
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC) {
      *chosen = perf[i];
      return true;
    }
  }
  return false;
}

constexpr const char* kNoAlgorithm = "cuDNN offers no deterministic algorithm for this shape";

}  // namespace

const char* GpuConvForward(int device, const ConvShape& s, const float* x, const float* w,
                           float* y, float beta) {
  Call c(device);
  const ConvDescriptors d = c.Conv(s);
  if (!c.ok()) return c.error();
  cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT], chosen;
  int count = 0;
  if (!c.Check(cudnnGetConvolutionForwardAlgorithm_v7(c.handle(), d.x, d.filter, d.conv, d.y,
                                                      CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &count,
                                                      perf))) {
    return c.error();
  }
  if (!PickDeterministic(perf, count, &chosen)) return kNoAlgorithm;
  void* ws = c.Workspace(chosen.memory);
  const float alpha = 1;
  c.Check(cudnnConvolutionForward(c.handle(), &alpha, d.x, x, d.filter, w, d.conv, chosen.algo,
                                  ws, chosen.memory, &beta, d.y, y));
  return c.error();
}

const char* GpuConvAddBias(int device, const ConvShape& s, const float* bias, float* y) {
  Call c(device);
  auto bd = c.Tensor(1, s.k, 1, 1);
  auto yd = c.Tensor(s.n, s.k, s.oh, s.ow);
  if (!c.ok()) return c.error();
  const float one = 1;
  c.Check(cudnnAddTensor(c.handle(), &one, bd, bias, &one, yd, y));
  return c.error();
}

const char* GpuConvBackwardData(int device, const ConvShape& s, const float* w, const float* dy,
                                float* dx, float beta) {
  Call c(device);
  const ConvDescriptors d = c.Conv(s);
  if (!c.ok()) return c.error();
  cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT], chosen;
  int count = 0;
  if (!c.Check(cudnnGetConvolutionBackwardDataAlgorithm_v7(
          c.handle(), d.filter, d.y, d.conv, d.x, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &count,
          perf))) {
    return c.error();
  }
  if (!PickDeterministic(perf, count, &chosen)) return kNoAlgorithm;
  void* ws = c.Workspace(chosen.memory);
  const float alpha = 1;
  c.Check(cudnnConvolutionBackwardData(c.handle(), &alpha, d.filter, w, d.y, dy, d.conv,
                                       chosen.algo, ws, chosen.memory, &beta, d.x, dx));
  return c.error();
}

const char* GpuConvBackwardFilter(int device, const ConvShape& s, const float* x,
                                  const float* dy, float* dw, float beta) {
  Call c(device);
  const ConvDescriptors d = c.Conv(s);
  if (!c.ok()) return c.error();
  cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT], chosen;
  int count = 0;
  if (!c.Check(cudnnGetConvolutionBackwardFilterAlgorithm_v7(
          c.handle(), d.x, d.y, d.conv, d.filter, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &count,
          perf))) {
    return c.error();
  }
  if (!PickDeterministic(perf, count, &chosen)) return kNoAlgorithm;
  void* ws = c.Workspace(chosen.memory);
  const float alpha = 1;
  c.Check(cudnnConvolutionBackwardFilter(c.handle(), &alpha, d.x, x, d.y, dy, d.conv,
                                         chosen.algo, ws, chosen.memory, &beta, d.filter, dw));
  return c.error();
}

const char* GpuConvBackwardBias(int device, const ConvShape& s, const float* dy, float* db,
                                float beta) {
  Call c(device);
  auto yd = c.Tensor(s.n, s.k, s.oh, s.ow);
  auto bd = c.Tensor(1, s.k, 1, 1);
  if (!c.ok()) return c.error();
  const float alpha = 1;
  c.Check(cudnnConvolutionBackwardBias(c.handle(), &alpha, yd, dy, &beta, bd, db));
  return c.error();
}

const char* GpuPoolForward(int device, const PoolShape& s, const float* x, float* y, float beta) {
  Call c(device);
  auto xd = c.Tensor(s.n, s.c, s.h, s.w);
  auto yd = c.Tensor(s.n, s.c, s.oh, s.ow);
  auto pd = c.Pool(s);
  if (!c.ok()) return c.error();
  const float alpha = 1;
  c.Check(cudnnPoolingForward(c.handle(), pd, &alpha, xd, x, &beta, yd, y));
  return c.error();
}

const char* GpuPoolBackward(int device, const PoolShape& s, const float* x, const float* y,
                            const float* dy, float* dx, float beta) {
  Call c(device);
  auto xd = c.Tensor(s.n, s.c, s.h, s.w);
  auto yd = c.Tensor(s.n, s.c, s.oh, s.ow);
  auto pd = c.Pool(s);
  if (!c.ok()) return c.error();
  const float alpha = 1;
  c.Check(cudnnPoolingBackward(c.handle(), pd, &alpha, yd, y, yd, dy, xd, x, &beta, xd, dx));
  return c.error();
}

}  // namespace mx::kernel
