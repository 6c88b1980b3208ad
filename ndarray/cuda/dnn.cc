// Convolution and pooling through cuDNN (see ndarray/dnn.h): one handle per
// device bound to its compute stream; descriptors made per call (cheap);
// each convolution pass's algorithms found once per shape; workspaces from
// stream-ordered memory. Compiled only with CUDA.
#include "ndarray/dnn.h"

#include <cuda_runtime.h>
#include <cudnn.h>

#include <array>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "ndarray/cuda/handles.h"
#include "ndarray/cuda/stream.h"

namespace mx::kernel {

namespace {

using internal::cuda::kMaxDevices;

// The handle of gpu(device) on its compute stream, or nullptr with *error
// (internal::cuda::DeviceHandles).
cudnnHandle_t Handle(int device, const char** error) {
  using Handles = internal::cuda::DeviceHandles<cudnnHandle_t, cudnnStatus_t, CUDNN_STATUS_SUCCESS>;
  static auto* handles = new Handles;
  cudnnStatus_t status = CUDNN_STATUS_SUCCESS;
  const cudnnHandle_t h = handles->Get(device, cudnnCreate, cudnnSetStream, &status);
  if (h == nullptr) *error = cudnnGetErrorString(status);
  return h;
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

  // Stream-ordered scratch memory of `bytes` in *ws (null for 0 bytes),
  // freed when the call ends; false when the device has not that much.
  bool TryWorkspace(size_t bytes, void** ws) {
    *ws = nullptr;
    if (bytes == 0) return true;
    if (workspace_ != nullptr) {
      cudaFreeAsync(workspace_, internal::cuda::ComputeStream(device_));
      workspace_ = nullptr;
    }
    if (internal::cuda::MallocScratch(&workspace_, bytes, device_,
                                      internal::cuda::ComputeStream(device_)) != cudaSuccess) {
      cudaGetLastError();  // not sticky; clear it
      workspace_ = nullptr;
      return false;
    }
    *ws = workspace_;
    return true;
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

// One deterministic algorithm cuDNN's heuristics rank as working for a
// convolution pass, with the workspace it needs.
struct Algorithm {
  int algo;
  size_t workspace;
};

enum class ConvPass { kForward, kBackwardData, kBackwardFilter };

// The deterministic algorithms for (device, pass, shape), best first: asked
// of cuDNN once and remembered, since the heuristics query (and creating
// its descriptors) costs more host time than a small convolution's kernels.
// `query(perf, capacity, &count)` runs cuDNN's query; `c` carries its error.
template <typename Perf, int kCapacity, typename Query>
const std::vector<Algorithm>* Algorithms(Call& c, int device, ConvPass pass, const ConvShape& s,
                                         Query query) {
  // ConvShape is plain int64_t fields, so its bytes name the shape.
  static_assert(sizeof(ConvShape) == 16 * sizeof(int64_t));
  using Key = std::tuple<int, ConvPass, std::string>;
  static absl::Mutex mu;
  static auto* known = new absl::flat_hash_map<Key, std::unique_ptr<std::vector<Algorithm>>>();
  const Key key{device, pass, std::string(reinterpret_cast<const char*>(&s), sizeof(s))};
  {
    absl::MutexLock lock(&mu);
    if (auto it = known->find(key); it != known->end()) return it->second.get();
  }
  Perf perf[kCapacity];
  int count = 0;
  if (!c.Check(query(perf, kCapacity, &count))) return nullptr;
  auto found = std::make_unique<std::vector<Algorithm>>();
  for (int i = 0; i < count; ++i) {
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC) {
      found->push_back({static_cast<int>(perf[i].algo), perf[i].memory});
    }
  }
  absl::MutexLock lock(&mu);
  auto& slot = (*known)[key];
  if (slot == nullptr) slot = std::move(found);
  return slot.get();
}

// Runs `run(algo, workspace, bytes)` with the first of `algorithms` whose
// workspace can be had: when GPU memory is short, a lesser algorithm that
// needs less beats failing.
template <typename Run>
const char* RunFirstThatFits(Call& c, const std::vector<Algorithm>* algorithms, Run run) {
  if (!c.ok()) return c.error();
  if (algorithms->empty()) return "cuDNN offers no deterministic algorithm for this shape";
  for (const Algorithm& a : *algorithms) {
    void* ws = nullptr;
    if (!c.TryWorkspace(a.workspace, &ws)) continue;
    c.Check(run(a.algo, ws, a.workspace));
    return c.error();
  }
  return "cuDNN: out of GPU memory for the workspace of every deterministic algorithm";
}

}  // namespace

const char* GpuConvForward(int device, const ConvShape& s, const float* x, const float* w,
                           float* y, float beta) {
  Call c(device);
  const ConvDescriptors d = c.Conv(s);
  if (!c.ok()) return c.error();
  const auto* algorithms =
      Algorithms<cudnnConvolutionFwdAlgoPerf_t, CUDNN_CONVOLUTION_FWD_ALGO_COUNT>(
          c, device, ConvPass::kForward, s, [&](auto* perf, int capacity, int* count) {
            return cudnnGetConvolutionForwardAlgorithm_v7(c.handle(), d.x, d.filter, d.conv, d.y,
                                                          capacity, count, perf);
          });
  const float alpha = 1;
  return RunFirstThatFits(c, algorithms, [&](int algo, void* ws, size_t bytes) {
    return cudnnConvolutionForward(c.handle(), &alpha, d.x, x, d.filter, w, d.conv,
                                   static_cast<cudnnConvolutionFwdAlgo_t>(algo), ws, bytes, &beta,
                                   d.y, y);
  });
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
  const auto* algorithms =
      Algorithms<cudnnConvolutionBwdDataAlgoPerf_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT>(
          c, device, ConvPass::kBackwardData, s, [&](auto* perf, int capacity, int* count) {
            return cudnnGetConvolutionBackwardDataAlgorithm_v7(c.handle(), d.filter, d.y, d.conv,
                                                               d.x, capacity, count, perf);
          });
  const float alpha = 1;
  return RunFirstThatFits(c, algorithms, [&](int algo, void* ws, size_t bytes) {
    return cudnnConvolutionBackwardData(c.handle(), &alpha, d.filter, w, d.y, dy, d.conv,
                                        static_cast<cudnnConvolutionBwdDataAlgo_t>(algo), ws, bytes,
                                        &beta, d.x, dx);
  });
}

const char* GpuConvBackwardFilter(int device, const ConvShape& s, const float* x,
                                  const float* dy, float* dw, float beta) {
  Call c(device);
  const ConvDescriptors d = c.Conv(s);
  if (!c.ok()) return c.error();
  const auto* algorithms =
      Algorithms<cudnnConvolutionBwdFilterAlgoPerf_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT>(
          c, device, ConvPass::kBackwardFilter, s, [&](auto* perf, int capacity, int* count) {
            return cudnnGetConvolutionBackwardFilterAlgorithm_v7(c.handle(), d.x, d.y, d.conv,
                                                                 d.filter, capacity, count, perf);
          });
  const float alpha = 1;
  return RunFirstThatFits(c, algorithms, [&](int algo, void* ws, size_t bytes) {
    return cudnnConvolutionBackwardFilter(c.handle(), &alpha, d.x, x, d.y, dy, d.conv,
                                          static_cast<cudnnConvolutionBwdFilterAlgo_t>(algo), ws,
                                          bytes, &beta, d.filter, dw);
  });
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
