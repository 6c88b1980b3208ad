"""The shape of a distributed job, as deploy/launch.py (processes) and
deploy/k8s_job.py (Kubernetes objects) both take it: workers, servers, the
kvstore's mode, elasticity, the heartbeat timeout and the worker command
after --."""
import argparse


def add_job_arguments(ap):
    """The options; call add_worker_command last (it takes the rest)."""
    ap.add_argument("-n", "--num-workers", type=int, required=True)
    ap.add_argument("-s", "--num-servers", type=int, required=True)
    ap.add_argument("--kvstore", default="dist_sync", choices=["dist_sync", "dist_async"])
    ap.add_argument("--elastic", action="store_true",
                    help="continue without workers that die (servers, coordinator and workers)")
    ap.add_argument("--heartbeat-timeout", type=int, default=5,
                    help="seconds of silence after which a node is declared dead (at least 2)")


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
    if args.heartbeat_timeout < 2:
        ap.error("--heartbeat-timeout must be at least 2 (nodes heartbeat every second)")
    return cmd
