// Runs every case of the operator table (tests/graph/op_cases_*.cc): forward
#include <set>
#include <string>
// against the naive reference and backward against finite differences.
#include "gtest/gtest.h"
#include "graph/op.h"
#include "tests/graph/op_harness.h"

namespace mx::testing {
namespace {

class OperatorTest : public ::testing::TestWithParam<OpCase> {};

TEST_P(OperatorTest, ForwardMatchesReference) {
  absl::Status s = CheckForward(GetParam());
  EXPECT_TRUE(s.ok()) << s;
}

TEST_P(OperatorTest, GradientMatchesFiniteDifferences) {
  absl::Status s = CheckGradient(GetParam());
  EXPECT_TRUE(s.ok()) << s;
}

INSTANTIATE_TEST_SUITE_P(AllOperators, OperatorTest,
                         ::testing::ValuesIn(AllOpCases()),
                         [](const ::testing::TestParamInfo<OpCase>& info) {
                           return info.param.name;
                         });

TEST(OperatorTable, EveryRegisteredOperatorHasACase) {
  std::set<std::string> covered;
  for (const OpCase& c : AllOpCases()) covered.insert(c.op);
  for (const std::string& op : OpRegistry::ListNames()) {
    EXPECT_TRUE(covered.count(op)) << "operator " << op << " has no case in the table";
  }
}

}  // namespace
}  // namespace mx::testing
