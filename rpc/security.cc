#include "rpc/security.h"

#include <grpcpp/grpcpp.h>
#include <sys/random.h>
#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "ndarray/base.h"
#include "ndarray/env.h"
#include "rpc/metrics.h"
#include "rpc/stream_tls.h"

namespace mx {
namespace rpc {

namespace {

// Call metadata (gRPC keys are lower case).
constexpr char kTokenKey[] = "mx-job-token";
// "worker/3:KEY" (a registered node: its session key) or "worker/3".
constexpr char kNodeKey[] = "mx-node";

// How long a call acting for a node waits for the keys of its role.
constexpr absl::Duration kKeyWait = absl::Seconds(10);

// The whole of file `path`; `what` names the setting in errors.
absl::StatusOr<std::string> ReadWholeFile(const std::string& what, const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {  // it "read" as empty
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", path, " is a directory"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat(what, ": cannot read ", path, ": ", std::strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", path, " is empty"));
  return text.str();
}

// The host of a gRPC peer string ("ipv4:127.0.0.1:5000" -> "127.0.0.1").
std::string PeerHost(const std::string& peer) {
  std::string host = peer.substr(peer.find(':') + 1);
  const size_t colon = host.rfind(':');
  if (colon != std::string::npos && colon > 0) host = host.substr(0, colon);
  return host;
}

}  // namespace

const char* RoleName(Role role) { return role == Role::kServer ? "server" : "worker"; }

absl::StatusOr<Security> Security::Load(const std::string& token, const File& token_file,
                                        const File& cert, const File& key, const File& ca,
                                        const std::string& server_name) {
  Security s;
  // One line end is not part of a token: a Kubernetes Secret made from a
  // file that `echo` or `print` wrote holds one, as does a file of Windows
  // lines.
  auto line = [](std::string text) {
    if (absl::EndsWith(text, "\n")) text.pop_back();
    if (absl::EndsWith(text, "\r")) text.pop_back();
    return text;
  };
  s.token = line(token);
  std::string from = "MX_JOB_TOKEN";
  if (s.token.empty() && !token_file.path.empty()) {
    MX_ASSIGN_OR_RETURN(const std::string text, ReadWholeFile(token_file.from, token_file.path));
    s.token = line(text.substr(0, text.find('\n')));
    from = absl::StrCat("the first line of ", token_file.from, "=", token_file.path);
    // A token file with a blank first line (a stray newline) gave token
    // "": every node then obeyed every caller.
    if (s.token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(token_file.from, "=", token_file.path,
                                                     ": the job token file's first line is empty"));
    }
  }
  if (s.token.find_first_of(" \t\r\n") != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("the job token (", from, ") must not contain white space"));
  }
  // It goes in call metadata, which takes printable ASCII only: gRPC
  // refused the call's start, and its C++ layer aborted the node.
  for (const char c : s.token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the job token (", from, ") must be printable ASCII (bytes 0x21 to 0x7e; e.g. ",
          "`openssl rand -hex 32`), not byte 0x",
          absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2)));
    }
  }
  const int given = !cert.path.empty() + !key.path.empty() + !ca.path.empty();
  if (given != 0 && given != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TLS needs a certificate, its key and the job's CA (", cert.from, ", ", key.from, ", ",
        ca.from, "): give all three or none"));
  }
  if (given == 3) {
    MX_ASSIGN_OR_RETURN(s.tls_cert, ReadWholeFile(cert.from, cert.path));
    MX_ASSIGN_OR_RETURN(s.tls_key, ReadWholeFile(key.from, key.path));
    MX_ASSIGN_OR_RETURN(s.tls_ca, ReadWholeFile(ca.from, ca.path));
  }
  s.tls_server_name = server_name;
  if (given == 3) {
    // Parsed now (and kept for the stream connections, rpc/stream_tls.h),
    // so that files that hold no certificate or key stop the node at start
    // naming them; gRPC's server said only "cannot listen on ...".
    const absl::Status parsed = StreamTls::For(s).status();
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(parsed.message(), " (", cert.from, " ",
                                                     cert.path, ", ", key.from, " ", key.path, ", ",
                                                     ca.from, " ", ca.path, ")"));
    }
  }
  return s;
}

