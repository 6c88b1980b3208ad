#!/usr/bin/env python3
"""Chaos trials against the README job.

  tests/chaos/chaos.py --launch deploy/launch.py \
      --server-binary bazel-bin/server/mx_server --train bazel-bin/worker/mx_train \
      [--trials=50] [--seed=S] [--epochs=10] [--out=results.json]

First runs the job undisturbed (2 workers, 2 servers, dist_sync, the MLP on
Fashion-MNIST, as the README's first command does) for its result and its
duration. Then each trial runs it again and makes one random fault: kill -9
or SIGSTOP of a random worker, server or the coordinator, at a random time
within the undisturbed run's duration (a victim not started yet is hit as
soon as it starts).

A trial passes when the job ends within its time bound with either
- exit code 0 and a result identical to the undisturbed run's (every
  worker's per-epoch metrics and final accuracy; the fault came after the
  victim's work was done), or
- a non-zero exit code, the launcher's first word on the failure naming
  the victim ("server 1 ... failed", "server 1 ... stopped responding"),
and no process of the job is left afterwards. For each trial it records the
outcome, the time from the fault to the launcher's first word on it
(detection) and to the launcher's exit (end), and the processes left.

A kill -9 or SIGSTOP of the coordinator must change nothing either: the
launcher restarts it on its address (a hung one once the nodes say it
stopped answering) and the nodes rejoin it. Except a SIGSTOP before it
listened: its connections are refused as while it starts, and the trial
passes when the job fails at the startup timeout naming it.

With --replicas=2 the job has 3 servers, each key a backup on the next
one, and a server's death (kill -9 or SIGSTOP) must change nothing: the
trial passes only if the job finishes with the undisturbed result, down to
the parameters' checksum. Except a SIGSTOP before the server joined the
job (said it serves): nothing can tell it from a slow start, the job
never forms, and the trial passes as a worker's fault does, when the job
fails at the startup timeout naming the server. For the others it also
records the time from the fault to the first line of training progress
after the failover (resume_s: an upper bound, progress lines come every
100 batches).
With --spare-servers=N too (launch.py's), the spares are victims as well:
a spare's death must change nothing, and a server's death must leave the
job with a spare in its rank (the launcher's log says whether one took
it), finishing with the undisturbed result.
--victims limits the faults to some nodes (e.g. --victims=servers, which
includes the spares). --tls runs every job (the undisturbed one too) with
mutual TLS on every connection, the stream connections included.

--budget bounds the whole run's time: a trial that could not end within
what is left of it is not run, and chaos.py then exits 1 (a test's limit,
such as bazel's, would otherwise kill it in the middle of a job). A stop
signal (SIGTERM, SIGINT, SIGHUP: timeout's, bazel's) kills the job running
then, every process of it, before chaos.py exits: the jobs run in sessions
of their own, out of reach of a signal to chaos.py's process group.

Prints one line per trial and a summary; exits 1 if any trial failed or
was not run.
"""

import argparse
import datetime
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

DATA = "/usr/share/datasets/fashion-mnist"
VICTIMS = ["coordinator", "server 0", "server 1", "worker 0", "worker 1"]
FAULTS = {"kill -9": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}

STAMP = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
STARTED = re.compile(STAMP + r"launch\.py: started (.+) \(pid (\d+)\)$")
# The launcher's first word on a failure: the node it blames.
FAILED = re.compile(STAMP + r"launch\.py: (coordinator|server \d+|spare \d+|worker \d+) \(.*\) "
                    r"(failed|stopped responding)")
# What a run computed: each worker's metrics per epoch (without the time
# they took) and its final accuracy.
RESULT = re.compile(r"\[(worker \d+)\] (Epoch\[\d+\] Train-.*?)(?: Time cost=.*)?$"
                    r"|\[(worker \d+)\] (Final (?:test accuracy|params checksum)=.*)$")
