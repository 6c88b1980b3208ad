// The keys under which servers hold the slices of a big key (a convention
// of the distributed KVStore client and the servers; see mx.proto).
//
// A key of the KVStore that is split into more slices than there are
// servers has slice s > 0 stored under SliceKey(key, s) =
// key + s * 2^24 (so keys below 2^24, at most 127 slices); slice 0, and
// every slice of a key split at most once per server, keep the key itself.
// A server finds the parameter (its name, for the optimizer's per-parameter
// multipliers) of a slice key through BaseKey.
#ifndef MX_PROTO_SLICE_KEY_H_
#define MX_PROTO_SLICE_KEY_H_

namespace mx {

constexpr int kSliceKeyShift = 24;
constexpr int kMaxSliceKeySlices = 127;

inline bool CanSliceKey(int key, int slices) {
  return key >= 0 && key < (1 << kSliceKeyShift) && slices <= kMaxSliceKeySlices;
}
inline int SliceKey(int key, int slice) { return key + (slice << kSliceKeyShift); }
inline int BaseKey(int server_key) {
  return server_key >= 0 ? server_key & ((1 << kSliceKeyShift) - 1) : server_key;
}
// The slice a server key holds (0 for a key that is not a slice key).
inline int SliceOf(int server_key) { return server_key >= 0 ? server_key >> kSliceKeyShift : 0; }

}  // namespace mx

#endif  // MX_PROTO_SLICE_KEY_H_
