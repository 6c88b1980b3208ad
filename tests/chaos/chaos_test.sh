#!/usr/bin/env bash
# The short chaos run of CI: 4 trials of tests/chaos/chaos.py (a random
# kill -9 or SIGSTOP of a random node of the README job, at a random time),
# each bounded in time; every trial must end in the undisturbed result or a
# failure naming the victim, with nothing left running. The seed is the
# day of the year, so CI covers other faults from day to day and a failure
# is reproduced with the seed it prints. By hand: chaos.py --trials=50.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
seed=$((10#$(date +%j)))
timeout -k 10 900 python3 "$(dirname "$0")/chaos.py" --launch="$LAUNCH" --server-binary="$SERVER" \
  --train="$TRAIN" --trials=4 --seed="$seed" --work-dir="$TMP/chaos" --out="$TMP/chaos.json"
rc=$?
if [[ $rc -ne 0 ]]; then
  # The logs of the failed trials, for the CI log.
  python3 - "$TMP/chaos.json" <<'PYEOF'
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
fi
exit $rc
