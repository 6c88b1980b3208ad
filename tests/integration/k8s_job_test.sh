#!/usr/bin/env bash
# deploy/k8s_job.py: the Kubernetes objects it prints are what they must be
# (with --jobs a Service, a NetworkPolicy and three Jobs; by default a
# JobSet of them, checked in part 4; ranks from completion
# indexes, fixed ports, pods that never restart, fail-fast or elastic
# failure policies, immutable Secrets), and, run as local processes the way Kubernetes would
# start them (k8s_local.py: each pod has an address of its own, 127.0.1.N,
# and the Service's name resolves to the coordinator's), they make a dist_sync job that
# trains, whose nodes take the ranks of their indexes and whose daemons shut
# down on their own. Bad flags are refused with a reason, and so is a
# server address that Kubernetes could not expand.
set -uo pipefail
K8S_JOB="$1"; LOCAL="$2"; SERVER="$3"; TRAIN="$4"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# Every process this test starts has this in its environment (k8s_local.py
# hands its pods all of its own but DMLC_* and MX_*), a value no other run
# has: a pid that a log names, ended and reused since by another test's
# process (mx_server or mx_train too, under Bazel's parallel tests), is
# never taken for one of this run's pods.
export K8S_JOB_TEST_RUN="$$.$(date +%s%N).$RANDOM"
# in_this_run PID: whether PID's environment has this run's mark. (Read
# whole first: grep -q in a pipeline could end the reader with SIGPIPE,
# which pipefail would take for a miss.)
in_this_run() {
  local environ
  environ=$({ tr '\0' '\n' < "/proc/$1/environ"; } 2>/dev/null) || return 1
  grep -qxF "K8S_JOB_TEST_RUN=$K8S_JOB_TEST_RUN" <<<"$environ"
}
# live_pods LOG: the pod processes a local run's LOG names ("k8s_local.py:
# started worker 1 (pid N)": unshare, whose --kill-child takes the pod's
# PID namespace with it, or the pod's own process where there are none)
# that still run, checked against their command lines and this run's mark
# in their environment in case a pid was reused.
live_pods() {
  local pid
  for pid in $(sed -n 's/^k8s_local.py: started .* (pid \([0-9]*\))$/\1/p' "$1" 2>/dev/null); do
    if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qE 'mx_(server|train) ' &&
       in_this_run "$pid"; then
      echo "$pid"
    fi
  done
}
# expect_no_pods WHAT LOG: fails for each pod process of LOG still running,
# and kills it.
expect_no_pods() {
  local pid
  for pid in $(live_pods "$2"); do
    fail "$1: pod process $pid left running"
    kill -9 "$pid" 2>/dev/null
  done
}
# The --shm run's node: a private directory on tmpfs (/dev/shm, where
# segments live as they do in a pod's), made for that run, that the local
# runner puts every hostPath under (--host-path-root): the pods' /dev/shm
# is $SHM_ROOT/dev/shm. What they leave there is theirs alone, and removing
# it touches no other run's segments (the machine's /dev/shm is shared
# with other tests, and other runs of this one).
SHM_ROOT=""
# On any exit (a failure, or Bazel's SIGTERM at a timeout): each local run
# is a `timeout` child of this script in a process group of its own, which
# a signal to the test's group does not reach; killed, group and all,
# first, so that no Job replaces the pods killed next: those the runs' logs
# name (this run's only, see live_pods). Then the --shm run's directory.
cleanup() {
  local pid log
  for pid in $(pgrep -P $$ -x timeout); do kill -KILL -- "-$pid" 2>/dev/null; done
  for log in "$TMP"/*.log; do
    for pid in $(live_pods "$log"); do kill -KILL "$pid" 2>/dev/null; done
  done
  [[ -z $SHM_ROOT ]] || rm -rf -- "$SHM_ROOT"
}
trap cleanup EXIT

source "$(dirname "$0")/../testdata/make_csv.sh"
make_csv 400 "$TMP/train.csv" "$TMP/train_labels.csv"
make_csv 100 "$TMP/test.csv" "$TMP/test_labels.csv"
# The ports the pods run here listen on (each pod on an address of its own,
# 127.0.1.N, beside other tests' processes): free now, all different. The
# defaults (9091, 9092, 9093, 9102) are checked on a manifest not run.
picked=()
while (( ${#picked[@]} < 4 )); do
  candidate=$(python3 "$(dirname "$0")/free_port.py")
  [[ " ${picked[*]} " == *" $candidate "* ]] || picked+=("$candidate")
done
PORT=${picked[0]}; SERVER_PORT=${picked[1]}; STREAM_PORT=${picked[2]}; METRICS_PORT=${picked[3]}
ports=(--port "$PORT" --server-port "$SERVER_PORT" --stream-port "$STREAM_PORT"
       --metrics-port "$METRICS_PORT")
worker=(mx_train --kvstore=dist_sync --network=mlp --batch_size=20 --lr=0.5 --epochs=3
        --train_csv="$TMP/train.csv" --train_label_csv="$TMP/train_labels.csv"
        --test_csv="$TMP/test.csv" --test_label_csv="$TMP/test_labels.csv")

# 1. The objects.
python3 "$K8S_JOB" --jobs --name fm -n 2 -s 2 --image reg/mx:1 "${ports[@]}" --checkpoint-claim ck \
  -- "${worker[@]}" --checkpoint_prefix=/checkpoints/fm > "$TMP/job.json" || fail "k8s_job.py failed"
python3 "$K8S_JOB" --jobs --name fm -n 3 -s 1 --image reg/mx:1 --elastic -- mx_train --kvstore=dist_sync \
  > "$TMP/elastic.json" || fail "k8s_job.py --elastic failed"
python3 "$K8S_JOB" --jobs --name fm -n 2 -s 2 --image reg/mx:1 "${ports[@]}" --tls \
  -- "${worker[@]}" --epochs=1 > "$TMP/tls.json" || fail "k8s_job.py --tls failed"
python3 "$K8S_JOB" --jobs --name fm -n 2 -s 2 --image reg/mx:1 --tls --tls-days 400 \
  -- "${worker[@]}" > "$TMP/tls400.json" || fail "k8s_job.py --tls --tls-days 400 failed"
python3 - "$TMP/job.json" "$TMP/elastic.json" "$TMP/tls.json" "$TMP/tls400.json" \
  "$PORT" "$SERVER_PORT" "$STREAM_PORT" "$METRICS_PORT" <<'EOF' || fail "objects: see above"
import json, subprocess, sys
INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

# The Pod Security Standards' "restricted" profile (kubernetes.io/docs/
# concepts/security/pod-security-standards/), rule by rule, on a pod spec.
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}
def restricted(name, pod):
    psc = pod.get("securityContext", {})
    check(not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")),
          f"{name}: restricted: host namespaces")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        check(kinds <= ALLOWED_VOLUMES, f"{name}: restricted: volume types {kinds}")
    check(not psc.get("sysctls"), f"{name}: restricted: sysctls")
    check(psc.get("runAsUser", 1) != 0, f"{name}: restricted: runAsUser 0")
    for c in pod.get("initContainers", []) + pod["containers"]:
        csc = c.get("securityContext", {})
        where = f"{name}/{c['name']}: restricted"
        check(not csc.get("privileged"), f"{where}: privileged")
        check(csc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation")
        check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot")
        check(csc.get("runAsUser", psc.get("runAsUser", 1)) != 0, f"{where}: runAsUser 0")
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        check(seccomp in ("RuntimeDefault", "Localhost"), f"{where}: seccompProfile {seccomp}")
        caps = csc.get("capabilities", {})
        check("ALL" in caps.get("drop", []), f"{where}: capabilities must drop ALL")
        check(set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{where}: capabilities added")
        check(not any(p.get("hostPort") for p in c.get("ports", [])), f"{where}: hostPort")
        check(csc.get("procMount", "Default") == "Default", f"{where}: procMount")
job, elastic, tls = (json.load(open(f)) for f in sys.argv[1:4])
port, sport, stport, mport = map(int, sys.argv[5:9])
bad = []
def check(cond, what):
    if not cond: bad.append(what)
check(job["kind"] == "List", "not a List")
kinds = sorted((i["kind"], i["metadata"]["name"]) for i in job["items"])
check(kinds == [("Job", "fm-coordinator"), ("Job", "fm-server"), ("Job", "fm-worker"),
                ("NetworkPolicy", "fm-mx"), ("Secret", "fm-token"), ("Service", "fm-coordinator")],
      f"objects {kinds}")
# The NetworkPolicy: the job's pods only, on the gRPC and stream ports;
# metrics from anywhere.
pol = [i for i in job["items"] if i["kind"] == "NetworkPolicy"][0]["spec"]
own = {"podSelector": {"matchLabels": {"mx-job": "fm"}}}
check(pol["podSelector"] == own["podSelector"] and pol["policyTypes"] == ["Ingress"],
      "NetworkPolicy: the job's pods, ingress")
check(pol["ingress"] == [
    {"from": [own], "ports": [{"protocol": "TCP", "port": port}, {"protocol": "TCP", "port": sport},
                              {"protocol": "TCP", "port": stport}]},
    {"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": mport}]}],
    f"NetworkPolicy rules: {pol['ingress']}")
secret = [i for i in job["items"] if i["kind"] == "Secret"][0]
token = secret["stringData"]["token"]
check(len(token) == 64 and token != [i for i in elastic["items"] if i["kind"] == "Secret"][0]
      ["stringData"]["token"], "the job token: 64 hex digits, new for every job")
# Every Secret printed is immutable: a new token or CA applied again over a
# running job must fail, not replace the one its nodes hold.
for doc in (job, elastic, tls):
    for i in doc["items"]:
        if i["kind"] == "Secret":
            check(i.get("immutable") is True, f"Secret {i['metadata']['name']}: not immutable")
svc = [i for i in job["items"] if i["kind"] == "Service"][0]
check(svc["spec"]["ports"][0]["port"] == port, "service port")
check(svc["spec"]["selector"] == {"mx-job": "fm", "mx-role": "coordinator"}, "service selector")
for i in job["items"]:
    if i["kind"] != "Job":
        continue
    name, spec = i["metadata"]["name"], i["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    check(pod["restartPolicy"] == "Never", f"{name}: restartPolicy")
    # A failed coordinator pod is replaced once (the nodes rejoin it);
    # servers and workers cannot take their rank back.
    check(spec.get("backoffLimit") == (1 if name == "fm-coordinator" else 0), f"{name}: backoffLimit")
    check(c["image"] == "reg/mx:1", f"{name}: image")
    check(spec["template"]["metadata"]["labels"]["mx-job"] == "fm", f"{name}: labels")
    check(env["DMLC_PS_ROOT_URI"]["value"] == "fm-coordinator", f"{name}: DMLC_PS_ROOT_URI")
    check(env["DMLC_PS_ROOT_PORT"]["value"] == str(port), f"{name}: DMLC_PS_ROOT_PORT")
    check(env["DMLC_NUM_SERVER"]["value"] == "2" and env["DMLC_NUM_WORKER"]["value"] == "2",
          f"{name}: sizes")
    check(env["MX_STARTUP_TIMEOUT_S"]["value"] == "600", f"{name}: startup timeout")
    check(env["MX_JOB_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "fm-token", "key": "token"},
          f"{name}: the job token from the Secret")
    check(c["resources"]["requests"] == c["resources"]["limits"], f"{name}: resources")
    want = {"fm-coordinator": {"cpu": "250m", "memory": "256Mi"}}.get(name, {"cpu": "1", "memory": "2Gi"})
    check(c["resources"]["requests"] == want, f"{name}: resources {c['resources']['requests']}")
    role = name.split("-", 1)[1]
    for meta in (i["metadata"], spec["template"]["metadata"]):
        check({"app.kubernetes.io/name": "mx", "app.kubernetes.io/instance": "fm",
               "app.kubernetes.io/component": role}.items() <= meta["labels"].items(),
              f"{name}: app.kubernetes.io labels")
    check("namespace" not in i["metadata"], f"{name}: no namespace unless asked")
    check(pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65534,
                                     "runAsGroup": 65534, "fsGroup": 65534,
                                     "seccompProfile": {"type": "RuntimeDefault"}}, f"{name}: user")
    restricted(name, pod)
    check(spec["ttlSecondsAfterFinished"] == 3600 and "activeDeadlineSeconds" not in spec,
          f"{name}: TTL, no deadline by default")
    mounted = [m["mountPath"] for m in c.get("volumeMounts", [])]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])]
    want = (["/checkpoints"], ["ck"]) if name == "fm-worker" else ([], [])
    check((mounted, claims) == want, f"{name}: volumes {mounted} {claims}")
    # Metrics, probes (HTTP: the kubelet's gRPC probe cannot do mutual TLS).
    grpc = {"fm-coordinator": [port], "fm-server": [sport], "fm-worker": []}[name]
    stream = [stport] if name == "fm-server" else []
    check(c["ports"] == [{"name": "grpc", "containerPort": p, "protocol": "TCP"} for p in grpc] +
          [{"name": "stream", "containerPort": p, "protocol": "TCP"} for p in stream] +
          [{"name": "metrics", "containerPort": mport, "protocol": "TCP"}], f"{name}: ports")
    check(env["MX_METRICS_PORT"]["value"] == str(mport) and env["MX_METRICS_HOST"]["value"] == "0.0.0.0",
          f"{name}: metrics settings")
    check(c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"},
          f"{name}: readiness probe")
    check(c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"},
          f"{name}: liveness probe")
    check(spec["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(mport),
        "prometheus.io/path": "/metrics"}, f"{name}: scrape annotations")
    check("MX_TLS_CERT" not in env, f"{name}: TLS without --tls")
    if name == "fm-coordinator":
        check(spec["completions"] == 1 and "completionMode" not in spec, f"{name}: one pod")
        check(f"--bind=0.0.0.0:{port}" in c["command"], f"{name}: bind")
    else:
        n = 2
        check(spec["completionMode"] == "Indexed" and spec["completions"] == n
              and spec["parallelism"] == n, f"{name}: Indexed x{n}")
        check(env["MX_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == INDEX, f"{name}: MX_RANK")
    if name == "fm-server":
        check("--advertise=$(POD_IP)" in c["command"], f"{name}: advertise")
        check(f"--bind=0.0.0.0:{sport}" in c["command"], f"{name}: bind the fixed server port")
        check(f"--stream_port={stport}" in c["command"], f"{name}: the fixed stream port")
        check(env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", f"{name}: POD_IP")
        check("--mode=sync" in c["command"] and "--elastic" not in c["command"], f"{name}: flags")
    if name == "fm-worker":
        check(c["command"][:2] == ["mx_train", "--kvstore=dist_sync"], f"{name}: command")
        check(env["MX_ELASTIC"]["value"] == "0", f"{name}: MX_ELASTIC")
        check(env["OPENBLAS_NUM_THREADS"]["value"] == "1", f"{name}: BLAS threads = CPUs")
# Elastic: the workers' Job keeps going past failed indexes; daemons get --elastic.
e = {i["metadata"]["name"]: i for i in elastic["items"]}
w = e["fm-worker"]["spec"]
check(w.get("backoffLimitPerIndex") == 0 and w.get("maxFailedIndexes") == 2
      and "backoffLimit" not in w, "elastic workers: per-index failure policy")
check(e["fm-server"]["spec"].get("backoffLimit") == 0, "elastic servers: still fail fast")
for daemon in ("fm-coordinator", "fm-server"):
    check("--elastic" in e[daemon]["spec"]["template"]["spec"]["containers"][0]["command"],
          f"elastic {daemon}: --elastic")
wenv = {v["name"]: v for v in e["fm-worker"]["spec"]["template"]["spec"]["containers"][0]["env"]}
check(wenv["MX_ELASTIC"]["value"] == "1", "elastic workers: MX_ELASTIC=1")
# --tls: a kubernetes.io/tls Secret whose certificate the CA signed, for the
# name every node checks, mounted read-only in every pod.
t = {i["metadata"]["name"]: i for i in tls["items"]}
sec = t.get("fm-tls", {})
check(sec.get("type") == "kubernetes.io/tls" and
      sorted(sec.get("stringData", {})) == ["ca.crt", "tls.crt", "tls.key"], "TLS Secret")
def pem_files(doc, at):
    """The TLS Secret's CA and certificate, as files at+".ca", at+".crt"."""
    sec = {i["metadata"]["name"]: i for i in doc["items"]}["fm-tls"]
    open(at + ".ca", "w").write(sec["stringData"]["ca.crt"])
    open(at + ".crt", "w").write(sec["stringData"]["tls.crt"])
    return at + ".ca", at + ".crt"
def valid_for(path, seconds):
    """Whether the certificate at path is still valid `seconds` from now."""
    return subprocess.run(["openssl", "x509", "-noout", "-checkend", str(seconds), "-in", path],
                          capture_output=True).returncode == 0
YEAR = 365 * 86400
if sec:
    ca, crt = pem_files(tls, sys.argv[3])
    v = subprocess.run(["openssl", "verify", "-CAfile", ca, "-verify_hostname",
                        "mx-job", crt], capture_output=True, text=True)
    check(v.returncode == 0, f"TLS Secret: certificate not valid for mx-job: {v.stdout}{v.stderr}")
    # Valid far longer than a job runs (every new handshake checks the
    # dates): 10 years by default, --tls-days 400 for 400 days.
    for path in (ca, crt):
        end = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", path],
                             capture_output=True, text=True).stdout.strip()
        check(valid_for(path, 9 * YEAR), f"TLS Secret: {path} expires within 9 years ({end})")
    for path in pem_files(json.load(open(sys.argv[4])), sys.argv[4]):
        check(valid_for(path, YEAR) and not valid_for(path, 401 * 86400),
              f"--tls-days 400: {path} not valid for 400 days")
# With TLS, streams are TLS too: servers take them, and the job's pods reach them.
check(t["fm-server"]["spec"]["template"]["spec"]["containers"][0]["command"].count(
    f"--stream_port={stport}") == 1, "tls: servers with a stream port")
check(any(p["port"] == stport for rule in t["fm-mx"]["spec"]["ingress"] for p in rule["ports"]),
      "tls: NetworkPolicy with the stream port")
for name in ("fm-coordinator", "fm-server", "fm-worker"):
    pod = t[name]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {v["name"]: v.get("value") for v in c["env"]}
    check({"name": "tls", "secret": {"secretName": "fm-tls", "defaultMode": 0o440}}
          in pod.get("volumes", []), f"tls {name}: Secret volume")
    check({"name": "tls", "mountPath": "/etc/mx/tls", "readOnly": True}
          in c.get("volumeMounts", []), f"tls {name}: mount")
    check(env.get("MX_TLS_CERT") == "/etc/mx/tls/tls.crt" and env.get("MX_TLS_KEY") ==
          "/etc/mx/tls/tls.key" and env.get("MX_TLS_CA") == "/etc/mx/tls/ca.crt" and
          env.get("MX_TLS_SERVER_NAME") == "mx-job", f"tls {name}: TLS settings")
for b in bad:
    print("objects:", b)
sys.exit(1 if bad else 0)
EOF
# The default ports, on a manifest of their own (the ones run here take
# free ports): the coordinator's 9091, the servers' 9092 and 9093 (streams),
# every pod's metrics on 9102; declared, bound, scraped and admitted.
python3 "$K8S_JOB" --jobs --name fm -n 2 -s 2 --image reg/mx:1 -- "${worker[@]}" \
  > "$TMP/defaults.json" || fail "k8s_job.py (default ports) failed"
python3 - "$TMP/defaults.json" <<'EOF' || fail "default ports: see above"
import json, sys
items = {(i["kind"], i["metadata"]["name"]): i for i in json.load(open(sys.argv[1]))["items"]}
bad = []
def check(ok, what):
    if not ok:
        bad.append(what)
want = {"fm-coordinator": {"grpc": 9091, "metrics": 9102},
        "fm-server": {"grpc": 9092, "stream": 9093, "metrics": 9102}, "fm-worker": {"metrics": 9102}}
command = {}
for name, ports in want.items():
    template = items[("Job", name)]["spec"]["template"]
    (c,) = template["spec"]["containers"]
    command[name] = c["command"]
    env = {v["name"]: v.get("value") for v in c["env"]}
    check({p["name"]: p["containerPort"] for p in c["ports"]} == ports, f"{name}: ports {c['ports']}")
    check(env["MX_METRICS_PORT"] == "9102" and env["DMLC_PS_ROOT_PORT"] == "9091",
          f"{name}: MX_METRICS_PORT, DMLC_PS_ROOT_PORT")
    check(template["metadata"]["annotations"]["prometheus.io/port"] == "9102", f"{name}: scrape port")
check("--bind=0.0.0.0:9092" in command["fm-server"] and "--stream_port=9093" in command["fm-server"],
      f"fm-server: {command['fm-server']}")
check("--bind=0.0.0.0:9091" in command["fm-coordinator"], "fm-coordinator: --bind")
check(items[("Service", "fm-coordinator")]["spec"]["ports"] ==
      [{"name": "grpc", "port": 9091, "targetPort": 9091}], "Service port")
rules = items[("NetworkPolicy", "fm-mx")]["spec"]["ingress"]
check([[p["port"] for p in r["ports"]] for r in rules] == [[9091, 9092, 9093], [9102]],
      f"NetworkPolicy ports: {rules}")
for b in bad:
    print("default ports:", b)
sys.exit(1 if bad else 0)
EOF

# 2. The pods, run here: a job that trains, checkpoints to its volume and
# ends cleanly.
timeout -k 5 150 python3 "$LOCAL" "$TMP/job.json" --bin mx_server="$SERVER" --bin mx_train="$TRAIN" \
  --volumes "$TMP/volumes" --timeout 120 > "$TMP/run.log" 2>&1
rc=$?
out=$(cat "$TMP/run.log")
[[ $rc -eq 0 ]] || fail "local run exit code $rc: $(grep -E 'mx_(train|server): ' "$TMP/run.log"; tail -5 "$TMP/run.log")"
echo "$out" | grep -q "^\[coordinator\] coordinator listening on 127\.0\.1\.1:$PORT$" \
  || fail "coordinator not on the Service's port, at its pod's address"
for r in 0 1; do
  echo "$out" | grep -q "^\[server $r\] server $r serving on 127\.0\.1\.[0-9]*:$SERVER_PORT$" \
    || fail "server $r did not take rank $r or advertise its pod IP"
  echo "$out" | grep -q "^\[worker $r\] worker $r of 2 (dist_sync)" || fail "worker $r is not rank $r"
  echo "$out" | grep -q "^\[worker $r\] Final test accuracy=1" || fail "worker $r did not reach accuracy 1"
  echo "$out" | grep -q "^\[server $r\] server $r: every worker finished; shutting down$" \
    || fail "server $r did not shut down on its own"
done
echo "$out" | grep -q "^\[coordinator\] coordinator: every worker finished; shutting down$" \
  || fail "coordinator did not shut down on its own"
echo "$out" | grep -q "^k8s_local.py: every pod exited 0$" || fail "not every pod exited 0"
# Each pod's readiness probe (/healthz) succeeded once it had joined; no
# liveness probe failed.
for pod in coordinator "server 0" "server 1" "worker 0" "worker 1"; do
  echo "$out" | grep -q "^k8s_local.py: $pod ready$" || fail "$pod never became ready"
done
echo "$out" | grep -q "liveness" && fail "a liveness probe failed: $(grep liveness <<<"$out")"
# Checkpoints went to the claim mounted at /checkpoints.
for f in fm-0003.params fm-0003.states; do
  [[ -s "$TMP/volumes/ck/$f" ]] || fail "no checkpoint $f on the claim: $(ls "$TMP/volumes/ck" 2>&1)"
done
expect_no_pods "the job" "$TMP/run.log"

# The same job with --tls: the pods read the TLS files from the Secret's
# volume and train over mutual TLS.
timeout -k 5 150 python3 "$LOCAL" "$TMP/tls.json" --bin mx_server="$SERVER" --bin mx_train="$TRAIN" \
  --timeout 120 > "$TMP/tls.log" 2>&1 ||
  fail "--tls: local run failed: $(grep -E 'mx_(train|server): ' "$TMP/tls.log"; tail -5 "$TMP/tls.log")"
grep -q "^\[worker 1\] Final test accuracy=" "$TMP/tls.log" || fail "--tls: worker 1 did not finish"
grep -q "^k8s_local.py: every pod exited 0$" "$TMP/tls.log" || fail "--tls: not every pod exited 0"

# The same job with --shm: server and worker pods mount the node's /dev/shm
# (a hostPath) and set MX_SHM_DIR; run here, all on this one node (its
# /dev/shm a private directory, $SHM_ROOT/dev/shm), every worker hands its
# values to every server in shared memory, and no segment file stays
# behind.
python3 "$K8S_JOB" --jobs --name fm -n 2 -s 2 --image reg/mx:1 "${ports[@]}" --shm \
  -- "${worker[@]}" --epochs=1 > "$TMP/shm.json" || fail "k8s_job.py --shm failed"
python3 - "$TMP/shm.json" <<'EOF' || fail "--shm objects: see above"
import json, sys
items = {i["metadata"]["name"]: i for i in json.load(open(sys.argv[1]))["items"]}
for name, shared in (("fm-coordinator", False), ("fm-server", True), ("fm-worker", True)):
    pod = items[name]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {v["name"]: v.get("value") for v in c["env"]}
    volume = {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}
    got = (volume in pod.get("volumes", []),
           {"name": "shm", "mountPath": "/mx-shm"} in c.get("volumeMounts", []),
           env.get("MX_SHM_DIR") == "/mx-shm")
    if got != (shared,) * 3:
        sys.exit(f"--shm {name}: hostPath volume, mount, MX_SHM_DIR: {got}, want all {shared}")
EOF
SHM_ROOT=$(mktemp -d /dev/shm/mx-k8s-test.XXXXXX) ||
  { SHM_ROOT=""; fail "--shm: no private directory in /dev/shm"; }
timeout -k 5 150 python3 "$LOCAL" "$TMP/shm.json" --bin mx_server="$SERVER" --bin mx_train="$TRAIN" \
  --host-path-root "${SHM_ROOT:-$TMP/shm-root}" --timeout 120 > "$TMP/shm.log" 2>&1 ||
  fail "--shm: local run failed: $(grep -E 'mx_(train|server): ' "$TMP/shm.log"; tail -5 "$TMP/shm.log")"
grep -q "^k8s_local.py: every pod exited 0$" "$TMP/shm.log" || fail "--shm: not every pod exited 0"
for s in 0 1; do
  for w in 0 1; do
    grep -q "^\[server $s\] server $s: worker $w shares memory with this server$" "$TMP/shm.log" ||
      fail "--shm: worker $w shares no memory with server $s: $(grep -i 'shared memory' "$TMP/shm.log")"
  done
done
grep -q "no shared memory" "$TMP/shm.log" && fail "--shm: $(grep 'no shared memory' "$TMP/shm.log")"
# The pods' /dev/shm was the private one, and they left nothing in it.
if [[ -n $SHM_ROOT ]]; then
  [[ -d "$SHM_ROOT/dev/shm" ]] || fail "--shm: the pods' /dev/shm was not $SHM_ROOT/dev/shm"
  left=$(cd "$SHM_ROOT" && find . -mindepth 1 ! -type d | sort)
  [[ -z $left ]] || fail "--shm: files left in the pods' /dev/shm (now removed): $(echo $left)"
  rm -rf -- "$SHM_ROOT"
  SHM_ROOT=""
fi

# kill_worker_pod CASE MANIFEST LOG MAX_MS: runs MANIFEST's pods, kills
# worker 1's pod (kill -9) once it has finished an epoch, and checks that
# the whole job ends failed (exit code 1) within MAX_MS with no pod process
# left. The case's own checks then read LOG.
kill_worker_pod() {
  local case=$1 manifest=$2 log=$3 max_ms=$4 local_run victim start rc elapsed pid i
  timeout -k 5 150 python3 "$LOCAL" "$manifest" --bin mx_server="$SERVER" --bin mx_train="$TRAIN" \
    --timeout 120 > "$log" 2>&1 &
  local_run=$!
  for i in $(seq 600); do grep -q '^\[worker 1\] Epoch\[0\]' "$log" && break; sleep 0.1; done
  victim=$(sed -n 's/^k8s_local.py: started worker 1 (pid \([0-9]*\))$/\1/p' "$log")
  start=$(date +%s%N)
  [[ -n "$victim" ]] && kill -9 "$victim"
  wait "$local_run"; rc=$?
  elapsed=$(( ($(date +%s%N) - start) / 1000000 ))
  echo "$case: the job ended ${elapsed} ms after the kill (exit code $rc)"
  [[ $rc -eq 1 ]] || fail "$case: local run exit code $rc, not 1"
  (( elapsed <= max_ms )) || fail "$case: the job took ${elapsed} ms to end"
  expect_no_pods "$case" "$log"
}

# A worker pod killed mid-job: its Job fails (backoffLimit 0) and stops its
# other pod, the servers and the coordinator see every worker gone and
# stop with an error, and the whole job ends failed with every pod gone.
python3 "$K8S_JOB" --jobs --name fm -n 2 -s 2 --image reg/mx:1 "${ports[@]}" -- "${worker[@]}" \
  --epochs=1000 > "$TMP/kill.json" || fail "k8s_job.py for the killed-worker job failed"
kill_worker_pod "killed worker pod" "$TMP/kill.json" "$TMP/kill.log" 30000
grep -q "^k8s_local.py: Job fm-worker failed (worker 1 exited -9); terminating the pods of fm-worker$" \
  "$TMP/kill.log" || fail "killed worker pod: the worker Job did not fail: $(grep '^k8s_local' "$TMP/kill.log")"
# The first server to stop fails the server Job, whose controller then
# terminates the other (SIGTERM), possibly before that one has seen the
# workers die too (a CI run had server 0 stopped 9.9 s after the kill).
said_why=0
for s in 0 1; do
  grep -q "^\[server $s\] mx_server: server $s: every worker of the job died" "$TMP/kill.log" &&
    said_why=$((said_why + 1))
done
(( said_why >= 1 )) ||
  fail "killed worker pod: no server stopped saying why: $(grep '^\[server' "$TMP/kill.log" | tail -4)"
grep -q "^\[coordinator\] mx_server: coordinator: every worker of the job died" "$TMP/kill.log" ||
  fail "killed worker pod: the coordinator did not stop saying why"

# 4. The default: one JobSet of the three Jobs, with stable DNS names,
# start-up in order, success when the workers and the coordinator succeed,
# failure as a whole.
python3 "$K8S_JOB" --name fm -n 2 -s 2 --image reg/mx:1 "${ports[@]}" -- "${worker[@]}" \
  > "$TMP/jobset.json" || fail "k8s_job.py (JobSet) failed"
python3 - "$TMP/jobset.json" "$PORT" <<'EOF' || fail "JobSet: see above"
import json, sys
doc = json.load(open(sys.argv[1]))
port = int(sys.argv[2])
bad = []
def check(ok, what):
    if not ok:
        bad.append(what)
kinds = sorted((i["kind"], i["metadata"]["name"]) for i in doc["items"])
check(kinds == [("JobSet", "fm"), ("NetworkPolicy", "fm-mx"), ("Secret", "fm-token")], f"objects {kinds}")
js = [i for i in doc["items"] if i["kind"] == "JobSet"][0]
check(js["apiVersion"] == "jobset.x-k8s.io/v1alpha2", "JobSet apiVersion")
spec = js["spec"]
check(spec["network"] == {"enableDNSHostnames": True, "subdomain": "fm"}, "JobSet: DNS hostnames")
check(spec["startupPolicy"] == {"startupPolicyOrder": "InOrder"}, "JobSet: in-order start-up")
# Success once the coordinator has ended too (it exits 0 only once every
# worker finished and every server and spare was told to shut down): a
# finished JobSet's controller deletes the Jobs still running, pods and
# logs with them.
check(spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["worker", "coordinator"]},
      f"JobSet: success when the workers and the coordinator succeed: {spec['successPolicy']}")
check(spec["failurePolicy"] == {"maxRestarts": 0}, "JobSet: fails as a whole")
check(spec["ttlSecondsAfterFinished"] == 3600, "JobSet: TTL")
check([r["name"] for r in spec["replicatedJobs"]] == ["coordinator", "server", "worker"] and
      all(r["replicas"] == 1 for r in spec["replicatedJobs"]), "JobSet: replicated Jobs in order")
for r in spec["replicatedJobs"]:
    job = r["template"]["spec"]
    check("ttlSecondsAfterFinished" not in job, f"{r['name']}: the JobSet's TTL, not the Job's")
    c = job["template"]["spec"]["containers"][0]
    env = {v["name"]: v.get("value") for v in c["env"]}
    check(env["DMLC_PS_ROOT_URI"] == "fm-coordinator-0-0.fm", f"{r['name']}: the coordinator's DNS name")
    want = "/livez" if r["name"] == "server" else "/healthz"
    check(c["readinessProbe"]["httpGet"]["path"] == want, f"{r['name']}: readiness {want}")
    if r["name"] == "server":
        check(f"--coordinator=fm-coordinator-0-0.fm:{port}" in c["command"], "server: --coordinator")
for b in bad:
    print("JobSet:", b)
sys.exit(1 if bad else 0)
EOF
timeout -k 5 150 python3 "$LOCAL" "$TMP/jobset.json" --bin mx_server="$SERVER" --bin mx_train="$TRAIN" \
  --timeout 120 > "$TMP/jobset.log" 2>&1 ||
  fail "JobSet: local run failed: $(grep -E 'mx_(train|server): ' "$TMP/jobset.log"; tail -5 "$TMP/jobset.log")"
for r in 0 1; do
  grep -q "^\[worker $r\] Final test accuracy=1" "$TMP/jobset.log" || fail "JobSet: worker $r did not reach accuracy 1"
done
grep -q "^k8s_local.py: every pod exited 0$" "$TMP/jobset.log" || fail "JobSet: not every pod exited 0"
grep -q "^k8s_local.py: JobSet fm completed (fm-coordinator-0, fm-worker-0 completed)$" "$TMP/jobset.log" ||
  fail "JobSet: did not complete: $(grep '^k8s_local.py: Job' "$TMP/jobset.log")"
# In order: the servers start once the coordinator is ready, the workers
# once the servers are.
order=$(grep -E "^k8s_local.py: (started (coordinator|server 0|worker 0) |start-up stage [01] ready)" \
        "$TMP/jobset.log" | sed 's/^k8s_local.py: //; s/ (pid.*//' | tr '\n' ',')
[[ "$order" == "started coordinator,start-up stage 0 ready,started server 0,start-up stage 1 ready,started worker 0," ]] ||
  fail "JobSet: start-up order: $order"

# A worker pod of the JobSet killed: its Job fails, so the JobSet does, and
# every pod of it is stopped at once.
python3 "$K8S_JOB" --name fm -n 2 -s 2 --image reg/mx:1 "${ports[@]}" -- "${worker[@]}" \
  --epochs=1000 > "$TMP/jobset_kill.json" || fail "k8s_job.py (JobSet, killed worker) failed"
kill_worker_pod "JobSet, killed worker pod" "$TMP/jobset_kill.json" "$TMP/jobset_kill.log" 10000
grep -q "^k8s_local.py: Job fm-worker-0 failed (worker 1 exited -9); terminating the pods of fm-worker-0$" \
  "$TMP/jobset_kill.log" && grep -q "^k8s_local.py: JobSet fm failed (Job fm-worker-0 failed); terminating the pods of fm$" \
  "$TMP/jobset_kill.log" || fail "JobSet, killed worker pod: $(grep '^k8s_local' "$TMP/jobset_kill.log" | tail -3)"

# kill_pod_mid_job MANIFEST LOG POD [SIGNAL]: runs the manifest's pods, sends
# POD (its first) SIGNAL once worker 1 has trained 5 epochs, fails for any
# pod process left running once the run has ended, and returns the local
# run's exit code. KILL (the default): to the pod's process (unshare,
# which takes the pod with it), as a node's OOM killer or a crash ends it;
# TERM: to the pod's PID 1 (unshare's child, where pods have PID
# namespaces), as the kubelet stops a pod that is deleted (kubectl delete
# pod, a drain).
kill_pod_mid_job() {
  local manifest=$1 log=$2 pod=$3 sig=${4:-KILL} local_run victim
  timeout -k 5 150 python3 "$LOCAL" "$manifest" --bin mx_server="$SERVER" --bin mx_train="$TRAIN" \
    --timeout 120 > "$log" 2>&1 &
  local_run=$!
  for _ in $(seq 600); do grep -q '^\[worker 1\] Epoch\[5\]' "$log" && break; sleep 0.1; done
  victim=$(sed -n "s/^k8s_local.py: started $pod (pid \([0-9]*\))$/\1/p" "$log" | head -1)
  if [[ -n "$victim" && $sig == TERM ]]; then
    victim=$(cat "/proc/$victim/task/$victim/children" 2>/dev/null | awk '{print $1}' | grep . ||
             echo "$victim")
  fi
  [[ -n "$victim" ]] && kill "-$sig" "$victim"
  wait "$local_run"
  local rc=$?
  expect_no_pods "$pod sent SIG$sig mid-job ($(basename "$log"))" "$log"
  return $rc
}

# Bounded staleness reaches every server (flag) and worker (environment),
# the same S, as the servers refuse a store with another.
python3 "$K8S_JOB" --name fm -n 2 -s 2 --staleness 3 --image reg/mx:1 -- "${worker[@]}" \
  > "$TMP/staleness.json" || fail "k8s_job.py --staleness 3 failed"
python3 - "$TMP/staleness.json" <<'EOF' || fail "staleness: see above"
import json, sys
js = [i for i in json.load(open(sys.argv[1]))["items"] if i["kind"] == "JobSet"][0]
jobs = {r["name"]: r["template"]["spec"]["template"]["spec"]["containers"][0]
        for r in js["spec"]["replicatedJobs"]}
env = {v["name"]: v.get("value") for v in jobs["worker"]["env"]}
ok = "--staleness=3" in jobs["server"]["command"] and env.get("MX_STALENESS") == "3"
if not ok:
    print("staleness: server", jobs["server"]["command"], "worker MX_STALENESS", env.get("MX_STALENESS"))
sys.exit(0 if ok else 1)
EOF
out=$(python3 "$K8S_JOB" --name fm -n 2 -s 2 --kvstore dist_async --staleness 3 --image reg/mx:1 \
      -- mx_train --kvstore=dist_async 2>&1)
[[ $? -eq 2 && "$out" == *"--staleness 3: must be 0 or more, and applies to dist_sync only"* ]] ||
  fail "k8s_job.py --staleness with dist_async: $out"

# Replicas 2 with a spare: the server Job keeps going past a failed index,
# a spare Job starts after the servers, and a server pod killed mid-job
# changes nothing for the workers: the spare takes its rank, and only the
# killed pod failed.
python3 "$K8S_JOB" --name fm -n 2 -s 3 --replicas 2 --spare-servers 1 --image reg/mx:1 \
  "${ports[@]}" -- "${worker[@]}" --epochs=300 > "$TMP/replicas.json" ||
  fail "k8s_job.py --replicas 2 --spare-servers 1 failed"
python3 "$K8S_JOB" --jobs --name fm -n 2 -s 3 --replicas 2 --spare-servers 1 --image reg/mx:1 \
  -- "${worker[@]}" > "$TMP/replicas_jobs.json" ||
  fail "k8s_job.py --jobs --replicas 2 --spare-servers 1 failed"
python3 - "$TMP/replicas.json" "$TMP/replicas_jobs.json" <<'EOF' || fail "replicas: see above"
import json, sys
js = [i for i in json.load(open(sys.argv[1]))["items"] if i["kind"] == "JobSet"][0]
jobs = {r["name"]: r["template"]["spec"] for r in js["spec"]["replicatedJobs"]}
plain = {i["metadata"]["name"]: i["spec"] for i in json.load(open(sys.argv[2]))["items"]
         if i["kind"] == "Job"}
bad = []
def check(ok, what):
    if not ok:
        bad.append(what)
check(list(jobs) == ["coordinator", "server", "spare", "worker"], f"replicated Jobs {list(jobs)}")
command = lambda role: jobs[role]["template"]["spec"]["containers"][0]["command"]
env = lambda role: {v["name"]: v.get("value") for v in jobs[role]["template"]["spec"]["containers"][0]["env"]}
check(jobs["server"].get("backoffLimitPerIndex") == 0 and jobs["server"].get("maxFailedIndexes") == 2
      and "backoffLimit" not in jobs["server"], "servers: per-index failure policy")
check("--replicas=2" in command("server") and "--spare" not in command("server"), "servers: --replicas=2")
check(command("spare")[-1] == "--spare" and "--replicas=2" in command("spare")
      and "MX_RANK" not in env("spare"), "spare: --spare, no rank")
# A failed spare is replaced by a new one, its failure ignored, so that the
# spare Job, and with it the JobSet, never fails for it: any failure in a
# JobSet (which deletes the Job, and so ends the replacements, when it
# ends); with --jobs, a spare stopped from outside (137, 143), declared dead
# once it took a rank (3) or disrupted.
disrupted = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
check(jobs["spare"].get("podFailurePolicy") == {"rules": [disrupted, {
    "action": "Ignore", "onExitCodes": {"containerName": "spare", "operator": "NotIn", "values": [0]}}]},
    f"spare: a failed spare is not replaced: {jobs['spare'].get('podFailurePolicy')}")
check(plain["fm-spare"].get("podFailurePolicy") == {"rules": [disrupted, {
    "action": "Ignore", "onExitCodes": {"containerName": "spare", "operator": "In", "values": [137, 143, 3]}}]},
    f"--jobs spare: {plain['fm-spare'].get('podFailurePolicy')}")
# A server stopped from outside, or declared dead (exit code 3: cut off or
# paused long enough), is replaced: the new pod joins as a spare.
stopped = {"action": "Ignore", "onExitCodes": {"containerName": "server", "operator": "In",
                                               "values": [137, 143, 3]}}
for policy in (jobs["server"].get("podFailurePolicy"), plain["fm-server"].get("podFailurePolicy")):
    check(policy == {"rules": [dict(disrupted), stopped]},
          f"servers: a stopped server is not replaced: {policy}")
check(env("worker")["MX_REPLICAS"] == "2", "workers: MX_REPLICAS=2")
for b in bad:
    print("replicas:", b)
sys.exit(1 if bad else 0)
EOF
# Server 1 killed mid-job (OOM-killed, say): its keys' backups serve them,
# the spare takes its rank, and its Job replaces its pod, which finds the
# rank taken and joins as a second spare; every Job completes (the failed
# index failed the server Job, and could fail the JobSet, after training
# finished).
kill_pod_mid_job "$TMP/replicas.json" "$TMP/replicas.log" "server 1" ||
  fail "replicas: the job failed: $(grep -E '^k8s_local.py: (failed|Job|JobSet)|mx_(train|server): ' "$TMP/replicas.log")"
grep -q "^k8s_local.py: Job fm-server-0 replaces server 1 (exited -9; its podFailurePolicy ignores that)$" \
  "$TMP/replicas.log" || fail "replicas: server 1 not replaced: $(grep '^k8s_local.py: Job' "$TMP/replicas.log")"
grep -q "server rank 1 is already taken.*; joining as a spare$" "$TMP/replicas.log" ||
  fail "replicas: the new server 1 did not join as a spare: $(grep 'mx_server' "$TMP/replicas.log" | tail -3)"
for r in 0 1; do
  grep -q "^\[worker $r\] Final test accuracy=1" "$TMP/replicas.log" || fail "replicas: worker $r did not finish"
  grep -q "^\[worker $r\] worker $r: a spare took the rank of server 1" "$TMP/replicas.log" ||
    fail "replicas: worker $r did not hear of the spare"
done
for completed in "Job fm-server-0 completed" "JobSet fm completed (fm-coordinator-0, fm-worker-0 completed)"; do
  grep -q "^k8s_local.py: $completed$" "$TMP/replicas.log" ||
    fail "replicas: no '$completed': $(grep -E '^k8s_local.py: (Job|JobSet)' "$TMP/replicas.log")"
done

# The waiting spare killed mid-job (OOM-killed, say): its Job replaces it
# with a new spare, the failure ignored, and the JobSet completes. (A spare
# Job failed at its first failed pod, and with it the JobSet: every pod
# was stopped, the training with them.)
kill_pod_mid_job "$TMP/replicas.json" "$TMP/spare.log" "spare 0" ||
  fail "spare killed: the job failed: $(grep -E '^k8s_local.py: (failed|Job|JobSet)|mx_(train|server): ' "$TMP/spare.log")"
grep -q "^k8s_local.py: Job fm-spare-0 replaces spare 0 (exited -9; its podFailurePolicy ignores that)$" \
  "$TMP/spare.log" || fail "spare killed: not replaced: $(grep '^k8s_local.py: Job' "$TMP/spare.log")"
for r in 0 1; do
  grep -q "^\[worker $r\] Final test accuracy=1" "$TMP/spare.log" || fail "spare killed: worker $r did not finish"
done
grep -q "^k8s_local.py: Job fm-spare-0 completed$" "$TMP/spare.log" ||
  fail "spare killed: the new spare's Job did not complete: $(grep '^k8s_local.py: Job' "$TMP/spare.log")"
grep -q "^k8s_local.py: JobSet fm completed (fm-coordinator-0, fm-worker-0 completed)$" "$TMP/spare.log" ||
  fail "spare killed: the JobSet did not complete: $(grep '^k8s_local.py: Job' "$TMP/spare.log")"

# The coordinator pod killed mid-job: its Job (backoffLimit 1) replaces it,
# the nodes, which go on meanwhile (MX_COORDINATOR_TIMEOUT_S 60), rejoin
# the new one, and the job finishes.
python3 "$K8S_JOB" --name fm -n 2 -s 2 --image reg/mx:1 "${ports[@]}" -- "${worker[@]}" \
  --epochs=300 > "$TMP/coordinator.json" || fail "k8s_job.py (coordinator restart) failed"
python3 - "$TMP/coordinator.json" <<'EOF' || fail "coordinator restart: see above"
import json, sys
js = [i for i in json.load(open(sys.argv[1]))["items"] if i["kind"] == "JobSet"][0]
jobs = {r["name"]: r["template"]["spec"] for r in js["spec"]["replicatedJobs"]}
ok = jobs["coordinator"]["backoffLimit"] == 1 and jobs["server"]["backoffLimit"] == 0
# Replaced only when killed or crashed: its own exit codes fail the Job.
ok = ok and jobs["coordinator"]["podFailurePolicy"]["rules"] == [{
    "action": "FailJob",
    "onExitCodes": {"containerName": "coordinator", "operator": "In", "values": [1, 2]}}]
for role, job in jobs.items():
    env = {v["name"]: v.get("value") for v in job["template"]["spec"]["containers"][0]["env"]}
    ok = ok and env.get("MX_COORDINATOR_TIMEOUT_S") == "60"
print("" if ok else "coordinator restart: backoffLimit 1 and MX_COORDINATOR_TIMEOUT_S=60 expected")
sys.exit(0 if ok else 1)
EOF
kill_pod_mid_job "$TMP/coordinator.json" "$TMP/coordinator.log" coordinator || fail "coordinator restart: the job failed: $(grep -E '^k8s_local.py: failed|mx_(train|server): ' "$TMP/coordinator.log")"
grep -q "^k8s_local.py: Job fm-coordinator-0 replaces coordinator (exited -9; backoffLimit 1)$" "$TMP/coordinator.log" ||
  fail "coordinator restart: the Job did not replace the pod: $(grep '^k8s_local' "$TMP/coordinator.log" | tail -3)"
for node in "server 0" "server 1" "worker 0" "worker 1"; do
  grep -qE "^\[$node\] .*: rejoined the coordinator at " "$TMP/coordinator.log" ||
    fail "coordinator restart: $node did not rejoin"
done
grep -q "^k8s_local.py: JobSet fm completed (fm-coordinator-0, fm-worker-0 completed)$" "$TMP/coordinator.log" ||
  fail "coordinator restart: the JobSet did not complete: $(grep '^k8s_local.py: Job' "$TMP/coordinator.log")"

# The coordinator pod deleted mid-job (kubectl delete pod, a drain): the
# kubelet's SIGTERM stops it before the job finished, so it exits 143 (with
# 0 its Job completed, nothing replaced it, and the nodes gave it up after
# MX_COORDINATOR_TIMEOUT_S), a failure its Job counts (its podFailurePolicy
# fails the Job on 1 and 2 only): the pod is replaced, the nodes rejoin
# the new one, and every worker finishes.
kill_pod_mid_job "$TMP/coordinator.json" "$TMP/coordinator_term.log" coordinator TERM ||
  fail "coordinator stopped: the job failed: $(grep -E '^k8s_local.py: (failed|Job)|mx_(train|server): ' "$TMP/coordinator_term.log")"
grep -qE "^k8s_local.py: Job fm-coordinator-0 replaces coordinator \(exited (143|-15); backoffLimit 1\)$" \
  "$TMP/coordinator_term.log" ||
  fail "coordinator stopped: the Job did not replace the pod: $(grep -E '^k8s_local.py: (Job|failed)|^\[coordinator\]' "$TMP/coordinator_term.log" | tail -4)"
for node in "server 0" "server 1" "worker 0" "worker 1"; do
  grep -qE "^\[$node\] .*: rejoined the coordinator at " "$TMP/coordinator_term.log" ||
    fail "coordinator stopped: $node did not rejoin"
done
for r in 0 1; do
  grep -q "^\[worker $r\] Final test accuracy=1" "$TMP/coordinator_term.log" ||
    fail "coordinator stopped: worker $r did not finish"
done
grep -q "^k8s_local.py: JobSet fm completed (fm-coordinator-0, fm-worker-0 completed)$" "$TMP/coordinator_term.log" ||
  fail "coordinator stopped: the JobSet did not complete"

# 3. Bad flags: refused, saying why.
expect_refusal() {  # expect_refusal MESSAGE ARGS...
  local msg=$1; shift
  local err
  err=$(python3 "$K8S_JOB" "$@" 2>&1 >/dev/null)
  [[ $? -eq 2 && "$err" == *"$msg"* ]] || fail "k8s_job.py $*: wanted exit 2 and '$msg', got: $err"
}
expect_refusal "-n and -s must be at least 1" --name fm -n 0 -s 1 --image x -- mx_train
expect_refusal "give the worker command after --" --name fm -n 1 -s 1 --image x
expect_refusal "--name 'Fm': lower-case letters" --name Fm -n 1 -s 1 --image x -- mx_train
# An unset variable ("") admitted scrapes from every namespace.
expect_refusal "--metrics-from '': not a namespace name" --name fm -n 1 -s 1 --image x \
  --metrics-from "" -- mx_train
expect_refusal "--port 70000: not a port" --name fm -n 1 -s 1 --image x --port 70000 -- mx_train
expect_refusal "give --tls (a new Secret) or --tls-secret" --name fm -n 1 -s 1 --image x --tls \
  --tls-secret s -- mx_train
expect_refusal "--metrics-port 9091: not a port other than --port" --name fm -n 1 -s 1 --image x \
  --metrics-port 9091 -- mx_train
expect_refusal "--tls-days: applies to --tls" --name fm -n 1 -s 1 --image x --tls-days 30 \
  -- mx_train --kvstore=dist_sync
expect_refusal "--tls-days 0: must be 1 to 36500 days" --name fm -n 1 -s 1 --image x --tls \
  --tls-days 0 -- mx_train --kvstore=dist_sync
expect_refusal "--startup-timeout 0: must be 1 to 86400 seconds" --name fm -n 1 -s 1 --image x \
  --startup-timeout 0 -- mx_train
# Beyond what the pods take (MX_STARTUP_TIMEOUT_S, MX_STALENESS): every pod
# would refuse to start.
expect_refusal "--startup-timeout 86401: must be 1 to 86400 seconds" --name fm -n 1 -s 1 --image x \
  --startup-timeout 86401 -- mx_train --kvstore=dist_sync
expect_refusal "--staleness 1001: at most 1000" --name fm -n 1 -s 1 --image x \
  --staleness 1001 -- mx_train --kvstore=dist_sync
expect_refusal "--spare-servers 1: must be 0 or more, and needs --replicas 2" --name fm -n 1 -s 2 \
  --image x --spare-servers 1 -- mx_train --kvstore=dist_sync
expect_refusal "--coordinator-restarts -1: must be 0 or more" --name fm -n 1 -s 1 --image x \
  --coordinator-restarts -1 -- mx_train --kvstore=dist_sync
expect_refusal "--coordinator-timeout 1: must be 2 to 86400 seconds" --name fm -n 1 -s 1 --image x \
  --coordinator-timeout 1 -- mx_train --kvstore=dist_sync
expect_refusal "--cpu 'lots': not a positive Kubernetes quantity" --name fm -n 1 -s 1 --image x \
  --cpu lots -- mx_train --kvstore=dist_sync
expect_refusal "--cpu '0': not a positive Kubernetes quantity" --name fm -n 1 -s 1 --image x \
  --cpu 0 -- mx_train --kvstore=dist_sync
expect_refusal "--memory '2GB': not a positive Kubernetes quantity" --name fm -n 1 -s 1 --image x \
  --memory 2GB -- mx_train --kvstore=dist_sync
expect_refusal "--image '': an image reference" --name fm -n 1 -s 1 --image "" \
  -- mx_train --kvstore=dist_sync
expect_refusal "--checkpoint_prefix=/tmp/fm: outside the checkpoint volume" --name fm -n 1 -s 1 \
  --image x --checkpoint-claim ck -- mx_train --kvstore=dist_sync --checkpoint_prefix=/tmp/fm
expect_refusal "--checkpoint_prefix=/checkpoints/fm: give --checkpoint-claim" --name fm -n 1 -s 1 \
  --image x -- mx_train --kvstore=dist_sync --checkpoint_prefix=/checkpoints/fm
# absl's other spellings of the flag: one dash, or the value as the next
# argument (one dash went unchecked, and the checkpoints stayed in the pod).
expect_refusal "--checkpoint_prefix=/tmp/fm: outside the checkpoint volume" --name fm -n 1 -s 1 \
  --image x --checkpoint-claim ck -- mx_train --kvstore=dist_sync -checkpoint_prefix=/tmp/fm
expect_refusal "--checkpoint_prefix=/tmp/fm: outside the checkpoint volume" --name fm -n 1 -s 1 \
  --image x --checkpoint-claim ck -- mx_train --kvstore=dist_sync -checkpoint_prefix /tmp/fm
expect_refusal "--checkpoint_prefix=/checkpoints/fm: give --checkpoint-claim" --name fm -n 1 -s 1 \
  --image x -- mx_train --kvstore=dist_sync -checkpoint_prefix=/checkpoints/fm
python3 "$K8S_JOB" --jobs --name fm -n 1 -s 1 --image x --checkpoint-claim ck -- mx_train \
  -kvstore=dist_sync -checkpoint_prefix=/checkpoints/fm > /dev/null ||
  fail "k8s_job.py refused -kvstore=dist_sync -checkpoint_prefix=/checkpoints/fm"
expect_refusal "--toleration 'gpu': give KEY[=VALUE]:EFFECT" --name fm -n 1 -s 1 --image x \
  --toleration gpu -- mx_train --kvstore=dist_sync
expect_refusal "--namespace 'ML': lower-case letters" --name fm -n 1 -s 1 --image x \
  --namespace ML -- mx_train --kvstore=dist_sync
python3 "$K8S_JOB" --jobs --name fm -n 1 -s 1 --image x --namespace ml --service-account trainer \
  --node-selector pool=cpu --toleration gpu=yes:NoSchedule --toleration spot:NoExecute \
  --image-pull-secret reg --server-cpu 2 --server-memory 4Gi -- mx_train --kvstore=dist_sync | python3 -c '
import json, sys
for item in json.load(sys.stdin)["items"]:
    name = item["metadata"]["name"]
    if item["metadata"].get("namespace") != "ml":
        sys.exit(name + ": not in namespace ml")
    if item["kind"] != "Job":
        continue
    pod = item["spec"]["template"]["spec"]
    want = {"serviceAccountName": "trainer", "nodeSelector": {"pool": "cpu"},
            "tolerations": [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"},
                            {"key": "spot", "operator": "Exists", "effect": "NoExecute"}],
            "imagePullSecrets": [{"name": "reg"}]}
    got = {k: pod.get(k) for k in want}
    if got != want:
        sys.exit(f"{name}: scheduling {got}")
    res = pod["containers"][0]["resources"]["requests"]
    if name == "fm-server" and res != {"cpu": "2", "memory": "4Gi"}:
        sys.exit(f"{name}: resources {res}")
' || fail "the scheduling options are not on every object"
expect_refusal "--deadline -5: must be at least 1 second, or 0 for none" --name fm -n 1 -s 1 \
  --image x --deadline -5 -- mx_train --kvstore=dist_sync
python3 "$K8S_JOB" --jobs --name fm -n 1 -s 1 --image x --deadline 7200 --ttl 60 -- mx_train \
  --kvstore=dist_sync | python3 -c '
import json, sys
for job in json.load(sys.stdin)["items"]:
    spec = job.get("spec", {})
    if job["kind"] == "Job" and (spec.get("activeDeadlineSeconds") != 7200
                                 or spec.get("ttlSecondsAfterFinished") != 60):
        sys.exit(job["metadata"]["name"] + ": no deadline or TTL as asked")
' || fail "--deadline 7200 --ttl 60 not applied to every Job"
# Worker commands that would not train as one job.
expect_refusal "the worker command has no --kvstore: mx_train would train each worker alone" \
  --name fm -n 2 -s 1 --image x -- mx_train --network=mlp
expect_refusal "the worker command's --kvstore=local is not the job's --kvstore dist_sync (each worker would train alone)" \
  --name fm -n 2 -s 1 --image x -- mx_train --kvstore=local
expect_refusal "the worker command's --kvstore=dist_sync is not the job's --kvstore dist_async" \
  --name fm -n 2 -s 1 --image x --kvstore dist_async -- mx_train --kvstore dist_sync
expect_refusal "the worker command's --kvstore=local is not the job's --kvstore dist_sync" \
  --name fm -n 2 -s 1 --image x -- mx_train -kvstore=local
expect_refusal "the worker command's --kvstore=local is not the job's --kvstore dist_sync" \
  --name fm -n 2 -s 1 --image x -- mx_train -kvstore local

# A pod IP variable that Kubernetes left unexpanded (a typo in its name)
# stops the server at once, instead of registering an address nobody can
# dial.
out=$(timeout 10 "$SERVER" --role=server --coordinator=127.0.0.1:1 --num_workers=1 \
      '--advertise=$(POD_IPX)' 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--advertise '\$(POD_IPX)' is not a host or host:port"* ]] ||
  fail "--advertise='\$(POD_IPX)': exit code $rc, said: $out"

# A port that is no port is refused, not replaced by another.
out=$(timeout 10 "$SERVER" --role=coordinator --bind=127.0.0.1:99999 --num_servers=1 --num_workers=1 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--bind=127.0.0.1:99999: needs host:port with a port from 0"* ]] ||
  fail "--bind=127.0.0.1:99999: exit code $rc, said: $out"
# A coordinator address without a port: refused at once, naming where it
# came from (a server dialled "127.0.0.1:" until its startup timeout).
out=$(DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT= timeout 10 "$SERVER" --role=server \
      --num_workers=1 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT=127.0.0.1:: needs host:port with a port from 1 to 65535"* ]] ||
  fail "a server with DMLC_PS_ROOT_URI and no port: exit code $rc, said: $out"
out=$(timeout 10 "$SERVER" --role=server --coordinator=bogus --num_workers=1 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--coordinator=bogus: needs host:port"* ]] ||
  fail "--coordinator=bogus: exit code $rc, said: $out"
timeout 10 "$SERVER" --help > "$TMP/server_help.txt" 2>&1 || fail "mx_server --help exited $?, not 0"
grep -q -- "--role" "$TMP/server_help.txt" || fail "mx_server --help lacks --role"

echo "$failures failures"
exit $(( failures > 0 ))
