#!/usr/bin/env python3
"""Launches a distributed mx job on this machine, like MXNet's tools/launch.py.

  deploy/launch.py -n 2 -s 2 [--kvstore dist_sync] -- bazel-bin/worker/mx_train --kvstore=dist_sync

Starts a coordinator, S parameter servers and N workers (the command after
--) as local processes on 127.0.0.1, with the DMLC_* / MX_COORDINATOR
environment the workers' KVStore reads. Every output line is prefixed with
the process's role and rank. When every worker has exited 0 the servers and
the coordinator are stopped and the launcher exits 0. If any process fails,
the others are stopped and the launcher exits with that process's code,
saying which one failed. Ctrl-C stops everything.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    def __init__(self):
        self.procs = []  # (name, Popen)
        self.lock = threading.Lock()

    def start(self, name, cmd, env):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        threading.Thread(target=self._pump, args=(name, p), daemon=True).start()
        self.procs.append((name, p))
        return p

    def _pump(self, name, p):
        for line in iter(p.stdout.readline, b""):
            with self.lock:
                sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
                sys.stdout.flush()

    def stop_all(self, grace=3.0):
        for _, p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for _, p in self.procs:
            while p.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def blas_threads(local_workers):
    """BLAS threads for each of `local_workers` processes on this machine.

    Every worker's BLAS would otherwise start one thread per core, and their
    threads spin while waiting: with 2 workers on 2 cores a dist_sync MLP
    step took 1.5x as long (and most of the time went to the kernel). A
    value the user set is kept.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return {}
    n = str(max(1, (os.cpu_count() or 1) // local_workers))
    return {"OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num-workers", type=int, required=True)
    ap.add_argument("-s", "--num-servers", type=int, required=True)
    ap.add_argument("--kvstore", default="dist_sync", choices=["dist_sync", "dist_async"])
    ap.add_argument("--server-binary", default="bazel-bin/server/mx_server")
    ap.add_argument("--elastic", action="store_true", help="servers continue without dead workers")
    ap.add_argument("--heartbeat-timeout", type=int, default=5)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- worker command")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the worker command after --")
    if args.num_workers < 1 or args.num_servers < 1:
        ap.error("-n and -s must be at least 1")
    if not os.access(args.server_binary, os.X_OK):
        ap.error(f"server binary {args.server_binary} not found (bazel build //server:mx_server)")

    port = free_port()
    env = dict(os.environ, DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(port),
               MX_COORDINATOR=f"127.0.0.1:{port}", DMLC_NUM_SERVER=str(args.num_servers),
               DMLC_NUM_WORKER=str(args.num_workers))
    job = Job()
    signal.signal(signal.SIGINT, lambda *_: (job.stop_all(), sys.exit(130)))
    signal.signal(signal.SIGTERM, lambda *_: (job.stop_all(), sys.exit(143)))
    mode = "sync" if args.kvstore == "dist_sync" else "async"
    common = [f"--heartbeat_timeout_s={args.heartbeat_timeout}"]
    job.start("coordinator", [args.server_binary, "--role=coordinator",
                              f"--bind=127.0.0.1:{port}"] + common, dict(env, DMLC_ROLE="scheduler"))
    for i in range(args.num_servers):
        job.start(f"server {i}", [args.server_binary, "--role=server", "--bind=127.0.0.1:0",
                                  f"--mode={mode}"] + (["--elastic"] if args.elastic else []),
                  dict(env, DMLC_ROLE="server"))
    worker_env = dict(env, DMLC_ROLE="worker", **blas_threads(args.num_workers))
    workers = [job.start(f"worker {i}", cmd, worker_env) for i in range(args.num_workers)]
    # Fail fast: the first process to fail stops the job.
    while True:
        for name, p in job.procs:
            code = p.poll()
            if code is not None and code != 0:
                time.sleep(0.2)  # let its last lines through
                print(f"launch.py: {name} failed with exit code {code}; stopping the job",
                      file=sys.stderr)
                job.stop_all()
                sys.exit(code if code > 0 else 1)
        if all(w.poll() == 0 for w in workers):
            time.sleep(0.2)
            job.stop_all()
            print("launch.py: all workers finished", file=sys.stderr)
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
