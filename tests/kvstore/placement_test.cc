#include "kvstore/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "proto/slice_key.h"
#include "tests/kvstore/key_spread.h"

namespace mx {
namespace {

double MaxOverMean(const std::vector<int64_t>& sizes, const PlacementOptions& o) {
  return testing::SpreadOf(sizes, o).max_over_mean;
}

// Every placement's invariants: the parts cover [0, n) in order without
// gaps, differ in size by at most one element, go round-robin from the
// key's hash server, and no server holds two parts (or copies, with
// replicas) under one key.
void ExpectWellFormed(int key, int64_t n, const PlacementOptions& o) {
  SCOPED_TRACE(::testing::Message() << "key " << key << ", n " << n << ", servers " << o.servers
                                  << ", bound " << o.big_key_bound << ", min_slice " << o.min_slice);
  const std::vector<KeyPart> parts = PlaceKey(key, n, o);
  ASSERT_FALSE(parts.empty());
  int64_t next = 0, smallest = n, largest = 0;
  std::set<std::pair<int, int>> held;  // (server, server_key)
  for (size_t i = 0; i < parts.size(); ++i) {
    const KeyPart& p = parts[i];
    EXPECT_EQ(p.index, static_cast<int>(i));
    EXPECT_EQ(p.begin, next);
    EXPECT_GT(p.end, p.begin);
    next = p.end;
    smallest = std::min(smallest, p.end - p.begin);
    largest = std::max(largest, p.end - p.begin);
    EXPECT_EQ(p.server, (ServerForKey(key, o.servers) + static_cast<int>(i)) % o.servers);
    EXPECT_EQ(p.backup, o.replicas > 1 ? (p.server + 1) % o.servers : -1);
    EXPECT_TRUE(held.insert({p.server, p.server_key}).second) << "part " << i;
    if (p.backup >= 0) {
      EXPECT_TRUE(held.insert({p.backup, p.server_key}).second) << "part " << i << "'s backup";
    }
  }
  EXPECT_EQ(next, n);
  EXPECT_LE(largest - smallest, 1);
}

TEST(PlacementTest, PartsAreWellFormedForAnyShapeOfJob) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    PlacementOptions o;
    o.servers = 1 + static_cast<int>(rng() % 12);
    o.big_key_bound = 1 + static_cast<int64_t>(rng() % 64);
    o.min_slice = 1 + static_cast<int64_t>(rng() % 16);
    o.replicas = o.servers > 1 ? 1 + static_cast<int>(rng() % 2) : 1;
    ExpectWellFormed(static_cast<int>(rng() % 1000), 1 + static_cast<int64_t>(rng() % 500), o);
  }
}

TEST(PlacementTest, SmallKeysLiveWholeOnTheirHashServer) {
  const PlacementOptions o{8, 1 << 20, 16 << 10, 1};
  for (int key = 0; key < 100; ++key) {
    const std::vector<KeyPart> parts = PlaceKey(key, (16 << 10) * 2 - 1, o);
    ASSERT_EQ(parts.size(), 1u);
    EXPECT_EQ(parts[0].server, ServerForKey(key, 8));
    EXPECT_EQ(parts[0].server_key, key);
  }
  // The hash spreads consecutive keys over every server.
  std::set<int> servers;
  for (int key = 0; key < 32; ++key) servers.insert(ServerForKey(key, 8));
  EXPECT_EQ(servers.size(), 8u);
}

TEST(PlacementTest, MidSizedKeysSpreadOverAsManyServersAsMinSliceAllows) {
  const PlacementOptions o{8, 1 << 20, 16 << 10, 1};
  // 3.5 slices' worth: 3 slices, on 3 servers, under the key itself.
  std::vector<KeyPart> parts = PlaceKey(5, 7 * (8 << 10), o);
  ASSERT_EQ(parts.size(), 3u);
  for (const KeyPart& p : parts) {
    EXPECT_EQ(p.server_key, 5);
    EXPECT_GE(p.end - p.begin, o.min_slice);
  }
  // Enough for every server: one slice each, no more.
  parts = PlaceKey(5, 200 << 10, o);
  ASSERT_EQ(parts.size(), 8u);
  std::set<int> servers;
  for (const KeyPart& p : parts) servers.insert(p.server);
  EXPECT_EQ(servers.size(), 8u);
}

TEST(PlacementTest, MinSliceShrinksBeyondEightServers) {
  PlacementOptions o{8, 1 << 20, 16 << 10, 1};
  EXPECT_EQ(PlaceKey(3, 128 << 10, o).size(), 8u);
  o.servers = 16;  // slices of 8K: still every server
  EXPECT_EQ(PlaceKey(3, 128 << 10, o).size(), 16u);
  o.servers = 200;  // never below 2K
  EXPECT_EQ(PlaceKey(3, 128 << 10, o).size(), 64u);
  EXPECT_EQ(PlaceKey(3, (2 << 10) - 1, o).size(), 1u);
}

