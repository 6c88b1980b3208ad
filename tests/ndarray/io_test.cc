// Tests of Save / Load (ndarray/io.cc): round trips, and every way a file can
// be missing, foreign, truncated or corrupt, each reported as a status that
// names the file rather than a crash or garbage arrays.
#include <dirent.h>
#include <sys/resource.h>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/ndarray.h"

namespace mx {
namespace {

using ::testing::AnyOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  return ::testing::TempDir() + info->test_suite_name() + "_" + info->name() +
         "_" + name;
}

// Whether a temporary file of a write of `path` (PATH.tmp.*) is left.
bool TempLeft(const std::string& path) {
  const std::string dir = path.substr(0, path.rfind('/') + 1);
  const std::string stem = path.substr(dir.size()) + ".tmp";
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return false;
  bool left = false;
  while (const dirent* e = readdir(d)) left |= std::string(e->d_name).rfind(stem, 0) == 0;
  closedir(d);
  return left;
}

// Runs fn with the process's file size limit at `bytes` (writes beyond it
// fail with EFBIG, as on a full disk), then restores the limit.
void WithFileSizeLimit(rlim_t bytes, const std::function<void()>& fn) {
  rlimit old;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  std::signal(SIGXFSZ, SIG_IGN);  // an error from write(), not a signal
  rlimit limited = old;
  limited.rlim_cur = bytes;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limited), 0);
  fn();
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)),
                     std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::vector<float> Iota(int64_t n, float start = 0) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = start + static_cast<float>(i);
  return v;
}

// A file with several arrays: 2-D, 1-D, 3-D, 0-size and 0-d.
NamedArrays SampleArrays() {
  return {
      {"weight", FromVector(Iota(6, 1), {2, 3})},
      {"bias", FromVector({-1.5f, 0.25f, 3e-8f})},
      {"cube", FromVector(Iota(24, -10), {2, 3, 4})},
      {"empty", Zeros({0, 5})},
      {"scalar", FromVector({42.0f}, Shape{})},
      {"", Full({1, 1}, 7.0f)},  // an empty name is a name
  };
}

void ExpectSameArrays(const NamedArrays& got, const NamedArrays& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first) << "array " << i;
    EXPECT_EQ(got[i].second.shape(), want[i].second.shape()) << want[i].first;
    EXPECT_EQ(got[i].second.ToVector(), want[i].second.ToVector())
        << want[i].first;
  }
}

absl::Status SaveSample(const std::string& path) {
  return Save(path, SampleArrays());
}

TEST(SaveLoad, RoundTripKeepsNamesOrderShapesAndValues) {
  const std::string path = TempPath("sample.mxnd");
  ASSERT_TRUE(SaveSample(path).ok());
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameArrays(*loaded, SampleArrays());
  EXPECT_EQ((*loaded)[4].second.ndim(), 0);
  EXPECT_EQ((*loaded)[3].second.size(), 0);
  EXPECT_EQ((*loaded)[0].second.context(), cpu());
}

TEST(SaveLoad, LoadsOntoTheRequestedContext) {
  const std::string path = TempPath("ctx.mxnd");
  ASSERT_TRUE(Save(path, {{"a", Ones({2, 2})}}).ok());
  absl::StatusOr<NamedArrays> loaded = Load(path, cpu(3));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)[0].second.context(), cpu(3));
  EXPECT_THAT((*loaded)[0].second.ToVector(), ElementsAre(1, 1, 1, 1));
}

TEST(SaveLoad, LoadOntoAMissingGpuFailsWithFailedPrecondition) {
  if (NumGpus() > 0) GTEST_SKIP() << "this machine has a GPU";
  const std::string path = TempPath("gpu.mxnd");
  ASSERT_TRUE(Save(path, {{"a", Ones({2})}}).ok());
  absl::StatusOr<NamedArrays> loaded = Load(path, gpu(0));
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("gpu(0)"));
}

TEST(SaveLoad, EmptyListRoundTrips) {
  const std::string path = TempPath("none.mxnd");
  ASSERT_TRUE(Save(path, {}).ok());
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(loaded->empty());
}

TEST(SaveLoad, SavesPendingResultsAndSlices) {
  const std::string path = TempPath("pending.mxnd");
  NDArray a = Ones({4, 2});
  NDArray b = a * 3.0f + 1.0f;  // possibly not computed yet
  ASSERT_TRUE(Save(path, {{"b", b}, {"rows", b.Slice(1, 3)}}).ok());
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_THAT((*loaded)[0].second.ToVector(), ::testing::Each(4.0f));
  EXPECT_EQ((*loaded)[1].second.shape(), Shape({2, 2}));
}

