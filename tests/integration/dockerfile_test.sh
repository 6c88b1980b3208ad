#!/usr/bin/env bash
# deploy/Dockerfile's runtime image installs exactly the Debian packages of
# the shared libraries that mx_server and mx_train link (beyond those of
# debian:12-slim), plus the default training data: a library added to the
# build without its package would make every pod fail at start, and no
# Docker daemon runs here to find that out by building the image. Also: the
# build stage builds and copies both binaries, and .dockerignore keeps
# Bazel's output links out of the build context. And the image is pinned
# (base images, apt snapshot, package versions), with the build's
# dependencies in a layer of their own.
set -uo pipefail
DOCKERFILE="$1"; DOCKERIGNORE="$2"; SERVER="$3"; TRAIN="$4"
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# The final stage's `apt-get install` arguments, options left out.
listed=$(python3 - "$DOCKERFILE" <<'EOF'
import re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
final = re.split(r"^FROM ", text, flags=re.M)[-1]
packages = set()
for run in re.findall(r"^RUN (.*)$", final, flags=re.M):
    for command in run.split("&&"):
        words = command.split()
        if words[:2] == ["apt-get", "install"]:
            packages.update(w.split("=")[0] for w in words[2:] if not w.startswith("-"))
print("\n".join(sorted(packages)))
EOF
)
[[ -n "$listed" ]] || fail "no apt-get install in the Dockerfile's final stage"

