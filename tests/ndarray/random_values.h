// Test inputs shared by the ndarray tests.
#ifndef MX_TESTS_NDARRAY_RANDOM_VALUES_H_
#define MX_TESTS_NDARRAY_RANDOM_VALUES_H_

#include <cstdint>
#include <random>
#include <vector>

namespace mx {

// n floats uniform in [-1, 1), the same for the same seed.
inline std::vector<float> RandomValues(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1, 1);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

}  // namespace mx

#endif  // MX_TESTS_NDARRAY_RANDOM_VALUES_H_
