#include "worker/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "rpc/metrics.h"
#include "worker/checkpoint.h"
#include "worker/initializer.h"

namespace mx {

namespace {

double Now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Runs fn, turning an mx::Error into its status. On an error, waits for
// the operations fn queued, dropping their errors (the first is the
// answer): they use executors that end with the caller, and an engine
// thread still inside one when the process exited crashed it (mx_train
// with labels out of range: SIGSEGV after its error, 1 run in 6).
template <typename F>
absl::Status Catch(F&& fn) {
  absl::Status s;
  try {
    s = fn();
  } catch (const Error& e) {
    s = e.status();
  }
  if (!s.ok()) {
    try {
      WaitAll();
    } catch (const Error&) {
    }
  }
  return s;
}

// Evaluation data must have the training data's sample shapes (the batch
// size may differ): else the evaluation failed after the first epoch.
absl::Status SameSampleShapes(const DataIter& train, const DataIter& eval) {
  const std::vector<DataDesc> t = train.ProvideData(), e = eval.ProvideData();
  for (const DataDesc& ed : e) {
    for (const DataDesc& td : t) {
      if (td.name != ed.name || td.shape.ndim() == 0 || ed.shape.ndim() == 0) continue;
      std::vector<int64_t> a(td.shape.begin() + 1, td.shape.end());
      std::vector<int64_t> b(ed.shape.begin() + 1, ed.shape.end());
      if (a != b) {
        return absl::InvalidArgumentError(absl::StrCat(
            "Fit: the evaluation data's '", ed.name, "' has shape ", ed.shape.ToString(),
            " but the training data's is ", td.shape.ToString(), " (samples of another shape)"));
      }
    }
  }
  return absl::OkStatus();
}

bool IsInput(const std::string& name, const DataIter& data) {
  for (const DataDesc& d : data.ProvideData()) {
    if (d.name == name) return true;
  }
  for (const DataDesc& d : data.ProvideLabel()) {
    if (d.name == name) return true;
  }
  return false;
}

// The values of the symbol's `key` attributes ("__lr_mult__") by node name
// (ListAttrs names them "node$key").
std::map<std::string, std::string> AttrValues(const Symbol& symbol, const std::string& key) {
  std::map<std::string, std::string> values;
  for (const auto& [name, value] : symbol.ListAttrs()) {
    const size_t dollar = name.find('$');
    if (dollar != std::string::npos && name.substr(dollar + 1) == key) {
      values[name.substr(0, dollar)] = value;
    }
  }
  return values;
}

// The variables marked row-sparse (__storage_type__ row_sparse, or "1" as
// MXNet's JSON writes it).
std::set<std::string> RowSparseVariables(const Symbol& symbol) {
  std::set<std::string> names;
  for (const auto& [name, value] : AttrValues(symbol, "__storage_type__")) {
    if (value == "row_sparse" || value == "1") names.insert(name);
  }
  return names;
}

// Multipliers by node name from the symbol's `key` attributes
// ("__lr_mult__"); a value that is no number is an error naming the node.
absl::StatusOr<std::map<std::string, float>> MultFromAttrs(const Symbol& symbol,
                                                           const std::string& key) {
  std::map<std::string, float> mult;
  for (const auto& [name, value] : AttrValues(symbol, key)) {
    float v;
    if (!absl::SimpleAtof(value, &v) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "symbol attribute ", key, " of '", name, "' is '", value, "', not a number"));
    }
    mult[name] = v;
  }
  return mult;
}

// Training steps, for /metrics (rpc/metrics.h).
struct StepMetrics {
  metrics::Histogram* seconds;
  metrics::Counter* samples;

  static const StepMetrics& Get() {
    static const StepMetrics m{
        metrics::Registry::Global()
            .AddHistogram("mx_worker_step_seconds",
                          "Time of one training step (batch), from the end of one to the end of "
                          "the next",
                          metrics::LatencyBuckets())
            ->With({}),
        metrics::Registry::Global()
            .AddCounter("mx_worker_samples_total", "Training samples processed")
            ->With({})};
    return m;
  }
};

}  // namespace

FeedForward::FeedForward(Symbol symbol, std::vector<Context> contexts)
    : symbol_(std::move(symbol)), contexts_(std::move(contexts)) {}

