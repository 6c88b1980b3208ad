// ArrayIter, MnistIter and CsvIter: samples held in host memory, batched by
// one iterator class (BatchIter) that owns the epoch order and the
// last-batch rule. PrefetchingIter is in prefetching_iter.cc.
//
// Epochs. An epoch is the run of Next() calls after construction or after a
// Reset(); Reset() when no Next() has been called since the last one is a
// no-op, so both "Reset(); loop" and "loop; Reset()" see epochs 0, 1, 2...
// With shuffle, epoch e visits the samples in an order that depends only on
// (seed, e): a Fisher-Yates shuffle driven by std::mt19937_64, whose output
// the C++ standard fixes, so orders agree across runs and platforms.
//
// Batches are gathered with one memcpy per run of consecutive samples (one
// per sample when shuffled) straight into the iterator's two batch arrays,
// which are allocated once and reused.
#include "worker/io.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "worker/idx_reader.h"

namespace mx {

namespace {

// ---- Sample storage.

// Samples in host memory: row i of the data and of the label belong to
// sample i. Gather copies the rows of samples idx[0..n) to consecutive rows
// of data and label.
class SampleTable {
 public:
  virtual ~SampleTable() = default;
  virtual int64_t num_samples() const = 0;
  virtual void Gather(const int64_t* idx, int64_t n, float* data,
                      float* label) const = 0;
};

// Calls copy(first, count, out_row) for each run of consecutive indices, so
// that unshuffled batches are one copy per array.
template <typename CopyRun>
void ForEachRun(const int64_t* idx, int64_t n, CopyRun copy) {
  int64_t i = 0;
  while (i < n) {
    int64_t j = i + 1;
    while (j < n && idx[j] == idx[j - 1] + 1) ++j;
    copy(idx[i], j - i, i);
    i = j;
  }
}

class FloatTable : public SampleTable {
 public:
  FloatTable(std::vector<float> data, int64_t data_cols,
             std::vector<float> label, int64_t label_cols)
      : data_(std::move(data)),
        label_(std::move(label)),
        data_cols_(data_cols),
        label_cols_(label_cols) {}

  int64_t num_samples() const override {
    return static_cast<int64_t>(data_.size()) / data_cols_;
  }

  void Gather(const int64_t* idx, int64_t n, float* data,
              float* label) const override {
    ForEachRun(idx, n, [&](int64_t first, int64_t count, int64_t row) {
      std::memcpy(data + row * data_cols_, data_.data() + first * data_cols_,
                  count * data_cols_ * sizeof(float));
      std::memcpy(label + row * label_cols_,
                  label_.data() + first * label_cols_,
                  count * label_cols_ * sizeof(float));
    });
  }

 private:
  std::vector<float> data_;
  std::vector<float> label_;
  int64_t data_cols_;
  int64_t label_cols_;
};

// MNIST: images stay bytes (a quarter of the memory) and become floats
// byte / 255 * scale while they are gathered (computed, not looked up in a
// table: the arithmetic vectorizes, a table lookup per byte does not).
class ByteTable : public SampleTable {
 public:
  ByteTable(internal::Bytes images, int64_t image_size, internal::Bytes labels, float scale)
      : images_(std::move(images)),
        labels_(std::move(labels)),
        image_size_(image_size),
        scale_(scale) {}

  int64_t num_samples() const override {
    return static_cast<int64_t>(labels_.size());
  }

  // Sample by sample, with the images kAhead samples on fetched into the
  // cache meanwhile: shuffled batches read scattered images, and waiting for
  // each was most of a batch's time (Fashion-MNIST: 51-60 us per batch
  // shuffled, 20 us in order).
  void Gather(const int64_t* idx, int64_t n, float* data,
              float* label) const override {
    constexpr int64_t kAhead = 4;
    for (int64_t i = 0; i < std::min(n, kAhead); ++i) Prefetch(idx[i]);
    const float scale = scale_;
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) Prefetch(idx[i + kAhead]);
      const uint8_t* __restrict src = images_.data() + idx[i] * image_size_;
      float* __restrict dst = data + i * image_size_;
      for (int64_t k = 0; k < image_size_; ++k) {
        dst[k] = static_cast<float>(src[k]) / 255.0f * scale;
      }
      label[i] = static_cast<float>(labels_[idx[i]]);
    }
  }

