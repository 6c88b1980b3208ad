#include "ndarray/storage.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "ndarray/device.h"

namespace mx {

namespace {
bool PoolingFromEnv() {
  const char* v = std::getenv("MX_STORAGE_POOL");
  if (v == nullptr || std::strcmp(v, "1") == 0) return true;
  if (std::strcmp(v, "0") == 0) return false;
  std::fprintf(stderr, "mx: MX_STORAGE_POOL=%s is not 0 or 1; pooling\n", v);
  return true;
}
}  // namespace

Storage* Storage::Get() { return Shared().get(); }

std::shared_ptr<Storage> Storage::Shared() {
  // Destroyed at exit once the last NDArray chunk lets go of it.
  static std::shared_ptr<Storage> storage = [] {
    auto made = std::make_shared<Storage>();
    internal::PooledMemoryReleaser().store([](Context ctx) { Storage::Get()->ReleasePooled(ctx); });
    return made;
  }();
  return storage;
}

Storage::Storage() : pooling_(PoolingFromEnv()) {}

Storage::~Storage() {
  absl::MutexLock lock(&mu_);
  for (auto& [ctx, pool] : pools_) ReleaseLocked(ctx, &pool);
}

size_t Storage::SizeClass(size_t bytes) {
  if (bytes <= 64) return 64;
  size_t pow2 = 64;
  while (pow2 < bytes) pow2 <<= 1;
  size_t three_quarters = pow2 / 4 * 3;  // 1.5x the previous power of two
  return bytes <= three_quarters ? three_quarters : pow2;
}

absl::StatusOr<StorageHandle> Storage::Alloc(size_t bytes, Context ctx) {
  absl::Status available = CheckContextAvailable(ctx);
  if (!available.ok()) return available;
  internal::DeviceApi* device = internal::DeviceApiFor(ctx);
  const size_t cls = SizeClass(bytes);
  {
    absl::MutexLock lock(&mu_);
    Pool& pool = pools_[ctx];
    auto it = pool.free_blocks.find(cls);
    if (it != pool.free_blocks.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      pool.stats.bytes_pooled -= cls;
      pool.stats.bytes_in_use += cls;
      pool.stats.allocs++;
      pool.stats.pool_hits++;
      return StorageHandle{p, bytes, ctx};
    }
  }
  absl::StatusOr<void*> p = device->Alloc(ctx.device_id, cls);
  if (absl::IsResourceExhausted(p.status())) {
    // Give the pooled blocks back to the device and try once more.
    ReleasePooled(ctx);
    p = device->Alloc(ctx.device_id, cls);
  }
  absl::MutexLock lock(&mu_);
  Pool& pool = pools_[ctx];
  if (absl::IsResourceExhausted(p.status())) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of memory on ", ctx.ToString(), " allocating ", bytes,
        " bytes (", pool.stats.bytes_in_use, " bytes in use): ",
        p.status().message()));
  }
  if (!p.ok()) {  // not memory: a device fault (sticky), say; its own code
    return absl::Status(p.status().code(),
                        absl::StrCat("allocating ", bytes, " bytes on ", ctx.ToString(), ": ",
                                     p.status().message()));
  }
  pool.stats.bytes_in_use += cls;
  pool.stats.allocs++;
  return StorageHandle{*p, bytes, ctx};
}

void Storage::Free(StorageHandle handle) {
  if (handle.dptr == nullptr) return;
  const size_t cls = SizeClass(handle.size);
  absl::MutexLock lock(&mu_);
  Pool& pool = pools_[handle.ctx];
  pool.stats.bytes_in_use -= cls;
  pool.stats.frees++;
  if (pooling_) {
    pool.free_blocks[cls].push_back(handle.dptr);
    pool.stats.bytes_pooled += cls;
  } else {
    internal::DeviceApiFor(handle.ctx)->Free(handle.ctx.device_id, handle.dptr);
  }
}

void Storage::ReleasePooled(Context ctx) {
  absl::MutexLock lock(&mu_);
  auto it = pools_.find(ctx);
  if (it != pools_.end()) ReleaseLocked(ctx, &it->second);
}

void Storage::ReleaseLocked(Context ctx, Pool* pool) {
  internal::DeviceApi* device = internal::DeviceApiFor(ctx);
  for (auto& [cls, blocks] : pool->free_blocks) {
    for (void* p : blocks) device->Free(ctx.device_id, p);
  }
  pool->free_blocks.clear();
  pool->stats.bytes_pooled = 0;
}

StorageStats Storage::Stats(Context ctx) const {
  absl::MutexLock lock(&mu_);
  auto it = pools_.find(ctx);
  return it == pools_.end() ? StorageStats{} : it->second.stats;
}

void Storage::SetPooling(bool enabled) {
  absl::MutexLock lock(&mu_);
  pooling_ = enabled;
  if (!enabled) {
    for (auto& [ctx, pool] : pools_) ReleaseLocked(ctx, &pool);
  }
}

bool Storage::pooling() const {
  absl::MutexLock lock(&mu_);
  return pooling_;
}

}  // namespace mx
