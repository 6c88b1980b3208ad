#!/usr/bin/env python3
"""Writes the Kubernetes objects of a distributed mx job (what deploy/launch.py
starts as processes), for kubectl:

  deploy/k8s_job.py --name fmnist -n 2 -s 2 --image REGISTRY/mx:TAG -- \\
      mx_train --kvstore=dist_sync --epochs=10 | kubectl apply -f -

The image is deploy/Dockerfile's (mx_server and mx_train in /usr/local/bin,
Fashion-MNIST at mx_train's default --data_dir). Printed as JSON, which
kubectl reads like YAML: a List of
- JobSet NAME (jobset.x-k8s.io/v1alpha2; the JobSet controller must be
  installed): the three Jobs below as its replicated Jobs, with stable DNS
  names (the coordinator is NAME-coordinator-0-0.NAME, which every node is
  given as DMLC_PS_ROOT_URI), start-up in order (coordinator, servers,
  workers, each once the one before is ready), success when the workers
  and the coordinator have succeeded (see Success), failure of the whole
  set (every pod stopped) when any Job fails (a spare's failure fails no
  Job: see Replicas), and deletion --ttl seconds after it ends. With
  --jobs, the three Jobs themselves instead, and:
- Service NAME-coordinator (--jobs): the coordinator's cluster DNS name,
  which every node is given as DMLC_PS_ROOT_URI (port --port).
- Job NAME-coordinator: one pod, `mx_server --role=coordinator`.
- Job NAME-server: S pods of an Indexed Job, `mx_server --role=server`. Each
  asks for its completion index as its rank (MX_RANK), listens on
  --server-port and advertises its pod's IP.
- Job NAME-worker: N pods of an Indexed Job running the command after --,
  with the DMLC_* environment the workers' KVStore reads and MX_RANK = its
  completion index.
- Secret NAME-token: the job token (random, made anew each time this runs),
  which every pod reads as MX_JOB_TOKEN and every call carries; the
  coordinator and the servers refuse calls without it. --token-secret names
  an existing Secret (key "token") instead, and then none is printed.

- Secret NAME-tls, with --tls: a new CA's certificate and one key and
  certificate it signed (for the name mx-job, which every node checks; valid
  for --tls-days, default 3650), made with openssl and mounted in every pod
  at /etc/mx/tls; every connection is then mutual TLS. --tls-secret names an
  existing Secret (keys tls.crt, tls.key, ca.crt) instead.

The Secrets printed are immutable ("immutable": true): as each run of this
makes a new token and CA, applying its output again under a running job
would otherwise replace them, and every node the job started later (a
replaced coordinator, a spare) would then refuse, or be refused by, the
nodes already running. kubectl apply fails on them instead ("field is
immutable"); delete the job's objects first to run it again under its name.

Every pod serves Prometheus metrics on --metrics-port (default 9102; the
container port "metrics", with the prometheus.io/scrape, /port and /path
annotations that Prometheus's Kubernetes discovery reads), and its probes
use that port: readiness GET /healthz (ready once the node has registered
and, for a server, knows the workers: what its grpc.health.v1 service
says), except for the servers of a JobSet, GET /livez (see
readiness_path); liveness GET /livez. They are HTTP because the kubelet's gRPC probe
cannot present a certificate to a node that requires mutual TLS.

Success: the workers exit 0; the coordinator then tells every server and
waiting spare to shut down and exits 0 (only then), and they exit 0 on their
own moments later. With --jobs every Job completes. A JobSet completes
when the worker and coordinator Jobs have (its successPolicy: the
coordinator's exit says the servers and spares were told), and its
controller (JobSet v0.8.0 and later) then deletes at once every Job still
running, pods and logs with it: a server or spare still shutting down is
stopped (SIGTERM), and the logs of its Job's pods are lost; the finished
Jobs, and their pods' logs, stay until the JobSet is deleted, --ttl seconds
later. (With the workers as its only target, the JobSet deleted the
coordinator's and the servers' Jobs as the workers finished, before the
coordinator had told anyone.) Failure: worker
pods are never restarted (a restarted worker could not take its rank
back), nor are server pods but with replicas (see Replicas); a coordinator pod that was killed, crashed or stopped (deleted
or drained: SIGTERM before its job finished, exit code 143) is replaced up
to --coordinator-restarts times (backoffLimit, default 1; a podFailurePolicy
fails the Job at once when it exits 1 or 2, having failed the job or
refused a setting itself), and the nodes,
which go on for --coordinator-timeout seconds (default 60) without it,
rejoin the new one. When a
node dies the others fail within the heartbeat timeout with an error that
names it, as under launch.py; the worker Job fails at its first failed pod
(backoffLimit 0), which stops its other pods. `kubectl logs job/NAME-worker`
and `kubectl get pods -l mx-job=NAME` say which node failed.

Replicas (--replicas 2): servers run with --replicas=2 and workers with
MX_REPLICAS=2; the server Job keeps going past a failed index
(backoffLimitPerIndex 0, maxFailedIndexes N-1: Kubernetes 1.29 or later):
the failed server's keys are served by their backups. --spare-servers N
adds a Job of N spare servers (mx_server --spare), started after the
servers; when a server fails, a spare takes its rank and the survivors give
it copies, so the job survives a later failure of a neighbour too. A spare
holds no rank of its own, so one that fails is replaced by a new spare (a
podFailurePolicy with action Ignore) and, in a JobSet, its Job never fails:
there any failed Job fails the set, and a spare lost to an OOM kill, a
drain or a node's loss ended the training. (With --jobs only a spare
disrupted or stopped from outside is replaced: see spare_failure_rules.)
A server stopped from outside (OOM-killed, deleted, drained, its node
lost: server_failure_rules) is replaced the same way: the new pod finds
its rank taken and joins as a spare (mx_server), which takes that rank
once the coordinator has declared the old one dead and ends, as a spare
does, with exit 0 when the job finishes, so the server Job completes. A
server that fails on its own (exit 1 or 2) is not replaced; its failed
index fails the server Job once its other pods end (Kubernetes counts no
failed index as done), and the JobSet, which completes when the worker and
coordinator Jobs do, may then end Failed although the workers finished, if
its controller sees the server Job's failure first: the worker Job's status
says whether training finished.

Elastic (--elastic): the coordinator and servers run with --elastic and the
workers with MX_ELASTIC=1; a failed worker index does not stop the others
(backoffLimitPerIndex 0, maxFailedIndexes N-1: Kubernetes 1.29 or later),
and the worker Job ends Failed if any worker failed.

Checkpoints (--checkpoint-claim CLAIM): the worker pods mount the
PersistentVolumeClaim at /checkpoints; give mx_train
--checkpoint_prefix=/checkpoints/NAME (and --resume_epoch to resume).
Pods run as the image's user, 65534, with the volume group-writable to it.

Shared memory (--shm): server and worker pods mount the node's /dev/shm
(a hostPath volume) at /mx-shm and set MX_SHM_DIR to it, so that a worker
and a server on one node hand values of 16 KiB or more to each other in
shared memory and the RPC carries only where they lie (as launch.py does on
one host). The worker creates a segment per server and removes its name once
the server has mapped it: the memory goes with the last of the two
processes, and no file stays behind. A server on another node cannot map
it, and that worker then sends it values over the network, saying so once;
a server logs each worker that shares memory with it. hostPath volumes need
a namespace whose Pod Security level is "privileged" (neither "baseline" nor
"restricted" admits them), so --shm is off by default.

Ports: the coordinator listens on --port, every server on --server-port
(each in its own pod) and on --stream-port for the TCP connections
(TLS with --tls) that carry pushes and pulls (rpc/stream.h), and with
--replicas 2 the servers' steps to their backups; every process
serves metrics on --metrics-port; all are declared containerPorts. A
NetworkPolicy admits to the job's pods only the job's own pods on the gRPC
and stream ports, and metrics scrapes (from the namespace --metrics-from
names, or any).

Needs Kubernetes 1.26 or later (Indexed Jobs; the coordinator Job's
podFailurePolicy, on by default from 1.26, unless --coordinator-restarts
0), 1.29 for --elastic and --replicas 2 (backoffLimitPerIndex), and
without --jobs the JobSet controller.
"""
import argparse
import json
import re
import secrets
import sys

