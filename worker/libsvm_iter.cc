// LibSvmIter (io.h): a click log streamed a line at a time through zlib
// (which reads plain files as they are).
#include <zlib.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "worker/idx_reader.h"
#include "worker/io.h"

namespace mx {
namespace {

class LibSvm : public DataIter {
 public:
  LibSvm(const LibSvmOptions& o, gzFile file)
      : o_(o),
        file_(file),
        data_(Empty({o.batch_size, o.num_fields})),
        label_(Empty({o.batch_size})),
        line_buffer_(1 << 16) {}

  void Reset() override {
    gzrewind(file_.get());
    line_ = 0;
    done_ = false;
  }

  bool Next(DataBatch* batch) override {
    if (done_) return false;
    data_.WaitToWrite();  // the previous batch may still be read
    label_.WaitToWrite();
    float* data = data_.data();
    float* label = label_.data();
    int taken = 0;
    while (taken < o_.batch_size && ReadSample(data + taken * o_.num_fields, label + taken)) ++taken;
    if (taken < o_.batch_size) {
      done_ = true;
      if (taken == 0 || o_.last_batch == LastBatch::kDiscard) return false;
      for (int k = taken; k < o_.batch_size; ++k) {  // padding: the batch's own first samples
        std::memcpy(data + k * o_.num_fields, data + (k % taken) * o_.num_fields,
                    sizeof(float) * o_.num_fields);
        label[k] = label[k % taken];
      }
    }
    batch->data.assign(1, data_);
    batch->label.assign(1, label_);
    batch->pad = o_.batch_size - taken;
    return true;
  }

  std::vector<DataDesc> ProvideData() const override {
    return {{"data", {o_.batch_size, o_.num_fields}}};
  }
  std::vector<DataDesc> ProvideLabel() const override {
    return {{"softmax_label", {o_.batch_size}}};
  }
  int batch_size() const override { return o_.batch_size; }

 private:
  // The next line of this part into (features, label); false at the end.
  bool ReadSample(float* features, float* label) {
    std::string line;
    while (ReadLine(&line)) {
      if ((line_ - 1) % o_.num_parts != o_.part_index) continue;
      ThrowIfError(Parse(line, features, label));
      return true;
    }
    return false;
  }

  // One whole line (without its newline); false at the end of the file.
  bool ReadLine(std::string* line) {
    line->clear();
    while (true) {
      char* got = gzgets(file_.get(), line_buffer_.data(), static_cast<int>(line_buffer_.size()));
      if (got == nullptr) {
        int err = Z_OK;
        const char* message = gzerror(file_.get(), &err);
        if (err != Z_OK && err != Z_STREAM_END) {
          throw Error(absl::DataLossError(absl::StrCat(o_.path, ": line ", line_ + 1, ": ", message)));
        }
        if (line->empty()) return false;
        break;  // a last line without a newline
      }
      line->append(got);
      if (!line->empty() && line->back() == '\n') {
        line->pop_back();
        break;
      }
    }
    ++line_;
    return true;
  }

  absl::Status Parse(const std::string& line, float* features, float* label) const {
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(o_.path, ": line ", line_, ": ", what));
    };
    std::vector<absl::string_view> words = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    if (words.empty()) return bad("empty line");
    double y = 0;
    if (!absl::SimpleAtod(words[0], &y) || (y != 0 && y != 1 && y != -1)) {
      return bad(absl::StrCat("label '", words[0], "' is not 0, 1, -1 or +1"));
    }
    *label = y > 0 ? 1.0f : 0.0f;
    if (static_cast<int>(words.size()) - 1 != o_.num_fields) {
      return bad(absl::StrCat(words.size() - 1, " features, expected ", o_.num_fields));
    }
    for (int f = 0; f < o_.num_fields; ++f) {
      const absl::string_view word = words[f + 1];
      const size_t colon = word.find(':');
      int64_t index = -1;
      double value = 0;
      if (colon == absl::string_view::npos || !absl::SimpleAtoi(word.substr(0, colon), &index) ||
          !absl::SimpleAtod(word.substr(colon + 1), &value)) {
        return bad(absl::StrCat("feature '", word, "' is not INDEX:VALUE"));
      }
      if (index < 0 || index >= o_.num_features) {
        return bad(absl::StrCat("feature index ", index, " is outside 0..", o_.num_features - 1,
                                " (the model's features)"));
      }
      if (value != 1) return bad(absl::StrCat("feature '", word, "': only binary features (value 1)"));
      features[f] = static_cast<float>(index);
    }
    return absl::OkStatus();
  }

  const LibSvmOptions o_;
  internal::GzFile file_;
  NDArray data_, label_;
  std::vector<char> line_buffer_;
  int64_t line_ = 0;  // lines read so far this epoch
  bool done_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DataIter>> LibSvmIter(const LibSvmOptions& o) {
  if (o.num_fields < 1 || o.batch_size < 1 || o.num_parts < 1 || o.part_index < 0 ||
      o.part_index >= o.num_parts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LibSvmIter: num_fields (", o.num_fields, ") and batch_size (", o.batch_size,
        ") must be at least 1, and part_index (", o.part_index, ") within 0..num_parts-1 (",
        o.num_parts, ")"));
  }
  if (o.num_features < 1 || o.num_features > kMaxFeatures) {
    return absl::InvalidArgumentError(absl::StrCat("LibSvmIter: num_features ", o.num_features,
                                                   " must be from 1 to ", kMaxFeatures,
                                                   " (indices travel as floats)"));
  }
  if (o.last_batch == LastBatch::kRollOver) {
    return absl::InvalidArgumentError("LibSvmIter: last_batch kRollOver is not offered (streamed)");
  }
  gzFile file = gzopen(o.path.c_str(), "rb");
  if (file == nullptr) {
    const absl::Status s = internal::OpenError(o.path);
    return absl::Status(s.code(), absl::StrCat("LibSvmIter: ", s.message()));
  }
  gzbuffer(file, 1 << 20);
  try {  // its batch arrays: a batch size too big for memory is an error
    return std::unique_ptr<DataIter>(new LibSvm(o, file));
  } catch (const Error& e) {
    return absl::Status(e.status().code(), absl::StrCat("LibSvmIter: a batch of ", o.batch_size,
                                                        " samples: ", e.status().message()));
  }
}

}  // namespace mx
