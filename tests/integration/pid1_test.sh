#!/usr/bin/env bash
# Workers, servers and the coordinator stop on SIGTERM as PID 1 of a PID
# namespace, as in a container (where the kernel drops signals that PID 1
# leaves at their default action): each ends within 5 s, saying so. A
# server still waiting to register stops too. Skipped, with the reason,
# where PID namespaces cannot be made.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

source "$(dirname "$0")/../testdata/skip.sh"
if ! why=$(unshare --pid --fork true 2>&1); then
  skip_test pid1_test Pid1StopsOnSigterm "cannot create a PID namespace here: $why"
fi

# pid1_stops NAME LOG EXPECT CMD...: runs CMD as PID 1 of a new PID
# namespace, waits until LOG shows EXPECT (it is running; "": a second),
# SIGTERMs it and checks that it ends within 5 s.
pid1_stops() {
  local name=$1 log=$2 expect=$3; shift 3
  unshare --pid --fork --kill-child "$@" > "$log" 2>&1 &
  local outer=$!
  if [[ -z "$expect" ]]; then
    sleep 1
  elif ! wait_for_line "$log" "$expect" 30; then
    fail "$name never showed '$expect': $(tail -3 "$log")"
    kill -9 "$outer" 2>/dev/null
    return
  fi
  local inner
  inner=$(pgrep -P "$outer" | head -1)
  local start
  start=$(now_ms)
  kill -TERM "$inner"
  local waited=0
  while kill -0 "$outer" 2>/dev/null && (( waited < 50 )); do sleep 0.1; waited=$((waited + 1)); done
  if kill -0 "$outer" 2>/dev/null; then
    fail "$name as PID 1 ignored SIGTERM (still running 5 s later)"
    kill -9 "$outer" 2>/dev/null
    return
  fi
  wait "$outer"
  PID1_RC=$?
  echo "$name as PID 1 stopped $(( $(now_ms) - start )) ms after SIGTERM: $(tail -1 "$log")"
}

port=$(free_port)
pid1_stops coordinator "$TMP/coordinator.log" "coordinator listening" \
  "$SERVER" --role=coordinator --bind=127.0.0.1:$port --num_servers=1 --num_workers=1
grep -q "coordinator: shutting down (SIGTERM)" "$TMP/coordinator.log" ||
  fail "the coordinator did not say it stopped on SIGTERM: $(cat "$TMP/coordinator.log")"
# Not 0: a stop before the job finished is no success (Kubernetes would
# call the pod Succeeded and never replace it).
[[ $PID1_RC -eq 143 ]] || fail "the coordinator stopped by SIGTERM exited $PID1_RC, not 143"

# A server that cannot register yet (nothing listens at the coordinator's
# address) stops as well.
port=$(free_port)
MX_STARTUP_TIMEOUT_S=300 pid1_stops "registering server" "$TMP/server.log" "" \
  "$SERVER" --role=server --coordinator=127.0.0.1:$port --num_workers=1
grep -q "mx_server: stopping (SIGTERM) before serving" "$TMP/server.log" ||
  fail "the registering server did not say it stopped: $(cat "$TMP/server.log")"

# A worker in training (alone: local store, many epochs).
local_worker=("${worker[@]/--kvstore=dist_sync/--kvstore=local}")
pid1_stops worker "$TMP/worker.log" 'Epoch\[0\]' "${local_worker[@]}" --epochs=1000
grep -q "mx_train: stopping (SIGTERM)" "$TMP/worker.log" ||
  fail "the worker did not say it stopped: $(tail -3 "$TMP/worker.log")"

finish
