"""The shape of a distributed job, as deploy/launch.py (processes) and
deploy/k8s_job.py (Kubernetes objects) both take it: workers, servers, the
kvstore's mode, elasticity, replicas and spare servers, staleness, the heartbeat
timeout, coordinator restarts and the worker command after --."""
import argparse
import os

# The most --staleness that mx_server (--staleness, MX_STALENESS) and the
# workers' kvstore (MX_STALENESS) take: more and every node would refuse to
# start, after the launcher had started them.
MAX_STALENESS = 1000


def add_job_arguments(ap):
    """The options; call add_worker_command last (it takes the rest)."""
    ap.add_argument("-n", "--num-workers", type=int, required=True, help="workers in the job")
    ap.add_argument("-s", "--num-servers", type=int, required=True,
                    help="parameter servers in the job")
    ap.add_argument("--kvstore", default="dist_sync",
                    choices=["dist_sync", "dist_async", "dist_device_sync"],
                    help="the servers' mode (dist_device_sync: dist_sync whose workers sum their "
                         "GPUs' copies on a GPU); the worker command must use the same kvstore")
    ap.add_argument("--elastic", action="store_true",
                    help="continue without workers that die (servers, coordinator and workers)")
    ap.add_argument("--replicas", type=int, default=1, choices=[1, 2],
                    help="copies of each key's state on the servers: with 2, a server's death is "
                         "no failure (its keys' backups on the next server take over)")
    ap.add_argument("--staleness", type=int, default=0, metavar="S",
                    help="dist_sync with bounded staleness: a worker runs at most S steps ahead "
                         "of the slowest, its pulls may lack up to S steps (0: plain dist_sync; "
                         f"at most {MAX_STALENESS})")
    ap.add_argument("--heartbeat-timeout", type=int, default=5,
                    help="seconds of silence after which a node is declared dead (at least 2)")
    ap.add_argument("--spare-servers", type=int, default=0, metavar="N",
                    help="with --replicas 2: N spare servers; when a server dies, a spare takes "
                         "its rank and the survivors give it copies of the keys left with one, "
                         "so that the job survives another server's death")
    ap.add_argument("--coordinator-restarts", type=int, default=1, metavar="N",
                    help="a coordinator that was killed, crashed or hangs is restarted up to N "
                         "times (default 1; 0: its death ends the job); the nodes go on meanwhile and "
                         "rejoin it, and give it up after MX_COORDINATOR_TIMEOUT_S without an "
                         "answer")


def add_worker_command(ap):
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- worker command")


def worker_command(ap, args):
    """The worker command, once the job's shape is checked (ap.error
    otherwise: exit code 2 with the reason)."""
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the worker command after --")
    if args.num_workers < 1 or args.num_servers < 1:
        ap.error("-n and -s must be at least 1")
    if args.replicas > args.num_servers:
        ap.error(f"--replicas {args.replicas} needs at least as many servers (-s {args.num_servers})")
    if args.heartbeat_timeout < 2:
        ap.error("--heartbeat-timeout must be at least 2 (nodes heartbeat every second)")
    if args.spare_servers < 0 or (args.spare_servers and args.replicas < 2):
        ap.error(f"--spare-servers {args.spare_servers}: must be 0 or more, and needs --replicas 2")
    if args.staleness > MAX_STALENESS:
        ap.error(f"--staleness {args.staleness}: at most {MAX_STALENESS} (the servers and the "
                 "workers refuse more)")
    if args.staleness < 0 or (args.staleness and server_mode(args.kvstore) != "sync"):
        ap.error(f"--staleness {args.staleness}: must be 0 or more, and applies to dist_sync only")
    if args.coordinator_restarts < 0:
        ap.error(f"--coordinator-restarts {args.coordinator_restarts}: must be 0 or more")
    return cmd


def server_mode(kvstore):
    """mx_server's --mode for the job's --kvstore: dist_device_sync differs
    from dist_sync only on the workers."""
    return "async" if kvstore == "dist_async" else "sync"


def worker_flag_values(cmd, name):
    """The values the worker command gives absl flag `name` (a flag that
    takes a value: not a bool), in order: absl takes `--name=V`, `-name=V`,
    `--name V` and `-name V` alike."""
    values = []
    for i, arg in enumerate(cmd[1:], 1):
        flag, eq, value = arg.partition("=")
        if flag not in (f"--{name}", f"-{name}"):
            continue
        if eq:
            values.append(value)
        elif i + 1 < len(cmd):
            values.append(cmd[i + 1])
    return values


def check_worker_kvstore(ap, args, cmd):
    """Refuses (ap.error) a worker command that would not train as one job:
    a --kvstore other than the job's (local: each worker trains alone, and
    the job reports success), or an mx_train without one (its default is
    local). Other worker programs may leave it out."""
    values = worker_flag_values(cmd, "kvstore")
    given = values[-1] if values else None  # the last one counts, as in absl
    if given is None:
        if os.path.basename(cmd[0]) == "mx_train":
            ap.error(f"the worker command has no --kvstore: mx_train would train each worker "
                     f"alone (its default is local); add --kvstore={args.kvstore}")
        return
    if given != args.kvstore:
        alone = " (each worker would train alone)" if not given.startswith("dist") else ""
        ap.error(f"the worker command's --kvstore={given} is not the job's --kvstore "
                 f"{args.kvstore}{alone}")
