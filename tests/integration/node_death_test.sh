#!/usr/bin/env bash
# A node is killed (kill -9) or hangs (SIGSTOP) while a dist_sync job of 2 servers and 2
# workers trains: a parameter server, with and without --elastic, and the
# coordinator with --elastic and no restart (elastic tolerates dead workers
# only; a restarted coordinator is the last case). Each
# time the whole job must stop within 15 s of the kill with a non-zero exit
# code, the launcher must name the dead daemon, every worker must fail on
# its own (not be stopped by the launcher) with an error that names it, and
# nothing may be left running.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

# kill_daemon_during_job CASE VICTIM [LAUNCH FLAGS...]: VICTIM is the
# launcher's name of the process to kill ("server 1", "coordinator"). Sets
# $log; checks timing, exit code, cleanup and the launcher's message.
kill_daemon_during_job() {
  local case=$1 victim_name=$2; shift 2
  log="$TMP/$case.log"
  start_job "$log" -n 2 -s 2 "$@" -- "${worker[@]}" --epochs=1000
  wait_for_line "$log" '^\[worker [01]\] Epoch\[0\]' 60 || fail "$case: no epoch finished"
  local victim start rc elapsed
  victim=$(started_pid "$log" "$victim_name")
  start=$(now_ms)
  [[ -n "$victim" ]] && kill -9 "$victim"
  wait "$launcher"; rc=$?
  elapsed=$(( $(now_ms) - start ))
  [[ $rc -ne 0 && $rc -ne 124 ]] || fail "$case: the job exited $rc"
  echo "$case: the job stopped ${elapsed} ms after the kill (exit code $rc)"
  (( elapsed <= 15000 )) || fail "$case: the job took ${elapsed} ms to stop"
  grep -qE "^launch.py: $victim_name \((rank ${victim_name#* } at 127\.0\.0\.1:[0-9]+, )?pid $victim\) failed: killed by signal 9 \(SIGKILL\); stopping the job$" "$log" ||
    { fail "$case: the launcher did not name $victim_name"; grep "^launch.py" "$log"; }
  sleep 0.5
  assert_nothing_left "$log"
}

# every_worker_failed_naming CASE TEXT: each worker ended with an error
# (mx_train: ...) and at least one error contains TEXT.
every_worker_failed_naming() {
  local case=$1 text=$2 w
  for w in 0 1; do
    grep -q "^\[worker $w\] mx_train: " "$log" || fail "$case: worker $w did not fail on its own"
  done
  grep -E "^\[worker [01]\] mx_train: " "$log" | grep -qF -- "$text" ||
    { fail "$case: no worker error names '$text'"; grep "mx_train:" "$log"; }
}

