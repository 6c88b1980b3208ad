// The one reader of settings (ndarray/env.h): unset is "not given", a bad
// value is an error naming the variable or flag and the value.
#include "ndarray/env.h"

#include <cstdlib>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

TEST(Env, UnsetOrEmptyIsNotGiven) {
  unsetenv("MX_TEST_SETTING");
  EXPECT_FALSE(EnvInt("MX_TEST_SETTING", 0, 10)->has_value());
  setenv("MX_TEST_SETTING", "", 1);
  EXPECT_FALSE(EnvInt("MX_TEST_SETTING", 0, 10)->has_value());
  EXPECT_FALSE(EnvBool("MX_TEST_SETTING")->has_value());
  EXPECT_EQ(EnvString("MX_TEST_SETTING"), "");
}

TEST(Env, ValuesInRangeAreRead) {
  setenv("MX_TEST_SETTING", "7", 1);
  EXPECT_EQ(**EnvInt("MX_TEST_SETTING", 0, 10), 7);
  setenv("MX_TEST_SETTING", "1", 1);
  EXPECT_TRUE(**EnvBool("MX_TEST_SETTING"));
  unsetenv("MX_TEST_SETTING");
}

TEST(Env, BadValuesAreErrorsNamingTheVariable) {
  for (const char* bad : {"soon", "12abc", "11", "-1", "1.5"}) {
    setenv("MX_TEST_SETTING", bad, 1);
    auto v = EnvInt("MX_TEST_SETTING", 0, 10);
    ASSERT_FALSE(v.ok()) << bad;
    EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(v.status().message(),
              std::string("MX_TEST_SETTING=") + bad + ": must be a whole number from 0 to 10");
  }
  setenv("MX_TEST_SETTING", "yes", 1);
  EXPECT_THAT(EnvBool("MX_TEST_SETTING").status().message(),
              HasSubstr("MX_TEST_SETTING=yes: must be 0 or 1"));
  unsetenv("MX_TEST_SETTING");
}

// A flag wins over the variable; its errors name the flag.
TEST(Env, FlagsWinAndAreCheckedTheSameWay) {
  setenv("MX_TEST_SETTING", "3", 1);
  EXPECT_EQ(**FlagOrEnvInt("setting", "5", "MX_TEST_SETTING", 0, 10), 5);
  EXPECT_EQ(**FlagOrEnvInt("setting", "", "MX_TEST_SETTING", 0, 10), 3);
  EXPECT_THAT(FlagOrEnvInt("setting", "x", "MX_TEST_SETTING", 0, 10).status().message(),
              HasSubstr("--setting=x: must be a whole number from 0 to 10"));
  unsetenv("MX_TEST_SETTING");
}

}  // namespace
}  // namespace mx
