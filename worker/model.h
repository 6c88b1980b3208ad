// FeedForward: the training API (MXNet.jl's FeedForward model).
//
//   mx::FeedForward model(net, {mx::cpu()});
//   mx::FitOptions opt;
//   opt.num_epoch = 10;
//   opt.optimizer_options = {{"learning_rate", "0.1"}};
//   absl::Status s = model.Fit(train.get(), test.get(), opt);
//   auto probs = model.Predict(test.get());
//
// Fit binds an executor per context (all contexts of one batch split
// evenly), initializes missing parameters, runs forward and backward,
// updates every parameter with the optimizer (the same updater the KVStore
// applies) and reports metrics per epoch. Parameters live in arg_params()
// and aux_params() between calls and are what checkpoints store.
//
// Row-sparse parameters: a variable with the attribute __storage_type__ =
// row_sparse (MXNet's Variable(stype='row_sparse'); "1" as MXNet's JSON
// writes it), read by Embedding(sparse_grad=True) with indices from a data
// input, is a table that lives in the KVStore only (a local one when Fit
// gets none; sharded over the servers when distributed). Fit creates it
// there (InitRowSparse: uniform, with the "uniform" initializer's scale when
// that is the initializer, else 0.07), and each batch pulls the rows the batch's
// indices name, binds them (Executor's row_sparse arguments) and pushes
// the row-sparse gradient: no process holds the table or a dense gradient
// of it. Predict and Score after Fit pull the rows they need the same way.
// Tables are not in arg_params(). A checkpoint writes them to its .tables
// file (CheckpointTablesPath), pulled and written a range of rows at a
// time by the worker that checkpoints; a model loaded from it restores
// them at Fit (that worker assigns them, KVStore::AssignRows, and the
// others wait at a barrier). Without a distributed store the tables live
// in the store Fit makes, so a second Fit of the same model is refused:
// checkpoint and resume instead.
#ifndef MX_WORKER_MODEL_H_
#define MX_WORKER_MODEL_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "graph/executor.h"
#include "graph/symbol.h"
#include "kvstore/kvstore.h"
#include "kvstore/optimizer.h"
#include "ndarray/ndarray.h"
#include "worker/checkpoint.h"
#include "worker/io.h"
#include "worker/metric.h"

namespace mx {

class FeedForward;

using MetricValues = std::vector<std::pair<std::string, double>>;

// Passed to batch callbacks after each training batch.
struct BatchEndParam {
  int epoch = 0;
  int nbatch = 0;            // batches done in this epoch
  int batch_size = 0;
  const EvalMetric* metric = nullptr;  // training metric so far
};
using BatchEndCallback = std::function<void(const BatchEndParam&)>;

// Passed to epoch callbacks after each epoch (and its evaluation).
struct EpochEndParam {
  int epoch = 0;                 // 0-based epoch just finished
  MetricValues train_metrics;
  MetricValues eval_metrics;     // empty without evaluation data
  double seconds = 0;            // training time of the epoch
  double samples_per_second = 0;
  FeedForward* model = nullptr;

};
// Returning false stops training after this epoch (early stopping).
using EpochEndCallback = std::function<bool(const EpochEndParam&)>;

struct FitOptions {
  int num_epoch = 10;
  // Epochs already done (resuming from a checkpoint of this epoch). For
  // the run to continue as the whole run would have, give the training
  // iterator first_epoch = begin_epoch (its shuffling order) and
  // optimizer_states_path the checkpoint's states.
  int begin_epoch = 0;
  std::string optimizer = "sgd";
  // learning_rate, momentum, wd, ...; rescale_grad defaults to 1/batch_size.
  Optimizer::Options optimizer_options;
  // Optimizer state to resume from (a .states file), if any.
  std::string optimizer_states_path;
  std::string initializer = "uniform";
  std::map<std::string, std::string> initializer_options;
  std::string eval_metric = "accuracy";
  // The type of KVStore that sums gradients and applies the optimizer:
  // one context with a local type (local, device, nccl) updates in place,
  // without a store; a dist type makes one, with rescale_grad as for
  // `store`.
  std::string kvstore = "local";
  // An existing store to train through instead (distributed training: the
  // caller creates it first to learn its rank, for partitioning the data).
  // With a dist_sync store, rescale_grad defaults to 1 / (batch size x
  // workers), as the servers sum every worker's gradient.
  KVStore* store = nullptr;
  std::vector<BatchEndCallback> batch_end_callbacks;
  std::vector<EpochEndCallback> epoch_end_callbacks;
};

class FeedForward {
 public:
  explicit FeedForward(Symbol symbol, std::vector<Context> contexts = {cpu()});

  // Trains on `train`, evaluating on `eval` (may be null) after each epoch.
  // Errors: shapes that do not fit the symbol, bad optimizer or initializer
  // options, an operation that failed during training.
  absl::Status Fit(DataIter* train, DataIter* eval, const FitOptions& options);

  // Outputs over one pass of `data` (padding removed), concatenated along
  // the first dimension; one array per symbol output.
  absl::StatusOr<std::vector<NDArray>> Predict(DataIter* data);
  // Metric values over one pass of `data`.
  absl::StatusOr<MetricValues> Score(DataIter* data, const std::string& metric);

  const Symbol& symbol() const { return symbol_; }
  std::map<std::string, NDArray>& arg_params() { return arg_params_; }
  std::map<std::string, NDArray>& aux_params() { return aux_params_; }