from job_args import (add_job_arguments, add_worker_command, check_worker_kvstore, server_mode,
                      worker_command, worker_flag_values)
from job_secrets import DEFAULT_TLS_DAYS, SERVER_NAME, JobSecrets

ROLE_LABEL = "mx-role"
JOB_LABEL = "mx-job"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
NOBODY = 65534  # the image's user (deploy/Dockerfile)
CHECKPOINT_DIR = "/checkpoints"  # where --checkpoint-claim is mounted in worker pods
TLS_DIR = "/etc/mx/tls"  # where the TLS Secret is mounted in every pod
SHM_DIR = "/mx-shm"  # where --shm mounts the node's /dev/shm in server and worker pods


def env_value(name, value):
    return {"name": name, "value": str(value)}


def env_field(name, field_path):
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def common_env(args, role):
    """The DMLC_* variables every node reads (as launch.py sets them), and
    how long servers and workers wait for every pod to start."""
    return [
        env_value("DMLC_ROLE", role),
        env_value("DMLC_PS_ROOT_URI", coordinator_host(args)),
        env_value("DMLC_PS_ROOT_PORT", args.port),
        env_value("DMLC_NUM_SERVER", args.num_servers),
        env_value("DMLC_NUM_WORKER", args.num_workers),
        env_value("MX_STARTUP_TIMEOUT_S", args.startup_timeout),
        # Long enough for the Job controller to replace a failed
        # coordinator pod, which the nodes then rejoin.
        env_value("MX_COORDINATOR_TIMEOUT_S", args.coordinator_timeout),
    ]


