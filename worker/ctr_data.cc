#include "worker/ctr_data.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "ndarray/base.h"

namespace mx {
namespace {

double Entropy(double p) {
  if (p <= 0 || p >= 1) return 0;
  return -(p * std::log(p) + (1 - p) * std::log(1 - p));
}

// Writes through zlib: gzip, or plain ("wT") when the path does not end in .gz.
class Writer {
 public:
  explicit Writer(const std::string& path)
      : path_(path), f_(gzopen(path.c_str(), absl::EndsWith(path, ".gz") ? "wb6" : "wT")) {}
  ~Writer() {
    if (f_ != nullptr) gzclose(f_);
  }
  absl::Status Open() const {
    if (f_ != nullptr) return absl::OkStatus();
    return absl::PermissionDeniedError(absl::StrCat("cannot write ", path_, ": ", std::strerror(errno)));
  }
  absl::Status Write(const std::string& s) {
    if (gzwrite(f_, s.data(), static_cast<unsigned>(s.size())) != static_cast<int>(s.size())) {
      int err = 0;
      return absl::DataLossError(absl::StrCat("writing ", path_, ": ", gzerror(f_, &err)));
    }
    return absl::OkStatus();
  }
  absl::Status Close() {
    const int rc = gzclose(f_);
    f_ = nullptr;
    if (rc != Z_OK) return absl::DataLossError(absl::StrCat("closing ", path_, ": zlib error ", rc));
    return absl::OkStatus();
  }

 private:
  std::string path_;
  gzFile f_;
};

}  // namespace

absl::StatusOr<ClickLogStats> WriteClickLog(const ClickLogOptions& o) {
  if (o.samples < 1 || o.fields < 1 || o.vocab < 1 || !(o.zipf > 0) || !(o.scale >= 0) ||
      o.vocab >= ((int64_t{1} << 24) + o.fields - 1) / o.fields) {  // fields x vocab, unwrapped
    return absl::InvalidArgumentError(absl::StrCat(
        "click log: samples, fields and vocab must be at least 1, zipf above 0, scale 0 or more, "
        "and fields x vocab below 2^24 (got ", o.samples, ", ", o.fields, ", ", o.vocab, ", ",
        o.zipf, ", ", o.scale, ")"));
  }
  std::mt19937_64 model_rng(o.model_seed);
  std::normal_distribution<double> normal(0.0, o.scale);
  std::vector<double> w(static_cast<size_t>(o.fields * o.vocab));
  for (double& x : w) x = normal(model_rng);
  std::seed_seq sample_seed{static_cast<uint32_t>(o.seed), static_cast<uint32_t>(o.seed >> 32), 1u};
  std::mt19937_64 rng(sample_seed);
  // The power law's cumulative distribution, for inverse sampling.
  std::vector<double> cdf(static_cast<size_t>(o.vocab));
  double total = 0;
  for (int64_t v = 0; v < o.vocab; ++v) cdf[v] = total += std::pow(static_cast<double>(v + 1), -o.zipf);
  for (double& c : cdf) c /= total;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);

  Writer out(o.path);
  MX_RETURN_IF_ERROR(out.Open());
  ClickLogStats stats;
  double clicks = 0, entropy = 0;
  std::string buffer;
  for (int64_t i = 0; i < o.samples; ++i) {
    double logit = o.bias;
    std::string features;
    for (int f = 0; f < o.fields; ++f) {
      const int64_t v = std::min<int64_t>(
          std::lower_bound(cdf.begin(), cdf.end(), uniform(rng)) - cdf.begin(), o.vocab - 1);
      logit += w[static_cast<size_t>(f * o.vocab + v)];
      absl::StrAppend(&features, " ", f * o.vocab + v, ":1");
    }
    const double p = 1 / (1 + std::exp(-logit));
    const int y = uniform(rng) < p ? 1 : 0;
    clicks += y;
    entropy += Entropy(p);
    absl::StrAppend(&buffer, y, features, "\n");
    if (buffer.size() > (1 << 20)) {
      MX_RETURN_IF_ERROR(out.Write(buffer));
      buffer.clear();
    }
  }
  MX_RETURN_IF_ERROR(out.Write(buffer));
  MX_RETURN_IF_ERROR(out.Close());
  stats.samples = o.samples;
  stats.click_rate = clicks / o.samples;
  stats.best_logloss = entropy / o.samples;
  stats.constant_logloss = Entropy(stats.click_rate);
  return stats;
}

}  // namespace mx