absl::StatusOr<std::vector<std::unique_ptr<Executor>>> FeedForward::BindAll(
    const DataIter& data, bool for_training) {
  const int devices = for_training ? static_cast<int>(contexts_.size()) : 1;
  if (devices == 0) return absl::InvalidArgumentError("no context to run on");
  const int batch = data.batch_size();
  if (batch % devices != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch size ", batch, " does not split evenly over ", devices, " contexts"));
  }
  std::map<std::string, Shape> shapes;
  std::map<std::string, GradReq> reqs;
  for (const auto& descs : {data.ProvideData(), data.ProvideLabel()}) {
    for (const DataDesc& d : descs) {
      Shape s = d.shape;
      s[0] = batch / devices;
      shapes[d.name] = s;
      reqs[d.name] = GradReq::kNull;
    }
  }
  // A table's block holds the rows one batch share can name: at most one per
  // element of the inputs, and at most the table's rows.
  std::map<std::string, int64_t> row_sparse;
  const std::set<std::string> tables = RowSparseVariables(symbol_);
  if (!tables.empty()) {
    int64_t input_elements = 0;
    for (const auto& [name, s] : shapes) input_elements += s.Size();
    absl::StatusOr<Symbol::Shapes> inferred = symbol_.InferShape(shapes, true);
    if (!inferred.ok()) return inferred.status();
    const std::vector<std::string> args = symbol_.ListArguments();
    for (size_t i = 0; i < args.size(); ++i) {
      if (!tables.count(args[i])) continue;
      row_sparse[args[i]] = std::min(inferred->arguments[i][0], input_elements);
    }
  }
  std::vector<std::unique_ptr<Executor>> execs;
  for (int d = 0; d < devices; ++d) {
    MX_ASSIGN_OR_RETURN(
        auto exec, Executor::SimpleBind(symbol_, contexts_[d], shapes,
                                        for_training ? GradReq::kWrite : GradReq::kNull, reqs,
                                        {}, row_sparse));
    execs.push_back(std::move(exec));
  }
  return execs;
}

absl::Status FeedForward::SetUpUpdates(const std::vector<std::unique_ptr<Executor>>& execs,
                                       const FitOptions& options, int batch_size,
                                       const std::vector<std::string>& params) {
  const Executor& exec = *execs[0];
  kvstore_ = nullptr;
  owned_kvstore_.reset();
  optimizer_.reset();
  // The store: the one given, else one of options.kvstore's type, except
  // that one context with a local type updates in place (nothing to sum;
  // MXNet makes no store then either). A dist type always makes one.
  const bool local_type =
      options.kvstore == "local" || options.kvstore == "device" || options.kvstore == "nccl";
  const bool in_place = contexts_.size() == 1 && options.store == nullptr && tables_.empty() &&
                        local_type;
  if (options.store != nullptr) {
    kvstore_ = options.store;
  } else if (!in_place) {
    MX_ASSIGN_OR_RETURN(owned_kvstore_, KVStore::Create(options.kvstore));
    kvstore_ = owned_kvstore_.get();
  }
  Optimizer::Options opt_options = options.optimizer_options;
  if (!opt_options.count("rescale_grad")) {
    // dist_sync servers sum every worker's gradient.
    const bool summed = kvstore_ != nullptr && (kvstore_->type() == "dist_sync" ||
                                                kvstore_->type() == "dist_device_sync");
    const int workers = summed ? kvstore_->num_workers() : 1;
    opt_options["rescale_grad"] = absl::StrCat(1.0 / (static_cast<double>(batch_size) * workers));
  }
  MX_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> optimizer,
                      Optimizer::Create(options.optimizer, opt_options));
  std::map<int, std::string> names;
  for (size_t i = 0; i < params.size(); ++i) names[static_cast<int>(i)] = params[i];
  optimizer->SetParamNames(names);
  MX_ASSIGN_OR_RETURN(const auto lr_mult, MultFromAttrs(symbol_, "__lr_mult__"));
  MX_ASSIGN_OR_RETURN(const auto wd_mult, MultFromAttrs(symbol_, "__wd_mult__"));
  optimizer->SetLrMult(lr_mult);
  optimizer->SetWdMult(wd_mult);
  if (kvstore_ == nullptr) {
    optimizer_ = std::move(optimizer);
    optimizer_->SplitLargeUpdates(true);  // its updates are this step's critical path
    if (!options.optimizer_states_path.empty()) {
      return optimizer_->LoadStatesFromFile(options.optimizer_states_path);
    }
    return absl::OkStatus();
  }
  MX_RETURN_IF_ERROR(kvstore_->SetOptimizer(std::move(optimizer)));
  TableInit table_init;
  if (!tables_.empty()) {
    // Tables start uniform: with the uniform initializer's scale when it is
    // the initializer, else its default.
    auto scale = options.initializer_options.find("scale");
    table_init.scale = 0.07f;
    if (options.initializer == "uniform" && scale != options.initializer_options.end() &&
        !absl::SimpleAtof(scale->second, &table_init.scale)) {
      return absl::InvalidArgumentError(
          absl::StrCat("initializer option scale '", scale->second, "' is not a number"));
    }
    table_init.seed = NextRandomSeed();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    auto table = tables_.find(params[i]);
    MX_RETURN_IF_ERROR(table != tables_.end()
                           ? kvstore_->InitRowSparse(static_cast<int>(i), table->second.shape,
                                                     table_init)
                           : kvstore_->Init(static_cast<int>(i), exec.arg_dict().at(params[i])));
  }
  if (!tables_path_.empty()) {
    MX_RETURN_IF_ERROR(RestoreTables(tables_path_));
    tables_path_.clear();  // restored once; later checkpoints are the model's
  }
  // Start every device (and, distributed, every worker) from the store's
  // values: the first Init of a key wins.
  for (size_t i = 0; i < params.size(); ++i) {
    if (tables_.count(params[i])) continue;  // pulled by rows, per batch
    std::vector<NDArray> weights;
    for (const auto& e : execs) weights.push_back(e->arg_dict().at(params[i]));
    MX_RETURN_IF_ERROR(kvstore_->Pull(static_cast<int>(i), weights));
  }
  // One worker loads the states into the store, and the others start
  // training once they are there: every worker loaded them, and in
  // dist_async a late one rewound the states of the others' updates. A
  // resumed run meets at the barrier with or without states (a checkpoint
  // of MXNet's has none), so that workers that see the file and workers
  // that do not still agree on their barriers.
  if (options.optimizer_states_path.empty() && options.begin_epoch == 0) return absl::OkStatus();
  if (options.optimizer_states_path.empty()) return kvstore_->Barrier();
  return OnOneWorker(options.optimizer_states_path,
                     [&] { return kvstore_->LoadOptimizerStates(options.optimizer_states_path); });
}

