#!/usr/bin/env bash
# Workers with different numbers of batches (dist_sync, 2 servers, 2
# workers): worker 0 runs 3 steps, worker 1 runs 4 (tests/integration/
# uneven_worker.cc). Worker 0 leaves the job when done; the servers learn
# it from the coordinator and complete worker 1's extra step without it
# (its value is worker 1's push alone) instead of waiting for a push that
# never comes. The job ends with exit code 0 within a bounded time, and
# nothing is left running.
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
finish
