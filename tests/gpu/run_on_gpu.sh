#!/usr/bin/env bash
# The prepared GPU check: every GPU test and GPU benchmark of mx, on a
# machine with GPUs that may have a CUDA driver, nvcc and PyTorch but neither
# Bazel nor Debian's packages. Two halves:
#
#   tests/gpu/run_on_gpu.sh pack [DIR]   here (with Bazel and the CUDA
#       toolkit): builds the GPU test and bench binaries and packs them into
#       DIR (default .gpu_pack, ignored by git) with every shared library
#       they load, except the driver and the CUDA math libraries (cuBLAS is
#       far over the 64 MiB a pack may take), which the GPU machine has
#       (PyTorch's wheels carry them).
#   tests/gpu/run_on_gpu.sh run [DIR] [OUT]   there: finds the CUDA
#       libraries, runs every packed test (GoogleTest XML to OUT, default
#       DIR/results) and benchmark, and ends with "N passed, N failed,
#       N skipped". Exit status 0 only when nothing failed.
#
# docs/operations.md ("Checking the GPU path") tells how to run it.
set -uo pipefail
cd "$(dirname "$0")/../.."

# Test targets with GPU tests (each also runs its CPU cases), then benches.
TESTS=(//tests/ndarray:gpu_ndarray_test //tests/ndarray:kernel_test //tests/kvstore:kvstore_test
       //tests/kvstore:optimizer_test)
BENCHES=(//bench:gpu_bench)

# Libraries the GPU machine provides: the driver, the C runtime, and the
# CUDA libraries found there by `run`.
SYSTEM_LIBS='^(linux-vdso|libc\.|libm\.|libdl\.|librt\.|libpthread\.|ld-linux|libcuda\.|libcublas|libcublasLt|libcudnn|libnccl)'

pack() {
  local dir=${1:-.gpu_pack}
  bazel build --disk_cache="${HOME}/.cache/mx-bazel-disk" "${TESTS[@]}" "${BENCHES[@]}" || return 1
  rm -rf "$dir"
  mkdir -p "$dir/bin" "$dir/lib"
  local target bin
  for target in "${TESTS[@]}" "${BENCHES[@]}"; do
    bin="bazel-bin/$(sed 's|^//||; s|:|/|' <<<"$target")"
    cp "$bin" "$dir/bin/" || return 1
    # Every library it loads, resolved here; copied by its soname.
    ldd "$bin" | awk '/=> \// {print $1, $3}' | while read -r name path; do
      grep -Eq "$SYSTEM_LIBS" <<<"$name" && continue
      [[ -e "$dir/lib/$name" ]] || cp -L "$path" "$dir/lib/$name"
    done
  done
  chmod -R u+w "$dir"
  strip --strip-debug "$dir"/bin/* "$dir"/lib/* 2>/dev/null
  echo "packed $(ls "$dir/bin" | wc -l) binaries and $(ls "$dir/lib" | wc -l) libraries" \
       "into $dir: $(du -sh "$dir" | cut -f1)"
}

# Directories holding the CUDA libraries on this machine: PyTorch's NVIDIA
# wheels, then a toolkit.
cuda_lib_dirs() {
  python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
seen = []
for root in roots:
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "lib", "lib*.so*"), recursive=True):
        d = os.path.dirname(lib)
        if d not in seen:
            seen.append(d)
print(":".join(seen))
PY
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && printf ':%s' "$d"
  done
}

run() {
  local dir=${1:-.gpu_pack} out=${2:-}
  [[ -n $out ]] || out="$dir/results"
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$dir/lib:$(cuda_lib_dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi -L || echo "nvidia-smi found no GPU"
  local passed=0 failed=0 skipped=0 bin name xml tests bad skips
  for bin in "$dir"/bin/*; do
    name=$(basename "$bin")
    [[ $name == *_bench ]] && continue
    xml="$out/$name.xml"
    echo "== $name"
    timeout 300 "$bin" --gtest_output="xml:$xml" 2>&1 | grep -Ev '^\[ +(RUN|OK) +\]'
    if [[ ! -s $xml ]]; then
      echo "$name: no results (crashed or timed out)"
      failed=$((failed + 1))
      continue
    fi
    tests=$(grep -m1 -o '<testsuites[^>]*>' "$xml" | sed -n 's/.* tests="\([0-9]*\)".*/\1/p')
    bad=$(grep -m1 -o '<testsuites[^>]*>' "$xml" | sed -n 's/.* failures="\([0-9]*\)".*/\1/p')
    skips=$(grep -c 'result="skipped"' "$xml")
    passed=$((passed + tests - bad - skips))
    failed=$((failed + bad))
    skipped=$((skipped + skips))
  done
  for bin in "$dir"/bin/*_bench; do
    echo "== $(basename "$bin")"
    timeout 300 "$bin" || { echo "$(basename "$bin") failed"; failed=$((failed + 1)); }
  done
  echo "${passed} passed, ${failed} failed, ${skipped} skipped"
  [[ $failed -eq 0 ]]
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 pack [DIR] | run [DIR] [OUT]" >&2; exit 2 ;;
esac
