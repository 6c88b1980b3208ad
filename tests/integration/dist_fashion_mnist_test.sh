#!/usr/bin/env bash
# The README's main job: 2 workers and 2 servers train the MLP on the real
# Fashion-MNIST data with dist_sync for 10 epochs; both workers must reach
# 0.86 test accuracy (PyTorch DDP with 2 processes at the same per-process
# batch reaches 0.847), and every process must be gone afterwards.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"
DATA=/usr/share/datasets/fashion-mnist
[[ -r "$DATA/train-images-idx3-ubyte.gz" ]] || { fail "$DATA missing (apt-get install dataset-fashion-mnist)"; finish; }

log="$TMP/job.log"
JOB_LOGS+=("$log")
timeout -k 5 600 python3 "$LAUNCH" -n 2 -s 2 --server-binary="$SERVER" -- "$TRAIN" \
  --kvstore=dist_sync --network=mlp --epochs=10 --lr=0.2 --data_dir="$DATA" > "$log" 2>&1
rc=$?
[[ $rc -eq 0 ]] || fail "job exit code $rc"
for w in 0 1; do
  acc=$(sed -n "s/^\[worker $w\] Final test accuracy=\([0-9.]*\).*/\1/p" "$log")
  echo "worker $w: test accuracy ${acc:-none}"
  python3 -c "import sys; sys.exit(0 if float('${acc:-0}') >= 0.86 else 1)" \
    || fail "worker $w accuracy ${acc:-missing} < 0.86"
done
assert_nothing_left "$log"
(( failures == 0 )) || tail -20 "$log"
finish
