#include "kvstore/placement.h"

#include <algorithm>

#include "proto/slice_key.h"

namespace mx {
namespace {

// min_slice on up to 8 servers; on more, smaller in proportion (a key of
// 8 x min_slice elements still reaches every server), down to min_slice / 8.
int64_t MinSlice(const PlacementOptions& o) {
  const int64_t min_slice = std::max<int64_t>(o.min_slice, 1);
  if (o.servers <= 8) return min_slice;
  return std::max<int64_t>({min_slice * 8 / o.servers, min_slice / 8, 1});
}

int64_t SliceCount(int64_t n, const PlacementOptions& o) {
  const int64_t servers = o.servers;
  const int64_t bound = std::max<int64_t>(o.big_key_bound, 1);
  if (n < bound) return std::clamp<int64_t>(n / MinSlice(o), 1, servers);
  // Never an empty slice: a key of fewer elements than servers has one
  // element on each of n servers.
  return std::min(n, std::max(servers, (n + bound - 1) / bound));
}

// Whether the slices need slice keys: a server holds two of them (more
// slices than servers), or, with replicas, slice s's backup is the server
// that holds slice s + 1 as its primary.
bool NeedsSliceKeys(int64_t slices, const PlacementOptions& o) {
  return slices > o.servers || (o.replicas > 1 && slices > 1);
}

}  // namespace

uint32_t KeyHash(int key) {
  uint32_t h = static_cast<uint32_t>(key);
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

int ServerForKey(int key, int num_servers) {
  return static_cast<int>(KeyHash(key) % static_cast<uint32_t>(num_servers));
}

std::vector<KeyPart> PlaceKey(int key, int64_t n, const PlacementOptions& o) {
  const int servers = o.servers;
  const int first = ServerForKey(key, servers);
  int64_t slices = SliceCount(n, o);
  if (NeedsSliceKeys(slices, o) &&
      !CanSliceKey(key, static_cast<int>(std::min<int64_t>(slices, 1 << 30)))) {
    // Slices held under the key itself: at most one per server, and with
    // replicas (where a backup would hold its neighbour's) one in all.
    slices = o.replicas > 1 ? 1 : std::min<int64_t>(slices, o.servers);
  }
  const bool slice_keys = NeedsSliceKeys(slices, o);
  std::vector<KeyPart> parts;
  parts.reserve(slices);
  for (int64_t s = 0; s < slices; ++s) {
    const int server = static_cast<int>((first + s) % servers);
    const int backup = o.replicas > 1 ? (server + 1) % servers : -1;
    const int server_key = slice_keys ? SliceKey(key, static_cast<int>(s)) : key;
    parts.push_back({static_cast<int>(s), server, backup, n * s / slices, n * (s + 1) / slices,
                     server_key});
  }
  return parts;
}

std::vector<KeyPart> PlaceTable(int key, int64_t rows, int servers, int replicas) {
  std::vector<KeyPart> parts;
  for (int s = 0; s < servers; ++s) {
    const int64_t begin = rows * s / servers, end = rows * (s + 1) / servers;
    if (end == begin) continue;
    const int index = static_cast<int>(parts.size());
    const bool copies = replicas > 1 && servers > 1;
    parts.push_back(KeyPart{index, s, copies ? (s + 1) % servers : -1, begin, end,
                            copies ? SliceKey(key, index) : key});
  }
  return parts;
}

}  // namespace mx
