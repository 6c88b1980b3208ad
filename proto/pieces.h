// Pieces: bytes where they lie, in order, kept alive by an owner. A tensor
// received over gRPC is such pieces of its receive buffers (of any byte
// length: a float may straddle two), and the parameter server sums, keeps
// and sends it back from there instead of copying it first. No gRPC here:
// the shard, which knows nothing of the network, works with these too.
#ifndef MX_PROTO_PIECES_H_
#define MX_PROTO_PIECES_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/types/span.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mx {

// Copies n bytes like memcpy, but a large copy writes around the caches
// (non-temporal stores): a destination that is not in cache is then not
// read first, and the copy does not evict what is. For data that are not
// read again soon, such as a received tensor copied to its NDArray: that
// made dist_bench's 16 MiB pushpulls with 1 server and 1 worker about 10%
// faster (6 alternating pairs; with 2 servers and 2 workers, no change).
// Ends with a store fence, so the bytes are visible to other threads
// (once the caller publishes them) like those of memcpy.
inline void CopyAroundCache(void* dst, const void* src, size_t n) {
#if defined(__SSE2__)
  constexpr size_t kMinBytes = 64 << 10;  // smaller copies stay in cache
  if (n >= kMinBytes) {
    char* out = static_cast<char*>(dst);
    const char* in = static_cast<const char*>(src);
    const size_t head = (-reinterpret_cast<uintptr_t>(out)) & 15;  // to align the stores
    std::memcpy(out, in, head);
    out += head, in += head, n -= head;
    for (; n >= 64; n -= 64, out += 64, in += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(out), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(out + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(out + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(out + 48), d);
    }
    std::memcpy(out, in, n);
    _mm_sfence();
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

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
