#!/usr/bin/env python3
"""Launches a distributed mx job on this machine, like MXNet's tools/launch.py.

  deploy/launch.py -n 2 -s 2 [--kvstore dist_sync] [--elastic] -- bazel-bin/worker/mx_train --kvstore=dist_sync

Starts a coordinator, S parameter servers and N workers (the command after
--) as local processes on 127.0.0.1, with the DMLC_* / MX_COORDINATOR
environment the workers' KVStore reads. Every output line is prefixed with
the process's role and rank ("server 1"): each server and worker asks the
coordinator for its index as its rank (MX_RANK). The launcher's own
messages (on stderr, "launch.py: ...") add what the process said about
itself (a server's address) and its pid.

Success: when every worker has exited 0 (mx_train leaves the job when it is
done, and says "worker N: left the job"), the servers and the coordinator
shut down on their own (each logs "every worker finished; shutting down"
and exits 0; any still running 5 s later is stopped with SIGTERM and
reported) and the launcher exits 0. Workers
that all exit 0 without the coordinator having seen them finish (they never
joined the job: a worker command `true`, an mx_train with --kvstore=local
inside a wrapper script, `mx_train --help`) leave it waiting: the launcher
stops it, says the job never ran, and exits 1.

Failure: when a process fails (a worker that exits non-zero or is killed, a
server or the coordinator that exits at all, unless restarted), the launcher says which,
waits up to 1.2 x --heartbeat-timeout + 3 seconds for the workers to stop on
their own (they learn of the failure through their RPCs or the
coordinator's heartbeats and print an error naming the node), then stops
everything still running and exits with the process's exit code (1 if it
was killed by a signal or exited 0).

Spare servers (--spare-servers=N, with --replicas=2): N more servers that
wait; when a server dies, one takes its rank, and the servers that held
keys alone since give it copies of them while training goes on: the keys
have two copies again, and the job survives the death of another server,
even a neighbour of the first. A spare's death is logged like a server's;
a spare the coordinator says went silent (hung) is killed.

Coordinator restarts (--coordinator-restarts, default 1): a coordinator
killed by a signal is started again on its address, and so is one that
hangs: when at least half of the running nodes say it took a call and did
not answer it (2 s), the launcher kills it and starts it again. The servers and
workers go on training meanwhile (it holds no parameter state) and rejoin
it, keeping their ranks. One killed before it said where it listens is
started again too, before any other node (it may take another port). A
node that hears nothing from the coordinator for MX_COORDINATOR_TIMEOUT_S
(default 6 s; servers 2 s more) gives it up and fails, naming it. A coordinator that exits with an error (the job
failed) is not restarted. A server killed by a signal before it served
(while the job was forming; it held nothing) is started again, once, with
its rank.

Replicas (--replicas=2): servers run with --replicas=2 and the workers
with MX_REPLICAS=2; each key has a backup on the next server, and a
server's death is logged and the job continues (its keys' backups take
over); a server declared dead that still runs (hung, cut off) is killed.
Two neighbouring servers dying loses keys: the workers fail, naming them.

Bounded staleness (--staleness=S, dist_sync): servers run with
--staleness=S and the workers with MX_STALENESS=S; a worker's pull after
its t-th push of a key waits only for step t - S, so no worker runs more
than S steps ahead of the slowest. Steps are still summed in rank order:
S = 0 is dist_sync.

Elastic (--elastic): servers and the coordinator run with --elastic and the
workers with MX_ELASTIC=1; a worker's death is logged and the job continues
with the others. The job succeeds (exit 0) when every other worker finishes
with exit code 0; a server's death (without --replicas 2), the
coordinator's once its restarts are used up, and the death of every worker
are still fatal.

Other machines (-H HOSTFILE, one host per line, `#` comments): each
process runs through `ssh HOST` (--ssh to use another command) in the
current directory, which must hold the same binaries and data on every
host. The coordinator runs on the first host, listening on --port (default
9091); servers and workers go round-robin over the hosts, servers
advertising their host's name. Every process is started with `ssh -tt`, so
stopping the launcher hangs up its remote processes, under `sh`, whose exit
code 128 + N says it was killed by signal N (ssh's own would be 255). Give
--token-file (and with TLS --tls-cert, --tls-key and --tls-ca): see Trust.

Trust: every process gets the job token (a random secret the launcher
makes, or --token-file) through a file named in its environment
(MX_JOB_TOKEN_FILE), never in its arguments; servers and the coordinator
refuse calls without it. With --tls every connection is mutual TLS: the
launcher makes a CA and a certificate per process with openssl (or uses
--tls-cert/--tls-key/--tls-ca for every process). Secrets live in a
private directory (mode 0700, files 0600) removed when the launcher ends.
With -H every host reads the token file and the TLS files at the paths
this host names: -H is refused without --token-file, and --tls without
--tls-cert/--tls-key/--tls-ca (what the launcher makes stays on its host);
put them in a shared directory, or copy them to each host.

Metrics: with --metrics every process serves Prometheus metrics (and
/healthz) on a free port and prints "<who>: metrics on http://HOST:PORT/metrics".

Timeline: with --trace DIR every process writes Chrome trace events into
DIR when it ends; deploy/trace_merge.py DIR writes them as one file.

Shared memory: on one host (no -H) the workers hand each server a segment
of shared memory through a private directory under /dev/shm (MX_SHM_DIR;
mode 0700, removed when the launcher ends), and dense values of 16 KiB or
more travel through it instead of TCP (docs/architecture.md, "Shared
memory"). --no-shm turns it off.

Ctrl-C (or SIGTERM, SIGHUP) stops everything (exit code 130, 143, 129), and
so does a closed stdout (`launch.py ... | head`: 141, as for SIGPIPE). The
processes get /dev/null as stdin.
"""
import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from job_args import (add_job_arguments, add_worker_command, check_worker_kvstore, server_mode,
                      worker_command)
