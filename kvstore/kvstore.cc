#include "kvstore/kvstore.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvstore/kvstore_internal.h"

namespace mx {

int StringKey(const std::string& name) {
  uint32_t h = 2166136261u;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  return static_cast<int>((h & 0x3FFFFFFFu) | 0x40000000u);
}

Key::Key(const char* name) : Key(std::string(name)) {}

Key::Key(const std::string& name) : id_(StringKey(name)), name_(name) {}

std::string Key::label() const {
  return name_.empty() ? std::to_string(id_) : absl::StrCat("'", name_, "' (key ", id_, ")");
}

absl::Status KVStore::Init(const std::vector<Key>& keys, const std::vector<NDArray>& values) {
  if (keys.size() != values.size()) {
    return absl::InvalidArgumentError(absl::StrCat("init: ", keys.size(), " keys but ",
                                                   values.size(), " values"));
  }
  for (size_t i = 0; i < keys.size(); ++i) MX_RETURN_IF_ERROR(Init(keys[i], values[i]));
  return absl::OkStatus();
}

absl::Status KVStore::PushPull(Key key, const std::vector<NDArray>& values,
                               const std::vector<NDArray>& outs, int priority) {
  MX_RETURN_IF_ERROR(Push(key, values, priority));
  return Pull(key, outs, priority);
}

absl::Status KVStore::PushPull(const std::vector<Key>& keys,
                               const std::vector<std::vector<NDArray>>& values,
                               const std::vector<std::vector<NDArray>>& outs, int priority) {
  MX_RETURN_IF_ERROR(internal::CheckBucket(keys, values, outs));
  for (size_t i = 0; i < keys.size(); ++i) {
    MX_RETURN_IF_ERROR(PushPull(keys[i], values[i], outs[i], priority));
  }
  return absl::OkStatus();
}

absl::Status KVStore::PushPullRowSparse(Key key, const std::vector<RowSparseNDArray>& values,
                                        std::vector<int64_t> row_ids, RowSparseNDArray* out,
                                        int priority) {
  std::vector<RowSparseNDArray> outs;
  MX_RETURN_IF_ERROR(PushPullRowSparse(std::vector<Key>{key}, {values}, {std::move(row_ids)},
                                       &outs, priority));
  *out = outs[0];
  return absl::OkStatus();
}

absl::Status KVStore::PushPullRowSparse(const std::vector<Key>& keys,
                                        const std::vector<std::vector<RowSparseNDArray>>& values,
                                        std::vector<std::vector<int64_t>> row_ids,
                                        std::vector<RowSparseNDArray>* outs, int priority) {
  MX_RETURN_IF_ERROR(internal::CheckTableBucket(keys, values, row_ids));
  outs->assign(keys.size(), RowSparseNDArray());
  for (size_t i = 0; i < keys.size(); ++i) {
    MX_RETURN_IF_ERROR(PushRowSparse(keys[i], values[i], priority));
    MX_RETURN_IF_ERROR(RowSparsePull(keys[i], std::move(row_ids[i]), &(*outs)[i], priority));
  }
  return absl::OkStatus();
}

absl::Status KVStore::SetGradientCompression(const std::map<std::string, std::string>& params) {
  absl::StatusOr<GradientCompression> c = GradientCompression::FromParams(params);
  const absl::Status s = c.ok() ? UseGradientCompression(*c) : c.status();
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("kvstore ", type(), ": ", s.message()));
}

absl::Status KVStore::UseGradientCompression(const GradientCompression& c) {
  if (!c.enabled()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "gradient compression (", c.ToString(),
      ") applies to the distributed stores (dist_sync, dist_async), which send gradients"));
}

absl::Status KVStore::Broadcast(Key key, const NDArray& value, const std::vector<NDArray>& outs,
                                int priority) {
  MX_RETURN_IF_ERROR(Init(key, value));
  return Pull(key, outs, priority);
}

namespace {
std::map<std::string, KVStore::Factory>& Factories() {
  static auto* factories = new std::map<std::string, KVStore::Factory>;
  return *factories;
}
}  // namespace

bool KVStore::RegisterType(const std::string& type, Factory factory) {
  Factories()[type] = std::move(factory);
  return true;
}

absl::StatusOr<std::unique_ptr<KVStore>> KVStore::Create(const std::string& type) {
  if (type == "local") return internal::NewLocalKVStore(type);
  // dist_device_sync is dist_sync whose device copies are summed on a GPU
  // before they travel: it needs the GPU reduction as "device" does.
  if (type == "device" || type == "nccl" || type == "dist_device_sync") {
    if (NumGpus() == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "kvstore type '", type, "' reduces on GPUs: ",
          BuiltWithCuda() ? "this machine has no usable GPU"
                          : "this build of mx has no GPU support",
          type == "dist_device_sync" ? " (use 'dist_sync', which sums device copies on the CPU)"
                                     : " (use 'local')"));
    }
    if (type == "device" || type == "nccl") return internal::NewLocalKVStore(type);
  }
  if (auto it = Factories().find(type); it != Factories().end()) return it->second(type);
  if (type == "dist_sync" || type == "dist_async" || type == "dist_device_sync") {
    return absl::UnimplementedError(absl::StrCat(
        "kvstore type '", type, "' needs the parameter-server client, which this binary "
        "was built without (link //kvstore:dist_kvstore)"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown kvstore type '", type,
      "' (types: local, device, nccl, dist_sync, dist_async, dist_device_sync)"));
}

}  // namespace mx
