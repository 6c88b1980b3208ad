// Save and Load of named NDArray lists; the format is documented in
// ndarray.h next to the declarations.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "ndarray/ndarray.h"
#include "zlib.h"

namespace mx {

namespace {

constexpr char kMagic[4] = {'M', 'X', 'N', 'D'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kMaxNameLength = 1 << 16;
constexpr uint32_t kMaxDims = 32;

class Writer {
 public:
  template <typename T>
  void Put(const T& v) { Bytes(&v, sizeof(T)); }
  void Bytes(const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    buf_.append(c, n);
  }
  std::string& buf() { return buf_; }

 private:
  std::string buf_;
};

// Reads a byte buffer; every read failure names the file and offset.
class Reader {
 public:
  Reader(const std::string& path, const std::string& data, size_t end)
      : path_(path), data_(data), end_(end) {}
  template <typename T>
  absl::Status Get(T* v, const char* what) {
    return Bytes(v, sizeof(T), what);
  }
  absl::Status Bytes(void* p, size_t n, const std::string& what) {
    if (end_ - pos_ < n) {
      return absl::DataLossError(absl::StrCat(
          path_, ": file is truncated at offset ", pos_, " reading ", what,
          " (", n, " bytes needed, ", end_ - pos_, " left)"));
    }
    std::memcpy(p, data_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  size_t pos() const { return pos_; }
  size_t remaining() const { return end_ - pos_; }

 private:
  const std::string& path_;
  const std::string& data_;
  size_t end_;
  size_t pos_ = 0;
};

uint32_t Crc(const std::string& data, size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  // zlib takes uInt lengths: feed large buffers in pieces.
  size_t done = 0;
  while (done < n) {
    uInt piece = static_cast<uInt>(std::min<size_t>(n - done, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data.data() + done), piece);
    done += piece;
  }
  return static_cast<uint32_t>(crc);
}

absl::Status ErrnoError(const std::string& what, const std::string& path) {
  std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(errno));
  if (errno == ENOENT) return absl::NotFoundError(msg);
  return absl::InternalError(msg);
}

absl::StatusOr<NDArray> ReadArray(Reader& r, const std::string& path,
                                  std::string* name, Context ctx) {
  uint32_t name_len = 0;
  MX_RETURN_IF_ERROR(r.Get(&name_len, "a name length"));
  if (name_len > kMaxNameLength) {
    return absl::DataLossError(absl::StrCat(path, ": name length ", name_len,
                                            " at offset ", r.pos() - 4,
                                            " exceeds ", kMaxNameLength));
  }
  name->resize(name_len);
  MX_RETURN_IF_ERROR(r.Bytes(name->data(), name_len, "a name"));
  uint32_t ndim = 0;
  MX_RETURN_IF_ERROR(r.Get(&ndim, absl::StrCat("the rank of '", *name, "'").c_str()));
  if (ndim > kMaxDims) {
    return absl::DataLossError(absl::StrCat(path, ": array '", *name, "' has rank ",
                                            ndim, " (at most ", kMaxDims, ")"));
  }
  Shape shape;
  int64_t elements = 1;
  for (uint32_t d = 0; d < ndim; ++d) {
    int64_t dim = 0;
    MX_RETURN_IF_ERROR(r.Get(&dim, absl::StrCat("the shape of '", *name, "'").c_str()));
    if (dim < 0) {
      return absl::DataLossError(absl::StrCat(path, ": array '", *name,
                                              "' has negative dimension ", dim));
    }
    if (dim > 0 && elements > std::numeric_limits<int64_t>::max() / dim) {
      return absl::DataLossError(absl::StrCat(path, ": array '", *name,
                                              "' has an impossible size"));
    }
    elements *= dim;
    shape.push_back(dim);
  }
  // Check the size against what is left before allocating anything.
  const std::string what =
      absl::StrCat("the data of '", *name, "' ", shape.ToString());
  if (elements < 0 || static_cast<uint64_t>(elements) > r.remaining() / sizeof(float)) {
    return absl::DataLossError(absl::StrCat(
        path, ": file is truncated at offset ", r.pos(), " reading ", what,
        " (", r.remaining(), " bytes left)"));
  }
  std::vector<float> values(elements);
  MX_RETURN_IF_ERROR(r.Bytes(values.data(), elements * sizeof(float), what));
  try {
    return FromVector(values, shape, ctx);
  } catch (const Error& e) {
    return e.status();
  }
}

// The whole format in memory. `what` prefixes errors about the arrays
// ("Save <path>" or "SerializeArrays").
absl::StatusOr<std::string> Encode(const NamedArrays& arrays,
                                   const std::string& what) {
  Writer w;
  w.Bytes(kMagic, 4);
  w.Put(kVersion);
  w.Put(static_cast<uint64_t>(arrays.size()));
  for (const auto& [name, array] : arrays) {
    if (array.is_none()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": array '", name, "' is null"));
    }
    w.Put(static_cast<uint32_t>(name.size()));
    w.Bytes(name.data(), name.size());
    w.Put(static_cast<uint32_t>(array.ndim()));
    for (int64_t d : array.shape()) w.Put(d);
    std::vector<float> values;
    try {
      values = array.ToVector();
    } catch (const Error& e) {
      return absl::Status(e.code(), absl::StrCat(what, ": array '", name,
                                                 "': ", e.what()));
    }
    w.Bytes(values.data(), values.size() * sizeof(float));
  }
  w.Put(Crc(w.buf(), w.buf().size()));
  return std::move(w.buf());
}

// Parses the format from memory. `path` (the file, or a label for data that
// never was one) starts every error.
absl::StatusOr<NamedArrays> Decode(const std::string& data,
                                   const std::string& path, Context ctx) {
  if (data.size() < 4 || std::memcmp(data.data(), kMagic, 4) != 0) {
    return absl::DataLossError(absl::StrCat(
        path, ": not an mx NDArray file (bad magic at offset 0)"));
  }
  constexpr size_t kHeader = 4 + 4 + 8, kTrailer = 4;
  if (data.size() < kHeader + kTrailer) {
    return absl::DataLossError(absl::StrCat(path, ": file is truncated (",
                                            data.size(), " bytes)"));
  }
  const size_t body_end = data.size() - kTrailer;
  Reader r(path, data, body_end);
  char magic[4];
  MX_RETURN_IF_ERROR(r.Bytes(magic, 4, "the magic"));
  uint32_t version = 0;
  MX_RETURN_IF_ERROR(r.Get(&version, "the version"));
  if (version != kVersion) {
    return absl::DataLossError(absl::StrCat(path, ": unsupported format version ",
                                            version, " (this mx reads ",
                                            kVersion, ")"));
  }
  uint64_t count = 0;
  MX_RETURN_IF_ERROR(r.Get(&count, "the array count"));

  // Checksum first: a corrupt file must not be parsed into garbage shapes.
  uint32_t stored;
  std::memcpy(&stored, data.data() + body_end, sizeof(stored));
  const uint32_t actual = Crc(data, body_end);
  NamedArrays out;
  for (uint64_t i = 0; i < count; ++i) {
    std::string name;
    absl::StatusOr<NDArray> a = ReadArray(r, path, &name, ctx);
    if (!a.ok()) {
      if (stored == actual) return a.status();
      return absl::DataLossError(absl::StrCat(
          a.status().message(), "; the checksum does not match either: the "
          "file is corrupt or truncated"));
    }
    out.emplace_back(std::move(name), *std::move(a));
  }
  if (stored != actual) {
    return absl::DataLossError(absl::StrCat(
        path, ": checksum mismatch (stored ", stored, ", computed ", actual,
        "): the file is corrupt or truncated"));
  }
  if (r.pos() != body_end) {
    return absl::DataLossError(absl::StrCat(path, ": ", body_end - r.pos(),
                                            " unexpected bytes at offset ",
                                            r.pos()));
  }
  return out;
}

}  // namespace

absl::StatusOr<std::string> SerializeArrays(const NamedArrays& arrays) {
  return Encode(arrays, "SerializeArrays");
}

absl::StatusOr<NamedArrays> DeserializeArrays(const std::string& bytes,
                                              Context ctx) {
  return Decode(bytes, "serialized NDArray data", ctx);
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return ErrnoError("cannot create", tmp);
  bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  ok = (std::fflush(f) == 0) && ok;
  if (std::fclose(f) != 0) ok = false;
  if (!ok) {
    absl::Status s = ErrnoError("cannot write", tmp);
    std::remove(tmp.c_str());
    return s;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = ErrnoError("cannot rename to", path);
    std::remove(tmp.c_str());
    return s;
  }
  return absl::OkStatus();
}

absl::Status Save(const std::string& path, const NamedArrays& arrays) {
  MX_ASSIGN_OR_RETURN(const std::string bytes,
                      Encode(arrays, absl::StrCat("Save ", path)));
  return WriteFileAtomically(path, bytes);
}

absl::StatusOr<NamedArrays> Load(const std::string& path, Context ctx) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoError("cannot open", path);
  std::string data((std::istreambuf_iterator<char>(in)),
                   std::istreambuf_iterator<char>());
  if (in.bad()) return ErrnoError("cannot read", path);
  return Decode(data, path, ctx);
}

}  // namespace mx
