// mx_train: trains a network from the command line.
//
//   mx_train --network=mlp --epochs=10 --lr=0.1
//   mx_train --network=lenet --optimizer=sgd --lr=0.05 --momentum=0.9
//            --epochs=2 --checkpoint_prefix=/tmp/lenet
//   mx_train --network=/tmp/lenet-symbol.json --resume_epoch=2 --epochs=4
//            --checkpoint_prefix=/tmp/lenet
//
// Data: Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) by
// default, or CSV files. Prints per-epoch metrics and the final test
// accuracy ("Final test accuracy=0.8765").

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"
#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "graph/symbol.h"
#include "kvstore/kvstore.h"
#include "ndarray/engine.h"
#include "ndarray/env.h"
#include "ndarray/ndarray.h"
#include "ndarray/storage.h"
#include "ndarray/trace.h"
#include "rpc/metrics.h"
#include "rpc/metrics_http.h"
#include "worker/checkpoint.h"
#include "worker/io.h"
#include "worker/metric.h"
#include "worker/model.h"
#include "worker/zoo.h"

ABSL_FLAG(std::string, network, "mlp",
          "built-in network (mlp, lenet, resnet; ctr for --train_libsvm click logs) or a symbol "
          "JSON file");
ABSL_FLAG(std::string, data_dir, "/usr/share/datasets/fashion-mnist",
          "folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]");
ABSL_FLAG(std::string, train_csv, "", "training data as CSV (instead of --data_dir)");
ABSL_FLAG(std::string, train_label_csv, "", "training labels as CSV");
ABSL_FLAG(std::string, test_csv, "", "test data as CSV");
ABSL_FLAG(std::string, data_shape, "1,28,28",
          "the shape of one sample of --train_csv and --test_csv, comma-separated: each row "
          "holds as many values as the shape has elements");
ABSL_FLAG(std::string, test_label_csv, "", "test labels as CSV");
ABSL_FLAG(std::string, train_libsvm, "",
          "training click log in libsvm text, plain or gzip (mx_ctr_gen writes one); for "
          "--network=ctr");
ABSL_FLAG(std::string, test_libsvm, "", "test click log in libsvm text");
ABSL_FLAG(int, ctr_fields, 8, "categorical features per line of the click logs");
ABSL_FLAG(int, ctr_embed_dim, 16, "--network=ctr: the deep embedding's size per feature");
ABSL_FLAG(bool, ctr_sparse, true,
          "--network=ctr: keep the embedding tables row-sparse in the KVStore (each batch moves "
          "only the rows it touches); false: dense tables on every worker");
ABSL_FLAG(int64_t, ctr_features, 80000,
          "feature indices of the click logs lie below this (mx_ctr_gen: fields x vocab)");
ABSL_FLAG(std::string, kvstore, "local",
          "KVStore type: local, device or nccl (GPUs), or dist_sync / dist_async / "
          "dist_device_sync (GPUs) for a job started by deploy/launch.py (the cluster comes from "
          "the environment)");
ABSL_FLAG(std::string, gradient_compression, "none",
          "how a distributed store sends gradients: 2bit (+-threshold or 0 per element, with "
          "error feedback), fp16, or none");
ABSL_FLAG(std::string, gradient_compression_threshold, "",
          "the threshold of --gradient_compression=2bit (above 0; default 0.5)");
ABSL_FLAG(std::string, optimizer, "sgd", "sgd, nag, adam, adagrad, rmsprop or adadelta");
ABSL_FLAG(double, lr, 0.1, "learning rate");
ABSL_FLAG(double, momentum, 0.0, "momentum (sgd, nag)");
ABSL_FLAG(double, wd, 0.0, "weight decay");
ABSL_FLAG(std::string, optimizer_options, "",
          "more optimizer options as key=value,key=value (e.g. beta1=0.9)");
ABSL_FLAG(std::string, initializer, "xavier", "uniform, normal, xavier or constant");
ABSL_FLAG(std::string, initializer_options, "",
          "initializer options as key=value,... (e.g. rnd_type=gaussian,magnitude=2)");
