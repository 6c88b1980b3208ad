// A job's TLS files for tests: a CA and a node certificate it signed,
// made with Debian's openssl under TEST_TMPDIR.
#ifndef MX_TESTS_RPC_TEST_TLS_H_
#define MX_TESTS_RPC_TEST_TLS_H_

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "rpc/security.h"

namespace mx {
namespace test {

inline std::string TestTmpDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

// Runs a shell command; fails the test if it fails.
inline void RunQuietly(const std::string& command) {
  ASSERT_EQ(std::system((command + " > /dev/null 2>&1").c_str()), 0) << command;
}

// A CA named `ca` and a node certificate it signed (for DNS name mx-job,
// usable by clients and servers), made under TEST_TMPDIR; the node's
// Security, which names its servers mx-job as launch.py's does.
inline rpc::Security MakeTls(const std::string& ca) {
  const std::string d = absl::StrCat(TestTmpDir(), "/", ca);
  RunQuietly("mkdir -p " + d);
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  RunQuietly(absl::StrCat("openssl req -x509 ", ec, " -keyout ", d, "/ca.key -out ", d,
                          "/ca.pem -days 2 -subj /CN=", ca));
  std::ofstream(d + "/ext")
      << "subjectAltName=DNS:mx-job\nextendedKeyUsage=serverAuth,clientAuth\n";
  RunQuietly(absl::StrCat("openssl req ", ec, " -keyout ", d, "/node.key -out ", d,
                          "/node.csr -subj /CN=node"));
  RunQuietly(absl::StrCat("openssl x509 -req -in ", d, "/node.csr -CA ", d, "/ca.pem -CAkey ", d,
                          "/ca.key -CAcreateserial -out ", d, "/node.pem -days 2 -extfile ", d,
                          "/ext"));
  absl::StatusOr<rpc::Security> s = rpc::Security::Load(
      "", {}, {d + "/node.pem", "cert"}, {d + "/node.key", "key"}, {d + "/ca.pem", "ca"}, "mx-job");
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : rpc::Security();
}

}  // namespace test
}  // namespace mx

#endif  // MX_TESTS_RPC_TEST_TLS_H_