def token_secret_name(args):
    return args.token_secret or f"{args.name}-token"


def token_env(args):
    return {"name": "MX_JOB_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": token_secret_name(args), "key": "token"}}}


def service_name(args):
    return f"{args.name}-coordinator"


def coordinator_host(args):
    """The coordinator's DNS name: in a JobSet, its pod's hostname in the
    JobSet's subdomain (<name>-coordinator-0-0.<name>); with --jobs, the
    Service's name."""
    return service_name(args) if args.jobs else f"{args.name}-coordinator-0-0.{args.name}"


def tls_secret_name(args):
    return args.tls_secret or f"{args.name}-tls"


def metrics_env(args):
    """Every node serves /metrics, /healthz and /livez on --metrics-port of
    its pod's address."""
    return [env_value("MX_METRICS_PORT", args.metrics_port),
            env_value("MX_METRICS_HOST", "0.0.0.0")]


def tls_env(args):
    """The TLS files, from the Secret mounted at TLS_DIR; every certificate
    names SERVER_NAME, which nodes check instead of the address dialled."""
    if not (args.tls or args.tls_secret):
        return []
    return [env_value("MX_TLS_CERT", f"{TLS_DIR}/tls.crt"),
            env_value("MX_TLS_KEY", f"{TLS_DIR}/tls.key"),
            env_value("MX_TLS_CA", f"{TLS_DIR}/ca.crt"),
            env_value("MX_TLS_SERVER_NAME", SERVER_NAME)]


# A Kubernetes quantity as resources take it: a decimal number with an
# optional binary (Ki..Ei) or decimal (n, u, m, k, M, G, T, P, E) suffix.
QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")


def quantity_is_zero(value):
    return float(re.match(r"[\d.]+", value).group(0) or 0) == 0


def check_checkpoint_prefix(ap, args, cmd):
    """Refuses a worker --checkpoint_prefix that would write outside the
    mounted checkpoint volume (lost with the pod), however absl's spelling
    gives it (-checkpoint_prefix=P, --checkpoint_prefix P, ...); every one
    given is checked."""
    for prefix in worker_flag_values(cmd, "checkpoint_prefix"):
        if not args.checkpoint_claim:
            ap.error(f"--checkpoint_prefix={prefix}: give --checkpoint-claim, or the "
                     "checkpoints are lost with the pods")
        if not prefix.startswith(CHECKPOINT_DIR + "/") or prefix == CHECKPOINT_DIR + "/":
            ap.error(f"--checkpoint_prefix={prefix}: outside the checkpoint volume, mounted at "
                     f"{CHECKPOINT_DIR} (write under {CHECKPOINT_DIR}/NAME)")


