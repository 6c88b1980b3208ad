// Mutual TLS for stream connections (rpc/stream.h): a TLS 1.3 handshake
// by OpenSSL, then the connection's bytes in records sealed with
// AES-128-GCM (Intel's multi-buffer crypto library; stream_tls.cc says
// why) under keys the handshake exported.
//
// Why not OpenSSL's own records: a stream connection is read by one
// thread and written by another at both ends, so that its two directions
// move at once (pushes one way, pulls the other), and an SSL object may
// not be read and written from two threads at once. Kernel TLS would let
// the threads share it, but the kernels these jobs run on need not offer
// it (this project's do not). So after the handshake each direction gets
// an AEAD key and IV of its own from the TLS 1.3 exporter (RFC 8446, 7.5:
// keying material for an application protocol, bound to this handshake),
// and each thread seals or opens its direction alone.
//
// The handshake is TLS 1.3 with both certificates checked against the
// job's CA (Security::tls_ca), the server's name as gRPC checks it
// (Security::tls_server_name, else the host dialled); no session
// tickets, so that nothing of TLS follows the handshake on the wire.
//
// Records, after the handshake, in each direction: u32 plaintext length
// L (1 to kMaxRecordBytes, little-endian), L bytes of ciphertext, a
// 16-byte tag; the length is authenticated data; record i's nonce is the
// direction's IV XOR i (big-endian, in its last 8 bytes). A record that
// fails its tag, or any malformed one, ends the connection.
#ifndef MX_RPC_STREAM_TLS_H_
#define MX_RPC_STREAM_TLS_H_

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "rpc/security.h"

namespace mx {
namespace rpc {

class Sealer;
class Opener;
struct RecordKey;  // a direction's expanded key and record count

// A node's TLS settings, loaded once (certificates parsed, OpenSSL
// contexts made): made through For, shared by its connections.
class StreamTls {
 public:
  // The settings of `security` (which has TLS), kept for the process:
  // later calls with the same files share them. Errors name what in the
  // files failed.
  static absl::StatusOr<std::shared_ptr<const StreamTls>> For(const Security& security);
  ~StreamTls();

  // The two ends of a connection after its handshake.
  struct Session {
    std::unique_ptr<Sealer> out;  // what this end writes
    std::unique_ptr<Opener> in;   // what it reads
  };
  // Shakes hands on the connected, blocking socket `fd` as a client that
  // dialled `host` (checked against the server's certificate, unless the
  // settings name the servers) or as a server, by `deadline`. Errors say
  // what failed (a certificate refused, a peer that speaks no TLS, the
  // deadline).
  absl::StatusOr<Session> Client(int fd, const std::string& host, absl::Time deadline) const;
  absl::StatusOr<Session> Server(int fd, absl::Time deadline) const;

  struct Contexts;

 private:
  StreamTls() = default;
  absl::StatusOr<Session> Handshake(int fd, bool server, const std::string& host,
                                    absl::Time deadline) const;

  std::unique_ptr<Contexts> contexts_;
  std::string server_name_;
};

// Blocking reads and writes on the socket fd end with EAGAIN after
// `timeout` (at least 1 ms: a deadline that has passed fails the next
// read), or never (InfiniteDuration).
void SetSocketTimeouts(int fd, absl::Duration timeout);

// A direction's AES-128 key (as TLS 1.3's mandatory suite) and GCM
// nonce base.
constexpr size_t kStreamKeyBytes = 16;
constexpr size_t kStreamIvBytes = 12;
// The largest record's plaintext.
constexpr size_t kMaxRecordBytes = 128 << 10;
// What a record adds to its plaintext: the length and the tag.
constexpr size_t kRecordHeaderBytes = 4;
constexpr size_t kRecordTagBytes = 16;
// The largest record on the wire.
constexpr size_t kMaxSealedRecordBytes = kRecordHeaderBytes + kMaxRecordBytes + kRecordTagBytes;

// One direction's sealing (the writing thread's alone).
class Sealer {
 public:
  // Seals with AES-128-GCM under `key` (kStreamKeyBytes) and record i's
  // nonce `iv` (kStreamIvBytes) XOR i; StreamTls makes them from a
  // handshake. Only once a StreamTls::For has succeeded in the process
  // (it checks that the cipher's library runs on this CPU).
  Sealer(const uint8_t* key, const uint8_t* iv);
  ~Sealer();
  // Writes to `out` one record of `pieces` (1 to kMaxRecordBytes in all):
  // their bytes plus kRecordHeaderBytes + kRecordTagBytes, returned.
  size_t Seal(const std::vector<iovec>& pieces, char* out);

 private:
  std::unique_ptr<RecordKey> state_;
};

// One direction's opening (the reading thread's alone).
class Opener {
 public:
  // Opens what a Sealer of the same key and iv sealed, in its order (as
  // Sealer's, only after a StreamTls::For succeeded).
  Opener(const uint8_t* key, const uint8_t* iv);
  ~Opener();
  // The plaintext length of the record whose header is `header`
  // (kRecordHeaderBytes), or an error if it is not one.
  static absl::StatusOr<size_t> Length(const char* header);
  // Opens the record `record` (its header, ciphertext and tag; Length
  // bytes of plaintext) into `out`. An error (the tag does not match: the
  // bytes were changed, or the peer holds other keys) leaves `out` with
  // unauthenticated bytes, which the caller must drop.
  absl::Status Open(const char* record, char* out);

 private:
  std::unique_ptr<RecordKey> state_;
};

}  // namespace rpc
}  // namespace mx

#endif  // MX_RPC_STREAM_TLS_H_
