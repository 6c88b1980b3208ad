#!/usr/bin/env python3
"""Scale on one machine: dist_sync jobs of many worker and server processes
on 127.0.0.1 (deploy/launch.py, the coordinator and every node a process of
its own), each worker running bench/scale_worker (a small model's pushpulls,
its pulled values checked) for a fixed time.

For each job it samples every process once a second from /proc (resident
memory, open file descriptors, CPU time) and the coordinator's metrics
(calls it answered), and reports:
- errors: the launcher's exit code, a worker that did not report, or any
  line that says error or failed (target 0);
- resident memory per role (median and max, MB) and its growth after the
  warm-up (the first third): the largest of any process between the
  highest in the first and in the second half of the rest (target <= 5%;
  a process without two samples there has no figure, which --check counts
  as a miss: a growth not measured is no growth within the target);
- file descriptors per process (max);
- the coordinator's CPU (% of one core) and the calls it answers per
  second;
- the step time (median over workers of their median step).

Usage:
  bench/scale_bench.py               # the sweep (workers 1..64 with 4
                                     # servers, servers 1..8 with 16
                                     # workers, 20 s each), then 64 workers
                                     # and 8 servers for 180 s
  bench/scale_bench.py --jobs 16x4 --seconds 30 --check
                                     # one job; exit 1 if a target is missed
                                     # (tests/integration/scale_test.sh)

Every figure is a BENCH line; the step time's baseline is the same sweep's
first job (ratio: how much faster than it relative to the workers added,
informational), growth and errors carry their targets.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTED = re.compile(r"launch\.py: started (coordinator|server \d+|worker \d+) \(pid (\d+)\)")
METRICS = re.compile(r"\[(coordinator|server \d+)\] [^:]*: metrics on (http://\S+)")
REPORT = re.compile(r"\[worker (\d+)\] scale_worker: rank \d+ steps (\d+) step_ms p50 ([0-9.e+-]+)")
# Errors, and a coordinator taken for hung (a node's "has not answered",
# the launcher's restart): under this load it must still answer in time.
BAD = re.compile(r"error|failed|FAIL|has not answered|stopped answering", re.IGNORECASE)
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def sample(pid):
    """(resident bytes, open fds, CPU seconds) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds, cpu
    except (OSError, IndexError, ValueError):
        return None


def answered_calls(url):
    """The coordinator's answered calls so far (mx_rpc_server_handled_total)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mx_rpc_server_handled_total{"))


class Job:
    """One launch.py job, its output read on a thread, its processes
    sampled every second."""

    def __init__(self, workers, servers, seconds, binaries):
        self.workers, self.servers, self.seconds = workers, servers, seconds
        self.lines, self.pids, self.metrics_urls = [], {}, {}
        self.samples = {}  # who -> [(time, rss, fds, cpu)]
        self.calls = {}    # who -> [(time, answered calls)]: the coordinator, servers
        launch, server, worker = binaries
        cmd = [sys.executable, launch, "-n", str(workers), "-s", str(servers), "--metrics",
               "--server-binary", server, "--", worker, f"--seconds={seconds}"]
        env = dict(os.environ, MX_STARTUP_TIMEOUT_S="300")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.reader = threading.Thread(target=self.read)
        self.reader.start()

    def read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = STARTED.search(line)
            if m:
                self.pids[m.group(1)] = int(m.group(2))
            m = METRICS.search(line)
            if m:
                self.metrics_urls[m.group(1)] = m.group(2)

    def run(self):
        """Samples until the job ends (at most seconds + 300 s)."""
        deadline = time.time() + self.seconds + 300
        while self.proc.poll() is None and time.time() < deadline:
            now = time.time()
            for who, pid in list(self.pids.items()):
                s = sample(pid)
                if s is not None:
                    self.samples.setdefault(who, []).append((now, *s))
            for who, url in list(self.metrics_urls.items()):
                calls = answered_calls(url)
                if calls is not None:
                    self.calls.setdefault(who, []).append((now, calls))
            time.sleep(1)
        if self.proc.poll() is None:
            # The launcher stops its job on SIGTERM; SIGKILL if it does not.
            self.lines.append("scale_bench: the job did not end in time: stopped")
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()
        return self.report()

    def steady(self, points):
        """The samples of the run's steady part: after the warm-up (the
        first third of the workers' time) and before the workers end."""
        if not points:
            return []
        start = points[0][0]
        return [p for p in points if start + self.seconds / 3 <= p[0] <= start + self.seconds]

    def report(self):
        reports = {int(m.group(1)): (int(m.group(2)), float(m.group(3)))
                   for m in map(REPORT.search, self.lines) if m}
        errors = []
        if self.proc.returncode != 0:
            errors.append(f"launch.py exited {self.proc.returncode}")
        missing = self.workers - len(reports)
        if missing:
            errors.append(f"{missing} workers did not report")
        errors += [l for l in self.lines if BAD.search(l)][:5]
        growth, rss, fds = {}, {}, {}
        for who, points in self.samples.items():
            role = who.split()[0]
            fds.setdefault(role, []).append(max(p[2] for p in points))
            steady = self.steady(points)
            if len(steady) >= 2:
                # The high-water marks of the steady part's two halves: a
                # server's memory in use swings by a third with the
                # pushes it holds at a moment (64 workers), so single
                # samples would compare swings, while anything that grows
                # with time raises the second half's mark.
                half = len(steady) // 2
                first = max(p[1] for p in steady[:half])
                last = max(p[1] for p in steady[half:])
                growth[who] = (last - first) / first
                rss.setdefault(role, []).append(last)
        return {
            "errors": errors,
            "step_ms": median(p for _, p in reports.values()) if reports else float("nan"),
            "steps": sum(n for n, _ in reports.values()),
            "growth": growth,
            # Processes started without a growth figure (fewer than two
            # steady samples: never sampled, or ended early).
            "no_growth": sorted(who for who in self.pids if who not in growth),
            "rss": rss,
            "fds": fds,
            "coordinator_cpu": per_second(self.steady(self.samples.get("coordinator", [])), 3),
            "coordinator_calls_per_s": per_second(self.steady(self.calls.get("coordinator", [])), 1),
            # The servers' CPU per call answered (workers' pushpulls and
            # heartbeats alike), all servers together.
            "server_us_per_call": 1e6 * sum_rates(self, "server", 3) /
                                  max(sum_rates(self, "server", 1, self.calls), 1e-9),
        }