absl::Status FeedForward::OnOneWorker(const std::string& path,
                                      const std::function<absl::Status()>& load) {
  const int loader = kvstore_->first_live_rank();
  if (kvstore_->rank() == loader) MX_RETURN_IF_ERROR(load());
  MX_RETURN_IF_ERROR(kvstore_->Barrier());
  // An elastic job's barrier completes without a worker that died: the
  // others would train from fresh or half-loaded state.
  if (kvstore_->first_live_rank() != loader) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", loader, ", which loaded ", path,
                     " into the servers, died before it finished (its error, if any, is in its "
                     "log): resume again"));
  }
  return absl::OkStatus();
}

void FeedForward::Update(const std::vector<std::unique_ptr<Executor>>& execs,
                         const std::vector<std::string>& params) {
  if (optimizer_ != nullptr) {
    for (size_t i = 0; i < params.size(); ++i) {
      optimizer_->Update(static_cast<int>(i), execs[0]->arg_dict().at(params[i]),
                         execs[0]->grad_dict().at(params[i]));
    }
    return;
  }
  // Backward produces the last layers' gradients first: buckets fill from
  // the end, each sent as soon as its gradients are ready (one PushPull
  // of several keys, as the store prefers; one key each when it has no
  // preference).
  for (const auto& [name, table] : tables_) {
    std::vector<RowSparseNDArray>& rows = pending_pushes_[name];
    rows.clear();
    for (const auto& e : execs) rows.push_back(e->row_sparse_grad(name));
  }
  std::vector<size_t> dense;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!tables_.count(params[i])) dense.push_back(i);
  }
  const int64_t bucket_bytes = kvstore_->bucket_bytes();
  std::vector<Key> keys;
  std::vector<std::vector<NDArray>> grads, weights;
  int64_t bytes = 0;
  for (size_t j = dense.size(); j-- > 0;) {
    const size_t i = dense[j];
    keys.emplace_back(static_cast<int>(i));
    grads.emplace_back();
    weights.emplace_back();
    for (const auto& e : execs) {
      grads.back().push_back(e->grad_dict().at(params[i]));
      weights.back().push_back(e->arg_dict().at(params[i]));
    }
    bytes += grads.back()[0].size() * static_cast<int64_t>(sizeof(float));
    if (j > 0 && bytes < bucket_bytes) continue;
    // Communication outranks computation, and the first layers (needed
    // first by the next forward pass) outrank the last.
    const int priority = static_cast<int>(params.size() - i);
    if (keys.size() == 1) {
      ThrowIfError(kvstore_->PushPull(keys[0], grads[0], weights[0], priority));
    } else {
      ThrowIfError(kvstore_->PushPull(keys, grads, weights, priority));
    }
    keys.clear();
    grads.clear();
    weights.clear();
    bytes = 0;
  }
}

