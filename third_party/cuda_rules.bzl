"""cuda_library: compiles .cu files with nvcc into a cc_library.

Defines nothing when CUDA is absent (see cuda.bzl), so callers guard their use
with CUDA_ENABLED. Device code is built for Ampere (sm_80) and Hopper (sm_90),
plus PTX for newer GPUs.
"""

load("@local_cuda//:defs.bzl", "CUDA_ENABLED", "NVCC")
load("@rules_cc//cc:defs.bzl", "cc_library")

_NVCC_FLAGS = " ".join([
    "-std=c++17",
    "-O3",
    "-Xcompiler -fPIC",
    "-gencode arch=compute_80,code=sm_80",
    "-gencode arch=compute_90,code=sm_90",
    "-gencode arch=compute_90,code=compute_90",
    "-I.",
])

def cuda_library(name, srcs, hdrs = [], deps = [], nvcc_inputs = [], **kwargs):
    """nvcc_inputs: further files the .cu sources include (headers of other
    packages, exported there), needed by the compile only."""
    if not CUDA_ENABLED:
        return
    objs = []
    for src in srcs:
        obj = name + "_" + src.replace("/", "_").replace(".cu", ".o")
        native.genrule(
            name = obj + "_nvcc",
            srcs = [src] + hdrs + nvcc_inputs,
            outs = [obj],
            cmd = "%s %s -c $(location %s) -o $@" % (NVCC, _NVCC_FLAGS, src),
        )
        objs.append(obj)
    cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        deps = deps + ["@local_cuda//:cudart"],
        **kwargs
    )
