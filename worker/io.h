// Data providers: iterators over batches of (data, label) arrays, as MXNet's
// DataIter. Batches are NDArrays on cpu(0); Model copies them to its
// contexts.
//
//   auto train = mx::MnistIter({.images = ".../train-images-idx3-ubyte.gz",
//                               .labels = ".../train-labels-idx1-ubyte.gz",
//                               .batch_size = 100, .shuffle = true});
//
// (C++17 spells that with a named MnistOptions object.)
//
// Iteration: Reset() starts an epoch; Next() fills the next batch and
// returns false at the end of the epoch. The last incomplete batch is
// handled by LastBatch: kPad fills it with samples from the start and sets
// `pad` to their count (metrics skip them), kDiscard drops it, kRollOver
// keeps the leftover samples for the start of the next epoch. kDiscard and
// kRollOver need batch_size <= the samples of an epoch; kPad repeats
// samples when the batch is larger.
//
// Shuffling visits each sample once per epoch in an order that depends only
// on (seed, epoch number). Epochs are counted from `first_epoch` by the
// Reset() calls that follow at least one Next(), so "Reset(); loop" and
// "loop; Reset()" see the same orders, and a run resumed at epoch e (an
// iterator with first_epoch = e) sees the orders the whole run would have.
//
// Errors in files (missing, truncated, wrong magic, sizes that disagree)
// are absl::Status from the factories naming the file and the offset.
#ifndef MX_WORKER_IO_H_
#define MX_WORKER_IO_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "ndarray/ndarray.h"

namespace mx {

struct DataBatch {
  std::vector<NDArray> data;   // one array per data input (usually one)
  std::vector<NDArray> label;  // one array per label (usually one)
  int pad = 0;                 // trailing samples that are padding
};

// The name and per-batch shape of an input, e.g. ("data", (100,1,28,28)).
struct DataDesc {
  std::string name;
  Shape shape;
};

enum class LastBatch { kPad, kDiscard, kRollOver };

class DataIter {
 public:
  virtual ~DataIter() = default;
  virtual void Reset() = 0;
  // Fills *batch with the next batch; false at the end of the epoch. The
  // arrays may be reused by the next call: copy what must be kept.
  virtual bool Next(DataBatch* batch) = 0;
  virtual std::vector<DataDesc> ProvideData() const = 0;
  virtual std::vector<DataDesc> ProvideLabel() const = 0;
  virtual int batch_size() const = 0;
  // Samples per epoch (after partitioning), or -1 when unknown.
  virtual int64_t num_samples() const { return -1; }
};

struct ArrayIterOptions {
  int batch_size = 100;
  bool shuffle = false;
  uint64_t seed = 0;  // shuffling order, reproducible per seed and epoch
  uint64_t first_epoch = 0;  // the number of the first epoch (see above)
  LastBatch last_batch = LastBatch::kPad;
  std::string data_name = "data";
  std::string label_name = "softmax_label";
};

// Batches over in-memory arrays whose first dimension is the sample.
// data and label must agree in their first dimension.
absl::StatusOr<std::unique_ptr<DataIter>> ArrayIter(
    const NDArray& data, const NDArray& label, const ArrayIterOptions& options);

struct MnistOptions {
  std::string images;  // IDX3 file, plain or gzipped (by magic, not name)
  std::string labels;  // IDX1 file, plain or gzipped
  int batch_size = 100;
  bool shuffle = false;
  uint64_t seed = 0;
  uint64_t first_epoch = 0;
  // (N, 784) when true, else (N, 1, 28, 28).
  bool flat = false;
  // Pixel scale: values are byte / 255 * scale.
  float scale = 1.0f;
  // Distributed training: this worker reads part `part_index` of
  // `num_parts` contiguous parts of equal size ceil(n / num_parts), so every
  // worker takes the same number of batches; where n does not divide,
  // neighbouring parts share a sample and the last part wraps around.
  int part_index = 0;
  int num_parts = 1;
  LastBatch last_batch = LastBatch::kPad;
};

// Reads MNIST-format IDX files, such as Fashion-MNIST from Debian's
// dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist/).
absl::StatusOr<std::unique_ptr<DataIter>> MnistIter(const MnistOptions& options);

struct CsvOptions {
  std::string data_csv;   // one sample per line, comma-separated floats
  std::string label_csv;  // optional; one or more values per line
  Shape data_shape;       // per sample, e.g. (784,) or (1,28,28)
  Shape label_shape = {1};
  int batch_size = 100;
  bool shuffle = false;
  uint64_t seed = 0;
  uint64_t first_epoch = 0;
  int part_index = 0;
  int num_parts = 1;
  LastBatch last_batch = LastBatch::kPad;
};

// Reads CSV files; a line with the wrong number of values or a value that
// is not a finite number (nan, inf, 1e999) is an error naming the file and
// line.
absl::StatusOr<std::unique_ptr<DataIter>> CsvIter(const CsvOptions& options);

// Click logs in libsvm's text format, streamed: one sample per line,
// "LABEL INDEX:1 INDEX:1 ...", exactly `num_fields` features per line (one
// per categorical field, hashed to a global index, as
// worker/ctr_gen.cc writes them), the label 0 or 1 (-1 and +1 also read as
// 0 and 1). The file (plain or gzip) is read a line at a time, never whole;
// Reset() reads it again from the start. A batch's data are the features'
// indices as floats, shape (batch_size, num_fields), for an Embedding
// (indices below 2^24, which floats hold exactly); its label has shape
// (batch_size,). Worker part_index of num_parts reads every num_parts-th
// line. The last incomplete batch is dropped (kDiscard) or padded with its
// own first samples (kPad); kRollOver is not offered. A damaged line
// (another number of features, a value other than 1, an index that is no
// number or not below num_features, a label other than 0, 1, -1 or +1) is
// an mx::Error thrown by Next() naming the file and line.
// Click-log feature indices lie below this: a batch carries them as
// floats, which hold integers exactly below 2^24.
inline constexpr int64_t kMaxFeatures = int64_t{1} << 24;

struct LibSvmOptions {
  std::string path;
  int num_fields = 0;
  int batch_size = 100;
  int part_index = 0;
  int num_parts = 1;
  LastBatch last_batch = LastBatch::kDiscard;
  // Feature indices are below this (the model's table rows), at most
  // kMaxFeatures.
  int64_t num_features = kMaxFeatures;
};
absl::StatusOr<std::unique_ptr<DataIter>> LibSvmIter(const LibSvmOptions& options);

// Wraps an iterator so that the next batch is prepared on a background
// thread while the current one is used. An exception thrown by the inner
// iterator's Next() is rethrown by this Next() on the caller's thread, after
// the batches that preceded it; the epoch then ends until Reset().
std::unique_ptr<DataIter> PrefetchingIter(std::unique_ptr<DataIter> inner);

}  // namespace mx

#endif  // MX_WORKER_IO_H_