absl::Status FeedForward::InitParams(const Executor& exec, const FitOptions& options) {
  MX_ASSIGN_OR_RETURN(auto init, CreateInitializer(options.initializer,
                                                   options.initializer_options));
  // A variable's own initializer (its __init__ attribute, as MXNet's
  // Variable(init=...) and symbol files give it) comes first, as in MXNet.
  const std::map<std::string, std::string> attrs = symbol_.ListAttrs();
  auto initialize = [&](const std::string& name, NDArray* target) -> absl::Status {
    auto own = attrs.find(name + "$__init__");
    if (own == attrs.end()) return (*init)(name, target);
    absl::StatusOr<std::unique_ptr<Initializer>> by_attr = InitializerFromAttr(own->second);
    if (!by_attr.ok()) {
      return absl::Status(by_attr.status().code(),
                          absl::StrCat("parameter '", name, "': ", by_attr.status().message()));
    }
    return (*by_attr)->InitByRule(name, target);
  };
  auto fill = [&](const std::map<std::string, NDArray>& bound,
                  std::map<std::string, NDArray>* params,
                  const std::vector<std::string>& names) -> absl::Status {
    for (const std::string& name : names) {
      NDArray target = bound.at(name);
      auto it = params->find(name);
      if (it != params->end()) {
        if (it->second.shape() != target.shape()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "parameter '", name, "' has shape ", it->second.shape().ToString(),
              " but the network needs ", target.shape().ToString()));
        }
        target.Assign(it->second);
      } else {
        MX_RETURN_IF_ERROR(initialize(name, &target));
      }
      (*params)[name] = target;  // the model now refers to the bound array
    }
    return absl::OkStatus();
  };
  std::vector<std::string> args;
  for (const auto& [name, a] : exec.arg_dict()) {
    if (exec.grad_dict().count(name) && !exec.row_sparse_args().count(name)) args.push_back(name);
  }
  std::vector<std::string> aux = symbol_.ListAuxiliaryStates();
  MX_RETURN_IF_ERROR(fill(exec.arg_dict(), &arg_params_, args));
  return fill(exec.aux_dict(), &aux_params_, aux);
}

