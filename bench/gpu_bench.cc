// GPU benchmarks of the NDArray runtime, each against its baseline measured
// in the same run on the same GPU:
//   gpu_dot_4096:  mx::Dot of 4096x4096 matrices vs cublasSgemm called
//                  directly (ratio = cuBLAS time / mx time, target 0.95);
//   gpu_add_64M:   c = a + b on 64M floats, as bandwidth, vs the device's
//                  own device-to-device cudaMemcpy bandwidth (target 0.9);
//   gpu_sum_64M:   Sum of 64M floats as bandwidth vs the same memcpy
//                  (target 0.8);
//   gpu_copy_h2d_64M, gpu_copy_d2h_64M: Assign between cpu_pinned and
//                  gpu(0) arrays vs cudaMemcpy between the same buffers
//                  (target 0.9); gpu_copy_both_ways_64M: both at once vs
//                  the two one-way bandwidths summed (target 0.8: the copy
//                  streams overlap the directions);
//   gpu_nccl_reduce_4x64M: the nccl KVStore's push of 4 keys of 64 MiB, a
//                  copy per GPU, as NCCL reduce bus bandwidth vs NCCL's own
//                  all-reduce of the same arrays (target 0.9; needs 2 GPUs,
//                  else one line says it was skipped);
//   gpu_small_op_latency: per operation of a chain of dependent 256-element
//                  additions, vs launching the kernel and synchronizing
//                  the stream after each (target 0.5: the engine adds an
//                  event and two thread hand-offs per operation);
//   gpu_train_step_lenet, gpu_train_step_resnet: forward and backward of
//                  zoo::LeNet and zoo::ResNet at batch 100 on gpu(0), vs the
//                  same networks in PyTorch on the same GPU (target 1.0);
//   gpu_bulk_lenet, gpu_bulk_resnet: the same step with the executor's
//                  bulks (graph/executor.h) vs one engine operation per
//                  node (MX_EXEC_BULK_GPU=1), in the same run (target 1.0:
//                  bulks must not cost speed).
// Without a usable GPU (or in a build without CUDA) it prints one line
// saying it was skipped.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench/bench_util.h"
#include "bench/torch_runner.h"
#include "bench/train_step.h"
#include "graph/executor.h"
#include "kvstore/kvstore.h"
#include "ndarray/launch.h"
#include "ndarray/ndarray.h"
#include "worker/zoo.h"

#ifdef MX_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

