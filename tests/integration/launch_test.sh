#!/usr/bin/env bash
# A distributed job on 127.0.0.1 through deploy/launch.py: a coordinator, 2
# parameter servers and 2 workers training on small CSV data (dist_sync),
# then a job whose worker is killed: the launcher must stop everything
# within the deadline, say which process failed, and leave nothing behind.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

source "$(dirname "$0")/../testdata/make_csv.sh"
# 401 samples: two parts would differ by one sample, and at batch 20 by a
# whole batch at the end of each epoch; equal-sized parts keep every step
# of the job matched.
make_csv 401 "$TMP/train.csv" "$TMP/train_labels.csv"
make_csv 100 "$TMP/test.csv" "$TMP/test_labels.csv"
worker=("$TRAIN" --kvstore=dist_sync --network=mlp --batch_size=20 --lr=0.5
        --train_csv="$TMP/train.csv" --train_label_csv="$TMP/train_labels.csv"
        --test_csv="$TMP/test.csv" --test_label_csv="$TMP/test_labels.csv")

# 1. A job that succeeds.
out=$(timeout 120 python3 "$LAUNCH" -n 2 -s 2 --server-binary="$SERVER" -- "${worker[@]}" --epochs=3 2>&1)
rc=$?
[[ $rc -eq 0 ]] || fail "job exit code $rc"
for w in 0 1; do
  [[ "$out" == *"[worker $w] Final test accuracy=1"* ]] || fail "worker $w did not reach accuracy 1"
done
[[ "$out" == *"[server 1] server "*" serving on 127.0.0.1:"* ]] || fail "no server 1 log line"
[[ "$out" == *"all workers finished"* ]] || fail "launcher did not report the end"
echo "$out" | grep -q "worker 0 of 2 (dist_sync)" || fail "rank 0 missing"
echo "$out" | grep -q "worker 1 of 2 (dist_sync)" || fail "rank 1 missing"

# 2. dist_async converges too (at a smaller learning rate: every worker's
# gradient is applied on its own, against slightly stale weights).
async=("${worker[@]/--kvstore=dist_sync/--kvstore=dist_async}")
async=("${async[@]/--lr=0.5/--lr=0.1}")
out=$(timeout 120 python3 "$LAUNCH" -n 2 -s 1 --kvstore dist_async --server-binary="$SERVER" -- \
      "${async[@]}" --epochs=3 2>&1)
rc=$?
[[ $rc -eq 0 ]] || fail "dist_async job exit code $rc"
for w in 0 1; do
  [[ "$out" == *"[worker $w] Final test accuracy=1"* ]] || fail "dist_async worker $w did not reach accuracy 1"
done

# 3. A worker dies mid-job: fail fast, name it, clean up.
python3 "$LAUNCH" -n 2 -s 2 --server-binary="$SERVER" -- "${worker[@]}" --epochs=1000 \
  > "$TMP/killed.log" 2>&1 &
launcher=$!
for _ in $(seq 1 100); do grep -q "Epoch\[0\]" "$TMP/killed.log" && break; sleep 0.2; done
victim=$(pgrep -f -- "^[^ ]*mx_train .*--epochs=1000" | head -1)
start=$(date +%s)
[[ -n "$victim" ]] && kill -9 "$victim"
wait "$launcher"; rc=$?
elapsed=$(( $(date +%s) - start ))
[[ $rc -ne 0 ]] || fail "killed job exited 0"
(( elapsed <= 15 )) || fail "killed job took ${elapsed}s to stop"
grep -q "launch.py: worker [01] failed" "$TMP/killed.log" || { fail "launcher did not name the worker"; tail -5 "$TMP/killed.log"; }
sleep 0.5
# (Patterns that match the daemons and workers, not this script's own
# command line.)
if pgrep -f -- "--role=(server|coordinator)" > /dev/null || pgrep -f -- "^[^ ]*mx_train .*--epochs=1000" > /dev/null; then
  fail "processes left behind"
  pkill -9 -f -- "^[^ ]*mx_train .*--epochs=1000"; pkill -9 -f -- "--role=(server|coordinator)"
fi

echo "$failures failures"
exit $(( failures > 0 ))
