"""Repository rule that wraps system libraries found by pkg-config.

Each entry of _LIBS becomes a cc_library in @system whose linkopts are the
output of `pkg-config --libs`. Headers live in /usr/include, which the
toolchain already searches. A missing package is an error that names it and
the apt package that provides it (deploy/setup.sh installs them all).
"""

_LIBS = {
    # target: ([pkg-config modules], "debian package")
    "absl": (["absl_status", "absl_statusor", "absl_strings", "absl_str_format", "absl_synchronization", "absl_flags", "absl_flags_parse", "absl_time", "absl_random_random", "absl_hash", "absl_raw_hash_set", "absl_failure_signal_handler", "absl_symbolize"], "libabsl-dev"),
    "benchmark": (["benchmark"], "libbenchmark-dev"),
    "grpc": (["grpc++"], "libgrpc++-dev"),
    "gtest": (["gmock"], "libgtest-dev libgmock-dev"),
    "microhttpd": (["libmicrohttpd"], "libmicrohttpd-dev"),
    "gtest_main": (["gtest_main", "gmock"], "libgtest-dev libgmock-dev"),
    "openblas": (["openblas"], "libopenblas-dev"),
    "openssl": (["openssl"], "libssl-dev"),
    "protobuf": (["protobuf"], "libprotobuf-dev"),
    "zlib": (["zlib"], "zlib1g-dev"),
}

# Libraries without a pkg-config module: target: ([linkopts], header that
# must exist, "debian package").
_PLAIN_LIBS = {
    # oneDNN (Debian builds it on OpenMP; mx calls it from its own threads,
    # one OpenMP thread each, hence libgomp for omp_set_num_threads).
    "dnnl": (["-ldnnl", "-lgomp"], "/usr/include/oneapi/dnnl/dnnl.hpp", "libdnnl-dev"),
    # Intel's multi-buffer crypto, for the AES-GCM of TLS stream records
    # (rpc/stream_tls.cc says why not OpenSSL's).
    "ipsec_mb": (["-lIPSec_MB"], "/usr/include/intel-ipsec-mb.h", "libipsec-mb-dev"),
}

def _cc_library(name, flags):
    """The BUILD lines of a cc_library that only links with `flags`."""
    return ["cc_library(", '    name = "%s",' % name, "    linkopts = %s," % repr(flags), ")", ""]

def _system_libs_impl(ctx):
    pkg_config = ctx.which("pkg-config")
    if pkg_config == None:
        fail("pkg-config not found: run deploy/setup.sh (apt-get install pkg-config)")
    lines = ['package(default_visibility = ["//visibility:public"])', ""]
    for name, (modules, debian) in _LIBS.items():
        result = ctx.execute([pkg_config, "--libs"] + modules)
        if result.return_code != 0:
            fail("pkg-config could not find %s (install Debian package %s): %s" % (" ".join(modules), debian, result.stderr))
        lines += _cc_library(name, [f for f in result.stdout.strip().split(" ") if f])
    for name, (flags, header, debian) in _PLAIN_LIBS.items():
        if not ctx.path(header).exists:
            fail("%s not found (install Debian package %s)" % (header, debian))
        lines += _cc_library(name, flags)
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file("BUILD", "\n".join(lines))

system_libs = repository_rule(
    implementation = _system_libs_impl,
    local = True,
    environ = ["PKG_CONFIG_PATH"],
)
