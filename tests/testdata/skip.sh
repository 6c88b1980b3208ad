# Sourced by shell tests. skip_test SUITE CASE REASON: prints REASON, and
# writes $XML_OUTPUT_FILE as GoogleTest would for one skipped case, so that
# tests/run_all.sh counts the skip and prints its reason (the message's
# second line); then exits 0.
skip_test() {
  local suite=$1 case=$2 reason=$3
  echo "skipped: $reason"
  if [[ -n "${XML_OUTPUT_FILE:-}" ]]; then
    reason=${reason//&/&amp;}; reason=${reason//</&lt;}; reason=${reason//>/&gt;}
    reason=${reason//\"/&quot;}
    cat > "$XML_OUTPUT_FILE" <<XML
<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="1" failures="0" disabled="0" errors="0">
  <testsuite name="$suite" tests="1" failures="0">
    <testcase name="$case" result="skipped"><skipped message="$suite.sh&#x0A;$reason"/></testcase>
  </testsuite>
</testsuites>
XML
  fi
  exit 0
}
