// NDArray: a handle to an n-dimensional float32 array on a Context.
//
// The model is MXNet's NDArray as the MXNet.jl overview shows it:
//
//   mx::NDArray a = mx::Ones({2, 3});      // 2x3 on cpu(0)
//   mx::NDArray b = a.Slice(0, 1);          // row 0, shares a's memory
//   b.Assign(2);                            // the seed's b[:] = 2; a changes
//   a += mx::Ones({2, 3});                  // truly in place
//   std::vector<float> host = a.ToVector(); // the seed's copy(a)
//
// Handles. Copying an NDArray copies the handle: both refer to the same
// storage (the seed's `r = a`). Contents are copied only by Assign, Copy and
// ToVector. Slice (along the first, slowest dimension, so a slice is
// contiguous) and Reshape return handles that share memory with their parent.
//
// Asynchrony. Every operation is pushed to the Engine and returns at once;
// reading the values (ToVector, printing, WaitToRead) waits for the
// operations that write them. An operation that fails (for example a kernel
// that runs out of memory) stores its error on its outputs; the error is
// thrown by whoever waits on them. Errors in the arguments themselves
// (mismatched shapes, out-of-range slices, wrong host buffer sizes, an
// unavailable context) are thrown at once as mx::Error with code
// kInvalidArgument or kFailedPrecondition and a message naming the shapes.
//
// Temporaries (the result of `lr * grad`) come from the pooled allocator in
// ndarray/storage.h, so expression-heavy code stays close to code that
// preallocates.
//
// Contexts. Every operation runs on the context of its arguments, cpu(i) or
// gpu(i), through the kernel layer (ndarray/kernel.h); arguments on
// different contexts are refused (kInvalidArgument naming both), since only
// Assign and Copy move data between contexts.
//
// Thread safety. Every function here may be called from any thread, and
// from several at once, under these rules:
//  - Handles. Several threads may use one handle object at once, through
//    any member but assignment, which (like destruction) needs the others
//    to be done with that object, as for any C++ value. Copies, slices and
//    reshapes are separate handle objects.
//  - Order. Each call pushes its operations to the engine before it
//    returns, so the operations of one thread run as if in its program
//    order. On one array (and its views, which share its engine variable)
//    the operations of all threads run in the order of their pushes, a
//    write alone and reads side by side; between threads that order is the
//    order in which the calls happen to push, unless the threads
//    synchronize. Arrays that share no storage are independent.
//  - Waiting. WaitToRead returns once every operation that writes the
//    array, pushed by any thread before the call, has completed;
//    WaitToWrite also waits for those that read it. Their results are then
//    visible to the caller. WaitAll returns at a moment when no operation
//    is pending: after everything pushed before the call (threads that
//    keep pushing can delay it).
//  - Host copies. ToVector, SyncCopyToCPU, Scalar, printing and Save wait
//    as WaitToRead does, then copy on the calling thread, outside the
//    engine; SyncCopyFromCPU and Assign(host data) wait as WaitToWrite
//    does, then copy. Nothing holds back an operation another thread
//    pushes meanwhile, so the caller must keep writes (for a copy out of
//    the array) or all operations (for a copy into it) off the array until
//    the copy returns; the same holds for data() after a wait.
//  - Errors. An argument error is thrown by the call, on the calling
//    thread. An operation's error is stored on the arrays it writes, and
//    operations that later read or write them are skipped and pass it on. A
//    wait on such an array (WaitToRead, WaitToWrite, a host copy) throws it
//    and clears it from that array: of several threads waiting on one
//    array, one gets it. WaitAll throws the first error no wait has thrown.
//  - Random numbers. A random operation takes its seed when it is pushed:
//    after srand(s), the values are reproducible when one thread draws
//    them; threads that draw at once take seeds in the order they push.
#ifndef MX_NDARRAY_NDARRAY_H_
#define MX_NDARRAY_NDARRAY_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ndarray/base.h"
#include "ndarray/context.h"
#include "ndarray/engine.h"

namespace mx {

class NDArray {
 public:
  // A null handle, with no storage; is_none() is true.
  NDArray() = default;
  // An uninitialized array. Throws mx::Error for a negative dimension or an
  // unavailable context.
  explicit NDArray(const Shape& shape, Context ctx = cpu());