PROGRESS = re.compile(STAMP + r"\[worker \d+\] Epoch\[")
FAILED_OVER = re.compile(STAMP + r"\[worker \d+\] .* was declared dead; its keys are served")
# A server that joined the job: it prints this once every node registered.
# A server that joined the job, or the coordinator that listens.
SERVING = re.compile(STAMP + r"\[(server \d+|spare \d+|coordinator)\] (?:server \d+ serving|"
                     r"spare server waiting|coordinator listening) on ")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launch", required=True, help="deploy/launch.py")
    ap.add_argument("--server-binary", required=True, help="mx_server")
    ap.add_argument("--train", required=True, help="mx_train")
    ap.add_argument("--trials", type=int, default=50, help="faulted runs (default 50)")
    ap.add_argument("--seed", type=int, default=None,
                    help="random seed of the faults (default: from the clock; printed)")
    ap.add_argument("--epochs", type=int, default=10, help="the job's epochs (README: 10)")
    ap.add_argument("--data-dir", default=DATA, help=f"Fashion-MNIST (default {DATA})")
    ap.add_argument("--startup-timeout", type=int, default=20,
                    help="MX_STARTUP_TIMEOUT_S of the jobs: how long the others wait for a "
                         "node that hangs before it registers (default 20; mx's default is 120)")
    ap.add_argument("--replicas", type=int, default=1, choices=[1, 2],
                    help="2: 3 servers with a backup of every key; a server's death must "
                         "change nothing")
    ap.add_argument("--spare-servers", type=int, default=0, metavar="N",
                    help="with --replicas=2: N spare servers (launch.py --spare-servers); one "
                         "takes a dead server's rank, and a spare's death changes nothing too")
    ap.add_argument("--tls", action="store_true",
                    help="run the jobs with mutual TLS on every connection (launch.py --tls)")
    ap.add_argument("--victims", default="all", choices=["all", "servers", "coordinator"],
                    help="the nodes faults may hit (default all)")
    ap.add_argument("--fault", default="any", choices=["any"] + sorted(FAULTS),
                    help="the fault to make (default: a random one)")
    ap.add_argument("--work-dir", default=None, help="where the logs go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the trials as JSON here")
    ap.add_argument("--budget", type=float, default=0, metavar="SECONDS",
                    help="the whole run's time, the undisturbed job's included: trials that "
                         "could not end within it are not run, and chaos.py exits 1 "
                         "(default 0: no bound)")
    args = ap.parse_args(argv)
    if args.trials < 0:
        ap.error("--trials must be >= 0")
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    if args.spare_servers < 0 or (args.spare_servers > 0 and args.replicas < 2):
        ap.error("--spare-servers needs --replicas=2 (and must be >= 0)")
    if args.budget < 0:
        ap.error("--budget must be >= 0")
    return args


