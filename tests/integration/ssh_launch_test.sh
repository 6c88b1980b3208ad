#!/usr/bin/env bash
# deploy/launch.py on "other hosts" (-H): a hostfile of 127.0.0.1 and
# 127.0.0.2 (both loopback) and a stand-in for ssh that runs each command
# here in a clean environment. The job must train as on one host, with the
# coordinator on the first host, servers and workers round-robin, servers
# advertising their host, and the job's variables passed on the command
# line.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"
FAKE_SSH="$(cd "$(dirname "$0")" && pwd)/fake_ssh.sh"
export FAKE_SSH_LOG="$TMP/ssh.log"
: > "$FAKE_SSH_LOG"
printf '# test hosts\n127.0.0.1\n\nroot@127.0.0.2  # a user is allowed\n' > "$TMP/hosts"
port=$(free_port)

log="$TMP/job.log"
JOB_LOGS+=("$log")
timeout -k 5 120 python3 "$LAUNCH" -n 2 -s 2 -H "$TMP/hosts" --ssh="$FAKE_SSH" --port="$port" \
  --server-binary="$SERVER" -- "${worker[@]}" --epochs=2 > "$log" 2>&1
rc=$?
[[ $rc -eq 0 ]] || fail "job exit code $rc"
for w in 0 1; do
  grep -qE "^\[worker $w on [0-9.@a-z]+\] Final test accuracy=1" "$log" || fail "worker $w did not finish"
done
# Placement: coordinator on the first host, then round-robin.
grep -qP "^127\.0\.0\.1\t.*--role=coordinator --bind=0\.0\.0\.0:$port" "$FAKE_SSH_LOG" || fail "coordinator not on the first host"
[[ $(grep -cP "^root@127\.0\.0\.2\t.*--role=server" "$FAKE_SSH_LOG") -eq 1 ]] || fail "no server on the second host"
[[ $(grep -cP "^root@127\.0\.0\.2\t.*mx_train" "$FAKE_SSH_LOG") -eq 1 ]] || fail "no worker on the second host"
grep -qP "\t.*--advertise=127\.0\.0\.2( |$)" "$FAKE_SSH_LOG" || fail "the second host's server does not advertise it"
grep -qE "server [01] serving on 127\.0\.0\.2:[0-9]+" "$log" || fail "no server serving on 127.0.0.2"
# The variables travel on the command line (the fake ssh clears the rest).
grep -qP "^127\.0\.0\.1\t.*MX_COORDINATOR=127\.0\.0\.1:$port .*mx_train" "$FAKE_SSH_LOG" || fail "MX_COORDINATOR not passed"
grep -qP "\t.*DMLC_ROLE=worker" "$FAKE_SSH_LOG" || fail "DMLC_ROLE not passed"
grep -q "^launch.py: the coordinator and 2 server(s) shut down cleanly$" "$log" || fail "daemons did not shut down cleanly"
sleep 0.5
left=$(live_job_pids "$log")
[[ -z "$left" ]] || { fail "processes left behind: $left"; kill -9 $left; }
(( failures == 0 )) || { tail -30 "$log"; cat "$FAKE_SSH_LOG"; }
finish
