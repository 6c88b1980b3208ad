#!/usr/bin/env bash
# A distributed job on 127.0.0.1 through deploy/launch.py: a coordinator, 2
# parameter servers and 2 workers training on small CSV data (dist_sync),
# whose daemons shut down cleanly at the end; a dist_async job; then a job
# whose worker is killed: the launcher must stop everything within the
# deadline, say which process failed, and leave nothing behind.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

# 1. A job that succeeds; then the servers and the coordinator shut down
# cleanly (the launcher SIGTERMs them; each logs it and exits 0).
out=$(timeout -k 5 120 python3 "$LAUNCH" -n 2 -s 2 --server-binary="$SERVER" -- "${worker[@]}" --epochs=3 2>&1)
rc=$?
echo "$out" > "$TMP/ok.log"
JOB_LOGS+=("$TMP/ok.log")
[[ $rc -eq 0 ]] || fail "job exit code $rc"
for w in 0 1; do
  [[ "$out" == *"[worker $w] Final test accuracy=1"* ]] || fail "worker $w did not reach accuracy 1"
done
[[ "$out" == *"launch.py: all workers finished"* ]] || fail "launcher did not report the end"
# Each process's label is its rank.
for r in 0 1; do
  echo "$out" | grep -q "^\[server $r\] server $r serving on 127.0.0.1:" || fail "[server $r] is not server $r"
  echo "$out" | grep -q "^\[worker $r\] worker $r of 2 (dist_sync)" || fail "[worker $r] is not worker $r"
done
# The workers leave the job; the daemons shut down on their own.
echo "$out" | grep -q "^\[coordinator\] coordinator: every worker finished; shutting down$" || fail "coordinator did not shut down on its own"
for s in 0 1; do
  echo "$out" | grep -qE "^\[server $s\] server $s: every worker finished; shutting down$" || fail "server $s did not shut down on its own"
done
echo "$out" | grep -q "^launch.py: stopping" && fail "the launcher had to stop a daemon"
echo "$out" | grep -q "^launch.py: the coordinator and 2 server(s) shut down cleanly$" || fail "daemons did not exit 0"
echo "$out" | grep -q "warning" && fail "launcher warned: $(echo "$out" | grep warning)"
echo "$out" | grep -q "mx_server:" && fail "a daemon logged an error: $(echo "$out" | grep mx_server:)"
assert_nothing_left "$TMP/ok.log"

# 2. dist_async converges too (at a smaller learning rate: every worker's
# gradient is applied on its own, against slightly stale weights).
async=("${worker[@]/--kvstore=dist_sync/--kvstore=dist_async}")
async=("${async[@]/--lr=0.5/--lr=0.1}")
# It also writes a log file per process (--log-dir), every line stamped
# with the time (--timestamps), as on the console.
out=$(timeout -k 5 120 python3 "$LAUNCH" -n 2 -s 1 --kvstore dist_async --server-binary="$SERVER" \
      --log-dir "$TMP/logs" --timestamps -- "${async[@]}" --epochs=3 2>&1)
rc=$?
echo "$out" > "$TMP/async.log"
JOB_LOGS+=("$TMP/async.log")
[[ $rc -eq 0 ]] || fail "dist_async job exit code $rc"
stamp='[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z'
for w in 0 1; do
  [[ "$out" == *"[worker $w] Final test accuracy=1"* ]] || fail "dist_async worker $w did not reach accuracy 1"
  grep -qE "^$stamp Final test accuracy=1" "$TMP/logs/worker-$w.log" ||
    fail "worker-$w.log lacks its stamped final line: $(tail -2 "$TMP/logs/worker-$w.log")"
done
for f in coordinator server-0; do
  [[ -s "$TMP/logs/$f.log" ]] || fail "--log-dir wrote no $f.log"
done
grep -qE "^$stamp \[worker 0\] Epoch\[0\]" "$TMP/async.log" || fail "console lines are not stamped"
grep -qE "^$stamp launch.py: all workers finished" "$TMP/async.log" || fail "launcher lines are not stamped"
assert_nothing_left "$TMP/async.log"


# 2b. Bounded staleness: every node gets the same S (the servers refuse a
# worker's store with another), and the job trains as dist_sync does.
out=$(timeout -k 5 120 python3 "$LAUNCH" -n 2 -s 2 --staleness 2 --server-binary="$SERVER" \
      -- "${worker[@]}" --epochs=3 2>&1)
