// The parameter server's gRPC KVStore service over a ParameterShard.
#ifndef MX_SERVER_KVSTORE_SERVICE_H_
#define MX_SERVER_KVSTORE_SERVICE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/shard.h"

namespace mx {

// A running parameter server: a gRPC server on `bind_address` (host:port;
// port 0 picks a free one) serving one shard. A request larger than
// `max_message_mb` MiB is refused (RESOURCE_EXHAUSTED, from gRPC) and the
// server goes on serving. Stops when destroyed: closes the shard (waiting
// pulls fail at once, kUnavailable) and waits for the calls in flight.
class ParameterServer {
 public:
  static absl::StatusOr<std::unique_ptr<ParameterServer>> Start(
      const std::string& bind_address, ShardOptions options, int max_message_mb = 1024);
  ~ParameterServer();
  // host:port it listens on, with the port actually bound.
  const std::string& address() const { return address_; }
  ParameterShard& shard() { return *shard_; }

 private:
  ParameterServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<ParameterShard> shard_;
  std::string address_;
};

}  // namespace mx

#endif  // MX_SERVER_KVSTORE_SERVICE_H_