absl::Status FeedForward::Fit(DataIter* train, DataIter* eval, const FitOptions& options) {
  if (train == nullptr) return absl::InvalidArgumentError("Fit: no training data");
  if (eval != nullptr) MX_RETURN_IF_ERROR(SameSampleShapes(*train, *eval));
  MX_ASSIGN_OR_RETURN(auto execs, BindAll(*train, true));
  Executor& exec = *execs[0];
  MX_RETURN_IF_ERROR(InitParams(exec, options));
  // Parameters in a fixed order: their index is their key.
  std::vector<std::string> params;
  for (const std::string& name : symbol_.ListArguments()) {
    if (exec.grad_dict().count(name)) params.push_back(name);
  }
  if (!tables_.empty() && owned_kvstore_ != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Fit: row-sparse parameter '", tables_.begin()->first,
        "' lives in the store of the last Fit, which a new Fit would replace: save a checkpoint "
        "and resume from it instead"));
  }
  MX_RETURN_IF_ERROR(FindTables(exec, *train, params));
  MX_RETURN_IF_ERROR(Catch([&] {
    for (size_t d = 1; d < execs.size(); ++d) {
      for (const auto& [name, a] : exec.arg_dict()) {
        NDArray dst = execs[d]->arg_dict().at(name);
        dst.Assign(a);
      }
      for (const auto& [name, a] : exec.aux_dict()) {
        NDArray dst = execs[d]->aux_dict().at(name);
        dst.Assign(a);
      }
    }
    return absl::OkStatus();
  }));
  MX_RETURN_IF_ERROR(SetUpUpdates(execs, options, train->batch_size(), params));

  MX_ASSIGN_OR_RETURN(auto metric, CreateMetric(options.eval_metric));
  const int64_t share = train->batch_size() / static_cast<int64_t>(execs.size());
  std::vector<Executor*> devices;
  for (const auto& e : execs) devices.push_back(e.get());
  for (int epoch = options.begin_epoch; epoch < options.num_epoch; ++epoch) {
    metric->Reset();
    const double start = Now();
    int nbatch = 0;
    int64_t samples = 0;
    train->Reset();
    DataBatch batch;
    absl::Status st = Catch([&]() -> absl::Status {
      const StepMetrics& step_metrics = StepMetrics::Get();
      auto step_start = std::chrono::steady_clock::now();
      while (train->Next(&batch)) {
        const int64_t valid = train->batch_size() - batch.pad;
        PrepareTables(devices, *train, batch);
        for (size_t d = 0; d < execs.size(); ++d) {
          Executor& e = *execs[d];
          const int64_t begin = d * share;
          for (size_t i = 0; i < batch.data.size(); ++i) {
            NDArray dst = e.arg_dict().at(train->ProvideData()[i].name);
            dst.Assign(batch.data[i].Slice(begin, begin + share));
          }
          for (size_t i = 0; i < batch.label.size(); ++i) {
            NDArray dst = e.arg_dict().at(train->ProvideLabel()[i].name);
            dst.Assign(batch.label[i].Slice(begin, begin + share));
          }
          e.Forward(true);
          e.Backward();
        }
        Update(execs, params);
        for (size_t d = 0; d < execs.size(); ++d) {
          const int64_t begin = d * share;
          std::vector<NDArray> labels;
          for (const NDArray& l : batch.label) labels.push_back(l.Slice(begin, begin + share));
          const int pad = static_cast<int>(std::clamp<int64_t>(begin + share - valid, 0, share));
          metric->Update(labels, execs[d]->outputs(), pad);
        }
        ++nbatch;
        samples += valid;
        // The training thread runs ahead of the engine by at most the
        // metric's wait for this step's outputs: from one step to the next
        // is the step's time as a user sees it.
        const auto now = std::chrono::steady_clock::now();
        step_metrics.seconds->Observe(std::chrono::duration<double>(now - step_start).count());
        step_metrics.samples->Add(static_cast<double>(valid));
        step_start = now;
        BatchEndParam p{epoch, nbatch, train->batch_size(), metric.get()};
        for (const auto& cb : options.batch_end_callbacks) cb(p);
      }
      FlushTablePushes();
      AverageAuxStates(execs);
      WaitAll();
      return absl::OkStatus();
    });
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("epoch ", epoch, ": ", st.message()));
    }
    if (nbatch == 0) {  // else the metrics say nan and the model is untrained
      return absl::FailedPreconditionError(absl::StrCat(
          "epoch ", epoch, ": the training data gave no batch of ", train->batch_size(),
          " samples (fewer samples than a batch, and the last batch discarded?)"));
    }
    EpochEndParam end;
    end.epoch = epoch;
    end.seconds = Now() - start;
    end.samples_per_second = samples / std::max(end.seconds, 1e-9);
    end.train_metrics = metric->Get();
    end.model = this;
    if (eval != nullptr) {
      MX_ASSIGN_OR_RETURN(auto eval_metric, CreateMetric(options.eval_metric));
      MX_RETURN_IF_ERROR(ForEachBatch(eval, [&](const DataBatch& b, Executor& e) {
        eval_metric->Update(b.label, e.outputs(), b.pad);
        return absl::OkStatus();
      }));
      end.eval_metrics = eval_metric->Get();
    }
    bool go_on = true;
    for (const auto& cb : options.epoch_end_callbacks) go_on = cb(end) && go_on;
    if (!go_on) break;
  }
  return absl::OkStatus();
}

void FeedForward::AverageAuxStates(const std::vector<std::unique_ptr<Executor>>& execs) {
  if (execs.size() < 2) return;
  for (const auto& [name, first] : execs[0]->aux_dict()) {
    NDArray mean = first.Copy(cpu());
    for (size_t d = 1; d < execs.size(); ++d) mean += execs[d]->aux_dict().at(name).Copy(cpu());
    mean *= 1.0f / static_cast<float>(execs.size());
    for (const auto& e : execs) {
      NDArray dst = e->aux_dict().at(name);
      dst.Assign(mean);
    }
  }
}

