#include "worker/checkpoint.h"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"

namespace mx {

namespace {

constexpr uint64_t kListMagic = 0x112;
constexpr uint32_t kV3Magic = 0xF993FACA;  // V2 with numpy shapes (MXNet 1.6+ np, 2.x)
constexpr uint32_t kV2Magic = 0xF993FAC9;
constexpr uint32_t kV1Magic = 0xF993FAC8;
constexpr int32_t kDenseStorage = 0;
constexpr int32_t kFloat32 = 0;
constexpr int32_t kCpuDevice = 1;

class Writer {
 public:
  template <typename T>
  void Put(T v) { buf_.append(reinterpret_cast<const char*>(&v), sizeof(T)); }
  void Bytes(const void* p, size_t n) { buf_.append(static_cast<const char*>(p), n); }
  const std::string& str() const { return buf_; }

 private:
  std::string buf_;
};

class Reader {
 public:
  Reader(const std::string& path, const std::string& data) : path_(path), data_(data) {}
  template <typename T>
  absl::Status Get(T* v, const std::string& what) { return Bytes(v, sizeof(T), what); }
  absl::Status Bytes(void* p, size_t n, const std::string& what) {
    if (data_.size() - pos_ < n) {
      return absl::DataLossError(absl::StrCat(path_, ": truncated at offset ", pos_,
                                              " reading ", what));
    }
    std::memcpy(p, data_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  size_t pos() const { return pos_; }
  size_t remaining() const { return data_.size() - pos_; }
  absl::Status Error(const std::string& msg) const {
    return absl::DataLossError(absl::StrCat(path_, ": ", msg, " at offset ", pos_));
  }

 private:
  const std::string& path_;
  const std::string& data_;
  size_t pos_ = 0;
};

// A shape's element count fits int64 (a damaged header's may not).
absl::Status CheckSize(const Reader& r, const Shape& shape, size_t index) {
  if (shape.CheckedSize().has_value()) return absl::OkStatus();
  return r.Error(absl::StrCat("array ", index, " has an impossible shape ", shape.ToString()));
}

// A V3 record's rank is signed: -1 is a none array (an empty Shape here,
// as rank 0 is in V1 and V2), 0 a scalar, which mx arrays cannot be.
absl::StatusOr<Shape> ReadShape(Reader& r, bool int64_dims, size_t index, bool v3 = false) {
  uint32_t ndim = 0;
  MX_RETURN_IF_ERROR(r.Get(&ndim, absl::StrCat("the rank of array ", index)));
  if (v3 && ndim == 0xFFFFFFFFu) return Shape();
  if (v3 && ndim == 0) {
    return r.Error(absl::StrCat("array ", index,
                                " is a 0-d (scalar) array of MXNet's numpy semantics; mx arrays "
                                "have at least one dimension"));
  }
  if (ndim > 32) return r.Error(absl::StrCat("array ", index, " has rank ", ndim));
  Shape shape;
  for (uint32_t d = 0; d < ndim; ++d) {
    int64_t dim = 0;
    if (int64_dims) {
      MX_RETURN_IF_ERROR(r.Get(&dim, absl::StrCat("the shape of array ", index)));
    } else {
      uint32_t small = 0;
      MX_RETURN_IF_ERROR(r.Get(&small, absl::StrCat("the shape of array ", index)));
      dim = small;
    }
    if (dim < 0) return r.Error(absl::StrCat("array ", index, " has a negative dimension"));
    shape.push_back(dim);
  }
  MX_RETURN_IF_ERROR(CheckSize(r, shape, index));
  return shape;
}

// The first NaN or infinite value of `values`, if any.
std::optional<int64_t> FirstNonFinite(const std::vector<float>& values) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) return static_cast<int64_t>(i);
  }
  return std::nullopt;
}

// An array as read, with its first non-finite element (reported once the
// names, which follow the arrays, are known).
struct ReadResult {
  NDArray array;
  std::optional<int64_t> non_finite;
  float bad_value = 0;
};

absl::StatusOr<ReadResult> ReadArray(Reader& r, size_t index, Context ctx) {
  uint32_t magic = 0;
  MX_RETURN_IF_ERROR(r.Get(&magic, absl::StrCat("the header of array ", index)));
  Shape shape;
  if (magic == kV3Magic || magic == kV2Magic || magic == kV1Magic) {
    if (magic != kV1Magic) {
      int32_t stype = 0;
      MX_RETURN_IF_ERROR(r.Get(&stype, "the storage type"));
      if (stype != kDenseStorage) {
        return r.Error(absl::StrCat("array ", index, " is sparse (storage type ", stype,
                                    "); only dense arrays are supported"));
      }
    }
    MX_ASSIGN_OR_RETURN(shape, ReadShape(r, true, index, magic == kV3Magic));
  } else {
    // Pre-V1 files start with the rank itself and store 32-bit dims.
    uint32_t ndim = magic;
    if (ndim > 32) return r.Error(absl::StrCat("array ", index, " has a bad header ", magic));
    for (uint32_t d = 0; d < ndim; ++d) {
      uint32_t dim = 0;
      MX_RETURN_IF_ERROR(r.Get(&dim, absl::StrCat("the shape of array ", index)));
      shape.push_back(dim);
    }
    MX_RETURN_IF_ERROR(CheckSize(r, shape, index));
  }
  if (shape.ndim() == 0) return ReadResult{};  // MXNet writes none arrays so
  int32_t dev_type = 0, dev_id = 0, type_flag = 0;
  MX_RETURN_IF_ERROR(r.Get(&dev_type, "the context"));
  MX_RETURN_IF_ERROR(r.Get(&dev_id, "the context"));
  MX_RETURN_IF_ERROR(r.Get(&type_flag, "the type"));
  if (type_flag != kFloat32) {
    return r.Error(absl::StrCat("array ", index, " has type flag ", type_flag,
                                "; only float32 (0) is supported"));
  }
  const int64_t n = shape.Size();
  if (static_cast<uint64_t>(n) > r.remaining() / sizeof(float)) {
    return r.Error(absl::StrCat("truncated data of array ", index, " ", shape.ToString()));
  }
  std::vector<float> values(n);
  MX_RETURN_IF_ERROR(r.Bytes(values.data(), n * sizeof(float), "array data"));
  ReadResult result;
  result.non_finite = FirstNonFinite(values);
  if (result.non_finite) result.bad_value = values[*result.non_finite];
  try {
    result.array = FromVector(values, shape, ctx);
  } catch (const mx::Error& e) {
    return e.status();
  }
  return result;
}

std::string Checksum(const std::string& data) {
  uLong crc = crc32(0L, Z_NULL, 0);
  // zlib takes lengths as uInt: feed large files in parts.
  for (size_t done = 0; done < data.size();) {
    const uInt part = static_cast<uInt>(std::min<size_t>(data.size() - done, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data.data() + done), part);
    done += part;
  }
  return absl::StrFormat("crc32=%08x bytes=%d", crc, data.size());
}

// Compares `data` (the file at `path`) with its checksum file, if any.
absl::Status VerifyChecksum(const std::string& path, const std::string& data) {
  const std::string sum_path = ChecksumPath(path);
  absl::StatusOr<std::string> recorded = ReadWholeFile(sum_path);
  if (!recorded.ok() && !absl::IsNotFound(recorded.status())) {
    return absl::Status(
        recorded.status().code(),
        absl::StrCat(path, ": its checksum file cannot be read: ", recorded.status().message()));
  }
  if (!recorded.ok()) {
    static absl::Mutex mu(absl::kConstInit);
    static auto* warned = new std::set<std::string>();
    absl::MutexLock lock(&mu);
    if (warned->insert(path).second) {
      std::fprintf(stderr,
                   "warning: %s has no checksum file %s: loading it unverified (files written "
                   "by MXNet have none)\n",
                   path.c_str(), sum_path.c_str());
    }
    return absl::OkStatus();
  }
  const std::string want(absl::StripAsciiWhitespace(*recorded));
  const std::string got = Checksum(data);
  if (got == want) return absl::OkStatus();
  return absl::DataLossError(absl::StrCat(
      path, ": damaged: its contents have ", got, " but ", sum_path, " records ", want,
      " (the file changed after it was written; if another program, MXNet's save_checkpoint "
      "say, rewrote it on purpose, delete ",
      sum_path, ")"));
}

}  // namespace

