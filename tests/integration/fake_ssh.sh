#!/usr/bin/env bash
# Stands in for ssh in the launcher's test: `fake_ssh.sh [-tt] [-o OPT]...
# HOST COMMAND` logs "HOST<TAB>COMMAND" to $FAKE_SSH_LOG and runs COMMAND
# here, in a clean environment (as a remote shell would: only what the
# command sets itself).
set -u
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    -o) shift 2 ;;
    *) shift ;;
  esac
done
host="$1"; shift
printf '%s\t%s\n' "$host" "$*" >> "$FAKE_SSH_LOG"
exec env -i PATH="$PATH" HOME="${HOME:-/tmp}" bash -c "$*"
