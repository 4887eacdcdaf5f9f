#!/usr/bin/env bash
# Installs the Debian bookworm packages secureinfer builds and tests with. Idempotent: does nothing when all
# packages are present. Needs root (or sudo) only when something is missing.
#   scripts/install-deps.sh              everything the build and the tests need
#   scripts/install-deps.sh --build-only what building secureinfer needs (scripts/run.sh)
set -euo pipefail
BUILD_PKGS=(build-essential cmake g++ pkg-config libcli11-dev nlohmann-json3-dev libcpp-httplib-dev libssl-dev
            libseccomp-dev libgtest-dev libgmock-dev libbenchmark-dev)  # (CMake looks for the test libraries)
PKGS=(build-essential cmake g++ pkg-config
      libgtest-dev libgmock-dev libbenchmark-dev
      libcli11-dev nlohmann-json3-dev libcpp-httplib-dev
      libssl-dev libseccomp-dev
      curl strace libcap2-bin
      clang libclang-rt-14-dev
      python3 python3-jinja2  # the chat-template tests' reference renderer (tests/chat_template_reference.py)
      python3-prometheus-client chromium chromium-driver haproxy)  # /metrics parser, web chat browser test, scale-out
build_only=0
[ "${1:-}" = "--build-only" ] && build_only=1
[ $build_only -eq 1 ] && PKGS=("${BUILD_PKGS[@]}")
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and npm run the OpenAI client test (tests/test_server.cpp); Debian's, unless the machine has its own.
if [ $build_only -eq 0 ] && ! command -v npm >/dev/null 2>&1; then
  for p in nodejs npm; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
