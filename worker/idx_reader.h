// Internal to worker/io.cc: reading IDX files, the format of MNIST and
// Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), and the zlib helpers
// the file readers share (libsvm_iter.cc too).
//
// Layout (all integers big-endian): a 4-byte magic 0x00 0x00 <type> <ndim>,
// then ndim 32-bit dimensions, then the data in row-major order. Only type
// 0x08 (unsigned bytes) is read here: MNIST images are 0x00000803 with
// dimensions (N, rows, cols), labels 0x00000801 with (N).
//
// A file may be gzipped (recognized by the gzip magic 0x1f 0x8b, not by its
// name); offsets in error messages then count bytes of the decompressed data.
#ifndef MX_WORKER_IDX_READER_H_
#define MX_WORKER_IDX_READER_H_

#include <zlib.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace mx {
namespace internal {

// A zlib file (gzopen) that closes itself; zlib reads plain files as they
// are.
struct GzCloser {
  void operator()(gzFile f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

// The error for a file that did not open (from errno): NotFound or
// PermissionDenied, "cannot open PATH: REASON".
absl::Status OpenError(const std::string& path);

struct IdxFile {
  std::vector<int64_t> dims;  // from the header, e.g. (N, 28, 28)
  std::vector<uint8_t> data;  // the product of dims bytes
};

// Reads an IDX file of unsigned bytes with `ndim` dimensions. Errors name the
// file and the byte offset: NotFound for a missing file, DataLoss for a wrong
// magic, a truncated file, trailing bytes after the data, or a corrupt gzip
// stream.
absl::StatusOr<IdxFile> ReadIdxFile(const std::string& path, int ndim);

}  // namespace internal
}  // namespace mx

#endif  // MX_WORKER_IDX_READER_H_
