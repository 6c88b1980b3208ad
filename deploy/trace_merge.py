#!/usr/bin/env python3
"""Merges the timelines a job's processes wrote (launch.py --trace DIR, or
--trace / MX_TRACE_DIR on each) into one Chrome trace file that
chrome://tracing and Perfetto (ui.perfetto.dev) open:

  deploy/trace_merge.py DIR [-o DIR/job.trace.json]

Each process's events are moved onto the coordinator's clock by the
offset it estimated from its heartbeats (otherData.clock_offset_us) when
that exceeds the estimate's uncertainty (clock_uncertainty_us, half the
round trip it was measured over; within it the clocks agree as far as can
be told, as the processes of one host do), and shown under its name ("server 1", "worker 0"); the processes are ordered
coordinator, servers, workers. Times start at 0 (the first event).
"""
import argparse
import glob
import json
import os
import sys


def order(name):
    role, _, rank = name.partition(" ")
    return ({"coordinator": 0, "server": 1, "worker": 2}.get(role, 3),
            int(rank) if rank.isdigit() else 0, name)


def main():
    ap = argparse.ArgumentParser(description="Merge a job's timelines (see the module doc).")
    ap.add_argument("dir", help="where the processes wrote *.trace.json")
    ap.add_argument("-o", "--output", help="the merged file (default: DIR/job.trace.json)")
    args = ap.parse_args()
    output = args.output or os.path.join(args.dir, "job.trace.json")
    files = sorted(f for f in glob.glob(os.path.join(args.dir, "*.trace.json"))
                   if os.path.abspath(f) != os.path.abspath(output))
    if not files:
        ap.error(f"no *.trace.json in {args.dir}")
    processes = []
    for f in files:
        try:
            with open(f) as fh:
                doc = json.load(fh)
            other = doc["otherData"]
            offset = other["clock_offset_us"]
            if abs(offset) <= other.get("clock_uncertainty_us", 0):
                offset = 0
            processes.append((other["process"], offset, doc["traceEvents"], f))
        except (OSError, ValueError, KeyError) as e:
            print(f"trace_merge.py: {f}: not a timeline mx wrote ({e})", file=sys.stderr)
            return 1
    processes.sort(key=lambda p: order(p[0]))
    events = []
    for pid, (name, offset, trace, _) in enumerate(processes, start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid,
                       "args": {"sort_index": pid}})
        for e in trace:
            if e.get("ph") == "M":
                continue
            e = dict(e, pid=pid, ts=e["ts"] + offset)
            events.append(e)
    start = min((e["ts"] for e in events if "ts" in e), default=0)
    for e in events:
        if "ts" in e:
            e["ts"] -= start
    with open(output, "w") as fh:
        json.dump({"displayTimeUnit": "ms", "traceEvents": events}, fh)
    print(f"trace_merge.py: {len(processes)} processes, "
          f"{sum(1 for e in events if e.get('ph') == 'X')} events -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
