// Tests of contexts (ndarray/context.h) and the pooled allocator
// (ndarray/storage.h). Each test uses a private Storage so that the exact
// statistics are not disturbed by arrays elsewhere in the process.
#include "ndarray/storage.h"

#include <cstdint>
#include <cstring>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ndarray/context.h"
#include "ndarray/device.h"

namespace mx {
namespace {

using ::testing::HasSubstr;

// ---- Context.

TEST(Context, PrintsAsDeviceTypeAndId) {
  EXPECT_EQ(cpu().ToString(), "cpu(0)");
  EXPECT_EQ(cpu(3).ToString(), "cpu(3)");
  EXPECT_EQ(gpu(1).ToString(), "gpu(1)");
  std::ostringstream os;
  os << gpu(0) << " " << cpu(2);
  EXPECT_EQ(os.str(), "gpu(0) cpu(2)");
}

TEST(Context, PinnedHostMemoryIsAHostContextOfItsOwn) {
  EXPECT_EQ(cpu_pinned().ToString(), "cpu_pinned(0)");
  EXPECT_EQ(cpu_pinned(2), Context::CPUPinned(2));
  EXPECT_TRUE(cpu_pinned().is_cpu());
  EXPECT_TRUE(cpu_pinned().is_pinned());
  EXPECT_FALSE(cpu().is_pinned());
  EXPECT_FALSE(cpu_pinned().is_gpu());
  EXPECT_NE(cpu_pinned(0), cpu(0));
  EXPECT_LT(gpu(3), cpu_pinned(0));  // MXNet's numbering: cpu 1, gpu 2, cpu_pinned 3
  EXPECT_TRUE(CheckContextAvailable(cpu_pinned(0)).ok());
  EXPECT_EQ(CheckContextAvailable(cpu_pinned(-1)).code(), absl::StatusCode::kInvalidArgument);
}

// Which GPU and stream run a copy (DeviceApi::CopyAsync): into a GPU on its
// copy-in stream, out of one on its copy-out stream, within one GPU on its
// compute stream; a copy between two GPUs runs on the destination's.
TEST(CopyPlace, IntoAGpuOnItsCopyInStreamOutOfOneOnItsCopyOutStream) {
  using internal::CopyPlaceFor;
  using internal::StreamKind;
  struct Case {
    Context dst, src;
    int device;
    StreamKind stream;
  };
  const Case cases[] = {
      {gpu(1), cpu(), 1, StreamKind::kCopyIn},   {gpu(1), cpu_pinned(), 1, StreamKind::kCopyIn},
      {cpu(), gpu(2), 2, StreamKind::kCopyOut},  {cpu_pinned(), gpu(0), 0, StreamKind::kCopyOut},
      {gpu(0), gpu(1), 0, StreamKind::kCopyIn},  {gpu(1), gpu(0), 1, StreamKind::kCopyIn},
      {gpu(3), gpu(3), 3, StreamKind::kCompute},
  };
  for (const Case& c : cases) {
    const internal::CopyPlace place = CopyPlaceFor(c.dst, c.src);
    EXPECT_EQ(place.device, c.device) << c.src << " -> " << c.dst;
    EXPECT_EQ(place.stream, c.stream) << c.src << " -> " << c.dst;
  }
}

TEST(Context, DefaultIsCpuZero) {
  Context ctx;
  EXPECT_TRUE(ctx.is_cpu());
  EXPECT_FALSE(ctx.is_gpu());
  EXPECT_EQ(ctx, cpu(0));
  EXPECT_TRUE(gpu(0).is_gpu());
}

TEST(Context, ComparesByTypeThenId) {
  EXPECT_EQ(cpu(1), Context::CPU(1));
  EXPECT_NE(cpu(1), cpu(2));
  EXPECT_NE(cpu(0), gpu(0));
  EXPECT_LT(cpu(5), gpu(0));
  EXPECT_LT(gpu(0), gpu(1));
  absl::flat_hash_set<Context> set = {cpu(0), cpu(0), gpu(0), cpu(1)};
  EXPECT_EQ(set.size(), 3u);
}

TEST(CheckContextAvailable, AnyCpuIdIsAvailable) {
  EXPECT_TRUE(CheckContextAvailable(cpu(0)).ok());
  EXPECT_TRUE(CheckContextAvailable(cpu(7)).ok());
}

TEST(CheckContextAvailable, NegativeDeviceIdIsInvalidArgument) {
  for (Context ctx : {cpu(-1), gpu(-2)}) {
    absl::Status s = CheckContextAvailable(ctx);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << ctx;
    EXPECT_THAT(std::string(s.message()), HasSubstr(ctx.ToString()));
  }
}

TEST(CheckContextAvailable, MissingGpuIsFailedPreconditionSayingWhy) {
  // gpu(NumGpus()) never exists, on any machine and in any build.
  Context ctx = gpu(NumGpus());
  absl::Status s = CheckContextAvailable(ctx);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr(ctx.ToString()));
  if (BuiltWithCuda()) {
    EXPECT_THAT(std::string(s.message()), HasSubstr("usable GPU"));
  } else {
    EXPECT_THAT(std::string(s.message()), HasSubstr("no GPU support"));
  }
}

TEST(CheckContextAvailable, GpuZeroWithoutAGpuIsFailedPrecondition) {
  if (NumGpus() > 0) GTEST_SKIP() << "this machine has a GPU";
  absl::Status s = CheckContextAvailable(gpu(0));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("gpu(0)"));
}