def probe(path, period, failures, delay=0):
    return {"httpGet": {"path": path, "port": "metrics"}, "initialDelaySeconds": delay,
            "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}


def labels(args, role=None):
    """The app.kubernetes.io labels, and mx's own (selectors use those)."""
    out = {"app.kubernetes.io/name": "mx", "app.kubernetes.io/instance": args.name,
           "app.kubernetes.io/managed-by": "mx-k8s-job", JOB_LABEL: args.name}
    if role:
        out.update({"app.kubernetes.io/component": role, ROLE_LABEL: role})
    return out


def metadata(args, name, role=None):
    meta = {"name": name, "labels": labels(args, role)}
    if args.namespace:
        meta["namespace"] = args.namespace
    return meta


def role_resources(args, role):
    """Requests (= limits) of a role's pods: the coordinator needs far less
    than the others."""
    cpu, memory = {"coordinator": (args.coordinator_cpu, args.coordinator_memory),
                   "server": (args.server_cpu or args.cpu, args.server_memory or args.memory),
                   "spare": (args.server_cpu or args.cpu, args.server_memory or args.memory),
                   }.get(role, (args.cpu, args.memory))
    return {"cpu": cpu, "memory": memory}


def scheduling(args):
    """The pod spec's placement and pull settings given on the command line."""
    spec = {}
    if args.service_account:
        spec["serviceAccountName"] = args.service_account
    if args.node_selector:
        spec["nodeSelector"] = dict(kv.split("=", 1) for kv in args.node_selector)
    if args.toleration:
        spec["tolerations"] = [toleration(t) for t in args.toleration]
    if args.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": n} for n in args.image_pull_secret]
    return spec


def toleration(text):
    """KEY[=VALUE]:EFFECT as a toleration (checked by main)."""
    key_value, effect = text.rsplit(":", 1)
    key, _, value = key_value.partition("=")
    out = {"key": key, "operator": "Equal" if value else "Exists", "effect": effect}
    if value:
        out["value"] = value
    return out


def grpc_port(args, role):
    """The port a role's pods listen on for gRPC: --port for the coordinator,
    --server-port for servers and spares; workers serve none."""
    return {"coordinator": args.port, "server": args.server_port,
            "spare": args.server_port}.get(role)


def stream_port(args, role):
    """The port servers and spares take stream connections on (--stream-port;
    with TLS, TLS too); None for other roles."""
    return args.stream_port if role in ("server", "spare") else None


def readiness_path(args, role):
    """/healthz, except for servers in a JobSet: its in-order start-up
    starts the workers once the servers are ready, and a server finishes
    registering (and serves /healthz) only once the workers have, so there
    a server is ready when its process answers (/livez)."""
    return "/livez" if role == "server" and not args.jobs else "/healthz"


def container(args, role, command, env):
    """The node's container. Probes go to the HTTP port, not to gRPC: with
    mutual TLS the kubelet's gRPC probe could not present a certificate.
    Readiness is /healthz, which says what the node's grpc.health.v1
    service says (not serving until the node has registered and, for a
    server, knows the workers), but /livez for a JobSet's servers
    (readiness_path); liveness is /livez (the process answers,
    and the coordinator's sweep or a server's shard check has run within
    15 s), as registration may wait up to --startup-timeout."""
    resources = role_resources(args, role)
    return {
        "name": role,
        "image": args.image,
        "imagePullPolicy": args.image_pull_policy,
        "command": command,
        "env": env + metrics_env(args) + tls_env(args) + [token_env(args)],
        "ports": ([{"name": "grpc", "containerPort": grpc_port(args, role), "protocol": "TCP"}]
                  if grpc_port(args, role) else []) +
                 ([{"name": "stream", "containerPort": stream_port(args, role), "protocol": "TCP"}]
                  if stream_port(args, role) else []) +
                 [{"name": "metrics", "containerPort": args.metrics_port, "protocol": "TCP"}],
        "readinessProbe": probe(readiness_path(args, role), period=5, failures=1),
        "livenessProbe": probe("/livez", period=10, failures=3, delay=10),
        "resources": {"requests": resources, "limits": resources},
        # Pod Security "restricted": no privilege escalation, no capabilities.
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }


# A container's exit codes when it was stopped from outside, as Kubernetes
# reports them (128 + the signal): SIGKILL (the OOM killer, the kubelet at
# the end of a grace period) and SIGTERM (a deletion, a drain, an eviction,
# a failed liveness probe).
STOPPED_FROM_OUTSIDE = [137, 143]


def coordinator_failure_rules(role):
    """A coordinator that may be replaced (backoffLimit > 0) is replaced only
    when killed, stopped or crashed: exit code 1 or 2 is the daemon's own
    decision (the job failed, a bad setting), which a new pod would not
    change, and fails the Job at once. Any other failure, 143 (stopped by
    SIGTERM before the job finished: a deletion, a drain) and 137 included,
    counts toward the backoffLimit, and the pod is replaced."""
    return [{"action": "FailJob",
             "onExitCodes": {"containerName": role, "operator": "In", "values": [1, 2]}}]


# A server's exit code when the coordinator declared it dead (stopped or
# cut off long enough for the job to go on without it; mx_server.cc
# kExitDeclaredDead): as one stopped from outside, a new pod restores it.
DECLARED_DEAD = 3


def server_failure_rules(role):
    """With replicas, a server stopped from outside (STOPPED_FROM_OUTSIDE, or
    disrupted) or declared dead (DECLARED_DEAD: a partition, a long pause)
    is replaced, its failure not counted: the new pod finds its
    rank taken and joins as a spare (mx_server), which takes the rank back
    and ends with exit 0 when the job finishes, so the server Job completes
    (its failed index failed it, and perhaps the JobSet, after training
    finished). A server that fails on its own (1, 2) is not replaced: a new
    one would fail again."""
    return [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                      "status": "True"}]},
            {"action": "Ignore", "onExitCodes": {"containerName": role, "operator": "In",
                                                 "values": STOPPED_FROM_OUTSIDE + [DECLARED_DEAD]}}]