  // Writes symbol, parameters and (after Fit) the optimizer state for
  // `epoch` under `prefix` (see worker/checkpoint.h). In a distributed job
  // only worker 0 writes (the optimizer state then comes from the servers).
  absl::Status SaveCheckpoint(const std::string& prefix, int epoch) const;
  // Whether SaveCheckpoint writes files in this process (not on the other
  // workers of a distributed job).
  bool WritesCheckpoints() const;
  // A model with the symbol and parameters of a checkpoint (damaged files
  // are refused: worker/checkpoint.h).
  static absl::StatusOr<FeedForward> LoadCheckpoint(
      const std::string& prefix, int epoch, std::vector<Context> contexts = {cpu()},
      const ParamsLoadOptions& options = {});

 private:
  // Makes each auxiliary state (BatchNorm's moving mean and variance) the
  // mean of the devices' at the end of an epoch, on every device: each
  // device's saw only its share of the batches, and checkpoints,
  // evaluation and Predict read device 0's (MXNet averages them too).
  static void AverageAuxStates(const std::vector<std::unique_ptr<Executor>>& execs);
  // One training executor per context, each taking an equal share of the
  // batch; or, for inference, one executor on the first context.
  absl::StatusOr<std::vector<std::unique_ptr<Executor>>> BindAll(
      const DataIter& data, bool for_training);
  absl::Status SetUpUpdates(const std::vector<std::unique_ptr<Executor>>& execs,
                            const FitOptions& options, int batch_size,
                            const std::vector<std::string>& params);
  void Update(const std::vector<std::unique_ptr<Executor>>& execs,
              const std::vector<std::string>& params);
  absl::Status InitParams(const Executor& exec, const FitOptions& options);
  absl::Status ForEachBatch(DataIter* data,
                            const std::function<absl::Status(const DataBatch&, Executor&)>& fn);
  // Finds the row-sparse parameters of `exec` (bound by BindAll) and their
  // index inputs among `data`'s, giving them the keys of `params`.
  absl::Status FindTables(const Executor& exec, const DataIter& data,
                          const std::vector<std::string>& params);
  // Binds in each executor (execs[d] takes the d-th share of `batch`) the
  // rows each table needs for its share (its index input's values), pulled
  // in one call per table for all devices; a push the last step left
  // pending travels in that call (a PushPull: one round trip per server).
  void PrepareTables(const std::vector<Executor*>& execs, const DataIter& data,
                     const DataBatch& batch);
  // Sends the pushes PrepareTables would have sent with the next pull.
  void FlushTablePushes();
  // The tables to and from a checkpoint's .tables file, a range of rows at
  // a time (no process holds a table).
  absl::Status SaveTables(const std::string& path) const;
  absl::Status RestoreTables(const std::string& path);
  // Distributed: the first live worker runs `load` (of `path` into the
  // servers) and every worker meets at a barrier after it, failing if that
  // worker did not live to it (an elastic barrier completes without it).
  absl::Status OnOneWorker(const std::string& path, const std::function<absl::Status()>& load);

  Symbol symbol_;
  std::vector<Context> contexts_;
  // Row-sparse parameters (see the header comment), by name.
  struct Table {
    int key;
    Shape shape;
    std::string index_input;  // the data input whose values index it
  };
  std::map<std::string, Table> tables_;
  // Each table's gradients of the last step (one per device), pushed with
  // the next step's pull.
  std::map<std::string, std::vector<RowSparseNDArray>> pending_pushes_;
  // A loaded checkpoint's tables file, restored at Fit; empty: none.
  std::string tables_path_;
  std::map<std::string, NDArray> arg_params_, aux_params_;
  // Exactly one of the two applies updates: the optimizer for one context,
  // the KVStore (which owns the optimizer then) for several.
  std::unique_ptr<Optimizer> optimizer_;
  KVStore* kvstore_ = nullptr;  // owned_kvstore_ or FitOptions::store
  std::unique_ptr<KVStore> owned_kvstore_;
};

// Callbacks in the manner of MXNet's mx.callback.
// Logs "Epoch[e] Batch [n] Speed: s samples/sec <metric>=<v>" every
// `frequent` (>= 1; else mx::Error) batches.
BatchEndCallback Speedometer(int batch_size, int frequent = 50);
// A progress bar redrawn in place when stdout is a terminal, else nothing.
BatchEndCallback ProgressBar(int64_t batches_per_epoch);
// Logs "Epoch[e] Train-accuracy=... Validation-accuracy=... Time cost=...".
EpochEndCallback LogEpoch();
// Saves a checkpoint every `period` (>= 1; else mx::Error) epochs (numbered
// epoch + 1, as MXNet).
// A checkpoint that cannot be written stops training (rather than train on
// without checkpoints) and, given `error`, is recorded there, so that the
// caller can report the run as failed.
EpochEndCallback DoCheckpoint(const std::string& prefix, int period = 1,
                              absl::Status* error = nullptr);
// Stops when the validation metric (or training metric without evaluation
// data) has not improved for `patience` epochs; `higher_is_better` for
// accuracy-like metrics.
EpochEndCallback EarlyStopping(const std::string& metric, int patience,
                               bool higher_is_better = true);
// Appends one record per epoch to `path`: CSV (with a header line when the
// file is new or empty) or JSON lines (NaN and Infinity written as Python
// writes them), chosen by the extension (.csv or .jsonl). In a
// distributed job only the worker that writes checkpoints writes it
// (FeedForward::WritesCheckpoints), with its own training metrics.
EpochEndCallback MetricsLog(const std::string& path);
// The CSV header of a metrics log whose records carry the metrics `names`
// of training and, with `eval`, of evaluation.
std::string MetricsLogHeader(const std::vector<std::string>& names, bool eval);
// A CSV metrics log to append records under `header` to: fine when missing
// or empty; else its first line must be `header` (a resumed run with other
// --eval_metric put its values under the old columns' names).
absl::Status CheckMetricsLogHeader(const std::string& path, const std::string& header);

}  // namespace mx

#endif  // MX_WORKER_MODEL_H_
