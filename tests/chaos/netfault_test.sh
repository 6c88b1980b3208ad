#!/usr/bin/env bash
# Network faults, not only dead processes. A dist_sync job (a coordinator,
# 2 servers, 2 workers) runs with every node in a network namespace of its
# own, made here (ip netns, veth pairs on one bridge; root, as CI is):
# - loss: every node drops 2% of the packets it sends (nftables, numgen
#   random): the job finishes with the undisturbed result (parameters'
#   checksum), only slower;
# - delay: 5 ms added to every packet (tc netem), the same; where the
#   kernel has no netem, 5 ms each way through a proxy in front of every
#   server and the coordinator (delay_proxy.py);
# - partition: worker 0 and server 1 stop reaching each other (nftables
#   drops between their addresses) while the others still reach both: the
#   job ends within its deadline, never hangs, worker 0's error naming
#   server 1 and its address, and every process exits; with replicas 2 (3
#   servers) the job fails over and finishes with the undisturbed result.
# Writes its cases to $XML_OUTPUT_FILE (a skipped case with its reason) for
# tests/run_all.sh's count.
set -uo pipefail
SERVER="$1"; TRAIN="$2"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/../testdata/make_csv.sh"
make_csv 401 "$TMP/train.csv" "$TMP/train_labels.csv"
make_csv 100 "$TMP/test.csv" "$TMP/test_labels.csv"

P="nf$$"                 # this run's namespaces and links: nf<pid><node>
NODES=(c s0 s1 s2 w0 w1)  # coordinator, servers (s2: replicas only), workers
declare -A IP=([c]=10.203.0.1 [s0]=10.203.0.2 [s1]=10.203.0.3 [w0]=10.203.0.4 [w1]=10.203.0.5
               [s2]=10.203.0.6)
SERVERS=2                 # the job's servers: 2, or 3 with REPLICAS=2
REPLICAS=1
DELAY_MS=""               # set: every server and the coordinator behind delay_proxy.py
PROXIES=()
COORDINATOR="${IP[c]}:9000"
PIDS=()
CASES=()                 # "name<TAB>result<TAB>message": result pass, fail or skip
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
ns() { echo "$P$1"; }

cleanup() {
  local pid
  # Each pid is a timeout(1), whose child would outlive it.
  for pid in "${PIDS[@]}" "${PROXIES[@]}"; do pkill -9 -P "$pid"; kill -9 "$pid" 2>/dev/null; done
  for n in "${NODES[@]}" hub; do ip netns del "$(ns "$n")" 2>/dev/null; done
}
trap cleanup EXIT

# The test's results as JUnit XML, one case per fault.
write_xml() {
  [[ -n "${XML_OUTPUT_FILE:-}" ]] || return 0
  local c name result message fails=0 skips=0 body=""
  for c in "${CASES[@]}"; do
    IFS=$'\t' read -r name result message <<<"$c"
    # As GoogleTest writes them (tests/run_all.sh counts result="skipped").
    case $result in
      pass) body+="    <testcase name=\"$name\" classname=\"netfault\" status=\"run\" result=\"completed\">" ;;
      fail) fails=$((fails + 1))
            body+="    <testcase name=\"$name\" classname=\"netfault\" status=\"run\" result=\"completed\">"
            body+="<failure message=\"$message\"/>" ;;
      skip) skips=$((skips + 1))
            body+="    <testcase name=\"$name\" classname=\"netfault\" status=\"run\" result=\"skipped\">"
            body+="<skipped message=\"netfault_test.sh&#x0A;$message\"/>" ;;
    esac
    body+="</testcase>"$'\n'
  done
  cat > "$XML_OUTPUT_FILE" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="${#CASES[@]}" failures="$fails" errors="0" disabled="0">
  <testsuite name="netfault" tests="${#CASES[@]}" failures="$fails" skipped="$skips">
$body  </testsuite>
</testsuites>
EOF
}

