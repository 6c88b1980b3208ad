#!/usr/bin/env bash
# Builds everything and runs every test; ends with "N passed, N failed"
# counted from the GoogleTest results of all test targets.
set -uo pipefail
cd "$(dirname "$0")/.."

bazel_flags=(--disk_cache="${HOME}/.cache/mx-bazel-disk")
bazel build "${bazel_flags[@]}" //... || { echo "0 passed, 1 failed"; exit 1; }
bazel test "${bazel_flags[@]}" //... 
status=$?

passed=0
failed=0
while IFS= read -r xml; do
  # The first <testsuites ...> element carries the totals of one target.
  header=$(grep -m1 -o '<testsuites[^>]*>' "$xml" || true)
  tests=$(sed -n 's/.* tests="\([0-9]*\)".*/\1/p' <<<"$header")
  failures=$(sed -n 's/.* failures="\([0-9]*\)".*/\1/p' <<<"$header")
  errors=$(sed -n 's/.* errors="\([0-9]*\)".*/\1/p' <<<"$header")
  disabled=$(sed -n 's/.* disabled="\([0-9]*\)".*/\1/p' <<<"$header")
  bad=$(( ${failures:-0} + ${errors:-0} ))
  passed=$(( passed + ${tests:-0} - bad - ${disabled:-0} ))
  failed=$(( failed + bad ))
done < <(find -L bazel-testlogs/ -name test.xml 2>/dev/null)

# A target that failed without writing results (a crash, a timeout) still
# counts as a failure.
if [[ $status -ne 0 && $failed -eq 0 ]]; then failed=1; fi
echo "${passed} passed, ${failed} failed"
exit $status
