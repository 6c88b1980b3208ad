#include "server/shard.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ndarray/ndarray.h"

namespace mx {

ParameterShard::ParameterShard(ShardOptions options) : options_(options) {
  for (int r = 0; r < options_.num_workers; ++r) live_.insert(r);
}

absl::StatusOr<ParameterShard::Key*> ParameterShard::Find(int key) {
  auto it = keys_.find(key);
  if (it == keys_.end()) {
    return absl::NotFoundError(absl::StrCat("key ", key, " was never initialized"));
  }
  return &it->second;
}

absl::Status ParameterShard::Init(int key, const Shape& shape, const std::vector<float>& value) {
  if (!shape.IsValid() || static_cast<int64_t>(value.size()) != shape.Size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "init of key ", key, ": ", value.size(), " values for shape ", shape.ToString()));
  }
  absl::MutexLock lock(&mu_);
  auto it = keys_.find(key);
  if (it != keys_.end()) {
    if (it->second.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "init of key ", key, ": already initialized with shape ",
          it->second.shape.ToString(), ", now ", shape.ToString()));
    }
    return absl::OkStatus();
  }
  Key& k = keys_[key];
  k.shape = shape;
  try {
    k.stored = FromVector(value, shape);
  } catch (const Error& e) {
    keys_.erase(key);
    return e.status();
  }
  return absl::OkStatus();
}

absl::Status ParameterShard::Push(int key, int rank, const std::vector<float>& value) {
  absl::MutexLock lock(&mu_);
  if (rank < 0 || rank >= options_.num_workers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push of key ", key, ": worker rank ", rank, " is outside 0..", options_.num_workers - 1));
  }
  if (dead_.count(rank)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "push of key ", key, ": worker ", rank, " was declared dead"));
  }
  if (!closed_.empty()) {
    return absl::UnavailableError(absl::StrCat("push of key ", key, ": ", closed_));
  }
  MX_ASSIGN_OR_RETURN(Key * k, Find(key));
  if (static_cast<int64_t>(value.size()) != k->shape.Size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push of key ", key, " from worker ", rank, ": ", value.size(),
        " values but the key holds ", k->shape.ToString(), " (", k->shape.Size(), ")"));
  }
  if (!options_.sync) {
    Apply(key, k, value);
    return absl::OkStatus();
  }
  k->pending[rank].push_back(value);
  MaybeComplete(key, k);
  return absl::OkStatus();
}

void ParameterShard::MaybeComplete(int id, Key* k) {
  // Steps complete while every live worker has a push queued.
  for (;;) {
    if (live_.empty()) return;
    for (int r : live_) {
      auto it = k->pending.find(r);
      if (it == k->pending.end() || it->second.empty()) return;
    }
    // Rank order (live_ is sorted): the same bits every run.
    std::vector<float> sum(k->shape.Size(), 0.0f);
    for (int r : live_) {
      std::vector<float>& v = k->pending[r].front();
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += v[i];
      k->pending[r].pop_front();
    }
    Apply(id, k, sum);
  }
}

void ParameterShard::Apply(int id, Key* k, const std::vector<float>& sum) {
  if (optimizer_ != nullptr) {
    NDArray grad = FromVector(sum, k->shape);
    optimizer_->Update(id, k->stored, grad);
  } else {
    k->stored.Assign(sum);
  }
  k->stored.WaitToRead();
  ++k->version;
}

absl::StatusOr<ParameterShard::Value> ParameterShard::Pull(int key, int64_t min_version,
                                                           absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  MX_ASSIGN_OR_RETURN(Key * k, Find(key));
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return k->version >= min_version || (!options_.elastic && !dead_.empty()) ||
           !closed_.empty();
  };
  while (!ready()) {
    if (mu_.AwaitWithDeadline(absl::Condition(&ready), deadline)) break;
    if (absl::Now() >= deadline) {
      std::vector<int> missing;
      for (int r : live_) {
        auto it = k->pending.find(r);
        if (it == k->pending.end() || it->second.empty()) missing.push_back(r);
      }
      return absl::DeadlineExceededError(absl::StrCat(
          "pull of key ", key, ": version ", min_version, " not reached by the deadline (at ",
          k->version, "; waiting for pushes from worker(s) ", absl::StrJoin(missing, ", "), ")"));
    }
  }
  if (!closed_.empty()) {
    return absl::UnavailableError(absl::StrCat("pull of key ", key, ": ", closed_));
  }
  if (k->version < min_version) {
    return absl::UnavailableError(absl::StrCat(
        "pull of key ", key, ": worker(s) ", DeadWorkers(),
        " died; the step cannot complete (not elastic)"));
  }
  Value v;
  v.data = k->stored.ToVector();
  v.version = k->version;
  return v;
}

absl::Status ParameterShard::SetOptimizer(const std::string& name,
                                          const Optimizer::Options& options,
                                          const std::map<int, std::string>& param_names,
                                          const std::map<std::string, float>& lr_mult,
                                          const std::map<std::string, float>& wd_mult) {
  MX_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> opt, Optimizer::Create(name, options));
  opt->SetParamNames(param_names);
  opt->SetLrMult(lr_mult);
  opt->SetWdMult(wd_mult);
  absl::MutexLock lock(&mu_);
  optimizer_ = std::move(opt);
  return absl::OkStatus();
}

absl::StatusOr<std::string> ParameterShard::SaveOptimizerStates() const {
  absl::MutexLock lock(&mu_);
  if (optimizer_ == nullptr) {
    return absl::FailedPreconditionError("no optimizer is set on this server");
  }
  return optimizer_->SaveStates();
}

absl::Status ParameterShard::LoadOptimizerStates(const std::string& bytes) {
  absl::MutexLock lock(&mu_);
  if (optimizer_ == nullptr) {
    return absl::FailedPreconditionError("set the optimizer before loading its state");
  }
  return optimizer_->LoadStates(bytes);
}

void ParameterShard::MarkDead(int rank) {
  absl::MutexLock lock(&mu_);
  if (!live_.erase(rank)) return;
  dead_.insert(rank);
  if (!options_.elastic) return;  // pulls wake up and fail (see Pull)
  for (auto& [id, k] : keys_) MaybeComplete(id, &k);
}

void ParameterShard::Close(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (closed_.empty()) closed_ = reason.empty() ? "the server is shutting down" : reason;
}

std::set<int> ParameterShard::live_workers() const {
  absl::MutexLock lock(&mu_);
  return live_;
}

std::string ParameterShard::DeadWorkers() const { return absl::StrJoin(dead_, ", "); }

}  // namespace mx