# case_done NAME FAILURES_BEFORE: records the case as passed or failed.
case_done() {
  if (( failures > $2 )); then CASES+=("$1"$'\t'"fail"$'\t'"see the test log"); else CASES+=("$1"$'\t'"pass"$'\t'); fi
}

# One namespace per node, each with a veth pair whose other end is on a
# bridge in a hub namespace: nothing touches the machine's own network.
make_network() {
  ip netns add "$(ns hub)" || return 1
  ip -n "$(ns hub)" link add br0 type bridge && ip -n "$(ns hub)" link set br0 up || return 1
  local n
  for n in "${NODES[@]}"; do
    ip netns add "$(ns "$n")" || return 1
    ip link add "$P${n}a" type veth peer name "$P${n}b" || return 1
    ip link set "$P${n}a" netns "$(ns "$n")" && ip link set "$P${n}b" netns "$(ns hub)" || return 1
    ip -n "$(ns hub)" link set "$P${n}b" master br0 up || return 1
    ip -n "$(ns "$n")" addr add "${IP[$n]}/24" dev "$P${n}a" || return 1
    ip -n "$(ns "$n")" link set "$P${n}a" up && ip -n "$(ns "$n")" link set lo up || return 1
  done
}

# on NODE CMD...: runs CMD in NODE's namespace. (Not for commands started
# in the background: `on ... &` forks a subshell, whose pid is not the
# command's; those call ip netns exec themselves.)
on() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

# start_job NAME EPOCHS [VAR=VALUE...]: the job's processes (a coordinator,
# $SERVERS servers, 2 workers, with $REPLICAS), each bounded (90 s), logs in
# $TMP/NAME-<node>.log, the variables given to every one. $PIDS: the
# workers' last.
start_job() {
  local name=$1 epochs=$2; shift 2
  local env=(env DMLC_NUM_SERVER=$SERVERS DMLC_NUM_WORKER=2 MX_COORDINATOR="$COORDINATOR"
             MX_REPLICAS=$REPLICAS "$@")
  PIDS=()
  local bind="$COORDINATOR" i
  if [[ -n "$DELAY_MS" ]]; then
    bind="${IP[c]}:9001"
    proxy c "$COORDINATOR" "$bind"
  fi
  ip netns exec "$(ns c)" timeout -k 5 90 "${env[@]}" "$SERVER" --role=coordinator --bind="$bind" \
    > "$TMP/$name-c.log" 2>&1 &
  PIDS+=($!)
  for (( i = 0; i < SERVERS; i++ )); do
    local where=(--bind="${IP[s$i]}:0")
    if [[ -n "$DELAY_MS" ]]; then
      where=(--bind="${IP[s$i]}:7001" --advertise="${IP[s$i]}:7000")
      proxy "s$i" "${IP[s$i]}:7000" "${IP[s$i]}:7001"
    fi
    ip netns exec "$(ns "s$i")" timeout -k 5 90 "${env[@]}" MX_RANK=$i "$SERVER" --role=server \
      --coordinator="$COORDINATOR" "${where[@]}" > "$TMP/$name-s$i.log" 2>&1 &
    PIDS+=($!)
  done
  for i in 0 1; do
    ip netns exec "$(ns "w$i")" timeout -k 5 90 "${env[@]}" MX_RANK=$i "$TRAIN" --kvstore=dist_sync --network=mlp \
      --batch_size=20 --lr=0.5 --epochs="$epochs" \
      --train_csv="$TMP/train.csv" --train_label_csv="$TMP/train_labels.csv" \
      --test_csv="$TMP/test.csv" --test_label_csv="$TMP/test_labels.csv" \
      > "$TMP/$name-w$i.log" 2>&1 &
    PIDS+=($!)
  done
}

# proxy NODE LISTEN TARGET: delay_proxy.py in NODE's namespace, $DELAY_MS
# each way.
proxy() {
  ip netns exec "$(ns "$1")" timeout -k 5 120 python3 "$(dirname "$0")/delay_proxy.py" "$2" "$3" "$DELAY_MS" &
  PROXIES+=($!)
}

