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
failures=0
out=$(timeout -k 10 300 python3 "$SCALE_BENCH" --launch "$LAUNCH" --server-binary "$SERVER" \
      --worker "$WORKER" --jobs 16x4 --seconds 30 --check --max-growth 0.25 2>&1)
rc=$?
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
