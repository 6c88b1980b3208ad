#!/usr/bin/env bash
# Scale, the short version of bench/scale_bench.py: 16 workers, 4 servers
# and the coordinator as separate processes on 127.0.0.1, each worker
# pushpulling a small model's keys for 30 s and checking what it pulls. The
# job must end with exit code 0 and no error line, every worker reporting,
# no process growing more than 25% after the warm-up, and no process left
# behind. 25%: the benchmark's target is 5% over 3 minutes with 64
# workers, but in runs of 20-30 s the servers' allocator still grows by up
# to 11% after the warm-up (then levels off); anything leaked per step
# grows far more (about 15000 steps of 0.5 MB each in this job).
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; WORKER="$3"; SCALE_BENCH="$4"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
failures=0

# The benchmark runs under timeout, in timeout's process group, which a
# signal to this test's group (Bazel's SIGTERM at the test's timeout) does
# not reach; its launcher (scale_bench.py's child) and each node run in
# sessions of their own. So on any exit while it runs, the EXIT trap stops
# them: SIGTERM to the launcher, which stops its job and removes its shared
# memory, SIGKILL to what is left 6 s later (the launcher's own grace is
# 3 s; Bazel's before its SIGKILL, 15 s), to every node, and to timeout's
# group.
bench=""  # timeout's pid (and process group) while the benchmark runs
any_alive() {  # any_alive PID...: whether one of them runs (a zombie does not)
  local pid stat
  for pid; do
    read -r stat 2>/dev/null < "/proc/$pid/stat" || continue
    stat=${stat##*) }
    [[ $stat != Z* ]] && return 0
  done
  return 1
}
stop_bench() {
  [[ -n $bench ]] || return 0
  local pid launchers nodes i=0
  launchers=$(for pid in $(pgrep -P "$bench"); do pgrep -P "$pid"; done)
  nodes=$(for pid in $launchers; do pgrep -P "$pid"; done)
  [[ -n $launchers ]] && kill -TERM $launchers 2>/dev/null
  while (( i++ < 60 )) && any_alive $launchers; do sleep 0.1; done
  for pid in $nodes $launchers; do
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  done
  kill -KILL -- "-$bench" 2>/dev/null
  bench=""
}
trap stop_bench EXIT

timeout -k 10 300 python3 "$SCALE_BENCH" --launch "$LAUNCH" --server-binary "$SERVER" \
  --worker "$WORKER" --jobs 16x4 --seconds 30 --check --max-growth 0.25 > "$TMP/scale_bench.log" 2>&1 &
bench=$!
wait "$bench"
rc=$?
bench=""
out=$(cat "$TMP/scale_bench.log")
echo "$out"
[[ $rc -eq 0 ]] || { echo "FAIL: scale_bench.py --check exited $rc"; failures=$((failures + 1)); }
grep -q "BENCH name=scale_errors_16w_4s value=0 " <<<"$out" ||
  { echo "FAIL: errors in the job"; failures=$((failures + 1)); }
sleep 1
# The job's processes, by their binaries' paths (this test's own runfiles).
if left=$(pgrep -f -- "^($SERVER|$WORKER) "); then
  echo "FAIL: processes left behind: $left"
  failures=$((failures + 1))
  pkill -9 -f -- "^($SERVER|$WORKER) "
fi
echo "$failures failures"
exit $(( failures > 0 ))
