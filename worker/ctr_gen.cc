// mx_ctr_gen: writes a synthetic click log with a planted model
// (worker/ctr_data.h) and says the best log-loss a model can reach on it.
//
//   mx_ctr_gen --out=train.txt.gz --samples=1000000 --seed=1
//   mx_ctr_gen --out=test.txt.gz --samples=100000 --seed=2   (the same planted model)
//
// Prints one line: samples, click rate, the planted model's log-loss (the
// best achievable) and a constant predictor's. Exit 1 on an error or a
// flag that does not parse, 2 on a value out of range.
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "ndarray/env.h"
#include "worker/ctr_data.h"

ABSL_FLAG(std::string, out, "", "the file to write (gzip if it ends in .gz)");
ABSL_FLAG(int64_t, samples, 100000, "samples (lines)");
ABSL_FLAG(int, fields, 8, "categorical fields per sample");
ABSL_FLAG(int64_t, vocab, 10000, "values per field");
ABSL_FLAG(double, zipf, 1.1, "the power law's exponent (how skewed the values are)");
ABSL_FLAG(double, scale, 0.5, "the planted weights' standard deviation");
ABSL_FLAG(double, bias, -1.5, "the planted model's bias (sets the click rate)");
ABSL_FLAG(uint64_t, model_seed, 1, "the planted model's seed (give a training and a test log the same)");
ABSL_FLAG(uint64_t, seed, 1, "the samples' seed (give a training and a test log different ones)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("writes a synthetic click log with a planted model");
  mx::ParseFlags(argc, argv);
  mx::ClickLogOptions o;
  o.path = absl::GetFlag(FLAGS_out);
  if (o.path.empty()) {
    std::cerr << "mx_ctr_gen: give --out\n";
    return 2;
  }
  o.samples = absl::GetFlag(FLAGS_samples);
  o.fields = absl::GetFlag(FLAGS_fields);
  o.vocab = absl::GetFlag(FLAGS_vocab);
  o.zipf = absl::GetFlag(FLAGS_zipf);
  o.scale = absl::GetFlag(FLAGS_scale);
  o.bias = absl::GetFlag(FLAGS_bias);
  o.model_seed = absl::GetFlag(FLAGS_model_seed);
  o.seed = absl::GetFlag(FLAGS_seed);
  absl::StatusOr<mx::ClickLogStats> stats = mx::WriteClickLog(o);
  if (!stats.ok()) {
    std::cerr << "mx_ctr_gen: " << stats.status().message() << "\n";
    return stats.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::cout << "mx_ctr_gen: wrote " << stats->samples << " samples to " << o.path
            << "; click rate " << stats->click_rate << "; best log-loss (the planted model's) "
            << stats->best_logloss << "; a constant predictor's " << stats->constant_logloss
            << std::endl;
  return 0;
}