def spare_failure_rules(args, role):
    """A failed spare is replaced by a new one, its failure not counted
    (action Ignore): a spare holds nothing until it takes a dead server's
    rank, and a new one registers as a spare again, so the spare Job never
    fails, and with it no JobSet. Failures so ignored: a pod disrupted (a
    node lost or drained, a preemption, an eviction: the condition
    DisruptionTarget) and, in a JobSet, any other (exit code 137: OOM-killed;
    1: it lost the coordinator, or the job failed, which the other Jobs
    report); the JobSet deletes the Job when it ends, which bounds the
    replacements. With --jobs, which has no JobSet to do that, only a spare
    stopped from outside (STOPPED_FROM_OUTSIDE), or declared dead once it
    took a rank (DECLARED_DEAD), is replaced: a spare that
    fails on its own (1, 2) would fail again in every replacement, for
    ever once the job has ended, and its Job's failure fails nothing
    there."""
    codes = ({"operator": "NotIn", "values": [0]} if not args.jobs
             else {"operator": "In", "values": STOPPED_FROM_OUTSIDE + [DECLARED_DEAD]})
    return [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                      "status": "True"}]},
            {"action": "Ignore", "onExitCodes": {"containerName": role, **codes}}]


def job(args, role, count, command, env, per_index=False, claim=None, max_failed=None,
        backoff=0):
    """A Job of `count` pods that never restart, as the image's unprivileged
    user; for servers and workers an Indexed Job, whose completion index is
    the pod's rank. `claim`: a PersistentVolumeClaim to mount at
    CHECKPOINT_DIR (group-writable for that user through fsGroup)."""
    shm = args.shm and role in ("server", "spare", "worker")
    if shm:
        env = env + [env_value("MX_SHM_DIR", SHM_DIR)]
    pod = {
        **scheduling(args),
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": NOBODY, "runAsGroup": NOBODY,
                            "fsGroup": NOBODY, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container(args, role, command, env)],
    }
    volumes, mounts = [], []
    if claim:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_DIR})
    if args.tls or args.tls_secret:
        # Readable by the pod's group (fsGroup) only.
        volumes.append({"name": "tls", "secret": {"secretName": tls_secret_name(args),
                                                   "defaultMode": 0o440}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if shm:
        volumes.append({"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}})
        mounts.append({"name": "shm", "mountPath": SHM_DIR})
    if volumes:
        pod["volumes"] = volumes
        pod["containers"][0]["volumeMounts"] = mounts
    spec = {
        "completions": count,
        "parallelism": count,
        # Finished Jobs (and their pods and logs) go after this long.
        "ttlSecondsAfterFinished": args.ttl,
        "template": {"metadata": {"labels": labels(args, role), "annotations": {
            # Prometheus's conventional pod annotations for its
            # kubernetes_sd_configs scrape jobs.
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(args.metrics_port),
            "prometheus.io/path": "/metrics",
        }}, "spec": pod},
    }
    if role != "coordinator":
        spec["completionMode"] = "Indexed"
    if args.deadline:
        spec["activeDeadlineSeconds"] = args.deadline
    if per_index:
        spec["backoffLimitPerIndex"] = 0
        spec["maxFailedIndexes"] = count - 1 if max_failed is None else max_failed
    else:
        spec["backoffLimit"] = backoff
    rules = (spare_failure_rules(args, role) if role == "spare"
             else server_failure_rules(role) if role == "server" and args.replicas > 1
             else coordinator_failure_rules(role) if backoff > 0 else [])
    if rules:
        spec["podFailurePolicy"] = {"rules": rules}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(args, f"{args.name}-{role}", role),
        "spec": spec,
    }


def manifests(args, worker_command):
    elastic = ["--elastic"] if args.elastic else []
    mode = server_mode(args.kvstore)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(args, service_name(args)),
        "spec": {
            "selector": {JOB_LABEL: args.name, ROLE_LABEL: "coordinator"},
            "ports": [{"name": "grpc", "port": args.port, "targetPort": args.port}],
        },
    }
    coordinator = job(
        args, "coordinator", 1,
        [args.server_command, "--role=coordinator", f"--bind=0.0.0.0:{args.port}",
         f"--heartbeat_timeout_s={args.heartbeat_timeout}"] + elastic,
        common_env(args, "scheduler"), backoff=args.coordinator_restarts)
    server_command = [args.server_command, "--role=server",
                      f"--coordinator={coordinator_host(args)}:{args.port}",
                      f"--bind=0.0.0.0:{args.server_port}", "--advertise=$(POD_IP)",
                      f"--stream_port={stream_port(args, 'server') or -1}",
                      f"--mode={mode}", f"--replicas={args.replicas}",
                      f"--staleness={args.staleness}"] + elastic
    # With replicas a failed server index does not stop the others: its
    # keys' backups take over.
    server = job(
        args, "server", args.num_servers, server_command,
        common_env(args, "server") + [env_field("MX_RANK", COMPLETION_INDEX),
                                      env_field("POD_IP", "status.podIP")],
        per_index=args.replicas > 1)
    spare = job(args, "spare", args.spare_servers, server_command + ["--spare"],
                common_env(args, "server") + [env_field("POD_IP", "status.podIP")],
                per_index=True, max_failed=args.spare_servers) if args.spare_servers else None
    threads = [env_value(v, args.cpu) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
               if re.fullmatch(r"[1-9][0-9]*", args.cpu)]
    worker = job(
        args, "worker", args.num_workers, worker_command,
        common_env(args, "worker") + [env_field("MX_RANK", COMPLETION_INDEX),
                                      env_value("MX_ELASTIC", 1 if args.elastic else 0),
                                      env_value("MX_REPLICAS", args.replicas),
                                      env_value("MX_STALENESS", args.staleness)] + threads,
        per_index=args.elastic, claim=args.checkpoint_claim)
    daemons = [("coordinator", coordinator), ("server", server)] + ([("spare", spare)] if spare else [])
    if args.jobs:
        items = [service, network_policy(args)] + [j for _, j in daemons] + [worker]
    else:
        items = [network_policy(args), jobset(args, daemons + [("worker", worker)])]
    if not args.token_secret:
        items.insert(0, {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(args, token_secret_name(args)),
            "type": "Opaque",
            # A new token each run: never one applied over a running job's.
            "immutable": True,
            "stringData": {"token": secrets.token_hex(32)},
        })
    if args.tls:
        items.insert(0, tls_secret(args))
    return {"apiVersion": "v1", "kind": "List", "items": items}


def jobset(args, jobs):
    """One JobSet (jobset.x-k8s.io/v1alpha2) of the (role, Job) pairs, each
    a replicated Job of one: stable DNS names (<name>-<role>-0-<index>.<name>),
    start-up in order (coordinator, servers, workers, each once the one
    before is ready), success when the workers and the coordinator have
    succeeded, failure (and every pod stopped) when any Job fails, deletion
    --ttl seconds after.

    Success waits for the coordinator too: a finished JobSet's controller
    deletes every Job still running at once (jobset v0.8.0 and later, PR
    #667), pods and logs with it, and the coordinator exits 0 only once
    every worker has finished and every server and waiting spare has been
    told to shut down. With the workers as the only target, the
    coordinator's and the servers' Jobs were deleted as the workers
    finished, before anyone was told. Servers and spares still shutting
    down when the coordinator exits may still be stopped so, their Job's
    logs lost with it."""
    replicated = []
    for role, job_object in jobs:
        spec = {k: v for k, v in job_object["spec"].items() if k != "ttlSecondsAfterFinished"}
        replicated.append({"name": role, "replicas": 1,
                           "template": {"metadata": {"labels": labels(args, role)},
                                        "spec": spec}})
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata(args, args.name),
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": args.name},
            "startupPolicy": {"startupPolicyOrder": "InOrder"},
            # Done once the workers have finished and the coordinator has
            # told the servers and spares so (see above).
            "successPolicy": {"operator": "All",
                              "targetReplicatedJobs": ["worker", "coordinator"]},
            "failurePolicy": {"maxRestarts": 0},
            "ttlSecondsAfterFinished": args.ttl,
            "replicatedJobs": replicated,
        },
    }


