#!/usr/bin/env bash
# Checkpoint and resume of a dist_sync job (2 servers, 2 workers, SGD with
# momentum, whose state lives on the servers): a job crashes (a worker is
# killed) after writing the checkpoint of epoch 2; a new job resumes from
# it. Its epoch-3 checkpoint must equal, byte for byte, the one of a job
# that ran 3 epochs without a crash: the weights, and the servers' optimizer
# state (momentum and update counts), because the shuffling order, the
# optimizer state and the rank-order sums all continue where they were.
# The same with replicas 2 from a checkpoint written after a server died.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

train=("${worker[@]}" --lr=0.1 --momentum=0.9)

# The uninterrupted job.
log="$TMP/whole.log"
start_job "$log" -n 2 -s 2 -- "${train[@]}" --epochs=3 --checkpoint_prefix="$TMP/whole" \
  --metrics_log="$TMP/whole.csv"
wait "$launcher" || fail "the uninterrupted job failed: $(tail -3 "$log")"
grep -q "^\[worker 0\] Final test accuracy=1$" "$log" || fail "the uninterrupted job did not learn"
# One worker (the one that writes checkpoints) writes the metrics log: a
# header and a row per epoch (both workers wrote, two headers among them).
[[ "$(grep -c '^epoch,' "$TMP/whole.csv")" == 1 ]] || fail "metrics log headers: $(cat "$TMP/whole.csv")"
[[ "$(grep -c '^[0-9]' "$TMP/whole.csv")" == 3 ]] || fail "metrics log rows: $(cat "$TMP/whole.csv")"
assert_nothing_left "$log"

# The job that crashes: it would train for long; worker 1 is killed once
# epoch 2's checkpoint (the servers' states, then the weights: the .params
# file is the last written) is written.
log="$TMP/crash.log"
start_job "$log" -n 2 -s 2 -- "${train[@]}" --epochs=100000 --checkpoint_prefix="$TMP/crash"
for _ in $(seq 600); do [[ -s "$TMP/crash-0002.params" ]] && break; sleep 0.1; done
[[ -s "$TMP/crash-0002.params" ]] || fail "the job wrote no checkpoint of epoch 2"
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

# An elastic job resumed with a .states file it cannot load (saved by 2
# servers, loaded by 1): the worker that loads it fails, and so must the
# other, which met it at the barrier. Before, the elastic barrier went on
# without the dead loader, and worker 1 trained with a fresh optimizer.
log="$TMP/resumed_wrong_states.log"
start_job "$log" -n 2 -s 1 --elastic -- "${train[@]}" --epochs=3 --checkpoint_prefix="$TMP/crash" \
  --resume_epoch=2
wait "$launcher" && fail "the elastic job resumed with another job's .states exited 0"
grep -q "^\[worker 0\] mx_train: .*holds the state of 2 servers; this job has 1" "$log" ||
  fail "worker 0 did not say why it could not load the states: $(grep mx_train: "$log")"
grep -q "^\[worker 1\] mx_train: .*worker 0, which loaded .*crash-0002.states into the servers, died before it finished" "$log" ||
  fail "worker 1 did not fail for the states it never got: $(grep 'worker 1' "$log" | tail -3)"
assert_nothing_left "$log"

# With replicas 2 (3 servers) a checkpoint written after a server's death
# holds the same states (each key's, saved from the copy that holds it),
# and resuming from it continues exactly: server 1 is killed, a checkpoint
# written after the failover is resumed from in a new job, whose next
# checkpoint must equal that of a job that ran straight through.
replicas=(-n 2 -s 3 --replicas=2)
log="$TMP/failover.log"
start_job "$log" "${replicas[@]}" -- "${train[@]}" --epochs=100000 --checkpoint_prefix="$TMP/failover"
for _ in $(seq 600); do [[ -s "$TMP/failover-0001.params" ]] && break; sleep 0.1; done
kill -9 "$(started_pid "$log" "server 1")"
wait_for_line "$log" '^\[worker 0\] worker 0: server 1 .* was declared dead' 30 || fail "no failover"
# The first checkpoint begun after the failover, and one more: then stop.
saved=$(ls "$TMP"/failover-*.params | wc -l)
for _ in $(seq 600); do (( $(ls "$TMP"/failover-*.params | wc -l) >= saved + 2 )) && break; sleep 0.05; done
epoch=$(( saved + 1 ))
kill -9 "$(started_pid "$log" "worker 1")"
wait "$launcher"
assert_nothing_left "$log"
printf -v at '%04d' "$epoch"
printf -v next '%04d' $(( epoch + 1 ))
[[ -s "$TMP/failover-$at.params" ]] || fail "no checkpoint of epoch $epoch after the failover"
rm -f "$TMP/failover-$next".*
log="$TMP/failover_resumed.log"
start_job "$log" "${replicas[@]}" -- "${train[@]}" --epochs=$(( epoch + 1 )) \
  --checkpoint_prefix="$TMP/failover" --resume_epoch="$epoch"
wait "$launcher" || fail "the job resumed after the failover failed: $(tail -3 "$log")"
log="$TMP/straight.log"
start_job "$log" "${replicas[@]}" -- "${train[@]}" --epochs=$(( epoch + 1 )) --checkpoint_prefix="$TMP/straight"
wait "$launcher" || fail "the straight replicas job failed: $(tail -3 "$log")"
for f in "$next.params" "$next.states"; do
  cmp -s "$TMP/straight-$f" "$TMP/failover-$f" ||
    fail "resumed from epoch $epoch's checkpoint written after a failover: $f differs from a straight run's"
done
echo "replicas: resumed from epoch $epoch's checkpoint, written after server 1's death"
finish
