#!/usr/bin/env python3
"""dist_bench's transport figures as jobs run: the coordinator and the
servers are mx_server processes and every worker a process of its own
(`dist_bench --job`), started by deploy/launch.py on 127.0.0.1, with 1
server and 1 worker, then 2 and 2: first with values over TCP
(--no-shm), then through shared memory, as jobs on one host run (names
ending in _procs_shm; 16 MiB values must move at twice loopback TCP's
rate). Rank 0 times every figure against its baselines (loopback TCP, a
plain gRPC call), measured in the same run, and prints the BENCH lines,
whose names end in _procs; this prints them.

Usage: bench/dist_procs_bench.py [FILTER]  (after bazel build
//bench:dist_bench //server:mx_server; bench/run_all.sh does both)
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    only = sys.argv[1:2]
    failed = False
    for shm, nodes in ((False, 1), (False, 2), (True, 1), (True, 2)):
        cmd = [sys.executable, os.path.join(ROOT, "deploy/launch.py"), "-n", str(nodes),
               "-s", str(nodes), "--server-binary", os.path.join(ROOT, "bazel-bin/server/mx_server"),
               *([] if shm else ["--no-shm"]),
               "--", os.path.join(ROOT, "bazel-bin/bench/dist_bench"), "--job", *only]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        for line in run.stdout.splitlines():
            m = re.match(r"\[worker 0\] (BENCH .*)", line)
            if m:
                print(m.group(1), flush=True)
        if run.returncode != 0:
            failed = True
            print(f"dist_procs_bench: the {nodes}+{nodes} job failed (exit {run.returncode}):\n"
                  + (run.stdout + run.stderr)[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