TEST(SaveLoad, FileStartsWithMagicAndVersionAndLeavesNoTemporary) {
  const std::string path = TempPath("layout.mxnd");
  ASSERT_TRUE(Save(path, {{"x", FromVector({1.0f, 2.0f})}}).ok());
  const std::string data = ReadFile(path);
  // magic, version, count, name len, "x", ndim, dim, 2 floats, crc
  ASSERT_EQ(data.size(), 4u + 4 + 8 + 4 + 1 + 4 + 8 + 8 + 4);
  EXPECT_EQ(data.substr(0, 4), "MXND");
  uint32_t version;
  std::memcpy(&version, data.data() + 4, 4);
  EXPECT_EQ(version, 1u);
  EXPECT_FALSE(TempLeft(path)) << "the temporary file was left behind";
}

// Two writers of one path (a worker declared dead that does not know it
// yet, and the one that took over the checkpoints) each write a whole file:
// the last rename wins. Before, they shared PATH.tmp: one truncated what
// the other renamed, and the other's rename failed.
TEST(SaveLoad, TwoWritersOfOnePathLeaveOneWholeFile) {
  const std::string path = TempPath("twice.bin");
  const std::string a(8 << 20, 'a'), b(8 << 20, 'b');
  for (int round = 0; round < 5; ++round) {
    absl::Status sa, sb;
    std::thread ta([&] { sa = WriteFileAtomically(path, a); });
    std::thread tb([&] { sb = WriteFileAtomically(path, b); });
    ta.join();
    tb.join();
    ASSERT_TRUE(sa.ok()) << sa;
    ASSERT_TRUE(sb.ok()) << sb;
    const std::string got = ReadFile(path);
    EXPECT_TRUE(got == a || got == b) << got.size() << " bytes, neither writer's";
    EXPECT_FALSE(TempLeft(path));
  }
}

TEST(SaveLoad, SaveOverwritesAnExistingFile) {
  const std::string path = TempPath("overwrite.mxnd");
  ASSERT_TRUE(SaveSample(path).ok());
  ASSERT_TRUE(Save(path, {{"only", Ones({1})}}).ok());
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 1u);
  EXPECT_EQ((*loaded)[0].first, "only");
}

TEST(SaveLoad, SavingANullArrayIsInvalidArgumentNamingIt) {
  const std::string path = TempPath("null.mxnd");
  absl::Status s = Save(path, {{"good", Ones({1})}, {"ghost", NDArray()}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'ghost'"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));
}

// What Load would refuse is not saved: a name over 64 KiB was written and
// then refused at the load.
TEST(SaveLoad, ANameLoadWouldRefuseIsNotSaved) {
  const std::string path = TempPath("long.mxnd");
  const absl::Status s = Save(path, {{std::string(70000, 'n'), Ones({1})}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("a name of 70000 bytes"));
}

TEST(SaveLoad, SaveIntoAMissingDirectoryFailsNamingThePath) {
  const std::string path = ::testing::TempDir() + "no_such_dir/sub/x.mxnd";
  absl::Status s = Save(path, {{"a", Ones({1})}});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));
}

TEST(SaveLoad, LoadingAMissingFileIsNotFoundNamingThePath) {
  const std::string path = TempPath("does_not_exist.mxnd");
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr(path));
}

// A directory opens as a file would, and its first read fails: an error
// naming it (the read threw std::ios_base::failure past Load's status).
TEST(SaveLoad, LoadingADirectoryIsAnErrorNamingIt) {
  const std::string dir = ::testing::TempDir();
  absl::StatusOr<NamedArrays> loaded = Load(dir);
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("cannot read " + dir));
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("Is a directory"));
}

TEST(SaveLoad, ForeignFileIsDataLossMentioningTheMagic) {
  const std::string path = TempPath("foreign.bin");
  WriteFile(path, "PK\x03\x04 this is a zip file, not an array file");
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("magic"));
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr(path));
}

TEST(SaveLoad, EmptyFileIsDataLoss) {
  const std::string path = TempPath("empty.mxnd");
  WriteFile(path, "");
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr(path));
}

TEST(SaveLoad, UnsupportedVersionIsReportedWithBothVersions) {
  const std::string path = TempPath("v7.mxnd");
  ASSERT_TRUE(SaveSample(path).ok());
  std::string data = ReadFile(path);
  const uint32_t version = 7;
  std::memcpy(&data[4], &version, 4);
  WriteFile(path, data);
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(loaded.status().message()),
              HasSubstr("unsupported format version 7"));
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("reads 1"));
}

