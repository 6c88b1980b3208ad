// A blocking unary call with raw bytes (no stub, no parsing): what a peer
// with nothing but a gRPC library sends. Tests of RPC handlers use it to
// send requests no mx client would.
#ifndef MX_TESTS_PROTO_RAW_CALL_H_
#define MX_TESTS_PROTO_RAW_CALL_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"

namespace mx::testing {

// Calls `method` ("/mx.proto.KVStoreService/Push") on `channel` with
// `bytes`, within 5 s; the response's bytes go to *response if given.
inline grpc::Status RawCall(const std::shared_ptr<grpc::Channel>& channel,
                            const std::string& method, const std::string& bytes,
                            std::string* response = nullptr) {
  grpc::GenericStub stub(channel);
  grpc::Slice slice(bytes);
  grpc::ByteBuffer req(&slice, 1), resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &req, &resp, [&](grpc::Status s) {
    status = s;
    done.Notify();
  });
  done.WaitForNotification();
  if (response != nullptr && status.ok()) {
    response->clear();
    std::vector<grpc::Slice> slices;
    if (resp.Dump(&slices).ok()) {
      for (const grpc::Slice& s : slices) {
        response->append(reinterpret_cast<const char*>(s.begin()), s.size());
      }
    }
  }
  return status;
}

}  // namespace mx::testing

#endif  // MX_TESTS_PROTO_RAW_CALL_H_
