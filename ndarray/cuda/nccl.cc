// NCCL collectives across the GPUs of this process, for the nccl KVStore.
// Compiled only with CUDA.
//
// NCCL is loaded with dlopen at the first collective, not linked: its
// library is over 200 MB, which every process that loads mx (CPU-only
// servers and workers included) would otherwise map, as with cuBLAS
// (blas.cc).
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ndarray/cuda/stream.h"
#include "ndarray/launch.h"

namespace mx::kernel {

namespace {

// The NCCL functions mx calls.
struct Nccl {
  decltype(&ncclCommInitAll) comm_init_all;
  decltype(&ncclCommAbort) comm_abort;
  decltype(&ncclGroupStart) group_start;
  decltype(&ncclGroupEnd) group_end;
  decltype(&ncclReduce) reduce;
  decltype(&ncclBroadcast) broadcast;
  decltype(&ncclAllReduce) all_reduce;
  decltype(&ncclGetErrorString) error_string;
};

// The library of the major version mx was built against, loaded once; null
// with *error set when it or a function is missing.
const Nccl* LoadNccl(const char** error) {
  static const std::string soname = "libnccl.so." + std::to_string(NCCL_MAJOR);
  static std::string failure;
  static const Nccl* api = []() -> const Nccl* {
    void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      failure = "cannot load NCCL (" + soname + "): " + dlerror();
      return nullptr;
    }
    auto* n = new Nccl;
    n->comm_init_all = reinterpret_cast<decltype(n->comm_init_all)>(dlsym(lib, "ncclCommInitAll"));
    n->comm_abort = reinterpret_cast<decltype(n->comm_abort)>(dlsym(lib, "ncclCommAbort"));
    n->group_start = reinterpret_cast<decltype(n->group_start)>(dlsym(lib, "ncclGroupStart"));
    n->group_end = reinterpret_cast<decltype(n->group_end)>(dlsym(lib, "ncclGroupEnd"));
    n->reduce = reinterpret_cast<decltype(n->reduce)>(dlsym(lib, "ncclReduce"));
    n->broadcast = reinterpret_cast<decltype(n->broadcast)>(dlsym(lib, "ncclBroadcast"));
    n->all_reduce = reinterpret_cast<decltype(n->all_reduce)>(dlsym(lib, "ncclAllReduce"));
    n->error_string = reinterpret_cast<decltype(n->error_string)>(dlsym(lib, "ncclGetErrorString"));
    if (!n->comm_init_all || !n->comm_abort || !n->group_start || !n->group_end || !n->reduce ||
        !n->broadcast || !n->all_reduce || !n->error_string) {
      failure = soname + " lacks a function mx needs";
      delete n;
      return nullptr;
    }
    return n;
  }();
  if (api == nullptr) *error = failure.c_str();
  return api;
}

// Serializes every collective of the process (NCCL requires the same order
// of calls on every rank of a communicator) and guards the communicators.
std::mutex& CollectiveMutex() {
  static auto* mu = new std::mutex;
  return *mu;
}

// Each device set's communicators, one per rank, and the sets NCCL cannot
// make them for (with why). Under CollectiveMutex.
struct CommCache {
  std::map<std::vector<int>, std::vector<ncclComm_t>> comms;
  std::map<std::vector<int>, std::string> failures;
};
CommCache& Comms() {
  static auto* cache = new CommCache;
  return *cache;
}

// The communicators of a device set, made at its first use; null with
// *error set if NCCL could not make them. Under CollectiveMutex.
const std::vector<ncclComm_t>* Communicators(const Nccl& nccl, const std::vector<int>& devices,
                                             std::string* error) {
  CommCache& cache = Comms();
  if (auto it = cache.comms.find(devices); it != cache.comms.end()) return &it->second;
  if (auto it = cache.failures.find(devices); it != cache.failures.end()) {
    *error = it->second;
    return nullptr;
  }
  std::vector<ncclComm_t> made(devices.size());
  const ncclResult_t r =
      nccl.comm_init_all(made.data(), static_cast<int>(devices.size()), devices.data());
  if (r != ncclSuccess) {
    *error = absl::StrCat("ncclCommInitAll on gpus ", absl::StrJoin(devices, ","), ": ",
                          nccl.error_string(r));
    // Remembered only when asking again cannot help; out of memory (NCCL's
    // buffers, made at a first push after the passes filled the GPU) may
    // pass, and was remembered for the process's life.
    if (r == ncclInvalidArgument || r == ncclInvalidUsage) cache.failures[devices] = *error;
    return nullptr;
  }
  return &(cache.comms[devices] = std::move(made));
}

// After a failed group: aborts the set's communicators, so that kernels
// the group did launch on some ranks stop waiting for ranks it did not
// (they would spin on their streams forever), and forgets them, so that
// the next collective on the set makes fresh ones. Under CollectiveMutex.
void AbortCommunicators(const Nccl& nccl, const std::vector<int>& devices) {
  CommCache& cache = Comms();
  auto it = cache.comms.find(devices);
  if (it == cache.comms.end()) return;
  for (ncclComm_t comm : it->second) nccl.comm_abort(comm);
  cache.comms.erase(it);
}

// Checks a call's buffers against the device set; "" when they fit.
std::string Malformed(const GpuCollective& c, size_t ranks) {
  if (c.root < 0 || static_cast<size_t>(c.root) >= ranks) return "root outside the devices";
  if (c.n < 0) return "negative count";
  switch (c.kind) {
    case GpuCollective::kReduceSum:
      return c.sends.size() == ranks && c.recv != nullptr ? "" : "one send per device and a recv";
    case GpuCollective::kBroadcast:
      return c.recvs.size() == ranks && c.send != nullptr ? "" : "a send and one recv per device";
    case GpuCollective::kAllReduceSum:
      break;
  }
  return c.sends.size() == ranks && c.recvs.size() == ranks ? ""
                                                            : "one send and one recv per device";
}

}  // namespace