ABSL_FLAG(int, epochs, 10, "number of epochs to train (in total, counting resumed ones)");
ABSL_FLAG(int, batch_size, 100, "samples per batch");
ABSL_FLAG(std::string, contexts, "cpu(0)", "comma-separated contexts, e.g. cpu(0)");
ABSL_FLAG(std::string, checkpoint_prefix, "", "save checkpoints under this prefix");
ABSL_FLAG(int, checkpoint_period, 1, "save a checkpoint every N epochs");
ABSL_FLAG(int, resume_epoch, 0, "resume from the checkpoint of this epoch (needs --checkpoint_prefix)");
ABSL_FLAG(bool, allow_non_finite_params, false,
          "resume from parameters holding NaN or infinite values (refused by default)");
ABSL_FLAG(uint64_t, seed, 0, "random seed (initialization and shuffling)");
ABSL_FLAG(int, threads, 0, "engine worker threads (0: MX_CPU_WORKER_NTHREADS, else 1)");
ABSL_FLAG(std::string, metrics_log, "",
          "append per-epoch metrics to this .csv or .jsonl file (in a distributed job the "
          "worker that writes checkpoints writes it)");
ABSL_FLAG(std::string, eval_metric, "accuracy,ce",
          "metrics to report, comma-separated: accuracy, top_k_accuracy, ce, mse, mae, rmse, f1");
ABSL_FLAG(std::string, metrics_port, "",
          "serve Prometheus metrics and /healthz over HTTP on this port of $MX_METRICS_HOST "
          "(default 127.0.0.1; 0: a free port; default: $MX_METRICS_PORT; unset: no endpoint)");
ABSL_FLAG(std::string, trace, "",
          "write this worker's timeline (Chrome trace events) into this directory when it ends "
          "(default: $MX_TRACE_DIR; deploy/trace_merge.py merges a job's)");
ABSL_FLAG(int, early_stopping, 0, "stop after N epochs without validation improvement (0: off)");

