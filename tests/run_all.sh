#!/usr/bin/env bash
# Builds everything and runs every test; ends with "N passed, N failed,
# N skipped" counted from the GoogleTest results of the test targets this
# run tested, after one line per target with skipped tests giving its
# reason (GPU tests skip where no GPU is usable).
#
# Which results: the test.xml files named by this `bazel test`'s build
# event stream (--build_event_json_file), one per target, shard and run
# (the last attempt of a flaky one), cached results included. Not a walk
# of bazel-testlogs/, which keeps the run_N_of_M/ and shard_N_of_M/ folders
# of earlier invocations and the folders of targets since removed.
#
# Sourced (`source tests/run_all.sh`), it only defines its functions, so
# that test_xmls and count_results can be tried on a fake tree.
set -uo pipefail

# test_xmls BEP_JSON: the path of each test.xml the build event stream
# BEP_JSON names, one a line: per target, run and shard, that of its last
# attempt (an earlier attempt of a flaky test keeps its own results under
# test_attempts/, and the last one decides).
test_xmls() {
  python3 - "$1" <<'PY'
import json, sys, urllib.parse

last = {}  # (label, configuration, run, shard) -> (attempt, test.xml path or None)
try:
    lines = open(sys.argv[1], encoding="utf-8", errors="replace")
except OSError:
    sys.exit(0)
for line in lines:
    try:
        event = json.loads(line)
    except ValueError:
        continue
    if not isinstance(event, dict):
        continue
    tid = event.get("id", {}).get("testResult")
    result = event.get("testResult")
    if tid is None or result is None:
        continue
    key = (tid.get("label"), json.dumps(tid.get("configuration"), sort_keys=True),
           tid.get("run", 0), tid.get("shard", 0))
    attempt = tid.get("attempt", 0)
    xml = None
    for out in result.get("testActionOutput", []):
        uri = out.get("uri", "")
        if out.get("name") == "test.xml" and uri.startswith("file://"):
            xml = urllib.parse.unquote(uri[len("file://"):])
    if key not in last or attempt >= last[key][0]:
        last[key] = (attempt, xml)
for key in sorted(last, key=lambda k: (str(k[0]), k[1], int(k[2] or 0), int(k[3] or 0))):
    if last[key][1]:
        print(last[key][1])
PY
}

# count_results: reads test.xml paths, one a line, on stdin; adds their
# totals to passed, failed and skipped, and prints one line per file with
# skipped tests giving the reason.
count_results() {
  local xml header tests failures errors disabled skips bad reason target
  while IFS= read -r xml; do
    [[ -n $xml && -f $xml ]] || continue
    # The first <testsuites ...> element carries the totals of one target
    # (GoogleTest's results, and a shell test's skip); Bazel's own results
    # of a shell test carry them on its <testsuite> elements instead.
    header=$(grep -m1 -o '<testsuites[^>]*>' "$xml" || true)
    if [[ "$header" != *' tests="'* ]]; then
      header=$(grep -o '<testsuite [^>]*>' "$xml" | awk '
        { for (i = 1; i <= NF; i++) if (split($i, kv, "=") == 2) { gsub(/[">]/, "", kv[2]); sum[kv[1]] += kv[2] } }
        END { printf "<testsuites tests=\"%d\" failures=\"%d\" errors=\"%d\" disabled=\"%d\">",
              sum["tests"], sum["failures"], sum["errors"], sum["disabled"] }')
    fi
    tests=$(sed -n 's/.* tests="\([0-9]*\)".*/\1/p' <<<"$header")
    failures=$(sed -n 's/.* failures="\([0-9]*\)".*/\1/p' <<<"$header")
    errors=$(sed -n 's/.* errors="\([0-9]*\)".*/\1/p' <<<"$header")
    disabled=$(sed -n 's/.* disabled="\([0-9]*\)".*/\1/p' <<<"$header")
    skips=$(grep -c 'result="skipped"' "$xml" || true)
    bad=$(( ${failures:-0} + ${errors:-0} ))
    passed=$(( passed + ${tests:-0} - bad - ${disabled:-0} - ${skips:-0} ))
    failed=$(( failed + bad ))
    skipped=$(( skipped + ${skips:-0} ))
    if (( ${skips:-0} > 0 )); then
      # The reason is the message's second line (the first names the file).
      reason=$(grep -m1 -A1 '<skipped message=' "$xml" | sed -n 's/.*&#x0A;\([^"<]*\).*/\1/p' | head -1)
      # The target's folder under bazel-testlogs/ (with a shard's or a
      # run's folder where it has them).
      target=${xml#*testlogs/}
      echo "skipped ${skips} in ${target%/test.xml}: ${reason:-see its test.log}"
    fi
  done
}

main() {
  cd "$(dirname "$0")/.." || exit 1
  bep=$(mktemp "${TMPDIR:-/tmp}/mx-run_all-bep.XXXXXX.json") || exit 1
  trap 'rm -f "$bep"' EXIT

  local bazel_flags=(--disk_cache="${HOME}/.cache/mx-bazel-disk")
  bazel build "${bazel_flags[@]}" //... || { echo "0 passed, 1 failed, 0 skipped"; exit 1; }
  bazel test "${bazel_flags[@]}" --build_event_json_file="$bep" //...
  local status=$?

  local xmls
  xmls=$(test_xmls "$bep")
  passed=0
  failed=0
  skipped=0
  count_results <<<"$xmls"

  # What each failed test said, last, where a log's tail shows it (CI keeps
  # the end of a long log).
  if [[ $status -ne 0 && -n $xmls ]]; then
    python3 tests/print_failures.py <<<"$xmls"
  fi

  # A target that failed without writing results (a crash, a timeout) still
  # counts as a failure.
  if [[ $status -ne 0 && $failed -eq 0 ]]; then failed=1; fi
  echo "${passed} passed, ${failed} failed, ${skipped} skipped"
  exit $status
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