const char* GpuCollectives(const std::vector<int>& devices,
                           const std::vector<GpuCollective>& calls) {
  // The error's text lives until this thread's next call.
  thread_local std::string error;
  if (devices.empty()) return "no devices";
  for (const GpuCollective& c : calls) {
    if (std::string bad = Malformed(c, devices.size()); !bad.empty()) {
      error = "malformed collective: " + bad;
      return error.c_str();
    }
  }
  const char* load_error = nullptr;
  const Nccl* nccl = LoadNccl(&load_error);
  if (nccl == nullptr) return load_error;
  std::lock_guard<std::mutex> lock(CollectiveMutex());
  const std::vector<ncclComm_t>* comms = Communicators(*nccl, devices, &error);
  if (comms == nullptr) return error.c_str();
  ncclResult_t r = nccl->group_start();
  for (const GpuCollective& c : calls) {
    for (size_t i = 0; i < devices.size() && r == ncclSuccess; ++i) {
      cudaStream_t stream = internal::cuda::ComputeStream(devices[i]);
      const size_t n = static_cast<size_t>(c.n);
      const bool root = static_cast<int>(i) == c.root;
      switch (c.kind) {
        case GpuCollective::kReduceSum:
          r = nccl->reduce(c.sends[i], root ? c.recv : nullptr, n, ncclFloat32, ncclSum, c.root,
                           (*comms)[i], stream);
          break;
        case GpuCollective::kBroadcast:
          r = nccl->broadcast(root ? c.send : nullptr, c.recvs[i], n, ncclFloat32, c.root,
                              (*comms)[i], stream);
          break;
        case GpuCollective::kAllReduceSum:
          r = nccl->all_reduce(c.sends[i], c.recvs[i], n, ncclFloat32, ncclSum, (*comms)[i],
                               stream);
          break;
      }
    }
  }
  // Ends the group even after a failed call, so that NCCL's group state is
  // clean for the next one; the first failure is the one reported.
  const ncclResult_t end = nccl->group_end();
  if (r == ncclSuccess) r = end;
  if (r == ncclSuccess) return nullptr;
  error = absl::StrCat("NCCL on gpus ", absl::StrJoin(devices, ","), ": ", nccl->error_string(r));
  AbortCommunicators(*nccl, devices);
  return error.c_str();
}

}  // namespace mx::kernel