def network_policy(args):
    """Admits to the job's pods only the job's own pods, on the gRPC ports,
    and the metrics port from namespaces that --metrics-from selects (any
    namespace by default: Prometheus runs elsewhere); nothing else."""
    job_pods = {"podSelector": {"matchLabels": {JOB_LABEL: args.name}}}
    scrapers = ({"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": args.metrics_from}}} if args.metrics_from is not None
        else {"namespaceSelector": {}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(args, f"{args.name}-mx"),
        "spec": {
            "podSelector": {"matchLabels": {JOB_LABEL: args.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [job_pods], "ports": [{"protocol": "TCP", "port": port} for port in
                                               (args.port, args.server_port,
                                                stream_port(args, "server")) if port]},
                {"from": [scrapers], "ports": [{"protocol": "TCP", "port": args.metrics_port}]},
            ],
        },
    }


def tls_secret(args):
    """A Secret NAME-tls with a new CA's certificate (ca.crt) and one key
    and certificate it signed (tls.key, tls.crt) that every pod presents,
    valid for --tls-days; made with openssl in a private directory removed
    at once. Immutable, as the token's Secret: a new CA applied over a
    running job's would split the job in two."""
    made = JobSecrets(tls=True, tls_days=args.tls_days or DEFAULT_TLS_DAYS)
    try:
        cert, key, ca = made.issue("pod")
        files = {}
        for name, path in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)):
            with open(path) as f:
                files[name] = f.read()
    finally:
        made.remove()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(args, tls_secret_name(args)),
        "type": "kubernetes.io/tls",
        "immutable": True,
        "stringData": files,
    }