TEST(SaveLoad, TruncatedFileIsDataLossAtEveryCutPoint) {
  const std::string path = TempPath("full.mxnd");
  ASSERT_TRUE(SaveSample(path).ok());
  const std::string data = ReadFile(path);
  const std::string cut_path = TempPath("cut.mxnd");
  for (size_t cut = 0; cut < data.size(); ++cut) {
    WriteFile(cut_path, data.substr(0, cut));
    absl::StatusOr<NamedArrays> loaded = Load(cut_path);
    ASSERT_FALSE(loaded.ok()) << "cut at " << cut;
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss)
        << "cut at " << cut << ": " << loaded.status();
    const std::string msg(loaded.status().message());
    EXPECT_THAT(msg, HasSubstr(cut_path)) << "cut at " << cut;
    if (cut >= 4) {  // shorter files cannot even hold the magic
      EXPECT_THAT(msg, AnyOf(HasSubstr("truncated"), HasSubstr("checksum")))
          << "cut at " << cut;
    }
  }
}

TEST(SaveLoad, TruncationInsideTheDataNamesTheArrayAndOffset) {
  const std::string path = TempPath("cut_data.mxnd");
  ASSERT_TRUE(Save(path, {{"big", FromVector(Iota(100), {10, 10})}}).ok());
  std::string data = ReadFile(path);
  WriteFile(path, data.substr(0, data.size() - 40));
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  const std::string msg(loaded.status().message());
  EXPECT_THAT(msg, HasSubstr("truncated"));
  EXPECT_THAT(msg, HasSubstr("'big'"));
  EXPECT_THAT(msg, HasSubstr("offset"));
}

TEST(SaveLoad, FlippedByteInTheDataIsAChecksumMismatch) {
  const std::string path = TempPath("flipped.mxnd");
  ASSERT_TRUE(Save(path, {{"w", FromVector(Iota(16), {4, 4})}}).ok());
  std::string data = ReadFile(path);
  // Inside the float data: after the header, name and shape.
  const size_t offset = 16 + 4 + 1 + 4 + 2 * 8 + 5 * 4 + 1;
  ASSERT_LT(offset, data.size() - 4);
  data[offset] ^= 0x10;
  WriteFile(path, data);
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(loaded.status().message()),
              HasSubstr("checksum mismatch"));
}

TEST(SaveLoad, AnyFlippedByteIsDetected) {
  const std::string path = TempPath("sample.mxnd");
  ASSERT_TRUE(SaveSample(path).ok());
  const std::string data = ReadFile(path);
  const std::string bad_path = TempPath("bad.mxnd");
  for (size_t i = 0; i < data.size(); ++i) {
    std::string bad = data;
    bad[i] ^= 0x01;
    WriteFile(bad_path, bad);
    absl::StatusOr<NamedArrays> loaded = Load(bad_path);
    ASSERT_FALSE(loaded.ok()) << "flipped byte " << i;
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss)
        << "flipped byte " << i << ": " << loaded.status();
  }
}

TEST(SaveLoad, CorruptShapeIsReportedWithoutAllocatingIt) {
  const std::string path = TempPath("huge.mxnd");
  ASSERT_TRUE(Save(path, {{"w", FromVector(Iota(4), {2, 2})}}).ok());
  std::string data = ReadFile(path);
  // The first dimension: header 16, name length 4, "w", ndim 4.
  const int64_t huge = int64_t{1} << 40;
  std::memcpy(&data[16 + 4 + 1 + 4], &huge, 8);
  WriteFile(path, data);
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(loaded.status().message()),
              AnyOf(HasSubstr("truncated"), HasSubstr("checksum")));
}

TEST(SaveLoad, TrailingGarbageIsDetected) {
  const std::string path = TempPath("trailing.mxnd");
  ASSERT_TRUE(SaveSample(path).ok());
  WriteFile(path, ReadFile(path) + std::string(12, '\0'));
  absl::StatusOr<NamedArrays> loaded = Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
}

// ---- The same format in memory (SerializeArrays / DeserializeArrays).

TEST(SerializeArrays, BytesAreExactlyTheFileContents) {
  const std::string path = TempPath("same.mxnd");
  ASSERT_TRUE(SaveSample(path).ok());
  absl::StatusOr<std::string> bytes = SerializeArrays(SampleArrays());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, ReadFile(path));
  absl::StatusOr<NamedArrays> back = DeserializeArrays(*bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameArrays(*back, SampleArrays());
}

TEST(SerializeArrays, NullArrayAndCorruptBytesAreReported) {
  absl::StatusOr<std::string> null = SerializeArrays({{"ghost", NDArray()}});
  ASSERT_FALSE(null.ok());
  EXPECT_EQ(null.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(null.status().message()), HasSubstr("'ghost'"));

  absl::StatusOr<std::string> bytes = SerializeArrays(SampleArrays());
  ASSERT_TRUE(bytes.ok());
  absl::StatusOr<NamedArrays> cut =
      DeserializeArrays(bytes->substr(0, bytes->size() - 9));
  ASSERT_FALSE(cut.ok());
  EXPECT_EQ(cut.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(cut.status().message()),
              HasSubstr("serialized NDArray data"));
}