TEST(PlacementTest, BigKeysAreCutAtTheBoundIntoSliceKeys) {
  const PlacementOptions o{2, 16, 4, 1};
  // 40 elements, bound 16: 3 slices on 2 servers, so slice keys.
  const std::vector<KeyPart> parts = PlaceKey(2, 40, o);
  ASSERT_EQ(parts.size(), 3u);
  for (const KeyPart& p : parts) {
    EXPECT_LE(p.end - p.begin, 16);
    EXPECT_EQ(p.server_key, SliceKey(2, p.index));
  }
  // A key beyond slice keys' range is cut once per server instead, and
  // with replicas not at all.
  const int high = 1 << kSliceKeyShift;
  EXPECT_EQ(PlaceKey(high, 40, o).size(), 2u);
  ExpectWellFormed(high, 40, o);
  const PlacementOptions replicas{2, 16, 4, 2};
  EXPECT_EQ(PlaceKey(high, 40, replicas).size(), 1u);
  ExpectWellFormed(high, 40, replicas);
}

// With replicas, the backup of a slice is the next server, which holds the
// next slice as its primary: slices live under slice keys even when there
// are no more of them than servers.
TEST(PlacementTest, ReplicatedSlicesLiveUnderSliceKeys) {
  const PlacementOptions o{3, 1 << 20, 16 << 10, 2};
  const std::vector<KeyPart> parts = PlaceKey(4, 3 * (16 << 10), o);
  ASSERT_EQ(parts.size(), 3u);
  for (const KeyPart& p : parts) {
    EXPECT_EQ(p.server_key, SliceKey(4, p.index));
    EXPECT_EQ(p.backup, (p.server + 1) % 3);
  }
  ExpectWellFormed(4, 3 * (16 << 10), o);
  // A key left whole keeps its own key.
  EXPECT_EQ(PlaceKey(4, 100, o)[0].server_key, 4);
}

// A table's rows in contiguous ranges by server rank; with replicas each
// range's backup is the next server, which holds its own range as well,
// so ranges are held under slice keys.
TEST(PlacementTest, TableRangesAndTheirBackups) {
  const std::vector<KeyPart> one = PlaceTable(9, 10, 3);
  ASSERT_EQ(one.size(), 3u);
  EXPECT_EQ(one[0].begin, 0);
  EXPECT_EQ(one[0].end, 3);
  EXPECT_EQ(one[2].end, 10);
  for (const KeyPart& p : one) {
    EXPECT_EQ(p.backup, -1);
    EXPECT_EQ(p.server_key, 9);
  }
  const std::vector<KeyPart> two = PlaceTable(9, 10, 3, /*replicas=*/2);
  ASSERT_EQ(two.size(), 3u);
  for (const KeyPart& p : two) {
    EXPECT_EQ(p.server, p.index);
    EXPECT_EQ(p.backup, (p.server + 1) % 3);
    EXPECT_EQ(p.server_key, SliceKey(9, p.index));
    EXPECT_EQ(p.begin, one[p.index].begin);
  }
  // Fewer rows than servers: servers without rows hold no range.
  const std::vector<KeyPart> few = PlaceTable(9, 2, 3, 2);
  ASSERT_EQ(few.size(), 2u);
  EXPECT_EQ(few[0].server, 1);
  EXPECT_EQ(few[0].backup, 2);
  EXPECT_EQ(few[1].backup, 0);
}

// The figure docs/scaling.md shows: ResNet-50's parameters put at most
// 1.1 times the mean bytes on any server, from 2 to 200 servers, where
// MXNet's rule (whole keys below 1M elements, by hash) puts 1.5 at 8.
TEST(PlacementTest, ResNet50SpreadsEvenly) {
  const std::vector<int64_t> sizes = testing::ResNet50ParameterSizes();
  ASSERT_EQ(sizes.size(), 161u);
  EXPECT_EQ(std::accumulate(sizes.begin(), sizes.end(), int64_t{0}), 25557032);
  for (int servers : {2, 3, 4, 6, 8, 16, 32, 64, 100, 200}) {
    PlacementOptions o;
    o.servers = servers;
    EXPECT_LE(MaxOverMean(sizes, o), 1.1) << servers << " servers";
  }
  PlacementOptions mxnet;
  mxnet.servers = 8;
  mxnet.min_slice = int64_t{1} << 40;  // no key below the bound is cut
  EXPECT_GT(MaxOverMean(sizes, mxnet), 1.4);
}

}  // namespace
}  // namespace mx