# How a worker's error names the server that the launcher labels $1, with
# the address it registered: "server 0 (127.0.0.1:4711)". The label is the
# rank.
server_as_named() {
  local rank=${1#server }
  sed -n "s/^\[$1\] server $rank serving on \(127\.0\.0\.1:[0-9]*\).*/server $rank (\1)/p" "$log" | head -1
}

kill_daemon_during_job server_sync "server 1"
named=$(server_as_named "server 1")
[[ -n "$named" ]] || fail "server_sync: server 1 never served"
every_worker_failed_naming server_sync "$named"

kill_daemon_during_job server_elastic "server 0" --elastic
named=$(server_as_named "server 0")
[[ -n "$named" ]] || fail "server_elastic: server 0 never served"
every_worker_failed_naming server_elastic "$named"

# Without a restart (--coordinator-restarts=0) the coordinator's death ends
# the job: the nodes give it up after MX_COORDINATOR_TIMEOUT_S (6 s).
kill_daemon_during_job coordinator_elastic coordinator --elastic --coordinator-restarts=0
coordinator=$(sed -n 's/.*coordinator listening on \(127\.0\.0\.1:[0-9]*\).*/\1/p' "$log" | head -1)
every_worker_failed_naming coordinator_elastic "the coordinator at $coordinator is unreachable"

# With the default (one restart) the launcher starts it again on its
# address, every node rejoins it, training goes on, and the job ends as an
# undisturbed one does: exit code 0 and the same parameters (checksum).
log="$TMP/coordinator_undisturbed.log"
start_job "$log" -n 2 -s 2 -- "${worker[@]}" --epochs=80
wait "$launcher" || fail "coordinator_restarted: the undisturbed job failed"
undisturbed=$(grep -E '^\[worker [01]\] Final params checksum=' "$log" | sort)

# coordinator_fault CASE SIGNAL SAID AFTER DELAY WORKER...: the coordinator
# gets SIGNAL (KILL, STOP) DELAY seconds after the job's log has a line
# matching AFTER; the
# launcher must say SAID (a regex after "launch.py: coordinator (pid N) ")
# and restart it, and the job (workers running WORKER...) end as the
# undisturbed one. Sets $log.
coordinator_fault() {
  local case=$1 signal=$2 said=$3 after=$4 delay=$5 victim rc restarted
  shift 5
  log="$TMP/$case.log"
  start_job "$log" -n 2 -s 2 -- "$@" --epochs=80
  wait_for_line "$log" "$after" 60 || fail "$case: no line '$after'"
  sleep "$delay"
  victim=$(started_pid "$log" coordinator)
  [[ -n "$victim" ]] && kill "-$signal" "$victim"
  wait "$launcher"; rc=$?
  [[ $rc -eq 0 ]] || fail "$case: the job exited $rc"
  grep -qE "^launch.py: coordinator \(pid $victim\) $said; restarting it on its address" "$log" ||
    { fail "$case: the launcher did not say it restarted the coordinator"; grep "^launch.py" "$log"; }
  restarted=$(grep -E '^\[worker [01]\] Final params checksum=' "$log" | sort)
  [[ -n "$undisturbed" && "$restarted" == "$undisturbed" ]] ||
    fail "$case: parameters differ from the undisturbed run: '$restarted' vs '$undisturbed'"
  sleep 0.5
  assert_nothing_left "$log"
}

# every_node_rejoined CASE: each server and worker rejoined the restarted
# coordinator.
every_node_rejoined() {
  local node
  for node in "server 0" "server 1" "worker 0" "worker 1"; do
    grep -qE "^\[$node\] .*: rejoined the coordinator at 127\.0\.0\.1:[0-9]+ \(it had restarted\)" "$log" ||
      fail "$1: $node did not rejoin"
  done
}

killed='died: killed by signal 9 \(SIGKILL\)'
hung='stopped answering: [0-9] of the nodes \((server|worker) [01](, (server|worker) [01])*\) heard nothing from it though it runs; killing it'
coordinator_fault coordinator_restarted KILL "$killed" '^\[worker [01]\] Epoch\[1\]' 0 "${worker[@]}"
every_node_rejoined coordinator_restarted
# A hung one (found by tests/chaos: it ended the job) keeps its port open,
# so the nodes' heartbeats time out instead of failing: they say so, and
# the launcher kills it and starts it again before they give it up.
coordinator_fault coordinator_hung STOP "$hung" '^\[worker [01]\] Epoch\[1\]' 0 "${worker[@]}"
every_node_rejoined coordinator_hung

# The same while the job forms: the workers start 3 s late, and the
# coordinator dies or hangs while it holds the servers' registrations.
# Before, a server whose registration call broke that way gave up at once
# ("Connection reset by peer", or even "speaks TLS": the dying coordinator
# closed the connection without a word), and a hung one was given up at the
# startup timeout. Now they register again with the restarted one.
printf '#!/bin/sh\nsleep 3\nexec "$@"\n' > "$TMP/late.sh"
chmod +x "$TMP/late.sh"
coordinator_fault coordinator_killed_while_forming KILL "$killed" \
  '^\[coordinator\] coordinator listening' 1 "$TMP/late.sh" "${worker[@]}"
coordinator_fault coordinator_hung_while_forming STOP "$hung" \
  '^\[coordinator\] coordinator listening' 1 "$TMP/late.sh" "${worker[@]}"
grep -qE "^\[server [01]\] server [01]: the coordinator at 127\.0\.0\.1:[0-9]+ has not answered for [0-9]+s \(hung\?\); registration waits" "$log" ||
  fail "coordinator_hung_while_forming: no server said the coordinator did not answer"

# A coordinator killed before it says where it listens (found by
# tests/chaos: a kill -9 0.03 s after its start ended the job) is started
# again as well, once: no node knew its address yet, so it may take
# another port. Its first start here kills itself at once.
printf '#!/bin/sh\ncase "$*" in *--role=coordinator*)\n  [ -e "%s" ] || { touch "%s"; kill -9 $$; } ;;\nesac\nexec "%s" "$@"\n' \
  "$TMP/killed_once" "$TMP/killed_once" "$SERVER" > "$TMP/killed_first.sh"
chmod +x "$TMP/killed_first.sh"
log="$TMP/coordinator_killed_before_listening.log"
start_job "$log" -n 2 -s 2 --server-binary="$TMP/killed_first.sh" -- "${worker[@]}" --epochs=80
wait "$launcher"; rc=$?
[[ $rc -eq 0 ]] || { fail "coordinator_killed_before_listening: the job exited $rc"; grep "^launch.py" "$log"; }
grep -qE "^launch.py: coordinator \(pid [0-9]+\) died before it listened: killed by signal 9 \(SIGKILL\); restarting it" "$log" ||
  fail "coordinator_killed_before_listening: the launcher did not say it restarted the coordinator"
restarted=$(grep -E '^\[worker [01]\] Final params checksum=' "$log" | sort)
[[ -n "$undisturbed" && "$restarted" == "$undisturbed" ]] ||
  fail "coordinator_killed_before_listening: parameters differ: '$restarted' vs '$undisturbed'"
sleep 0.5
assert_nothing_left "$log"
# With no restarts allowed it ends the job at once, naming it.
rm -f "$TMP/killed_once"
log="$TMP/coordinator_killed_before_listening_no_restart.log"
start_job "$log" -n 2 -s 2 --coordinator-restarts=0 --server-binary="$TMP/killed_first.sh" -- "${worker[@]}" --epochs=80
wait "$launcher"; rc=$?
[[ $rc -ne 0 ]] || fail "coordinator_killed_before_listening_no_restart: the job exited 0"
grep -qE "^launch.py: coordinator \(pid [0-9]+\) failed: killed by signal 9 \(SIGKILL\); stopping the job" "$log" ||
  { fail "coordinator_killed_before_listening_no_restart: the launcher did not name the coordinator"; grep "^launch.py" "$log"; }
grep -q "^launch.py: started \(server\|worker\)" "$log" &&
  fail "coordinator_killed_before_listening_no_restart: nodes started without a coordinator"
left=$(live_job_pids "$log")
[[ -z "$left" ]] || fail "coordinator_killed_before_listening_no_restart: processes left behind: $(echo $left)"

# A coordinator killed once every worker has left the job, before it told
# the servers (found by tests/chaos: the job ran, yet the launcher said "the
# job failed: coordinator killed by signal 9"). The worker kills it the
# moment it exits 0; the servers have to be stopped, and the job exits 0.
printf '#!/bin/sh
case "$*" in *--role=coordinator*) echo $$ > "%s" ;; esac
exec "%s" "$@"
' \
  "$TMP/coordinator.pid" "$SERVER" > "$TMP/pid_noted.sh"
