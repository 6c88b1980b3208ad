#!/usr/bin/env bash
# Builds everything and runs every test; ends with "N passed, N failed,
# N skipped" counted from the GoogleTest results of all test targets, after
# one line per target with skipped tests giving its reason (GPU tests skip
# where no GPU is usable).
set -uo pipefail
cd "$(dirname "$0")/.."

bazel_flags=(--disk_cache="${HOME}/.cache/mx-bazel-disk")
bazel build "${bazel_flags[@]}" //... || { echo "0 passed, 1 failed, 0 skipped"; exit 1; }
bazel test "${bazel_flags[@]}" //... 
status=$?

passed=0
failed=0
skipped=0
while IFS= read -r xml; do
  # The first <testsuites ...> element carries the totals of one target
  # (GoogleTest's results, and a shell test's skip); Bazel's own results of
  # a shell test carry them on its <testsuite> elements instead.
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
    target=${xml#bazel-testlogs/}
    echo "skipped ${skips} in ${target%/test.xml}: ${reason:-see its test.log}"
  fi
done < <(find -L bazel-testlogs/ -name test.xml 2>/dev/null)

# What each failed test said, last, where a log's tail shows it (CI keeps
# the end of a long log).
if [[ $status -ne 0 ]]; then
  find -L bazel-testlogs/ -name test.xml 2>/dev/null | python3 tests/print_failures.py
fi

# A target that failed without writing results (a crash, a timeout) still
# counts as a failure.
if [[ $status -ne 0 && $failed -eq 0 ]]; then failed=1; fi
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
exit $status
