// Pieces: bytes where they lie, in order, kept alive by an owner. A tensor
// received over gRPC is such pieces of its receive buffers (of any byte
// length: a float may straddle two), and the parameter server sums, keeps
// and sends it back from there instead of copying it first. No gRPC here:
// the shard, which knows nothing of the network, works with these too.
#ifndef MX_PROTO_PIECES_H_
#define MX_PROTO_PIECES_H_

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/types/span.h"

namespace mx {

struct Pieces {
  std::vector<absl::Span<const char>> pieces;
  std::shared_ptr<const void> owner;

  // One piece: the floats of `data`, which it then owns.
  static Pieces Of(std::vector<float> data) {
    auto owned = std::make_shared<const std::vector<float>>(std::move(data));
    return Of(owned->data(), owned->size(), owned);
  }
  // One piece: n floats at `data`, kept alive by `owner`.
  static Pieces Of(const float* data, size_t n, std::shared_ptr<const void> owner) {
    Pieces p;
    p.pieces.emplace_back(reinterpret_cast<const char*>(data), n * sizeof(float));
    p.owner = std::move(owner);
    return p;
  }

  size_t bytes() const {
    size_t n = 0;
    for (absl::Span<const char> p : pieces) n += p.size();
    return n;
  }

  // Copies bytes [begin, begin + n) to dst; the range lies within bytes().
  void CopyTo(size_t begin, size_t n, void* dst) const {
    char* out = static_cast<char*>(dst);
    size_t start = 0;  // of the current piece
    for (absl::Span<const char> p : pieces) {
      if (n == 0) return;
      const size_t end = start + p.size();
      if (begin < end) {
        const size_t take = std::min(end - begin, n);
        std::memcpy(out, p.data() + (begin - start), take);
        out += take;
        begin += take;
        n -= take;
      }
      start = end;
    }
  }

  // The bytes as floats, copied (for tests and small values).
  std::vector<float> ToFloats() const {
    std::vector<float> v(bytes() / sizeof(float));
    CopyTo(0, v.size() * sizeof(float), v.data());
    return v;
  }
};

}  // namespace mx

#endif  // MX_PROTO_PIECES_H_
