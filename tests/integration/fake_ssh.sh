#!/usr/bin/env bash
# Stands in for ssh in the launcher's test: `fake_ssh.sh [-tt] [-o OPT]...
# HOST COMMAND` logs "HOST<TAB>COMMAND" to $FAKE_SSH_LOG and runs COMMAND
# here, in a clean environment (as a remote shell would: only what the
# command sets itself). With $FAKE_SSH_TTY_LOG set, also logs whether its
# stdin is a terminal ("tty", "no tty"): ssh -tt would put that terminal in
# raw mode. Its exit code is ssh's: the command's, or 255 where the command
# (the remote shell) was killed by a signal.
set -u
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    -o) shift 2 ;;
    *) shift ;;
  esac
done
host="$1"; shift
printf '%s\t%s\n' "$host" "$*" >> "$FAKE_SSH_LOG"
if [[ -n "${FAKE_SSH_TTY_LOG:-}" ]]; then
  if [[ -t 0 ]]; then echo tty; else echo "no tty"; fi >> "$FAKE_SSH_TTY_LOG"
fi
# bash's $? cannot tell a death by signal N from an exit with 128 + N;
# Python's returncode can.
exec python3 -c '
import subprocess, sys
code = subprocess.call(sys.argv[1:])
sys.exit(255 if code < 0 else code)
' env -i PATH="$PATH" HOME="${HOME:-/tmp}" bash -c "$*"