 private:
  void Prefetch(int64_t sample) const {
    const uint8_t* p = images_.data() + sample * image_size_;
    for (int64_t at = 0; at < image_size_; at += 64) __builtin_prefetch(p + at);
  }

  internal::Bytes images_;
  internal::Bytes labels_;
  int64_t image_size_;
  float scale_;
};

// ---- Options shared by every iterator.

struct BatchConfig {
  int batch_size = 0;
  bool shuffle = false;
  uint64_t seed = 0;
  uint64_t first_epoch = 0;
  LastBatch last_batch = LastBatch::kPad;
  DataDesc data;   // shape[0] is batch_size
  DataDesc label;  // shape[0] is batch_size
  // The samples of this iterator are rows [first, first + count) of the
  // table (its part when partitioned).
  int64_t first = 0;
  int64_t count = 0;
};

// The fields every iterator's options (ArrayIterOptions, MnistOptions,
// CsvOptions) share.
template <typename Options>
BatchConfig ConfigFrom(const Options& options) {
  BatchConfig config;
  config.batch_size = options.batch_size;
  config.shuffle = options.shuffle;
  config.seed = options.seed;
  config.first_epoch = options.first_epoch;
  config.last_batch = options.last_batch;
  return config;
}

// The first row and the number of rows of part `part_index` of `num_parts`
// parts of `total` rows: every part has ceil(total / num_parts) rows, so
// that all workers take the same number of batches (a dist_sync step needs
// one push from each); parts start at total * part_index / num_parts, so
// where the division is not exact neighbouring parts share a row and the
// last part wraps around to the first rows.
absl::StatusOr<std::pair<int64_t, int64_t>> PartOf(int64_t total,
                                                   int part_index,
                                                   int num_parts) {
  if (num_parts < 1 || part_index < 0 || part_index >= num_parts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "part_index ", part_index, " of num_parts ", num_parts,
        " is invalid: num_parts must be at least 1 and 0 <= part_index < "
        "num_parts"));
  }
  if (total < num_parts) {
    return absl::InvalidArgumentError(absl::StrCat(
        total, " samples cannot be split into ", num_parts, " parts"));
  }
  const int64_t begin = total * part_index / num_parts;
  return std::make_pair(begin, (total + num_parts - 1) / num_parts);
}

absl::Status CheckBatching(const BatchConfig& config) {
  if (config.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size must be positive, not ", config.batch_size));
  }
  if (config.count < 1) {
    return absl::InvalidArgumentError("the data set has no samples");
  }
  if (config.last_batch != LastBatch::kPad &&
      config.batch_size > config.count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch_size ", config.batch_size, " exceeds the ", config.count,
        " samples of an epoch: only LastBatch::kPad can make a batch of them"));
  }
  return absl::OkStatus();
}

// A batch shape: (batch_size, per-sample dimensions...).
Shape BatchShape(int batch_size, const Shape& sample) {
  Shape shape{batch_size};
  for (int64_t d : sample) shape.push_back(d);
  return shape;
}

// ---- The iterator.

class BatchIter : public DataIter {
 public:
  BatchIter(std::unique_ptr<SampleTable> table, BatchConfig config)
      : table_(std::move(table)),
        config_(std::move(config)),
        data_(config_.data.shape),
        label_(config_.label.shape),
        idx_(config_.batch_size),
        epoch_(config_.first_epoch) {
    MakeOrder();
  }

  void Reset() override {
    if (!started_) return;
    started_ = false;
    carry_ = std::move(next_carry_);
    next_carry_.clear();
    ++epoch_;
    cursor_ = 0;
    MakeOrder();
  }

