// The timeline's memory is bounded: a process keeps the newest
// MX_TRACE_MAX_EVENTS events (a long job's trace used to grow without end
// until the process exited or ran out of memory) and writes them oldest
// first, with the number it dropped.
#include "ndarray/trace.h"

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mx {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(Trace, KeepsTheNewestEventsAndSaysHowManyItDropped) {
  setenv("MX_TRACE_MAX_EVENTS", "100", 1);
  const std::string path = ::testing::TempDir() + "t.trace.json";
  trace::Start(path);
  for (int i = 0; i < 1000; ++i) trace::Complete("test", absl::StrCat("e", i), i, i + 1);
  trace::Stop();
  EXPECT_EQ(trace::EventCount(), 100u);
  EXPECT_EQ(trace::DroppedCount(), 900);
  ASSERT_TRUE(trace::Write().ok());
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  const std::string json = text.str();
  EXPECT_THAT(json, HasSubstr("\"dropped_events\":900"));
  EXPECT_THAT(json, Not(HasSubstr("\"e899\"")));
  const size_t first = json.find("\"e900\""), last = json.find("\"e999\"");
  ASSERT_NE(first, std::string::npos);
  ASSERT_NE(last, std::string::npos);
  EXPECT_LT(first, last);  // oldest first
}

}  // namespace
}  // namespace mx