def sum_rates(job, role, field, series=None):
    """The sum over the processes of `role` of per_second of their steady
    samples (job.samples, or `series`)."""
    series = job.samples if series is None else series
    return sum(per_second(job.steady(points), field)
               for who, points in series.items() if who.split()[0] == role)


def per_second(points, field):
    """How fast points[i][field] grew from the first point to the last
    (each point's [0] is its time), 0 without two points."""
    if len(points) < 2:
        return 0.0
    return (points[-1][field] - points[0][field]) / (points[-1][0] - points[0][0])


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def bench(name, value, unit, baseline, ratio, target):
    print(f"BENCH name={name} value={value:.4g} unit={unit} baseline={baseline:.4g} "
          f"ratio={ratio:.4g} target={target}", flush=True)


def print_job(r, workers, servers, base_ms):
    tag = f"{workers}w_{servers}s"
    # Ratio: the step time the first job's would give if it grew with the
    # workers (base * workers / first job's workers) over this one's.
    bench(f"scale_step_{tag}", r["step_ms"], "ms", base_ms, base_ms / r["step_ms"], "info")
    worst = max(r["growth"].items(), key=lambda kv: kv[1], default=("none", float("nan")))
    bench(f"scale_rss_growth_{tag}", 100 * worst[1], "%", 5.0,
          5.0 / max(100 * worst[1], 1e-9), "<=5")
    for role, values in sorted(r["rss"].items()):
        bench(f"scale_rss_{role}_{tag}", median(values) / 1e6, "MB", max(values) / 1e6, 1.0,
              "info(baseline=max)")
    for role, values in sorted(r["fds"].items()):
        bench(f"scale_fds_{role}_{tag}", max(values), "fds", median(values), 1.0,
              "info(baseline=median)")
    bench(f"scale_coordinator_cpu_{tag}", 100 * r["coordinator_cpu"], "%core", 100.0,
          1.0 / max(r["coordinator_cpu"], 1e-9), "info")
    bench(f"scale_coordinator_calls_{tag}", r["coordinator_calls_per_s"], "calls/s", 0.0, 1.0,
          "info")
    bench(f"scale_server_cpu_per_call_{tag}", r["server_us_per_call"], "us", 0.0, 1.0, "info")
    bench(f"scale_errors_{tag}", len(r["errors"]), "errors", 0, 1.0 if not r["errors"] else 0.0,
          "0")
    for e in r["errors"]:
        print(f"scale_bench: {tag}: {e}", flush=True)
    if r["no_growth"]:
        print(f"scale_bench: {tag}: no memory growth figure (fewer than 2 samples after the "
              f"warm-up) for {len(r['no_growth'])} process(es): {', '.join(r['no_growth'])}",
              flush=True)
    print(f"scale_bench: {tag}: {r['steps']} steps in all; largest growth {worst[0]}",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", help="comma-separated WORKERSxSERVERS (default: the sweep, "
                                   "then 64x8 for --long-seconds)")
    ap.add_argument("--seconds", type=float, default=20, help="each job's workers' time")
    ap.add_argument("--long-seconds", type=float, default=180, help="the 64x8 job's time")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a job has an error, a process grows more than "
                         "--max-growth, or a process's growth was not measured")
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--launch", default=os.path.join(ROOT, "deploy/launch.py"))
    ap.add_argument("--server-binary", default=os.path.join(ROOT, "bazel-bin/server/mx_server"))
    ap.add_argument("--worker", default=os.path.join(ROOT, "bazel-bin/bench/scale_worker"))
    args = ap.parse_args()
    if args.jobs:
        jobs = [(tuple(map(int, j.split("x"))), args.seconds) for j in args.jobs.split(",")]
    else:
        jobs = ([((w, 4), args.seconds) for w in (1, 2, 4, 8, 16, 32, 64)] +
                [((16, s), args.seconds) for s in (1, 2, 8)] +
                [((64, 8), args.long_seconds)])
    failed = False
    base = None
    for (workers, servers), seconds in jobs:
        r = Job(workers, servers, seconds, (args.launch, args.server_binary, args.worker)).run()
        if base is None:
            base = (r["step_ms"], workers)
        print_job(r, workers, servers, base[0] * workers / base[1])
        worst = max(r["growth"].values(), default=0.0)
        if r["errors"] or worst > args.max_growth or r["no_growth"]:
            failed = True
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