TEST(NumGpus, IsZeroWithoutCuda) {
  if (BuiltWithCuda()) GTEST_SKIP() << "built with CUDA";
  EXPECT_EQ(NumGpus(), 0);
}

// ---- Size classes.

// Every size class up to `limit`: 64, 96, 128, 192, 256, ...
std::set<size_t> ClassesUpTo(size_t limit) {
  std::set<size_t> classes;
  for (size_t p = 64; p <= limit; p *= 2) {
    classes.insert(p);
    if (p / 2 * 3 <= limit) classes.insert(p / 2 * 3);
  }
  return classes;
}

TEST(StorageSizeClass, HasA64ByteMinimum) {
  EXPECT_EQ(Storage::SizeClass(0), 64u);
  EXPECT_EQ(Storage::SizeClass(1), 64u);
  EXPECT_EQ(Storage::SizeClass(63), 64u);
  EXPECT_EQ(Storage::SizeClass(64), 64u);
}

TEST(StorageSizeClass, UsesPowersOfTwoAndOneAndAHalfTimesThem) {
  EXPECT_EQ(Storage::SizeClass(65), 96u);
  EXPECT_EQ(Storage::SizeClass(96), 96u);
  EXPECT_EQ(Storage::SizeClass(97), 128u);
  EXPECT_EQ(Storage::SizeClass(128), 128u);
  EXPECT_EQ(Storage::SizeClass(129), 192u);
  EXPECT_EQ(Storage::SizeClass(192), 192u);
  EXPECT_EQ(Storage::SizeClass(193), 256u);
  EXPECT_EQ(Storage::SizeClass(1000), 1024u);
  EXPECT_EQ(Storage::SizeClass(768), 768u);
  EXPECT_EQ(Storage::SizeClass(769), 1024u);
  EXPECT_EQ(Storage::SizeClass(size_t{3} << 20), size_t{3} << 20);
  EXPECT_EQ(Storage::SizeClass((size_t{3} << 20) + 1), size_t{4} << 20);
  EXPECT_EQ(Storage::SizeClass(size_t{1} << 40), size_t{1} << 40);
}

TEST(StorageSizeClass, IsTheSmallestClassThatFitsAndWastesAtMostAThird) {
  const std::set<size_t> classes = ClassesUpTo(size_t{1} << 22);
  std::vector<size_t> sizes;
  for (size_t b = 0; b <= 5000; ++b) sizes.push_back(b);
  for (size_t p = 4096; p <= (size_t{1} << 21); p *= 2) {
    for (size_t d : {p / 2 - 1, p / 2, p / 2 + 1, p / 4 * 3 - 1, p / 4 * 3,
                     p / 4 * 3 + 1, p - 1, p, p + 1}) {
      sizes.push_back(d);
    }
  }
  for (size_t bytes : sizes) {
    const size_t cls = Storage::SizeClass(bytes);
    ASSERT_GE(cls, bytes) << bytes;
    ASSERT_EQ(classes.count(cls), 1u) << bytes << " -> " << cls;
    // No smaller class would do.
    auto it = classes.find(cls);
    if (it != classes.begin()) {
      ASSERT_LT(*std::prev(it), bytes) << bytes;
    }
    if (bytes >= 64) {
      ASSERT_LE(3 * (cls - bytes), cls) << bytes << " -> " << cls;
    }
  }
}

// ---- Allocation and pooling.

class StorageTest : public ::testing::Test {
 protected:
  void SetUp() override { storage_.SetPooling(true); }

  StorageHandle Alloc(size_t bytes, Context ctx = cpu()) {
    absl::StatusOr<StorageHandle> h = storage_.Alloc(bytes, ctx);
    EXPECT_TRUE(h.ok()) << h.status();
    return h.ok() ? *h : StorageHandle{};
  }

