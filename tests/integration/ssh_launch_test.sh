#!/usr/bin/env bash
# deploy/launch.py on "other hosts" (-H): a hostfile of 127.0.0.1 and
# 127.0.0.2 (both loopback) and a stand-in for ssh that runs each command
# here in a clean environment. The job must train as on one host, with the
# coordinator on the first host, servers and workers round-robin, servers
# advertising their host, and the job's variables passed on the command
# line. The job token comes from a file (--token-file) that every host
# reads at the same path: without one, or with --tls certificates that the
# launcher would make on this host only, -H is refused. Remote processes
# get no terminal as stdin (ssh -tt would put it in raw mode), a remote
# node killed by a signal is known as one (ssh says 255), and nodes named
# in other nodes' output are found though their names carry their hosts.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"
FAKE_SSH="$(cd "$(dirname "$0")" && pwd)/fake_ssh.sh"
export FAKE_SSH_LOG="$TMP/ssh.log"
: > "$FAKE_SSH_LOG"
printf '# test hosts\n127.0.0.1\n\nroot@127.0.0.2  # a user is allowed\n' > "$TMP/hosts"
port=$(free_port)
(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$TMP/token")

# Refused before anything starts: the launcher's own token, or its own
# certificates, would exist on this host only.
out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 2 -H "$TMP/hosts" --ssh="$FAKE_SSH" \
      --server-binary="$SERVER" -- "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"-H: give --token-file FILE, a file holding the job token at the same path on every host"* ]] ||
  fail "-H without --token-file: exit code $rc, said: $out"
out=$(timeout 20 python3 "$LAUNCH" -n 2 -s 2 -H "$TMP/hosts" --ssh="$FAKE_SSH" --token-file "$TMP/token" \
      --tls --server-binary="$SERVER" -- "${worker[@]}" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"-H with --tls: give --tls-cert, --tls-key and --tls-ca"* ]] ||
  fail "-H --tls without files: exit code $rc, said: $out"
[[ ! -s "$FAKE_SSH_LOG" ]] || fail "a refused -H job started: $(cat "$FAKE_SSH_LOG")"

log="$TMP/job.log"
JOB_LOGS+=("$log")
timeout -k 5 120 python3 "$LAUNCH" -n 2 -s 2 -H "$TMP/hosts" --ssh="$FAKE_SSH" --port="$port" \
  --token-file "$TMP/token" --log-dir "$TMP/logs" --server-binary="$SERVER" \
  -- "${worker[@]}" --epochs=2 > "$log" 2>&1
rc=$?
[[ $rc -eq 0 ]] || fail "job exit code $rc"
# Log files are named for the node, not its host, as on one host.
for f in coordinator server-0 server-1 worker-0 worker-1; do
  [[ -s "$TMP/logs/$f.log" ]] || fail "--log-dir with -H: no $f.log, but: $(ls "$TMP/logs")"
done
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

# Remote processes get /dev/null as stdin, not the launcher's terminal (run
# here under a terminal of its own, by script).
probe="$TMP/tty_probe.py"
cat > "$probe" <<PY
import os, sys
sys.path.insert(0, "$(cd "$(dirname "$LAUNCH")" && pwd)")
import launch
job = launch.Job(launch.Remote("$FAKE_SSH", ["127.0.0.1"]))
job.start("worker 0", "worker", ["true"], os.environ, host="127.0.0.1").popen.wait()
PY
: > "$TMP/tty.log"
FAKE_SSH_TTY_LOG="$TMP/tty.log" timeout -k 2 20 script -qec "python3 $probe" /dev/null > /dev/null 2>&1
[[ "$(cat "$TMP/tty.log")" == "no tty" ]] ||
  fail "a remote process's stdin: '$(cat "$TMP/tty.log")', not 'no tty' (is script(1) there?)"

# Nodes named in another node's output ("server 1") are found though the
# launcher's names carry the host ("server 1 on root@127.0.0.2"): a node
# reported dead but still running is killed as hung, and one declared dead
# is known by its rank.
out=$(cd "$(dirname "$LAUNCH")" && timeout -k 2 20 python3 - "$FAKE_SSH" 2>&1 <<'PY'
import os, sys
import launch
job = launch.Job(launch.Remote(sys.argv[1], ["127.0.0.1", "root@127.0.0.2"]))
server = job.start("server 1", "server", ["sleep", "30"], os.environ, host="root@127.0.0.2")
worker = job.start("worker 0", "worker", ["true"], os.environ, host="127.0.0.1")
worker.popen.wait()
worker.blamed = ["server 1"]
print("hung:", [p.name for p in launch.hung_nodes(job, worker)])
print("declared:", launch.is_declared(server, {"rank 1 at 127.0.0.2:4711"}))
job.stop_all()
PY
)
[[ "$out" == *"hung: ['server 1 on root@127.0.0.2']"* && "$out" == *"declared: True"* ]] ||
  fail "nodes named without their host: $out"

# The coordinator killed on its host (ssh exits 255 for that): the
# launcher knows it was killed and starts it again, and the job finishes.
log="$TMP/coordinator_killed.log"
JOB_LOGS+=("$log")
port=$(free_port)
timeout -k 5 120 python3 "$LAUNCH" -n 2 -s 2 -H "$TMP/hosts" --ssh="$FAKE_SSH" --port="$port" \
  --token-file "$TMP/token" --server-binary="$SERVER" -- "${worker[@]}" --epochs=40 > "$log" 2>&1 &
launcher=$!
LAUNCHERS+=("$launcher")
if wait_for_line "$log" '^\[worker [01] on [^]]*\] Epoch\[1\]' 60; then
  victim=$(pgrep -f -- "^[^ ]*mx_server --role=coordinator --bind=0\.0\.0\.0:$port( |$)")
  [[ -n "$victim" ]] && kill -9 $victim
fi
wait "$launcher"; rc=$?
[[ $rc -eq 0 ]] || fail "coordinator killed remotely: the job exited $rc: $(grep '^launch.py' "$log" | tail -3)"
grep -qE "^launch.py: coordinator on 127\.0\.0\.1 \(pid [0-9]+\) died: killed by signal 9 \(SIGKILL\); restarting it" "$log" ||
  fail "coordinator killed remotely: not restarted as killed: $(grep '^launch.py' "$log" | tail -3)"
sleep 0.5
left=$(live_job_pids "$log")
[[ -z "$left" ]] || { fail "processes left behind: $left"; kill -9 $left; }
finish