  bool Next(DataBatch* batch) override {
    started_ = true;
    const int64_t carried = static_cast<int64_t>(carry_.size());
    const int64_t length = carried + config_.count;
    if (cursor_ >= length) return false;
    const int64_t batch_size = config_.batch_size;
    const int64_t take = std::min(batch_size, length - cursor_);
    if (take < batch_size && config_.last_batch != LastBatch::kPad) {
      if (config_.last_batch == LastBatch::kRollOver) {
        for (int64_t i = cursor_; i < length; ++i) {
          next_carry_.push_back(At(i));
        }
      }
      cursor_ = length;
      return false;
    }
    for (int64_t k = 0; k < take; ++k) idx_[k] = At(cursor_ + k);
    // Padding repeats the epoch's order from its start (more than once
    // when the batch is larger than the epoch).
    for (int64_t k = take; k < batch_size; ++k) {
      idx_[k] = order_[(k - take) % config_.count];
    }
    cursor_ += take;

    // The previous batch may still be read by operations the caller pushed.
    data_.WaitToWrite();
    label_.WaitToWrite();
    table_->Gather(idx_.data(), batch_size, data_.data(), label_.data());
    batch->data.assign(1, data_);
    batch->label.assign(1, label_);
    batch->pad = static_cast<int>(batch_size - take);
    return true;
  }

  std::vector<DataDesc> ProvideData() const override { return {config_.data}; }
  std::vector<DataDesc> ProvideLabel() const override {
    return {config_.label};
  }
  int batch_size() const override { return config_.batch_size; }
  int64_t num_samples() const override { return config_.count; }

 private:
  // Position i of this epoch's sequence: the samples carried over from the
  // last epoch (kRollOver), then this epoch's order.
  int64_t At(int64_t i) const {
    const int64_t carried = static_cast<int64_t>(carry_.size());
    return i < carried ? carry_[i] : order_[i - carried];
  }

  void MakeOrder() {
    order_.resize(config_.count);
    const int64_t rows = table_->num_samples();
    for (int64_t i = 0; i < config_.count; ++i) order_[i] = (config_.first + i) % rows;
    if (!config_.shuffle) return;
    std::seed_seq seq{static_cast<uint32_t>(config_.seed),
                      static_cast<uint32_t>(config_.seed >> 32),
                      static_cast<uint32_t>(epoch_),
                      static_cast<uint32_t>(epoch_ >> 32)};
    std::mt19937_64 rng(seq);
    for (int64_t i = config_.count - 1; i > 0; --i) {
      // A uniform draw from [0, i] by multiply-shift (bias below 2^-40).
      const uint64_t j =
          static_cast<uint64_t>((static_cast<unsigned __int128>(rng()) *
                                 static_cast<uint64_t>(i + 1)) >>
                                64);
      std::swap(order_[i], order_[j]);
    }
  }

  const std::unique_ptr<SampleTable> table_;
  const BatchConfig config_;
  NDArray data_;
  NDArray label_;
  std::vector<int64_t> idx_;  // the table rows of the batch being made

  uint64_t epoch_;
  bool started_ = false;             // Next() was called in this epoch
  std::vector<int64_t> order_;       // this epoch's table rows
  std::vector<int64_t> carry_;       // rows rolled over into this epoch
  std::vector<int64_t> next_carry_;  // rows to roll over into the next
  int64_t cursor_ = 0;               // position in carry_ + order_
};

absl::StatusOr<std::unique_ptr<DataIter>> MakeIter(
    std::unique_ptr<SampleTable> table, BatchConfig config) {
  MX_RETURN_IF_ERROR(CheckBatching(config));
  MX_CHECK(config.first < table->num_samples() && config.count <= table->num_samples());
  config.data.shape[0] = config.batch_size;
  config.label.shape[0] = config.batch_size;
  const int batch = config.batch_size;
  try {  // its batch arrays: a batch size too big for memory is an error
    return std::unique_ptr<DataIter>(new BatchIter(std::move(table), std::move(config)));
  } catch (const Error& e) {
    return absl::Status(e.status().code(),
                        absl::StrCat("a batch of ", batch, " samples: ", e.status().message()));
  }
}

