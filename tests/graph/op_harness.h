// One table of operator cases drives three checks for every operator
// (in the manner of ggml's test-backend-ops):
//   1. forward on CPU against a naive reference written in the case;
//   2. backward against central finite differences of a scalar loss;
//   3. a performance mode (bench/op_bench) timing forward + backward against
//      the naive reference.
// Cases register themselves with MX_OP_CASE from tests/graph/op_cases_*.cc.
#ifndef MX_TESTS_GRAPH_OP_HARNESS_H_
#define MX_TESTS_GRAPH_OP_HARNESS_H_

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "graph/op.h"
#include "ndarray/base.h"

namespace mx::testing {

using HostArrays = std::vector<std::vector<float>>;

struct OpCase {
  std::string name;  // unique, a valid test name: letters, digits, _
  std::string op;
  Params params;
  // Shapes of the operator's arguments (list_arguments order) and
  // auxiliary states.
  std::vector<Shape> inputs;
  std::vector<Shape> aux;
  // Naive forward: outputs from inputs (and aux states), in row-major order.
  std::function<HostArrays(const HostArrays& in, const HostArrays& aux)> reference;
  // Fills input i (default: uniform in [-1, 1]); for labels, positive-only
  // inputs and the like.
  std::function<void(int input, std::vector<float>* values)> init;
  // Inputs without a gradient (labels).
  std::vector<int> no_grad;
  // The scalar whose gradient backward computes. Default: sum over outputs
  // of out * head, with a fixed random head gradient. Loss operators give
  // their loss (e.g. cross-entropy) and take no head gradient.
  std::function<double(const HostArrays& out, const HostArrays& in)> loss;
  bool is_train = false;
  bool check_grad = true;
  double forward_tol = 1e-4;
  double grad_tol = 2e-2;
};

// gtest prints a case by its name.
inline void PrintTo(const OpCase& c, std::ostream* os) { *os << c.name; }

bool RegisterOpCase(OpCase c);
const std::vector<OpCase>& AllOpCases();

#define MX_OP_CASE_CONCAT_INNER_(a, b) a##b
#define MX_OP_CASE_CONCAT_(a, b) MX_OP_CASE_CONCAT_INNER_(a, b)
#define MX_OP_CASE(make) \
  static const bool MX_OP_CASE_CONCAT_(mx_op_case_, __LINE__) = \
      ::mx::testing::RegisterOpCase(make)

// The checks; each returns OK or a message that names the case, the
// output or input, the element and both values.
absl::Status CheckForward(const OpCase& c);
absl::Status CheckGradient(const OpCase& c);
// Seconds per forward+backward of mx and of the reference (forward only).
struct Timing {
  double mx_seconds, reference_seconds;
};
Timing TimeCase(const OpCase& c, int reps);

// Index helpers for references.
inline int64_t Offset4(const Shape& s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return ((n * s[1] + c) * s[2] + h) * s[3] + w;
}

}  // namespace mx::testing

#endif  // MX_TESTS_GRAPH_OP_HARNESS_H_