  bool is_none() const { return chunk_ == nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t size() const { return shape_.Size(); }
  int ndim() const { return shape_.ndim(); }
  Context context() const;

  // ---- Contents. Assign* are asynchronous and return *this.

  // Sets every element to value (the seed's a[:] = 0.5).
  NDArray& Assign(float value);
  // Copies host data in row-major order (the seed's a[:] = rand(size(a))).
  // data.size() must equal size().
  NDArray& Assign(const std::vector<float>& data);
  // Copies the contents of src, which may live on another context
  // (the seed's b[:] = a and copy!(z, y)). Shapes must be equal.
  NDArray& Assign(const NDArray& src);

  // A new array on ctx with a copy of the contents (the seed's mx.copy).
  NDArray Copy(Context ctx) const;
  NDArray Copy() const { return Copy(context()); }

  // Waits for pending writes, then copies the contents to the host.
  std::vector<float> ToVector() const;
  void SyncCopyToCPU(float* data, size_t n) const;
  void SyncCopyFromCPU(const float* data, size_t n);
  // The single value of an array of size 1 (a reduction's result).
  float Scalar() const;

  // ---- Views that share memory with this array.

  // Rows [begin, end) of the first dimension. 0 <= begin <= end <= shape[0].
  NDArray Slice(int64_t begin, int64_t end) const;
  // Row i of the first dimension, with one dimension fewer; of a vector,
  // element i as shape (1,), as MXNet's At (a 0-d array binds and saves
  // nowhere: MXNet reads ndim 0 as an unknown shape).
  NDArray At(int64_t i) const;
  // The same elements with another shape of equal size. One dimension may be
  // -1 and is then inferred.
  NDArray Reshape(const Shape& shape) const;

  // ---- In place: these modify this array's storage (and every view of it).
  // b must have this shape or broadcast to it.
  NDArray& operator+=(const NDArray& b);
  NDArray& operator-=(const NDArray& b);
  NDArray& operator*=(const NDArray& b);
  NDArray& operator/=(const NDArray& b);
  NDArray& operator+=(float s);
  NDArray& operator-=(float s);
  NDArray& operator*=(float s);
  NDArray& operator/=(float s);

  // ---- Synchronization. Both rethrow an error stored by a failed operation
  // (and clear it: see "Thread safety" above).

  // Waits until every write of this array pushed so far is done.
  void WaitToRead() const;
  // Waits until every read and write of this array pushed so far is done.
  void WaitToWrite() const;

  // ---- For kernels and engine operations.

  // The first element. Valid to dereference only inside an engine operation
  // that declared this array's var, or after WaitToRead / WaitToWrite.
  float* data() const;
  VarHandle var() const;
  // True when both handles refer to the same storage (any views of it).
  bool SharesStorageWith(const NDArray& other) const {
    return chunk_ != nullptr && chunk_ == other.chunk_;
  }

  // "2×3 NDArray<float> @ cpu(0):" and the values, elided when large.
  std::string ToString() const;

 private:
  struct Chunk;
  NDArray(std::shared_ptr<Chunk> chunk, Shape shape, int64_t offset)
      : chunk_(std::move(chunk)), shape_(std::move(shape)), offset_(offset) {}
  void CheckNotNone(const char* op) const;

  std::shared_ptr<Chunk> chunk_;
  Shape shape_;
  int64_t offset_ = 0;  // in elements, from the start of the chunk
};

std::ostream& operator<<(std::ostream& os, const NDArray& a);

// ---- Creation (the seed's mx.empty, mx.zeros, mx.ones, mx.copy).
NDArray Empty(const Shape& shape, Context ctx = cpu());
NDArray Zeros(const Shape& shape, Context ctx = cpu());
NDArray Ones(const Shape& shape, Context ctx = cpu());
NDArray Full(const Shape& shape, float value, Context ctx = cpu());
// A new array holding a copy of host data; data.size() must equal
// shape.Size(). Without a shape, a 1-D array.
NDArray FromVector(const std::vector<float>& data, const Shape& shape,
                   Context ctx = cpu());
NDArray FromVector(const std::vector<float>& data, Context ctx = cpu());

// ---- Arithmetic returning new arrays. Array-array operations broadcast
// NumPy-style: shapes are aligned from the right and each dimension must be
// equal or 1 in one of them, as in (n,m) with (1,m) or (n,1).
NDArray operator+(const NDArray& a, const NDArray& b);
NDArray operator-(const NDArray& a, const NDArray& b);
NDArray operator*(const NDArray& a, const NDArray& b);
NDArray operator/(const NDArray& a, const NDArray& b);
NDArray operator+(const NDArray& a, float s);
NDArray operator-(const NDArray& a, float s);
NDArray operator*(const NDArray& a, float s);
NDArray operator/(const NDArray& a, float s);
NDArray operator+(float s, const NDArray& a);
NDArray operator-(float s, const NDArray& a);
NDArray operator*(float s, const NDArray& a);
NDArray operator/(float s, const NDArray& a);
NDArray operator-(const NDArray& a);

// alpha * x + beta * y in one pass (x and y of equal shape): the fused form
// of an expression that would otherwise make a temporary.
NDArray Axpby(float alpha, const NDArray& x, float beta, const NDArray& y);

// Matrix product of 2-D arrays (sgemm, ndarray/parallel.h): op(a) * op(b) where
// op transposes when asked. Inner dimensions must agree.
NDArray Dot(const NDArray& a, const NDArray& b, bool transpose_a = false,
            bool transpose_b = false);

// ---- Element-wise functions.
NDArray Exp(const NDArray& a);
NDArray Log(const NDArray& a);
NDArray Sqrt(const NDArray& a);
NDArray Square(const NDArray& a);
NDArray Abs(const NDArray& a);
NDArray Sign(const NDArray& a);
NDArray Relu(const NDArray& a);
NDArray Sigmoid(const NDArray& a);
NDArray Tanh(const NDArray& a);
// Limits each element to [lo, hi]; lo <= hi.
NDArray Clip(const NDArray& a, float lo, float hi);
NDArray Maximum(const NDArray& a, const NDArray& b);
NDArray Minimum(const NDArray& a, const NDArray& b);
NDArray Maximum(const NDArray& a, float s);
NDArray Minimum(const NDArray& a, float s);

// ---- Reductions. Without an axis they reduce everything to shape (1,).
// With an axis (negative counts from the end) they remove that dimension,
// or keep it with size 1 when keepdims is true.
NDArray Sum(const NDArray& a);
NDArray Mean(const NDArray& a);
NDArray Max(const NDArray& a);
NDArray Min(const NDArray& a);
NDArray Norm(const NDArray& a);  // L2 (Frobenius) norm
NDArray Sum(const NDArray& a, int axis, bool keepdims = false);
NDArray Mean(const NDArray& a, int axis, bool keepdims = false);
NDArray Max(const NDArray& a, int axis, bool keepdims = false);
NDArray Min(const NDArray& a, int axis, bool keepdims = false);
NDArray Norm(const NDArray& a, int axis, bool keepdims = false);

// ---- Random numbers. srand seeds the process-wide generator; each random
// operation takes its own seed from it when pushed, so a program that pushes
// the same operations after srand(s) gets the same values on every run,
// however the engine schedules them (the seed's mx.srand(42)).
void srand(uint64_t seed);
NDArray RandomUniform(float low, float high, const Shape& shape,
                      Context ctx = cpu());
NDArray RandomNormal(float mean, float stddev, const Shape& shape,
                     Context ctx = cpu());
// A fresh seed from the process generator, for kernels that draw their own
// random numbers (Dropout).
uint64_t NextRandomSeed();
// Fills an existing array.
void SampleUniform(float low, float high, NDArray* out);
void SampleNormal(float mean, float stddev, NDArray* out);

// Waits until no operation is pending (so for every operation pushed before
// the call, by any thread); rethrows the first error no wait has reported.
void WaitAll();

// Copies from's values into to (the same shape, any two contexts) in engine
// order, as MXNet's CopyFromTo: at `priority` (higher runs first among
// ready operations; the KVStore gives the first layers' traffic a higher
// one), named `name` in traces and errors (a string that outlives the
// copy). A GPU side runs it on one of its streams (ndarray/device.h).
// to.Assign(from) is CopyFromTo(from, to).
void CopyFromTo(const NDArray& from, const NDArray& to, int priority = 0,
                const char* name = "Copy");

// ---- Files: a named list of arrays (checkpoints use this).
// Format (little-endian): magic "MXND", version u32, count u64, then per
// array: name length u32, name bytes, ndim u32, dims i64[ndim], float32
// data; then a CRC-32 (zlib) of everything before it. Save writes a
// temporary file and renames it, so a crash never leaves a half-written file
// under `path`. Load reports a missing file, a wrong magic or version, a
// truncated file (with the byte offset) and a bad checksum. Version 2 adds a
// storage type to each entry, for row-sparse arrays (ndarray/row_sparse.h);
// Save writes version 1, which version-2 readers read too.
using NamedArrays = std::vector<std::pair<std::string, NDArray>>;
absl::Status Save(const std::string& path, const NamedArrays& arrays);

// Writes `bytes` to `path` through a file of its own beside it
// (PATH.tmp.PID.RANDOM) and a rename, so a write
// that fails (a full disk) leaves a file already at `path` as it was. The
// error names the file and the system's reason.
absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes);
// The bytes of the file at `path`: NOT_FOUND when there is none, another
// error naming the file and the system's reason when it cannot be read
// (a directory, no permission).
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);
absl::StatusOr<NamedArrays> Load(const std::string& path, Context ctx = cpu());

