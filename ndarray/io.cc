// Save and Load of named NDArray lists; the format is documented in
// ndarray.h next to the declarations.
#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "ndarray/ndarray.h"
#include "ndarray/row_sparse.h"
#include "zlib.h"

namespace mx {

namespace {

constexpr char kMagic[4] = {'M', 'X', 'N', 'D'};
// Version 1: dense entries only. Version 2: each entry has a storage type
// after its name (written only when some entry is row-sparse, so files of
// dense arrays stay readable by older readers).
constexpr uint32_t kVersion = 1;
constexpr uint32_t kVersionWithStorage = 2;
enum StorageType : uint32_t { kDense = 0, kRowSparse = 1 };

// One entry of a file: a dense or a row-sparse array.
struct Entry {
  std::string name;
  NDArray dense;             // set for kDense
  RowSparseNDArray sparse;   // set for kRowSparse
};
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

// The CRC-32 of what `crc` covered followed by n bytes at p.
uint32_t CrcUpdate(uint32_t crc, const void* p, size_t n) {
  const Bytef* bytes = static_cast<const Bytef*>(p);
  // zlib takes uInt lengths: feed large buffers in pieces.
  for (size_t done = 0; done < n;) {
    const uInt piece = static_cast<uInt>(std::min<size_t>(n - done, 1u << 30));
    crc = static_cast<uint32_t>(crc32(crc, bytes + done, piece));
    done += piece;
  }
  return crc;
}

uint32_t CrcStart() { return static_cast<uint32_t>(crc32(0L, Z_NULL, 0)); }

uint32_t Crc(const std::string& data, size_t n) { return CrcUpdate(CrcStart(), data.data(), n); }

// Reads an open file as Reader reads a buffer (ArrayFileReader's source).
class FileSource {
 public:
  FileSource(const std::string& path, std::FILE* file) : path_(path), file_(file) {}
  template <typename T>
  absl::Status Get(T* v, const char* what) {
    return Bytes(v, sizeof(T), what);
  }
  absl::Status Bytes(void* p, size_t n, const std::string& what) {
    const long at = std::ftell(file_);
    if (n > 0 && std::fread(p, 1, n, file_) != n) {
      return absl::DataLossError(absl::StrCat(path_, ": file is truncated at offset ", at,
                                              " reading ", what, " (", n, " bytes needed)"));
    }
    return absl::OkStatus();
  }
  size_t pos() const { return static_cast<size_t>(std::ftell(file_)); }

