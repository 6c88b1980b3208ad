#include "rpc/stream_tls.h"

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>

// Without the names of its API 0.53 (SHA1, ...), which clash with OpenSSL's.
#define NO_COMPAT_IMB_API_053
#include <intel-ipsec-mb.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"

namespace mx {
namespace rpc {

namespace {

constexpr char kExporterLabel[] = "EXPORTER-mx-stream-v1";
// After the server's handshake it sends this one byte through TLS proper,
// and the client reads it before the records begin: a TLS 1.3 client is
// done before the server has checked its certificate, and only so does a
// refused client see the server's alert (and say why) rather than a
// connection that ends.
constexpr char kReady = 'R';

// Writes n bytes of data to the socket of BIO b as OpenSSL's socket BIO
// does, but with MSG_NOSIGNAL: its write(2) raises SIGPIPE where the peer
// has gone (mid-handshake), which kills the process.
int SendNoSignal(BIO* b, const char* data, int n) {
  const int fd = static_cast<int>(BIO_get_fd(b, nullptr));
  errno = 0;
  const int sent = static_cast<int>(send(fd, data, static_cast<size_t>(n), MSG_NOSIGNAL));
  BIO_clear_retry_flags(b);
  if (sent <= 0 && BIO_sock_should_retry(sent)) BIO_set_retry_write(b);
  return sent;
}

// OpenSSL's socket BIO with SendNoSignal for its writes; made once.
const BIO_METHOD* SocketWithoutSigpipe() {
  static const BIO_METHOD* method = [] {
    const BIO_METHOD* socket = BIO_s_socket();
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                                 "socket without SIGPIPE");
    if (m == nullptr) return socket;  // out of memory: OpenSSL's own
    BIO_meth_set_write(m, SendNoSignal);
    BIO_meth_set_read(m, BIO_meth_get_read(socket));
    BIO_meth_set_puts(m, BIO_meth_get_puts(socket));
    BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(socket));
    BIO_meth_set_create(m, BIO_meth_get_create(socket));
    BIO_meth_set_destroy(m, BIO_meth_get_destroy(socket));
    return static_cast<const BIO_METHOD*>(m);
  }();
  return method;
}

// OpenSSL's queued errors, oldest first ("" if none), cleared.
std::string OpenSslErrors() {
  std::string all;
  while (const unsigned long e = ERR_get_error()) {
    char text[256];
    ERR_error_string_n(e, text, sizeof(text));
    // "error:0A000086:SSL routines::certificate verify failed": the reason.
    const char* reason = std::strrchr(text, ':');
    absl::StrAppend(&all, all.empty() ? "" : "; ", reason != nullptr ? reason + 1 : text);
  }
  return all;
}

bool IsIpLiteral(const std::string& host) {
  unsigned char buffer[sizeof(in6_addr)];
  return inet_pton(AF_INET, host.c_str(), buffer) == 1 ||
         inet_pton(AF_INET6, host.c_str(), buffer) == 1;
}

// Record i's nonce: iv XOR i, big-endian in its last 8 bytes.
void Nonce(const uint8_t* iv, uint64_t i, uint8_t* nonce) {
  std::memcpy(nonce, iv, kStreamIvBytes);
  for (int b = 0; b < 8; ++b) nonce[kStreamIvBytes - 1 - b] ^= static_cast<uint8_t>(i >> (8 * b));
}

// Intel's multi-buffer crypto library, only for its AES-GCM functions
// (its direct API: the manager is a table of the implementations this CPU
// runs best, read-only once made, so all threads share it). Why not
// OpenSSL's: Debian 12's OpenSSL has no AES-GCM for AVX-512 and VAES, and
// on such CPUs it seals at about a quarter of this library's speed
// (5.2 against 23.5 GB/s per core here), which made TLS the bound of a
// large push. Both compute the same AES-128-GCM (tests/rpc compare).
const IMB_MGR* Gcm() {
  static const IMB_MGR* gcm = [] {
    IMB_MGR* m = alloc_mb_mgr(0);
    if (m != nullptr) init_mb_mgr_auto(m, nullptr);
    return m;
  }();
  return gcm;
}

// Whether Gcm() works on this CPU (an error says why not).
absl::Status CheckRecordCipher() {
  const IMB_MGR* gcm = Gcm();
  if (gcm == nullptr) return absl::ResourceExhaustedError("TLS: out of memory for AES-GCM");
  const int error = imb_get_errno(const_cast<IMB_MGR*>(gcm));
  if (error != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "TLS: no AES-GCM for this CPU (intel-ipsec-mb: ", imb_get_strerror(error), ")"));
  }
  return absl::OkStatus();
}

}  // namespace

