#!/usr/bin/env bash
# Installs what mx needs to build, test and train on Debian 12, as root.
# Idempotent: packages already installed are skipped, and nothing is
# downloaded except Debian packages and, for one test, two npm packages:
# the validators of the Kubernetes schemas (tests/integration/k8s_schema,
# versions pinned by its package-lock.json), installed in
# /usr/local/lib/mx-k8s-schema. Without the npm registry that test skips,
# saying why; without the tests (the Docker image's build copies only this
# script), neither they nor Node.js are installed.
#
#   deploy/setup.sh            build + test dependencies, Fashion-MNIST
#   deploy/setup.sh --bench    also python3-torch, the benchmarks' baseline
set -euo pipefail

PACKAGES=(
  bazel-bootstrap bazel-rules-java pkg-config g++ python3
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libopenblas-dev libdnnl-dev libgtest-dev libgmock-dev libbenchmark-dev
  zlib1g-dev nlohmann-json3-dev dataset-fashion-mnist openssl libssl-dev libipsec-mb-dev
  libmicrohttpd-dev prometheus iproute2 nftables
)
# The Kubernetes schema validators' sources, as package-lock.json pins
# them. Absent where only this script was copied (deploy/Dockerfile's build
# stage, which runs no tests): then neither they nor Node.js are installed.
SCHEMA_SRC="$(dirname "$0")/../tests/integration/k8s_schema"
SCHEMA_DIR=/usr/local/lib/mx-k8s-schema
[[ -f "$SCHEMA_SRC/package-lock.json" ]] && schema=1 || schema=0
# Node.js from Debian, unless a node and npm are installed already.
if ((schema)) && { ! command -v node >/dev/null || ! command -v npm >/dev/null; }; then
  PACKAGES+=(nodejs npm)
fi
if [[ "${1:-}" == "--bench" ]]; then
  PACKAGES+=(python3 python3-torch python3-numpy)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} > 0)); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh: missing packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Kubernetes schema validators, as package-lock.json pins them.
if ((schema)) && [[ $(id -u) -eq 0 ]] &&
   ! cmp -s "$SCHEMA_SRC/package-lock.json" "$SCHEMA_DIR/package-lock.json"; then
  mkdir -p "$SCHEMA_DIR"
  cp "$SCHEMA_SRC/package.json" "$SCHEMA_SRC/package-lock.json" "$SCHEMA_DIR/"
  if ! timeout 300 npm ci --prefix "$SCHEMA_DIR" --no-audit --no-fund --loglevel=error >/dev/null; then
    rm -f "$SCHEMA_DIR/package-lock.json"  # tried again next time
    echo "setup.sh: npm ci of the Kubernetes schema validators failed; k8s_schema_test will skip" >&2
  fi
fi
echo "setup.sh: all dependencies present"
