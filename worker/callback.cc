// Training callbacks (declared in worker/model.h).
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "ndarray/base.h"
#include "worker/checkpoint.h"
#include "worker/model.h"

namespace mx {

namespace {

double Now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string Format(const MetricValues& values, const std::string& prefix) {
  std::string out;
  for (const auto& [name, v] : values) {
    absl::StrAppend(&out, " ", prefix, name, "=", absl::StrFormat("%.6f", v));
  }
  return out;
}

}  // namespace

BatchEndCallback Speedometer(int batch_size, int frequent) {
  MX_THROW_IF_NOT(frequent >= 1, "Speedometer: frequent must be at least 1, not ", frequent);
  // The clock and the batch it started at: the end of an epoch's first
  // batch (the clock restarts each epoch), then each report.
  struct Clock {
    double at = 0;
    int batch = 0;
  };
  auto clock = std::make_shared<Clock>();
  return [=](const BatchEndParam& p) {
    if (p.nbatch == 1) *clock = {Now(), 1};  // new epoch: restart the clock
    if (p.nbatch % frequent != 0 || p.nbatch == clock->batch) return;
    const double now = Now();
    // The batches timed, not `frequent`: the first report of an epoch times
    // one batch fewer (with frequent 1 it divided by nearly no time).
    const double speed = (p.nbatch - clock->batch) * static_cast<double>(batch_size) /
                         std::max(now - clock->at, 1e-9);
    *clock = {now, p.nbatch};
    std::printf("Epoch[%d] Batch [%d]\tSpeed: %.2f samples/sec%s\n", p.epoch, p.nbatch, speed,
                p.metric ? Format(p.metric->Get(), "").c_str() : "");
    std::fflush(stdout);
  };
}

BatchEndCallback ProgressBar(int64_t batches_per_epoch) {
  const bool tty = isatty(STDOUT_FILENO) == 1;
  return [=](const BatchEndParam& p) {
    if (!tty || batches_per_epoch <= 0) return;
    constexpr int kWidth = 40;
    int filled = static_cast<int>(kWidth * std::min<int64_t>(p.nbatch, batches_per_epoch) /
                                  batches_per_epoch);
    std::printf("\rEpoch[%d] [%s%s] %d/%lld", p.epoch, std::string(filled, '=').c_str(),
                std::string(kWidth - filled, ' ').c_str(), p.nbatch,
                static_cast<long long>(batches_per_epoch));
    if (p.nbatch >= batches_per_epoch) std::printf("\n");
    std::fflush(stdout);
  };
}

EpochEndCallback LogEpoch() {
  return [](const EpochEndParam& p) {
    std::printf("Epoch[%d]%s%s Time cost=%.3f s (%.0f samples/sec)\n", p.epoch,
                Format(p.train_metrics, "Train-").c_str(),
                Format(p.eval_metrics, "Validation-").c_str(), p.seconds, p.samples_per_second);
    std::fflush(stdout);
    return true;
  };
}

EpochEndCallback DoCheckpoint(const std::string& prefix, int period, absl::Status* error) {
  MX_THROW_IF_NOT(period >= 1, "DoCheckpoint: period must be at least 1, not ", period);
  return [=](const EpochEndParam& p) {
    if ((p.epoch + 1) % period != 0) return true;
    absl::Status s = p.model->SaveCheckpoint(prefix, p.epoch + 1);
    if (!s.ok()) {
      s = absl::Status(s.code(), absl::StrCat("checkpoint of epoch ", p.epoch + 1,
                                              " failed: ", s.message()));
      // Printed once: by whoever receives it, or here.
      if (error != nullptr) {
        *error = s;
      } else {
        std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
      }
      return false;  // stop rather than train on without checkpoints
    }
    if (p.model->WritesCheckpoints()) {
      std::printf("Saved checkpoint to \"%s\"\n",
                  CheckpointParamsPath(prefix, p.epoch + 1).c_str());
    }
    return true;
  };
}

EpochEndCallback EarlyStopping(const std::string& metric, int patience, bool higher_is_better) {
  struct State {
    double best = NAN;
    int since_best = 0;
  };
  auto state = std::make_shared<State>();
  return [=](const EpochEndParam& p) {
    const MetricValues& values = p.eval_metrics.empty() ? p.train_metrics : p.eval_metrics;
    for (const auto& [name, v] : values) {
      if (name != metric) continue;
      bool better = std::isnan(state->best) || (higher_is_better ? v > state->best : v < state->best);
      if (better) {
        state->best = v;
        state->since_best = 0;
      } else if (++state->since_best >= patience) {
        std::printf("Early stopping: %s has not improved for %d epochs (best %.6f)\n",
                    metric.c_str(), patience, state->best);
        return false;
      }
    }
    return true;
  };
}

std::string MetricsLogHeader(const std::vector<std::string>& names, bool eval) {
  std::string header = "epoch,seconds,samples_per_second";
  for (const std::string& n : names) absl::StrAppend(&header, ",train_", n);
  if (eval) {
    for (const std::string& n : names) absl::StrAppend(&header, ",eval_", n);
  }
  return header;
}

absl::Status CheckMetricsLogHeader(const std::string& path, const std::string& header) {
  std::ifstream in(path);
  std::string first;
  if (!in || !std::getline(in, first) || first == header) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("metrics log ", path, " has the columns ", first, "; this run's are ", header,
                   " (other metrics, or another order): give another file"));
}

