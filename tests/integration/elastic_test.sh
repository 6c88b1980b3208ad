#!/usr/bin/env bash
# An elastic dist_sync job (launch.py --elastic; 2 servers, 2 workers): a
# worker is killed (kill -9) after its first epoch. The launcher must say it
# died and keep going; the other worker must finish every epoch with test
# accuracy 1; the launcher then exits 0, the daemons shut down cleanly, all
# within a bounded time, and nothing is left running. Then worker 0, which
# writes the checkpoints, is killed: worker 1 takes that over.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

# Enough epochs (20-40 ms each) that the kill lands while both train.
epochs=50
log="$TMP/elastic.log"
start_job "$log" -n 2 -s 2 --elastic -- "${worker[@]}" --epochs=$epochs
wait_for_line "$log" '^\[worker 1\] Epoch\[0\]' 60 || fail "worker 1 never finished an epoch"
victim=$(started_pid "$log" "worker 1")
start=$(now_ms)
[[ -n "$victim" ]] && kill -9 "$victim"
wait "$launcher"; rc=$?
elapsed=$(( $(now_ms) - start ))
[[ $rc -eq 0 ]] || fail "elastic job exit code $rc"
# Detection takes a heartbeat timeout (5 s) and a few heartbeats; the rest
# of the training about a second.
echo "the job ended ${elapsed} ms after the kill"
(( elapsed <= 30000 )) || fail "the job took ${elapsed} ms after the kill"

grep -qE "^launch.py: worker 1 \(rank 1, pid $victim\) died: killed by signal 9 \(SIGKILL\); the job continues without it \(elastic\)$" "$log" ||
  { fail "the launcher did not say worker 1 died"; grep "^launch.py" "$log"; }
grep -q "^\[worker 0\] Epoch\[$((epochs - 1))\]" "$log" || fail "worker 0 did not train every epoch"
grep -q "^\[worker 0\] Final test accuracy=1$" "$log" || fail "worker 0 did not reach test accuracy 1"
grep -q "^\[worker 1\] Final test" "$log" && fail "worker 1 finished although it was killed"
grep -q "mx_train:" "$log" && fail "a worker failed: $(grep mx_train: "$log")"
grep -q "^launch.py: 1 of 2 workers finished; the job went on without worker 1 " "$log" ||
  fail "the launcher's summary does not name worker 1"
grep -q "^launch.py: the coordinator and 2 server(s) shut down cleanly$" "$log" ||
  fail "the daemons did not shut down cleanly"
sleep 0.5
assert_nothing_left "$log"

# Worker 0, which writes the checkpoints, dies: worker 1 writes them from
# then on, down to the last epoch's.
epochs=60
log="$TMP/elastic0.log"
start_job "$log" -n 2 -s 2 --elastic -- "${worker[@]}" --epochs=$epochs --checkpoint_prefix="$TMP/e"
wait_for_line "$log" '^\[worker 0\] Epoch\[0\]' 60 || fail "worker 0 never finished an epoch"
victim=$(started_pid "$log" "worker 0")
[[ -n "$victim" ]] && kill -9 "$victim"
wait "$launcher" || fail "the elastic job without worker 0 exited $?"
grep -q "^\[worker 0\] Epoch\[$((epochs - 1))\]" "$log" && fail "worker 0 trained every epoch before it was killed"
grep -q "^\[worker 1\] Final test accuracy=1$" "$log" || fail "worker 1 did not finish"
last=$(printf "%s/e-%04d" "$TMP" "$epochs")
[[ -s "$last.params" && -s "$last.states" ]] || fail "no checkpoint of the last epoch ($last.params, .states)"
assert_nothing_left "$log"

# Worker 0's checkpoint of epoch 2 cannot be written (its .states path is
# a directory): worker 0 fails, and worker 1 writes the later ones. Before,
# worker 0 left the job as if it had finished, nobody took its place, no
# later checkpoint was written, and the job still exited 0.
epochs=6
mkdir -p "$TMP/c-0002.states"
log="$TMP/elastic_checkpoint.log"
start_job "$log" -n 2 -s 2 --elastic -- "${worker[@]}" --epochs=$epochs --checkpoint_prefix="$TMP/c"
wait "$launcher" || fail "the elastic job whose worker 0 could not checkpoint exited $?"
grep -q "^\[worker 0\] mx_train: .*c-0002.states" "$log" ||
  fail "worker 0 did not fail naming the checkpoint it could not write"
[[ -e "$TMP/c-0002.params" ]] && fail "epoch 2's .params was written without its .states"
last=$(printf "%s/c-%04d" "$TMP" "$epochs")
[[ -s "$last.params" && -s "$last.states" ]] ||
  { fail "no checkpoint after worker 0's failed one ($last.params, .states)"; grep "^launch.py" "$log"; }
assert_nothing_left "$log"

finish
