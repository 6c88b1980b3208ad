#include <sys/resource.h>

#include <gtest/gtest.h>

#include <algorithm>

#include "rpc/rpc.h"

namespace mx::rpc {
namespace {

// A process started with a low soft limit on open files (the common
// default is 1024; a server of 1,000 workers holds 2,000 connections)
// gets its hard limit.
TEST(OpenFilesTest, SoftLimitIsRaisedToTheHardLimit) {
  rlimit limit;
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &limit), 0);
  const rlim_t wanted = std::min<rlim_t>(limit.rlim_max, rlim_t{1} << 20);
  if (wanted <= 64) GTEST_SKIP() << "the hard limit on open files is only " << wanted;
  rlimit low = limit;
  low.rlim_cur = 64;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  EXPECT_EQ(RaiseOpenFileLimit(), static_cast<int64_t>(wanted));
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &limit), 0);
  EXPECT_EQ(limit.rlim_cur, wanted);
  // Already raised: unchanged.
  EXPECT_EQ(RaiseOpenFileLimit(), static_cast<int64_t>(wanted));
}

}  // namespace
}  // namespace mx::rpc
