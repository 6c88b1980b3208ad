# Sourced by the integration tests after setting LAUNCH, SERVER, TRAIN and
# TMP: small CSV data, the worker command, and helpers that find a job's
# processes through the launcher's log ("launch.py: started server 1 (pid
# N)", perhaps after a --timestamps time, "coordinator listening on 127.0.0.1:PORT"). Every process a test
# starts is found this way, never by a pattern that could match another
# test's processes; an EXIT trap kills whatever a failed test left.

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
finish() { echo "$failures failures"; exit $(( failures > 0 )); }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# A port to name before anything listens on it (see free_port.py).
free_port() { python3 "$(dirname "${BASH_SOURCE[0]}")/free_port.py"; }

source "$(dirname "$0")/../testdata/make_csv.sh"
# 401 samples: two parts would differ by one sample, and at batch 20 by a
# whole batch at the end of each epoch; equal-sized parts keep every step
# of the job matched.
make_csv 401 "$TMP/train.csv" "$TMP/train_labels.csv"
make_csv 100 "$TMP/test.csv" "$TMP/test_labels.csv"
worker=("$TRAIN" --kvstore=dist_sync --network=mlp --batch_size=20 --lr=0.5
        --train_csv="$TMP/train.csv" --train_label_csv="$TMP/train_labels.csv"
        --test_csv="$TMP/test.csv" --test_label_csv="$TMP/test_labels.csv")

JOB_LOGS=()      # every job's log, for the EXIT trap
LAUNCHERS=()     # launchers started in the background
declare -gA LAUNCHER_OF=()  # a background job's log -> its launcher's pid

# start_job LOG LAUNCH_ARGS... -- WORKER_ARGS...: runs launch.py in the
# background (at most 120 s, then SIGKILL 5 s later if it ignores the
# SIGTERM), its output in LOG; sets $launcher.
start_job() {
  local log=$1; shift
  JOB_LOGS+=("$log")
  timeout -k 5 120 python3 "$LAUNCH" --server-binary="$SERVER" "$@" > "$log" 2>&1 &
  launcher=$!
  LAUNCHERS+=("$launcher")
  LAUNCHER_OF["$log"]=$launcher
}

# click_logs GEN TRAIN_SAMPLES TEST_SAMPLES: writes click-through logs with
# mx_ctr_gen GEN ($TMP/clicks.txt, $TMP/clicks_test.txt: 4 fields,
# vocabulary 500) and sets ctr to a worker command that trains the ctr
# model on them (dist_sync, SGD with momentum; no --epochs).
click_logs() {
  # --help lists the flags and exits 0, as every binary's does.
  [[ "$("$1" --help 2>&1)" == *"--vocab"* ]] && "$1" --help > /dev/null 2>&1 ||
    fail "mx_ctr_gen --help did not list its flags and exit 0"
  "$1" --out="$TMP/clicks.txt" --samples="$2" --fields=4 --vocab=500 --seed=1 > /dev/null ||
    fail "mx_ctr_gen failed"
  "$1" --out="$TMP/clicks_test.txt" --samples="$3" --fields=4 --vocab=500 --seed=2 > /dev/null
  ctr=("$TRAIN" --kvstore=dist_sync --network=ctr --ctr_fields=4 --ctr_features=2000
       --ctr_embed_dim=8 --train_libsvm="$TMP/clicks.txt" --test_libsvm="$TMP/clicks_test.txt"
       --batch_size=100 --lr=0.5 --momentum=0.9)
}

# expect_spare_as_server_1 LOG WHAT: in a job of 3 servers with replicas 2
# and a spare whose server 1 was killed, the spare takes rank 1 and servers
# 0 and 2 send it copies of their WHAT ("keys", "ranges"); fails saying
# which did not happen within 20 s.
expect_spare_as_server_1() {
  local log=$1 what=$2 s
  wait_for_line "$log" '^\[spare 0\] server 1 serving on 127\.0\.0\.1:[0-9]+ \(replicas 2\) \(a spare, incarnation 1\)' 20 ||
    fail "the spare did not take server 1's rank"
  for s in 0 2; do
    wait_for_line "$log" "^\\[server $s\\] server $s: server 1 is back at 127\\.0\\.0\\.1:[0-9]+ \\(a spare\\); sending it copies of [0-9]+ key\\(s\\)" 20 ||
      fail "server $s did not send the spare its $what"
  done
}

# wait_for_line LOG REGEX SECONDS: whether a line matching REGEX (grep -E)
# appears in LOG within SECONDS.
wait_for_line() {
  local deadline=$(( $(now_ms) + $3 * 1000 ))
  while (( $(now_ms) < deadline )); do
    grep -qE -- "$2" "$1" && return 0
    sleep 0.1
  done
  return 1
}

# started_pid LOG NAME: the pid of "coordinator", "server 1", "worker 0".
started_pid() {
  sed -n "s/^\([0-9T:.Z-]* \)\{0,1\}launch.py: started $2 (pid \([0-9]*\))$/\2/p" "$1" | head -1
}

# The pids of every process LOG's launcher started that is still running
# (checked against its command line, in case a pid was reused).
live_job_pids() {
  local pid
  for pid in $(sed -n 's/^\([0-9T:.Z-]* \)\{0,1\}launch.py: started .* (pid \([0-9]*\))$/\2/p' "$1"); do
    if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qE '(mx_server|mx_train|uneven_worker) '; then
      echo "$pid"
    fi
  done
}

# assert_nothing_left LOG: no process of the job is running: neither by the
# pids the launcher logged nor by pgrep on the job's coordinator address
# (daemons) and data directory (workers). Kills what it finds.
assert_nothing_left() {
  local log=$1 port left
  port=$(sed -n 's/.*coordinator listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -1)
  [[ -n "$port" ]] || { fail "$log: no coordinator address"; return; }
  left=$({ live_job_pids "$log"
           pgrep -f -- "^[^ ]*mx_server --role=[a-z]+ --(bind|coordinator)=127\.0\.0\.1:$port( |$)"
           pgrep -f -- "^[^ ]*mx_train .*$TMP/"; } | sort -u)
  if [[ -n "$left" ]]; then
    fail "$log: processes left behind: $(echo $left)"
    kill -9 $left 2>/dev/null
  fi
  # The job's shared memory directory goes with its launcher: once that has
  # ended it must be gone. The launcher is start_job's for LOG, else the
  # one a test started itself ($launcher); none (a job run in the
  # foreground, as launch_test.sh's first ones) has ended.
  local shm pid=${LAUNCHER_OF["$log"]:-${launcher:-}}
  shm=$(sed -n 's/.*launch\.py: shared memory in \(.*\)$/\1/p' "$log" | head -1)
  if [[ -n "$shm" && -e "$shm" ]] && { [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; }; then
    fail "$log: shared memory left behind in $shm: $(ls -A "$shm" | head -3)"
  fi
}

cleanup() {
  local pid log
  for pid in "${LAUNCHERS[@]}"; do kill "$pid" 2>/dev/null; done
  sleep 0.5
  for log in "${JOB_LOGS[@]}"; do
    for pid in $(live_job_pids "$log"); do kill -9 "$pid" 2>/dev/null; done
  done
}
trap cleanup EXIT