  Storage storage_;
};

TEST_F(StorageTest, AllocReturnsAlignedWritableMemoryOfTheRequestedSize) {
  for (size_t bytes :
       {size_t{1}, size_t{64}, size_t{100}, size_t{4096}, size_t{1} << 20}) {
    StorageHandle h = Alloc(bytes);
    ASSERT_NE(h.dptr, nullptr);
    EXPECT_EQ(h.size, bytes);
    EXPECT_EQ(h.ctx, cpu());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(h.dptr) % 64, 0u) << bytes;
    // The whole size class is usable.
    std::memset(h.dptr, 0xab, Storage::SizeClass(bytes));
    storage_.Free(h);
  }
}

TEST_F(StorageTest, FreshStorageHasZeroStats) {
  StorageStats s = storage_.Stats(cpu());
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.bytes_pooled, 0u);
  EXPECT_EQ(s.allocs, 0u);
  EXPECT_EQ(s.pool_hits, 0u);
  EXPECT_EQ(s.frees, 0u);
}

TEST_F(StorageTest, StatsCountBlocksBySizeClass) {
  StorageHandle a = Alloc(1000);  // class 1024
  StorageHandle b = Alloc(65);    // class 96
  StorageStats s = storage_.Stats(cpu());
  EXPECT_EQ(s.bytes_in_use, 1024u + 96u);
  EXPECT_EQ(s.bytes_pooled, 0u);
  EXPECT_EQ(s.allocs, 2u);
  EXPECT_EQ(s.pool_hits, 0u);
  EXPECT_EQ(s.frees, 0u);

  storage_.Free(a);
  s = storage_.Stats(cpu());
  EXPECT_EQ(s.bytes_in_use, 96u);
  EXPECT_EQ(s.bytes_pooled, 1024u);
  EXPECT_EQ(s.frees, 1u);
  storage_.Free(b);
  s = storage_.Stats(cpu());
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.bytes_pooled, 1024u + 96u);
  EXPECT_EQ(s.frees, 2u);
}

TEST_F(StorageTest, FreedBlockIsReusedForARequestOfTheSameClass) {
  StorageHandle a = Alloc(1000);
  void* p = a.dptr;
  storage_.Free(a);
  StorageHandle b = Alloc(900);  // also class 1024
  EXPECT_EQ(b.dptr, p);
  EXPECT_EQ(b.size, 900u);
  StorageStats s = storage_.Stats(cpu());
  EXPECT_EQ(s.allocs, 2u);
  EXPECT_EQ(s.pool_hits, 1u);
  EXPECT_EQ(s.bytes_in_use, 1024u);
  EXPECT_EQ(s.bytes_pooled, 0u);
  storage_.Free(b);
}

TEST_F(StorageTest, RequestOfAnotherClassMissesThePool) {
  StorageHandle a = Alloc(1000);  // 1024
  storage_.Free(a);
  StorageHandle b = Alloc(1500);  // 1536
  StorageHandle c = Alloc(700);   // 768
  StorageStats s = storage_.Stats(cpu());
  EXPECT_EQ(s.pool_hits, 0u);
  EXPECT_EQ(s.bytes_pooled, 1024u);
  EXPECT_EQ(s.bytes_in_use, 1536u + 768u);
  storage_.Free(b);
  storage_.Free(c);
}

TEST_F(StorageTest, PoolsAreKeptPerContext) {
  StorageHandle a = Alloc(256, cpu(0));
  storage_.Free(a);
  StorageHandle b = Alloc(256, cpu(1));
  EXPECT_EQ(b.ctx, cpu(1));
  EXPECT_EQ(storage_.Stats(cpu(1)).pool_hits, 0u);
  EXPECT_EQ(storage_.Stats(cpu(1)).bytes_in_use, 256u);
  EXPECT_EQ(storage_.Stats(cpu(0)).bytes_pooled, 256u);
  EXPECT_EQ(storage_.Stats(cpu(0)).bytes_in_use, 0u);
  storage_.Free(b);
  EXPECT_EQ(storage_.Stats(cpu(1)).bytes_pooled, 256u);
}