// The streaming writer and reader: the same format as Save and Load, a
// piece at a time.
TEST(ArrayFileStreams, WriterFilesLoadAndSavedFilesStream) {
  const std::string path = ::testing::TempDir() + "/stream.nd";
  auto w = ArrayFileWriter::Create(path, 2);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->BeginArray("a", {2, 3}).ok());
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  ASSERT_TRUE((*w)->Append(a.data(), 4).ok());
  EXPECT_EQ((*w)->BeginArray("b", {1}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*w)->Append(a.data(), 3).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*w)->Append(a.data() + 4, 2).ok());
  EXPECT_EQ((*w)->Finish().code(), absl::StatusCode::kFailedPrecondition);  // b missing
  ASSERT_TRUE((*w)->BeginArray("b", {1}).ok());
  const float b = 7;
  ASSERT_TRUE((*w)->Append(&b, 1).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  auto loaded = Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)[0].second.ToVector(), a);
  EXPECT_EQ((*loaded)[1].first, "b");

  ASSERT_TRUE(Save(path, {{"x", FromVector({1, 2, 3, 4}, {4})}}).ok());
  auto r = ArrayFileReader::Open(path);
  ASSERT_TRUE(r.ok()) << r.status();
  auto x = (*r)->NextArray();
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->first, "x");
  EXPECT_EQ(x->second, Shape({4}));
  std::vector<float> part(2);
  ASSERT_TRUE((*r)->Read(part.data(), 2).ok());
  EXPECT_EQ(part, std::vector<float>({1, 2}));
  EXPECT_EQ((*r)->NextArray().status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*r)->Read(part.data(), 2).ok());
  EXPECT_EQ(part, std::vector<float>({3, 4}));
  EXPECT_EQ((*r)->NextArray().status().code(), absl::StatusCode::kOutOfRange);
  std::remove(path.c_str());
}

// A streamed file that cannot be written whole (the disk is full) is an
// error naming the file and the reason, leaves no partial file, and keeps
// the file that was there.
TEST(ArrayFileStreams, AFailedWriteKeepsTheFileThatWasThere) {
  const std::string path = ::testing::TempDir() + "/stream_full.nd";
  ASSERT_TRUE(Save(path, {{"a", Ones({4})}}).ok());
  absl::Status s;
  WithFileSizeLimit(4096, [&] {
    auto w = ArrayFileWriter::Create(path, 1);
    ASSERT_TRUE(w.ok()) << w.status();
    s = (*w)->BeginArray("big", {100000});
    const std::vector<float> chunk(10000, 1.f);
    for (int i = 0; s.ok() && i < 10; ++i) s = (*w)->Append(chunk.data(), chunk.size());
    if (s.ok()) s = (*w)->Finish();
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr(path + ".tmp."));
  EXPECT_THAT(std::string(s.message()), HasSubstr(": File too large"));
  EXPECT_FALSE(TempLeft(path));
  auto back = Load(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ((*back)[0].first, "a");
  std::remove(path.c_str());
}

TEST(ArrayFileStreams, TheReaderChecksTheWholeFileFirst) {
  const std::string path = ::testing::TempDir() + "/stream_bad.nd";
  ASSERT_TRUE(Save(path, {{"x", Ones({1000})}}).ok());
  {
    std::FILE* f = std::fopen(path.c_str(), "r+b");
    ASSERT_NE(f, nullptr);
    std::fseek(f, 2000, SEEK_SET);
    std::fputc(0x55, f);
    std::fclose(f);
  }
  EXPECT_THAT(std::string(ArrayFileReader::Open(path).status().message()),
              ::testing::HasSubstr("checksum mismatch"));
  EXPECT_EQ(ArrayFileReader::Open(path + ".missing").status().code(), absl::StatusCode::kNotFound);
  // A writer dropped before Finish leaves nothing behind.
  { auto w = ArrayFileWriter::Create(path + ".new", 1); }
  EXPECT_FALSE(TempLeft(path + ".new"));
  EXPECT_EQ(std::fopen((path + ".new").c_str(), "rb"), nullptr);
  std::remove(path.c_str());
}

}  // namespace
// A save that cannot be written whole (the disk is full) is an error
// naming the file and the reason, leaves no partial file, and keeps the
// file that was there.
TEST(SaveLoad, AFailedWriteKeepsTheFileThatWasThere) {
  const std::string path = TempPath("keep.mxnd");
  ASSERT_TRUE(Save(path, {{"a", Ones({4})}}).ok());
  absl::Status s;
  WithFileSizeLimit(4096, [&] { s = Save(path, {{"big", Zeros({100000})}}); });
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("cannot write " + path + ".tmp."));
  EXPECT_THAT(s.message(), HasSubstr(": File too large"));
  EXPECT_FALSE(TempLeft(path));
  auto back = Load(path);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 1u);
  EXPECT_EQ((*back)[0].first, "a");
}

}  // namespace mx
