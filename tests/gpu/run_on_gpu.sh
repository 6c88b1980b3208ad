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
#       DIR/results; a binary that exits non-zero after results without a
#       failure counts one more failure, one without results one failure),
#       the GPU tests again under compute-sanitizer's memcheck and
#       racecheck (each run counts as one test), the benchmarks and
#       training on gpu(0) (each run must reach test accuracy 0.70), and
#       ends with "N passed, N failed, N skipped".
#       Exit status 0 only when nothing failed. MX_GPU_CHECK=tests runs the
#       tests alone, MX_GPU_CHECK=fast all but the sanitizer runs (quicker
#       checks when little device time is left); MX_GPU_TIMEOUT (seconds,
#       default 300) bounds each binary, so a hang costs no more.
#
# docs/operations.md ("Checking the GPU path") tells how to run it.
set -uo pipefail
cd "$(dirname "$0")/../.."

# Test targets with GPU tests (each also runs its CPU cases), then benches.
TESTS=(//tests/ndarray:gpu_ndarray_test //tests/ndarray:kernel_test //tests/kvstore:kvstore_test
       //tests/kvstore:optimizer_test //tests/kvstore:dist_kvstore_test
       //tests/graph:gpu_executor_test)
BENCHES=(//bench:gpu_bench)
# Training end to end on gpu(0): mx_train on Fashion-MNIST's test set
# (the pack carries it; the training set would not fit in 64 MiB), alone
# and as a distributed job (deploy/launch.py, which the working tree has).
TRAIN=//worker:mx_train
SERVER=//server:mx_server
DATA=/usr/share/datasets/fashion-mnist

# Libraries the GPU machine provides: the driver, the C runtime, and the
# CUDA libraries found there by `run`.
SYSTEM_LIBS='^(linux-vdso|libc\.|libm\.|libdl\.|librt\.|libpthread\.|ld-linux|libcuda\.|libcublas|libcublasLt|libcudnn|libnccl)'

pack() {
  local dir=${1:-.gpu_pack}
  bazel build --disk_cache="${HOME}/.cache/mx-bazel-disk" "${TESTS[@]}" "${BENCHES[@]}" \
    "$TRAIN" "$SERVER" || return 1
  rm -rf "$dir"
  local stage="$dir/stage"
  mkdir -p "$stage/bin" "$stage/lib" "$stage/data"
  cp "$DATA"/t10k-*.gz "$stage/data/" || return 1
  local target bin
  for target in "${TESTS[@]}" "${BENCHES[@]}" "$TRAIN" "$SERVER"; do
    bin="bazel-bin/$(sed 's|^//||; s|:|/|' <<<"$target")"
    cp "$bin" "$stage/bin/" || return 1
    # Every library it loads, resolved here; copied by its soname.
    ldd "$bin" | awk '/=> \// {print $1, $3}' | while read -r name path; do
      grep -Eq "$SYSTEM_LIBS" <<<"$name" && continue
      [[ -e "$stage/lib/$name" ]] || cp -L "$path" "$stage/lib/$name"
    done
  done
  chmod -R u+w "$stage"
  strip --strip-debug "$stage"/bin/* "$stage"/lib/* 2>/dev/null
  # Compressed, since what travels to the GPU machine is limited to 64 MiB.
  tar -C "$stage" -cf - . | xz -T0 -6 > "$dir/pack.tar.xz" || return 1
  echo "packed $(ls "$stage/bin" | wc -l) binaries and $(ls "$stage/lib" | wc -l) libraries" \
       "into $dir/pack.tar.xz: $(du -h "$dir/pack.tar.xz" | cut -f1)"
  rm -rf "$stage"
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

# Training must learn, not only finish: each run's "Final test accuracy=X"
# lines (COUNT of them, one per worker) must all reach FLOOR. The floor,
# 0.70, from these same commands run on the CPU (cpu(0), the test set as
# training data, 3 epochs): the MLP reached 0.797-0.813 and LeNet
# 0.795-0.809 over seeds 1-3 (0.797 and 0.802 with seed 1, the one used
# here), the 2-worker job at --lr=0.2 as dist_sync (dist_device_sync
# needs a GPU) 0.786 and 0.760 (seeds 1 and 2). A GPU run differs by
# rounding (cuBLAS's, cuDNN's and NCCL's orders of summation), about as
# much as seeds do, while a model that does not learn stays near 0.1
# (chance over 10 classes) and one half broken far below 0.7.
TRAIN_FLOOR=0.70
accuracies() { sed -n 's/.*Final test accuracy=\([^ ]*\).*/\1/p' "$1" | paste -sd' '; }
accuracy_at_least() {  # accuracy_at_least LOG FLOOR COUNT
  accuracies "$1" | awk -v floor="$2" -v count="$3" '
    { for (i = 1; i <= NF; i++)  # a number (not nan) at least floor
        if ($i !~ /^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$/ || $i + 0 < floor + 0) low = 1 }
    END { exit !(NF == count && !low) }'
}

run() {
  local pack=${1:-.gpu_pack} out=${2:-}
  [[ -n $out ]] || out="$pack/results"
  mkdir -p "$out"
  local dir
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' RETURN
  tar -C "$dir" -xJf "$pack/pack.tar.xz" || return 1
  export LD_LIBRARY_PATH="$dir/lib:$(cuda_lib_dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # Where tests that use Bazel's TEST_TMPDIR write (emptied before each).
  export TEST_TMPDIR="$dir/tmp"
  mkdir -p "$TEST_TMPDIR"
  nvidia-smi -L || echo "nvidia-smi found no GPU"
  # Seconds each binary may run (a hang costs no more than this).
  local limit=${MX_GPU_TIMEOUT:-300}
  local passed=0 failed=0 skipped=0 bin name xml header tests failures errors disabled bad skips rc
  for bin in "$dir"/bin/*; do
    name=$(basename "$bin")
    [[ $name == *_bench || $name == mx_train || $name == mx_server ]] && continue
    xml="$out/$name.xml"
    # An earlier run's results (OUT is reused) must not stand in for this
    # run's when the binary dies before writing any.
    rm -f "$xml"
    rm -rf "$TEST_TMPDIR" && mkdir -p "$TEST_TMPDIR"
    echo "== $name"
    # The environment its Bazel target sets (tests/*/BUILD).
    local test_env=()
    [[ $name == kvstore_test ]] && test_env=(MX_CPU_WORKER_NTHREADS=2)
    env "${test_env[@]}" timeout "$limit" "$bin" --gtest_output="xml:$xml" 2>&1 |
      grep -Ev '^\[ +(RUN|OK) +\]'
    rc=${PIPESTATUS[0]}
    if [[ ! -s $xml ]]; then
      echo "$name: no results (exit status $rc: crashed or timed out)"
      failed=$((failed + 1))
      continue
    fi
    # GoogleTest's totals: tests counts the disabled ones (not run) and the
    # skipped ones too; errors are failures as well.
    header=$(grep -m1 -o '<testsuites[^>]*>' "$xml")
    tests=$(sed -n 's/.* tests="\([0-9]*\)".*/\1/p' <<<"$header")
    failures=$(sed -n 's/.* failures="\([0-9]*\)".*/\1/p' <<<"$header")
    errors=$(sed -n 's/.* errors="\([0-9]*\)".*/\1/p' <<<"$header")
    disabled=$(sed -n 's/.* disabled="\([0-9]*\)".*/\1/p' <<<"$header")
    skips=$(grep -c 'result="skipped"' "$xml")
    bad=$(( ${failures:-0} + ${errors:-0} ))
    passed=$((passed + ${tests:-0} - bad - ${disabled:-0} - ${skips:-0}))
    failed=$((failed + bad))
    skipped=$((skipped + ${skips:-0}))
    # A binary that wrote its results and then failed (an abort at exit, a
    # leak check, a timeout after the last test) fails once more.
    if [[ $rc -ne 0 && $bad -eq 0 ]]; then
      echo "$name: exit status $rc after results with no failure"
      failed=$((failed + 1))
    fi
  done
  if [[ ${MX_GPU_CHECK:-all} == tests ]]; then
    echo "${passed} passed, ${failed} failed, ${skipped} skipped (tests only)"
    [[ $failed -eq 0 ]]
    return
  fi
  # The GPU tests again under compute-sanitizer, where the machine has it:
  # memcheck for bad accesses, racecheck for shared-memory races. (The tests
  # that exhaust memory and that make a kernel fault on purpose are left
  # out: the tool reports what they do.)
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [[ ${MX_GPU_CHECK:-all} == fast ]]; then
    echo "sanitizer runs skipped (MX_GPU_CHECK=fast)"
  elif [[ -x $sanitizer ]]; then
    local tool
    for tool in memcheck racecheck; do
      for name in gpu_ndarray_test gpu_executor_test; do
        echo "== compute-sanitizer --tool $tool $name"
        if timeout "$limit" "$sanitizer" --tool "$tool" --error-exitcode 1 "$dir/bin/$name" \
             --gtest_filter='-*Exhausted*:*FailedKernel*' > "$out/$tool-$name.log" 2>&1; then
          passed=$((passed + 1))
        else
          tail -20 "$out/$tool-$name.log"
          failed=$((failed + 1))
        fi
      done
    done
  else
    echo "compute-sanitizer not found: sanitizer runs skipped"
  fi
  # The benchmarks' PyTorch baselines: the first python3 that has torch.
  local py
  for py in python3 /opt/torch/.venv/bin/python3; do
    if command -v "$py" > /dev/null && "$py" -c 'import torch' 2> /dev/null; then
      export MX_TORCH_PYTHON
      MX_TORCH_PYTHON=$(command -v "$py")
      break
    fi
  done
  for bin in "$dir"/bin/*_bench; do
    echo "== $(basename "$bin")"
    # Also kept under OUT, which comes back even when the run is cut off.
    timeout "$limit" "$bin" 2>&1 | tee "$out/$(basename "$bin").log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "$(basename "$bin") failed"; failed=$((failed + 1)); }
  done
  # Training on gpu(0) must learn: the test set's 10000 images as training
  # data (train-* named so mx_train finds them), the MLP and LeNet (cuDNN).
  for f in images-idx3-ubyte labels-idx1-ubyte; do
    cp "$dir/data/t10k-$f.gz" "$dir/data/train-$f.gz"
  done
  local network
  for network in mlp lenet; do
    echo "== mx_train --network=$network on gpu(0)"
    if timeout "$limit" "$dir/bin/mx_train" --network="$network" --contexts='gpu(0)' --epochs=3 \
         --data_dir="$dir/data" --seed=1 2>&1 | tee "$out/mx_train_$network.log" | tail -3 &&
       accuracy_at_least "$out/mx_train_$network.log" "$TRAIN_FLOOR" 1; then
      passed=$((passed + 1))
    else
      echo "mx_train --network=$network on gpu(0) failed" \
           "(test accuracy: $(accuracies "$out/mx_train_$network.log" | grep . || echo none); at least $TRAIN_FLOOR wanted)"
      failed=$((failed + 1))
    fi
  done
  # Data-parallel on every GPU present through the nccl store (with one GPU
  # it moves values as "device" does).
  local gpus
  gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
  [[ $gpus -ge 1 ]] || gpus=1
  local contexts
  contexts=$(seq 0 $((gpus - 1)) | sed 's/.*/gpu(&)/' | paste -sd,)
  echo "== mx_train --kvstore=nccl --contexts=$contexts"
  if timeout "$limit" "$dir/bin/mx_train" --network=mlp --kvstore=nccl --contexts="$contexts" \
       --epochs=3 --data_dir="$dir/data" --seed=1 2>&1 | tee "$out/mx_train_nccl.log" | tail -3 &&
     accuracy_at_least "$out/mx_train_nccl.log" "$TRAIN_FLOOR" 1; then
    passed=$((passed + 1))
  else
    echo "mx_train --kvstore=nccl failed" \
         "(test accuracy: $(accuracies "$out/mx_train_nccl.log" | grep . || echo none); at least $TRAIN_FLOOR wanted)"
    failed=$((failed + 1))
  fi
  # The same as a job: 2 workers on gpu(0), dist_device_sync (each sums its
  # device copies on the GPU), 1 server.
  echo "== launch.py -n 2 -s 1 --kvstore dist_device_sync: mx_train on gpu(0)"
  if timeout "$limit" python3 deploy/launch.py -n 2 -s 1 --kvstore dist_device_sync \
       --server-binary "$dir/bin/mx_server" -- \
       "$dir/bin/mx_train" --kvstore=dist_device_sync --network=mlp --contexts='gpu(0)' \
       --epochs=3 --lr=0.2 --data_dir="$dir/data" --seed=1 2>&1 |
       tee "$out/dist_device_sync.log" | tail -4 &&
     accuracy_at_least "$out/dist_device_sync.log" "$TRAIN_FLOOR" 2; then
    passed=$((passed + 1))
  else
    echo "the dist_device_sync job on gpu(0) failed" \
         "(test accuracy: $(accuracies "$out/dist_device_sync.log" | grep . || echo none); 2 of at least $TRAIN_FLOOR wanted)"
    failed=$((failed + 1))
  fi
  echo "${passed} passed, ${failed} failed, ${skipped} skipped"
  [[ $failed -eq 0 ]]
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 pack [DIR] | run [DIR] [OUT]" >&2; exit 2 ;;
esac