// Page-locked blocks (cudaHostAlloc where a GPU is usable, host memory
// otherwise) never serve a cpu(0) request, nor the other way round.
TEST_F(StorageTest, PinnedHostMemoryHasAPoolOfItsOwn) {
  StorageHandle a = Alloc(1000, cpu_pinned());
  EXPECT_EQ(a.ctx, cpu_pinned());
  std::memset(a.dptr, 7, 1000);  // host memory
  storage_.Free(a);
  StorageHandle b = Alloc(1000, cpu());
  EXPECT_EQ(storage_.Stats(cpu()).pool_hits, 0u);
  EXPECT_EQ(storage_.Stats(cpu_pinned()).bytes_pooled, Storage::SizeClass(1000));
  StorageHandle c = Alloc(1000, cpu_pinned());
  EXPECT_EQ(storage_.Stats(cpu_pinned()).pool_hits, 1u);
  storage_.Free(b);
  storage_.Free(c);
  storage_.ReleasePooled(cpu_pinned());
  EXPECT_EQ(storage_.Stats(cpu_pinned()).bytes_pooled, 0u);
}

TEST_F(StorageTest, ReleasePooledEmptiesOnlyThatContextsPool) {
  storage_.Free(Alloc(512, cpu(0)));
  storage_.Free(Alloc(512, cpu(1)));
  storage_.ReleasePooled(cpu(0));
  EXPECT_EQ(storage_.Stats(cpu(0)).bytes_pooled, 0u);
  EXPECT_EQ(storage_.Stats(cpu(1)).bytes_pooled, 512u);
  StorageHandle h = Alloc(512, cpu(0));
  EXPECT_EQ(storage_.Stats(cpu(0)).pool_hits, 0u);
  storage_.Free(h);
  // Releasing a context that was never used is harmless.
  storage_.ReleasePooled(cpu(9));
  EXPECT_EQ(storage_.Stats(cpu(9)).bytes_pooled, 0u);
}

TEST_F(StorageTest, DisablingPoolingReleasesPooledBlocksAndBypassesThePool) {
  storage_.Free(Alloc(2048));
  ASSERT_EQ(storage_.Stats(cpu()).bytes_pooled, 2048u);

  storage_.SetPooling(false);
  EXPECT_FALSE(storage_.pooling());
  EXPECT_EQ(storage_.Stats(cpu()).bytes_pooled, 0u);

  StorageHandle h = Alloc(2048);
  storage_.Free(h);
  StorageStats s = storage_.Stats(cpu());
  EXPECT_EQ(s.pool_hits, 0u);
  EXPECT_EQ(s.bytes_pooled, 0u);
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.allocs, 2u);
  EXPECT_EQ(s.frees, 2u);

  storage_.SetPooling(true);
  EXPECT_TRUE(storage_.pooling());
  storage_.Free(Alloc(2048));
  EXPECT_EQ(storage_.Stats(cpu()).bytes_pooled, 2048u);
}

TEST_F(StorageTest, FreeingANullHandleDoesNothing) {
  storage_.Free(StorageHandle{});
  EXPECT_EQ(storage_.Stats(cpu()).frees, 0u);
}

TEST_F(StorageTest, GpuAllocationWithoutAGpuFailsNamingTheContext) {
  if (NumGpus() > 0) GTEST_SKIP() << "this machine has a GPU";
  absl::StatusOr<StorageHandle> h = storage_.Alloc(1024, gpu(0));
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("gpu(0)"));
  EXPECT_EQ(storage_.Stats(gpu(0)).allocs, 0u);
}

TEST_F(StorageTest, AllocationOnANegativeDeviceIdIsInvalidArgument) {
  absl::StatusOr<StorageHandle> h = storage_.Alloc(64, cpu(-1));
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("cpu(-1)"));
}

TEST_F(StorageTest, ConcurrentAllocAndFreeKeepExactStats) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([this, t] {
      std::vector<StorageHandle> held;
      for (int i = 0; i < kRounds; ++i) {
        size_t bytes = 64 + static_cast<size_t>((i * 37 + t * 11) % 3000);
        absl::StatusOr<StorageHandle> h = storage_.Alloc(bytes, cpu());
        ASSERT_TRUE(h.ok());
        static_cast<char*>(h->dptr)[bytes - 1] = static_cast<char>(i);
        held.push_back(*h);
        if (held.size() > 8) {
          storage_.Free(held.front());
          held.erase(held.begin());
        }
      }
      for (const StorageHandle& h : held) storage_.Free(h);
    });
  }
  for (std::thread& t : threads) t.join();
  StorageStats s = storage_.Stats(cpu());
  EXPECT_EQ(s.allocs, uint64_t{kThreads} * kRounds);
  EXPECT_EQ(s.frees, uint64_t{kThreads} * kRounds);
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_GT(s.pool_hits, 0u);
  EXPECT_GT(s.bytes_pooled, 0u);
}

TEST(StorageGlobal, IsOneSharedInstance) {
  EXPECT_EQ(Storage::Get(), Storage::Shared().get());
  EXPECT_EQ(Storage::Shared(), Storage::Shared());
}

}  // namespace
}  // namespace mx
