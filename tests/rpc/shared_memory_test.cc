// Shared memory segments and the ranges calls take of them.
#include "rpc/shared_memory.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mx::rpc {
namespace {

using ::testing::HasSubstr;

std::string TempDir() {
  std::string dir = std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") +
                    "/shmXXXXXX";
  EXPECT_NE(mkdtemp(dir.data()), nullptr);
  return dir;
}

// What one side writes the other reads; once unlinked, no name is left
// and both mappings still work.
TEST(SharedSegment, BothSidesSeeTheSameBytesAndUnlinkLeavesNoName) {
  const std::string dir = TempDir();
  auto worker = SharedSegment::Create(dir, "w0-s0", 1 << 20);
  ASSERT_TRUE(worker.ok()) << worker.status();
  auto server = SharedSegment::Open(dir, "w0-s0", 1 << 20);
  ASSERT_TRUE(server.ok()) << server.status();
  std::strcpy((*worker)->data() + 4096, "gradient");
  EXPECT_STREQ((*server)->data() + 4096, "gradient");
  ASSERT_TRUE((*worker)->Unlink().ok());
  struct stat st;
  EXPECT_NE(stat((dir + "/w0-s0").c_str(), &st), 0);
  std::strcpy((*server)->data(), "value");
  EXPECT_STREQ((*worker)->data(), "value");
  // An existing name is never taken over.
  auto again = SharedSegment::Create(dir, "w0-s0", 64);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(SharedSegment::Create(dir, "w0-s0", 64).ok());
}

TEST(SharedSegment, OpenRefusesWhatIsNotASegmentOfTheAnnouncedSize) {
  const std::string dir = TempDir();
  ASSERT_TRUE(SharedSegment::Create(dir, "seg", 4096).ok());
  auto message = [&](const std::string& name, size_t bytes) {
    return std::string(SharedSegment::Open(dir, name, bytes).status().message());
  };
  EXPECT_THAT(message("../seg", 4096), HasSubstr("not a plain file name"));
  EXPECT_THAT(message("..", 4096), HasSubstr("not a plain file name"));
  EXPECT_THAT(message("seg", 8192), HasSubstr("holds 4096 bytes, not the 8192 announced"));
  EXPECT_EQ(SharedSegment::Open(dir, "none", 4096).status().code(), absl::StatusCode::kNotFound);
  ASSERT_EQ(mkfifo((dir + "/fifo").c_str(), 0600), 0);
  EXPECT_THAT(message("fifo", 4096), HasSubstr("not a regular file"));
  ASSERT_EQ(mkdir((dir + "/sub").c_str(), 0700), 0);
  EXPECT_THAT(message("sub", 4096), HasSubstr("Is a directory"));
  ASSERT_EQ(symlink((dir + "/seg").c_str(), (dir + "/link").c_str()), 0);
  EXPECT_FALSE(SharedSegment::Open(dir, "link", 4096).ok());  // no link followed
  auto seg = SharedSegment::Open(dir, "seg", 4096);
  ASSERT_TRUE(seg.ok());
  EXPECT_TRUE((*seg)->CheckRange(4000, 96).ok());
  EXPECT_THAT(std::string((*seg)->CheckRange(4000, 97).message()),
              HasSubstr("bytes [4000, 4097) lie outside the shared memory segment of 4096 bytes"));
  EXPECT_FALSE((*seg)->CheckRange(UINT64_MAX, 2).ok());  // no overflow
}

// Memory backs a segment as far as calls use it (a tmpfs that cannot back
// more is then an error to fall back on, not a SIGBUS at the first write;
// not reproduced here: that needs a full tmpfs).
TEST(SharedSegment, CommitBacksBytesOrSaysItCannot) {
  const std::string dir = TempDir();
  auto seg = SharedSegment::Create(dir, "seg", 64 << 20);
  ASSERT_TRUE(seg.ok());
  ASSERT_TRUE((*seg)->Commit(4096).ok());
  struct stat st;
  ASSERT_EQ(stat((dir + "/seg").c_str(), &st), 0);
  EXPECT_GE(st.st_blocks * 512, 4096);
  EXPECT_LE(st.st_blocks * 512, 2 << 20);  // sparse beyond what was asked (2 MiB steps)
  EXPECT_FALSE((*seg)->Commit((64 << 20) + 1).ok());
  auto opened = SharedSegment::Open(dir, "seg", 64 << 20);
  ASSERT_TRUE(opened.ok());
  EXPECT_EQ((*opened)->Commit(8192).code(), absl::StatusCode::kFailedPrecondition);

}

TEST(RangeAllocator, FirstFitAlignedAndCoalescedWhenFreed) {
  RangeAllocator a(1024);
  auto x = a.Allocate(100), y = a.Allocate(64), z = a.Allocate(700);
  ASSERT_TRUE(x && y && z);
  EXPECT_EQ(*x, 0u);
  EXPECT_EQ(*y, 128u);  // 100 rounded up to 64-byte units
  EXPECT_EQ(*z, 192u);
  EXPECT_FALSE(a.Allocate(200).has_value());  // 1024 - 892 left
  a.Free(*y);
  EXPECT_FALSE(a.Allocate(200).has_value());  // not contiguous yet
  a.Free(*x);
  auto w = a.Allocate(192);  // the two freed ranges, coalesced
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(*w, 0u);
  a.Free(*w);
  a.Free(*z);
  a.Free(*z);  // twice: ignored
  EXPECT_EQ(a.free_bytes(), 1024u);
  EXPECT_EQ(a.Allocate(1024), std::optional<size_t>(0));
}

}  // namespace
}  // namespace mx::rpc