absl::StatusOr<Security> Security::FromEnvironment() {
  auto file = [](const char* name) { return File{EnvString(name), name}; };
  // Set but empty (a Kubernetes Secret whose token is ""): not the same as
  // unset, which runs an open job on purpose; this one would have too.
  const char* token = std::getenv("MX_JOB_TOKEN");
  if (token != nullptr && std::string(token).find_first_not_of("\r\n") == std::string::npos) {
    return absl::InvalidArgumentError(
        "MX_JOB_TOKEN is set but empty (a Secret with an empty token?): give the job's token, "
        "or unset it to run a job without one");
  }
  return Load(EnvString("MX_JOB_TOKEN"), file("MX_JOB_TOKEN_FILE"), file("MX_TLS_CERT"),
              file("MX_TLS_KEY"), file("MX_TLS_CA"), EnvString("MX_TLS_SERVER_NAME"));
}

std::string NewSessionKey() {
  char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    MX_CHECK(n > 0);  // the kernel's generator does not fail once seeded
    got += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(absl::string_view(bytes, sizeof(bytes)));
}

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  // Every byte of the longer is read, so the time tells nothing of where
  // they differ.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0;
    const unsigned char y = i < b.size() ? b[i] : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

Claims Claims::Of(const ServerContext& ctx) {
  return {ctx.Metadata(kTokenKey), ctx.Metadata(kNodeKey)};
}

Claims Caller::claims() const {
  // A registered node sends its identity alone: the coordinator gave its
  // session key only to a caller with the job token, so the key implies
  // the token.
  if (rank >= 0 && !key.empty()) return {"", absl::StrCat(RoleName(role), "/", rank, ":", key)};
  return {token, rank >= 0 ? absl::StrCat(RoleName(role), "/", rank) : ""};
}

void Caller::Stamp(grpc::ClientContext* ctx) const {
  // One header where it can (bench/trust_bench: three headers added ~10 us
  // to a 150 us round trip; the first one most of it).
  const Claims c = claims();
  if (!c.token.empty()) ctx->AddMetadata(kTokenKey, c.token);
  if (!c.node.empty()) ctx->AddMetadata(kNodeKey, c.node);
}

Guard::Guard(std::string token, bool identities)
    : token_(std::move(token)), identities_(identities) {}

void Guard::Admit(Role role, int rank, const std::string& key) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    keys_[{role, rank}] = key;
  }
  admitted_.notify_all();
}

std::string Guard::Key(Role role, int rank) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = keys_.find({role, rank});
  return it == keys_.end() ? "" : it->second;
}

void Guard::AdmitAll(Role role) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    admitted_all_.insert(role);
  }
  admitted_.notify_all();
}

absl::Status Guard::Refuse(const ServerContext& ctx, absl::Status why) {
  refused_.fetch_add(1);
  static metrics::Family<metrics::Counter>* refused = metrics::Registry::Global().AddCounter(
      "mx_rpc_refused_total",
      "Calls refused for a missing or wrong job token (UNAUTHENTICATED) or a caller "
      "without the identity it claims (PERMISSION_DENIED)",
      {"code"});
  refused->With({absl::StatusCodeToString(why.code())})->Add();
  const std::string host = PeerHost(ctx.peer());
  bool first;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Bounded: a flood from many hosts is counted, not remembered.
    first = logged_.size() < 1000 &&
            logged_.insert(absl::StrCat(host, " ", static_cast<int>(why.code()))).second;
  }
  if (first) {
    std::cerr << "refused a call from " << ctx.peer() << ": " << why.message()
              << " (further refusals from " << host << " for this reason are only counted)"
              << std::endl;
  }
  return why;
}

absl::Status Guard::CheckToken(const ServerContext& ctx, const char* method) {
  return CheckToken(ctx, method, ctx.Metadata(kTokenKey));
}

absl::Status Guard::CheckToken(const ServerContext& ctx, const char* method,
                               const std::string& got) {
  if (token_.empty()) return absl::OkStatus();
  if (ConstantTimeEquals(got, token_)) return absl::OkStatus();
  return Refuse(ctx, absl::UnauthenticatedError(
                         absl::StrCat(method, ": ", got.empty() ? "no job token" : "wrong job token",
                                      " (a process that is not part of this job)")));
}

