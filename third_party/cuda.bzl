"""Finds the CUDA toolkit, or defines nothing when it is absent.

@local_cuda//:defs.bzl exports CUDA_ENABLED. When nvcc exists under CUDA_PATH
(default /usr/local/cuda) and MX_DISABLE_CUDA is unset or 0, @local_cuda
provides cc_library targets cudart, cublas, cudnn and nccl over the toolkit; otherwise
it provides none and every CUDA target of mx vanishes (see cuda_rules.bzl).
"""

def _cuda_configure_impl(ctx):
    cuda_path = ctx.os.environ.get("CUDA_PATH", "/usr/local/cuda")
    disabled = ctx.os.environ.get("MX_DISABLE_CUDA", "0") not in ["", "0"]
    nvcc = ctx.path(cuda_path + "/bin/nvcc")
    enabled = (not disabled) and nvcc.exists
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    if not enabled:
        ctx.file("defs.bzl", "CUDA_ENABLED = False\nNVCC = None\n")
        ctx.file("BUILD", "# CUDA not found or disabled: no CUDA targets.\n")
        return
    ctx.symlink(cuda_path, "cuda")
    lib = cuda_path + "/lib64"
    ctx.file("defs.bzl", 'CUDA_ENABLED = True\nNVCC = "%s"\n' % str(nvcc))
    build = """package(default_visibility = ["//visibility:public"])

cc_library(
    name = "headers",
    hdrs = glob(["cuda/include/**"]),
    includes = ["cuda/include"],
)

# The CUDA runtime, linked dynamically: Bazel links tests against one shared
# library per target, and a libcudart_static.a linked into the test binary
# does not export the symbols that the kernels' shared library needs.
# tests/gpu/pack.sh packs libcudart.so beside the binaries.
cc_library(
    name = "cudart",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-lcudart"],
    deps = [":headers"],
)

cc_library(
    name = "cublas",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-lcublas"],
    deps = [":cudart"],
)

cc_library(
    name = "cudnn",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-lcudnn"],
    deps = [":cudart"],
)

cc_library(
    name = "nccl",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-lnccl"],
    deps = [":cudart"],
)
""".format(lib = lib)
    ctx.file("BUILD", build)

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    local = True,
    environ = ["CUDA_PATH", "MX_DISABLE_CUDA"],
)