absl::Status SaveNDArrayList(const std::string& path, const NamedArrays& arrays) {
  Writer w;
  w.Put<uint64_t>(kListMagic);
  w.Put<uint64_t>(0);
  w.Put<uint64_t>(arrays.size());
  for (const auto& [name, a] : arrays) {
    // Rank 0 is a none array in the V2 layout, with nothing after it: a 0-d
    // array's value made the rest of the file unreadable (to MXNet too).
    if (a.ndim() == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("saving '", name, "' to ", path,
                       ": MXNet's .params layout cannot hold a 0-d (or null) array"));
    }
    w.Put<uint32_t>(kV2Magic);
    w.Put<int32_t>(kDenseStorage);
    w.Put<uint32_t>(a.ndim());
    for (int64_t d : a.shape()) w.Put<int64_t>(d);
    w.Put<int32_t>(kCpuDevice);
    w.Put<int32_t>(0);
    w.Put<int32_t>(kFloat32);
    std::vector<float> values;
    try {
      values = a.ToVector();
    } catch (const mx::Error& e) {
      return absl::Status(e.code(), absl::StrCat("saving '", name, "' to ", path, ": ", e.what()));
    }
    w.Bytes(values.data(), values.size() * sizeof(float));
  }
  w.Put<uint64_t>(arrays.size());
  for (const auto& [name, a] : arrays) {
    w.Put<uint64_t>(name.size());
    w.Bytes(name.data(), name.size());
  }
  // The old checksum goes first: a crash between the two writes leaves a
  // file without one (a warning on load), never a stale one (an error).
  const std::string sum_path = ChecksumPath(path);
  if (std::remove(sum_path.c_str()) != 0 && errno != ENOENT) {
    return absl::InternalError(absl::StrCat("cannot remove ", sum_path, ": ", std::strerror(errno)));
  }
  MX_RETURN_IF_ERROR(WriteFileAtomically(path, w.str()));
  return WriteFileAtomically(sum_path, Checksum(w.str()) + "\n");
}