from job_secrets import JobSecrets


# How long the coordinator may take to say where it listens (it says so
# as soon as it does; through ssh, after the connection's set-up).
COORDINATOR_LISTENS_WITHIN_S = 30


def await_coordinator(job, coordinator, env, restarts):
    """Waits until `coordinator` says where it listens, so that no server
    of the job, binding port 0, can take its port first (seen in CI, when
    the launcher chose a free port and closed it before the coordinator
    bound it). Started on port 0 (env's DMLC_PS_ROOT_PORT), it took a free
    one: puts that address in `env` for the other nodes and in its own
    command, so that a restart takes the same port. Killed by a signal
    before it listened, it is started again (nobody knew its address yet)
    while `restarts` (what is left of --coordinator-restarts) allows.
    Returns the restarts left once it listens, or None if it exited or
    said nothing in time (then it is stopped: supervise reports it)."""
    deadline = time.time() + COORDINATOR_LISTENS_WITHIN_S
    while coordinator.listening is None:
        code = coordinator.poll()
        if code is not None:
            if code >= 0 or restarts <= 0:
                return None
            restarts -= 1
            restart_coordinator(job, coordinator, f"died before it listened: {how_it_ended(code)}",
                                restarts, listened=False)
        elif time.time() > deadline:
            log(f"{coordinator.describe()} did not say where it listens within "
                f"{COORDINATOR_LISTENS_WITHIN_S} s; stopping it")
            signal_group(coordinator, signal.SIGKILL)
            coordinator.popen.wait()
            return None
        time.sleep(0.01)
    if env["DMLC_PS_ROOT_PORT"] != "0":
        return restarts
    port = coordinator.listening.rsplit(":", 1)[1]
    env.update(DMLC_PS_ROOT_PORT=port,
               MX_COORDINATOR=host_port(env["DMLC_PS_ROOT_URI"], port))
    cmd, its_env = coordinator.argv
    cmd = [re.sub(r":0$", f":{port}", a) if a.startswith("--bind=") else a for a in cmd]
    coordinator.argv = (cmd, dict(its_env, DMLC_PS_ROOT_PORT=port,
                                  MX_COORDINATOR=env["MX_COORDINATOR"]))
    return restarts


# --timestamps: every line the launcher prints starts with the time.
TIMESTAMPS = False


def stamp():
    """"2026-12-04T18:23:01.123Z " with --timestamps, else ""."""
    if not TIMESTAMPS:
        return ""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z "


def log(message):
    try:
        print(f"{stamp()}launch.py: {message}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        to_devnull(sys.stderr)


def console(text):
    """Writes a line of a process's output to stdout. Once stdout has no
    reader (EPIPE), writes go to /dev/null: the write's SIGPIPE stops the
    job (STOP_SIGNALS), and meanwhile the threads that copy the processes'
    output must go on reading their pipes, which would otherwise fill and
    block the processes."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        to_devnull(sys.stdout)


def to_devnull(stream):
    """Points `stream`'s file descriptor, whose reader is gone, at /dev/null,
    so that its buffered text and later writes (Python's last flush
    included) go nowhere instead of failing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def how_it_ended(code):
    """'exit code 3' or 'killed by signal 9 (SIGKILL)' for a Popen returncode."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    return f"killed by signal {-code} ({name})"


# The first line a daemon or a worker prints about itself, and what it tells
# about the process: its rank (and a server's address).
IDENTITY = [
    (re.compile(r"^server (\d+) serving on (\S+)"), lambda m: f"rank {m[1]} at {m[2]}"),
    (re.compile(r"^worker (\d+) of \d+"), lambda m: f"rank {m[1]}"),
    (re.compile(r"^spare server waiting on (\S+)"), lambda m: f"a spare at {m[1]}"),
]


# The coordinator's first line: where it listens.
COORDINATOR_LISTENING = re.compile(r"^coordinator listening on (\S+)")


# What a node's error says about another node it found dead: "server 1
# (127.0.0.1:4711) died", "worker 1 died", "worker(s) 0, 1 died", "the coordinator at
# 127.0.0.1:9000 is unreachable". Each gives the launcher's names.
BLAME = [
    (re.compile(r"\b(server|worker) (\d+)(?: \([^)]*\))? died"), lambda m: [f"{m[1]} {m[2]}"]),
    (re.compile(r"\bworker\(s\) ([\d, ]+) died"),
     lambda m: [f"worker {r.strip()}" for r in m[1].split(",") if r.strip()]),
    (re.compile(r"\bthe coordinator at \S+ is unreachable"), lambda m: ["coordinator"]),
    # A connection whose keepalive pings went unanswered (a hung server, a
    # partition): "... on server 1 (127.0.0.1:4711): the connection stopped answering".
    (re.compile(r"\bon server (\d+) \([^)]*\): the connection stopped answering"),
     lambda m: [f"server {m[1]}"]),
    # Registration: a node that never came (hung or lost before it
    # registered), or a coordinator that never answered.
    (re.compile(r"\bregister: (.+?) did not register in time"),
     lambda m: [f"{role} {rank}" for role, ranks in re.findall(r"(server|worker)s? ([\d, ]+)", m[1])
                for rank in ranks.replace(",", " ").split()]),
    (re.compile(r"\bregistering with the coordinator at \S+ nothing answered"),
     lambda m: ["coordinator"]),
]


# A node's word that the coordinator took a heartbeat and did not answer it
# (rpc/coordinator_client.h): hung, or cut off from that node.
COORDINATOR_SILENT = re.compile(
    r"^(?:server|worker) \S+: the coordinator at \S+ has not answered for")


# A worker's word that the coordinator acknowledged its leaving the job
# (DistKVStore::Finish): the coordinator has seen it finish.
LEFT_JOB = re.compile(r"^worker \d+: left the job")


# A worker's word that the coordinator declared a server dead (replicas 2:
# the job goes on without it), or the coordinator's about a spare that went
# silent: the server's identity (as IDENTITY gives it).
DECLARED_DEAD = [
    (re.compile(r"^worker \d+: server (\d+) \((\S+)\) was declared dead; its keys are served"),
     lambda m: f"rank {m[1]} at {m[2]}"),
    (re.compile(r"^mx_server: coordinator: the spare server at (\S+) stopped sending heartbeats"),
     lambda m: f"a spare at {m[1]}"),
]


class Proc:
    def __init__(self, name, role, popen, argv, node=None, remote=False):
        self.name = name          # "server 1": role and rank ("server 1 on HOST" with -H)
        self.node = node or name  # "server 1" even with -H: how the nodes' output names it
        self.remote = remote      # started through ssh (-H)
        self.role = role          # "coordinator", "server" or "worker"
        self.popen = popen
        self.argv = argv          # (cmd, env) it was started with, to restart it
        self.identity = None      # "rank 0 at 127.0.0.1:4711", once it joined the job
        self.listening = None     # a coordinator's "127.0.0.1:4711", once it said so
        self.pump = None          # the thread copying its output
        self.blamed = []          # nodes its output said were dead, in order
        self.declared_dead = set()  # identities of servers it heard were declared dead
        self.started_at = None    # time.time() of its (last) start
        self.coordinator_silent_at = None  # when it said the coordinator stopped answering
        self.left_job = False     # a worker that said the coordinator saw it finish

    def drain(self, timeout=1.0):
        """Waits (bounded) until the output of the exited process is copied."""
        self.pump.join(timeout)

    def poll(self):
        """Its exit code as Popen.poll() gives it (None while it runs; -N:
        killed by signal N), also through ssh. ssh exits 255 for a remote
        process killed by a signal, as for a lost connection, so a remote
        node runs under sh (Remote.command), which exits 128 + N instead:
        read back as -N. (A remote node that exits 129 or more itself is
        read as killed too; mx's binaries exit 0, 1, 2 or 3 (a server
        declared dead), or 128 + N when signal N stopped them, which is the
        same news.)"""
        code = self.popen.poll()
        if code is None or not self.remote or not 128 < code < 255:
            return code
        return -(code - 128)

    def describe(self):
        extra = f"{self.identity}, " if self.identity else ""
        return f"{self.name} ({extra}pid {self.popen.pid})"


def signal_group(proc, sig):
    """Sends sig to proc's process group, which may have just ended."""
    try:
        os.killpg(proc.popen.pid, sig)
    except ProcessLookupError:
        pass