absl::Status FeedForward::ForEachBatch(
    DataIter* data, const std::function<absl::Status(const DataBatch&, Executor&)>& fn) {
  MX_ASSIGN_OR_RETURN(auto execs, BindAll(*data, false));
  Executor& exec = *execs[0];
  for (const std::string& name : exec.row_sparse_args()) {
    if (kvstore_ == nullptr || !tables_.count(name)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "row-sparse parameter '", name, "' lives in the KVStore of Fit: predict and score "
          "after Fit, in the same process"));
    }
  }
  for (const std::string& name : symbol_.ListArguments()) {
    if (IsInput(name, *data) || exec.row_sparse_args().count(name)) continue;
    auto it = arg_params_.find(name);
    if (it == arg_params_.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "parameter '", name, "' is not initialized: Fit or load a checkpoint first"));
    }
    NDArray dst = exec.arg_dict().at(name);
    if (it->second.shape() != dst.shape()) {  // Assign said only "shape mismatch"
      return absl::InvalidArgumentError(
          absl::StrCat("parameter '", name, "' has shape ", it->second.shape().ToString(),
                       " but the network bound to this data needs ", dst.shape().ToString(),
                       " (data of another shape than the model was trained on?)"));
    }
    MX_RETURN_IF_ERROR(Catch([&] {
      dst.Assign(it->second);
      return absl::OkStatus();
    }));
  }
  for (const auto& [name, value] : aux_params_) {
    NDArray dst = exec.aux_dict().at(name);  // LoadCheckpoint keeps only the network's
    if (value.shape() != dst.shape()) {
      return absl::InvalidArgumentError(
          absl::StrCat("auxiliary state '", name, "' has shape ", value.shape().ToString(),
                       " but the network needs ", dst.shape().ToString()));
    }
    MX_RETURN_IF_ERROR(Catch([&] {
      dst.Assign(value);
      return absl::OkStatus();
    }));
  }
  return Catch([&]() -> absl::Status {
    data->Reset();
    DataBatch batch;
    int nbatch = 0;
    while (data->Next(&batch)) {
      for (size_t i = 0; i < batch.data.size(); ++i) {
        NDArray dst = exec.arg_dict().at(data->ProvideData()[i].name);
        dst.Assign(batch.data[i]);
      }
      PrepareTables({&exec}, *data, batch);
      exec.Forward(false);
      MX_RETURN_IF_ERROR(fn(batch, exec));
      ++nbatch;
    }
    // Else a score is nan (an empty test file) and the run "succeeds".
    if (nbatch == 0) {
      return absl::FailedPreconditionError(
          "the evaluation data gave no batch (no samples: an empty file?)");
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<std::vector<NDArray>> FeedForward::Predict(DataIter* data) {
  std::vector<std::vector<float>> outs;
  std::vector<Shape> row_shapes;
  int64_t rows = 0;
  MX_RETURN_IF_ERROR(ForEachBatch(data, [&](const DataBatch& b, Executor& e) {
    outs.resize(e.outputs().size());
    row_shapes.clear();
    const int keep = data->batch_size() - b.pad;
    for (size_t i = 0; i < e.outputs().size(); ++i) {
      const NDArray& o = e.outputs()[i];
      std::vector<float> v = o.Slice(0, keep).ToVector();
      outs[i].insert(outs[i].end(), v.begin(), v.end());
      Shape s = o.shape();
      row_shapes.push_back(s);
    }
    rows += keep;
    return absl::OkStatus();
  }));
  std::vector<NDArray> result;
  for (size_t i = 0; i < outs.size(); ++i) {
    Shape s = row_shapes[i];
    s[0] = rows;
    result.push_back(FromVector(outs[i], s));
  }
  return result;
}

absl::StatusOr<MetricValues> FeedForward::Score(DataIter* data, const std::string& metric_name) {
  MX_ASSIGN_OR_RETURN(auto metric, CreateMetric(metric_name));
  MX_RETURN_IF_ERROR(ForEachBatch(data, [&](const DataBatch& b, Executor& e) {
    metric->Update(b.label, e.outputs(), b.pad);
    return absl::OkStatus();
  }));
  return metric->Get();
}

absl::Status FeedForward::FindTables(const Executor& exec, const DataIter& data,
                                     const std::vector<std::string>& params) {
  tables_.clear();
  pending_pushes_.clear();
  for (const std::string& name : exec.row_sparse_args()) {
    MX_ASSIGN_OR_RETURN(std::string input, exec.RowSparseIndexInput(name));
    bool is_data = false;
    for (const DataDesc& d : data.ProvideData()) is_data = is_data || d.name == input;
    if (!is_data) {
      return absl::InvalidArgumentError(absl::StrCat(
          "row-sparse parameter '", name, "' is indexed by '", input,
          "', which is not a data input of the iterator"));
    }
    const int key = static_cast<int>(
        std::find(params.begin(), params.end(), name) - params.begin());
    tables_[name] = Table{key, exec.RowSparseTable(name), input};
  }
  return absl::OkStatus();
}

void FeedForward::PrepareTables(const std::vector<Executor*>& execs, const DataIter& data,
                                const DataBatch& batch) {
  const std::vector<DataDesc> inputs = data.ProvideData();
  const int64_t share = data.batch_size() / static_cast<int64_t>(execs.size());
  // Each device's rows of each table, and their union, pulled once.
  std::vector<std::string> names;
  std::vector<std::vector<std::vector<int64_t>>> ids;  // [table][device]
  std::vector<std::vector<int64_t>> all;               // [table]
  std::map<std::pair<size_t, int64_t>, size_t> found;  // (input, rows) -> table
  for (const auto& [name, table] : tables_) {
    const size_t input = std::find_if(inputs.begin(), inputs.end(), [&](const DataDesc& d) {
                           return d.name == table.index_input;
                         }) - inputs.begin();
    names.push_back(name);
    // Tables indexed by the same input (with as many rows) need the same ids.
    auto [same, first] = found.try_emplace({input, table.shape[0]}, ids.size());
    if (!first) {
      ids.push_back(ids[same->second]);
      all.push_back(all[same->second]);
      continue;
    }
    ids.emplace_back();
    all.emplace_back();
    for (size_t d = 0; d < execs.size(); ++d) {
      ids.back().push_back(UniqueRowIds(
          batch.data.at(input).Slice(d * share, (d + 1) * share), table.shape[0]));
      std::vector<int64_t> merged;
      std::set_union(all.back().begin(), all.back().end(), ids.back().back().begin(),
                     ids.back().back().end(), std::back_inserter(merged));
      all.back().swap(merged);
    }
  }
  // The last step's pushes travel with these pulls: one round trip per
  // server for every table (FlushTablePushes leaves none pending).
  std::vector<RowSparseNDArray> rows(names.size());
  std::vector<Key> keys;
  std::vector<std::vector<RowSparseNDArray>> grads;
  std::vector<std::vector<int64_t>> wanted;
  std::vector<size_t> pushed;
  for (size_t t = 0; t < names.size(); ++t) {
    auto pending = pending_pushes_.find(names[t]);
    if (pending == pending_pushes_.end() || pending->second.empty()) {
      ThrowIfError(kvstore_->RowSparsePull(tables_.at(names[t]).key, all[t], &rows[t]));
      continue;
    }
    keys.emplace_back(tables_.at(names[t]).key);
    grads.push_back(std::move(pending->second));
    pending->second.clear();
    wanted.push_back(all[t]);
    pushed.push_back(t);
  }
  if (!keys.empty()) {
    std::vector<RowSparseNDArray> pulled;
    ThrowIfError(kvstore_->PushPullRowSparse(keys, grads, std::move(wanted), &pulled));
    for (size_t i = 0; i < pushed.size(); ++i) rows[pushed[i]] = pulled[i];
  }
  for (size_t t = 0; t < names.size(); ++t) {
    for (size_t d = 0; d < execs.size(); ++d) {
      execs[d]->SetRowSparseArg(names[t], execs.size() == 1 ? rows[t] : Retain(rows[t], ids[t][d]));
    }
  }
}

void FeedForward::FlushTablePushes() {
  for (auto& [name, grads] : pending_pushes_) {
    if (!grads.empty()) ThrowIfError(kvstore_->PushRowSparse(tables_.at(name).key, grads));
    grads.clear();
  }
}

// Rows pulled (and written or assigned) at a time: about 16 MB.
int64_t TableChunkRows(const Shape& table) {
  return std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, table.RowSize()));
}

// The row ids first, first + 1, ..., first + n - 1.
std::vector<int64_t> RowRange(int64_t first, int64_t n) {
  std::vector<int64_t> ids(n);
  std::iota(ids.begin(), ids.end(), first);
  return ids;
}

absl::Status FeedForward::SaveTables(const std::string& path) const {
  if (kvstore_ == nullptr) {
    return absl::FailedPreconditionError(
        "SaveCheckpoint: the row-sparse tables live in the KVStore of Fit: checkpoint during or "
        "after Fit");
  }
  MX_ASSIGN_OR_RETURN(auto writer, ArrayFileWriter::Create(path, tables_.size()));
  for (const auto& [name, table] : tables_) {
    MX_RETURN_IF_ERROR(writer->BeginArray(name, table.shape));
    const int64_t chunk = TableChunkRows(table.shape);
    for (int64_t first = 0; first < table.shape[0]; first += chunk) {
      RowSparseNDArray rows;
      MX_RETURN_IF_ERROR(kvstore_->RowSparsePull(
          table.key, RowRange(first, std::min(chunk, table.shape[0] - first)), &rows));
      MX_RETURN_IF_ERROR(Catch([&] {
        rows.data().WaitToRead();
        return writer->Append(rows.data().data(), rows.data().size());
      }));
    }
  }
  return writer->Finish();
}

absl::Status FeedForward::RestoreTables(const std::string& path) {
  return OnOneWorker(path, [&]() -> absl::Status {
    MX_ASSIGN_OR_RETURN(auto reader, ArrayFileReader::Open(path));
    std::set<std::string> restored;
    for (;;) {
      absl::StatusOr<std::pair<std::string, Shape>> next = reader->NextArray();
      if (absl::IsOutOfRange(next.status())) break;
      MX_RETURN_IF_ERROR(next.status());
      auto table = tables_.find(next->first);
      if (table == tables_.end() || table->second.shape != next->second) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": table '", next->first, "' ", next->second.ToString(),
            table == tables_.end() ? " is not a row-sparse parameter of the model"
                                   : " does not fit the model's " + table->second.shape.ToString()));
      }
      const Shape& shape = table->second.shape;
      const int64_t chunk = TableChunkRows(shape);
      for (int64_t first = 0; first < shape[0]; first += chunk) {
        Shape rows = shape;
        rows[0] = std::min(chunk, shape[0] - first);
        std::vector<float> values(rows.Size());
        MX_RETURN_IF_ERROR(reader->Read(values.data(), values.size()));
        MX_RETURN_IF_ERROR(Catch([&] {
          return kvstore_->AssignRows(
              table->second.key,
              RowSparseNDArray(shape, RowRange(first, rows[0]), FromVector(values, rows)));
        }));
      }
      restored.insert(next->first);
    }
    if (restored.size() != tables_.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": holds ", restored.size(), " of the model's ", tables_.size(),
                       " row-sparse tables"));
    }
    return absl::OkStatus();
  });
}