def main():
    ap = argparse.ArgumentParser(
        description="Print the Kubernetes objects of a distributed mx job (see the module doc).")
    ap.add_argument("--name", required=True,
                    help="the job's name: a DNS label, prefix of every object's name")
    add_job_arguments(ap)
    ap.add_argument("--image", required=True, help="deploy/Dockerfile's image, as pods pull it")
    ap.add_argument("--image-pull-policy", default="IfNotPresent",
                    choices=["Always", "IfNotPresent", "Never"],
                    help="when the kubelet pulls --image")
    ap.add_argument("--port", type=int, default=9091, help="the coordinator's port")
    ap.add_argument("--server-port", type=int, default=9092,
                    help="the port every server listens on (in its own pod)")
    ap.add_argument("--stream-port", type=int, default=9093,
                    help="the port every server takes the stream connections that carry pushes "
                         "and pulls (and, with --replicas 2, other servers' steps) on")
    ap.add_argument("--metrics-from", metavar="NAMESPACE",
                    help="admit metrics scrapes only from this namespace (default: any)")
    ap.add_argument("--startup-timeout", type=int, default=600,
                    help="seconds within which every pod must start and register (scheduling "
                         "and image pulls included), else the job fails saying who is missing "
                         "(1 to 86400); enforced by the pods that started: a job none of whose "
                         "pods starts waits until --deadline")
    ap.add_argument("--ttl", type=int, default=3600,
                    help="seconds a finished JobSet or Job (its pods, their logs) is kept before "
                         "deletion (a finished JobSet's Jobs still running go at once)")
    ap.add_argument("--coordinator-timeout", type=int, default=60, metavar="SECONDS",
                    help="how long nodes go on without an answer from the coordinator before "
                         "they give it up (MX_COORDINATOR_TIMEOUT_S; default 60: the Job "
                         "controller waits 10 s before it replaces a failed pod)")
    ap.add_argument("--deadline", type=int, default=0,
                    help="seconds after which a Job still running is failed (0: none)")
    ap.add_argument("--jobs", action="store_true",
                    help="three plain Jobs and a Service instead of one JobSet (for clusters "
                         "without the JobSet controller)")
    ap.add_argument("--namespace", help="the namespace of every object (default: kubectl's)")
    ap.add_argument("--service-account", help="the pods' serviceAccountName")
    ap.add_argument("--node-selector", action="append", metavar="KEY=VALUE",
                    help="a node label the pods need (repeatable)")
    ap.add_argument("--toleration", action="append", metavar="KEY[=VALUE]:EFFECT",
                    help="a taint the pods tolerate, e.g. gpu=yes:NoSchedule (repeatable)")
    ap.add_argument("--image-pull-secret", action="append", metavar="NAME",
                    help="a Secret for pulling --image (repeatable)")
    ap.add_argument("--coordinator-cpu", default="250m", help="CPU of the coordinator's pod")
    ap.add_argument("--coordinator-memory", default="256Mi",
                    help="memory of the coordinator's pod")
    ap.add_argument("--server-cpu", help="CPU of each server's pod (default: --cpu)")
    ap.add_argument("--server-memory", help="memory of each server's pod (default: --memory)")
    ap.add_argument("--cpu", default="1", help="CPU of each pod (request and limit)")
    ap.add_argument("--memory", default="2Gi", help="memory of each pod (request and limit)")
    ap.add_argument("--server-command", default="mx_server", help="the daemon in the image")
    ap.add_argument("--checkpoint-claim",
                    help=f"a PersistentVolumeClaim mounted at {CHECKPOINT_DIR} in the worker pods "
                         f"(ReadWriteMany unless they share a node): pass "
                         f"--checkpoint_prefix={CHECKPOINT_DIR}/NAME to mx_train")
    ap.add_argument("--token-secret",
                    help="an existing Secret whose key 'token' holds the job token (default: "
                         "print a Secret NAME-token with a new random token)")
    ap.add_argument("--metrics-port", type=int, default=9102,
                    help="every pod serves Prometheus metrics, /healthz (readiness) and /livez "
                         "(liveness) over HTTP on this port")
    ap.add_argument("--tls", action="store_true",
                    help="mutual TLS between the pods: print a Secret NAME-tls with a new CA and "
                         "a certificate for the pods (made with openssl)")
    ap.add_argument("--tls-days", type=int, metavar="DAYS",
                    help=f"with --tls: how long the CA and the certificate are valid (default "
                         f"{DEFAULT_TLS_DAYS}; every new connection checks, so longer than the "
                         "job runs)")
    ap.add_argument("--tls-secret",
                    help="mutual TLS with an existing Secret: keys tls.crt, tls.key and ca.crt, "
                         f"the certificate valid for the name {SERVER_NAME}")
    ap.add_argument("--shm", action="store_true",
                    help="workers and servers on one node exchange values through the node's "
                         "shared memory (/dev/shm as a hostPath volume: the namespace must "
                         "admit those, Pod Security 'privileged')")
    add_worker_command(ap)
    args = ap.parse_args()
    cmd = worker_command(ap, args)
    if not 2 <= args.coordinator_timeout <= 86400:
        ap.error(f"--coordinator-timeout {args.coordinator_timeout}: must be 2 to 86400 seconds")
    if args.tls and args.tls_secret:
        ap.error("give --tls (a new Secret) or --tls-secret (an existing one), not both")
    if args.tls_days is not None and not args.tls:
        ap.error("--tls-days: applies to --tls (the CA it makes)")
    if args.tls_days is not None and not 1 <= args.tls_days <= 36500:
        ap.error(f"--tls-days {args.tls_days}: must be 1 to 36500 days")
    if not 1 <= args.metrics_port <= 65535 or args.metrics_port == args.port:
        ap.error(f"--metrics-port {args.metrics_port}: not a port other than --port")
    # Object names are DNS labels; the longest suffix is "-coordinator".
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", args.name):
        ap.error(f"--name {args.name!r}: lower-case letters, digits and '-', starting with a "
                 "letter, at most 40 characters")
    # A namespace name; "" (an unset shell variable) admitted every
    # namespace without a word.
    if args.metrics_from is not None and not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", args.metrics_from):
        ap.error(f"--metrics-from {args.metrics_from!r}: not a namespace name")
    # The nodes' limit for MX_STARTUP_TIMEOUT_S: more, and every pod would
    # refuse to start.
    if not 1 <= args.startup_timeout <= 86400:
        ap.error(f"--startup-timeout {args.startup_timeout}: must be 1 to 86400 seconds")
    if not 1 <= args.port <= 65535:
        ap.error(f"--port {args.port}: not a port")
    if not 1 <= args.server_port <= 65535 or args.server_port in (args.port, args.metrics_port):
        ap.error(f"--server-port {args.server_port}: not a port other than --port and "
                 "--metrics-port")
    if not 1 <= args.stream_port <= 65535 or args.stream_port in (args.port, args.metrics_port,
                                                                  args.server_port):
        ap.error(f"--stream-port {args.stream_port}: not a port other than --port, "
                 "--server-port and --metrics-port")
    for flag, value in (("--cpu", args.cpu), ("--memory", args.memory),
                        ("--coordinator-cpu", args.coordinator_cpu),
                        ("--coordinator-memory", args.coordinator_memory),
                        ("--server-cpu", args.server_cpu), ("--server-memory", args.server_memory)):
        if value is None:
            continue
        if not QUANTITY.fullmatch(value) or quantity_is_zero(value):
            ap.error(f"{flag} {value!r}: not a positive Kubernetes quantity (such as 500m, 2, "
                     "1.5, 512Mi, 2Gi)")
    dns = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    for flag, value in (("--namespace", args.namespace),
                        ("--service-account", args.service_account)):
        if value is not None and not re.fullmatch(dns, value):
            ap.error(f"{flag} {value!r}: lower-case letters, digits and '-'")
    for kv in args.node_selector or []:
        if "=" not in kv or not kv.split("=", 1)[0]:
            ap.error(f"--node-selector {kv!r}: give KEY=VALUE")
    for t in args.toleration or []:
        if not re.fullmatch(r"[^=:\s]+(=[^:\s]*)?:(NoSchedule|PreferNoSchedule|NoExecute)", t):
            ap.error(f"--toleration {t!r}: give KEY[=VALUE]:EFFECT, the effect NoSchedule, "
                     "PreferNoSchedule or NoExecute")
    if not args.image.strip() or any(c.isspace() for c in args.image):
        ap.error(f"--image {args.image!r}: an image reference, such as registry/mx:1.0")
    check_checkpoint_prefix(ap, args, cmd)
    if args.ttl < 0:
        ap.error(f"--ttl {args.ttl}: must be at least 0 seconds")
    if args.deadline < 0:
        ap.error(f"--deadline {args.deadline}: must be at least 1 second, or 0 for none")
    check_worker_kvstore(ap, args, cmd)
    json.dump(manifests(args, cmd), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