class StartFailed(Exception):
    """A process of the job could not be started (a missing binary)."""


class Stopped(Exception):
    """Raised by the launcher's signal handlers: the job is to stop with
    exit code `code`. The stop runs in run(), not in the handler: a handler
    runs wherever the main thread was, possibly inside Popen.poll() holding
    that process's wait lock, and a stop started there waited for that lock
    forever (seen: a CI run hung on Ctrl-C)."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


# True once the job is being stopped: later signals change nothing (a
# handler that raised again would abandon the stop under way; seen: a
# second SIGTERM left the daemons running).
_stopping = False


def begin_stop():
    global _stopping
    _stopping = True


# While true, a stop signal is held (in _held) instead of raised: see
# stop_signals_held.
_holding = False
_held = None  # the exit code of the first stop signal held, or None


def raise_stopped(code):
    def handler(*_):
        global _held
        if _stopping:
            return
        if _holding:
            _held = code if _held is None else _held
            return
        begin_stop()
        raise Stopped(code)
    return handler


# SIGPIPE: the launcher's output has no reader any more (`launch.py ... |
# head`); like any program in a pipeline it ends, and so does its job
# (its console writes fail with EPIPE and raise it; see console()).
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129,
                signal.SIGPIPE: 141}


def install_stop_handlers():
    """Makes each of STOP_SIGNALS raise Stopped in the main thread (once)."""
    for sig, code in STOP_SIGNALS.items():
        signal.signal(sig, raise_stopped(code))


@contextlib.contextmanager
def stop_signals_held():
    """Holds stop signals for the duration of the block and raises Stopped
    for the first of them once it is over (unless a stop is under way).
    Around what must finish before a stop can clean it up: forking a child
    and recording it in job.procs (a Stopped raised in between, even inside
    Popen, would leave stop_all blind to a child that runs in its own
    session and outlives the launcher), and making a directory and keeping
    its name (the job's secrets, its shared memory). Not pthread_sigmask:
    children inherit the mask across exec, and would ignore SIGTERM.
    Not reentrant; main thread only, as Python runs handlers there."""
    global _holding, _held
    _holding, _held = True, None
    try:
        yield
    finally:
        _holding = False
    code, _held = _held, None
    if code is not None and not _stopping:
        begin_stop()
        raise Stopped(code)


class Job:
    def __init__(self, remote=None, log_dir=None):
        self.procs = []
        self.lock = threading.Lock()
        self.remote = remote  # a Remote to start processes on other hosts, or None
        self.log_dir = log_dir  # --log-dir: a file per process there, or None

    def start(self, name, role, cmd, env, host=None):
        node, remote = name, self.remote is not None
        if remote:
            cmd, env = self.remote.command(host, cmd, env), os.environ
            name = f"{name} on {host}"
        # A stop signal waits until the child is in self.procs (stop_all
        # stops it) and its output is copied.
        with stop_signals_held():
            proc = Proc(name, role, self._spawn(name, cmd, env), (cmd, env), node, remote)
            self.procs.append(proc)
            self._started(proc)
        return proc

    def restart(self, proc):
        """Starts proc's command again, in its place (its output goes on
        under the same name)."""
        proc.drain()
        with stop_signals_held():  # as in start: stop_all must see the new child
            proc.popen = self._spawn(proc.name, *proc.argv)
            self._started(proc)

    @staticmethod
    def _spawn(name, cmd, env):
        """Starts cmd in a session of its own, its output to a pipe. Its
        stdin is /dev/null: nothing the launcher starts reads it, and ssh
        (-H) given a terminal there would put it in raw mode (Ctrl-C would
        no longer stop the launcher, and the terminal could stay raw)."""
        try:
            return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise StartFailed(f"cannot start {name}: {cmd[0]}: {e.strerror}") from e

    def _started(self, proc):
        proc.started_at = time.time()
        proc.pump = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        proc.pump.start()
        log(f"started {proc.name} (pid {proc.popen.pid})")

    def workers(self):
        return [p for p in self.procs if p.role == "worker"]

    def daemons(self):
        return [p for p in self.procs if p.role != "worker"]

    def _pump(self, proc):
        log_file = None
        if self.log_dir is not None:  # "server 1" -> server-1.log (with -H too)
            path = os.path.join(self.log_dir, proc.node.replace(" ", "-") + ".log")
            log_file = open(path, "a", encoding="utf-8")
        try:
            self._copy_output(proc, log_file)
        finally:
            if log_file is not None:
                log_file.close()

    def _copy_output(self, proc, log_file):
        """Copies proc's output to the console, prefixed with its name (and
        the time, with --timestamps), and to its log file, if any."""
        for raw in iter(proc.popen.stdout.readline, b""):
            line = raw.decode(errors="replace")
            if not line.endswith("\n"):
                line += "\n"
            # The latest: a spare's becomes its rank's once it takes one.
            for pattern, identity in IDENTITY:
                m = pattern.match(line)
                if m:
                    proc.identity = identity(m)
            m = COORDINATOR_LISTENING.match(line)
            if m:
                proc.listening = m[1]
            for pattern, identity in DECLARED_DEAD:
                m = pattern.match(line)
                if m:
                    proc.declared_dead.add(identity(m))
            if LEFT_JOB.match(line):
                proc.left_job = True
            if COORDINATOR_SILENT.match(line):
                proc.coordinator_silent_at = time.time()
            for pattern, names in BLAME:
                m = pattern.search(line)
                if m:
                    proc.blamed += [n for n in names(m) if n not in proc.blamed]
            when = stamp()
            with self.lock:
                console(f"{when}[{proc.name}] {line}")
            if log_file is not None:
                log_file.write(when + line)
                log_file.flush()

    def stop(self, procs, grace=3.0):
        """SIGTERMs the running ones of procs (their whole process groups),
        SIGKILLs what is left after `grace` seconds. Returns those killed.
        Every wait is bounded: a stop never hangs the launcher."""
        for p in procs:
            if p.popen.poll() is None:
                signal_group(p, signal.SIGTERM)
        deadline = time.time() + grace
        killed = []
        for p in procs:
            while p.popen.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if p.popen.poll() is None:
                signal_group(p, signal.SIGKILL)
                try:
                    p.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log(f"warning: {p.describe()} still not reaped {grace:g} s after SIGKILL")
                killed.append(p)
        return killed

    def stop_all(self):
        self.stop(self.procs)


# What every remote node runs under (Remote.command): its command, then sh's
# exit with its exit status.
REMOTE_WRAPPER = '"$@"; exit $?'


class Remote:
    """Runs commands on other hosts through ssh."""

    def __init__(self, ssh, hosts):
        self.ssh = shlex.split(ssh)
        self.hosts = hosts

    def host(self, i):
        """The host of the i-th process of a role: round-robin."""
        return self.hosts[i % len(self.hosts)]

    def command(self, host, cmd, env):
        """`cmd` on `host`, in this directory, with the job's variables of
        `env` (DMLC_*, MX_*, OMP_*, OPENBLAS_*)."""
        # Never MX_JOB_TOKEN: it would be on the command lines of ssh here
        # and of env there. The token travels as a file (MX_JOB_TOKEN_FILE).
        exported = [f"{k}={v}" for k, v in sorted(env.items())
                    if k.startswith(("DMLC_", "MX_", "OMP_", "OPENBLAS_")) and k != "MX_JOB_TOKEN"]
        # Under sh, not exec'd: a command killed by signal N makes sh exit
        # 128 + N, which ssh passes on (Proc.poll); ssh's own exit code for
        # it would be 255, as for a lost connection. (`; exit $?`: a last
        # command alone, sh might exec it.)
        remote = (f"cd {shlex.quote(os.getcwd())} && exec sh -c {shlex.quote(REMOTE_WRAPPER)} sh "
                  + " ".join(shlex.quote(c) for c in ["env"] + exported + cmd))
        return self.ssh + ["-tt", "-o", "BatchMode=yes", host, remote]


def read_hostfile(path):
    """The hosts of a hostfile: one per line, `user@` allowed, `#` comments."""
    hosts = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                hosts.append(line)
    if not hosts:
        raise ValueError(f"{path} lists no hosts")
    return hosts


def address_of(host):
    """The network address of a hostfile entry ("user@host" -> "host")."""
    return host.rsplit("@", 1)[-1]


def host_port(host, port):
    """The address "host:port" to dial, an IPv6 literal in brackets
    ("[fd00::1]:9091"; "fd00::1:9091" would be read as a host alone, or
    with port 1)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def all_exited(procs):
    return all(p.popen.poll() is not None for p in procs)


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.1)


