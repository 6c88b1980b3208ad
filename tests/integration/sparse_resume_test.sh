#!/usr/bin/env bash
# The click-through model with row-sparse tables through dist_sync (2
# servers, 2 workers, SGD with momentum, whose state lives on the servers):
# a job that checkpoints after epoch 1 and a new job resumed from that
# checkpoint end with an epoch-2 checkpoint equal, byte for byte, to that
# of a job that ran both epochs: the dense parameters, the servers'
# optimizer state and the tables (written a range of rows at a time by
# worker 0, restored by it with AssignRows while the other waits).
set -uo pipefail
LAUNCH="$1"; SERVER="$2"; TRAIN="$3"; GEN="$4"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
source "$(dirname "$0")/lib.sh"

click_logs "$GEN" 8000 1000

log="$TMP/whole.log"
start_job "$log" -n 2 -s 2 -- "${ctr[@]}" --epochs=2 --checkpoint_prefix="$TMP/whole"
wait "$launcher" || fail "the uninterrupted job failed: $(tail -3 "$log")"
assert_nothing_left "$log"

log="$TMP/first.log"
start_job "$log" -n 2 -s 2 -- "${ctr[@]}" --epochs=1 --checkpoint_prefix="$TMP/part"
wait "$launcher" || fail "the first epoch's job failed: $(tail -3 "$log")"
assert_nothing_left "$log"
[[ -s "$TMP/part-0001.tables" ]] || fail "the checkpoint of epoch 1 has no tables file"

log="$TMP/resumed.log"
start_job "$log" -n 2 -s 2 -- "${ctr[@]}" --epochs=2 --checkpoint_prefix="$TMP/part" --resume_epoch=1
wait "$launcher" || fail "the resumed job failed: $(tail -3 "$log")"
grep -q "^\[worker 0\] Epoch\[0\]" "$log" && fail "the resumed job trained epoch 0 again"
assert_nothing_left "$log"
for f in 0002.params 0002.states 0002.tables; do
  cmp -s "$TMP/whole-$f" "$TMP/part-$f" || fail "the resumed job's $f differs from the uninterrupted job's"
done
finish
