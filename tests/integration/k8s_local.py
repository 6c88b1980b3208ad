#!/usr/bin/env python3
"""Runs the pods of deploy/k8s_job.py's objects as local processes, the way
Kubernetes would start them, so that a test can check that the manifests'
commands, flags and environment make a working job:

  k8s_local.py MANIFEST.json --bin mx_server=PATH --bin mx_train=PATH
               [--volumes DIR] [--timeout S]

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
volume is that path on this machine, the pods' one node. Probes
(httpGet, to the pod's address) run as the kubelet runs them: a
pod is "ready" once its readiness probe first succeeds (printed as
"k8s_local.py: server 1 ready"), and a pod whose liveness probe fails
failureThreshold times in a row is killed (and so fails). Pods run as this process's
user, whatever their securityContext says. Anything else in the objects (another kind, another
valueFrom) is an error that says what: the manifests would rely on
something this runner does not play.

Each pod runs in a PID namespace of its own (unshare), as its PID 1, where
the system allows. A Job with backoffLimit N > 0 replaces a failed pod (at once) up to N
times. A Job with backoffLimit 0 fails at its first failed pod,
and its other pods are terminated, as the Job controller does.

A JobSet (jobset.x-k8s.io) is played as its controller plays it: its
replicated Jobs become Jobs <jobset>-<job>-<i>; with enableDNSHostnames,
each pod's <job>-<index>.<subdomain> resolves to its address; with
startupPolicyOrder InOrder, each replicated Job starts once the pods of
the ones before are ready ("k8s_local.py: start-up stage 1 ready"); with
failurePolicy maxRestarts 0, a failed Job fails the JobSet and every pod
of it is terminated.

Pods start as Kubernetes would start them, the Jobs' pods all at once in
the List's order; each output line is prefixed with the pod's role and
index ("[server 1] ..."). Exits 0 when every pod exits 0 within --timeout,
else 1 after killing what still runs, saying which pods failed.
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


def mounts(pod_spec, volumes_dir, secrets, secrets_dir):
    """{mount path: local directory} of a pod's PersistentVolumeClaims,
    Secrets and hostPaths."""
    claims = {}
    for v in pod_spec.get("volumes", []):
        if "secret" in v:
            claims[v["name"]] = secret_dir(v["secret"]["secretName"], secrets, secrets_dir)
            continue
        if "hostPath" in v:  # the pods run here: this machine is their node
            claims[v["name"]] = v["hostPath"]["path"]
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


def expand_jobsets(items):
    """A JobSet's replicated Jobs as the Jobs its controller makes
    (<jobset>-<job>-<i>), in its order. Returns (items, {pod host name in
    the JobSet's subdomain: (Job, pod index)}, {Job: start-up stage}, {Job:
    the JobSet that fails as a whole with it}). Stages: a JobSet with
    startupPolicyOrder InOrder starts each replicated Job once the ones
    before are ready; everything else starts at once (stage 0)."""
    out, hosts, stages, whole = [], {}, {}, {}
    for item in items:
        if item["kind"] != "JobSet":
            out.append(item)
            continue
        js, spec = item["metadata"]["name"], item["spec"]
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
                if spec.get("failurePolicy", {}).get("maxRestarts", 0) == 0:
                    whole[name] = js
    return out, hosts, stages, whole


def pods(items, bins, volumes_dir, secrets_dir):
    """(label, argv, env, probes, Job, backoffLimit, stage, failure group,
    exit codes that fail the Job at once) of every pod the objects would
    start: a pod's failure group is its JobSet (which fails as a whole) or
    its own Job."""
    items, hosts, stages, whole = expand_jobsets(items)
    addresses = pod_addresses(items)
    services, secrets = service_addresses(items, addresses), {}
    for host, pod in hosts.items():  # cluster DNS for the JobSet's pods
        services[host] = addresses[pod]
    for item in items:
        if item["kind"] == "Secret":
            for key, value in item.get("stringData", {}).items():
                secrets[(item["metadata"]["name"], key)] = value
    out = []
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
        paths = mounts(template, volumes_dir, secrets, secrets_dir)
        indexed = spec.get("completionMode") == "Indexed"
        role = item["metadata"]["labels"]["mx-role"]
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
            job = item["metadata"]["name"]
            out.append((f"{role} {i}" if indexed else role, argv, env,
                        probes(container, ports, pod_ip), job, spec.get("backoffLimit"),
                        stages.get(job, 0), whole.get(job, job), fail_job_codes(spec)))
    return out


def fail_job_codes(spec):
    """The exit codes on which a Job's podFailurePolicy fails the Job at
    once (action FailJob, onExitCodes operator In), whatever its
    backoffLimit."""
    codes = set()
    for rule in spec.get("podFailurePolicy", {}).get("rules", []):
        on = rule.get("onExitCodes", {})
        if rule.get("action") == "FailJob" and on.get("operator") == "In":
            codes.update(on.get("values", []))
    return codes


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


def kubelet(label, process, pod_probes, lock, stop):
    """Runs a pod's probes until it exits: says when it is first ready,
    kills it when its liveness probe fails failureThreshold times in a
    row."""
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
                        print(f"k8s_local.py: {label} failed its liveness probe; killing it",
                              file=sys.stderr, flush=True)
                    process.kill()
        time.sleep(0.02)


def pump(label, stream, lock):
    for line in stream:
        with lock:
            sys.stdout.write(f"[{label}] {line}")
            sys.stdout.flush()


def fail_jobs(running, failed_jobs, lock):
    """The Job controller with backoffLimit 0 (or a podFailurePolicy
    FailJob rule for the exit code), and the JobSet controller with
    maxRestarts 0: a Job one of whose pods failed has failed, and the pods
    still running of its failure group (its JobSet, or itself) are
    terminated (SIGTERM, as the kubelet stops a pod)."""
    for pod in running:
        if pod.job in failed_jobs or pod.process.poll() in (None, 0) or pod.replaced:
            continue
        if pod.backoff != 0 and exit_code(pod.process.returncode) not in pod.fail_codes:
            continue
        failed_jobs.add(pod.job)
        with lock:
            print(f"k8s_local.py: Job {pod.job} failed ({pod.label} exited "
                  f"{pod.process.returncode}); terminating the pods of {pod.group}",
                  file=sys.stderr, flush=True)
        for other in running:
            if other.group == pod.group and other.process.poll() is None:
                other.terminate()


def replace_failed(running, start_pod):
    """The Job controller's retries: a failed pod of a Job whose
    backoffLimit is not used up is replaced by a new one (the same spec, one
    retry fewer; at once, where Kubernetes waits 10 s). Returns the new
    pods; the replaced ones are marked so."""
    new = []
    for pod in running:
        if pod.replaced or not pod.backoff or pod.process.poll() in (None, 0):
            continue
        if exit_code(pod.process.returncode) in pod.fail_codes:
            continue  # its Job fails instead (fail_jobs)
        pod.replaced = True
        label, argv, env, probes_, job, backoff, stage, group, codes = pod.spec
        print(f"k8s_local.py: Job {job} replaces {label} (exited {pod.process.returncode}; "
              f"backoffLimit {backoff})", file=sys.stderr, flush=True)
        new += start_pod([(label, argv, env, probes_, job, backoff - 1, stage, group, codes)])
    return new


class Pod:
    def __init__(self, spec, process, pump):
        label, _, _, _, job, backoff, _, group, fail_codes = spec
        self.spec = spec  # what started it (a tuple of pods())
        self.label, self.process, self.pump = label, process, pump
        self.job, self.backoff, self.group = job, backoff, group
        self.fail_codes = fail_codes
        self.replaced = False  # failed, and the Job started another

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


def start(todo_stage, base, namespace, lock, stop):
    """Starts the pods of one start-up stage."""
    started = []
    for spec in todo_stage:
        label, argv, env, pod_probes = spec[:4]
        p = subprocess.Popen(namespace + argv, env=dict(base, **env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        print(f"k8s_local.py: started {label} (pid {p.pid})", file=sys.stderr, flush=True)
        t = threading.Thread(target=pump, args=(label, p.stdout, lock), daemon=True)
        t.start()
        threading.Thread(target=kubelet, args=(label, p, pod_probes, lock, stop),
                         daemon=True).start()
        started.append(Pod(spec, p, t))
    return started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--bin", action="append", default=[], help="NAME=PATH")
    ap.add_argument("--volumes", help="where PersistentVolumeClaims live, one directory each")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    bins = dict(b.split("=", 1) for b in args.bin)
    with open(args.manifest) as f:
        doc = json.load(f)
    secrets_dir = tempfile.mkdtemp(prefix="k8s-local-secrets-")
    try:
        todo = pods(doc["items"] if doc.get("kind") == "List" else [doc], bins, args.volumes,
                    secrets_dir)
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
    failed_jobs = set()
    start_pod = lambda specs: start(specs, base, namespace, lock, stop)
    for stage in sorted({pod[6] for pod in todo}):
        stage_pods = start_pod([pod for pod in todo if pod[6] == stage])
        running += stage_pods
        # The next stage starts once every pod of this one is ready (in
        # order), unless a Job failed meanwhile.
        while (time.monotonic() < deadline and not failed_jobs and
               not all(p.label in READY for p in stage_pods)):
            running += replace_failed(running, start_pod)
            fail_jobs(running, failed_jobs, lock)
            time.sleep(0.05)
        if failed_jobs:
            break
        if len({pod[6] for pod in todo}) > 1:
            with lock:
                print(f"k8s_local.py: start-up stage {stage} ready", file=sys.stderr, flush=True)
    while time.monotonic() < deadline and any(p.process.poll() is None for p in running):
        running += replace_failed(running, start_pod)
        fail_jobs(running, failed_jobs, lock)
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