bool FeedForward::WritesCheckpoints() const {
  return kvstore_ == nullptr || kvstore_->rank() == kvstore_->first_live_rank();
}

absl::Status FeedForward::SaveCheckpoint(const std::string& prefix, int epoch) const {
  // Every worker of a distributed job holds the same parameters: one
  // writes the checkpoint (with the servers' optimizer state), worker 0 or,
  // once it died in an elastic job, the lowest-ranked worker left.
  // The .params file last: it is what a resume looks for, so a writer that
  // died or failed part way (a full disk) leaves no epoch that seems whole
  // but resumes with a fresh optimizer or tables.
  if (!WritesCheckpoints()) return absl::OkStatus();
  if (!tables_.empty()) MX_RETURN_IF_ERROR(SaveTables(CheckpointTablesPath(prefix, epoch)));
  if (optimizer_ != nullptr) {
    MX_RETURN_IF_ERROR(optimizer_->SaveStatesToFile(CheckpointStatesPath(prefix, epoch)));
  } else if (kvstore_ != nullptr) {
    MX_RETURN_IF_ERROR(kvstore_->SaveOptimizerStates(CheckpointStatesPath(prefix, epoch)));
  }
  return mx::SaveCheckpoint(prefix, epoch, symbol_, arg_params_, aux_params_);
}