rc=$?
echo "$out" > "$TMP/staleness.log"
JOB_LOGS+=("$TMP/staleness.log")
[[ $rc -eq 0 ]] || fail "--staleness 2 job exit code $rc"
for s in 0 1; do
  echo "$out" | grep -q "^\[server $s\] server $s serving on 127.0.0.1:[0-9]* (staleness 2)" ||
    fail "server $s does not say it allows staleness 2"
done
for w in 0 1; do
  [[ "$out" == *"[worker $w] Final test accuracy=1"* ]] || fail "--staleness 2: worker $w did not reach accuracy 1"
done
# 2c. A server killed before it served (here: while the workers have not
# started yet) held nothing: the launcher starts it again, once, and the
# job runs as if nothing happened.
# Each worker gets its share of the cores (2 workers here) for its CPU pool.
log="$TMP/server_restart.log"
late_worker=(bash -c 'echo "cpu threads: $OMP_NUM_THREADS $OPENBLAS_NUM_THREADS"; sleep 3; exec "$@"'
             late "${worker[@]}" --epochs=3)
start_job "$log" -n 2 -s 2 -- "${late_worker[@]}"
wait_for_line "$log" 'launch\.py: started server 1 \(pid [0-9]+\)' 10 || fail "server 1 did not start"
kill -9 "$(started_pid "$log" "server 1")"
wait "$launcher"; rc=$?
[[ $rc -eq 0 ]] || fail "the job whose server 1 was killed before serving exited $rc"
grep -qE '^launch\.py: server 1 \(pid [0-9]+\) died before it served: killed by signal 9 \(SIGKILL\); starting it again' "$log" ||
  fail "the launcher did not say it restarted server 1"
[[ $(grep -cE '^\[server 1\] server 1 serving on' "$log") -eq 1 ]] || fail "server 1 did not serve once"
share=$(( $(nproc) / 2 )); (( share >= 1 )) || share=1
for w in 0 1; do
  grep -qx "\[worker $w\] cpu threads: $share $share" "$log" ||
    fail "worker $w's threads are not its share ($share): $(grep "\[worker $w\] cpu threads" "$log")"
done
for w in 0 1; do
  grep -q "^\[worker $w\] Final test accuracy=1" "$log" || fail "worker $w did not finish after server 1's restart"
done

# 3. A worker dies mid-job: fail fast, name it, the other worker says why it
# stopped, clean up.
log="$TMP/killed.log"
start_job "$log" -n 2 -s 2 -- "${worker[@]}" --epochs=1000
wait_for_line "$log" '^\[worker 1\] Epoch\[0\]' 60 || fail "worker 1 never finished an epoch"
victim=$(started_pid "$log" "worker 1")
start=$(now_ms)
[[ -n "$victim" ]] && kill -9 "$victim"
wait "$launcher"; rc=$?
elapsed=$(( $(now_ms) - start ))
[[ $rc -ne 0 && $rc -ne 124 ]] || fail "killed job exited $rc"
echo "killed-worker job stopped ${elapsed} ms after the kill (exit code $rc)"
(( elapsed <= 15000 )) || fail "killed job took ${elapsed} ms to stop"
grep -qE "^launch.py: worker 1 \(rank 1, pid $victim\) failed: killed by signal 9 \(SIGKILL\)" "$log" ||
  { fail "launcher did not name the worker"; tail -5 "$log"; }
grep -qE "^\[worker 0\] mx_train: .*worker(\(s\))? 1 died" "$log" ||
  { fail "the other worker did not say worker 1 died"; grep "mx_train:" "$log"; }
sleep 0.5
assert_nothing_left "$log"

# 4. A server asking for a rank that is not one exits 2 saying so, before
# it listens or registers.
out=$(timeout 10 "$SERVER" --role=server --coordinator=127.0.0.1:1 --num_workers=1 --rank=first 2>&1)
rc=$?
[[ $rc -eq 2 ]] || fail "--rank=first exited $rc"
[[ "$out" == *"--rank=first: must be a whole number from 0"* ]] || fail "--rank=first said: $out"

# 4b. A worker command that would train each worker alone is refused
# before anything starts (the job would otherwise report success).
local_worker=("${worker[@]/--kvstore=dist_sync/--kvstore=local}")
out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 1 --server-binary="$SERVER" -- "${local_worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"the worker command's --kvstore=local is not the job's --kvstore dist_sync (each worker would train alone)"* ]] ||
  fail "a local worker command: exit code $rc, said: $out"
