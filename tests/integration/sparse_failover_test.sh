#!/usr/bin/env bash
# Row-sparse tables with replicas 2 (launch.py --replicas=2 --spare-servers=1):
# the click-through model in a job of 3 servers and 2 workers, each server
# holding a range of each table and a copy of its neighbour's. Server 1 is
# killed (kill -9) while the job trains: its ranges' backups take them
# over, the workers send again the table pushes of steps not yet answered,
# a spare takes its rank and the survivors send it whole ranges; then
# server 2, server 1's neighbour, is killed too. The job must finish (exit
# code 0) with a last checkpoint equal, byte for byte, to an undisturbed
# run's: the dense parameters, the servers' optimizer state and the tables.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"; GEN="$4"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

click_logs "$GEN" 4000 500
# Long enough that server 2 dies well before the end: the spare's copies
# take 0.6-1.7 s after server 1's death (heartbeats carry the news), and
# with 40 epochs (about 40 ms each) they came as late as epoch 31, so that
# the job sometimes ended before server 2's death was noticed.
epochs=100
ctr+=(--epochs=$epochs)
printf -v last '%04d' "$epochs"

log="$TMP/undisturbed.log"
start_job "$log" -n 2 -s 3 --replicas=2 -- "${ctr[@]}" --checkpoint_prefix="$TMP/undisturbed"
wait "$launcher" || fail "the undisturbed job failed: $(tail -3 "$log")"
assert_nothing_left "$log"

log="$TMP/failover.log"
start_job "$log" -n 2 -s 3 --replicas=2 --spare-servers=1 -- "${ctr[@]}" \
  --checkpoint_prefix="$TMP/failover"
wait_for_line "$log" '^\[worker [01]\] Epoch\[3\]' 60 || fail "no epoch finished"
kill -9 "$(started_pid "$log" "server 1")"
expect_spare_as_server_1 "$log" ranges
# Two copies of every range again (a pull waits for both) before the
# neighbour dies.
done_epochs=$(grep -cE '^\[worker 0\] Epoch\[[0-9]+\].*Time cost' "$log")
wait_for_line "$log" "^\\[worker 0\\] Epoch\\[$((done_epochs + 2))\\]" 60 || fail "training did not go on"
kill -9 "$(started_pid "$log" "server 2")"
wait "$launcher"; rc=$?
[[ $rc -eq 0 ]] ||
  { fail "the job exited $rc after servers 1 and 2 died"; grep -E "^launch|mx_train:|mx_server:" "$log"; }
grep -qE '^\[spare 0\] server 1: server 2 was declared dead; took over its [0-9]+ key\(s\)' "$log" ||
  { fail "the spare did not take server 2's ranges over"; grep -E "^launch|^\[spare 0\]|declared dead|took over" "$log"; }
grep -q "Epoch\[$((epochs - 1))\]" "$log" || fail "the job did not train all $epochs epochs"
for f in params states tables; do
  cmp -s "$TMP/undisturbed-$last.$f" "$TMP/failover-$last.$f" ||
    fail "after two servers' deaths the last checkpoint's .$f differs from the undisturbed run's"
done
sleep 0.5
assert_nothing_left "$log"
finish
