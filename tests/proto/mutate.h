// Damaged messages for tests that feed decoders and RPC handlers what no
// mx peer sends. Deterministic for a given generator state, so a failure
// reproduces from the test's seed and iteration.
#ifndef MX_TESTS_PROTO_MUTATE_H_
#define MX_TESTS_PROTO_MUTATE_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace mx::testing {

// `bytes` with one to four random edits: a flipped bit, an overwritten
// byte, a cut tail, bytes inserted, a span removed, or a byte set to a
// value that matters to protobuf's encoding (0x00, 0x7f, 0x80, 0xff: ends
// and continues varints, extreme lengths).
inline std::string Mutate(std::string bytes, std::mt19937* rng) {
  auto below = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>((*rng)() % n); };
  const int edits = 1 + static_cast<int>(below(4));
  for (int e = 0; e < edits; ++e) {
    const size_t at = below(bytes.size() + 1);
    switch (below(6)) {
      case 0:
        if (at < bytes.size()) bytes[at] ^= static_cast<char>(1 << below(8));
        break;
      case 1:
        if (at < bytes.size()) bytes[at] = static_cast<char>(below(256));
        break;
      case 2:
        bytes.resize(at);
        break;
      case 3:
        bytes.insert(at, std::string(1 + below(8), static_cast<char>(below(256))));
        break;
      case 4:
        bytes.erase(at, below(16));
        break;
      default: {
        static constexpr char kSpecial[] = {'\x00', '\x7f', '\x80', '\xff'};
        if (at < bytes.size()) bytes[at] = kSpecial[below(4)];
      }
    }
  }
  return bytes;
}

// The bytes as a buffer of one to five slices cut at random points: gRPC
// hands a message over in as many pieces as it arrived in.
inline grpc::ByteBuffer Sliced(const std::string& bytes, std::mt19937* rng) {
  std::vector<size_t> cuts = {0, bytes.size()};
  const int extra = static_cast<int>((*rng)() % 5);
  for (int i = 0; i < extra && !bytes.empty(); ++i) cuts.push_back((*rng)() % bytes.size());
  std::sort(cuts.begin(), cuts.end());
  std::vector<grpc::Slice> slices;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    slices.emplace_back(bytes.data() + cuts[i], cuts[i + 1] - cuts[i]);
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

}  // namespace mx::testing

#endif  // MX_TESTS_PROTO_MUTATE_H_
