// Where the distributed KVStore keeps a key: which servers hold which
// element ranges of it. Every worker computes this alone, from the key,
// its size and the job's shape, so all workers agree without asking anyone
// (the servers only hold what they are sent); the rule must therefore stay
// a pure function of its arguments.
//
// The rule, for a key of n elements on S servers:
//   - n >= big_key_bound: cut into max(S, ceil(n / big_key_bound)) slices;
//   - otherwise: cut into min(S, n / m) slices (at least one), where m is
//     min_slice on up to 8 servers and 8 x min_slice / S on more (so a key
//     of 8 x min_slice elements still reaches every server), but never
//     below min_slice / 8. So a key of a few hundred KB spreads over
//     several servers instead of landing whole on one, while no slice is
//     small enough for its message's fixed cost to dominate (each slice is
//     a message entry and an update; a whole message where calls are not
//     bucketed).
// Slices are dealt round-robin from the server the key's hash picks, and
// have sizes differing by at most one element. Whole keys picked by hash
// alone (MXNet's rule: whole below 1M elements) put 1.5 times the mean
// bytes on the busiest of 8 servers for ResNet-50's parameters, 3.9 of 64;
// this rule puts at most 1.07 on any of 2 to 200 servers
// (bench/key_spread, docs/scaling.md).
//
// Slices are held under slice keys (proto/slice_key.h) where a server
// would otherwise hold two under one key: more slices than servers, or
// replicas 2 (slice s's backup is the primary of slice s + 1). A key too
// big or too high-numbered for slice keys is cut into at most S slices
// instead, or with replicas not cut.
#ifndef MX_KVSTORE_PLACEMENT_H_
#define MX_KVSTORE_PLACEMENT_H_

#include <cstdint>
#include <vector>

namespace mx {

struct PlacementOptions {
  int servers = 1;
  int64_t big_key_bound = 1 << 20;  // elements; keys this big are cut at this size
  int64_t min_slice = 16 << 10;     // elements; see above
  int replicas = 1;                 // 2: each slice has a backup on the next server
};

// A slice of a key: where it lives and what it covers.
struct KeyPart {
  int index;           // in its key's parts
  int server;          // the primary's rank
  int backup;          // replicas 2: the backup's rank (the next server); else -1
  int64_t begin, end;  // element range of the flattened key
  int server_key;      // the key the server holds it under (proto/slice_key.h)
};

// A 32-bit hash of the key (murmur3's finalizer: neighbouring keys spread
// out), and the server a key's first slice lives on: the hash modulo the
// servers. The hash's higher bits are free for other choices (the client
// picks a key's connection with them).
uint32_t KeyHash(int key);
int ServerForKey(int key, int num_servers);

// The slices of key `key` of n elements, in order of their ranges, which
// cover [0, n) without gaps. n >= 1 and o.servers >= 1.
std::vector<KeyPart> PlaceKey(int key, int64_t n, const PlacementOptions& o);

// The parts of a table (a row-sparse key) of `rows` rows: contiguous row
// ranges (begin and end count rows, not elements), one per server in rank
// order, sizes differing by at most one row; servers beyond the rows get
// none. With one copy each is held under the key itself (backup -1); with
// replicas 2 range s has its backup on the next server, which holds its
// own range too, so ranges are held under slice keys (at most 127 of them:
// the caller checks CanSliceKey).
std::vector<KeyPart> PlaceTable(int key, int64_t rows, int servers, int replicas = 1);

}  // namespace mx

#endif  // MX_KVSTORE_PLACEMENT_H_