namespace mx {
namespace {

absl::StatusOr<std::vector<Context>> ParseContexts(const std::string& text) {
  std::vector<Context> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    part = absl::StripAsciiWhitespace(part);
    bool gpu = absl::ConsumePrefix(&part, "gpu(");
    if (!gpu && !absl::ConsumePrefix(&part, "cpu(")) {
      return absl::InvalidArgumentError(absl::StrCat("--contexts: '", part, "' is not cpu(i) or gpu(i)"));
    }
    int id;
    if (!absl::ConsumeSuffix(&part, ")") || !absl::SimpleAtoi(part, &id) || id < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--contexts: bad device id in '", text, "'"));
    }
    Context ctx = gpu ? Context::GPU(id) : Context::CPU(id);
    MX_RETURN_IF_ERROR(CheckContextAvailable(ctx));
    out.push_back(ctx);
  }
  if (out.empty()) return absl::InvalidArgumentError("--contexts: no context given");
  return out;
}

// Parses "key=value,key=value" for the flag called `flag`.
absl::StatusOr<std::map<std::string, std::string>> KeyValues(const std::string& flag,
                                                             const std::string& text) {
  std::map<std::string, std::string> out;
  for (absl::string_view kv : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::pair<std::string, std::string> p = absl::StrSplit(kv, absl::MaxSplits('=', 1));
    if (p.first.empty() || p.second.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", kv, "' is not key=value"));
    }
    out[p.first] = p.second;
  }
  return out;
}

absl::StatusOr<Optimizer::Options> OptimizerOptions() {
  Optimizer::Options opts = {{"learning_rate", absl::StrCat(absl::GetFlag(FLAGS_lr))},
                             {"wd", absl::StrCat(absl::GetFlag(FLAGS_wd))}};
  const std::string name = absl::GetFlag(FLAGS_optimizer);
  if (name == "sgd" || name == "nag") {
    opts["momentum"] = absl::StrCat(absl::GetFlag(FLAGS_momentum));
  }
  MX_ASSIGN_OR_RETURN(auto extra,
                      KeyValues("optimizer_options", absl::GetFlag(FLAGS_optimizer_options)));
  for (auto& [k, v] : extra) opts[k] = v;
  return opts;
}

std::string DataFile(const std::string& dir, const std::string& stem) {
  // Debian ships the files gzipped; plain copies work too.
  std::string gz = absl::StrCat(dir, "/", stem, ".gz");
  return std::ifstream(gz).good() ? gz : absl::StrCat(dir, "/", stem);
}

// --data_shape: dimensions from 1 to 2^24, at most 2^26 elements.
absl::StatusOr<Shape> CsvDataShape() {
  const std::string text = absl::GetFlag(FLAGS_data_shape);
  std::vector<int64_t> dims;
  for (absl::string_view d : absl::StrSplit(text, ',')) {
    MX_ASSIGN_OR_RETURN(const int64_t n,
                        ParseInt(absl::StrCat("--data_shape=", text, ": dimension"), std::string(d),
                                 1, int64_t{1} << 24));
    dims.push_back(n);
  }
  const Shape shape(dims.begin(), dims.end());
  const std::optional<int64_t> size = shape.CheckedSize();
  if (!size.has_value() || *size > (int64_t{1} << 26)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--data_shape=", text, ": more than 2^26 values per sample"));
  }
  return shape;
}

absl::StatusOr<std::unique_ptr<DataIter>> MakeIter(bool train, bool flat, int part, int parts) {
  const int batch = absl::GetFlag(FLAGS_batch_size);
  if (batch <= 0) return absl::InvalidArgumentError("--batch_size must be positive");
  const std::string libsvm = absl::GetFlag(train ? FLAGS_train_libsvm : FLAGS_test_libsvm);
  if (!libsvm.empty()) {
    LibSvmOptions o;
    o.path = libsvm;
    o.num_fields = absl::GetFlag(FLAGS_ctr_fields);
    o.num_features = absl::GetFlag(FLAGS_ctr_features);
    o.batch_size = batch;
    if (train) {
      o.part_index = part;
      o.num_parts = parts;
    }
    o.last_batch = train ? LastBatch::kDiscard : LastBatch::kPad;
    MX_ASSIGN_OR_RETURN(auto iter, LibSvmIter(o));
    return PrefetchingIter(std::move(iter));
  }
  const std::string csv = absl::GetFlag(train ? FLAGS_train_csv : FLAGS_test_csv);
  if (!csv.empty()) {
    CsvOptions o;
    o.data_csv = csv;
    o.label_csv = absl::GetFlag(train ? FLAGS_train_label_csv : FLAGS_test_label_csv);
    MX_ASSIGN_OR_RETURN(o.data_shape, CsvDataShape());
    o.batch_size = batch;
    o.shuffle = train;
    o.seed = absl::GetFlag(FLAGS_seed);
    if (train) {
      o.part_index = part;
      o.num_parts = parts;
      o.first_epoch = absl::GetFlag(FLAGS_resume_epoch);  // a resumed run's orders
    }
    return CsvIter(o);
  }
  const std::string dir = absl::GetFlag(FLAGS_data_dir);
  MnistOptions o;
  o.images = DataFile(dir, train ? "train-images-idx3-ubyte" : "t10k-images-idx3-ubyte");
  o.labels = DataFile(dir, train ? "train-labels-idx1-ubyte" : "t10k-labels-idx1-ubyte");
  o.batch_size = batch;
  o.shuffle = train;
  o.seed = absl::GetFlag(FLAGS_seed);
  o.flat = flat;
  if (train) {
    o.part_index = part;
    o.num_parts = parts;
    o.first_epoch = absl::GetFlag(FLAGS_resume_epoch);
  }
  MX_ASSIGN_OR_RETURN(auto iter, MnistIter(o));
  return PrefetchingIter(std::move(iter));
}

// The pooled memory of the CPU, refreshed at each scrape.
void WatchStorage() {
  metrics::Registry& r = metrics::Registry::Global();
  metrics::Gauge* in_use = r.AddGauge("mx_storage_bytes_in_use",
                                      "Bytes in arrays' blocks handed out, by device",
                                      {"device"})->With({"cpu"});
  metrics::Gauge* pooled = r.AddGauge("mx_storage_bytes_pooled",
                                      "Bytes in free blocks the pool keeps for reuse, by device",
                                      {"device"})->With({"cpu"});
  r.OnCollect([in_use, pooled] {
    const StorageStats s = Storage::Get()->Stats(Context::CPU());
    in_use->Set(static_cast<double>(s.bytes_in_use));
    pooled->Set(static_cast<double>(s.bytes_pooled));
  });
}

// Flag values that cannot be meant are refused, naming the flag.
absl::Status CheckFlags() {
  auto at_least = [](const char* flag, int64_t value, int64_t min) -> absl::Status {
    if (value >= min) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", value, ": must be at least ", min));
  };
  MX_RETURN_IF_ERROR(at_least("epochs", absl::GetFlag(FLAGS_epochs), 1));
  MX_RETURN_IF_ERROR(CsvDataShape().status());
  MX_RETURN_IF_ERROR(at_least("batch_size", absl::GetFlag(FLAGS_batch_size), 1));
  MX_RETURN_IF_ERROR(at_least("checkpoint_period", absl::GetFlag(FLAGS_checkpoint_period), 1));
  MX_RETURN_IF_ERROR(at_least("threads", absl::GetFlag(FLAGS_threads), 0));
  if (absl::GetFlag(FLAGS_threads) > kMaxEngineWorkers) {
    return absl::InvalidArgumentError(absl::StrCat("--threads=", absl::GetFlag(FLAGS_threads),
                                                   ": must be at most ", kMaxEngineWorkers));
  }
  MX_RETURN_IF_ERROR(at_least("early_stopping", absl::GetFlag(FLAGS_early_stopping), 0));
  MX_RETURN_IF_ERROR(at_least("resume_epoch", absl::GetFlag(FLAGS_resume_epoch), 0));
  MX_RETURN_IF_ERROR(at_least("ctr_embed_dim", absl::GetFlag(FLAGS_ctr_embed_dim), 1));
  MX_RETURN_IF_ERROR(at_least("ctr_fields", absl::GetFlag(FLAGS_ctr_fields), 1));
  // Indices travel as floats (LibSvmIter).
  if (const int64_t n = absl::GetFlag(FLAGS_ctr_features); n < 1 || n > kMaxFeatures) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ctr_features=", n, ": must be from 1 to ", kMaxFeatures));
  }
  if (absl::GetFlag(FLAGS_resume_epoch) >= absl::GetFlag(FLAGS_epochs)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--epochs=", absl::GetFlag(FLAGS_epochs), " is not more than --resume_epoch=",
        absl::GetFlag(FLAGS_resume_epoch), ": nothing to train (--epochs counts the resumed ones)"));
  }
  // Training and test data from one source: a --train_csv alone tested on
  // Fashion-MNIST from --data_dir, and its "test accuracy" was of that.
  struct Source {
    const char *train, *test;
    bool has_train, has_test;
  };
  for (const Source& f :
       {Source{"train_csv", "test_csv", !absl::GetFlag(FLAGS_train_csv).empty(),
               !absl::GetFlag(FLAGS_test_csv).empty()},
        Source{"train_libsvm", "test_libsvm", !absl::GetFlag(FLAGS_train_libsvm).empty(),
               !absl::GetFlag(FLAGS_test_libsvm).empty()}}) {
    if (f.has_train == f.has_test) continue;
    return absl::InvalidArgumentError(absl::StrCat(
        "--", f.has_train ? f.train : f.test, " without --", f.has_train ? f.test : f.train,
        ": give both (the training and the test data come from one source)"));
  }
  // Without labels a CSV's samples all had label 0, and the run still
  // printed a test accuracy.
  for (const auto& [split, data, labels] :
       {std::tuple{"train", absl::GetFlag(FLAGS_train_csv), absl::GetFlag(FLAGS_train_label_csv)},
        std::tuple{"test", absl::GetFlag(FLAGS_test_csv), absl::GetFlag(FLAGS_test_label_csv)}}) {
    if (!data.empty() && labels.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", split, "_csv needs --", split,
                                                     "_label_csv (the labels of its samples)"));
    }
  }
  // The metrics, before the job is joined; a bad name failed inside Fit.
  absl::StatusOr<std::unique_ptr<EvalMetric>> metric =
      CreateMetric(absl::GetFlag(FLAGS_eval_metric));
  if (!metric.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--eval_metric=", absl::GetFlag(FLAGS_eval_metric), ": ", metric.status().message()));
  }
  if (absl::GetFlag(FLAGS_early_stopping) > 0) {
    const MetricValues computed = (*metric)->Get();
    if (std::none_of(computed.begin(), computed.end(),
                     [](const auto& m) { return m.first == "accuracy"; })) {
      return absl::InvalidArgumentError(
          absl::StrCat("--early_stopping watches accuracy, which --eval_metric=",
                       absl::GetFlag(FLAGS_eval_metric), " does not compute: add accuracy"));
    }
  }
  if (const std::string o = absl::GetFlag(FLAGS_optimizer);
      absl::GetFlag(FLAGS_momentum) != 0 && o != "sgd" && o != "nag") {
    return absl::InvalidArgumentError(absl::StrCat("--momentum applies to sgd and nag, not ", o,
                                                   " (its options go in --optimizer_options)"));
  }
  if (const std::string log = absl::GetFlag(FLAGS_metrics_log); !log.empty()) {
    // At start-up, not after the first epoch.
    if (!std::ofstream(log, std::ios::app)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--metrics_log=", log, ": cannot append to it: ", std::strerror(errno)));
    }
    if (absl::EndsWith(log, ".csv")) {
      MX_ASSIGN_OR_RETURN(auto metric, CreateMetric(absl::GetFlag(FLAGS_eval_metric)));
      std::vector<std::string> names;
      for (const auto& [name, value] : metric->Get()) names.push_back(name);
      MX_RETURN_IF_ERROR(CheckMetricsLogHeader(log, MetricsLogHeader(names, /*eval=*/true)));
    }
  }
  for (const auto& [flag, value] : {std::pair{"lr", absl::GetFlag(FLAGS_lr)},
                                    std::pair{"momentum", absl::GetFlag(FLAGS_momentum)},
                                    std::pair{"wd", absl::GetFlag(FLAGS_wd)}}) {
    if (!std::isfinite(value) || value < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, "=", value, ": must be a finite number, at least 0"));
    }
  }
  return absl::OkStatus();
}

