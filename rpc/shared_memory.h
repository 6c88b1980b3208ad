// Shared memory between a worker and the parameter servers on its host
// (docs/architecture.md, "Shared memory"): values travel through a
// segment the worker creates, and the RPC carries only where they lie.
//
// A segment is a file in a directory both processes reach (the launcher's
// private directory under /dev/shm, or a memory volume two Kubernetes pods
// share), created by the worker (mode 0600, never an existing name), opened
// and mapped by the server when the worker attaches it (AttachSegment),
// then unlinked by the worker: from then on no name refers to it, and its
// memory goes back to the system with the last process that maps it. So a
// dead worker leaves nothing behind once its servers drop its segments
// (they do when it is declared dead, or when they stop), and nothing
// outlives the job.
#ifndef MX_RPC_SHARED_MEMORY_H_
#define MX_RPC_SHARED_MEMORY_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace mx::rpc {

// A file of shared memory mapped into this process (read and write);
// unmapped when the object goes.
class SharedSegment {
 public:
  // Creates `dir`/`name` of `bytes` (mode 0600; an existing name is an
  // error) and maps it.
  static absl::StatusOr<std::unique_ptr<SharedSegment>> Create(const std::string& dir,
                                                               const std::string& name,
                                                               size_t bytes);
  // Maps an existing segment: `name` must be a plain file name (no '/'),
  // a regular file in `dir` (no link followed) of exactly `bytes`, owned by
  // this process's user.
  static absl::StatusOr<std::unique_ptr<SharedSegment>> Open(const std::string& dir,
                                                             const std::string& name,
                                                             size_t bytes);
  ~SharedSegment();
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  char* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Removes the file's name (the peer has it mapped); the memory stays
  // while a mapping does.
  absl::Status Unlink();
  // [offset, offset + bytes) within the segment, or INVALID_ARGUMENT
  // naming the range.
  absl::Status CheckRange(uint64_t offset, uint64_t bytes) const;
  // Backs bytes [0, end) with memory now (a segment Create made), so that
  // writing there cannot fail later: a page that tmpfs cannot give when
  // first written would be SIGBUS. RESOURCE_EXHAUSTED when the filesystem
  // is full (the caller sends over the network instead). Cheap for bytes
  // already backed.
  absl::Status Commit(size_t end);

 private:
  SharedSegment(std::string path, char* data, size_t size, int fd)
      : path_(std::move(path)), data_(data), size_(size), fd_(fd) {}

  const std::string path_;
  char* const data_;
  const size_t size_;
  const int fd_;  // Create's, for Commit; -1 for Open's
  absl::Mutex mu_;
  size_t committed_ ABSL_GUARDED_BY(mu_) = 0;
};

// Ranges of a segment handed to calls in flight: first fit over the free
// ranges, each range aligned to 64 bytes. Thread-safe.
class RangeAllocator {
 public:
  explicit RangeAllocator(size_t bytes);
  // The offset of a range of `bytes`, or nullopt while there is no room
  // (the caller sends over the network instead).
  std::optional<size_t> Allocate(size_t bytes);
  // Returns the range at `offset` (from Allocate).
  void Free(size_t offset);
  size_t free_bytes() const;

 private:
  mutable absl::Mutex mu_;
  std::map<size_t, size_t> free_ ABSL_GUARDED_BY(mu_);  // offset -> size, coalesced
  std::map<size_t, size_t> used_ ABSL_GUARDED_BY(mu_);  // offset -> size
};

}  // namespace mx::rpc

#endif  // MX_RPC_SHARED_MEMORY_H_
