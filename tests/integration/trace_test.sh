#!/usr/bin/env bash
# One timeline (launch.py --trace DIR, deploy/trace_merge.py): every
# process of a dist_sync job writes its events; merged, they form one
# Chrome trace with the five processes by name, engine operations by name,
# the workers' pushpulls with keys, versions and bytes, the servers' sums
# and updates and pulls waiting (barriers: tests/rpc/coordinator_client_test);
# and each server update lies
# inside the span of every worker pushpull that waited for it (the pushes
# that caused it), on the coordinator's clock.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"
MERGE="$(dirname "$LAUNCH")/trace_merge.py"

log="$TMP/job.log"
JOB_LOGS+=("$log")
timeout -k 5 120 python3 "$LAUNCH" --server-binary="$SERVER" --trace "$TMP/trace" -n 2 -s 2 \
  -- "${worker[@]}" --epochs=3 --optimizer=sgd --momentum=0.9 > "$log" 2>&1 \
  || fail "job failed: $(tail -5 "$log")"
n=$(ls "$TMP/trace"/*.trace.json 2>/dev/null | wc -l)
[[ $n -eq 5 ]] || fail "$n timelines written, not 5: $(ls "$TMP/trace")"
python3 "$MERGE" "$TMP/trace" -o "$TMP/job.json" || fail "trace_merge.py failed"
python3 - "$TMP/job.json" <<'PY' || fail "the merged timeline: see above"
import json, sys
doc = json.load(open(sys.argv[1]))
events = doc["traceEvents"]
bad = []
def check(cond, what):
    if not cond:
        bad.append(what)
names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
check(sorted(names.values()) == ["coordinator", "server 0", "server 1", "worker 0", "worker 1"],
      f"processes {sorted(names.values())}")
spans = [e for e in events if e["ph"] == "X"]
for e in spans:
    for field in ("name", "cat", "ts", "dur", "pid", "tid"):
        check(field in e, f"event without {field}: {e}")
    check(e["dur"] >= 0, f"negative duration: {e}")
by = lambda who, name: [e for e in spans if names[e["pid"]].startswith(who) and e["name"] == name]
for w in ("worker 0", "worker 1"):
    check(by(w, "fc1"), f"{w}: no engine operation fc1")
    pp = by(w, "PushPullMany")
    check(pp, f"{w}: no pushpull spans")
    check(all(e["args"]["keys"] and len(e["args"]["keys"]) == len(e["args"]["versions"])
              and e["args"]["bytes"] > 0 for e in pp), f"{w}: pushpull arguments")
updates = by("server", "sum+update")
check(updates, "no server updates")
check(by("server", "pull_wait"), "no pull waits")
# Each update (key k on server s, version v) lies inside the pushpull of
# every worker whose call to s carried k and waited for version v.
pushes = {}
for w in ("worker 0", "worker 1"):
    for e in by(w, "PushPullMany"):
        for k, v in zip(e["args"]["keys"], e["args"]["versions"]):
            pushes.setdefault((e["args"]["server"], k, v), []).append(e)
server_rank = lambda e: int(names[e["pid"]].split()[1])
outside = checked = 0
for u in updates:
    causes = pushes.get((server_rank(u), u["args"]["key"], u["args"]["version"]), [])
    check(len(causes) == 2, f"update {u['args']}: {len(causes)} worker pushpulls caused it, not 2")
    for p in causes:
        checked += 1
        if not (p["ts"] <= u["ts"] and u["ts"] + u["dur"] <= p["ts"] + p["dur"]):
            outside += 1
            if outside <= 3:
                bad.append(f"update {u['args']} at [{u['ts']}, {u['ts'] + u['dur']}] outside "
                           f"{names[p['pid']]}'s pushpull [{p['ts']}, {p['ts'] + p['dur']}]")
print(f"{len(spans)} events; {len(updates)} server updates, each inside its 2 workers' pushpulls "
      f"({checked - outside} of {checked})")
for b in bad[:20]:
    print("timeline:", b)
sys.exit(1 if bad else 0)
PY
assert_nothing_left "$log"
finish