// Prefixes a status message with what was being made.
absl::Status WithContext(const absl::Status& status, absl::string_view what) {
  return absl::Status(status.code(),
                      absl::StrCat(what, ": ", status.message()));
}

// ---- CSV.

// Parses a CSV file of `cols` numbers per line into rows. Blank lines are
// allowed only at the end of the file.
absl::StatusOr<std::vector<float>> ParseCsv(const std::string& path,
                                            int64_t cols) {
  MX_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path));
  std::vector<float> values;
  absl::string_view rest = text;
  int64_t line_no = 0;
  int64_t blank_line = 0;  // the first blank line since the last sample
  while (!rest.empty()) {
    const size_t end = rest.find('\n');
    absl::string_view line = rest.substr(0, end);
    rest.remove_prefix(end == absl::string_view::npos ? rest.size() : end + 1);
    ++line_no;
    line = absl::StripAsciiWhitespace(line);  // also a Windows '\r'
    if (line.empty()) {
      if (blank_line == 0) blank_line = line_no;
      continue;
    }
    if (blank_line != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", blank_line, ": blank line before more samples"));
    }
    int64_t found = 0;
    while (true) {
      const size_t comma = line.find(',');
      absl::string_view field = line.substr(0, comma);
      float v;
      // nan, inf and 1e999 (which reads as inf) too: the run trained
      // on them and wrote non-finite checkpoints.
      if (found < cols && (!absl::SimpleAtof(field, &v) || !std::isfinite(v))) {
        return absl::InvalidArgumentError(absl::StrCat(path, ":", line_no, ": value ", found + 1,
                                                       " '", absl::StripAsciiWhitespace(field),
                                                       "' is not a finite number"));
      }
      if (found < cols) values.push_back(v);
      ++found;
      if (comma == absl::string_view::npos) break;
      line.remove_prefix(comma + 1);
    }
    if (found != cols) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_no, ": expected ", cols, " values, found ", found));
    }
  }
  return values;
}

absl::StatusOr<std::unique_ptr<DataIter>> MakeCsvIter(
    const CsvOptions& options) {
  if (options.data_shape.ndim() == 0 || options.data_shape.Size() < 1 ||
      !options.data_shape.IsValid()) {
    return absl::InvalidArgumentError(
        absl::StrCat("data_shape ", options.data_shape.ToString(),
                     " must have at least one dimension and one element"));
  }
  if (options.label_shape.ndim() == 0 || options.label_shape.Size() < 1 ||
      !options.label_shape.IsValid()) {
    return absl::InvalidArgumentError(
        absl::StrCat("label_shape ", options.label_shape.ToString(),
                     " must have at least one dimension and one element"));
  }
  const int64_t data_cols = options.data_shape.Size();
  const int64_t label_cols = options.label_shape.Size();
  MX_ASSIGN_OR_RETURN(std::vector<float> data,
                      ParseCsv(options.data_csv, data_cols));
  const int64_t n = static_cast<int64_t>(data.size()) / data_cols;
  if (n == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.data_csv, ": no samples"));
  }
  std::vector<float> label;
  if (options.label_csv.empty()) {
    label.assign(n * label_cols, 0.0f);  // as MXNet: labels are all 0
  } else {
    MX_ASSIGN_OR_RETURN(label, ParseCsv(options.label_csv, label_cols));
    const int64_t labels = static_cast<int64_t>(label.size()) / label_cols;
    if (labels != n) {
      return absl::InvalidArgumentError(
          absl::StrCat(options.data_csv, " has ", n, " samples but ",
                       options.label_csv, " has ", labels));
    }
  }
  MX_ASSIGN_OR_RETURN(auto part,
                      PartOf(n, options.part_index, options.num_parts));
  BatchConfig config = ConfigFrom(options);
  config.data = {"data", BatchShape(options.batch_size, options.data_shape)};
  // As MXNet: a label of one value per sample gives a (batch,) array.
  config.label = {"softmax_label",
                  options.label_shape == Shape{1}
                      ? Shape{options.batch_size}
                      : BatchShape(options.batch_size, options.label_shape)};
  config.first = part.first;
  config.count = part.second;
  return MakeIter(std::make_unique<FloatTable>(std::move(data), data_cols,
                                               std::move(label), label_cols),
                  std::move(config));
}

