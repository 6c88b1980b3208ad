"""Forwards rules_cc's macros to Bazel's native C++ rules.

Debian's bazel-rules-cc is too new for Bazel 4, and nothing can be downloaded,
so BUILD files load("@rules_cc//cc:defs.bzl", ...) from this stub. With a real
rules_cc (newer Bazel, online) the same BUILD files keep working.
"""

def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_import(**kwargs):
    native.cc_import(**kwargs)

def cc_proto_library(**kwargs):
    native.cc_proto_library(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)

def objc_library(**kwargs):
    native.objc_library(**kwargs)

def objc_import(**kwargs):
    native.objc_import(**kwargs)
