#!/usr/bin/env python3
"""Runs the pods of deploy/k8s_job.py's objects as local processes, the way
Kubernetes would start them, so that a test can check that the manifests'
commands, flags and environment make a working job:

  k8s_local.py MANIFEST.json --bin mx_server=PATH --bin mx_train=PATH
               [--volumes DIR] [--host-path-root DIR] [--timeout S]
               [--grace-period S]

What Kubernetes would provide is played here on the loopback network: each
pod gets an address of its own, 127.0.1.N (status.podIP), where its
0.0.0.0 (in flags and environment values) binds, as in a pod's own network
namespace; a Service's name resolves to the address of the pod its
selector picks (cluster DNS); a NetworkPolicy is accepted, not enforced;
an Indexed Job's pod gets its completion index (the
annotation batch.kubernetes.io/job-completion-index), and $(VAR) in a
container's env, command and args expands as the kubelet expands it. The
image is replaced by --bin: a command's first word (its file name) maps to
a local binary. A PersistentVolumeClaim is the directory DIR/CLAIM (one for
every pod that mounts it, as a ReadWriteMany volume), and its mount path in
a pod's arguments the path of that directory. A Secret volume is a private
directory holding a file per key, and its mount path in the pod's
arguments and environment values the path of that directory. A hostPath
volume is that path on this machine, the pods' one node, or with
--host-path-root DIR the same path under DIR (DIR/dev/shm for /dev/shm,
made if missing): a directory of the caller's own, so that what the pods
leave there is theirs alone, not the machine's, where other runs write
too. Probes
(httpGet, to the pod's address) run as the kubelet runs them: a
pod is "ready" once its readiness probe first succeeds (printed as
"k8s_local.py: server 1 ready"), and a pod whose liveness probe fails
failureThreshold times in a row is stopped (and so fails). Pods are
stopped as the kubelet stops them, after a failed liveness probe as when
deleted (by a failed Job or JobSet): SIGTERM to the pod's PID 1, then
SIGKILL once --grace-period seconds (default 5; the kubelet's default is
30) have passed if it still runs. Pods run as this process's
user, whatever their securityContext says. Anything else in the objects (another kind, another
valueFrom) is an error that says what: the manifests would rely on
something this runner does not play.

Each pod runs in a PID namespace of its own (unshare), as its PID 1, where
the system allows. Jobs are judged as the Job controller judges them, from
their pods' exits (each pod's exit code as Kubernetes reports it, 128 + the
signal for one killed by a signal): a failed pod meets its Job's
podFailurePolicy first (the first rule whose onExitCodes, In or NotIn,
match; onPodConditions rules never match here, as no pod here is evicted,
preempted or loses its node): FailJob fails the Job at once; Ignore
replaces the pod (at once, where Kubernetes may wait), counting nothing;
FailIndex fails the pod's index; Count, or no rule, counts the failure. A
Job with backoffLimit N replaces failed pods (at once) until more than N
have failed, and then fails; one with backoffLimitPerIndex N does so per
index, an index failing when it has failed more than N times, and the Job
fails when more indexes than maxFailedIndexes have failed, or once every
index has ended, succeeded or failed, if any failed (what Kubernetes does:
a failed index is never counted as done). A Job completes when every index
(every one of its completions) has succeeded. A failed Job's pods still
running are stopped, as the Job controller deletes them. Each verdict is
printed ("k8s_local.py: Job fm-server failed (failed indexes 1)",
"k8s_local.py: Job fm-worker completed").

A JobSet (jobset.x-k8s.io) is played as its controller plays it: its
replicated Jobs become Jobs <jobset>-<job>-<i>; with enableDNSHostnames,
each pod's <job>-<index>.<subdomain> resolves to its address; with
startupPolicyOrder InOrder, each replicated Job starts once the pods of
the ones before are ready ("k8s_local.py: start-up stage 1 ready"). After
each round of the Jobs' verdicts it is judged as its controller judges
it, failure first: a failed Job (failurePolicy maxRestarts 0, or none)
fails the JobSet and every pod of it is stopped ("k8s_local.py: JobSet fm
failed ..."); else it completes when its successPolicy's target Jobs have
completed (operator All or Any, over the replicated Jobs that
targetReplicatedJobs names; every Job without one): "k8s_local.py: JobSet
fm completed (fm-coordinator-0, fm-worker-0 completed)". A finished JobSet
stays so: a Job that fails after it completed changes nothing, and its
Jobs replace no pod (it deletes them). Not played: restarts (maxRestarts
> 0, or failurePolicy rules, are refused), and the deletion of the Jobs
still running once the JobSet has finished, which stops their pods
(jobset v0.8.0 and later): each such Job is named ("k8s_local.py: JobSet
fm: Job fm-server-0 still running; its controller deletes it, not played
here"), and its pods end on their own, so that a test still sees their
exits and logs (with k8s_job.py's JobSet, servers and spares the
coordinator told to shut down before it exited; a real controller stops
those still running, and their logs go with their Job).

Pods start as Kubernetes would start them, the Jobs' pods all at once in
the List's order; each output line is prefixed with the pod's role and
index ("[server 1] ..."). Exits 0 when every pod exits 0 within --timeout
(a pod that its Job replaced aside), else 1 after killing what still runs,
saying which pods failed.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


class Unsupported(Exception):
    pass


def expand(text, env):
    """$(VAR) as the kubelet expands it: defined variables only, $$ for $."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def pod_env(container, index, services, secrets, pod_ip):
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            value = expand(e["value"], env)
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) not in secrets:
                raise Unsupported(f"env {e['name']}: no Secret {ref['name']} with key {ref['key']}")
            value = secrets[(ref["name"], ref["key"])]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            value = pod_ip
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == INDEX_FIELD:
            if index is None:
                raise Unsupported(f"env {e['name']}: a completion index outside an Indexed Job")
            value = str(index)
        else:
            raise Unsupported(f"env {e['name']}: {json.dumps(e)}")
        value = pod_ip if value == "0.0.0.0" else value  # the pod's own network
        env[e["name"]] = services.get(value, value)
    return env