// ---- MNIST.

absl::StatusOr<std::unique_ptr<DataIter>> MakeMnistIter(
    const MnistOptions& options) {
  MX_ASSIGN_OR_RETURN(internal::IdxFile images,
                      internal::ReadIdxFile(options.images, 3));
  MX_ASSIGN_OR_RETURN(internal::IdxFile labels,
                      internal::ReadIdxFile(options.labels, 1));
  const int64_t n = images.dims[0], rows = images.dims[1],
                cols = images.dims[2];
  if (labels.dims[0] != n) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.images, " holds ", n, " images but ",
                     options.labels, " holds ", labels.dims[0], " labels"));
  }
  if (n == 0 || rows * cols == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.images, " holds no images (", n, " x ", rows,
                     " x ", cols, ")"));
  }
  MX_ASSIGN_OR_RETURN(auto part,
                      PartOf(n, options.part_index, options.num_parts));
  BatchConfig config = ConfigFrom(options);
  config.data = {"data", options.flat
                             ? Shape{options.batch_size, rows * cols}
                             : Shape{options.batch_size, 1, rows, cols}};
  config.label = {"softmax_label", Shape{options.batch_size}};
  config.first = part.first;
  config.count = part.second;
  return MakeIter(
      std::make_unique<ByteTable>(std::move(images.data), rows * cols,
                                  std::move(labels.data), options.scale),
      std::move(config));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DataIter>> ArrayIter(
    const NDArray& data, const NDArray& label,
    const ArrayIterOptions& options) {
  auto fail = [](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat("ArrayIter: ", msg));
  };
  if (data.is_none() || label.is_none()) return fail("data or label is null");
  if (data.ndim() < 1 || label.ndim() < 1) {
    return fail(absl::StrCat("data ", data.shape().ToString(), " and label ",
                             label.shape().ToString(),
                             " need a first dimension of samples"));
  }
  if (data.shape()[0] != label.shape()[0]) {
    return fail(absl::StrCat("data ", data.shape().ToString(), " and label ",
                             label.shape().ToString(),
                             " differ in their first dimension"));
  }
  const int64_t n = data.shape()[0];
  if (n == 0) return fail("the arrays hold no samples");
  if (data.size() == 0 || label.size() == 0) {
    return fail(absl::StrCat("data ", data.shape().ToString(), " and label ",
                             label.shape().ToString(),
                             " need at least one value per sample"));
  }
  std::vector<float> host_data, host_label;
  try {
    host_data = data.ToVector();
    host_label = label.ToVector();
  } catch (const Error& e) {
    return WithContext(e.status(), "ArrayIter");
  }
  BatchConfig config = ConfigFrom(options);
  config.data = {options.data_name,
                 Shape(data.shape().begin(), data.shape().end())};
  config.label = {options.label_name,
                  Shape(label.shape().begin(), label.shape().end())};
  config.first = 0;
  config.count = n;
  absl::StatusOr<std::unique_ptr<DataIter>> iter = MakeIter(
      std::make_unique<FloatTable>(std::move(host_data), data.size() / n,
                                   std::move(host_label), label.size() / n),
      std::move(config));
  if (!iter.ok()) return WithContext(iter.status(), "ArrayIter");
  return iter;
}

absl::StatusOr<std::unique_ptr<DataIter>> MnistIter(
    const MnistOptions& options) {
  absl::StatusOr<std::unique_ptr<DataIter>> iter = MakeMnistIter(options);
  if (!iter.ok()) return WithContext(iter.status(), "MnistIter");
  return iter;
}

absl::StatusOr<std::unique_ptr<DataIter>> CsvIter(const CsvOptions& options) {
  absl::StatusOr<std::unique_ptr<DataIter>> iter = MakeCsvIter(options);
  if (!iter.ok()) return WithContext(iter.status(), "CsvIter");
  return iter;
}

}  // namespace mx