# wait_job: waits for the job's processes; sets $worker_rcs ("rc0 rc1")
# and $all_rcs (coordinator, servers, workers).
wait_job() {
  local rcs=() pid
  for pid in "${PIDS[@]}"; do wait "$pid"; rcs+=($?); done
  worker_rcs="${rcs[-2]} ${rcs[-1]}"
  all_rcs="${rcs[*]}"
  for pid in "${PROXIES[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  PROXIES=()
}

# checksums NAME: the workers' final parameter checksums, one line.
checksums() {
  cat "$TMP/$1-w0.log" "$TMP/$1-w1.log" | sed -n 's/^Final params checksum=//p' | tr '\n' ' '
}

# nft_in NODE RULE: adds RULE to NODE's output chain (made on first use).
nft_in() {
  local n=$1; shift
  on "$n" nft list table inet mxnf > /dev/null 2>&1 ||
    on "$n" nft add table inet mxnf '{ chain out { type filter hook output priority 0; }; }' || return 1
  on "$n" nft add rule inet mxnf out "$@"
}

# A finished job like the undisturbed one: exit code 0 from each worker,
# the same checksums.
same_result() {
  local name=$1 took=$2
  [[ "$worker_rcs" == "0 0" ]] || { fail "$name: workers exited $worker_rcs"; tail -3 "$TMP/$name-w0.log" "$TMP/$name-w1.log"; return; }
  local got; got=$(checksums "$name")
  [[ "$got" == "$reference" ]] || fail "$name: parameters differ from the undisturbed run: '$got' vs '$reference'"
  echo "$name: finished in ${took} ms with the undisturbed result (undisturbed: ${base_ms} ms)"
}

if ! command -v nft > /dev/null; then
  reason="nft is not installed (Debian's nftables; deploy/setup.sh installs it)"
elif [[ $(id -u) -ne 0 ]] || ! make_network; then
  reason="cannot make network namespaces here (needs root with ip netns)"
fi
if [[ -n "${reason:-}" ]]; then
  echo "skipped: $reason"
  CASES=("loss"$'\t'"skip"$'\t'"$reason" "delay"$'\t'"skip"$'\t'"$reason"
         "partition"$'\t'"skip"$'\t'"$reason" "partition_replicas"$'\t'"skip"$'\t'"$reason")
  write_xml
  exit 0
fi

# undisturbed NAME EPOCHS: runs the job without a fault; sets $reference
# (its checksums) and $base_ms (its time).
undisturbed() {
  local start; start=$(now_ms)
  start_job "$1" "$2"
  wait_job
  base_ms=$(( $(now_ms) - start ))
  reference=$(checksums "$1")
  [[ "$worker_rcs" == "0 0" && -n "$reference" ]] ||
    { fail "$1: the undisturbed job failed (workers exited $worker_rcs)"; tail -5 "$TMP/$1"-*.log; }
}

undisturbed base 5

# Loss: 2% of every node's packets.
before=$failures
for n in "${NODES[@]}"; do nft_in "$n" numgen random mod 100 '<' 2 counter drop || fail "loss: nftables refused the rule"; done
start=$(now_ms)
start_job loss 5
wait_job
same_result loss $(( $(now_ms) - start ))
dropped=0
for n in "${NODES[@]}"; do
  packets=$(on "$n" nft list table inet mxnf | sed -n 's/.*counter packets \([0-9]*\).*/\1/p')
  dropped=$(( dropped + ${packets:-0} ))
  on "$n" nft delete table inet mxnf
done
echo "loss: ${dropped} packets dropped"
(( dropped > 0 )) || fail "loss: no packet was dropped"
case_done loss "$before"