def hung_nodes(job, proc):
    """The nodes `proc` reported dead that are still running: hung (a
    stopped process, one that no longer answers). Output names nodes
    without their host ("server 1", not "server 1 on HOST")."""
    by_name = {p.node: p for p in job.procs}
    return [by_name[n] for n in proc.blamed
            if n in by_name and by_name[n] is not proc and by_name[n].popen.poll() is None]


def declared_dead_yet_running(job, lost):
    """The servers the coordinator declared dead (a worker said so), and
    the spares it said went silent, that still run: hung, or cut off from
    the job, which goes on without them (replicas 2)."""
    declared = set().union(*(p.declared_dead for p in job.procs))
    return [p for p in job.daemons() if p.role == "server" and p not in lost
            and is_declared(p, declared) and p.popen.poll() is None]


def is_declared(server, declared):
    """Whether `server` is among the `declared` identities. One that has
    not said where it serves (hung between registering and that line:
    chaos.py found one) is known by the rank it was started with: "server
    i" asked for rank i (MX_RANK), and only a spare that took it over later
    would say so."""
    if server.identity is not None:
        return server.identity in declared
    rank = server.node.removeprefix("server ")
    return rank != server.node and any(d.startswith(f"rank {rank} at ") for d in declared)


def hung_coordinator(job):
    """The coordinator, if it runs but at least half of the running nodes
    said since its last start that it took a call and did not answer it
    (hung, or cut off from them: one node of many may be cut off itself),
    with those nodes; else (None, [])."""
    coordinator = next((p for p in job.procs if p.role == "coordinator"), None)
    if coordinator is None or coordinator.popen.poll() is not None:
        return None, []
    nodes = [p for p in job.procs if p is not coordinator and p.popen.poll() is None]
    said = [p for p in nodes if p.coordinator_silent_at is not None
            and p.coordinator_silent_at > coordinator.started_at]
    return (coordinator, said) if said and 2 * len(said) >= len(nodes) else (None, [])


