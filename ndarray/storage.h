// Storage: a pooled allocator per context.
//
// Expression-heavy code (`w.Assign(lr * g)`) makes a temporary for every
// operator. Freed blocks are therefore kept in per-context free lists keyed by
// size class (powers of two and 1.5x powers of two, at least 64 bytes, so a
// block wastes at most a third of itself) and handed out again without a
// system call. When the system is out of memory, the pool of that context is
// released and the allocation retried once before ResourceExhausted.
//
// Pooling can be turned off with SetPooling(false) or the environment variable
// MX_STORAGE_POOL=0; then every Alloc and Free goes to the device.
//
// Storage is safe for concurrent use from multiple threads.
#ifndef MX_NDARRAY_STORAGE_H_
#define MX_NDARRAY_STORAGE_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "ndarray/context.h"

namespace mx {

// A block of device memory. `size` is the usable size requested by the
// caller; the block itself may be larger (its size class).
struct StorageHandle {
  void* dptr = nullptr;
  size_t size = 0;
  Context ctx;
};

struct StorageStats {
  size_t bytes_in_use = 0;  // in blocks handed out, counted by size class
  size_t bytes_pooled = 0;  // in free blocks kept for reuse
  uint64_t allocs = 0;      // Alloc calls that succeeded
  uint64_t pool_hits = 0;   // of those, served from the pool
  uint64_t frees = 0;
};

class Storage {
 public:
  // The process-wide storage. Holders of the shared_ptr (NDArray chunks)
  // keep it alive through static destruction.
  static Storage* Get();
  static std::shared_ptr<Storage> Shared();

  Storage();
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  // Allocates at least `bytes` on ctx. Errors: the context is not available
  // (see CheckContextAvailable) or the device is out of memory.
  absl::StatusOr<StorageHandle> Alloc(size_t bytes, Context ctx);
  // Returns a block from Alloc to the pool (or to the device when pooling is
  // off).
  void Free(StorageHandle handle);
  // Returns every pooled block of ctx to the device.
  void ReleasePooled(Context ctx);

  StorageStats Stats(Context ctx) const;
  void SetPooling(bool enabled);
  bool pooling() const;

  // The size class a request of `bytes` is rounded up to.
  static size_t SizeClass(size_t bytes);

 private:
  struct Pool {
    std::map<size_t, std::vector<void*>> free_blocks;  // by size class
    StorageStats stats;
  };
  void ReleaseLocked(Context ctx, Pool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  bool pooling_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Context, Pool> pools_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mx

#endif  // MX_NDARRAY_STORAGE_H_
