#!/usr/bin/env python3
"""How long training stops when a parameter server dies, with replicas 2.

  bench/failover_bench.py [TRIALS] [BASELINE_TRIALS]

Runs tests/chaos/chaos.py against the README job (2 workers, 3 servers,
dist_sync, --replicas=2, 5 epochs): TRIALS (default 10) kill -9s of a
random server at a random time, then BASELINE_TRIALS (default 3) SIGSTOPs.
For each it takes the time from the fault to the first progress line the
workers print after the failover (an upper bound: progress lines come every
100 batches). A killed server is found at once (a worker's call fails, it
reports the server, the coordinator health-checks it); a stopped one keeps
its connections open and is found only when its heartbeats are late, as a
parameter server without that probe finds any death: the heartbeat timeout
(5 s). That is the baseline, measured in the same run. Prints two BENCH
lines, the p50 and the max over the kill -9 trials (ratio = baseline p50 /
value, bigger is better; the issue's target is value <= 3 s). A trial that
failed (the job did not survive the fault, hung, or left a process) has no
time to count: the p50 and max are of the others, and the count of failed
trials is printed; then, or when chaos.py itself fails, it exits 1.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resume_times(fault, trials, work_dir):
    """(the resume_s of each trial of `fault` that survived, sorted; how many
    trials failed or were not run)."""
    out = os.path.join(work_dir, f"{fault.replace(' ', '')}.json")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests/chaos/chaos.py"),
         "--launch", os.path.join(ROOT, "deploy/launch.py"),
         "--server-binary", os.path.join(ROOT, "bazel-bin/server/mx_server"),
         "--train", os.path.join(ROOT, "bazel-bin/worker/mx_train"),
         f"--trials={trials}", "--replicas=2", "--victims=servers", f"--fault={fault}",
         "--epochs=5", "--seed=1", f"--work-dir={os.path.join(work_dir, fault.replace(' ', ''))}",
         f"--out={out}"], check=False)
    try:
        with open(out) as f:
            results = json.load(f)["trials"]
    except (OSError, ValueError, KeyError):
        print(f"failover_bench: chaos.py ({fault}) exited {run.returncode} without its "
              "results", file=sys.stderr)
        return [], trials
    failed = [t for t in results if not t["ok"]]
    if failed:
        print(f"failover_bench: {len(failed)} of {trials} {fault} trial(s) failed: "
              + "; ".join(t["outcome"] for t in failed), file=sys.stderr)
    not_run = trials - len(results)
    if not_run:
        print(f"failover_bench: {not_run} of {trials} {fault} trial(s) not run",
              file=sys.stderr)
    return (sorted(t["resume_s"] for t in results if t.get("resume_s") is not None),
            len(failed) + not_run)


def main():
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    baseline_trials = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    work_dir = tempfile.mkdtemp(prefix="mx-failover-bench-")
    killed, killed_failed = resume_times("kill -9", trials, work_dir)
    stopped, stopped_failed = resume_times("SIGSTOP", baseline_trials, work_dir)
    if not killed or not stopped:
        print("failover_bench: no failover was measured (the fault came after the job's end?); "
              f"logs in {work_dir}", file=sys.stderr)
        return 1
    baseline = stopped[len(stopped) // 2]
    for name, value in (("p50", killed[len(killed) // 2]), ("max", killed[-1])):
        print(f"BENCH name=failover_resume_{name} value={value:.2f} unit=s "
              f"baseline={baseline:.2f} ratio={baseline / value:.3f} target=value<=3", flush=True)
    # A failed trial is a failover that did not happen: its time is not in
    # the p50 or the max above, which then say nothing of it.
    print(f"failover_bench: failed trials: {killed_failed} of {trials} kill -9, "
          f"{stopped_failed} of {baseline_trials} SIGSTOP; logs in {work_dir}", flush=True)
    return 1 if killed_failed or stopped_failed else 0


if __name__ == "__main__":
    sys.exit(main())
