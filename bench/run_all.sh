#!/usr/bin/env bash
# Builds and runs every benchmark; each prints BENCH lines (see bench_util.h).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh --bench
bazel build //bench:all //server:mx_server //worker:mx_train //worker:mx_ctr_gen
for b in ndarray_bench graph_bench train_bench kvstore_bench dist_bench op_bench trust_bench gpu_bench key_spread sparse_bench; do
  echo "== $b"
  "bazel-bin/bench/$b"
done
echo "== dist_procs_bench"
python3 bench/dist_procs_bench.py
echo "== dist_train_bench"
python3 bench/dist_train_bench.py
echo "== scale_bench"
python3 bench/scale_bench.py
echo "== failover_bench"
python3 bench/failover_bench.py
echo "== ctr_bench"
python3 bench/ctr_bench.py
echo "== compression_bench"
python3 bench/compression_bench.py