# The libraries the binaries link, and the package of each, whichever of
# /lib and /usr/lib (one directory since usrmerge) dpkg recorded it under.
# CUDA's (under /usr/local/cuda) are left out: the image is built without
# it, as on any machine that lacks it.
needed=$(for b in "$SERVER" "$TRAIN"; do ldd "$b"; done |
         awk '/=> \// {print $3}' | grep -v '^/usr/local/cuda/' | sort -u |
         python3 -c '
import os, subprocess, sys
libs = sys.stdin.read().split()
def variants(lib):
    for p in (lib, os.path.realpath(lib)):
        yield p
        yield p[len("/usr"):] if p.startswith("/usr/") else "/usr" + p
candidates = sorted({v for lib in libs for v in variants(lib)})
out = subprocess.run(["dpkg", "-S"] + candidates, capture_output=True, text=True).stdout
owner = {}
for line in out.splitlines():
    pkg, _, path = line.partition(": ")
    owner[path] = pkg.split(":")[0]
for lib in libs:
    pkg = next((owner[v] for v in variants(lib) if v in owner), None)
    print(pkg or "UNOWNED:" + lib)
' | sort -u)
[[ -n "$needed" ]] || fail "ldd found no libraries"
base="libc6 libgcc-s1 libstdc++6"  # in debian:12-slim already
for pkg in $needed; do
  [[ "$pkg" == UNOWNED:* ]] && { fail "no Debian package owns ${pkg#UNOWNED:}"; continue; }
  [[ " $base " == *" $pkg "* ]] && continue
  grep -qx "$pkg" <<<"$listed" || fail "the image lacks $pkg (a library of mx_server or mx_train)"
done
for pkg in $listed; do
  [[ "$pkg" == dataset-fashion-mnist ]] && continue
  grep -qx "$pkg" <<<"$needed" || fail "the image installs $pkg, which neither binary links"
done
grep -qx dataset-fashion-mnist <<<"$listed" || fail "the image lacks the default training data"

# Pinned: base images to a point release, apt to a snapshot of the archive,
# every runtime package to a version. A pin that differs from the version
# installed here is printed (the image follows its snapshot, not this
# machine).
grep -qE '^FROM debian:12\.[0-9]+ AS build$' "$DOCKERFILE" || fail "the build stage's base is not pinned"
grep -qE '^FROM debian:12\.[0-9]+-slim$' "$DOCKERFILE" || fail "the runtime stage's base is not pinned"
grep -qE '^ARG SNAPSHOT=[0-9]{8}T[0-9]{6}Z$' "$DOCKERFILE" || fail "apt is not pinned to a snapshot"
[[ $(grep -c 'http://snapshot.debian.org' "$DOCKERFILE") -eq 2 ]] || fail "not every stage installs from the snapshot"
pins=$(python3 - "$DOCKERFILE" <<'EOF'
import re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
final = re.split(r"^FROM ", text, flags=re.M)[-1]
for command in " ".join(re.findall(r"^RUN (.*)$", final, flags=re.M)).split("&&"):
    words = command.split()
    if words[:2] == ["apt-get", "install"]:
        print("\n".join(w for w in words[2:] if not w.startswith("-")))
EOF
)
[[ $(wc -w <<<"$pins") -ge 20 ]] || fail "found only $(wc -w <<<"$pins") runtime packages to check"
for pin in $pins; do
  [[ "$pin" == *=* ]] || { fail "the runtime package $pin is not pinned to a version"; continue; }
  here=$(dpkg-query -W -f='${Version}' "${pin%%=*}" 2>/dev/null)
  [[ -z "$here" || "$here" == "${pin#*=}" ]] || echo "note: the image pins $pin; this machine has $here"
done
# The build's dependencies come before the sources, in their own layer.
copy_setup=$(grep -n '^COPY deploy/setup.sh deploy/setup.sh$' "$DOCKERFILE" | cut -d: -f1)
run_setup=$(grep -n '^RUN bash deploy/setup.sh$' "$DOCKERFILE" | cut -d: -f1)
copy_all=$(grep -n '^COPY \. \.$' "$DOCKERFILE" | cut -d: -f1)
[[ -n "$copy_setup" && -n "$run_setup" && -n "$copy_all" && $copy_setup -lt $run_setup &&
   $run_setup -lt $copy_all ]] || fail "setup.sh does not run in a layer before the sources are copied"

# The build stage's `RUN bash deploy/setup.sh` succeeds with only what the
# Dockerfile copied before it (the tests, and so the Kubernetes schema
# validators' package files, come later): run as it would be, as root, with
# stand-ins for dpkg-query (nothing installed), apt-get and npm on PATH.
setup_dir=$(dirname "$DOCKERFILE")
[[ -f "$setup_dir/setup.sh" ]] || setup_dir=$(dirname "$(readlink -f "$DOCKERFILE")")
if [[ ! -f "$setup_dir/setup.sh" ]]; then
  fail "no deploy/setup.sh beside the Dockerfile (is //deploy:setup.sh in the test's data?)"
else
  ctx=$(mktemp -d); stubs=$(mktemp -d)
  copies=$(python3 - "$DOCKERFILE" <<'EOF2'
import sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
for line in text.splitlines():
    if line.startswith("RUN bash deploy/setup.sh"):
        break
    words = line.split()
    if words[:1] == ["COPY"]:
        print(" ".join(words[1:]))
EOF2
)
  [[ "$copies" == "deploy/setup.sh deploy/setup.sh" ]] ||
    fail "the build stage copies more than setup.sh before running it ($copies): copy that here too"
  mkdir -p "$ctx/deploy" && cp "$setup_dir/setup.sh" "$ctx/deploy/setup.sh"
  printf '#!/bin/sh\nexit 1\n' > "$stubs/dpkg-query"
  printf '#!/bin/sh\necho "apt-get $*" >> "%s/calls"\n' "$stubs" > "$stubs/apt-get"
  printf '#!/bin/sh\necho "npm $*" >> "%s/calls"\nexit 1\n' "$stubs" > "$stubs/npm"
  printf '#!/bin/sh\n[ "$1" = -u ] && { echo 0; exit 0; }\nexec /usr/bin/id "$@"\n' > "$stubs/id"
  chmod +x "$stubs"/*
  out=$(cd "$ctx" && PATH="$stubs:$PATH" timeout 60 bash deploy/setup.sh 2>&1)
  rc=$?
  [[ $rc -eq 0 && "$out" == *"setup.sh: all dependencies present"* ]] ||
    fail "deploy/setup.sh alone, as the image's build runs it: exit code $rc, said: $out"
  grep -q "^apt-get install .* libgrpc++-dev" "$stubs/calls" 2>/dev/null ||
    fail "deploy/setup.sh alone did not install the build's packages: $(cat "$stubs/calls" 2>/dev/null)"
  ! grep -q "^npm" "$stubs/calls" 2>/dev/null || fail "deploy/setup.sh alone ran npm: $(grep ^npm "$stubs/calls")"
  rm -rf "$ctx" "$stubs"
fi

grep -q 'bazel build //server:mx_server //worker:mx_train' "$DOCKERFILE" || fail "build stage does not build both binaries"
grep -q 'install -D -t /out bazel-bin/server/mx_server bazel-bin/worker/mx_train' "$DOCKERFILE" ||
  fail "build stage does not copy both binaries"
grep -q 'COPY --from=build /out/ /usr/local/bin/' "$DOCKERFILE" || fail "binaries not in /usr/local/bin"
grep -qx 'bazel-\*' "$DOCKERIGNORE" || fail ".dockerignore does not leave out bazel-*"

echo "$failures failures"
exit $(( failures > 0 ))
