#!/usr/bin/env bash
# Every object deploy/k8s_job.py prints, for several job sizes and every
# option, is valid as the API server would judge it with strict field
# validation: Kubernetes' kinds against the official OpenAPI schemas, the
# JobSet against its CRD's schema (k8s_schema/validate.js says how), unknown
# fields included. The validator must also refuse objects broken on
# purpose, so that this test can fail. Skips, saying why, where Node.js or
# the validators (deploy/setup.sh installs them) are missing.
set -uo pipefail
K8S_JOB="$1"
VALIDATE="$(dirname "$0")/k8s_schema/validate.js"
export MX_K8S_SCHEMA_MODULES="${MX_K8S_SCHEMA_MODULES:-/usr/local/lib/mx-k8s-schema/node_modules}"
MODULES="$MX_K8S_SCHEMA_MODULES"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

source "$(dirname "$0")/../testdata/skip.sh"
skip() { skip_test k8s_schema_test ObjectsMatchSchemas "$1"; }
command -v node >/dev/null || skip "no Node.js (node) on PATH"
[[ -d "$MODULES/kubernetes-models" && -d "$MODULES/ajv" ]] ||
  skip "no schema validators in $MODULES (deploy/setup.sh installs them with npm)"

# gen FILE ARGS...: k8s_job.py's objects for ARGS, into $TMP/FILE.json.
files=()
gen() {
  local file=$1; shift
  if python3 "$K8S_JOB" "$@" > "$TMP/$file.json" 2> "$TMP/$file.err"; then
    files+=("$TMP/$file.json")
  else
    fail "k8s_job.py $*: $(cat "$TMP/$file.err")"
  fi
}
sync=(-- mx_train --kvstore=dist_sync --network=mlp --epochs=2)
async=(-- mx_train --kvstore=dist_async --network=mlp)
# The longest name k8s_job.py takes (40 characters) with the most pods:
# every pod's hostname must still be a DNS label.
long=job-$(printf 'a%.0s' {1..36})

for mode in "" --jobs; do
  tag=${mode#--}; tag=${tag:-jobset}
  for size in "1 1" "2 2" "16 4" "64 8"; do
    read -r n s <<<"$size"
    gen "$tag-$n-$s" $mode --name fm -n "$n" -s "$s" --image reg/mx:1 "${sync[@]}"
  done
  gen "$tag-long" $mode --name "$long" -n 64 -s 8 --replicas 2 --spare-servers 3 \
    --image reg/mx:1 "${sync[@]}"
  gen "$tag-elastic" $mode --name el -n 3 -s 1 --elastic --image reg/mx:1 "${sync[@]}"
  gen "$tag-async" $mode --name as -n 2 -s 2 --kvstore dist_async --image reg/mx:1 "${async[@]}"
  gen "$tag-replicas" $mode --name rp -n 2 -s 3 --replicas 2 --spare-servers 1 \
    --image reg/mx:1 "${sync[@]}"
  gen "$tag-tls" $mode --name tl -n 2 -s 2 --tls --image reg/mx:1 "${sync[@]}"
  gen "$tag-secrets" $mode --name sc -n 2 -s 2 --tls-secret my-tls --token-secret my-token \
    --image reg/mx:1 "${sync[@]}"
  # Every other option at once.
  gen "$tag-all" $mode --name all -n 4 -s 2 --image registry.example.com/team/mx:1.2 \
    --image-pull-policy Always --port 9000 --server-port 9100 --stream-port 9101 --metrics-port 9200 \
    --metrics-from monitoring --heartbeat-timeout 5 --startup-timeout 900 --ttl 0 \
    --coordinator-restarts 0 --coordinator-timeout 30 --deadline 7200 --namespace team-a \
    --service-account trainer --node-selector pool=cpu --node-selector zone=a \
    --toleration dedicated=ml:NoSchedule --toleration spot:NoExecute \
    --image-pull-secret regcred --coordinator-cpu 100m --coordinator-memory 128Mi \
    --server-cpu 1500m --server-memory 2Gi --cpu 4 --memory 8Gi --checkpoint-claim ckpt --shm \
    "${sync[@]}" --checkpoint_prefix=/checkpoints/all
done

# 1. Every object is valid.
if out=$(node "$VALIDATE" "${files[@]}" 2>&1); then
  echo "valid: $out (${#files[@]} manifests)"
  grep -q "^[0-9]* objects valid$" <<<"$out" || fail "validator said: $out"
else
  fail "invalid objects: $out"
fi

# 2. Objects broken on purpose are refused, with the field's path.
python3 - "$TMP/jobset-2-2.json" "$TMP/jobs-2-2.json" "$TMP" <<'PY'
import copy, json, sys
jobset, jobs, tmp = (json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3])
def of(doc, kind):
    return next(o for o in doc["items"] if o["kind"] == kind)
def pod(doc):
    js = of(doc, "JobSet")
    return js["spec"]["replicatedJobs"][-1]["template"]["spec"]["template"]["spec"]
cases = {
    "unknown_pod_field": (jobset, lambda d: pod(d)["containers"][0].update(bogus=1)),
    "bad_quantity": (jobset, lambda d: pod(d)["containers"][0]["resources"]["limits"]
                     .update(cpu="lots")),
    "unknown_jobset_field": (jobset, lambda d: of(d, "JobSet")["spec"]["network"]
                             .update(dns=True)),
    "bad_startup_order": (jobset, lambda d: of(d, "JobSet")["spec"]["startupPolicy"]
                          .update(startupPolicyOrder="Sorted")),
    "unknown_success_target": (jobset, lambda d: of(d, "JobSet")["spec"]["successPolicy"]
                               .update(targetReplicatedJobs=["workers"])),
    "unknown_service_field": (jobs, lambda d: of(d, "Service")["spec"].update(extra=1)),
    "bad_protocol": (jobs, lambda d: of(d, "NetworkPolicy")["spec"]["ingress"][0]["ports"][0]
                     .update(protocol="ICMP")),
    "bad_label_value": (jobs, lambda d: of(d, "Job")["metadata"]["labels"]
                        .update({"app.kubernetes.io/name": "no spaces"})),
    "string_for_int": (jobs, lambda d: of(d, "Job")["spec"].update(backoffLimit="0")),
}
for name, (doc, breaks) in cases.items():
    d = copy.deepcopy(doc)
    breaks(d)
    json.dump(d, open(f"{tmp}/broken_{name}.json", "w"))
PY
[[ $? -eq 0 ]] || fail "could not break the objects (see above)"
expect_refused() {  # expect_refused CASE PATH_REGEX
  local out
  if out=$(node "$VALIDATE" "$TMP/broken_$1.json" 2>&1); then
    fail "$1: the validator took it: $out"
  elif ! grep -qE -- "$2" <<<"$out"; then
    fail "$1: refused without naming $2: $out"
  fi
}
expect_refused unknown_pod_field 'containers/0/bogus: unknown field'
expect_refused bad_quantity 'limits/cpu: must match format "quantity"'
expect_refused unknown_jobset_field '/spec/network: must NOT have additional properties "dns"'
expect_refused bad_startup_order 'startupPolicyOrder: must be equal to one of the allowed values'
expect_refused unknown_success_target 'no replicated Job "workers"'
expect_refused unknown_service_field 'Service fm-coordinator: /spec/extra: unknown field'
expect_refused bad_protocol 'ports/0/protocol: must be one of'
expect_refused bad_label_value 'app.kubernetes.io/name: bad label value'
expect_refused string_for_int '/spec/backoffLimit: must be integer'

echo "$failures failures"
exit $(( failures > 0 ))
