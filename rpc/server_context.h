// What a handler sees of its call, whichever transport brought it: gRPC
// (rpc/async.h) or a stream connection (rpc/stream.h). No gRPC header.
#ifndef MX_RPC_SERVER_CONTEXT_H_
#define MX_RPC_SERVER_CONTEXT_H_

#include <chrono>
#include <string>

namespace mx {
namespace rpc {

class ServerContext {
 public:
  virtual ~ServerContext() = default;
  // The caller, as gRPC writes peers: "ipv4:127.0.0.1:5000".
  virtual std::string peer() const = 0;
  // When the caller stops waiting for the answer.
  virtual std::chrono::system_clock::time_point deadline() const = 0;
  // A metadata value of the call, "" when absent (a stream's calls carry
  // none: the data path's claims are in its requests).
  virtual std::string Metadata(const char* key) const = 0;
  // Whether the call ended without an answer (cancelled, its deadline
  // passed, or its caller gone).
  virtual bool IsCancelled() const = 0;
};

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_SERVER_CONTEXT_H_