printf '#!/bin/sh
"$@" || exit $?
kill -9 "$(cat "%s")"
' "$TMP/coordinator.pid" > "$TMP/kills_coordinator.sh"
chmod +x "$TMP/pid_noted.sh" "$TMP/kills_coordinator.sh"
log="$TMP/coordinator_killed_after_workers_left.log"
start_job "$log" -n 1 -s 2 --server-binary="$TMP/pid_noted.sh" -- "$TMP/kills_coordinator.sh" \
  "${worker[@]}" --epochs=2
wait "$launcher"; rc=$?
[[ $rc -eq 0 ]] || { fail "coordinator_killed_after_workers_left: the job exited $rc"; grep "^launch.py" "$log"; }
grep -q "^\[worker 0\] worker 0: left the job$" "$log" ||
  fail "coordinator_killed_after_workers_left: the worker did not say it left the job"
grep -qE "^launch.py: warning: coordinator \(pid [0-9]+\) did not shut down cleanly: killed by signal 9" "$log" ||
  fail "coordinator_killed_after_workers_left: the launcher did not say how the coordinator ended"
sleep 0.5
assert_nothing_left "$log"

# hang_during_job CASE VICTIM: VICTIM ("server 1", "worker 1") hangs
# (SIGSTOP) while the job trains. A hung node keeps its connections open,
# so no call to it fails on its own before the 30 s RPC deadline: the
# coordinator declares it dead, the others cancel their calls in flight
# and fail naming it, and the job stops within 15 s, the launcher's first
# word on it naming the hung node, not the worker that noticed.
hang_during_job() {
  local case=$1 victim_name=$2
  log="$TMP/$case.log"
  start_job "$log" -n 2 -s 2 -- "${worker[@]}" --epochs=1000
  wait_for_line "$log" '^\[worker [01]\] Epoch\[0\]' 60 || fail "$case: no epoch finished"
  local victim start rc elapsed
  victim=$(started_pid "$log" "$victim_name")
  start=$(now_ms)
  [[ -n "$victim" ]] && kill -STOP "$victim"
  wait "$launcher"; rc=$?
  elapsed=$(( $(now_ms) - start ))
  echo "$case: the job stopped ${elapsed} ms after the hang (exit code $rc)"
  [[ $rc -ne 0 && $rc -ne 124 ]] || fail "$case: the job exited $rc"
  (( elapsed <= 15000 )) || fail "$case: the job took ${elapsed} ms to stop"
  local first
  first=$(grep -E "^launch.py: .*(failed|stopped responding)" "$log" | head -1)
  [[ "$first" =~ ^launch.py:\ $victim_name\ \(.*pid\ $victim\)\ stopped\ responding:\ worker\ [01]\ reported\ it\ dead ]] ||
    fail "$case: the launcher blamed another node first: $first"
  sleep 0.5
  assert_nothing_left "$log"
}

