#!/usr/bin/env bash
# Installs what mx needs to build, test and train on Debian 12, as root.
# Idempotent: packages already installed are skipped, and nothing is
# downloaded except Debian packages.
#
#   deploy/setup.sh            build + test dependencies, Fashion-MNIST
#   deploy/setup.sh --bench    also python3-torch, the benchmarks' baseline
set -euo pipefail

PACKAGES=(
  bazel-bootstrap bazel-rules-java pkg-config g++ python3
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libopenblas-dev libgtest-dev libgmock-dev libbenchmark-dev
  zlib1g-dev nlohmann-json3-dev dataset-fashion-mnist openssl
  libmicrohttpd-dev prometheus iproute2 nftables
)
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
echo "setup.sh: all dependencies present"