std::string ChecksumPath(const std::string& params_path) { return params_path + ".crc32"; }

absl::Status CheckCheckpointPrefix(const std::string& prefix) {
  const std::string probe = absl::StrCat(prefix, ".mx-write-test-", getpid());
  std::FILE* f = std::fopen(probe.c_str(), "w");
  if (f == nullptr) {
    const size_t slash = prefix.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : prefix.substr(0, slash + 1);
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoints cannot be written under prefix '", prefix, "': creating a file in ", dir,
        " failed: ", std::strerror(errno)));
  }
  std::fclose(f);
  std::remove(probe.c_str());
  return absl::OkStatus();
}

absl::StatusOr<NamedArrays> LoadNDArrayList(const std::string& path,
                                             const ParamsLoadOptions& options) {
  MX_ASSIGN_OR_RETURN(const std::string data, ReadWholeFile(path));
  MX_RETURN_IF_ERROR(VerifyChecksum(path, data));
  Reader r(path, data);
  uint64_t magic = 0, reserved = 0, count = 0;
  MX_RETURN_IF_ERROR(r.Get(&magic, "the file header"));
  if (magic != kListMagic) {
    return absl::DataLossError(absl::StrCat(path, ": not an MXNet NDArray list (header ",
                                            magic, " at offset 0, expected 0x112)"));
  }
  MX_RETURN_IF_ERROR(r.Get(&reserved, "the file header"));
  MX_RETURN_IF_ERROR(r.Get(&count, "the array count"));
  if (count > r.remaining()) return r.Error(absl::StrCat("impossible array count ", count));
  std::vector<ReadResult> arrays;
  for (uint64_t i = 0; i < count; ++i) {
    MX_ASSIGN_OR_RETURN(ReadResult a, ReadArray(r, i, options.ctx));
    arrays.push_back(std::move(a));
  }
  uint64_t name_count = 0;
  MX_RETURN_IF_ERROR(r.Get(&name_count, "the name count"));
  if (name_count != 0 && name_count != count) {
    return r.Error(absl::StrCat(name_count, " names for ", count, " arrays"));
  }
  NamedArrays out;
  for (uint64_t i = 0; i < count; ++i) {
    std::string name;
    if (name_count > 0) {
      uint64_t len = 0;
      MX_RETURN_IF_ERROR(r.Get(&len, "a name length"));
      if (len > r.remaining()) return r.Error("truncated name");
      name.resize(len);
      MX_RETURN_IF_ERROR(r.Bytes(name.data(), len, "a name"));
    }
    out.emplace_back(std::move(name), arrays[i].array);
  }
  if (r.remaining() > 0) {
    return r.Error(absl::StrCat(r.remaining(), " bytes follow the last name (the file was ",
                                "damaged or appended to)"));
  }
  for (uint64_t i = 0; i < count && !options.allow_non_finite; ++i) {
    if (!arrays[i].non_finite) continue;
    const std::string& name = out[i].first;
    return absl::DataLossError(absl::StrCat(
        path, ": array ", name.empty() ? absl::StrCat(i) : absl::StrCat("'", name, "'"),
        " holds ", arrays[i].bad_value, " at element ", *arrays[i].non_finite,
        " (a non-finite value; allow them with --allow_non_finite_params)"));
  }
  return out;
}

