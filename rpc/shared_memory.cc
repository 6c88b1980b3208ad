#include "rpc/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace mx::rpc {
namespace {

constexpr size_t kAlign = 64;

absl::Status Errno(const std::string& what) {
  return absl::Status(errno == ENOENT ? absl::StatusCode::kNotFound
                                      : absl::StatusCode::kFailedPrecondition,
                      absl::StrCat(what, ": ", std::strerror(errno)));
}

// Maps fd's `bytes` shared, read and write.
absl::StatusOr<char*> Map(int fd, size_t bytes, const std::string& path) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Errno(absl::StrCat("cannot map shared memory ", path));
  return static_cast<char*>(p);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Create(const std::string& dir,
                                                                     const std::string& name,
                                                                     size_t bytes) {
  const std::string path = dir + "/" + name;
  if (bytes == 0) return absl::InvalidArgumentError(absl::StrCat(path, ": an empty segment"));
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return Errno(absl::StrCat("cannot create shared memory ", path));
  // tmpfs gives pages as they are first written: the size costs nothing
  // until calls use it.
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    absl::Status s = Errno(absl::StrCat("cannot size shared memory ", path));
    close(fd);
    unlink(path.c_str());
    return s;
  }
  absl::StatusOr<char*> data = Map(fd, bytes, path);
  if (!data.ok()) {
    close(fd);
    unlink(path.c_str());
    return data.status();
  }
  return std::unique_ptr<SharedSegment>(new SharedSegment(path, *data, bytes, fd));
}

absl::StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Open(const std::string& dir,
                                                                   const std::string& name,
                                                                   size_t bytes) {
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory segment '", name, "': not a plain file name"));
  }
  const std::string path = dir + "/" + name;
  const int fd = open(path.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Errno(absl::StrCat("cannot open shared memory ", path));
  struct stat st;
  absl::Status bad;
  if (fstat(fd, &st) != 0) {
    bad = Errno(absl::StrCat("cannot stat shared memory ", path));
  } else if (!S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
    bad = absl::InvalidArgumentError(
        absl::StrCat(path, ": not a regular file of this user (shared memory segments are)"));
  } else if (static_cast<uint64_t>(st.st_size) != bytes || bytes == 0) {
    bad = absl::InvalidArgumentError(absl::StrCat("shared memory ", path, " holds ", st.st_size,
                                                  " bytes, not the ", bytes, " announced"));
  }
  if (!bad.ok()) {
    close(fd);
    return bad;
  }
  absl::StatusOr<char*> data = Map(fd, bytes, path);
  close(fd);
  if (!data.ok()) return data.status();
  return std::unique_ptr<SharedSegment>(new SharedSegment(path, *data, bytes, -1));
}

SharedSegment::~SharedSegment() {
  munmap(data_, size_);
  if (fd_ >= 0) close(fd_);
}

absl::Status SharedSegment::Commit(size_t end) {
  absl::MutexLock lock(&mu_);
  if (end <= committed_) return absl::OkStatus();
  if (fd_ < 0 || end > size_) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": cannot back bytes up to ", end));
  }
  // To the next 2 MiB: fewer calls, little memory beyond what calls use.
  constexpr size_t kStep = size_t{2} << 20;
  const size_t to = std::min(size_, (end + kStep - 1) / kStep * kStep);
  const int err = posix_fallocate(fd_, static_cast<off_t>(committed_),
                                  static_cast<off_t>(to - committed_));
  if (err != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot back shared memory ", path_,
                                                     " up to ", to, " bytes: ", std::strerror(err)));
  }
  committed_ = to;
  return absl::OkStatus();
}

absl::Status SharedSegment::Unlink() {
  if (unlink(path_.c_str()) != 0 && errno != ENOENT) {
    return Errno(absl::StrCat("cannot remove shared memory ", path_));
  }
  return absl::OkStatus();
}

absl::Status SharedSegment::CheckRange(uint64_t offset, uint64_t bytes) const {
  if (offset <= size_ && bytes <= size_ - offset) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("bytes [", offset, ", ", offset + bytes,
                                                 ") lie outside the shared memory segment of ",
                                                 size_, " bytes"));
}

RangeAllocator::RangeAllocator(size_t bytes) {
  const size_t usable = bytes / kAlign * kAlign;
  if (usable > 0) free_[0] = usable;
}

std::optional<size_t> RangeAllocator::Allocate(size_t bytes) {
  const size_t want = std::max<size_t>((bytes + kAlign - 1) / kAlign * kAlign, kAlign);
  absl::MutexLock lock(&mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < want) continue;
    const size_t offset = it->first, left = it->second - want;
    free_.erase(it);
    if (left > 0) free_[offset + want] = left;
    used_[offset] = want;
    return offset;
  }
  return std::nullopt;
}

void RangeAllocator::Free(size_t offset) {
  absl::MutexLock lock(&mu_);
  auto used = used_.find(offset);
  if (used == used_.end()) return;
  size_t begin = offset, size = used->second;
  used_.erase(used);
  // Coalesced with its free neighbours.
  auto next = free_.lower_bound(begin);
  if (next != free_.end() && next->first == begin + size) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == begin) {
      begin = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  free_[begin] = size;
}

size_t RangeAllocator::free_bytes() const {
  absl::MutexLock lock(&mu_);
  size_t n = 0;
  for (const auto& [offset, size] : free_) n += size;
  return n;
}

}  // namespace mx::rpc