def restart_coordinator(job, coordinator, why, restarts_left, listened=True):
    """Starts the coordinator again on its address (killing it first if it
    still runs, as a hung one does); the nodes rejoin it. One that never
    `listened` has no nodes yet."""
    where = "on its address (the nodes rejoin it; " if listened else "("
    log(f"{coordinator.describe()} {why}; restarting it {where}restarts left: {restarts_left})")
    if coordinator.popen.poll() is None:
        signal_group(coordinator, signal.SIGKILL)
        try:
            coordinator.popen.wait(timeout=5)  # its port must be free
        except subprocess.TimeoutExpired:
            pass
    job.restart(coordinator)


def kill_declared_dead(job, lost):
    """Kills the servers declared dead that still run, adding them to
    `lost`: no longer part of the job, and were they left to run, the job
    would end waiting for them to stop (a stopped process ignores SIGTERM)."""
    for h in declared_dead_yet_running(job, lost):
        lost.append(h)
        took_over = ("a spare: it held nothing" if (h.identity or "").startswith("a spare")
                     else "its keys' backups took over (replicas 2)")
        log(f"{h.describe()} was declared dead but is still running (hung, or cut off from "
            f"the job); killing it: {took_over}")
        signal_group(h, signal.SIGKILL)


def fail(job, proc, code, grace):
    """A fatal failure: names the node to blame (one that `proc` reported
    dead but that still runs, else `proc`), kills hung nodes at once, lets
    the other workers report the failure, stops the job, returns the
    launcher's exit code."""
    hung = hung_nodes(job, proc)
    for h in hung:
        log(f"{h.describe()} stopped responding: {proc.name} reported it dead "
            f"({how_it_ended(code)}) but it is still running; killing it and stopping the job")
        signal_group(h, signal.SIGKILL)
    if not hung:
        log(f"{proc.describe()} failed: {how_it_ended(code)}; stopping the job")
    # The workers notice within a heartbeat timeout and print an error that
    # names the node; keep them until then so that the log says why.
    wait_for(lambda: all_exited(job.workers()), grace)
    job.stop_all()
    return code if code > 0 else 1


def all_workers_finished(job, lost, grace):
    """Whether every worker (but the `lost` ones) exits 0 within `grace`
    seconds: a daemon that just exited 0 may have seen the last worker
    leave the job before the launcher saw it exit."""
    workers = [w for w in job.workers() if w not in lost]
    wait_for(lambda: all_exited(workers), grace)
    return all(w.popen.poll() == 0 for w in workers)


def finish(job, lost):
    """Every worker is done; `lost` ones died (workers: elastic; servers:
    replicas 2): waits for the other daemons to shut down on their own (the
    coordinator tells them when every worker has finished), stops any that
    do not, reports; returns 0 if the job ran to its end (job_ran), else
    1, or the exit code of a coordinator that failed by itself."""
    workers = job.workers()
    lost_workers = [p for p in lost if p.role == "worker"]
    if lost_workers:
        names = ", ".join(p.describe() for p in lost_workers)
        log(f"{len(workers) - len(lost_workers)} of {len(workers)} workers finished; "
            f"the job went on without {names} (elastic)")
    else:
        log("all workers finished")
    for p in lost:
        if p.role == "server":
            log(f"the job went on without {p.describe()} (replicas 2)")
    daemons = [d for d in job.daemons() if d not in lost]

    def settled():
        kill_declared_dead(job, lost)  # one declared dead meanwhile will not stop
        return all_exited([d for d in daemons if d not in lost])

    # They hear of it at their next heartbeat (a second apart).
    wait_for(settled, 5)
    daemons = [d for d in daemons if d not in lost]
    lingering = [d for d in daemons if d.popen.poll() is None]
    if lingering:
        log("stopping " + ", ".join(d.describe() for d in lingering) +
            ": still running 5 s after the workers finished")
    killed = job.stop(daemons)
    for d in daemons:
        d.drain()
    unclean = [p for p in daemons if p in lingering or p.popen.returncode != 0]
    for p in unclean:
        how = ("did not stop within 3 s of SIGTERM" if p in killed
               else "had to be stopped" if p in lingering
               else how_it_ended(p.popen.returncode))
        log(f"warning: {p.describe()} did not shut down cleanly: {how}")
    if not unclean:
        log(f"the coordinator and {len(daemons) - 1} server(s) shut down cleanly")
    if job_ran(daemons, [w for w in workers if w not in lost]):
        return 0
    coordinator = next(d for d in daemons if d.role == "coordinator")
    code = coordinator.poll()
    if coordinator not in lingering and code != 0:  # it ended by itself: the job failed
        log(f"the job failed: {coordinator.describe()} {how_it_ended(code)}")
        return code if code > 0 else 1
    if any(w.identity is not None for w in workers):  # "worker 0 of 2": some joined it
        log("the workers exited 0 but the coordinator had not seen every worker finish (the "
            "launcher had to stop it): a worker must leave the job (KVStore::Finish) before "
            "it exits")
        return 1
    log("the workers exited but the job never ran: the coordinator had not seen every worker "
        "finish (the launcher had to stop it); was the worker command an mx_train with a dist "
        "kvstore (--kvstore=dist_sync, dist_async or dist_device_sync)?")
    return 1