// FNV-1a (64 bits) of every parameter's bytes, in name order: equal for
// bit-identical parameters.
// The optimizer state to resume from: the checkpoint's, or none where it
// has no .states file (MXNet's save_checkpoint writes none), said once:
// the optimizer starts afresh, as MXNet's fit does when it resumes.
std::string ResumedStates(const std::string& prefix, int epoch) {
  std::string path = CheckpointStatesPath(prefix, epoch);
  struct stat st;
  if (stat(path.c_str(), &st) == 0 || errno != ENOENT) return path;  // loading says what is wrong
  std::fprintf(stderr,
               "warning: no optimizer state %s (a checkpoint written by MXNet?): the optimizer "
               "starts afresh (momentum and update counts at zero)\n",
               path.c_str());
  return "";
}

std::string ParamsChecksum(FeedForward& model) {
  uint64_t h = 1469598103934665603ull;
  auto add = [&h](const std::map<std::string, NDArray>& params) {
    for (const auto& [name, array] : params) {
      const std::vector<float> v = array.ToVector();
      const auto* bytes = reinterpret_cast<const unsigned char*>(v.data());
      for (size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ bytes[i]) * 1099511628211ull;
    }
  };
  add(model.arg_params());
  add(model.aux_params());
  return absl::StrFormat("%016x", h);
}