# Delay: 5 ms on every node's link.
if on c tc qdisc add dev "${P}ca" root netem delay 5ms 2>/dev/null; then
  before=$failures
  for n in s0 s1 w0 w1; do on "$n" tc qdisc add dev "$P${n}a" root netem delay 5ms || fail "delay: tc refused netem"; done
  start=$(now_ms)
  start_job delay 5
  wait_job
  same_result delay $(( $(now_ms) - start ))
  for n in "${NODES[@]}"; do on "$n" tc qdisc del dev "$P${n}a" root; done
  case_done delay "$before"
else
  # No netem (CONFIG_NET_SCH_NETEM) in this kernel: the same delay from a
  # proxy in front of every server and the coordinator.
  echo "delay: no netem in this kernel; delaying through tests/chaos/delay_proxy.py"
  before=$failures
  DELAY_MS=5
  start=$(now_ms)
  start_job delay 5
  wait_job
  same_result delay $(( $(now_ms) - start ))
  DELAY_MS=""
  case_done delay "$before"
fi

# partition_w0_s1: worker 0 and server 1 lose each other (both directions).
partition_w0_s1() {
  nft_in w0 ip daddr "${IP[s1]}" drop && nft_in s1 ip daddr "${IP[w0]}" drop ||
    fail "partition: nftables refused the rule"
}
heal() { local n; for n in "${NODES[@]}"; do on "$n" nft delete table inet mxnf 2>/dev/null; done; }

# Partition: worker 0 and server 1 lose each other mid-training (both
# directions). Worker 0's open call fails once its keepalive pings go
# unanswered (rpc::kKeepalive: within 10 s), not at the 30 s RPC deadline.
before=$failures
start_job partition 1000
for _ in $(seq 1 300); do grep -q '^Epoch\[0\]' "$TMP/partition-w0.log" && break; sleep 0.1; done
grep -q '^Epoch\[0\]' "$TMP/partition-w0.log" || fail "partition: no epoch finished"
partition_w0_s1
start=$(now_ms)
wait_job
took=$(( $(now_ms) - start ))
echo "partition: the job ended ${took} ms after the partition (workers exited $worker_rcs)"
(( took <= 22000 )) || fail "partition: the job took ${took} ms to end (keepalive 2 x 5 s, heartbeat timeout 5 s)"
[[ " $all_rcs " != *" 124 "* && " $all_rcs " != *" 137 "* ]] ||
  fail "partition: a process had to be stopped (exit codes $all_rcs: 124 is the test's timeout)"
[[ "${worker_rcs% *}" != 0 ]] || fail "partition: worker 0 exited 0"
grep -qE "^mx_train: .*server 1 \(${IP[s1]}:[0-9]+\): the connection stopped answering \(.*\): server 1 hangs, or the network between worker 0 and server 1 is broken" "$TMP/partition-w0.log" ||
  { fail "partition: worker 0's error does not name server 1 (${IP[s1]})"; tail -3 "$TMP/partition-w0.log"; }
grep "^mx_train: " "$TMP"/partition-w*.log
heal
case_done partition "$before"

# With replicas 2 (3 servers) the same partition fails over: the
# coordinator still reaches server 1, but worker 0 keeps reporting it
# unreachable, so it is declared dead (and stops itself); its keys' backups
# serve them, and the job finishes with the undisturbed result.
before=$failures
SERVERS=3 REPLICAS=2
undisturbed replicas_base 40
start_job replicas_partition 40
for _ in $(seq 1 300); do grep -q '^Epoch\[2\]' "$TMP/replicas_partition-w0.log" && break; sleep 0.1; done
partition_w0_s1
start=$(now_ms)
wait_job
same_result replicas_partition $(( $(now_ms) - start ))
grep -qE "coordinator: server 1 \(${IP[s1]}:[0-9]+\) answers the coordinator, but worker 0 could not reach it for [0-9]+s \(a network partition\?\); declaring it dead" \
  "$TMP/replicas_partition-c.log" || fail "replicas: the coordinator did not declare server 1 dead for the partition"
heal
case_done partition_replicas "$before"

write_xml
echo "$failures failures"
exit $(( failures > 0 ))
