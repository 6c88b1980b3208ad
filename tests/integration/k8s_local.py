#!/usr/bin/env python3
"""Runs the pods of deploy/k8s_job.py's objects as local processes, the way
Kubernetes would start them, so that a test can check that the manifests'
commands, flags and environment make a working job:

  k8s_local.py MANIFEST.json --bin mx_server=PATH --bin mx_train=PATH
               [--volumes DIR] [--timeout S]

What Kubernetes would provide is played here on 127.0.0.1: the Service's
name resolves to 127.0.0.1 (cluster DNS), a pod's IP is 127.0.0.1
(status.podIP), an Indexed Job's pod gets its completion index (the
annotation batch.kubernetes.io/job-completion-index), and $(VAR) in a
container's env, command and args expands as the kubelet expands it. The
image is replaced by --bin: a command's first word (its file name) maps to
a local binary. A PersistentVolumeClaim is the directory DIR/CLAIM (one for
every pod that mounts it, as a ReadWriteMany volume), and its mount path in
a pod's arguments the path of that directory. Pods run as this process's
user, whatever their securityContext says. Anything else in the objects (another kind, another
valueFrom) is an error that says what: the manifests would rely on
something this runner does not play.

Pods start as Kubernetes would start them, the Jobs' pods all at once in
the List's order; each output line is prefixed with the pod's role and
index ("[server 1] ..."). Exits 0 when every pod exits 0 within --timeout,
else 1 after killing what still runs, saying which pods failed.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

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


def pod_env(container, index, services, secrets):
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
            value = "127.0.0.1"
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == INDEX_FIELD:
            if index is None:
                raise Unsupported(f"env {e['name']}: a completion index outside an Indexed Job")
            value = str(index)
        else:
            raise Unsupported(f"env {e['name']}: {json.dumps(e)}")
        env[e["name"]] = services.get(value, value)
    return env


def mounts(pod_spec, volumes_dir):
    """{mount path: local directory} of a pod's PersistentVolumeClaims."""
    claims = {}
    for v in pod_spec.get("volumes", []):
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


def pods(items, bins, volumes_dir):
    """(label, argv, env) of every pod the objects would start."""
    services, secrets = {}, {}
    for item in items:
        if item["kind"] == "Service":
            services[item["metadata"]["name"]] = "127.0.0.1"
        if item["kind"] == "Secret":
            for key, value in item.get("stringData", {}).items():
                secrets[(item["metadata"]["name"], key)] = value
    out = []
    for item in items:
        if item["kind"] in ("Service", "Secret"):
            continue
        if item["kind"] != "Job":
            raise Unsupported(f"kind {item['kind']}")
        spec = item["spec"]
        template = spec["template"]["spec"]
        if template.get("restartPolicy") != "Never":
            raise Unsupported(f"{item['metadata']['name']}: restartPolicy is not Never")
        (container,) = template["containers"]
        paths = mounts(template, volumes_dir)
        indexed = spec.get("completionMode") == "Indexed"
        role = item["metadata"]["labels"]["mx-role"]
        for i in range(spec["completions"]):
            env = pod_env(container, i if indexed else None, services, secrets)
            argv = [expand(a, env) for a in container["command"] + container.get("args", [])]
            for name, address in services.items():  # cluster DNS, in flags
                argv = [re.sub(rf"(?<=[=/]){re.escape(name)}(?=:)", address, a) for a in argv]
            for mount, local in paths.items():  # volumes
                argv = [re.sub(rf"(?<![^=]){re.escape(mount)}(?=/|$)", local, a) for a in argv]
            program = os.path.basename(argv[0])
            if program not in bins:
                raise Unsupported(f"{item['metadata']['name']}: no --bin for {argv[0]}")
            argv[0] = bins[program]
            out.append((f"{role} {i}" if indexed else role, argv, env))
    return out


def pump(label, stream, lock):
    for line in stream:
        with lock:
            sys.stdout.write(f"[{label}] {line}")
            sys.stdout.flush()


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
    try:
        todo = pods(doc["items"] if doc.get("kind") == "List" else [doc], bins, args.volumes)
    except (Unsupported, KeyError, ValueError) as e:
        print(f"k8s_local.py: unsupported: {e}", file=sys.stderr)
        return 2
    # A pod's environment is its container's, not this process's mx settings.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "MX_"))}
    lock = threading.Lock()
    running = []
    for label, argv, env in todo:
        p = subprocess.Popen(argv, env=dict(base, **env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        print(f"k8s_local.py: started {label} (pid {p.pid})", file=sys.stderr, flush=True)
        t = threading.Thread(target=pump, args=(label, p.stdout, lock), daemon=True)
        t.start()
        running.append((label, p, t))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and any(p.poll() is None for _, p, _ in running):
        time.sleep(0.1)
    failed = []
    for label, p, t in running:
        if p.poll() is None:
            p.kill()
            failed.append(f"{label} (still running after {args.timeout:g} s)")
        elif p.returncode != 0:
            failed.append(f"{label} (exit code {p.returncode})")
        p.wait()
        t.join()
    if failed:
        print(f"k8s_local.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("k8s_local.py: every pod exited 0", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