 private:
  const std::string& path_;
  std::FILE* file_;
};

absl::Status ErrnoError(const std::string& what, const std::string& path) {
  std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(errno));
  if (errno == ENOENT) return absl::NotFoundError(msg);
  return absl::InternalError(msg);
}

// An entry's name, from a Reader or a FileSource.
template <typename Source>
absl::StatusOr<std::string> ReadName(Source& r, const std::string& path) {
  uint32_t name_len = 0;
  MX_RETURN_IF_ERROR(r.Get(&name_len, "a name length"));
  if (name_len > kMaxNameLength) {
    return absl::DataLossError(absl::StrCat(path, ": name length ", name_len,
                                            " at offset ", r.pos() - 4,
                                            " exceeds ", kMaxNameLength));
  }
  std::string name(name_len, '\0');
  MX_RETURN_IF_ERROR(r.Bytes(name.data(), name_len, "a name"));
  return name;
}

// An entry's shape (rank and dimensions), from a Reader or a FileSource.
template <typename Source>
absl::StatusOr<Shape> ReadShape(Source& r, const std::string& path, const std::string& name) {
  uint32_t ndim = 0;
  MX_RETURN_IF_ERROR(r.Get(&ndim, absl::StrCat("the rank of '", name, "'").c_str()));
  if (ndim > kMaxDims) {
    return absl::DataLossError(absl::StrCat(path, ": array '", name, "' has rank ",
                                            ndim, " (at most ", kMaxDims, ")"));
  }
  Shape shape;
  int64_t elements = 1;
  for (uint32_t d = 0; d < ndim; ++d) {
    int64_t dim = 0;
    MX_RETURN_IF_ERROR(r.Get(&dim, absl::StrCat("the shape of '", name, "'").c_str()));
    if (dim < 0) {
      return absl::DataLossError(absl::StrCat(path, ": array '", name,
                                              "' has negative dimension ", dim));
    }
    if (dim > 0 && elements > std::numeric_limits<int64_t>::max() / dim) {
      return absl::DataLossError(absl::StrCat(path, ": array '", name,
                                              "' has an impossible size"));
    }
    elements *= dim;
    shape.push_back(dim);
  }
  return shape;
}

// `count` items of T (the size checked against what is left before
// allocating anything).
template <typename T>
absl::StatusOr<std::vector<T>> ReadValues(Reader& r, const std::string& path, uint64_t count,
                                          const std::string& what) {
  if (count > r.remaining() / sizeof(T)) {
    return absl::DataLossError(absl::StrCat(
        path, ": file is truncated at offset ", r.pos(), " reading ", what,
        " (", r.remaining(), " bytes left)"));
  }
  std::vector<T> values(count);
  MX_RETURN_IF_ERROR(r.Bytes(values.data(), count * sizeof(T), what));
  return values;
}

absl::StatusOr<Entry> ReadEntry(Reader& r, const std::string& path, uint32_t version,
                                Context ctx) {
  Entry e;
  MX_ASSIGN_OR_RETURN(e.name, ReadName(r, path));
  uint32_t stype = kDense;
  if (version == kVersionWithStorage) {
    MX_RETURN_IF_ERROR(r.Get(&stype, "a storage type"));
    if (stype != kDense && stype != kRowSparse) {
      return absl::DataLossError(absl::StrCat(path, ": array '", e.name,
                                              "' has unknown storage type ", stype));
    }
  }
  MX_ASSIGN_OR_RETURN(const Shape shape, ReadShape(r, path, e.name));
  const std::string what = absl::StrCat("the data of '", e.name, "' ", shape.ToString());
  if (stype == kDense) {
    MX_ASSIGN_OR_RETURN(std::vector<float> values,
                        ReadValues<float>(r, path, shape.Size(), what));
    MX_RETURN_IF_ERROR(CatchError([&] { e.dense = FromVector(values, shape, ctx); }));
    return e;
  }
  uint64_t nnz = 0;
  MX_RETURN_IF_ERROR(r.Get(&nnz, absl::StrCat("the row count of '", e.name, "'").c_str()));
  if (shape.ndim() == 0) {
    return absl::DataLossError(absl::StrCat(path, ": row-sparse array '", e.name,
                                            "' has no dimensions"));
  }
  MX_ASSIGN_OR_RETURN(std::vector<int64_t> ids,
                      ReadValues<int64_t>(r, path, nnz, absl::StrCat("the row ids of '",
                                                                     e.name, "'")));
  if (absl::Status s = CheckRowIds(ids, shape[0], absl::StrCat(path, ": array '", e.name, "'"));
      !s.ok()) {
    return absl::DataLossError(s.message());
  }
  Shape rows = shape;
  rows[0] = static_cast<int64_t>(nnz);
  MX_ASSIGN_OR_RETURN(std::vector<float> values,
                      ReadValues<float>(r, path, rows.Size(), what));
  MX_RETURN_IF_ERROR(CatchError([&] {
    e.sparse = RowSparseNDArray(shape, std::move(ids), FromVector(values, rows, ctx));
  }));
  return e;
}

void WriteShape(Writer& w, const Shape& shape) {
  w.Put(static_cast<uint32_t>(shape.ndim()));
  for (int64_t d : shape) w.Put(d);
}

// The values of an array on the host, with errors prefixed by `what`.
absl::StatusOr<std::vector<float>> HostValues(const NDArray& array, const std::string& what,
                                              const std::string& name) {
  try {
    return array.ToVector();
  } catch (const Error& e) {
    return absl::Status(e.code(), absl::StrCat(what, ": array '", name, "': ", e.what()));
  }
}

// The whole format in memory. `what` prefixes errors about the arrays
// ("Save <path>" or "SerializeArrays").
absl::StatusOr<std::string> Encode(const std::vector<Entry>& entries, const std::string& what) {
  const bool any_sparse = std::any_of(entries.begin(), entries.end(),
                                      [](const Entry& e) { return !e.sparse.is_none(); });
  Writer w;
  w.Bytes(kMagic, 4);
  w.Put(any_sparse ? kVersionWithStorage : kVersion);
  w.Put(static_cast<uint64_t>(entries.size()));
  for (const Entry& e : entries) {
    const bool sparse = !e.sparse.is_none();
    if (!sparse && e.dense.is_none()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": array '", e.name, "' is null"));
    }
    // What Decode takes back: a longer name or a higher rank was saved
    // and then refused at the load.
    const Shape& shape = sparse ? e.sparse.shape() : e.dense.shape();
    if (e.name.size() > kMaxNameLength || shape.ndim() > kMaxDims) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": array '", e.name.substr(0, 64), e.name.size() > 64 ? "...'" : "'",
                       " has a name of ", e.name.size(), " bytes and rank ", shape.ndim(),
                       " (at most ", kMaxNameLength, " and ", kMaxDims, ")"));
    }
    w.Put(static_cast<uint32_t>(e.name.size()));
    w.Bytes(e.name.data(), e.name.size());
    if (any_sparse) w.Put(sparse ? kRowSparse : kDense);
    WriteShape(w, sparse ? e.sparse.shape() : e.dense.shape());
    if (sparse) {
      w.Put(static_cast<uint64_t>(e.sparse.nnz()));
      w.Bytes(e.sparse.indices().data(), e.sparse.indices().size() * sizeof(int64_t));
    }
    MX_ASSIGN_OR_RETURN(const std::vector<float> values,
                        HostValues(sparse ? e.sparse.data() : e.dense, what, e.name));
    w.Bytes(values.data(), values.size() * sizeof(float));
  }
  w.Put(Crc(w.buf(), w.buf().size()));
  return std::move(w.buf());
}

