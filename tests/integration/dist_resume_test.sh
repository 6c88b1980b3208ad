#!/usr/bin/env bash
# Checkpoint and resume of a dist_sync job (2 servers, 2 workers, SGD with
# momentum, whose state lives on the servers): a job crashes (a worker is
# killed) after writing the checkpoint of epoch 2; a new job resumes from
# it. Its epoch-3 checkpoint must equal, byte for byte, the one of a job
# that ran 3 epochs without a crash: the weights, and the servers' optimizer
# state (momentum and update counts), because the shuffling order, the
# optimizer state and the rank-order sums all continue where they were.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

train=("${worker[@]}" --lr=0.1 --momentum=0.9)

# The uninterrupted job.
log="$TMP/whole.log"
start_job "$log" -n 2 -s 2 -- "${train[@]}" --epochs=3 --checkpoint_prefix="$TMP/whole"
wait "$launcher" || fail "the uninterrupted job failed: $(tail -3 "$log")"
grep -q "^\[worker 0\] Final test accuracy=1$" "$log" || fail "the uninterrupted job did not learn"
assert_nothing_left "$log"

# The job that crashes: it would train for long; worker 1 is killed once
# epoch 2's checkpoint (weights, then the servers' states) is written.
log="$TMP/crash.log"
start_job "$log" -n 2 -s 2 -- "${train[@]}" --epochs=100000 --checkpoint_prefix="$TMP/crash"
for _ in $(seq 600); do [[ -s "$TMP/crash-0002.states" ]] && break; sleep 0.1; done
[[ -s "$TMP/crash-0002.states" ]] || fail "the job wrote no checkpoint of epoch 2"
victim=$(started_pid "$log" "worker 1")
[[ -n "$victim" ]] && kill -9 "$victim"
wait "$launcher" && fail "the job whose worker was killed exited 0"
assert_nothing_left "$log"

# The resumed job: epoch 3 only.
log="$TMP/resumed.log"
start_job "$log" -n 2 -s 2 -- "${train[@]}" --epochs=3 --checkpoint_prefix="$TMP/crash" --resume_epoch=2
wait "$launcher" || fail "the resumed job failed: $(tail -3 "$log")"
grep -q "^\[worker 0\] Epoch\[2\]" "$log" || fail "the resumed job did not train epoch 2"
grep -q "^\[worker 0\] Epoch\[1\]" "$log" && fail "the resumed job trained epoch 1 again"
assert_nothing_left "$log"
for f in 0003.params 0003.states; do
  cmp -s "$TMP/whole-$f" "$TMP/crash-$f" || fail "the resumed job's $f differs from the uninterrupted job's"
done
finish
