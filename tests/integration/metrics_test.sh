#!/usr/bin/env bash
# Metrics of a running job (launch.py --metrics): every process's endpoint
# passes Debian's `promtool check metrics` and shows what it did; /healthz
# answers 200; a real Prometheus server scrapes the five endpoints and a
# PromQL query returns the servers' push count, no more than the servers
# themselves report afterwards. The job is then stopped and leaves nothing.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"
command -v promtool >/dev/null && command -v prometheus >/dev/null \
  || { fail "promtool or prometheus missing (apt-get install prometheus)"; finish; }

# fetch URL: the body in $body and the HTTP status in $http_code (0: no
# answer).
fetch() {
  http_code=$(python3 - "$1" "$TMP/body" <<'PY'
import sys, urllib.request, urllib.error
code, body = 0, b""
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code = e.code
except Exception:
    pass
open(sys.argv[2], "wb").write(body)
print(code)
PY
)
  body=$(cat "$TMP/body")
}
# value TEXT SERIES: the sample of SERIES (name{labels} exactly) in TEXT.
value() { awk -v s="$2" '$1 == s { print $2 }' <<<"$1"; }
positive() { python3 -c "import sys; sys.exit(0 if float('${1:-0}') > 0 else 1)" 2>/dev/null; }

log="$TMP/job.log"
start_job "$log" --metrics -n 2 -s 2 -- "${worker[@]}" --epochs=100000
wait_for_line "$log" 'Epoch\[1\]' 60 || { fail "the job did not train"; tail -20 "$log"; finish; }
declare -A url
for who in coordinator "server 0" "server 1" "worker 0" "worker 1"; do
  url[$who]=$(sed -n "s/^\[$who\] [a-z]*: metrics on \(http:[^ ]*\)$/\1/p" "$log" | head -1)
  [[ -n "${url[$who]}" ]] || fail "$who printed no metrics address"
done

targets=()
for who in coordinator "server 0" "server 1" "worker 0" "worker 1"; do
  [[ -n "${url[$who]}" ]] || continue
  fetch "${url[$who]}"
  text=$body
  [[ "$http_code" == 200 ]] || fail "$who: /metrics answered $http_code"
  promtool check metrics <<<"$text" > "$TMP/promtool.out" 2>&1 \
    || fail "$who: promtool check metrics: $(cat "$TMP/promtool.out")"
  health=${url[$who]%/metrics}/healthz
  fetch "$health"
  [[ "$http_code" == 200 ]] || fail "$who: /healthz answered $http_code"
  case "$who" in
    coordinator)
      [[ $(value "$text" 'mx_coordinator_nodes{role="worker",state="registered"}') == 2 ]] \
        || fail "coordinator: not 2 registered workers"
      positive "$(value "$text" 'mx_rpc_server_handled_total{method="Heartbeat",code="OK"}')" \
        || fail "coordinator: no heartbeats counted" ;;
    server*)
      positive "$(value "$text" 'mx_server_pushes_total')" || fail "$who: no pushes counted"
      positive "$(value "$text" 'mx_rpc_server_received_bytes_total{method="PushPullMany"}')" \
        || fail "$who: no bytes received counted"
      [[ -n "$(value "$text" 'mx_rpc_server_handling_seconds_count{method="PushPullMany"}')" ]] \
        || fail "$who: no latency histogram"
      positive "$(value "$text" 'mx_server_pull_wait_seconds_count')" || fail "$who: no pull waits" ;;
    worker*)
      positive "$(value "$text" 'mx_worker_samples_total')" || fail "$who: no samples counted"
      positive "$(value "$text" 'mx_worker_step_seconds_count')" || fail "$who: no steps timed"
      positive "$(value "$text" 'mx_rpc_client_handled_total{method="PushPullMany",code="OK"}')" \
        || fail "$who: no pushpull calls counted"
      [[ -n "$(value "$text" 'mx_storage_bytes_in_use{device="cpu"}')" ]] \
        || fail "$who: no pooled memory" ;;
  esac
  targets+=("\"${url[$who]#http://}\"")
  targets[-1]=${targets[-1]%/metrics\"}\"
done

# A real Prometheus scrapes the job every second.
prom_port=$(free_port)
cat > "$TMP/prometheus.yml" <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: mx
    static_configs:
      - targets: [$(IFS=,; echo "${targets[*]}")]
YML
promtool check config "$TMP/prometheus.yml" > "$TMP/promtool.out" 2>&1 \
  || fail "promtool check config: $(cat "$TMP/promtool.out")"
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" > "$TMP/prometheus.log" 2>&1 &
prom=$!
trap 'kill "$prom" 2>/dev/null; cleanup' EXIT  # Prometheus too, however the test ends
query() {
  fetch "http://127.0.0.1:$prom_port/api/v1/query?query=$1"
  python3 -c 'import sys, json
r = json.load(sys.stdin)["data"]["result"]
print(r[0]["value"][1] if r else "")' <<<"$body" 2>/dev/null
}
up=""
for _ in $(seq 1 60); do
  up=$(query 'sum(up)')
  [[ "$up" == "${#targets[@]}" ]] && break
  sleep 0.5
done
[[ "$up" == 5 ]] || fail "prometheus: sum(up) is '${up}', not 5 targets up"
pushes=""
for _ in $(seq 1 20); do
  pushes=$(query 'sum(mx_server_pushes_total)')
  positive "$pushes" && break
  sleep 0.5
done
positive "$pushes" || fail "prometheus: sum(mx_server_pushes_total) is '${pushes}'"
direct=0
for who in "server 0" "server 1"; do
  fetch "${url[$who]}"
  v=$(value "$body" 'mx_server_pushes_total')
  direct=$(python3 -c "print(${direct} + ${v:-0})")
done
python3 -c "import sys; sys.exit(0 if 0 < float('${pushes:-0}') <= float('$direct') else 1)" \
  || fail "prometheus's push count ${pushes} is not within (0, ${direct}] (the servers' own)"
echo "prometheus: 5 targets up; the servers' pushes: ${pushes} (servers now report ${direct})"
kill "$prom" 2>/dev/null; wait "$prom" 2>/dev/null

kill "$launcher" 2>/dev/null
wait "$launcher" 2>/dev/null
assert_nothing_left "$log"
(( failures == 0 )) || tail -20 "$log"
finish
