#!/usr/bin/env bash
# Fetches and builds a pinned, CPU-only llama.cpp that serves as the external reference for GGUF interop and
# speed comparisons. Nothing of llama.cpp is kept in this repository: the source comes from the npm package
# node-llama-cpp (which ships llama.cpp as a git bundle at package/llama/gitRelease.bundle) and everything lands
# in a cache directory outside the repository.
#
# Usage:
#   scripts/llamacpp.sh [build]   fetch + build (idempotent; a no-op when up to date), then print the bin directory
#   scripts/llamacpp.sh bindir    print the bin directory (exit 1 if the tools are not built yet)
#   scripts/llamacpp.sh srcdir    print the llama.cpp source directory (exit 1 if not fetched yet)
#   scripts/llamacpp.sh fetch     only download and unpack the source
#   scripts/llamacpp.sh clean     remove the build directory (keeps the download and the source tree)
#
# Environment:
#   SI_LLAMACPP_DIR    cache directory (default $HOME/.cache/secureinfer/llama.cpp)
#   SI_LLAMACPP_JOBS   parallel build jobs (default 2)
#   SI_LLAMACPP_NO_APT set to 1 to never call apt-get for missing build tools
#
# Layout under $SI_LLAMACPP_DIR: npm/ (package tarball), src/ (llama.cpp tree), build/, build/bin/ (tools).
# Only the bin directory is written to stdout; progress goes to stderr.
set -euo pipefail

NPM_PKG="node-llama-cpp"
NPM_VERSION="3.21.1"
# llama.cpp commit carried by node-llama-cpp@3.21.1 (bundle HEAD, llama.cpp release tag v0.4.0 per llama.cpp.info.json)
LLAMACPP_COMMIT="80fb11ac73e66d89eae2c6a91d8a77428fa733ed"

ROOT="${SI_LLAMACPP_DIR:-$HOME/.cache/secureinfer/llama.cpp}"
JOBS="${SI_LLAMACPP_JOBS:-2}"
NPM_DIR="$ROOT/npm"
SRC_DIR="$ROOT/src"
BUILD_DIR="$ROOT/build"
BIN_DIR="$BUILD_DIR/bin"
TARBALL="$NPM_DIR/$NPM_PKG-$NPM_VERSION.tgz"
BUNDLE="$NPM_DIR/gitRelease.bundle"

# Tools we use: greedy generation (llama-completion: -no-cnv/--temp 0; llama-simple: always greedy), benchmarking,
# quantisation, perplexity, tokenisation, the llama2.c converter, a GGUF dumper and the HTTP server (serving
# comparison: scripts/bench-server-vs-llamacpp.sh).
TARGETS=(llama-completion llama-simple llama-bench llama-quantize llama-perplexity llama-tokenize
         llama-convert-llama2c-to-ggml llama-gguf llama-server)

log() { echo "llamacpp: $*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_tools() {
  local missing=() pkgs=()
  command -v git   >/dev/null || { missing+=(git);   pkgs+=(git); }
  command -v cmake >/dev/null || { missing+=(cmake); pkgs+=(cmake); }
  command -v g++   >/dev/null || { missing+=(g++);   pkgs+=(g++ build-essential); }
  command -v npm   >/dev/null || { missing+=(npm);   pkgs+=(npm); }
  command -v tar   >/dev/null || { missing+=(tar);   pkgs+=(tar); }
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "${SI_LLAMACPP_NO_APT:-0}" = 1 ] && die "missing tools: ${missing[*]}"
  log "installing ${pkgs[*]} (missing: ${missing[*]})"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

fetch() {
  mkdir -p "$NPM_DIR"
  if [ ! -s "$BUNDLE" ]; then
    if [ ! -s "$TARBALL" ]; then
      log "downloading $NPM_PKG@$NPM_VERSION from the npm registry"
      local tmp
      tmp="$(mktemp -d "$NPM_DIR/.pack.XXXXXX")"
      (cd "$tmp" && npm pack --silent "$NPM_PKG@$NPM_VERSION" >/dev/null)
      mv "$tmp/$NPM_PKG-$NPM_VERSION.tgz" "$TARBALL"
      rmdir "$tmp"
    fi
    log "extracting the llama.cpp git bundle"
    tar -xzf "$TARBALL" -C "$NPM_DIR" package/llama/gitRelease.bundle package/llama/llama.cpp.info.json
    mv "$NPM_DIR/package/llama/gitRelease.bundle" "$BUNDLE.tmp"
    mv "$NPM_DIR/package/llama/llama.cpp.info.json" "$NPM_DIR/llama.cpp.info.json"
    rm -rf "$NPM_DIR/package"
    mv "$BUNDLE.tmp" "$BUNDLE"
  fi
  if [ ! -d "$SRC_DIR/.git" ]; then
    log "cloning the bundle into $SRC_DIR"
    rm -rf "$SRC_DIR.tmp"
    git clone -q -c advice.detachedHead=false "$BUNDLE" "$SRC_DIR.tmp"
    mv "$SRC_DIR.tmp" "$SRC_DIR"
  fi
  local head
  head="$(git -C "$SRC_DIR" rev-parse HEAD)"
  [ "$head" = "$LLAMACPP_COMMIT" ] || die "source tree at $head, expected $LLAMACPP_COMMIT (remove $SRC_DIR to refetch)"
}

# No AMX: with -march=native on a CPU that has it, ggml's CPU backend repacks quantised weights for AMX tiles
# (an "extra buffer type"), and llama-bench, which has no --no-repack, crashes in ggml_cpu_extra_compute_forward on
# the first quantised matrix product. Explicit -mno-amx-* flags win over -march=native in GCC.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS=(
  "-DCMAKE_C_FLAGS=$NO_AMX"
  "-DCMAKE_CXX_FLAGS=$NO_AMX"
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=ON
  -DGGML_CCACHE=OFF
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BACKEND_DL=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_EXAMPLES=ON
)

configure() {
  # Re-run cmake only when the build tree is new or the flags above changed.
  local stamp="$BUILD_DIR/.si-cmake-flags" want="${CMAKE_FLAGS[*]}"
  if [ -f "$BUILD_DIR/CMakeCache.txt" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  local gen=()
  if [ ! -f "$BUILD_DIR/CMakeCache.txt" ] && command -v ninja >/dev/null; then gen=(-G Ninja); fi
  log "configuring (CPU only, Release, -march=native)"
  cmake -S "$SRC_DIR" -B "$BUILD_DIR" "${gen[@]}" "${CMAKE_FLAGS[@]}" >&2
  echo "$want" > "$stamp"
}

build() {
  ensure_tools
  fetch
  configure
  log "building ${TARGETS[*]} with -j$JOBS"
  local start=$SECONDS
  cmake --build "$BUILD_DIR" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2
  log "build step took $((SECONDS - start)) s"
  local t
  for t in "${TARGETS[@]}"; do
    [ -x "$BIN_DIR/$t" ] || die "missing $BIN_DIR/$t after the build"
  done
  echo "$BIN_DIR"
}

cmd="${1:-build}"
case "$cmd" in
  build) build ;;
  fetch) ensure_tools; fetch; echo "$SRC_DIR" ;;
  bindir)
    [ -x "$BIN_DIR/llama-bench" ] || die "not built yet: run $0 build"
    echo "$BIN_DIR" ;;
  srcdir)
    [ -d "$SRC_DIR/.git" ] || die "not fetched yet: run $0 fetch"
    echo "$SRC_DIR" ;;
  clean) rm -rf "$BUILD_DIR" ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (build|bindir|srcdir|fetch|clean|help)" ;;
esac