namespace mx::bench {
namespace {

#ifdef MX_HAVE_CUDA

void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "gpu_bench: %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

void CheckOk(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "gpu_bench: %s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

void Line(const char* name, double value, const char* unit, double baseline, double ratio,
          double target) {
  std::printf("BENCH name=%s value=%.4g unit=%s baseline=%.4g ratio=%.3f target=%.2f\n", name,
              value, unit, baseline, ratio, target);
  std::fflush(stdout);
}

void BenchDot() {
  const int n = 4096;
  NDArray a = RandomUniform(-1, 1, {n, n}, gpu(0));
  NDArray b = RandomUniform(-1, 1, {n, n}, gpu(0));
  float* c = nullptr;
  Check(cudaMalloc(&c, sizeof(float) * n * n), "cudaMalloc");
  cublasHandle_t handle;
  cublasCreate(&handle);
  a.WaitToRead();
  b.WaitToRead();
  const float one = 1, zero = 0;
  const std::vector<double> t = MedianTurns(
      20, {[&] { Dot(a, b).WaitToRead(); },
           [&] {
             cublasSgemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, b.data(), n, a.data(),
                         n, &zero, c, n);
             Check(cudaDeviceSynchronize(), "sgemm");
           }});
  const double flops = 2.0 * n * n * n;
  Line("gpu_dot_4096", flops / t[0] / 1e12, "TFLOP/s", flops / t[1] / 1e12, t[1] / t[0], 0.95);
  cublasDestroy(handle);
  cudaFree(c);
}

void BenchBandwidth() {
  const int64_t n = int64_t{64} << 20;
  NDArray a = RandomUniform(-1, 1, {n}, gpu(0));
  NDArray b = RandomUniform(-1, 1, {n}, gpu(0));
  NDArray out = Empty({n}, gpu(0));
  a.WaitToRead();
  b.WaitToRead();
  float* dst = nullptr;
  Check(cudaMalloc(&dst, sizeof(float) * n), "cudaMalloc");
  const std::vector<double> t = MedianTurns(
      20, {[&] { (a + b).WaitToRead(); },
           [&] { Sum(a).WaitToRead(); },
           [&] {
             Check(cudaMemcpy(dst, a.data(), sizeof(float) * n, cudaMemcpyDeviceToDevice),
                   "memcpy");
             Check(cudaDeviceSynchronize(), "memcpy");
           }});
  const double bytes = sizeof(float) * double(n);
  const double copy_gbs = 2 * bytes / t[2] / 1e9;  // read + write
  const double add_gbs = 3 * bytes / t[0] / 1e9;   // two reads, one write
  const double sum_gbs = bytes / t[1] / 1e9;
  Line("gpu_add_64M", add_gbs, "GB/s", copy_gbs, add_gbs / copy_gbs, 0.9);
  Line("gpu_sum_64M", sum_gbs, "GB/s", copy_gbs, sum_gbs / copy_gbs, 0.8);
  cudaFree(dst);
}

// Host <-> GPU copies of 64 MiB through the engine (Assign between a
// cpu_pinned array and a gpu(0) one, on the GPU's copy streams) against
// cudaMemcpy between the same page-locked buffer and the device; and the
// two directions at once through the engine (separate copy streams) against
// their one-way bandwidths summed.
void BenchCopies() {
  const int64_t n = int64_t{16} << 20;  // floats: 64 MiB
  const double bytes = sizeof(float) * double(n);
  NDArray host = RandomUniform(-1, 1, {n}).Copy(cpu_pinned());
  NDArray host_out = Empty({n}, cpu_pinned());
  NDArray dev = Empty({n}, gpu(0)), dev_out = RandomUniform(-1, 1, {n}, gpu(0));
  WaitAll();
  const std::vector<double> t = MedianTurns(
      20,
      {[&] {
         dev.Assign(host);
         dev.WaitToRead();
       },
       [&] { Check(cudaMemcpy(dev.data(), host.data(), bytes, cudaMemcpyHostToDevice), "h2d"); },
       [&] {
         host_out.Assign(dev_out);
         host_out.WaitToRead();
       },
       [&] {
         Check(cudaMemcpy(host_out.data(), dev_out.data(), bytes, cudaMemcpyDeviceToHost), "d2h");
       },
       [&] {
         dev.Assign(host);
         host_out.Assign(dev_out);
         WaitAll();
       }});
  Line("gpu_copy_h2d_64M", bytes / t[0] / 1e9, "GB/s", bytes / t[1] / 1e9, t[1] / t[0], 0.9);
  Line("gpu_copy_d2h_64M", bytes / t[2] / 1e9, "GB/s", bytes / t[3] / 1e9, t[3] / t[2], 0.9);
  // Both at once, as bytes moved per second, against the one-way figures
  // of cudaMemcpy summed (1.0 when the directions overlap fully).
  const double both = 2 * bytes / t[4] / 1e9, one_way = bytes / t[1] / 1e9 + bytes / t[3] / 1e9;
  Line("gpu_copy_both_ways_64M", both, "GB/s", one_way, both / one_way, 0.8);
}

// The nccl KVStore's reduce of 4 keys of 64 MiB, each pushed as one copy
// per GPU and summed onto its key's GPU by one NCCL reduce, against NCCL's
// own all-reduce of the same 4 x 64 MiB called directly (one group per
// key, as kernel::GpuCollectives makes them, then a device synchronize), as
// nccl-tests states bus bandwidth: bytes / time for a reduce, times
// 2 (n - 1) / n for an all-reduce.
void BenchNccl() {
  const int gpus = NumGpus();
  if (gpus < 2) {
    std::printf("gpu_bench: gpu_nccl_reduce_4x64M skipped: needs 2 GPUs, this machine has %d\n",
                gpus);
    return;
  }
  constexpr int kKeys = 4;
  const int64_t n = int64_t{16} << 20;  // floats: 64 MiB
  absl::StatusOr<std::unique_ptr<KVStore>> kv = KVStore::Create("nccl");
  CheckOk(kv.status(), "KVStore::Create(nccl)");
  std::vector<int> devices;
  for (int d = 0; d < gpus; ++d) devices.push_back(d);
  std::vector<std::vector<NDArray>> copies(kKeys);
  std::vector<kernel::GpuCollective> all_reduce(kKeys);
  std::vector<NDArray> sums;  // the all-reduce's outputs
  for (int k = 0; k < kKeys; ++k) {
    CheckOk((*kv)->Init(k, Zeros({n})), "Init");
    all_reduce[k].kind = kernel::GpuCollective::kAllReduceSum;
    all_reduce[k].n = n;
    for (int d = 0; d < gpus; ++d) {
      copies[k].push_back(RandomUniform(-1, 1, {n}, gpu(d)));
      sums.push_back(Empty({n}, gpu(d)));
      all_reduce[k].sends.push_back(copies[k].back().data());
      all_reduce[k].recvs.push_back(sums.back().data());
    }
  }
  WaitAll();
  auto synchronize = [&] {
    for (int d = 0; d < gpus; ++d) {
      Check(cudaSetDevice(d), "cudaSetDevice");
      Check(cudaDeviceSynchronize(), "all-reduce");
    }
  };
  const std::vector<double> t = MedianTurns(
      10, {[&] {
             for (int k = 0; k < kKeys; ++k) {
               CheckOk((*kv)->Push(k, copies[k]), "Push");
             }
             WaitAll();
           },
           [&] {
             for (int k = 0; k < kKeys; ++k) {
               if (const char* error = kernel::GpuCollectives(devices, {all_reduce[k]})) {
                 std::fprintf(stderr, "gpu_bench: all-reduce: %s\n", error);
                 std::exit(1);
               }
             }
             synchronize();
           }});
  const double bytes = kKeys * sizeof(float) * double(n);
  const double reduce_bus = bytes / t[0] / 1e9;
  const double all_reduce_bus = bytes / t[1] / 1e9 * 2 * (gpus - 1) / gpus;
  Line("gpu_nccl_reduce_4x64M", reduce_bus, "GB/s", all_reduce_bus, reduce_bus / all_reduce_bus,
       0.9);
}

// A chain of small dependent operations: what the engine adds per GPU
// operation (launch, completion event, hand-offs) against launching the
// kernel of the same size (cuBLAS's axpy, x += 1 * ones) and synchronizing
// the stream after each.
void BenchSmallOps() {
  const int n = 256, ops = 200;
  NDArray x = Zeros({n}, gpu(0));
  NDArray ones = Ones({n}, gpu(0));
  x.WaitToRead();
  ones.WaitToRead();
  cudaStream_t stream;
  Check(cudaStreamCreate(&stream), "cudaStreamCreate");
  cublasHandle_t handle;
  cublasCreate(&handle);
  cublasSetStream(handle, stream);
  const float one = 1;
  const std::vector<double> t = MedianTurns(
      20, {[&] {
             for (int i = 0; i < ops; ++i) x += 1.0f;
             x.WaitToRead();
           },
           [&] {
             for (int i = 0; i < ops; ++i) {
               cublasSaxpy(handle, n, &one, ones.data(), 1, x.data(), 1);
               Check(cudaStreamSynchronize(stream), "axpy");
             }
           }});
  Line("gpu_small_op_latency", t[0] / ops * 1e6, "us", t[1] / ops * 1e6, t[1] / t[0], 0.5);
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
}

// Samples per second of forward + backward of `net` at batch 100 on gpu(0),
// over about `seconds`, synchronized every 10 steps as PyTorch's baseline is.
double TrainStepRate(const Symbol& net, double seconds) {
  constexpr int kBatch = 100;
  std::unique_ptr<Executor> exec = BindTrainStep(net, gpu(0), kBatch);
  Executor& e = *exec;
  auto steps = [&](int n) {
    for (int i = 0; i < n; ++i) {
      e.Forward(true);
      e.Backward();
    }
    WaitAll();
  };
  steps(20);
  int n = 0;
  const double start = NowSeconds();
  while (NowSeconds() - start < seconds) {
    steps(10);
    n += 10;
  }
  return n * kBatch / (NowSeconds() - start);
}

void BenchTraining() {
  for (const char* model : {"lenet", "resnet"}) {
    const double mx = TrainStepRate(*zoo::ByName(model), 3.0);
    std::optional<TorchResult> torch =
        RunTorchBest(std::string("train_step_gpu ") + model + " 3.0");
    const double base = torch ? torch->samples_per_s : 0;
    Line((std::string("gpu_train_step_") + model).c_str(), mx, "samples/s", base,
         base > 0 ? mx / base : 0, 1.0);
    setenv("MX_EXEC_BULK_GPU", "1", 1);  // read when the executor is bound
    const double per_node = TrainStepRate(*zoo::ByName(model), 3.0);
    unsetenv("MX_EXEC_BULK_GPU");
    Line((std::string("gpu_bulk_") + model).c_str(), mx, "samples/s", per_node, mx / per_node, 1.0);
  }
}

#endif  // MX_HAVE_CUDA

int Main() {
  if (NumGpus() == 0) {
    std::printf("gpu_bench: skipped: %s\n", BuiltWithCuda() ? "no usable GPU on this machine"
                                                           : "this build has no CUDA support");
    return 0;
  }
#ifdef MX_HAVE_CUDA
  BenchDot();
  BenchBandwidth();
  BenchCopies();
  BenchNccl();
  BenchSmallOps();
  BenchTraining();
#endif
  return 0;
}

}  // namespace
}  // namespace mx::bench

int main() { return mx::bench::Main(); }