hang_during_job server_hung "server 1"
named=$(server_as_named "server 1")
[[ -n "$named" ]] || fail "server_hung: server 1 never served"
# Declared dead by the coordinator ("server 1 (...) died: it stopped
# sending heartbeats"), or found by a worker whose keepalive pings went
# unanswered ("on server 1 (...): the connection stopped answering"),
# whichever comes first.
every_worker_failed_naming server_hung "$named"

hang_during_job worker_hung "worker 1"
grep -E "^\[worker 0\] mx_train: " "$log" | grep -q "worker(s) 1 died\|worker 1 died\|worker 1 (.*) died" ||
  { fail "worker_hung: worker 0 did not name worker 1"; grep "mx_train:" "$log"; }

# A server that hangs before it registers (found by tests/chaos): nobody
# can report it dead, since it never joined; the others wait for it up to
# the startup timeout (MX_STARTUP_TIMEOUT_S, 8 s here: 4 s was too short
# for the other worker to start on a loaded 2-core CI machine), and then
# the coordinator's answer names the rank that did not come, so the
# launcher blames it, not the node that gave up.
# hang_before_registering CASE VICTIM [LAUNCH FLAGS...]: VICTIM ("server 1")
# is stopped as soon as it starts; sets $log.
hang_before_registering() {
  local case=$1 victim_name=$2; shift 2
  log="$TMP/$case.log"
  local victim="" start elapsed rc first try stopped=0
  for try in 1 2 3; do
    MX_STARTUP_TIMEOUT_S=8 start_job "$log" "$@" -- "${worker[@]}" --epochs=1000
    for _ in $(seq 1 200); do
      victim=$(started_pid "$log" "$victim_name")
      [[ -n "$victim" ]] && break
      sleep 0.01
    done
    [[ -n "$victim" ]] && kill -STOP "$victim"
    start=$(now_ms)
    # The stop must land before the victim registers. On a loaded machine
    # it can come too late (CI saw it), and the job then forms, the other
    # servers saying "server N serving on": that is another case (a hang
    # after registering), so that job is stopped and this one run again.
    if ! wait_for_line "$log" '\[server [0-9]\] server [0-9] serving on' 3; then
      stopped=1
      break
    fi
    echo "$case: $victim_name registered before the stop landed (try $try); again"
    kill -CONT "$victim"
    kill "$launcher"
    wait "$launcher"
  done
  (( stopped )) || { fail "$case: $victim_name registered before the stop landed, 3 times"; return; }
  wait "$launcher"; rc=$?
  elapsed=$(( $(now_ms) - start ))
  echo "$case: the job stopped ${elapsed} ms after the hang (exit code $rc)"
  [[ $rc -ne 0 && $rc -ne 124 ]] || fail "$case: the job exited $rc"
  (( elapsed <= 15000 )) || fail "$case: the job took ${elapsed} ms to stop"
  first=$(grep -E "^launch.py: .*(failed|stopped responding|died)" "$log" | head -1)
  [[ "$first" =~ ^launch.py:\ $victim_name\ \(.*pid\ $victim\)\ stopped\ responding ]] ||
    fail "$case: the launcher blamed another node first: $first"
  grep -qE "^\[worker [01]\] mx_train: .*register: $victim_name did not register in time" "$log" ||
    { fail "$case: no worker named $victim_name"; grep "mx_train:" "$log"; }
  sleep 0.5
  assert_nothing_left "$log"
}
hang_before_registering hung_before_registering "server 1" -n 2 -s 2
# With replicas 2 too: the servers that give up exit 1 before they served,
# which is no death for their keys' backups to absorb (the job never
# formed); the launcher said "its keys' backups take over" for each.
hang_before_registering hung_before_registering_replicas "server 2" -n 2 -s 3 --replicas=2
if grep -q "backups take over" "$log"; then
  fail "hung_before_registering_replicas: the launcher took a failed start for a failover: $(grep "backups take over" "$log")"
fi

finish
