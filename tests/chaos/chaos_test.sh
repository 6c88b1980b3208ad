#!/usr/bin/env bash
# The short chaos runs of CI (tests/chaos/chaos.py), each trial bounded in
# time, nothing left running after any:
# - 4 trials of a random kill -9 or SIGSTOP of a random node of the README
#   job at a random time: each must end in the undisturbed result or a
#   failure naming the victim;
# - 2 trials of the same against a server of the job with replicas 2 (3
#   servers and a spare, shorter; the spare is a victim too): each must end
#   in the undisturbed result, parameters' checksum included.
# The seed is the day of the year, so CI covers other faults from day to
# day and a failure is reproduced with the seed it prints. By hand:
# chaos.py --trials=50 [--replicas=2 [--spare-servers=1]].
# Both runs fit in bazel's limit for this test (size large: 900 s): each
# gets a --budget of 400 s (a trial that could not end within it is not
# run, and fails the run), under a timeout of 420 s. A stop signal (the
# timeout's, or bazel's when it gives up) reaches chaos.py, which kills its
# job: timeout runs it in a process group of its own, and the jobs in
# sessions of their own, out of reach of a signal to this test's group.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
seed=$((10#$(date +%j)))
BUDGET=400
run=""  # the running chaos.py's timeout, for the trap
trap '[[ -n "$run" ]] && kill -TERM "$run" 2>/dev/null && wait "$run"; exit 143' TERM INT HUP

# chaos NAME ARGS...: one chaos.py run; on failure prints the failed
# trials' logs (for the CI log). Returns chaos.py's exit code.
chaos() {
  local name="$1"; shift
  timeout -k 10 $((BUDGET + 20)) python3 "$(dirname "$0")/chaos.py" --launch="$LAUNCH" \
    --server-binary="$SERVER" --train="$TRAIN" --seed="$seed" --budget="$BUDGET" \
    --work-dir="$TMP/$name" --out="$TMP/$name.json" "$@" &
  run=$!
  wait "$run"
  local rc=$?
  run=""
  [[ $rc -eq 0 ]] && return 0
  python3 - "$TMP/$name.json" <<'PYEOF'
import json, sys
try:
    trials = json.load(open(sys.argv[1]))["trials"]
except (OSError, ValueError, KeyError):
    sys.exit(0)
for t in trials:
    if not t["ok"]:
        print(f"--- trial {t['trial']}: {t['log']}")
        lines = [l for l in open(t["log"], errors="replace") if "Batch" not in l]
        sys.stdout.writelines(lines[-40:])
PYEOF
  return $rc
}

rc=0
chaos any --trials=4 || rc=1
chaos replicas --trials=2 --replicas=2 --spare-servers=1 --victims=servers --epochs=5 || rc=1
exit $rc
