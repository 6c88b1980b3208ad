#include "proto/wire.h"

#include <grpc/grpc.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/strings/str_cat.h"

namespace mx {

void KeepGrpcAlive() {
  static const bool initialized = [] {
    grpc_init();  // never shut down (see wire.h)
    return true;
  }();
  (void)initialized;
}

std::shared_ptr<grpc::Channel> SharedChannel(const std::string& address) {
  KeepGrpcAlive();
  static std::mutex* mu = new std::mutex;
  static auto* channels = new std::map<std::string, std::shared_ptr<grpc::Channel>>;
  std::lock_guard<std::mutex> lock(*mu);
  std::shared_ptr<grpc::Channel>& channel = (*channels)[address];
  if (channel == nullptr) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(kMaxMessageBytes);
    args.SetMaxSendMessageSize(kMaxMessageBytes);
    channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  return channel;
}

absl::StatusOr<HostTensor> FromProto(const proto::Tensor& t) {
  if (t.dtype() != proto::FLOAT32) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported dtype ", t.dtype()));
  }
  HostTensor h;
  for (int64_t d : t.shape()) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("negative dimension ", d));
    h.shape.push_back(d);
  }
  const uint64_t n = static_cast<uint64_t>(h.shape.Size());
  if (t.data().size() != n * sizeof(float)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor of shape ", h.shape.ToString(), " carries ", t.data().size(),
        " bytes, expected ", n * sizeof(float)));
  }
  h.data.resize(n);
  std::memcpy(h.data.data(), t.data().data(), t.data().size());
  return h;
}

void ToProto(const float* data, const Shape& shape, proto::Tensor* t) {
  t->clear_shape();
  for (int64_t d : shape) t->add_shape(d);
  t->set_dtype(proto::FLOAT32);
  t->set_data(data, shape.Size() * sizeof(float));
}

void ToProto(const std::vector<float>& data, proto::Tensor* t) {
  ToProto(data.data(), Shape{static_cast<int64_t>(data.size())}, t);
}

}  // namespace mx
