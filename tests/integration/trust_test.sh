#!/usr/bin/env bash
# Trust: an outsider with the public mx.proto attacks a running dist_sync
# job (tests/integration/intruder.cc: pull the weights, push 1e4 into key
# 0, set the learning rate to 1000, heartbeat and leave for the workers),
# with no token, a wrong token, and the right token claiming worker 0's
# rank. Every attack must be refused (UNAUTHENTICATED or
# PERMISSION_DENIED), each daemon must log a refusal once per peer and
# reason and report how many it refused, and the job's final weights must
# be bit-identical to those of an undisturbed run. A job with --tls gives
# the same weights too, refuses a plaintext caller at the handshake, and
# leaves no secret behind.
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"; INTRUDER="$4"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

EPOCHS=60
printf 'a-token-this-test-knows\n' > "$TMP/token"
chmod 600 "$TMP/token"
train=("${worker[@]}" --epochs=$EPOCHS --seed=3)

# 1. The undisturbed run.
log="$TMP/calm.log"
start_job "$log" -n 2 -s 1 --token-file "$TMP/token" -- "${train[@]}" --checkpoint_prefix="$TMP/calm"
wait "$launcher" || fail "the undisturbed job failed: $(tail -5 "$log")"
final=$(printf '%04d' $EPOCHS)
[[ -s "$TMP/calm-$final.params" ]] || fail "the undisturbed job wrote no checkpoint of epoch $EPOCHS"

# 2. The same job, attacked while it trains.
log="$TMP/attacked.log"
start_job "$log" -n 2 -s 1 --token-file "$TMP/token" -- "${train[@]}" --checkpoint_prefix="$TMP/attacked"
wait_for_line "$log" '^\[worker [01]\] Epoch\[0\]' 60 || fail "the attacked job trained no epoch"
coordinator=$(sed -n 's/^\[coordinator\] coordinator listening on \(127\.0\.0\.1:[0-9]*\).*/\1/p' "$log" | head -1)
server=$(sed -n 's/^\[server 0\] server 0 serving on \(127\.0\.0\.1:[0-9]*\).*/\1/p' "$log" | head -1)
"$INTRUDER" --coordinator="$coordinator" --server="$server" --workers=2 --token_file="$TMP/token" \
  > "$TMP/intruder.log" 2>&1
rc=$?
cat "$TMP/intruder.log"
[[ $rc -eq 0 ]] || fail "an attack went through (intruder exit code $rc)"
[[ $(grep -c '^refused: ' "$TMP/intruder.log") -eq 18 ]] || fail "not all 18 attacks were made and refused"
grep -q "Epoch\[$((EPOCHS - 1))\]" "$log" && fail "the job ended before the attacks did (make it longer)"
wait "$launcher" || fail "the attacked job failed: $(tail -5 "$log")"
cmp -s "$TMP/calm-$final.params" "$TMP/attacked-$final.params" ||
  fail "the attacked job's weights differ from the undisturbed job's"
# Counted and logged once per peer and reason (two reasons, one peer).
for daemon in coordinator "server 0"; do
  grep -q "^\[$daemon\] .*: refused 9 call(s) without the job's token or the caller's identity$" "$log" ||
    fail "$daemon did not report 9 refusals: $(grep "^\[$daemon\]" "$log" | tail -3)"
  n=$(grep -c "^\[$daemon\] refused a call from ipv4:127\.0\.0\.1:" "$log")
  [[ $n -eq 2 ]] || fail "$daemon logged $n refusals, not one per reason (2)"
done
grep -q "^\[worker 0\] Final test accuracy=" "$log" || fail "worker 0 did not finish"
assert_nothing_left "$log"

# 3. Mutual TLS: the same weights; a plaintext caller is refused at the
# handshake; the job's private directory (token, keys) is gone afterwards.
log="$TMP/tls.log"
start_job "$log" -n 2 -s 1 --tls -- "${train[@]}" --checkpoint_prefix="$TMP/tls"
wait_for_line "$log" '^\[worker [01]\] Epoch\[0\]' 60 || fail "the TLS job trained no epoch"
coordinator=$(sed -n 's/^\[coordinator\] coordinator listening on \(127\.0\.0\.1:[0-9]*\).*/\1/p' "$log" | head -1)
server=$(sed -n 's/^\[server 0\] server 0 serving on \(127\.0\.0\.1:[0-9]*\).*/\1/p' "$log" | head -1)
"$INTRUDER" --coordinator="$coordinator" --server="$server" --workers=2 > "$TMP/intruder_tls.log" 2>&1
[[ $(grep -c '^NOT REFUSED: .*code 14 ' "$TMP/intruder_tls.log") -eq 12 ]] ||
  fail "plaintext calls to a TLS job did not all fail to connect: $(cat "$TMP/intruder_tls.log")"
secret_dir=$(tr '\0' '\n' < "/proc/$(started_pid "$log" "server 0")/environ" 2>/dev/null |
             sed -n 's/^MX_TLS_CA=\(.*\)\/ca\.pem$/\1/p')
[[ -n "$secret_dir" ]] || fail "the TLS job's server has no MX_TLS_CA"
perm=$(stat -c %a "$secret_dir" 2>/dev/null)
[[ "$perm" == 700 ]] || fail "the job's secret directory has mode $perm"
[[ $(stat -c %a "$secret_dir/token") == 600 && $(stat -c %a "$secret_dir/server-0.key") == 600 ]] ||
  fail "the job's secrets are readable by others: $(ls -l "$secret_dir")"
wait "$launcher" || fail "the TLS job failed: $(tail -5 "$log")"
cmp -s "$TMP/calm-$final.params" "$TMP/tls-$final.params" ||
  fail "the TLS job's weights differ from the plaintext job's"
[[ -e "$secret_dir" ]] && fail "the job's secrets ($secret_dir) outlived it"
assert_nothing_left "$log"

# 4. Bad TLS settings stop a daemon at once, naming the flag or variable.
out=$(timeout 10 "$SERVER" --role=server --coordinator=127.0.0.1:1 --num_workers=1 \
      --tls_cert=/nonexistent/cert.pem --tls_key=/x --tls_ca=/y 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"--tls_cert: cannot read /nonexistent/cert.pem"* ]] ||
  fail "--tls_cert of no file: exit code $rc, said: $out"
out=$(MX_TLS_CERT=/nonexistent/cert.pem timeout 10 "$SERVER" --role=server \
      --coordinator=127.0.0.1:1 --num_workers=1 --tls_key=/x 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"(MX_TLS_CERT, --tls_key, MX_TLS_CA): give all three or none"* ]] ||
  fail "two of three TLS files: exit code $rc, said: $out"
# Files that hold no certificate: named at start (gRPC's server had said
# only "cannot listen on 127.0.0.1:0").
echo "not a certificate" > "$TMP/garbage.pem"
out=$(timeout 10 "$SERVER" --role=server --coordinator=127.0.0.1:1 --num_workers=1       --tls_cert="$TMP/garbage.pem" --tls_key="$TMP/garbage.pem" --tls_ca="$TMP/garbage.pem" 2>&1)
rc=$?
[[ $rc -eq 2 && "$out" == *"TLS: the certificate is not a PEM certificate"*"(--tls_cert $TMP/garbage.pem,"* ]] ||
  fail "TLS files of garbage: exit code $rc, said: $out"

finish