// Parses the format from memory. `path` (the file, or a label for data that
// never was one) starts every error.
absl::StatusOr<std::vector<Entry>> Decode(const std::string& data, const std::string& path,
                                          Context ctx) {
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
  if (version != kVersion && version != kVersionWithStorage) {
    return absl::DataLossError(absl::StrCat(path, ": unsupported format version ",
                                            version, " (this mx reads ", kVersion,
                                            " and ", kVersionWithStorage, ")"));
  }
  uint64_t count = 0;
  MX_RETURN_IF_ERROR(r.Get(&count, "the array count"));

  // Checksum first: a corrupt file must not be parsed into garbage shapes.
  uint32_t stored;
  std::memcpy(&stored, data.data() + body_end, sizeof(stored));
  const uint32_t actual = Crc(data, body_end);
  std::vector<Entry> out;
  for (uint64_t i = 0; i < count; ++i) {
    absl::StatusOr<Entry> e = ReadEntry(r, path, version, ctx);
    if (!e.ok()) {
      if (stored == actual) return e.status();
      return absl::DataLossError(absl::StrCat(
          e.status().message(), "; the checksum does not match either: the "
          "file is corrupt or truncated"));
    }
    out.push_back(*std::move(e));
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

std::vector<Entry> DenseEntries(const NamedArrays& arrays) {
  std::vector<Entry> entries;
  for (const auto& [name, array] : arrays) entries.push_back({name, array, {}});
  return entries;
}

// The dense arrays of `entries`; a row-sparse one is an error naming it.
absl::StatusOr<NamedArrays> DenseOnly(std::vector<Entry> entries, const std::string& path) {
  NamedArrays out;
  for (Entry& e : entries) {
    if (!e.sparse.is_none()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": array '", e.name, "' is row_sparse; load it with LoadRowSparse"));
    }
    out.emplace_back(std::move(e.name), std::move(e.dense));
  }
  return out;
}

}  // namespace

// POSIX reads: a std::ifstream opens a directory, and its first read then
// throws past any status (libstdc++'s filebuf reports EISDIR so).
absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  std::string data;
  struct stat st {};
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) data.reserve(static_cast<size_t>(st.st_size));
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n == 0) break;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      close(fd);
      return absl::ErrnoToStatus(e, absl::StrCat("cannot read ", path));
    }
    data.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  return data;
}

absl::StatusOr<std::string> SerializeArrays(const NamedArrays& arrays) {
  return Encode(DenseEntries(arrays), "SerializeArrays");
}

absl::StatusOr<NamedArrays> DeserializeArrays(const std::string& bytes,
                                              Context ctx) {
  const std::string label = "serialized NDArray data";
  MX_ASSIGN_OR_RETURN(std::vector<Entry> entries, Decode(bytes, label, ctx));
  return DenseOnly(std::move(entries), label);
}

namespace {

// Creates a file to write `path` through, beside it (a rename within a
// directory is atomic), named *tmp: a name of its own, PATH.tmp.PID.RANDOM.
// Two writers of one path (a worker declared dead that does not know it
// yet, and the one that took over the checkpoints) shared "PATH.tmp": one
// truncated what the other then renamed. Random, as a pid and a count are
// the same in every run of a container (PID 1), where a writer killed part
// way leaves its file on the volume for the next run to meet.
absl::StatusOr<std::FILE*> CreateTemp(const std::string& path, std::string* tmp) {
  static std::atomic<uint64_t> files{0};
  int fd = -1;
  for (int attempt = 0; fd < 0 && attempt < 8; ++attempt) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof(r), 0) != sizeof(r)) r = files.load();
    *tmp = absl::StrCat(path, ".tmp.", getpid(), ".", absl::Hex(r ^ files++, absl::kZeroPad16));
    fd = open(tmp->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) return ErrnoError("cannot create", *tmp);
  std::FILE* f = fdopen(fd, "wb");
  if (f == nullptr) {
    absl::Status s = ErrnoError("cannot create", *tmp);
    close(fd);
    std::remove(tmp->c_str());
    return s;
  }
  return f;
}

}  // namespace

absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes) {
  std::string tmp;
  MX_ASSIGN_OR_RETURN(std::FILE * f, CreateTemp(path, &tmp));
  bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  ok = (std::fflush(f) == 0) && ok;
  ok = (fsync(fileno(f)) == 0) && ok;  // on disk before the rename: else a
                                       // power loss may leave an empty file
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
                      Encode(DenseEntries(arrays), absl::StrCat("Save ", path)));
  return WriteFileAtomically(path, bytes);
}

absl::StatusOr<NamedArrays> Load(const std::string& path, Context ctx) {
  MX_ASSIGN_OR_RETURN(const std::string data, ReadWholeFile(path));
  MX_ASSIGN_OR_RETURN(std::vector<Entry> entries, Decode(data, path, ctx));
  return DenseOnly(std::move(entries), path);
}

absl::Status SaveRowSparse(const std::string& path, const NamedRowSparse& arrays) {
  std::vector<Entry> entries;
  for (const auto& [name, array] : arrays) {
    if (array.is_none()) {
      return absl::InvalidArgumentError(
          absl::StrCat("SaveRowSparse ", path, ": array '", name, "' is null"));
    }
    entries.push_back({name, {}, array});
  }
  MX_ASSIGN_OR_RETURN(const std::string bytes,
                      Encode(entries, absl::StrCat("SaveRowSparse ", path)));
  return WriteFileAtomically(path, bytes);
}

absl::StatusOr<NamedRowSparse> LoadRowSparse(const std::string& path, Context ctx) {
  MX_ASSIGN_OR_RETURN(const std::string data, ReadWholeFile(path));
  MX_ASSIGN_OR_RETURN(std::vector<Entry> entries, Decode(data, path, ctx));
  NamedRowSparse out;
  for (Entry& e : entries) {
    if (e.sparse.is_none()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": array '", e.name, "' is dense; load it with Load"));
    }
    out.emplace_back(std::move(e.name), std::move(e.sparse));
  }
  return out;
}

// ---- Streaming.

ArrayFileWriter::~ArrayFileWriter() {
  if (file_ == nullptr) return;
  std::fclose(file_);
  std::remove(tmp_.c_str());
}

absl::StatusOr<std::unique_ptr<ArrayFileWriter>> ArrayFileWriter::Create(const std::string& path,
                                                                         uint64_t count) {
  std::unique_ptr<ArrayFileWriter> w(new ArrayFileWriter());
  w->path_ = path;
  MX_ASSIGN_OR_RETURN(w->file_, CreateTemp(path, &w->tmp_));
  w->crc_ = CrcStart();
  w->arrays_left_ = count;
  MX_RETURN_IF_ERROR(w->Write(kMagic, 4));
  MX_RETURN_IF_ERROR(w->Write(&kVersion, sizeof(kVersion)));
  MX_RETURN_IF_ERROR(w->Write(&count, sizeof(count)));
  return w;
}

absl::Status ArrayFileWriter::Write(const void* p, size_t n) {
  if (n > 0 && std::fwrite(p, 1, n, file_) != n) return ErrnoError("cannot write", tmp_);
  crc_ = CrcUpdate(crc_, p, n);
  return absl::OkStatus();
}

absl::Status ArrayFileWriter::BeginArray(const std::string& name, const Shape& shape) {
  if (values_left_ != 0 || arrays_left_ == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        path_, ": array '", name, "' begun ",
        values_left_ != 0 ? absl::StrCat("while the last lacks ", values_left_, " values")
                          : "beyond the arrays announced"));
  }
  if (name.size() > kMaxNameLength || shape.ndim() > static_cast<int>(kMaxDims) ||
      !shape.IsValid()) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": array '", name, "' ",
                                                   shape.ToString(), " cannot be written"));
  }
  const uint32_t len = static_cast<uint32_t>(name.size()), ndim = shape.ndim();
  MX_RETURN_IF_ERROR(Write(&len, sizeof(len)));
  MX_RETURN_IF_ERROR(Write(name.data(), name.size()));
  MX_RETURN_IF_ERROR(Write(&ndim, sizeof(ndim)));
  for (int64_t d : shape) MX_RETURN_IF_ERROR(Write(&d, sizeof(d)));
  values_left_ = shape.Size();
  --arrays_left_;
  return absl::OkStatus();
}

