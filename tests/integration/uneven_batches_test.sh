#!/usr/bin/env bash
# Workers with different numbers of batches (dist_sync, 2 servers, 2
# workers): worker 0 runs 3 steps, worker 1 runs 4 (tests/integration/
# uneven_worker.cc). Worker 0 leaves the job when done; the servers learn
# it from the coordinator and complete worker 1's extra step without it
# (its value is worker 1's push alone) instead of waiting for a push that
# never comes. The job ends with exit code 0 within a bounded time, and
# nothing is left running. A barrier between uneven steps fails, saying
# why, within the RPC deadline.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"; UNEVEN="$4"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

log="$TMP/uneven.log"
start=$(now_ms)
start_job "$log" -n 2 -s 2 -- "$UNEVEN"
wait "$launcher"; rc=$?
elapsed=$(( $(now_ms) - start ))
echo "the job took ${elapsed} ms"
[[ $rc -eq 0 ]] || { fail "the job exited $rc"; tail -20 "$log"; }
# RPCs time out after 30 s: the extra step must complete well before.
(( elapsed <= 20000 )) || fail "the job took ${elapsed} ms"
for s in 1 2 3; do
  for w in 0 1; do
    grep -q "^\[worker $w\] step $s of $((3 + w)): small 3, big 3 3$" "$log" ||
      fail "worker $w step $s is not the sum of both workers' pushes"
  done
done
grep -q "^\[worker 1\] step 4 of 4: small 2, big 2 2$" "$log" ||
  { fail "worker 1's extra step is not its own push"; grep "step 4" "$log"; }
grep -q "uneven_worker:" "$log" && fail "a worker failed: $(grep uneven_worker: "$log")"
grep -q "^launch.py: the coordinator and 2 server(s) shut down cleanly$" "$log" ||
  fail "the daemons did not shut down cleanly"
assert_nothing_left "$log"

# A barrier that one worker enters while another still has a step to push
# cannot be passed: the step waits for the first worker's push, the
# barrier for the second worker. Both fail at their RPC deadline (here 4 s)
# saying so, instead of hanging: the barrier names the worker that did not
# arrive, and the step the worker whose push it waits for.
log="$TMP/barrier.log"
start=$(now_ms)
UNEVEN_BARRIER=1 MX_RPC_TIMEOUT_S=4 start_job "$log" -n 2 -s 2 -- "$UNEVEN"
wait "$launcher"; rc=$?
elapsed=$(( $(now_ms) - start ))
echo "the job with a barrier failed after ${elapsed} ms"
[[ $rc -ne 0 ]] || fail "the job with a barrier exited 0"
(( elapsed <= 20000 )) || fail "the job with a barrier took ${elapsed} ms to fail"
grep -q "^\[worker 0\] uneven_worker: barrier: barrier 0: worker(s) 1 did not arrive in time$" "$log" ||
  { fail "worker 0 did not say that worker 1 missed the barrier"; grep "uneven_worker:" "$log"; }
grep -qE "^\[worker 1\] uneven_worker: pushpull of key [01] .*waiting for pushes from worker\(s\) 0\)$" "$log" ||
  { fail "worker 1 did not say whose push its step waits for"; grep "uneven_worker:" "$log"; }
assert_nothing_left "$log"
finish