// The same format written and read an array piece at a time, for arrays
// too big to hold (an embedding table checkpointed row range by row
// range). A file the writer makes is one Load reads, and the reader reads
// what Save writes (dense arrays).
//
//   auto w = ArrayFileWriter::Create(path, /*count=*/1);
//   w->BeginArray("embed", {rows, 64});
//   w->Append(chunk.data(), chunk.size());   // until rows * 64 values
//   w->Finish();                             // the checksum, then rename
class ArrayFileWriter {
 public:
  // Starts a file of its own beside `path` (PATH.tmp.PID.RANDOM) for
  // `count` arrays.
  static absl::StatusOr<std::unique_ptr<ArrayFileWriter>> Create(const std::string& path,
                                                                 uint64_t count);
  ~ArrayFileWriter();  // without Finish: removes the temporary file
  // The next array's name and shape; the previous one must be complete.
  absl::Status BeginArray(const std::string& name, const Shape& shape);
  // The next n values of the current array (at most what it lacks).
  absl::Status Append(const float* data, size_t n);
  // Every array complete: writes the checksum and renames the file to path.
  absl::Status Finish();

 private:
  ArrayFileWriter() = default;
  absl::Status Write(const void* p, size_t n);
  std::string path_;
  std::string tmp_;  // where it writes until Finish renames it to path_
  std::FILE* file_ = nullptr;
  uint32_t crc_ = 0;
  uint64_t arrays_left_ = 0;
  int64_t values_left_ = 0;  // of the current array
};

// Reads a file of dense arrays an array piece at a time. Open checks the
// whole file's checksum first (one pass), so what it then reads is what
// was written; errors name the file, as Load's do.
class ArrayFileReader {
 public:
  static absl::StatusOr<std::unique_ptr<ArrayFileReader>> Open(const std::string& path);
  ~ArrayFileReader();
  // The next array's name and shape; the previous one must be read whole.
  // kOutOfRange after the last.
  absl::StatusOr<std::pair<std::string, Shape>> NextArray();
  // The next n values of the current array.
  absl::Status Read(float* data, size_t n);

 private:
  ArrayFileReader() = default;
  std::string path_;
  std::FILE* file_ = nullptr;
  uint64_t arrays_left_ = 0;
  int64_t values_left_ = 0;
};
// The same format as a byte string, for state that travels in messages or
// is embedded in other files (optimizer states). Deserialize reports what
// Load reports, naming "serialized NDArray data" instead of a file.
absl::StatusOr<std::string> SerializeArrays(const NamedArrays& arrays);
absl::StatusOr<NamedArrays> DeserializeArrays(const std::string& bytes,
                                              Context ctx = cpu());

}  // namespace mx

#endif  // MX_NDARRAY_NDARRAY_H_