def parse_stamp(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def read_lines(path):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def started_pids(lines):
    """The launcher's processes by name, every one it started under that
    name in order (a restarted coordinator or server has several, each to
    be checked for leftovers): {"server 1": [pid, ...]}."""
    pids = {}
    for line in lines:
        m = STARTED.match(line)
        if m:
            pids.setdefault(m[2], []).append(int(m[3]))
    return pids


def result_of(lines):
    """What the run computed, comparable between runs."""
    result = []
    for line in lines:
        m = RESULT.search(line)
        if m:
            result.append(f"{m[1] or m[3]}: {m[2] or m[4]}")
    return sorted(result)


def is_job_process(pid):
    """Whether pid still runs one of the job's programs (not a reused pid,
    not a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0].decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and os.path.basename(argv0) in ("mx_server", "mx_train")


# The Jobs started and not yet cleaned up (Job.leftovers), for stop().
RUNNING = set()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def stop(signum, frame):
    """A stop signal: kills the running job, every process of it (each job
    runs in a session of its own, which a signal to this process's group
    misses), then exits 128 + the signal."""
    for job in list(RUNNING):
        job.kill_everything()
    print(f"chaos.py: stopped by signal {signum}; killed the running job's processes",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)


class Job:
    """One run of the README job through the launcher, its log in `log`."""

    def __init__(self, args, log, bound):
        self.log = log
        self.bound = bound
        servers = "3" if args.replicas > 1 else "2"
        cmd = [sys.executable, args.launch, "--timestamps", "-n", "2", "-s", servers,
               f"--replicas={args.replicas}", f"--spare-servers={args.spare_servers}",
               *(["--tls"] if args.tls else []),
               f"--server-binary={args.server_binary}", "--", args.train,
               "--kvstore=dist_sync", "--network=mlp", f"--epochs={args.epochs}", "--lr=0.2",
               f"--data_dir={args.data_dir}"]
        self.out = open(log, "w")
        self.start = time.time()
        env = dict(os.environ, MX_STARTUP_TIMEOUT_S=str(args.startup_timeout))
        self.popen = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        RUNNING.add(self)

    def lines(self):
        return read_lines(self.log)

    def wait(self):
        """The launcher's exit code, or None if it ran past the bound (then
        it and everything it started are killed)."""
        try:
            code = self.popen.wait(timeout=max(0.0, self.start + self.bound - time.time()))
        except subprocess.TimeoutExpired:
            code = None
            self.kill_everything()
            self.popen.wait()
        self.end = time.time()
        self.out.close()
        return code

    def leftovers(self):
        """The job's processes still running (by the pids the launcher
        logged, every incarnation of each); killed once found."""
        left = [f"{name} (pid {pid})" for name, pids in started_pids(self.lines()).items()
                for pid in pids if is_job_process(pid)]
        self.kill_everything()
        RUNNING.discard(self)
        return left

    def kill_everything(self):
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pids in started_pids(self.lines()).values():
            for pid in pids:
                if is_job_process(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        os.kill(pid, signal.SIGCONT)  # a stopped process dies once continued
                    except ProcessLookupError:
                        pass


def fault(job, victim, sig, at):
    """Sends `sig` to `victim` `at` seconds after the job started (or as
    soon as it has started, if later). The time it was sent, or None if the
    victim had already exited (or never started) by then."""
    time.sleep(max(0.0, job.start + at - time.time()))
    while job.popen.poll() is None:
        # Its latest incarnation: the one running now.
        pid = started_pids(job.lines()).get(victim, [None])[-1]
        if pid is not None:
            if not is_job_process(pid):
                return None
            sent = time.time()
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return None
            return sent
        time.sleep(0.02)
    return None


def resumed_after(lines, fault_at):
    """Seconds from the fault to the first progress line after the
    failover the workers logged, or None."""
    over = next((parse_stamp(m[1]) for m in map(FAILED_OVER.search, lines)
                 if m and parse_stamp(m[1]) >= fault_at), None)
    if over is None:
        return None
    return next((round(parse_stamp(m[1]) - fault_at, 3) for m in map(PROGRESS.search, lines)
                 if m and parse_stamp(m[1]) >= over), None)


def judge(trial, code, lines, reference, must_survive=False):
    """Fills trial["outcome"] and trial["ok"] from the run's exit code and
    log; `must_survive`: only an identical result passes."""
    failure = next((m for m in map(FAILED.search, lines) if m), None)
    if failure is not None and trial["fault_at"] is not None:
        trial["detect_s"] = round(parse_stamp(failure[1]) - trial["fault_at"], 3)
    if trial["fault_at"] is not None and must_survive:
        trial["resume_s"] = resumed_after(lines, trial["fault_at"])
    if code is None:
        trial["outcome"] = f"HUNG: still running after {trial['bound_s']:.0f} s"
    elif code == 0:
        same = result_of(lines) == reference
        trial["outcome"] = "finished, result identical" if same else "finished, RESULT DIFFERS"
        trial["ok"] = same
        return
    elif failure is None:
        trial["outcome"] = f"failed (exit code {code}) without naming a node"
    elif trial["fault_at"] is None:
        trial["outcome"] = f"failed (exit code {code}) naming {failure[2]}, with no fault made"
    elif must_survive:
        trial["outcome"] = (f"failed (exit code {code}) naming {failure[2]}: "
                            "with replicas 2 the job must survive a server's death")
    elif failure[2] != trial["victim"]:
        trial["outcome"] = f"failed (exit code {code}) BLAMING {failure[2]}, not the victim"
    else:
        trial["outcome"] = f"failed (exit code {code}) naming {failure[2]} ({failure[3]})"
        trial["ok"] = True
        return
    trial["ok"] = False


def joined_before(lines, victim, fault_at):
    """Whether server `victim` had joined the job (said it serves), or the
    coordinator listened, before `fault_at`."""
    return any(m and m[2] == victim and parse_stamp(m[1]) <= fault_at
               for m in map(SERVING.search, lines))


def must_survive(args, victim, fault_name, joined=True):
    """Whether the job must end as undisturbed: a server's death with
    replicas 2, and the coordinator's kill -9 or SIGSTOP (the launcher
    restarts it, a hung one once the nodes say it stopped answering, and
    the nodes rejoin it).
    A server that hangs before it joined (`joined` false) is no death the
    backups can absorb: the job never formed, and it ends at the startup
    timeout naming the server (one killed then is started again). So does
    a coordinator that hangs before it listens: its connections are
    refused, as while it starts, so nothing tells it from a slow start."""
    if not joined and fault_name == "SIGSTOP":
        return False
    if victim == "coordinator":
        return True
    return args.replicas > 1 and victim.startswith(("server", "spare"))


def trial_bound(args, duration):
    """A trial's time bound. Generous: a fault makes the job end within
    seconds (15 s for a hung node, the startup timeout for one that hangs
    before registering), or it finishes as undisturbed; past this it is a
    hang."""
    return 2 * duration + args.startup_timeout + 30


def run_trial(args, index, rng, reference, duration):
    victims = (VICTIMS + (["server 2"] if args.replicas > 1 else [])
               + [f"spare {i}" for i in range(args.spare_servers)])
    if args.victims != "all":
        kinds = ("server", "spare") if args.victims == "servers" else (args.victims,)
        victims = [v for v in victims if v.startswith(kinds)]
    victim = rng.choice(victims)
    fault_name = rng.choice(sorted(FAULTS)) if args.fault == "any" else args.fault
    at = rng.uniform(0, duration)
    bound = trial_bound(args, duration)
    job = Job(args, os.path.join(args.work_dir, f"trial{index}.log"), bound)
    trial = {"trial": index, "victim": victim, "fault": fault_name, "planned_at_s": round(at, 3),
             "bound_s": bound, "fault_at": None, "detect_s": None, "end_s": None, "ok": False,
             "log": job.log}
    trial["fault_at"] = fault(job, victim, FAULTS[fault_name], at)
    if trial["fault_at"] is not None:
        trial["fault_after_start_s"] = round(trial["fault_at"] - job.start, 3)
    code = job.wait()
    trial["exit_code"] = code
    if trial["fault_at"] is not None:
        trial["end_s"] = round(job.end - trial["fault_at"], 3)
    time.sleep(0.5)  # what the launcher stopped has gone by now
    trial["left"] = job.leftovers()
    lines = job.lines()
    joined = trial["fault_at"] is None or joined_before(lines, victim, trial["fault_at"])
    judge(trial, code, lines, reference, must_survive=must_survive(args, victim, fault_name, joined))
    if trial["left"]:
        trial["ok"] = False
        trial["outcome"] += f"; LEFT RUNNING: {', '.join(trial['left'])}"
    return trial


def describe(t):
    when = ("(the victim had exited)" if t["fault_at"] is None
            else f"at {t['fault_after_start_s']:.1f} s")
    times = ""
    if t["detect_s"] is not None:
        times += f", detected in {t['detect_s']:.2f} s"
    if t.get("resume_s") is not None:
        times += f", training went on {t['resume_s']:.2f} s after the fault"
    if t["end_s"] is not None:
        times += f", ended {t['end_s']:.2f} s after the fault"
    return (f"trial {t['trial']}: {t['fault']} {t['victim']} {when}: "
            f"{'ok' if t['ok'] else 'FAIL'}: {t['outcome']}{times}")


def main(argv):
    args = parse_args(argv)
    began = time.time()
    # What is left of --budget, less what a job's end and cleanup take.
    time_left = lambda: (args.budget - (time.time() - began) - 5 if args.budget
                         else float("inf"))
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    if not os.path.isfile(os.path.join(args.data_dir, "train-images-idx3-ubyte.gz")):
        print(f"chaos.py: no Fashion-MNIST in {args.data_dir} "
              "(apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return 1
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="mx-chaos-")
    os.makedirs(args.work_dir, exist_ok=True)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    print(f"chaos.py: seed {seed}, {args.trials} trials, logs in {args.work_dir}", flush=True)

    base = Job(args, os.path.join(args.work_dir, "undisturbed.log"), min(600, time_left()))
    code = base.wait()
    left = base.leftovers()
    reference = result_of(base.lines())
    if code != 0 or left or not reference:
        print(f"chaos.py: the undisturbed job failed (exit code {code}, left {left}); "
              f"see {base.log}", file=sys.stderr)
        return 1
    duration = base.end - base.start
    print(f"undisturbed: {duration:.1f} s, {len(reference)} result lines", flush=True)

    trials = []
    for i in range(args.trials):
        if time_left() < trial_bound(args, duration):
            print(f"chaos.py: trials {i} to {args.trials - 1} not run: the --budget of "
                  f"{args.budget:g} s would not cover their time bound "
                  f"({trial_bound(args, duration):.0f} s each)", flush=True)
            break
        trials.append(run_trial(args, i, rng, reference, duration))
        print(describe(trials[-1]), flush=True)
    not_run = args.trials - len(trials)
    bad = [t for t in trials if not t["ok"]]
    detect = sorted(t["detect_s"] for t in trials if t["detect_s"] is not None)
    summary = f"{len(trials) - len(bad)} of {args.trials} trials ok"
    if not_run:
        summary += f" ({not_run} not run)"
    if detect:
        summary += (f"; detection p50 {detect[len(detect) // 2]:.2f} s, "
                    f"max {detect[-1]:.2f} s")
    resume = sorted(t["resume_s"] for t in trials if t.get("resume_s") is not None)
    if resume:
        summary += (f"; training went on after a server's death: p50 "
                    f"{resume[len(resume) // 2]:.2f} s, max {resume[-1]:.2f} s")
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seed": seed, "undisturbed_s": round(duration, 3), "not_run": not_run,
                       "trials": trials}, f, indent=1)
    return 1 if bad or not_run else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