absl::StatusOr<std::string> Guard::KeyOf(Role role, int rank) {
  std::unique_lock<std::mutex> lock(mu_);
  const bool known = admitted_.wait_for(lock, absl::ToChronoMilliseconds(kKeyWait), [&] {
    return admitted_all_.count(role) > 0 || keys_.count({role, rank}) > 0;
  });
  if (!known) {
    return absl::UnavailableError(absl::StrCat("the ", RoleName(role),
                                               "s of the job are not known here yet"));
  }
  auto it = keys_.find({role, rank});
  if (it == keys_.end()) {
    return absl::PermissionDeniedError(
        absl::StrCat(RoleName(role), " ", rank, " is not registered in this job"));
  }
  return it->second;
}

absl::StatusOr<Guard::Node> Guard::IdentifyAny(const ServerContext& ctx,
                                               const char* method) {
  return IdentifyAny(ctx, method, Claims::Of(ctx));
}

absl::StatusOr<Guard::Node> Guard::IdentifyAny(const ServerContext& ctx,
                                               const char* method, const Claims& claims) {
  if (!identities_) {
    MX_RETURN_IF_ERROR(CheckToken(ctx, method, claims.token));
    return Node{};
  }
  // "worker/3:KEY": the node claimed and the key that proves it.
  const std::string& node = claims.node;
  std::pair<std::string, std::string> claim = absl::StrSplit(node, absl::MaxSplits(':', 1));
  std::pair<std::string, std::string> parts = absl::StrSplit(claim.first, absl::MaxSplits('/', 1));
  Node caller;
  caller.role = parts.first == "server" ? Role::kServer : Role::kWorker;
  if ((parts.first != "worker" && parts.first != "server") ||
      !absl::SimpleAtoi(parts.second, &caller.rank) || caller.rank < 0) {
    MX_RETURN_IF_ERROR(CheckToken(ctx, method, claims.token));
    return Refuse(ctx, absl::PermissionDeniedError(absl::StrCat(
                           method, ": only a registered node of the job may call this; ",
                           node.empty() ? "the caller did not say which node it is"
                                        : absl::StrCat("the caller says it is '", node, "'"))));
  }
  const std::string& claimed_key = claim.second;
  // Without a key to check, the token decides at once (no waiting below).
  if (claimed_key.empty()) MX_RETURN_IF_ERROR(CheckToken(ctx, method, claims.token));
  absl::StatusOr<std::string> key = KeyOf(caller.role, caller.rank);
  if (key.ok() && ConstantTimeEquals(claimed_key, *key)) return caller;  // implies the token
  // Refused: for the token if it is missing or wrong, else for the identity.
  MX_RETURN_IF_ERROR(CheckToken(ctx, method, claims.token));
  if (!key.ok()) {
    if (absl::IsUnavailable(key.status())) {
      return absl::UnavailableError(absl::StrCat(method, ": ", key.status().message()));
    }
    return Refuse(ctx,
                  absl::PermissionDeniedError(absl::StrCat(method, ": ", key.status().message())));
  }
  return Refuse(ctx, absl::PermissionDeniedError(absl::StrCat(
                         method, ": the caller claims to be ", RoleName(caller.role), " ",
                         caller.rank, " without its session key (it is not the node that "
                         "registered as that)")));
}

absl::StatusOr<Guard::Node> Guard::Identify(const ServerContext& ctx, const char* method,
                                            Role role) {
  return Identify(ctx, method, role, Claims::Of(ctx));
}

absl::StatusOr<Guard::Node> Guard::Identify(const ServerContext& ctx, const char* method,
                                            Role role, const Claims& claims) {
  MX_ASSIGN_OR_RETURN(const Node caller, IdentifyAny(ctx, method, claims));
  if (caller.rank < 0 || caller.role == role) return caller;
  return Refuse(ctx, absl::PermissionDeniedError(absl::StrCat(
                         method, ": only a ", RoleName(role), " may call this, not ",
                         RoleName(caller.role), " ", caller.rank)));
}

absl::Status Guard::CheckClaim(const ServerContext& ctx, const char* method,
                               const Node& caller, Role role, int rank) {
  if (caller.rank < 0 || (caller.role == role && caller.rank == rank)) return absl::OkStatus();
  return Refuse(ctx, absl::PermissionDeniedError(absl::StrCat(
                         method, ": ", RoleName(caller.role), " ", caller.rank,
                         " claims to act for ", RoleName(role), " ", rank)));
}

}  // namespace rpc
}  // namespace mx