absl::Status Run() {
  MX_RETURN_IF_ERROR(CheckFlags());
  srand(absl::GetFlag(FLAGS_seed));
  // The metrics endpoint first: it answers /healthz 503 until the worker
  // has joined its job.
  MX_ASSIGN_OR_RETURN(const int metrics_port, metrics::MetricsPort(absl::GetFlag(FLAGS_metrics_port)));
  const std::string metrics_host =
      EnvString("MX_METRICS_HOST").empty() ? "127.0.0.1" : EnvString("MX_METRICS_HOST");
  MX_ASSIGN_OR_RETURN(std::unique_ptr<metrics::HttpServer> endpoint,
                      metrics::ServeMetrics(metrics_host, metrics_port, "worker"));
  WatchStorage();
  // Checked before a distributed store joins the job, which would wait for
  // this worker otherwise.
  MX_ASSIGN_OR_RETURN(std::vector<Context> contexts, ParseContexts(absl::GetFlag(FLAGS_contexts)));
  // A distributed store first: its rank selects this worker's part of the data.
  std::unique_ptr<KVStore> store;
  const std::string kv_type = absl::GetFlag(FLAGS_kvstore);
  std::map<std::string, std::string> compression = {
      {"type", absl::GetFlag(FLAGS_gradient_compression)}};
  if (!absl::GetFlag(FLAGS_gradient_compression_threshold).empty()) {
    compression["threshold"] = absl::GetFlag(FLAGS_gradient_compression_threshold);
    if (compression["type"] == "none") {  // set alone, it was ignored
      return absl::InvalidArgumentError(
          "--gradient_compression_threshold needs --gradient_compression=2bit");
    }
  }
  if (kv_type != "local") {
    MX_ASSIGN_OR_RETURN(store, KVStore::Create(kv_type));
    MX_RETURN_IF_ERROR(store->SetGradientCompression(compression));
    // One write (see the final lines): the launcher reads this line.
    std::cout << absl::StrCat("worker ", store->rank(), " of ", store->num_workers(), " (", kv_type,
                              ")\n")
              << std::flush;
  } else if (compression["type"] != "none") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gradient_compression=", compression["type"],
        " applies to --kvstore=dist_sync or dist_async (a local store sends no gradients)"));
  }
  const int part = store ? store->rank() : 0, parts = store ? store->num_workers() : 1;
  metrics::SetNodeInfo("worker", part);
  trace::SetProcessName(absl::StrCat("worker ", part));
  if (endpoint != nullptr) endpoint->SetServing(true);
  const std::string network = absl::GetFlag(FLAGS_network);
  const std::string prefix = absl::GetFlag(FLAGS_checkpoint_prefix);
  const int resume = absl::GetFlag(FLAGS_resume_epoch);
  if (resume > 0 && prefix.empty()) {
    return absl::InvalidArgumentError("--resume_epoch needs --checkpoint_prefix");
  }
  if (!prefix.empty()) MX_RETURN_IF_ERROR(CheckCheckpointPrefix(prefix));

  std::unique_ptr<FeedForward> model;
  if (resume > 0) {
    ParamsLoadOptions load;
    load.allow_non_finite = absl::GetFlag(FLAGS_allow_non_finite_params);
    MX_ASSIGN_OR_RETURN(FeedForward loaded,
                        FeedForward::LoadCheckpoint(prefix, resume, contexts, load));
    model = std::make_unique<FeedForward>(std::move(loaded));
  } else {
    absl::StatusOr<Symbol> net =
        network == "ctr" ? zoo::Ctr(absl::GetFlag(FLAGS_ctr_features),
                                    absl::GetFlag(FLAGS_ctr_embed_dim),
                                    absl::GetFlag(FLAGS_ctr_sparse))
                         : zoo::ByName(network);
    // Not a built-in name: a symbol file (any path, with or without a dot).
    if (!net.ok() &&
        (network.find_first_of("./") != std::string::npos || access(network.c_str(), F_OK) == 0)) {
      net = Symbol::Load(network);
    }
    if (!net.ok()) return net.status();
    model = std::make_unique<FeedForward>(*net, contexts);
  }
  MX_ASSIGN_OR_RETURN(auto train, MakeIter(true, false, part, parts));
  MX_ASSIGN_OR_RETURN(auto test, MakeIter(false, false, 0, 1));

  FitOptions fit;
  fit.num_epoch = absl::GetFlag(FLAGS_epochs);
  fit.begin_epoch = resume;
  fit.optimizer = absl::GetFlag(FLAGS_optimizer);
  MX_ASSIGN_OR_RETURN(fit.optimizer_options, OptimizerOptions());
  if (resume > 0) fit.optimizer_states_path = ResumedStates(prefix, resume);
  fit.initializer = absl::GetFlag(FLAGS_initializer);
  fit.eval_metric = absl::GetFlag(FLAGS_eval_metric);
  fit.store = store.get();
  MX_ASSIGN_OR_RETURN(fit.initializer_options,
                      KeyValues("initializer_options", absl::GetFlag(FLAGS_initializer_options)));

  fit.batch_end_callbacks.push_back(Speedometer(train->batch_size(), 100));
  if (train->num_samples() > 0) {
    fit.batch_end_callbacks.push_back(ProgressBar(train->num_samples() / train->batch_size()));
  }
  fit.epoch_end_callbacks.push_back(LogEpoch());
  absl::Status checkpoint_error;  // a checkpoint that failed stopped training
  if (!prefix.empty()) {
    fit.epoch_end_callbacks.push_back(
        DoCheckpoint(prefix, absl::GetFlag(FLAGS_checkpoint_period), &checkpoint_error));
  }
  if (!absl::GetFlag(FLAGS_metrics_log).empty()) {
    fit.epoch_end_callbacks.push_back(MetricsLog(absl::GetFlag(FLAGS_metrics_log)));
  }
  if (absl::GetFlag(FLAGS_early_stopping) > 0) {
    fit.epoch_end_callbacks.push_back(EarlyStopping("accuracy", absl::GetFlag(FLAGS_early_stopping)));
  }
  MX_RETURN_IF_ERROR(model->Fit(train.get(), test.get(), fit));
  // Without leaving the job: this worker dies to it (the process ends), so
  // a job without --elastic fails, and in an elastic one the next worker
  // writes the checkpoints. Left, it counted as finished: nobody took its
  // place and no checkpoint was written again.
  if (!checkpoint_error.ok()) return checkpoint_error;
  MX_ASSIGN_OR_RETURN(MetricValues score, model->Score(test.get(), "accuracy"));
  // Each line in one write, its values computed first: another thread's
  // message to stderr (which flushes cout) landed inside the checksum's
  // line (found by tests/chaos: "Final params checksum=worker 0: a spare
  // took the rank of server 1 ...", the value on the next line).
  std::cout << absl::StrCat("Final test accuracy=", score[0].second, "\n") << std::flush;
  // Runs that should give the same bits (a fixed seed, a failover with
  // replicas) compare this line.
  std::cout << absl::StrCat("Final params checksum=", ParamsChecksum(*model), "\n") << std::flush;
  if (store != nullptr) MX_RETURN_IF_ERROR(store->Finish());
  return absl::OkStatus();
}

}  // namespace
}  // namespace mx