struct StreamTls::Contexts {
  SSL_CTX* client = nullptr;
  SSL_CTX* server = nullptr;
  ~Contexts() {
    SSL_CTX_free(client);
    SSL_CTX_free(server);
  }
};

namespace {

// A context of `method` with this node's certificate and key, the job's
// CA as the only one trusted, peers' certificates required, TLS 1.3 only.
absl::StatusOr<SSL_CTX*> MakeContext(const SSL_METHOD* method, const Security& s) {
  SSL_CTX* ctx = SSL_CTX_new(method);
  if (ctx == nullptr) return absl::InternalError("SSL_CTX_new: " + OpenSslErrors());
  absl::Cleanup free_ctx = [ctx] { SSL_CTX_free(ctx); };
  auto pem = [](const std::string& text) {
    return BIO_new_mem_buf(text.data(), static_cast<int>(text.size()));
  };
  auto fail = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("TLS: ", what, ": ", OpenSslErrors()));
  };
  {  // this node's certificate, then any chain after it
    BIO* bio = pem(s.tls_cert);
    absl::Cleanup free_bio = [bio] { BIO_free(bio); };
    X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    if (cert == nullptr || SSL_CTX_use_certificate(ctx, cert) != 1) {
      X509_free(cert);
      return fail("the certificate is not a PEM certificate");
    }
    X509_free(cert);
    while (X509* chain = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
      if (SSL_CTX_add0_chain_cert(ctx, chain) != 1) {
        X509_free(chain);
        return fail("the certificate's chain");
      }
    }
    ERR_clear_error();  // the end of the file
  }
  {
    BIO* bio = pem(s.tls_key);
    absl::Cleanup free_bio = [bio] { BIO_free(bio); };
    EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
    const bool used = key != nullptr && SSL_CTX_use_PrivateKey(ctx, key) == 1;
    EVP_PKEY_free(key);
    if (!used) return fail("the key is not a PEM private key");
    if (SSL_CTX_check_private_key(ctx) != 1) return fail("the key is not the certificate's");
  }
  {
    BIO* bio = pem(s.tls_ca);
    absl::Cleanup free_bio = [bio] { BIO_free(bio); };
    X509_STORE* store = SSL_CTX_get_cert_store(ctx);
    int cas = 0;
    while (X509* ca = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
      const int added = X509_STORE_add_cert(store, ca);
      X509_free(ca);
      if (added != 1) return fail("the CA file");
      ++cas;
    }
    ERR_clear_error();
    if (cas == 0) return absl::InvalidArgumentError("TLS: the CA file holds no PEM certificate");
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_num_tickets(ctx, 0);
  std::move(free_ctx).Cancel();
  return ctx;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const StreamTls>> StreamTls::For(const Security& security) {
  static std::mutex* mu = new std::mutex;
  static auto* made = new std::map<std::string, std::shared_ptr<const StreamTls>>;
  const std::string key = absl::StrCat(security.tls_cert, "\n\n", security.tls_key, "\n\n",
                                       security.tls_ca, "\n\n", security.tls_server_name);
  std::lock_guard<std::mutex> lock(*mu);
  auto it = made->find(key);
  if (it != made->end()) return it->second;
  absl::Status cipher = CheckRecordCipher();
  if (!cipher.ok()) return cipher;
  std::shared_ptr<StreamTls> tls(new StreamTls);
  tls->contexts_ = std::make_unique<Contexts>();
  absl::StatusOr<SSL_CTX*> client = MakeContext(TLS_client_method(), security);
  if (!client.ok()) return client.status();
  tls->contexts_->client = *client;
  absl::StatusOr<SSL_CTX*> server = MakeContext(TLS_server_method(), security);
  if (!server.ok()) return server.status();
  tls->contexts_->server = *server;
  tls->server_name_ = security.tls_server_name;
  (*made)[key] = tls;
  return tls;
}

StreamTls::~StreamTls() = default;

absl::StatusOr<StreamTls::Session> StreamTls::Client(int fd, const std::string& host,
                                                     absl::Time deadline) const {
  return Handshake(fd, /*server=*/false, host, deadline);
}

absl::StatusOr<StreamTls::Session> StreamTls::Server(int fd, absl::Time deadline) const {
  return Handshake(fd, /*server=*/true, "", deadline);
}

void SetSocketTimeouts(int fd, absl::Duration timeout) {
  timeval tv{0, 0};  // never
  if (timeout != absl::InfiniteDuration()) {
    tv = absl::ToTimeval(std::max(timeout, absl::Milliseconds(1)));
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

absl::StatusOr<StreamTls::Session> StreamTls::Handshake(int fd, bool server,
                                                        const std::string& host,
                                                        absl::Time deadline) const {
  ERR_clear_error();
  SSL* ssl = SSL_new(server ? contexts_->server : contexts_->client);
  if (ssl == nullptr) return absl::InternalError("SSL_new: " + OpenSslErrors());
  // Freed without a close_notify: the connection goes on in records.
  absl::Cleanup free_ssl = [ssl] { SSL_free(ssl); };
  SetSocketTimeouts(fd, deadline - absl::Now());
  absl::Cleanup blocking = [fd] { SetSocketTimeouts(fd, absl::InfiniteDuration()); };
  BIO* bio = BIO_new(SocketWithoutSigpipe());
  if (bio == nullptr) return absl::InternalError("BIO_new: " + OpenSslErrors());
  BIO_set_fd(bio, fd, BIO_NOCLOSE);
  SSL_set_bio(ssl, bio, bio);  // ssl owns it
  if (!server) {
    const std::string& name = server_name_.empty() ? host : server_name_;
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
    const int named = IsIpLiteral(name) ? X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str())
                                        : X509_VERIFY_PARAM_set1_host(param, name.c_str(), 0);
    if (named != 1) {
      return absl::InvalidArgumentError(absl::StrCat("TLS: cannot check for the name ", name));
    }
  }
  // Why a step failed, in words.
  auto why = [&](int result, const char* step) {
    const int error = SSL_get_error(ssl, result);
    const int saved_errno = errno;
    std::string detail = OpenSslErrors();
    const long verified = SSL_get_verify_result(ssl);
    if (verified != X509_V_OK) {
      detail = absl::StrCat("the ", server ? "client" : "server",
                            "'s certificate: ", X509_verify_cert_error_string(verified));
    } else if (absl::Now() >= deadline || (error == SSL_ERROR_SYSCALL &&
                                           (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK))) {
      detail = "timed out";
    } else if (detail.find("wrong version number") != std::string::npos ||
               detail.find("packet length too long") != std::string::npos ||
               detail.find("http request") != std::string::npos) {
      detail = "the peer does not speak TLS (a node without TLS?)";
    } else if (detail.empty() || detail.find("unexpected eof") != std::string::npos) {
      detail = server ? "the client closed the connection"
                      : "the server closed the connection (does it serve TLS?)";
    }
    return absl::UnavailableError(absl::StrCat("TLS ", step, ": ", detail));
  };
  int r = server ? SSL_accept(ssl) : SSL_connect(ssl);
  if (r != 1) return why(r, "handshake");
  char ready = kReady;
  r = server ? SSL_write(ssl, &ready, 1) : SSL_read(ssl, &ready, 1);
  if (r != 1) return why(r, "handshake");
  if (ready != kReady) return absl::UnavailableError("TLS handshake: a malformed ready byte");
  uint8_t keys[2 * (kStreamKeyBytes + kStreamIvBytes)];
  if (SSL_export_keying_material(ssl, keys, sizeof(keys), kExporterLabel,
                                 sizeof(kExporterLabel) - 1, nullptr, 0, 0) != 1) {
    return absl::InternalError("TLS: exporting the stream keys: " + OpenSslErrors());
  }
  // The client's direction first.
  const uint8_t* client_key = keys;
  const uint8_t* client_iv = keys + kStreamKeyBytes;
  const uint8_t* server_key = keys + kStreamKeyBytes + kStreamIvBytes;
  const uint8_t* server_iv = server_key + kStreamKeyBytes;
  Session session;
  session.out.reset(server ? new Sealer(server_key, server_iv) : new Sealer(client_key, client_iv));
  session.in.reset(server ? new Opener(client_key, client_iv) : new Opener(server_key, server_iv));
  OPENSSL_cleanse(keys, sizeof(keys));
  return session;
}

// ---- Records.

// A direction's key, expanded once, and its records' count.
struct RecordKey {
  gcm_key_data key;  // 64-byte aligned (the type says so)
  uint8_t iv[kStreamIvBytes];
  uint64_t next = 0;  // the next record's number

  RecordKey(const uint8_t* raw_key, const uint8_t* raw_iv) {
    IMB_AES128_GCM_PRE(Gcm(), raw_key, &key);
    std::memcpy(iv, raw_iv, kStreamIvBytes);
  }
  ~RecordKey() { OPENSSL_cleanse(&key, sizeof(key)); }
  // Starts the next record's cipher in `gcm`, its header as authenticated data.
  void Begin(gcm_context_data* gcm, const uint8_t* header) {
    uint8_t nonce[kStreamIvBytes];
    Nonce(iv, next++, nonce);
    IMB_AES128_GCM_INIT_VAR_IV(Gcm(), &key, gcm, nonce, kStreamIvBytes, header, kRecordHeaderBytes);
  }
};

Sealer::Sealer(const uint8_t* key, const uint8_t* iv) : state_(new RecordKey(key, iv)) {}

Sealer::~Sealer() = default;

size_t Sealer::Seal(const std::vector<iovec>& pieces, char* out) {
  uint32_t length = 0;
  for (const iovec& p : pieces) length += static_cast<uint32_t>(p.iov_len);
  std::memcpy(out, &length, kRecordHeaderBytes);
  auto* at = reinterpret_cast<uint8_t*>(out);
  gcm_context_data gcm;
  state_->Begin(&gcm, at);
  at += kRecordHeaderBytes;
  for (const iovec& p : pieces) {
    if (p.iov_len == 0) continue;
    IMB_AES128_GCM_ENC_UPDATE(Gcm(), &state_->key, &gcm, at,
                              static_cast<const uint8_t*>(p.iov_base), p.iov_len);
    at += p.iov_len;
  }
  IMB_AES128_GCM_ENC_FINALIZE(Gcm(), &state_->key, &gcm, at, kRecordTagBytes);
  return kRecordHeaderBytes + length + kRecordTagBytes;
}

Opener::Opener(const uint8_t* key, const uint8_t* iv) : state_(new RecordKey(key, iv)) {}

Opener::~Opener() = default;

absl::StatusOr<size_t> Opener::Length(const char* header) {
  uint32_t length;
  std::memcpy(&length, header, sizeof(length));
  if (length == 0 || length > kMaxRecordBytes) {
    return absl::DataLossError(
        absl::StrCat("a malformed TLS record (", length, " bytes; the peer speaks no TLS?)"));
  }
  return length;
}

absl::Status Opener::Open(const char* record, char* out) {
  absl::StatusOr<size_t> length = Length(record);
  if (!length.ok()) return length.status();
  const auto* in = reinterpret_cast<const uint8_t*>(record);
  gcm_context_data gcm;
  state_->Begin(&gcm, in);
  IMB_AES128_GCM_DEC_UPDATE(Gcm(), &state_->key, &gcm, reinterpret_cast<uint8_t*>(out),
                            in + kRecordHeaderBytes, *length);
  uint8_t tag[kRecordTagBytes];
  IMB_AES128_GCM_DEC_FINALIZE(Gcm(), &state_->key, &gcm, tag, kRecordTagBytes);
  if (CRYPTO_memcmp(tag, in + kRecordHeaderBytes + *length, kRecordTagBytes) != 0) {
    return absl::DataLossError("a TLS record failed its authentication (changed on the way?)");
  }
  return absl::OkStatus();
}

}  // namespace rpc
}  // namespace mx