def secret_dir(name, secrets, secrets_dir):
    """A directory with a file (mode 0400) per key of Secret `name`."""
    keys = {k: v for (n, k), v in secrets.items() if n == name}
    if not keys:
        raise Unsupported(f"no Secret {name}")
    path = os.path.join(secrets_dir, name)
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700)
        for key, value in keys.items():
            fd = os.open(os.path.join(path, key), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(value)
    return path


def host_path(path, root):
    """Where a hostPath volume's `path` is here: itself, or under `root`
    (--host-path-root)."""
    if root is None:
        return path
    return os.path.join(root, os.path.normpath(path).lstrip("/"))


def mounts(pod_spec, volumes_dir, secrets, secrets_dir, host_root=None):
    """{mount path: local directory} of a pod's PersistentVolumeClaims,
    Secrets and hostPaths (under host_root, if given)."""
    claims = {}
    for v in pod_spec.get("volumes", []):
        if "secret" in v:
            claims[v["name"]] = secret_dir(v["secret"]["secretName"], secrets, secrets_dir)
            continue
        if "hostPath" in v:  # the pods run here: this machine is their node
            claims[v["name"]] = host_path(v["hostPath"]["path"], host_root)
            continue
        if "persistentVolumeClaim" not in v:
            raise Unsupported(f"volume {v['name']}: {json.dumps(v)}")
        if volumes_dir is None:
            raise Unsupported(f"volume {v['name']}: give --volumes")
        claims[v["name"]] = os.path.join(volumes_dir, v["persistentVolumeClaim"]["claimName"])
    out = {}
    for c in pod_spec["containers"]:
        for m in c.get("volumeMounts", []):
            os.makedirs(claims[m["name"]], exist_ok=True)
            out[m["mountPath"].rstrip("/")] = claims[m["name"]]
    return out


def own_ports(container):
    """{port name or number: port} of a container's containerPorts."""
    ports = {}
    for p in container.get("ports", []):
        ports[p.get("name", str(p["containerPort"]))] = p["containerPort"]
        ports[str(p["containerPort"])] = p["containerPort"]
    return ports


def probes(container, ports, pod_ip):
    """{"readiness"/"liveness": ((address, port, path), initial delay s,
    period s, failure threshold)}."""
    out = {}
    for kind in ("readiness", "liveness"):
        pr = container.get(kind + "Probe")
        if pr is None:
            continue
        if "httpGet" not in pr:
            raise Unsupported(f"{kind}Probe: {json.dumps(pr)}")
        port = str(pr["httpGet"]["port"])
        if port not in ports:
            raise Unsupported(f"{kind}Probe: port {port} is no containerPort")
        out[kind] = ((pod_ip, ports[port], pr["httpGet"].get("path", "/")),
                     pr.get("initialDelaySeconds", 0), pr.get("periodSeconds", 10),
                     pr.get("failureThreshold", 3))
    return out


def pod_addresses(items):
    """{(Job name, pod index): address}: 127.0.1.1, 127.0.1.2, ... in the
    List's order."""
    addresses = {}
    for item in items:
        if item["kind"] == "Job":
            for i in range(item["spec"]["completions"]):
                addresses[(item["metadata"]["name"], i)] = f"127.0.1.{len(addresses) + 1}"
    return addresses


def service_addresses(items, addresses):
    """{Service name: the address of the first pod its selector picks}."""
    services = {}
    for item in items:
        if item["kind"] != "Service":
            continue
        selector = item["spec"]["selector"].items()
        for job in items:
            labels = job.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
            if job["kind"] == "Job" and selector <= labels.items():
                services[item["metadata"]["name"]] = addresses[(job["metadata"]["name"], 0)]
                break
        else:
            raise Unsupported(f"Service {item['metadata']['name']}: selects no pod")
    return services


class JobSet:
    """A JobSet's verdict, as its controller reaches it (see the module
    doc): `jobs` its Jobs' names, `targets` those its successPolicy waits
    for, `any_target` whether one of them is enough (operator Any)."""

    def __init__(self, name, spec):
        failure = spec.get("failurePolicy", {})
        if failure.get("maxRestarts", 0) != 0 or failure.get("rules"):
            raise Unsupported(f"JobSet {name}: failurePolicy {json.dumps(failure)} "
                              "(restarts are not played)")
        success = spec.get("successPolicy", {})
        if success.get("operator", "All") not in ("All", "Any"):
            raise Unsupported(f"JobSet {name}: successPolicy {json.dumps(success)}")
        self.name = name
        self.any_target = success.get("operator") == "Any"
        target_names = success.get("targetReplicatedJobs") or [
            rj["name"] for rj in spec["replicatedJobs"]]
        self.jobs, self.targets = [], []
        for rj in spec["replicatedJobs"]:
            for j in range(rj.get("replicas", 1)):
                self.jobs.append(f"{name}-{rj['name']}-{j}")
                if rj["name"] in target_names:
                    self.targets.append(f"{name}-{rj['name']}-{j}")
        self.state = None  # "Completed" or "Failed" once finished


def expand_jobsets(items):
    """A JobSet's replicated Jobs as the Jobs its controller makes
    (<jobset>-<job>-<i>), in its order. Returns (items, {pod host name in
    the JobSet's subdomain: (Job, pod index)}, {Job: start-up stage}, {Job:
    its JobSet}). Stages: a JobSet with startupPolicyOrder InOrder starts
    each replicated Job once the ones before are ready; everything else
    starts at once (stage 0)."""
    out, hosts, stages, owner = [], {}, {}, {}
    for item in items:
        if item["kind"] != "JobSet":
            out.append(item)
            continue
        js, spec = item["metadata"]["name"], item["spec"]
        jobset = JobSet(js, spec)
        subdomain = spec.get("network", {}).get("subdomain", js)
        in_order = spec.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder"
        for stage, rj in enumerate(spec["replicatedJobs"]):
            for j in range(rj.get("replicas", 1)):
                name = f"{js}-{rj['name']}-{j}"
                labels = rj["template"].get("metadata", {}).get("labels", {})
                job = {"kind": "Job", "metadata": {"name": name, "labels": labels},
                       "spec": rj["template"]["spec"]}
                out.append(job)
                for i in range(job["spec"]["completions"]):
                    hosts[f"{name}-{i}.{subdomain}"] = (name, i)
                stages[name] = stage if in_order else 0
                owner[name] = jobset
    return out, hosts, stages, owner


class Job:
    """A Job's verdict, as the Job controller reaches it from its pods'
    exits (see the module doc)."""

    ACTIONS = ("FailJob", "Ignore", "FailIndex", "Count")

    def __init__(self, name, spec, container, jobset):
        self.name, self.container, self.jobset = name, container, jobset
        self.completions = spec["completions"]
        self.per_index = spec.get("backoffLimitPerIndex")
        # Kubernetes' default backoffLimit is 6 (unlimited with a per-index one).
        self.backoff_limit = None if self.per_index is not None else spec.get("backoffLimit", 6)
        self.max_failed = spec.get("maxFailedIndexes")
        self.rules = spec.get("podFailurePolicy", {}).get("rules", [])
        for rule in self.rules:
            on = rule.get("onExitCodes")
            if rule.get("action") not in self.ACTIONS or (
                    on is not None and on.get("operator") not in ("In", "NotIn")):
                raise Unsupported(f"{name}: podFailurePolicy rule {json.dumps(rule)}")
        self.failures = 0           # pod failures counted (backoffLimit)
        self.index_failures = {}    # index: its pod failures counted (backoffLimitPerIndex)
        self.failed_indexes, self.succeeded = set(), set()
        self.state = None           # "Complete" or "Failed" once finished; "Deleted"

    def action(self, code):
        """The action of the first podFailurePolicy rule that a pod that
        exited with `code` (not 0) matches, or Count."""
        for rule in self.rules:
            on = rule.get("onExitCodes")
            if on is None or on.get("containerName", self.container) != self.container:
                continue  # onPodConditions: no pod here gets a disruption condition
            if (code in on["values"]) == (on["operator"] == "In"):
                return rule["action"]
        return "Count"

    def judge(self, index, code):
        """A pod of index `index` exited with `code`: returns what the
        controller does, "replace" (with why), "fail" (with why) or None
        (the index succeeded, or failed with the Job going on)."""
        if code == 0:
            self.succeeded.add(index)
            return None, None
        act = self.action(code)
        if act == "FailJob":
            return "fail", "its podFailurePolicy fails the Job"  # whatever the backoffLimit
        if act == "Ignore":
            return "replace", "its podFailurePolicy ignores that"
        if self.per_index is None:
            self.failures += 1
            if self.failures > self.backoff_limit:
                return "fail", None
            return "replace", f"backoffLimit {self.backoff_limit}"
        self.index_failures[index] = self.index_failures.get(index, 0) + 1
        if act == "FailIndex" or self.index_failures[index] > self.per_index:
            self.failed_indexes.add(index)
            return None, None
        return "replace", f"backoffLimitPerIndex {self.per_index}"

    def verdict(self):
        """Why the Job has failed, "" once it has completed, or None while
        it runs, from its indexes' ends."""
        failed = self.failed_indexes
        if self.max_failed is not None and len(failed) > self.max_failed:
            return (f"failed indexes {','.join(map(str, sorted(failed)))}: more than "
                    f"maxFailedIndexes {self.max_failed}")
        if failed and len(failed | self.succeeded) >= self.completions:
            return f"failed indexes {','.join(map(str, sorted(failed)))}"
        if len(self.succeeded) >= self.completions:
            return ""
        return None


def pods(items, bins, volumes_dir, secrets_dir, host_root=None):
    """(label, argv, env, probes, Job name, pod index, stage) of every pod
    the objects would start, and {Job name: Job}."""
    items, hosts, stages, owner = expand_jobsets(items)
    addresses = pod_addresses(items)
    services, secrets = service_addresses(items, addresses), {}
    for host, pod in hosts.items():  # cluster DNS for the JobSet's pods
        services[host] = addresses[pod]
    for item in items:
        if item["kind"] == "Secret":
            for key, value in item.get("stringData", {}).items():
                secrets[(item["metadata"]["name"], key)] = value
    out, jobs = [], {}
    for item in items:
        if item["kind"] in ("Service", "Secret", "NetworkPolicy"):
            continue
        if item["kind"] != "Job":
            raise Unsupported(f"kind {item['kind']}")
        spec = item["spec"]
        template = spec["template"]["spec"]
        if template.get("restartPolicy") != "Never":
            raise Unsupported(f"{item['metadata']['name']}: restartPolicy is not Never")
        (container,) = template["containers"]
        paths = mounts(template, volumes_dir, secrets, secrets_dir, host_root)
        indexed = spec.get("completionMode") == "Indexed"
        role = item["metadata"]["labels"]["mx-role"]
        job = item["metadata"]["name"]
        jobs[job] = Job(job, spec, container["name"], owner.get(job))
        for i in range(spec["completions"]):
            pod_ip = addresses[(item["metadata"]["name"], i)]
            env = pod_env(container, i if indexed else None, services, secrets, pod_ip)
            ports = own_ports(container)
            for mount, local in paths.items():  # volumes, in the environment
                env = {k: re.sub(rf"^{re.escape(mount)}(?=/|$)", local, v) for k, v in env.items()}
            argv = [expand(a, env) for a in container["command"] + container.get("args", [])]
            for name, address in services.items():  # cluster DNS, in flags
                argv = [re.sub(rf"(?<=[=/]){re.escape(name)}(?=:)", address, a) for a in argv]
            # The pod's own network: 0.0.0.0 binds its address.
            argv = [re.sub(r"(?<=[=/])0\.0\.0\.0(?=:)", pod_ip, a) for a in argv]
            for mount, local in paths.items():  # volumes
                argv = [re.sub(rf"(?<![^=]){re.escape(mount)}(?=/|$)", local, a) for a in argv]
            program = os.path.basename(argv[0])
            if program not in bins:
                raise Unsupported(f"{item['metadata']['name']}: no --bin for {argv[0]}")
            argv[0] = bins[program]
            out.append((f"{role} {i}" if indexed else role, argv, env,
                        probes(container, ports, pod_ip), job, i, stages.get(job, 0)))
    return out, jobs


def exit_code(returncode):
    """A container's exit code as Kubernetes reports it (128 + the signal
    for a process killed by one)."""
    return 128 - returncode if returncode < 0 else returncode


def pid_namespaces():
    """The command prefix that gives a process a PID namespace of its own
    (its PID 1, as in a pod), or [] with a warning where none can be made."""
    prefix = ["unshare", "--pid", "--fork", "--kill-child"]
    try:
        made = subprocess.run(prefix + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        made = False
    if not made:
        print("k8s_local.py: warning: no PID namespaces here; pods share this one",
              file=sys.stderr, flush=True)
    return prefix if made else []


def ok(target):
    """Whether an HTTP GET of the probe's (address, port, path) succeeds."""
    address, port, path = target
    try:
        with urllib.request.urlopen(f"http://{address}:{port}{path}", timeout=5) as r:
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError):
        return False


# The pods whose readiness probe has succeeded (or that have none).
READY = set()


def kubelet(pod, pod_probes, lock, stop):
    """Runs a pod's probes until it exits: says when it is first ready,
    stops it (Pod.stop) when its liveness probe fails failureThreshold
    times in a row."""
    label, process = pod.label, pod.process
    ready = "readiness" not in pod_probes
    if ready:
        READY.add(label)
    start = time.monotonic()
    failures, next_at = 0, {k: start + p[1] for k, p in pod_probes.items()}
    while process.poll() is None and not stop.is_set():
        now = time.monotonic()
        for kind, (target, _, period, threshold) in pod_probes.items():
            if now < next_at[kind]:
                continue
            next_at[kind] = now + min(period, 0.05)  # faster than the kubelet, same verdicts
            if kind == "readiness" and not ready and ok(target):
                ready = True
                READY.add(label)
                with lock:
                    print(f"k8s_local.py: {label} ready", file=sys.stderr, flush=True)
            if kind == "liveness":
                failures = 0 if ok(target) else failures + 1
                if failures >= threshold:
                    with lock:
                        print(f"k8s_local.py: {label} failed its liveness probe; stopping it",
                              file=sys.stderr, flush=True)
                    pod.stop()
                    return
        time.sleep(0.02)


def pump(label, stream, lock):
    for line in stream:
        with lock:
            sys.stdout.write(f"[{label}] {line}")
            sys.stdout.flush()


def control(running, jobs, start_pod, lock):
    """One round of the Job controller over the pods that ended since the
    last (replacing pods, failing or completing Jobs, stopping a failed
    Job's pods), then of the JobSet controller over the Jobs' verdicts.
    Returns the new pods."""
    new = []
    for pod in running:
        code = pod.process.poll()
        if code is None or pod.judged:
            continue
        pod.judged = True
        job = jobs[pod.job]
        if job.state is not None:
            continue  # ended after its Job finished, or stopped with it
        what, why = job.judge(pod.index, exit_code(code))
        if what == "replace" and job.jobset is not None and job.jobset.state is not None:
            with lock:  # its JobSet deletes its Jobs once it has ended
                print(f"k8s_local.py: Job {job.name} does not replace {pod.label} (exited "
                      f"{code}): JobSet {job.jobset.name} has ended", file=sys.stderr, flush=True)
        elif what == "replace":
            pod.replaced = True
            with lock:
                print(f"k8s_local.py: Job {job.name} replaces {pod.label} (exited {code}; {why})",
                      file=sys.stderr, flush=True)
            new += start_pod([pod.spec])
        elif what == "fail":
            finish_job(job, f"{pod.label} exited {code}" + (f": {why}" if why else ""),
                       running, lock)
    for job in jobs.values():
        if job.state is None and job.verdict() is not None:
            finish_job(job, job.verdict(), running, lock)
    for jobset in {job.jobset for job in jobs.values() if job.jobset is not None}:
        judge_jobset(jobset, jobs, running, lock)
    return new


def finish_job(job, why, running, lock):
    """Marks the Job complete (`why` "") or failed, saying so; a failed
    Job's pods still running are stopped."""
    job.state = "Failed" if why else "Complete"
    with lock:
        print(f"k8s_local.py: Job {job.name} " +
              (f"failed ({why}); terminating the pods of {job.name}" if why else "completed"),
              file=sys.stderr, flush=True)
    if why:
        for pod in running:
            if pod.job == job.name and pod.process.poll() is None:
                pod.stop()


def judge_jobset(jobset, jobs, running, lock):
    """The JobSet controller: failure first (any of its Jobs failed: every
    pod of it is stopped, its other Jobs deleted), then success (its
    targets completed). A finished JobSet stays so."""
    if jobset.state is not None:
        return
    failed = [name for name in jobset.jobs if jobs[name].state == "Failed"]
    done = [name for name in jobset.targets if jobs[name].state == "Complete"]
    if failed:
        jobset.state = "Failed"
        with lock:
            print(f"k8s_local.py: JobSet {jobset.name} failed (Job {failed[0]} failed); "
                  f"terminating the pods of {jobset.name}", file=sys.stderr, flush=True)
        for name in jobset.jobs:
            if jobs[name].state is None:
                jobs[name].state = "Deleted"
        for pod in running:
            if pod.job in jobset.jobs and pod.process.poll() is None:
                pod.stop()
    elif done and (jobset.any_target or len(done) == len(jobset.targets)):
        jobset.state = "Completed"
        with lock:
            print(f"k8s_local.py: JobSet {jobset.name} completed ({', '.join(done)} completed)",
                  file=sys.stderr, flush=True)
            # Its controller deletes these at once, stopping their pods:
            # not played (see the module doc).
            for name in jobset.jobs:
                if jobs[name].state is None:
                    print(f"k8s_local.py: JobSet {jobset.name}: Job {name} still running; its "
                          "controller deletes it, not played here", file=sys.stderr, flush=True)


class Pod:
    def __init__(self, spec, process, grace):
        label, _, _, _, job, index, _ = spec
        self.spec = spec  # what started it (a tuple of pods())
        self.label, self.process, self.pump = label, process, None
        self.job, self.index = job, index
        self.grace = grace  # seconds from SIGTERM to SIGKILL when stopped
        self.judged = False  # its exit seen by the Job controller (control)
        self.replaced = False  # failed, and the Job started another
        self.stopping = False

    def stop(self):
        """As the kubelet stops a pod (deleted, or its liveness probe
        failed): SIGTERM to its PID 1, and SIGKILL if it still runs
        self.grace seconds later."""
        if self.stopping:
            return
        self.stopping = True
        self.terminate()
        timer = threading.Timer(self.grace, self.kill)
        timer.daemon = True
        timer.start()

    def kill(self):
        """SIGKILL, if it still runs: to unshare, whose --kill-child takes
        the pod's PID 1 with it (or to the pod's process, without PID
        namespaces)."""
        if self.process.poll() is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass

    def terminate(self):
        """SIGTERM to the pod's PID 1, as the kubelet stops a container: in
        a PID namespace that is unshare's child (unshare itself ignores
        SIGTERM while it waits)."""
        pid = self.process.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        for child in children or [pid]:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass


def start(todo_stage, base, namespace, lock, stop, grace):
    """Starts the pods of one start-up stage (or replacements)."""
    started = []
    for spec in todo_stage:
        label, argv, env, pod_probes = spec[:4]
        p = subprocess.Popen(namespace + argv, env=dict(base, **env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        print(f"k8s_local.py: started {label} (pid {p.pid})", file=sys.stderr, flush=True)
        pod = Pod(spec, p, grace)
        pod.pump = threading.Thread(target=pump, args=(label, p.stdout, lock), daemon=True)
        pod.pump.start()
        threading.Thread(target=kubelet, args=(pod, pod_probes, lock, stop), daemon=True).start()
        started.append(pod)
    return started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--bin", action="append", default=[], help="NAME=PATH")
    ap.add_argument("--volumes", help="where PersistentVolumeClaims live, one directory each")
    ap.add_argument("--host-path-root", metavar="DIR",
                    help="hostPath volumes are their paths under DIR (made if missing), not "
                         "this machine's own (default: the paths themselves)")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--grace-period", type=float, default=5,
                    help="seconds from a stopped pod's SIGTERM to its SIGKILL")
    args = ap.parse_args()
    bins = dict(b.split("=", 1) for b in args.bin)
    with open(args.manifest) as f:
        doc = json.load(f)
    secrets_dir = tempfile.mkdtemp(prefix="k8s-local-secrets-")
    try:
        todo, jobs = pods(doc["items"] if doc.get("kind") == "List" else [doc], bins,
                          args.volumes, secrets_dir,
                          args.host_path_root and os.path.abspath(args.host_path_root))
    except (Unsupported, KeyError, ValueError) as e:
        print(f"k8s_local.py: unsupported: {e}", file=sys.stderr)
        return 2
    # A pod's environment is its container's, not this process's mx settings.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "MX_"))}
    lock = threading.Lock()
    stop = threading.Event()
    running = []
    namespace = pid_namespaces()
    deadline = time.monotonic() + args.timeout
    start_pod = lambda specs: start(specs, base, namespace, lock, stop, args.grace_period)
    halted = lambda: any(job.state in ("Failed", "Deleted") for job in jobs.values())
    for stage in sorted({pod[6] for pod in todo}):
        stage_pods = start_pod([pod for pod in todo if pod[6] == stage])
        running += stage_pods
        # The next stage starts once every pod of this one is ready (in
        # order), unless a Job failed meanwhile.
        while (time.monotonic() < deadline and not halted() and
               not all(p.label in READY for p in stage_pods)):
            running += control(running, jobs, start_pod, lock)
            time.sleep(0.05)
        if halted():
            break
        if len({pod[6] for pod in todo}) > 1:
            with lock:
                print(f"k8s_local.py: start-up stage {stage} ready", file=sys.stderr, flush=True)
    while time.monotonic() < deadline:
        # Every exit judged, the last ones too, before the end.
        ended = all(p.process.poll() is not None for p in running)
        new = control(running, jobs, start_pod, lock)
        running += new
        if ended and not new:
            break
        time.sleep(0.1)
    failed = []
    for pod in running:
        label, p, t = pod.label, pod.process, pod.pump
        if p.poll() is None:
            p.kill()
            failed.append(f"{label} (still running after {args.timeout:g} s)")
        elif p.returncode != 0 and not pod.replaced:
            failed.append(f"{label} (exit code {p.returncode})")
        p.wait()
        t.join()
    stop.set()
    shutil.rmtree(secrets_dir, ignore_errors=True)
    if failed:
        print(f"k8s_local.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("k8s_local.py: every pod exited 0", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