namespace {

// A checkpoint's arrays must be the network's: MXNet refuses a name that
// is none of its arguments or auxiliary states when it copies them in, as
// this does at the load (an extra "aux:" entry failed at the end of the
// first epoch, outside any error handling).
absl::Status OfTheNetwork(const Checkpoint& ckpt, const std::string& path) {
  auto check = [&](const std::map<std::string, NDArray>& arrays, const char* prefix,
                   const std::vector<std::string>& names, const char* what) -> absl::Status {
    for (const auto& [name, array] : arrays) {
      if (std::find(names.begin(), names.end(), name) != names.end()) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": '", prefix, name, "' is not ", what, " of the network (",
          names.empty() ? "it has none" : absl::StrCat("it has ", absl::StrJoin(names, ", ")),
          ")"));
    }
    return absl::OkStatus();
  };
  MX_RETURN_IF_ERROR(check(ckpt.arg_params, "arg:", ckpt.symbol.ListArguments(), "an argument"));
  return check(ckpt.aux_params, "aux:", ckpt.symbol.ListAuxiliaryStates(), "an auxiliary state");
}

}  // namespace

absl::StatusOr<FeedForward> FeedForward::LoadCheckpoint(const std::string& prefix, int epoch,
                                                         std::vector<Context> contexts,
                                                         const ParamsLoadOptions& options) {
  MX_ASSIGN_OR_RETURN(Checkpoint ckpt, mx::LoadCheckpoint(prefix, epoch, options));
  MX_RETURN_IF_ERROR(OfTheNetwork(ckpt, CheckpointParamsPath(prefix, epoch)));
  FeedForward model(ckpt.symbol, std::move(contexts));
  if (!RowSparseVariables(ckpt.symbol).empty()) {
    model.tables_path_ = CheckpointTablesPath(prefix, epoch);
    if (std::FILE* f = std::fopen(model.tables_path_.c_str(), "rb")) {
      std::fclose(f);
    } else {
      return absl::NotFoundError(absl::StrCat("checkpoint ", prefix, " epoch ", epoch,
                                              " has row-sparse parameters but no tables file ",
                                              model.tables_path_));
    }
  }
  model.arg_params_ = std::move(ckpt.arg_params);
  model.aux_params_ = std::move(ckpt.aux_params);
  return model;
}

}  // namespace mx