// Exits 128 + sig after one line on stderr.
extern "C" void StopOnSignal(int sig) { mx::ExitOnStopSignal("mx_train", sig); }

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "trains a network on Fashion-MNIST (or CSV data) and reports test accuracy.\n"
      "Example: mx_train --network=lenet --lr=0.05 --momentum=0.9 --epochs=2");
  mx::ParseFlags(argc, argv);
  // A crash prints its signal and stack (with symbols) before the process dies.
  absl::InitializeSymbolizer(argv[0]);
  absl::InstallFailureSignalHandler(absl::FailureSignalHandlerOptions());
  // SIGTERM and SIGINT stop the worker at once, saying so. A handler, not
  // the default action: a process that is PID 1 (a container's) ignores
  // signals left at their default action.
  std::signal(SIGTERM, StopOnSignal);
  std::signal(SIGINT, StopOnSignal);
  // absl's mutex deadlock detection (on in Debian's build) costs a graph
  // update per lock in gRPC's hot paths.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  // The engine reads its thread count when first used: set it before.
  if (int threads = absl::GetFlag(FLAGS_threads); threads > 0) {
    setenv("MX_CPU_WORKER_NTHREADS", std::to_string(threads).c_str(), 1);
  }
  if (absl::Status t = mx::trace::StartIn(absl::GetFlag(FLAGS_trace), "worker"); !t.ok()) {
    std::cerr << "mx_train: " << t.message() << std::endl;
    return 1;
  }
  absl::Status s = mx::Run();
  if (absl::Status w = mx::trace::Write(); !w.ok()) std::cerr << "mx_train: " << w.message() << "\n";
  if (!s.ok()) {
    std::cerr << "mx_train: " << s.message() << std::endl;
    return 1;
  }
  return 0;
}
