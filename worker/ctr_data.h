// A synthetic click log with a planted model, for the click-through
// workload (issue 18): the best log-loss any model can reach on it is
// known, so training can be judged against it.
//
// Each sample has `fields` categorical features. In field f the value v is
// drawn from a power law (Zipf, exponent `zipf`, over `vocab` values: a
// few values are frequent, most are rare, as in real click logs) and
// written as the global index f * vocab + v. The planted model is
// logistic: p(click) = sigmoid(bias + sum over fields of w[f][v]), with
// every w[f][v] drawn once from N(0, scale^2) (by model_seed); the label
// is drawn from p(click). Samples are drawn by `seed`: a training and a
// test log share model_seed and differ in seed. The same options give the
// same file.
#ifndef MX_WORKER_CTR_DATA_H_
#define MX_WORKER_CTR_DATA_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace mx {

struct ClickLogOptions {
  std::string path;  // written as libsvm text (io.h, LibSvmIter); gzip when it ends in .gz
  int64_t samples = 100000;
  int fields = 8;
  int64_t vocab = 10000;  // values per field
  double zipf = 1.1;
  double scale = 0.5;
  double bias = -1.5;
  uint64_t model_seed = 1;  // the planted weights
  uint64_t seed = 1;        // the samples
};

struct ClickLogStats {
  int64_t samples = 0;
  double click_rate = 0;
  // The planted model's expected log-loss (mean binary entropy of its
  // click probabilities): the best any model can reach in expectation.
  double best_logloss = 0;
  // Predicting the click rate for every sample: what a model that learned
  // nothing reaches.
  double constant_logloss = 0;
};

// Writes the log; errors name the file.
absl::StatusOr<ClickLogStats> WriteClickLog(const ClickLogOptions& options);

}  // namespace mx

#endif  // MX_WORKER_CTR_DATA_H_
