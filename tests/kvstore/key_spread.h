// How a real model's keys spread over servers, for placement_test and
// bench/key_spread.
#ifndef MX_TESTS_KVSTORE_KEY_SPREAD_H_
#define MX_TESTS_KVSTORE_KEY_SPREAD_H_

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kvstore/placement.h"

namespace mx::testing {

// The parameters of ResNet-50 (v1, ImageNet: 1000 classes), in the order
// MXNet numbers them as KVStore keys (0, 1, ...): each convolution's weight
// (no bias), then its BatchNorm's gamma and beta; the classifier's weight
// and bias last. 161 arrays, 25,557,032 floats: the key set of a real
// model, with its spread of sizes.

// Element counts by key.
inline std::vector<int64_t> ResNet50ParameterSizes() {
  std::vector<int64_t> sizes;
  auto conv_bn = [&](int64_t in, int64_t out, int64_t k) {
    sizes.push_back(out * in * k * k);  // weight
    sizes.push_back(out);               // gamma
    sizes.push_back(out);               // beta
  };
  conv_bn(3, 64, 7);
  int64_t in = 64;
  const int64_t widths[] = {64, 128, 256, 512};
  const int blocks[] = {3, 4, 6, 3};
  for (int stage = 0; stage < 4; ++stage) {
    const int64_t w = widths[stage];
    for (int b = 0; b < blocks[stage]; ++b) {
      if (b == 0) conv_bn(in, 4 * w, 1);  // the projection shortcut
      conv_bn(in, w, 1);
      conv_bn(w, w, 3);
      conv_bn(w, 4 * w, 1);
      in = 4 * w;
    }
  }
  sizes.push_back(2048 * 1000);
  sizes.push_back(1000);
  return sizes;
}

struct Spread {
  double max_over_mean;  // the busiest server's elements over the mean
  int64_t parts;         // slices of all keys together
};

// The spread of keys 0, 1, ... of `sizes` under placement `o`.
inline Spread SpreadOf(const std::vector<int64_t>& sizes, const PlacementOptions& o) {
  std::vector<int64_t> load(o.servers, 0);
  int64_t parts = 0;
  for (size_t key = 0; key < sizes.size(); ++key) {
    for (const KeyPart& p : PlaceKey(static_cast<int>(key), sizes[key], o)) {
      load[p.server] += p.end - p.begin;
      ++parts;
    }
  }
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  return {*std::max_element(load.begin(), load.end()) / (total / o.servers), parts};
}

}  // namespace mx::testing

#endif  // MX_TESTS_KVSTORE_KEY_SPREAD_H_
