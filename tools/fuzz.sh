#!/usr/bin/env bash
# Fuzzes every file reader for a bounded time: builds the libFuzzer targets of tests/fuzz with
# clang-14 (ASan + UBSan, -DDIFFMOE_FUZZ=ON) into build-fuzz/ (once; incremental after), then runs
# each target for SECONDS (default 20) from its committed seed corpus, two at a time. A finding
# fails the script; its input is left in build-fuzz/tests/fuzz/<target>-crash-* (or -leak-,
# -timeout-, -oom-): add it to tests/fuzz/corpus/<target>/ with the fix, and it replays in every
# ordinary test run (fuzz_replay_<target>).
# Usage: tools/fuzz.sh [SECONDS]
# Needs clang-14, libclang-rt-14-dev and libomp-14-dev (tools/setup.sh --fuzz installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-20}"
BUILD_DIR=build-fuzz
launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [[ ! -f "$BUILD_DIR/build.ninja" ]]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang-14 \
        -DCMAKE_CXX_COMPILER=clang++-14 "${launcher[@]}" -DDIFFMOE_FUZZ=ON -DDIFFMOE_TESTS=OFF -DDIFFMOE_BENCH=OFF \
        -DDIFFMOE_CUDA=OFF
fi
cmake -S . -B "$BUILD_DIR" -DDIFFMOE_FUZZ_SECONDS="$SECONDS_EACH" >/dev/null
targets=$(sed -n 's/^set(DIFFMOE_FUZZ_TARGETS \(.*\))$/\1/p' tests/fuzz/CMakeLists.txt)
ninja -C "$BUILD_DIR" -j"$(nproc)" $(for t in $targets; do echo "fuzz_$t"; done)
ctest --test-dir "$BUILD_DIR" -R '^fuzz_' --output-on-failure -j"$(nproc)"