def job_ran(daemons, workers):
    """Whether the coordinator saw every worker finish. Each of `workers`
    (those not lost) says so when the coordinator acknowledged its leaving
    (LEFT_JOB): enough even when the coordinator was killed right after,
    before it told the servers. And a daemon exits 0 only then (the
    coordinator once it has, a server once the coordinator told it so),
    even one stopped by SIGTERM after that; stopped before, it exits 128 +
    the signal (mx_server.cc). A daemon that had to be stopped because it
    waited for a server may still have exited non-zero after a job that
    ran, so any one's 0 is enough. Workers that exit 0 without ever
    joining the job (`true`, mx_train --kvstore=local or --help) or
    without leaving it leave every daemon waiting for them."""
    return every_worker_left(workers) or any(d.popen.returncode == 0 for d in daemons)


def every_worker_left(workers):
    """Whether each of `workers` said the coordinator acknowledged its
    leaving the job (LEFT_JOB)."""
    return bool(workers) and all(w.left_job for w in workers)


def workers_left(job, lost):
    """Whether every worker but the `lost` ones left the job, giving the
    threads that copy their output a moment to read a last line ("left the
    job") already written: a coordinator killed just after it is seen dead
    first."""
    workers = [w for w in job.workers() if w not in lost]
    for w in workers:
        if w.popen.poll() is not None:
            w.drain()
    wait_for(lambda: every_worker_left(workers), 0.3)
    return every_worker_left(workers)


def supervise(job, elastic, grace, replicas=1, coordinator_restarts=0):
    """Waits for the job to end; returns the launcher's exit code. A
    coordinator killed by a signal, or one that hangs (at least half of the
    nodes said it stopped answering their calls: they would give it up
    MX_COORDINATOR_TIMEOUT_S after its last answer), is restarted on its
    address, up to `coordinator_restarts` times: the nodes go on without it
    meanwhile and rejoin it. A server killed by a signal before it served (it held
    nothing yet, and the job cannot form without its rank) is started again
    once, asking for the same rank."""
    lost = []  # workers that died in an elastic job, servers with replicas
    restarted_servers = set()
    while True:
        coordinator, said = hung_coordinator(job) if coordinator_restarts > 0 else (None, [])
        if coordinator is not None:
            coordinator_restarts -= 1
            restart_coordinator(
                job, coordinator, f"stopped answering: {len(said)} of the nodes ("
                + ", ".join(p.name for p in said) + ") heard nothing from it though it runs; "
                "killing it", coordinator_restarts)
        for p in job.procs:
            code = p.poll()
            if code is None or (code == 0 and p.role == "worker") or p in lost:
                continue
            # Daemons exit 0 on their own once every worker has finished
            # (left the job); before the workers have, it is a failure.
            if code == 0 and all_workers_finished(job, lost, grace):
                break
            p.drain()  # its last lines first
            if p.role == "coordinator" and workers_left(job, lost):
                continue  # killed after the job ran: finish() stops the servers
            if p.role == "coordinator" and code < 0 and coordinator_restarts > 0:
                coordinator_restarts -= 1
                restart_coordinator(job, p, f"died: {how_it_ended(code)}", coordinator_restarts)
                continue
            if (p.role == "server" and code < 0 and p.identity is None
                    and p.name not in restarted_servers):
                restarted_servers.add(p.name)
                log(f"{p.describe()} died before it served: {how_it_ended(code)}; "
                    "starting it again (it held nothing yet)")
                job.restart(p)
                continue
            if elastic and p.role == "worker":
                lost.append(p)
                log(f"{p.describe()} died: {how_it_ended(code)}; "
                    "the job continues without it (elastic)")
                continue
            # Only a server that joined the job (served, or a spare that
            # waits): one that exits before (the job did not form, e.g. a
            # node never registered) is the job's failure, not a death its
            # keys' backups absorb; so is one that stopped because of
            # another node (it gave up the coordinator, or the job failed:
            # "worker(s) 1 died ...").
            if (replicas > 1 and p.role == "server" and code != 0 and p.identity is not None
                    and not p.blamed):
                lost.append(p)
                log(f"{p.describe()} died: {how_it_ended(code)}; "
                    "its keys' backups take over (replicas 2)")
                continue
            return fail(job, p, code, grace)
        if replicas > 1:
            kill_declared_dead(job, lost)
        workers = job.workers()
        if all_exited(workers):
            for w in workers:
                w.drain()
            lost_workers = [w for w in lost if w.role == "worker"]
            if workers and len(lost_workers) == len(workers):
                log("every worker died; stopping the job")
                job.stop_all()
                return 1
            return finish(job, lost)
        time.sleep(0.1)