EpochEndCallback MetricsLog(const std::string& path) {
  const bool csv = absl::EndsWith(path, ".csv");
  auto said = std::make_shared<bool>(false);  // the error is printed once
  // JSON has no NaN or infinity: written as Python's json module writes
  // and reads them (a diverged loss made lines json.loads refused).
  auto json = [](double v) -> std::string {
    if (std::isnan(v)) return "NaN";
    if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
    return absl::StrCat(v);
  };
  return [=](const EpochEndParam& p) {
    // One worker of a distributed job writes, as for checkpoints: each
    // appending its own rows made a file of two headers and mixed rows.
    if (p.model != nullptr && !p.model->WritesCheckpoints()) return true;
    // A header only in a new or empty file: a resumed run appending to its
    // log put a second header line in the middle.
    struct stat st;
    const bool empty = stat(path.c_str(), &st) != 0 || st.st_size == 0;
    std::ofstream out(path, std::ios::app);
    if (!out) {
      if (!std::exchange(*said, true)) {
        std::fprintf(stderr, "cannot append to metrics log %s: %s (not said again)\n", path.c_str(),
                     std::strerror(errno));
      }
      return true;
    }
    if (csv) {
      std::vector<std::string> names;
      for (const auto& [n, v] : p.train_metrics) names.push_back(n);
      const std::string header = MetricsLogHeader(names, !p.eval_metrics.empty());
      if (empty) {
        out << header << "\n";
      } else if (absl::Status s = CheckMetricsLogHeader(path, header); !s.ok()) {
        if (!std::exchange(*said, true)) {
          std::fprintf(stderr, "%s (not appended to; not said again)\n",
                       std::string(s.message()).c_str());
        }
        return true;
      }
      out << p.epoch << "," << p.seconds << "," << p.samples_per_second;
      for (const auto& [n, v] : p.train_metrics) out << "," << v;
      for (const auto& [n, v] : p.eval_metrics) out << "," << v;
      out << "\n";
    } else {
      out << "{\"epoch\": " << p.epoch << ", \"seconds\": " << p.seconds
          << ", \"samples_per_second\": " << p.samples_per_second;
      for (const auto& [n, v] : p.train_metrics) out << ", \"train_" << n << "\": " << json(v);
      for (const auto& [n, v] : p.eval_metrics) out << ", \"eval_" << n << "\": " << json(v);
      out << "}\n";
    }
    return true;
  };
}

}  // namespace mx