# absl's one-dash spelling is the same flag (it was let through).
out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 1 --server-binary="$SERVER" -- "${local_worker[@]/--kvstore=/-kvstore=}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"the worker command's --kvstore=local is not the job's --kvstore dist_sync"* ]] ||
  fail "a local worker command with -kvstore=local: exit code $rc, said: $out"
# Workers that exit 0 without ever joining the job (`true`; an mx_train
# with --kvstore=local inside a wrapper script): the coordinator and the
# server wait for them until the launcher stops them; the job never ran,
# and the launcher says so and exits 1 (it said "all workers finished"
# and exited 0).
log="$TMP/never_ran.log"
start_job "$log" -n 2 -s 1 -- true
wait "$launcher"; rc=$?
[[ $rc -eq 1 ]] || fail "workers that never joined the job: launcher exited $rc, not 1"
grep -q "^launch.py: the workers exited but the job never ran: the coordinator had not seen every worker finish" "$log" ||
  fail "workers that never joined the job: the launcher did not say the job never ran: $(tail -5 "$log")"
assert_nothing_left "$log"

out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 1 --port 70000 --server-binary="$SERVER" -- "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--port 70000: not a port"* ]] || fail "--port 70000: exit code $rc, said: $out"
out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 2 --spare-servers 1 --server-binary="$SERVER" -- "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--spare-servers 1: must be 0 or more, and needs --replicas 2"* ]] ||
  fail "--spare-servers without replicas: exit code $rc, said: $out"
out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 1 --kvstore dist_async --staleness 2 --server-binary="$SERVER" -- "${async[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--staleness 2: must be 0 or more, and applies to dist_sync only"* ]] ||
  fail "--staleness with dist_async: exit code $rc, said: $out"
# More staleness than the servers and workers take (1000), and a --trace
# directory that cannot be had, are refused before anything starts (the
# nodes refused it after starting; the launcher made the trace directory
# only then, and printed a traceback).
out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 1 --staleness 1001 --server-binary="$SERVER" -- "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--staleness 1001: at most 1000 (the servers and the workers refuse more)"* ]] ||
  fail "--staleness 1001: exit code $rc, said: $out"
: > "$TMP/trace_is_a_file"
trace_cases=("$TMP/trace_is_a_file:File exists" "$TMP/trace_is_a_file/sub:Not a directory")
if [[ $(id -u) -ne 0 ]]; then  # root writes anywhere
  mkdir -p "$TMP/read_only" && chmod 555 "$TMP/read_only"
  trace_cases+=("$TMP/read_only:Permission denied")
fi
for case in "${trace_cases[@]}"; do
  dir=${case%%:*}; why=${case#*:}
  out=$(timeout 20 python3 "$LAUNCH" -n 1 -s 1 --trace "$dir" --server-binary="$SERVER" -- "${worker[@]}" 2>&1)
  rc=$?
  [[ $rc -eq 2 && "$out" == *"--trace $dir: $why"* && "$out" != *"launch.py: started"* ]] ||
    fail "--trace $dir: exit code $rc, said: $out"
done

# 4c. dist_device_sync: the servers run dist_sync; where no GPU is usable
# the workers say so and the job ends at once, leaving nothing behind.
device_worker=("${worker[@]/--kvstore=dist_sync/--kvstore=dist_device_sync}")
out=$(timeout -k 5 60 python3 "$LAUNCH" -n 2 -s 1 --kvstore dist_device_sync --server-binary="$SERVER" -- "${device_worker[@]}" --epochs=1 2>&1)
rc=$?
echo "$out" > "$TMP/device_sync.log"
JOB_LOGS+=("$TMP/device_sync.log")
if [[ "$out" == *"no usable GPU"* || "$out" == *"no GPU support"* ]]; then
  [[ $rc -eq 1 && "$out" == *"[worker 0] mx_train: kvstore type 'dist_device_sync' reduces on GPUs"* &&
     "$out" == *"(use 'dist_sync', which sums device copies on the CPU)"* ]] ||
    fail "dist_device_sync without a GPU: exit code $rc, said: $out"
else
  [[ $rc -eq 0 && "$out" == *"[worker 1] worker 1 of 2 (dist_device_sync)"* ]] ||
    fail "dist_device_sync job: exit code $rc, said: $out"
fi
assert_nothing_left "$TMP/device_sync.log"

out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 1 --coordinator-restarts -1 --server-binary="$SERVER" -- "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--coordinator-restarts -1: must be 0 or more"* ]] ||
  fail "--coordinator-restarts -1: exit code $rc, said: $out"

