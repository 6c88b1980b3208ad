// ReplicaStep::WireBytes bounds a step's encoding, which caps each call to
// a backup (ReplicationOptions::max_call_bytes) and a key's state for a new
// backup (ShardOptions::max_state_bytes). Before, only the values and the
// optimizer states counted: a state's per-worker seqs, parameter names and
// optimizer settings did not, and a call of many such states could exceed
// the backup's largest message.

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/kvstore_service.h"
#include "server/shard.h"

namespace mx {
namespace {

TEST(ReplicaStepSize, AStatesHeaderCountsNotOnlyItsValues) {
  auto state = std::make_shared<KeyState>();
  state->shape = Shape({4, 2});
  state->value.assign(8, 1.5f);
  for (int r = 0; r < 1024; ++r) state->seen[r] = int64_t{1} << 40;
  state->optimizer = "sgd";
  state->optimizer_options = {{"learning_rate", "0.1"}, {"momentum", "0.9"}};
  for (int k = 0; k < 2000; ++k)
    state->param_names[k] = absl::StrCat("fullyconnected", k, "_weight");
  state->lr_mult["fc1_weight"] = 2;
  state->wd_mult["fc1_bias"] = 0;
  state->optimizer_states = std::string(100, 'x');
  ReplicaStep step{7, 3, {}, {}, state};

  const size_t encoded = EncodeReplicaStep(step).bytes;
  // The values and optimizer states are 132 bytes; names and seqs ~60 KB.
  EXPECT_GT(encoded, size_t{40000});
  EXPECT_GE(step.WireBytes(), encoded);
  EXPECT_LE(step.WireBytes(), 3 * encoded) << "a bound so loose it splits calls needlessly";
}

TEST(ReplicaStepSize, AStepCountsItsRowsAndPushes) {
  std::vector<float> value(64 * 3, 2.0f);
  ReplicaStep step;
  step.key = 5;
  step.version = int64_t{1} << 33;
  step.value = Pieces::Of(value);
  for (int64_t r = 0; r < 64; ++r) step.rows.push_back(r * 100000);
  for (int w = 0; w < 512; ++w) step.pushes.push_back({w, int64_t{1} << 35});

  const size_t encoded = EncodeReplicaStep(step).bytes;
  EXPECT_GE(step.WireBytes(), encoded);
  EXPECT_LE(step.WireBytes(), 3 * encoded);
}

}  // namespace
}  // namespace mx