std::string CheckpointParamsPath(const std::string& prefix, int epoch) {
  return absl::StrFormat("%s-%04d.params", prefix, epoch);
}

std::string CheckpointStatesPath(const std::string& prefix, int epoch) {
  return absl::StrFormat("%s-%04d.states", prefix, epoch);
}

std::string CheckpointTablesPath(const std::string& prefix, int epoch) {
  return absl::StrFormat("%s-%04d.tables", prefix, epoch);
}

absl::Status SaveCheckpoint(const std::string& prefix, int epoch, const Symbol& symbol,
                            const std::map<std::string, NDArray>& arg_params,
                            const std::map<std::string, NDArray>& aux_params) {
  MX_RETURN_IF_ERROR(symbol.Save(prefix + "-symbol.json"));
  NamedArrays all;
  for (const auto& [name, a] : arg_params) all.emplace_back("arg:" + name, a);
  for (const auto& [name, a] : aux_params) all.emplace_back("aux:" + name, a);
  return SaveNDArrayList(CheckpointParamsPath(prefix, epoch), all);
}

absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& prefix, int epoch,
                                          const ParamsLoadOptions& options) {
  Checkpoint ckpt;
  MX_ASSIGN_OR_RETURN(ckpt.symbol, Symbol::Load(prefix + "-symbol.json"));
  const std::string path = CheckpointParamsPath(prefix, epoch);
  MX_ASSIGN_OR_RETURN(NamedArrays all, LoadNDArrayList(path, options));
  for (auto& [name, a] : all) {
    if (absl::StartsWith(name, "arg:")) {
      ckpt.arg_params[name.substr(4)] = a;
    } else if (absl::StartsWith(name, "aux:")) {
      ckpt.aux_params[name.substr(4)] = a;
    } else {
      return absl::DataLossError(absl::StrCat(path, ": array name '", name,
                                              "' has neither an arg: nor an aux: prefix"));
    }
  }
  return ckpt;
}

}  // namespace mx