# 5. A node that never starts: the others give up after MX_STARTUP_TIMEOUT_S
# (default 120 s; a Kubernetes cluster may take longer to start pods),
# saying who is missing, or that no coordinator answered. A value that is
# no number of seconds is refused.
port=$(free_port)
"$SERVER" --role=coordinator --bind=127.0.0.1:$port --num_servers=1 --num_workers=2 > "$TMP/alone.log" 2>&1 &
coordinator=$!
# The nodes get 3 s: on a loaded machine the coordinator alone took longer
# to start listening, and the worker then found nobody there.
wait_for_line "$TMP/alone.log" "coordinator listening on" 30 || fail "the coordinator did not start listening"
start=$(now_ms)
MX_STARTUP_TIMEOUT_S=3 timeout -k 2 20 "$SERVER" --role=server --coordinator=127.0.0.1:$port --num_workers=2 \
  > "$TMP/alone_server.log" 2>&1 &
server=$!
out=$(MX_COORDINATOR=127.0.0.1:$port MX_STARTUP_TIMEOUT_S=3 timeout 20 "${worker[@]}" 2>&1)
rc=$?
wait "$server"; server_rc=$?
elapsed=$(( $(now_ms) - start ))
kill "$coordinator"; wait "$coordinator"
[[ $rc -eq 1 && "$out" == *"register: worker 1 did not register in time (1 of 1 servers and 1 of 2 workers did)"* ]] ||
  fail "worker alone: exit code $rc, said: $out"
[[ $server_rc -eq 1 ]] && grep -qF "register: worker 1 did not register in time" "$TMP/alone_server.log" ||
  fail "server alone: exit code $server_rc, said: $(cat "$TMP/alone_server.log")"
(( elapsed >= 2000 && elapsed <= 8000 )) || fail "nodes alone gave up after $elapsed ms, not about 3 s"
# No coordinator at the address: said so, rather than a bare deadline.
out=$(MX_STARTUP_TIMEOUT_S=2 timeout -k 2 20 "$SERVER" --role=server --coordinator=127.0.0.1:$port --num_workers=2 2>&1)
rc=$?
[[ $rc -eq 1 && "$out" == *"registering with the coordinator at 127.0.0.1:$port: nothing answered there within 2s"* ]] ||
  fail "server without a coordinator: exit code $rc, said: $out"