def cpu_threads(local_workers):
    """CPU threads for each of `local_workers` processes on this machine: its
    share of the cores, for its CPU pool (BLAS and mx's kernels).

    Every worker's pool would otherwise start one thread per core, and their
    threads spin while waiting: with 2 workers on 2 cores a dist_sync MLP
    step took 1.5x as long (and most of the time went to the kernel). The
    engine's workers need nothing here: a process runs one unless
    MX_CPU_WORKER_NTHREADS says otherwise (on 2 cores the README job had run
    6% faster with one in every process than with one per core). The cores
    are those this process may run on. A value the user set is kept.
    """
    n = str(max(1, len(os.sched_getaffinity(0)) // local_workers))
    if "OPENBLAS_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n}


def job_secrets(ap, args):
    """The job's token and TLS files (ap.error on bad options)."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(given) and not all(given):
        ap.error("--tls-cert, --tls-key and --tls-ca go together")
    for path in [args.token_file] + given:
        if path and not os.access(path, os.R_OK):
            ap.error(f"cannot read {path}")
    try:
        return JobSecrets(token_file=args.token_file, tls=args.tls or all(given),
                          tls_files=tuple(given) if all(given) else None)
    except RuntimeError as e:
        ap.error(str(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(ap)
    ap.add_argument("--server-binary", default="bazel-bin/server/mx_server",
                    help="the mx_server binary that runs the coordinator and the servers")
    ap.add_argument("-H", "--hostfile", help="run on these hosts through ssh (one per line)")
    ap.add_argument("--ssh", default="ssh", help="the ssh command for --hostfile")
    ap.add_argument("--port", type=int, default=0,
                    help="the coordinator's port (default: a free one; 9091 with --hostfile)")
    ap.add_argument("--token-file", help="a file holding the job token (default: a new random one; "
                                         "with -H required, at the same path on every host)")
    ap.add_argument("--tls", action="store_true",
                    help="mutual TLS on every connection, with a CA and certificates made for the job")
    ap.add_argument("--tls-cert", help="with --tls-key and --tls-ca: TLS with these files instead")
    ap.add_argument("--tls-key", help="with --tls-cert: the private key of the certificate")
    ap.add_argument("--tls-ca", help="with --tls-cert: the CA that signed every node's certificate")
    ap.add_argument("--metrics", action="store_true",
                    help="every process serves Prometheus metrics and /healthz on a free port "
                         "and prints where (\"metrics on http://HOST:PORT/metrics\")")
    ap.add_argument("--no-shm", action="store_true",
                    help="values between workers and servers go over TCP even on one host")
    ap.add_argument("--trace", metavar="DIR",
                    help="every process writes its timeline into DIR when it ends; "
                         "deploy/trace_merge.py DIR merges them into one")
    ap.add_argument("--log-dir", metavar="DIR",
                    help="also write each process's output to DIR/<role>-<rank>.log "
                         "(coordinator.log, server-0.log, worker-1.log, ...)")
    ap.add_argument("--timestamps", action="store_true",
                    help="start every line printed (and logged) with the UTC time")
    add_worker_command(ap)
    args = ap.parse_args()
    global TIMESTAMPS
    TIMESTAMPS = args.timestamps
    cmd = worker_command(ap, args)
    if not os.access(args.server_binary, os.X_OK):
        ap.error(f"server binary {args.server_binary} not found (bazel build //server:mx_server)")
    if args.port and not 1 <= args.port <= 65535:
        ap.error(f"--port {args.port}: not a port (1 to 65535; 0 or none: a free one)")
    check_worker_kvstore(ap, args, cmd)
    remote = None
    if args.hostfile:
        try:
            remote = Remote(args.ssh, read_hostfile(args.hostfile))
        except (OSError, ValueError) as e:
            ap.error(f"--hostfile: {e}")
        check_shared_secrets(ap, args)
    for flag, path in (("--log-dir", args.log_dir), ("--trace", args.trace)):
        if path:
            make_writable_dir(ap, flag, path)
    # From here on a stop signal ends the launcher through its clean-up:
    # the secrets' directory (with --tls, the CA's key) is removed.
    install_stop_handlers()
    secrets = None
    try:
        with stop_signals_held():  # until `secrets` names what to remove
            secrets = job_secrets(ap, args)
        return run(args, cmd, secrets, remote)
    except Stopped as stopped:  # before the job started, or as it ended
        return stopped.code
    finally:
        begin_stop()  # a signal now changes nothing: the clean-up runs to its end
        if secrets is not None:
            secrets.remove()


def make_writable_dir(ap, flag, path):
    """Makes directory `path` (--log-dir, --trace) if need be and checks
    that files can be written there, before anything starts (ap.error:
    exit code 2 with the reason)."""
    probe = os.path.join(path, ".mx-write-test")
    try:
        os.makedirs(path, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        ap.error(f"{flag} {path}: {e.strerror}")


def check_shared_secrets(ap, args):
    """With -H every host reads the token file and the TLS files at the
    paths this host gives them: they must be files the user placed on
    every host (a shared directory, or copies). The launcher's own token
    and the CA that --tls makes are in a private directory of this host
    only, where the remote nodes would fail to read them."""
    if not args.token_file:
        ap.error("-H: give --token-file FILE, a file holding the job token at the same path on "
                 "every host (a shared directory, or copied there); the token the launcher "
                 "makes would exist on this host only")
    if args.tls and not all([args.tls_cert, args.tls_key, args.tls_ca]):
        ap.error("-H with --tls: give --tls-cert, --tls-key and --tls-ca, files at the same path "
                 "on every host; the certificates the launcher makes would exist on this host only")


def run(args, cmd, secrets, remote):
    """Starts the job on this host, or through `remote` (a Remote or None),
    and supervises it; returns the exit code."""
    # Port 0 on this host: the coordinator takes a free one, and
    # start_and_supervise reads which from its first line (await_coordinator).
    port = args.port or (9091 if remote else 0)
    root = address_of(remote.host(0)) if remote else "127.0.0.1"
    coordinator = host_port(root, port)  # DMLC_PS_ROOT_URI stays the bare host
    env = dict(os.environ, DMLC_PS_ROOT_URI=root, DMLC_PS_ROOT_PORT=str(port),
               MX_COORDINATOR=coordinator, DMLC_NUM_SERVER=str(args.num_servers),
               DMLC_NUM_WORKER=str(args.num_workers))
    env.pop("MX_JOB_TOKEN", None)  # the job's own token comes from its file
    if args.trace:  # made and checked by main
        env["MX_TRACE_DIR"] = os.path.abspath(args.trace)
    if args.metrics:
        # Servers serve on their --bind host; workers on MX_METRICS_HOST.
        env.update(MX_METRICS_PORT="0", MX_METRICS_HOST="0.0.0.0" if remote else "127.0.0.1")
    env.pop("MX_SHM_DIR", None)
    shm_dir = None
    try:
        # A stop signal waits until shm_dir names the directory to remove.
        with stop_signals_held():
            shm_dir = None if remote or args.no_shm else shared_memory_dir()
        if shm_dir:
            env["MX_SHM_DIR"] = shm_dir
            log(f"shared memory in {shm_dir}")
        job = Job(remote, args.log_dir)
        return run_until_stopped(job, lambda: start_and_supervise(job, args, cmd, secrets, env))
    finally:
        if shm_dir:
            # Segments are unlinked once attached; this removes any a
            # process left when it died while attaching.
            shutil.rmtree(shm_dir, ignore_errors=True)


def shared_memory_dir():
    """A private directory (mode 0700) under /dev/shm for the job's shared
    memory, or None (and the job uses TCP) where there is none."""
    try:
        # The launcher's pid in the name: whose directory it is.
        return tempfile.mkdtemp(prefix=f"mx-job-{os.getpid()}-", dir="/dev/shm")
    except OSError as e:
        log(f"no shared memory for the job ({e.strerror}); values go over TCP")
        return None


def run_until_stopped(job, body):
    """Returns body() (which starts and supervises `job`), unless SIGINT,
    SIGTERM or SIGHUP comes first: then stops the job and returns 130, 143
    or 129. Whatever way body() ends, nothing it started is left running:
    a process that cannot be started stops the others and returns 1.
    SIGPIPE (stdout's reader went away) stops the job too: 141."""
    install_stop_handlers()
    try:
        return body()
    except Stopped as stopped:
        if stopped.code == STOP_SIGNALS[signal.SIGPIPE]:
            log("the output's reader went away (broken pipe); stopping the job")
        job.stop_all()
        return stopped.code
    except StartFailed as e:
        begin_stop()
        log(f"{e}; stopping the job")
        job.stop_all()
        return 1
    except BaseException:
        begin_stop()
        job.stop_all()
        raise


def start_and_supervise(job, args, cmd, secrets, env):
    """Starts the coordinator, the servers and the workers (at the address
    `env` names); returns the launcher's exit code once the job has ended."""
    remote = job.remote
    port = env["DMLC_PS_ROOT_PORT"]
    mode = server_mode(args.kvstore)
    elastic = ["--elastic"] if args.elastic else []
    bind_host = "0.0.0.0" if remote else "127.0.0.1"
    first = job.start("coordinator", "coordinator",
                      [args.server_binary, "--role=coordinator", f"--bind={bind_host}:{port}",
                       f"--heartbeat_timeout_s={args.heartbeat_timeout}"] + elastic,
                      dict(env, DMLC_ROLE="scheduler", **secrets.env("coordinator")),
                      host=remote and remote.host(0))
    restarts = await_coordinator(job, first, env, args.coordinator_restarts)
    if restarts is None:
        code = supervise(job, args.elastic, grace=0)  # it failed: says how
        first.drain()
        return code
    coordinator = env["MX_COORDINATOR"]
    for i in range(args.num_servers):
        host = remote and remote.host(i)
        advertise = [f"--advertise={address_of(host)}"] if remote else []
        job.start(f"server {i}", "server",
                  [args.server_binary, "--role=server", f"--coordinator={coordinator}",
                   f"--bind={bind_host}:0", f"--mode={mode}", f"--replicas={args.replicas}",
                   f"--staleness={args.staleness}"]
                  + advertise + elastic,
                  dict(env, DMLC_ROLE="server", MX_RANK=str(i), **secrets.env(f"server-{i}")),
                  host=host)
    for i in range(args.spare_servers):
        host = remote and remote.host(args.num_servers + i)
        advertise = [f"--advertise={address_of(host)}"] if remote else []
        job.start(f"spare {i}", "server",
                  [args.server_binary, "--role=server", f"--coordinator={coordinator}",
                   f"--bind={bind_host}:0", f"--mode={mode}", "--replicas=2",
                   f"--staleness={args.staleness}", "--spare"]
                  + advertise + elastic,
                  dict(env, DMLC_ROLE="server", **secrets.env(f"spare-{i}")),
                  host=host)
    per_host = -(-args.num_workers // len(remote.hosts)) if remote else args.num_workers
    worker_env = dict(env, DMLC_ROLE="worker", MX_ELASTIC="1" if args.elastic else "0",
                      MX_REPLICAS=str(args.replicas), MX_STALENESS=str(args.staleness),
                      **cpu_threads(per_host))
    for i in range(args.num_workers):
        job.start(f"worker {i}", "worker", cmd,
                  dict(worker_env, MX_RANK=str(i), **secrets.env(f"worker-{i}")),
                  host=remote and remote.host(i))
    # A node is declared dead within the timeout plus a sweep (a fifth of
    # it) of its last heartbeat, and the others hear of it at their next
    # heartbeat (a second).
    code = supervise(job, args.elastic, grace=args.heartbeat_timeout * 1.2 + 3,
                     replicas=args.replicas, coordinator_restarts=restarts)
    for p in job.procs:
        p.drain()
    return code


if __name__ == "__main__":
    sys.exit(main())