absl::Status ArrayFileWriter::Append(const float* data, size_t n) {
  if (static_cast<int64_t>(n) > values_left_) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", n, " values appended where ",
                                                   values_left_, " remain"));
  }
  values_left_ -= static_cast<int64_t>(n);
  return Write(data, n * sizeof(float));
}

absl::Status ArrayFileWriter::Finish() {
  if (values_left_ != 0 || arrays_left_ != 0) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": finished with ", arrays_left_,
                                                      " arrays and ", values_left_,
                                                      " values missing"));
  }
  const uint32_t crc = crc_;
  if (std::fwrite(&crc, 1, sizeof(crc), file_) != sizeof(crc) || std::fflush(file_) != 0 ||
      fsync(fileno(file_)) != 0) {
    return ErrnoError("cannot write", tmp_);
  }
  const int closed = std::fclose(file_);
  file_ = nullptr;
  if (closed != 0 || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    absl::Status s = ErrnoError("cannot finish", path_);
    std::remove(tmp_.c_str());
    return s;
  }
  return absl::OkStatus();
}

ArrayFileReader::~ArrayFileReader() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::StatusOr<std::unique_ptr<ArrayFileReader>> ArrayFileReader::Open(const std::string& path) {
  std::unique_ptr<ArrayFileReader> r(new ArrayFileReader());
  r->path_ = path;
  r->file_ = std::fopen(path.c_str(), "rb");
  if (r->file_ == nullptr) return ErrnoError("cannot open", path);
  char magic[4] = {};
  if (std::fread(magic, 1, 4, r->file_) != 4 || std::memcmp(magic, kMagic, 4) != 0) {
    return absl::DataLossError(
        absl::StrCat(path, ": not an mx NDArray file (bad magic at offset 0)"));
  }
  // The checksum of everything but its own last 4 bytes, in one pass.
  std::fseek(r->file_, 0, SEEK_END);
  const long size = std::ftell(r->file_);
  if (size < 4 + 4 + 8 + 4) {
    return absl::DataLossError(absl::StrCat(path, ": file is truncated (", size, " bytes)"));
  }
  std::rewind(r->file_);
  FileSource source(r->path_, r->file_);
  uint32_t crc = CrcStart();
  std::vector<char> block(1 << 20);
  for (long left = size - 4; left > 0;) {
    const size_t n = std::min<long>(left, static_cast<long>(block.size()));
    MX_RETURN_IF_ERROR(source.Bytes(block.data(), n, "the checksum pass"));
    crc = CrcUpdate(crc, block.data(), n);
    left -= static_cast<long>(n);
  }
  uint32_t stored = 0;
  MX_RETURN_IF_ERROR(source.Get(&stored, "the checksum"));
  if (stored != crc) {
    return absl::DataLossError(absl::StrCat(path, ": checksum mismatch (stored ", stored,
                                            ", computed ", crc,
                                            "): the file is corrupt or truncated"));
  }
  std::fseek(r->file_, 4, SEEK_SET);
  uint32_t version = 0;
  MX_RETURN_IF_ERROR(source.Get(&version, "the version"));
  if (version != kVersion) {
    return absl::DataLossError(absl::StrCat(path, ": format version ", version,
                                            " cannot be streamed (dense arrays are version ",
                                            kVersion, ")"));
  }
  MX_RETURN_IF_ERROR(source.Get(&r->arrays_left_, "the array count"));
  return r;
}

absl::StatusOr<std::pair<std::string, Shape>> ArrayFileReader::NextArray() {
  if (values_left_ != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": the last array still has ", values_left_, " values to read"));
  }
  if (arrays_left_ == 0) return absl::OutOfRangeError(absl::StrCat(path_, ": no more arrays"));
  FileSource source(path_, file_);
  MX_ASSIGN_OR_RETURN(std::string name, ReadName(source, path_));
  MX_ASSIGN_OR_RETURN(Shape shape, ReadShape(source, path_, name));
  values_left_ = shape.Size();
  --arrays_left_;
  return std::make_pair(std::move(name), std::move(shape));
}

absl::Status ArrayFileReader::Read(float* data, size_t n) {
  if (static_cast<int64_t>(n) > values_left_) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", n, " values read where ",
                                                   values_left_, " remain"));
  }
  values_left_ -= static_cast<int64_t>(n);
  return FileSource(path_, file_).Bytes(data, n * sizeof(float), "array data");
}

}  // namespace mx