out=$(MX_COORDINATOR=127.0.0.1:$port MX_STARTUP_TIMEOUT_S=2 timeout 20 "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 1 && "$out" == *"nothing answered there within 2s (is the coordinator running"* ]] ||
  fail "worker without a coordinator: exit code $rc, said: $out"
out=$(MX_STARTUP_TIMEOUT_S=soon timeout 10 "$SERVER" --role=server --coordinator=127.0.0.1:1 --num_workers=1 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"MX_STARTUP_TIMEOUT_S=soon: must be a whole number from 1"* ]] ||
  fail "server MX_STARTUP_TIMEOUT_S=soon: exit code $rc, said: $out"
out=$(MX_COORDINATOR=127.0.0.1:1 MX_STARTUP_TIMEOUT_S=soon timeout 10 "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 1 && "$out" == *"MX_STARTUP_TIMEOUT_S=soon: must be a whole number from 1"* ]] ||
  fail "worker MX_STARTUP_TIMEOUT_S=soon: exit code $rc, said: $out"

# 5a. Nodes that start before the coordinator listens (as the launcher and
# Kubernetes start them) register as soon as it does. gRPC noticed the end
# of a connection attempt only when a thread polled the channel, and in a
# worker (it serves nothing) its backup poller did, every 5 s: the job
# formed 5-10 s after the coordinator started (rpc/rpc.cc).
port=$(free_port)
timeout -k 2 60 "$SERVER" --role=server --coordinator=127.0.0.1:$port --num_workers=1 \
  > "$TMP/late_server.log" 2>&1 &
server=$!
MX_COORDINATOR=127.0.0.1:$port timeout -k 2 60 "${worker[@]}" --epochs=1 > "$TMP/late_worker.log" 2>&1 &
late_worker=$!
sleep 1.2
start=$(now_ms)
timeout -k 2 60 "$SERVER" --role=coordinator --bind=127.0.0.1:$port --num_servers=1 --num_workers=1 \
  > "$TMP/late_coordinator.log" 2>&1 &
coordinator=$!
wait_for_line "$TMP/late_worker.log" "^worker 0 of 1" 30 || fail "the worker did not register with a late coordinator"
elapsed=$(( $(now_ms) - start ))
echo "nodes registered ${elapsed} ms after a late coordinator started"
(( elapsed <= 4000 )) || fail "nodes registered ${elapsed} ms after a late coordinator started"
wait "$late_worker" || fail "the worker of the late coordinator's job failed: $(cat "$TMP/late_worker.log")"
wait "$server"; wait "$coordinator"

# 5b. An IPv6 address to advertise (a dual-stack or IPv6 cluster's pod IP)
# is accepted: the server registers with it, bracketed, and its own port.
port=$(free_port)
timeout -k 2 30 "$SERVER" --role=coordinator --bind=127.0.0.1:$port --num_servers=1 \
  --num_workers=1 > "$TMP/v6_coordinator.log" 2>&1 &
v6_coordinator=$!
timeout -k 2 30 "$SERVER" --role=server --coordinator=127.0.0.1:$port --num_workers=1 \
  --bind=127.0.0.1:0 --advertise=fd00::1 > "$TMP/v6_server.log" 2>&1 &
v6_server=$!
MX_COORDINATOR=127.0.0.1:$port timeout -k 2 30 "${worker[@]}" > "$TMP/v6_worker.log" 2>&1 &
v6_worker=$!
wait_for_line "$TMP/v6_server.log" "serving on" 20 ||
  fail "--advertise=fd00::1: the server did not register: $(cat "$TMP/v6_server.log")"
grep -qE "server 0 serving on \[fd00::1\]:[0-9]+$" "$TMP/v6_server.log" ||
  fail "--advertise=fd00::1: the server advertised: $(grep 'serving on' "$TMP/v6_server.log")"
kill -9 "$(pgrep -P "$v6_worker")" "$(pgrep -P "$v6_server")" "$(pgrep -P "$v6_coordinator")" 2>/dev/null
wait "$v6_worker" "$v6_server" "$v6_coordinator" 2>/dev/null

# 6. Ctrl-C (SIGINT) to the launcher stops the whole job at once.
log="$TMP/interrupted.log"
start_job "$log" -n 2 -s 2 -- "${worker[@]}" --epochs=1000
wait_for_line "$log" '^\[worker [01]\] Epoch\[0\]' 60 || fail "no worker finished an epoch"
start=$(now_ms)
kill -INT "$launcher"
wait "$launcher"; rc=$?
elapsed=$(( $(now_ms) - start ))
echo "interrupted job stopped ${elapsed} ms after SIGINT (exit code $rc)"
[[ $rc -eq 130 ]] || fail "interrupted launcher exited $rc, not 130"
(( elapsed <= 5000 )) || fail "interrupted job took ${elapsed} ms to stop"
sleep 0.5
assert_nothing_left "$log"

# 6b. SIGHUP (a closed terminal, a dropped ssh session) stops it too.
log="$TMP/hangup.log"
start_job "$log" -n 2 -s 2 -- "${worker[@]}" --epochs=1000
wait_for_line "$log" '^\[worker [01]\] Epoch\[0\]' 60 || fail "no worker finished an epoch before SIGHUP"
kill -HUP "$launcher"
wait "$launcher"; rc=$?
[[ $rc -eq 129 ]] || fail "hung-up launcher exited $rc, not 129"
sleep 0.5
assert_nothing_left "$log"

# 6c. A worker binary that does not exist: the launcher says so, stops the
# coordinator and servers it started, and exits 1 (no Python traceback).
log="$TMP/nobinary.log"
start_job "$log" -n 2 -s 2 -- "$TMP/no_such_worker" --epochs=1
wait "$launcher"; rc=$?
[[ $rc -eq 1 ]] || fail "launcher with a missing worker binary exited $rc, not 1"
grep -q "^launch.py: cannot start worker 0: $TMP/no_such_worker: No such file or directory; stopping the job$" "$log" ||
  { fail "the launcher did not say the worker binary is missing"; cat "$log"; }
! grep -q Traceback "$log" || fail "the launcher printed a traceback"
left=$(live_job_pids "$log")
[[ -z "$left" ]] || { fail "a missing worker binary left processes: $left"; kill -9 $left; }

# 6d. Every worker dies before any finishes, with no launcher to stop the
# daemons (as under Kubernetes): the coordinator and the server end by
# themselves, exit code 1, saying why, soon after the heartbeat timeout.
port=$(free_port)
timeout -k 2 60 "$SERVER" --role=coordinator --bind=127.0.0.1:$port --num_servers=1 \
  --num_workers=1 --heartbeat_timeout_s=2 > "$TMP/orphan_coordinator.log" 2>&1 &
orphan_coordinator=$!
timeout -k 2 60 "$SERVER" --role=server --coordinator=127.0.0.1:$port --num_workers=1 \
  > "$TMP/orphan_server.log" 2>&1 &
orphan_server=$!
MX_COORDINATOR=127.0.0.1:$port timeout -k 2 60 "${worker[@]}" --epochs=1000 \
  > "$TMP/orphan_worker.log" 2>&1 &
orphan_worker=$!
if wait_for_line "$TMP/orphan_worker.log" 'Epoch\[0\]' 60; then
  kill -9 "$(pgrep -P "$orphan_worker")"  # mx_train, not the timeout around it
  start=$(now_ms)
  wait "$orphan_server"; server_rc=$?
  wait "$orphan_coordinator"; coordinator_rc=$?
  elapsed=$(( $(now_ms) - start ))
  echo "daemons of a job whose workers all died stopped ${elapsed} ms after the kill"
  [[ $server_rc -eq 1 ]] || fail "orphaned server exited $server_rc, not 1"
  [[ $coordinator_rc -eq 1 ]] || fail "orphaned coordinator exited $coordinator_rc, not 1"
  (( elapsed <= 10000 )) || fail "orphaned daemons took ${elapsed} ms to stop"
  grep -q "server 0: every worker of the job died: worker 0 stopped sending heartbeats; stopping" \
    "$TMP/orphan_server.log" || fail "orphaned server said: $(cat "$TMP/orphan_server.log")"
  grep -q "coordinator: every worker of the job died: worker 0 " "$TMP/orphan_coordinator.log" ||
    fail "orphaned coordinator said: $(cat "$TMP/orphan_coordinator.log")"
else
  fail "the lone worker never finished an epoch: $(tail -3 "$TMP/orphan_worker.log")"
  kill -9 "$orphan_worker" "$orphan_server" "$orphan_coordinator" 2>/dev/null
fi

# 7. A signal that arrives while the launcher's main thread holds a
# process's wait lock (inside Popen.poll()) still stops the job: the stop
# must not run inside the signal handler, where it waited for that lock
# forever (a CI run hung after step 3 with no timeout of its own; this
# deadlock, reproduced here, is the likely cause).
out=$(cd "$(dirname "$LAUNCH")" && timeout -k 2 20 python3 - 2>&1 <<'PY'
import os, signal, time
import launch
job = launch.Job()
proc = job.start("worker 0", "worker", ["sleep", "100"], os.environ)
def supervise():
    with proc.popen._waitpid_lock:  # as Popen.poll() holds it
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    return 0
start = time.time()
code = launch.run_until_stopped(job, supervise)
print(f"exit code {code} after {time.time() - start:.1f} s; sleep {'ended' if proc.popen.poll() is not None else 'still running'}")
PY
)
rc=$?
[[ $rc -eq 0 && "$out" == *"exit code 130 after "*" s; sleep ended"* ]] ||
  fail "SIGINT inside poll(): exit code $rc, said: $out"

# 8. A second signal while the launcher stops the job changes nothing: the
# stop goes on (seen: the second SIGTERM's handler raised in the middle of
# the first stop and left the daemons running).
out=$(cd "$(dirname "$LAUNCH")" && timeout -k 2 20 python3 - 2>&1 <<'PY'
import os, signal, time
import launch
job = launch.Job()
proc = job.start("worker 0", "worker", ["sleep", "100"], os.environ)
def supervise():
    # Both pending at once: the second handler runs as the first stop begins.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    time.sleep(5)
    return 0
code = launch.run_until_stopped(job, supervise)
print(f"exit code {code}; sleep {'ended' if proc.popen.poll() is not None else 'still running'}")
PY
)
rc=$?
[[ $rc -eq 0 && "$out" == *"exit code 130; sleep ended"* ]] ||
  fail "a second signal during the stop: exit code $rc, said: $out"

# 9. A stop signal that comes while a process is being started (forked,
# not yet among the job's processes) stops it too: the launcher recorded
# it only after the signal's handler had run, and stop_all left it
# running in its own session. The job's binaries are called through
# links under $mark, which only this test's processes have in their
# command lines.
mark="$TMP/mark"
mkdir -p "$mark"
ln -sf "$(command -v sleep)" "$mark/sleep"
ln -sf "$(readlink -f "$SERVER")" "$mark/mx_server"
# marked_left CASE: fails if a process under $mark still runs, and kills it.
marked_left() {
  local left
  left=$(pgrep -f -- "^$mark/")
  if [[ -n "$left" ]]; then
    fail "$1: processes left behind: $(ps -o pid=,args= -p "$(echo $left | tr ' ' ,)")"
    kill -9 $left 2>/dev/null
  fi
}
# The signal as the N-th child (1: the coordinator, 2: the server, 3 and
# on: workers) has just been forked, inside Popen.
for n in 1 2 4; do
  out=$(cd "$(dirname "$LAUNCH")" && timeout -k 2 30 python3 - "$mark" "$n" 2>&1 <<'PY'
import os, signal, subprocess, sys
import launch
mark, n = sys.argv[1], int(sys.argv[2])
forked = []
class Popen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        forked.append(self.pid)
        if len(forked) == n:
            os.kill(os.getpid(), signal.SIGTERM)
launch.subprocess.Popen = Popen
sys.argv = ["launch.py", "-n", "3", "-s", "1", f"--server-binary={mark}/mx_server", "--",
            f"{mark}/sleep", "100"]
print(f"exit code {launch.main()}")
PY
)
  rc=$?
  [[ $rc -eq 0 && "$out" == *"exit code 143"* ]] || fail "SIGTERM as child $n is forked: exit code $rc, said: $out"
  marked_left "SIGTERM as child $n is forked"
done
# The same from outside: SIGTERM at several moments while 24 workers start.
# Each launcher is bounded (timeout, which passes the SIGTERM on; the
# launcher's processes are in sessions of their own, out of reach of
# timeout's signal to its group) and known to the EXIT trap (LAUNCHERS).
for delay in 0 0.01 0.02 0.03 0.05 0.08; do
  log="$TMP/early_stop.log"
  timeout -k 5 30 python3 "$LAUNCH" -n 24 -s 1 --server-binary="$mark/mx_server" \
    -- "$mark/sleep" 100 > "$log" 2>&1 &
  early=$!
  LAUNCHERS+=("$early")
  deadline=$(( $(now_ms) + 30000 ))
  until grep -q "^launch.py: started server 0 " "$log" || (( $(now_ms) > deadline )); do sleep 0.01; done
  sleep "$delay"
  kill -TERM "$early"
  wait "$early"; rc=$?
  [[ $rc -eq 143 ]] || fail "SIGTERM $delay s after the server started: exit code $rc"
  marked_left "SIGTERM $delay s after the server started ($(grep -c '^launch.py: started worker' "$log") workers had)"
done

# 10. A stop signal right after the launcher made the directory of its
# secrets (with --tls, the CA's key) or of its shared memory, before any
# process starts: it removes it and exits 143. (Its handlers came after
# both: the signal killed it and they stayed behind.)
if [[ -d /dev/shm && -w /dev/shm ]]; then
  server_path=$(readlink -f "$SERVER")  # the Python below runs in the launcher's directory
  for which in secrets shared-memory; do
    made="$TMP/made_$which"
    out=$(cd "$(dirname "$LAUNCH")" && TMPDIR="$TMP" timeout -k 2 30 python3 - "$server_path" "$which" "$made" 2>&1 <<'PY'
import os, signal, sys, tempfile
import launch
server, which, made_log = sys.argv[1:]
made = []
real_mkdtemp = tempfile.mkdtemp
def mkdtemp(*args, **kwargs):
    path = real_mkdtemp(*args, **kwargs)
    made.append(path)
    with open(made_log, "a") as f:
        f.write(path + "\n")
    if len(made) == ["secrets", "shared-memory"].index(which) + 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return path
tempfile.mkdtemp = mkdtemp
sys.argv = ["launch.py", "-n", "1", "-s", "1", "--tls", f"--server-binary={server}", "--", "sleep", "100"]
code = launch.main()
print(f"exit code {code}; left behind: {[p for p in made if os.path.exists(p)]}")
PY
)
    rc=$?
    [[ $rc -eq 0 && "$out" == *"exit code 143; left behind: []"* && "$out" != *"launch.py: started"* ]] ||
      fail "SIGTERM as the $which directory is made: exit code $rc, said: $out"
    for dir in $(cat "$made" 2>/dev/null); do
      [[ -e "$dir" ]] && { fail "SIGTERM as the $which directory is made: $dir left behind"; rm -rf "$dir"; }
    done
  done
fi

# 11. Its output's reader goes away (`launch.py ... | head -1`): the
# launcher stops the job and exits 141, as a program of a pipeline killed
# by SIGPIPE would, within seconds, with no traceback and nothing left
# behind. (Its threads that copy the processes' output died of the
# broken pipe, and the job went on, unseen, its processes blocking once
# their pipes filled.)
log="$TMP/head.log"
JOB_LOGS+=("$log")
start=$(now_ms)
{ timeout -k 5 40 python3 "$LAUNCH" -n 2 -s 1 --server-binary="$SERVER" -- "${worker[@]}" --epochs=1000 \
    2> "$log"; echo $? > "$TMP/head.rc"; } | head -1 > "$TMP/head.out"
elapsed=$(( $(now_ms) - start ))
rc=$(cat "$TMP/head.rc")
echo "a job whose output's reader went away stopped after ${elapsed} ms (exit code $rc)"
[[ $rc -eq 141 ]] || fail "launch.py | head -1: exit code $rc, not 141"
(( elapsed <= 15000 )) || fail "launch.py | head -1 took ${elapsed} ms"
[[ -s "$TMP/head.out" ]] || fail "launch.py | head -1: no line"
grep -q "^launch.py: the output's reader went away (broken pipe); stopping the job$" "$log" ||
  fail "launch.py | head -1: the launcher did not say why it stopped: $(tail -3 "$log")"
! grep -qE "Traceback|Exception ignored" "$log" || fail "launch.py | head -1: $(grep -A3 -E 'Traceback|Exception ignored' "$log")"
sleep 0.5
left=$({ live_job_pids "$log"; pgrep -f -- "^[^ ]*mx_train .*$TMP/"; } | sort -u)
[[ -z "$left" ]] || { fail "launch.py | head -1 left processes: $(echo $left)"; kill -9 $left; }

# 12. Pure helpers, without a job: the coordinator's address for an IPv6
# host of a hostfile is bracketed (it was "fd00::1:9091"), and absl's
# spellings of a worker flag (one dash or two, "=V" or V next) all count.
out=$(cd "$(dirname "$LAUNCH")" && timeout 20 python3 - 2>&1 <<'PY'
import argparse
import launch
from job_args import check_worker_kvstore, worker_flag_values
bad = []
for host, want in [("fd00::1", "[fd00::1]:9091"), ("[fd00::1]", "[fd00::1]:9091"),
                   ("10.0.0.1", "10.0.0.1:9091"), ("node-1.example", "node-1.example:9091")]:
    got = launch.host_port(launch.address_of("me@" + host), 9091)
    if got != want:
        bad.append(f"host_port({host!r}): {got}, not {want}")
for cmd, want in [(["mx_train", "--kvstore=dist_sync"], ["dist_sync"]),
                  (["mx_train", "-kvstore=dist_sync"], ["dist_sync"]),
                  (["mx_train", "--kvstore", "dist_sync"], ["dist_sync"]),
                  (["mx_train", "-kvstore", "local", "--kvstore=dist_sync"], ["local", "dist_sync"]),
                  (["mx_train", "---kvstore=local", "--kvstore_x=local"], []),
                  (["mx_train", "--kvstore"], [])]:
    if worker_flag_values(cmd, "kvstore") != want:
        bad.append(f"worker_flag_values({cmd}): {worker_flag_values(cmd, 'kvstore')}, not {want}")
class Refused(Exception):
    pass
class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise Refused(message)
job = argparse.Namespace(kvstore="dist_sync")
for cmd in (["mx_train", "-kvstore=dist_sync"], ["mx_train", "-kvstore", "dist_sync"]):
    try:
        check_worker_kvstore(Parser(), job, cmd)
    except Refused as e:
        bad.append(f"{cmd} refused: {e}")
print("\n".join(bad) or "ok")
PY
)
[[ "$out" == ok ]] || fail "pure helpers: $out"

finish
