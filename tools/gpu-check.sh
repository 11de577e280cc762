#!/usr/bin/env bash
# GPU check of the CUDA backend. Run on a machine with an NVIDIA GPU, from the repository
# root. Steps: configure + build (CUDA on, Hopper sm_90a by default) into build-gpu; the CUDA-vs-CPU
# op checks (test_cuda_ops); the NCCL communicator with one GPU (test_cuda_dist); the whole-model
# check (cuda_model_check, f32 and bf16_gemm); compute-sanitizer memcheck on the op checks (the
# long-sequence case left out) and on the grouped GEMM's own checks, racecheck on those using shared
# memory; op benchmarks (bench_ops: attention and the element-wise ops; bench_op_cases: the op case
# table at the bench preset's shapes; grouped GEMM; FP8); the
# training-step benchmark against PyTorch (bench/README.md); a table of the headline numbers. The
# CUDA tests skip where no device is usable (CI); here DIFFMOE_REQUIRE_GPU=1 makes a missing device
# a failure instead. Every
# step runs even when an earlier one failed; full logs go to the log folder; a summary table (step,
# result, seconds) is printed last. Exit status: 0 when every step passed.
#
# Usage: tools/gpu-check.sh [--build-dir DIR] [--jobs N] [--arch ARCHS] [--prebuilt DIR]
#                           [--step-timeout SECONDS] [--log-dir DIR]
#        tools/gpu-check.sh --make-bundle DIR [--build-dir DIR] [--jobs N] [--arch ARCHS]
#   --prebuilt DIR     binaries built elsewhere (DIR/test_cuda_ops, DIR/cuda_model_check,
#                      DIR/bench_ops, ...; shared libraries in DIR/lib), used when the build here
#                      fails: the lent GPU machines have nvcc but not all of the project's
#                      dependencies (configure stopped at libxxhash there on the first try), and
#                      nothing can be installed there.
#   --make-bundle DIR  on a build machine (nvcc and the dependencies, no GPU needed): build the
#                      programs and copy them with their non-system shared libraries (not libc,
#                      libstdc++ or CUDA's) into DIR (~100 MB). Carry DIR to the GPU machine, e.g.
#                      as an ignored build-* folder, and run: tools/gpu-check.sh --prebuilt DIR
#   Environment: GPU_CHECK_LOG_DIR (default DIR/gpu-check-logs), GPU_CHECK_SANITIZE_FILTER and
#   GPU_CHECK_RACE_FILTER (gtest filters of the memcheck and racecheck steps); GPU_CHECK_PART=checks
#   or bench runs one half (a device call has a time limit); GPU_CHECK_PART=profile runs only the
#   hardware-counter profile of the FP8 kernels (ncu on bench_fp8: the quantisers, the grouped FP8 and
#   bf16 expert kernels; throughput, issue slots, stall reasons; needs ncu's counters, which the
#   Firecracker machines give and gVisor ones do not); SANITIZE=0, OP_BENCH=0, BENCH_F32=0,
#   SEED_SLICE=0, DECODE=0 and BENCH=0 skip the sanitizers, the op benchmarks, the f32 step benchmark,
#   the seed-slice step benchmarks, the decode benchmarks, all benchmarks.
set -u
cd "$(dirname "$0")/.."

BUILD_DIR=build-gpu
JOBS="$(nproc)"
ARCH=90a
PREBUILT=""
MAKE_BUNDLE=""
STEP_TIMEOUT=600
LOG_DIR="${GPU_CHECK_LOG_DIR:-}"
SANITIZE_FILTER="${GPU_CHECK_SANITIZE_FILTER:--CudaAttention.LongSequenceForward}"
# racecheck: the kernels that share data through shared memory (attention, norms, MoE, loss, FP8 quantisers;
# the norms, loss, router and MoE data movement as cases of the op case table, Table/OpCaseCudaVsCpu.*).
RACE_FILTER="${GPU_CHECK_RACE_FILTER:-CudaAttention.*:CudaMoe.*:CudaFp8Quant.*:Table/OpCaseCudaVsCpu.*:-CudaAttention.LongSequenceForward}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --arch) ARCH="$2"; shift 2 ;;
    --prebuilt) PREBUILT="$2"; shift 2 ;;
    --make-bundle) MAKE_BUNDLE="$2"; shift 2 ;;
    --step-timeout) STEP_TIMEOUT="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n "$LOG_DIR" ]] || LOG_DIR="$BUILD_DIR/gpu-check-logs"
mkdir -p "$LOG_DIR"
CONFIGURE=(cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDIFFMOE_CUDA=ON
           -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DDIFFMOE_TESTS=ON -DDIFFMOE_BENCH=ON)
TARGETS=(test_cuda_ops test_cuda_dist test_serve_cuda test_cuda_eval test_cuda_fp8_model test_cuda_grad_slots cuda_model_check bench_ops bench_op_cases
         bench_step bench_grouped_gemm bench_fp8 diffmoe)

if [[ -n "$MAKE_BUNDLE" ]]; then
  "${CONFIGURE[@]}" >/dev/null && ninja -C "$BUILD_DIR" -j"$JOBS" "${TARGETS[@]}" || exit 1
  rm -rf "$MAKE_BUNDLE" && mkdir -p "$MAKE_BUNDLE/lib" || exit 1
  bins=("$BUILD_DIR/tests/ops/test_cuda_ops" "$BUILD_DIR/tests/dist/test_cuda_dist" "$BUILD_DIR/tests/serve/test_serve_cuda"
        "$BUILD_DIR/tests/eval/test_cuda_eval" "$BUILD_DIR/tests/model/test_cuda_fp8_model"
        "$BUILD_DIR/tests/model/test_cuda_grad_slots" "$BUILD_DIR/tools/cuda_model_check"
        "$BUILD_DIR/bench/bench_ops" "$BUILD_DIR/bench/bench_op_cases" "$BUILD_DIR/bench/bench_step" "$BUILD_DIR/bench/bench_grouped_gemm"
        "$BUILD_DIR/bench/bench_fp8" "$BUILD_DIR/src/cli/diffmoe")
  cp "${bins[@]}" "$MAKE_BUNDLE/" || exit 1
  for lib in $(ldd "${bins[@]}" | awk '/=> \// {print $3}' | sort -u); do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|ld-linux*|libdl.so*|libpthread.so*|librt.so*) ;;  # the system's
      libcuda.so*|libcudart.so*|libcublas.so*|libcublasLt.so*|libnccl.so*) ;;  # the GPU machine's CUDA 13 (NCCL: 200 MB)
      *) cp -L "$lib" "$MAKE_BUNDLE/lib/" || exit 1 ;;
    esac
  done
  echo "gpu-check: bundle in $MAKE_BUNDLE ($(du -sh "$MAKE_BUNDLE" | cut -f1)): $(ls "$MAKE_BUNDLE/lib" | tr '\n' ' ')"
  echo "gpu-check: on the GPU machine: tools/gpu-check.sh --prebuilt $MAKE_BUNDLE"
  exit 0
fi

NAMES=()
RESULTS=()
TIMES=()

# step NAME LOGFILE CMD...: runs CMD with a timeout, output to LOGFILE; records the result.
step() {
  local name="$1" log="$2"
  shift 2
  echo "== $name: $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >"$log" 2>&1
  rc=$?
  local result=PASS
  if [[ $rc == 124 || $rc == 137 ]]; then result="TIMEOUT(${STEP_TIMEOUT}s)"; elif [[ $rc != 0 ]]; then result="FAIL(rc=$rc)"; fi
  NAMES+=("$name")
  RESULTS+=("$result")
  TIMES+=("$((SECONDS - t0))")
  if [[ $result != PASS ]]; then
    echo "-- $name: $result; last lines of $log:"
    tail -n 25 "$log"
  fi
  return $rc
}

skip() {  # skip NAME REASON
  NAMES+=("$1")
  RESULTS+=("SKIP ($2)")
  TIMES+=("0")
}

echo "== machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4
else
  echo "(no nvidia-smi)"
fi
command -v nvcc >/dev/null && nvcc --version | tail -n 1
export PATH="$PATH:/usr/local/cuda/bin"
export DIFFMOE_REQUIRE_GPU=1  # the CUDA tests and cuda_model_check fail, not skip, without a device

# ---- build
BIN_TEST="$BUILD_DIR/tests/ops/test_cuda_ops"
BIN_DIST="$BUILD_DIR/tests/dist/test_cuda_dist"
BIN_SERVE="$BUILD_DIR/tests/serve/test_serve_cuda"
BIN_EVAL="$BUILD_DIR/tests/eval/test_cuda_eval"
BIN_FP8MODEL="$BUILD_DIR/tests/model/test_cuda_fp8_model"
BIN_GRADSLOTS="$BUILD_DIR/tests/model/test_cuda_grad_slots"
BIN_MODEL="$BUILD_DIR/tools/cuda_model_check"
BIN_OPS="$BUILD_DIR/bench/bench_ops"
BIN_CASES="$BUILD_DIR/bench/bench_op_cases"
BIN_BENCH="$BUILD_DIR/bench/bench_step"
BIN_GG="$BUILD_DIR/bench/bench_grouped_gemm"
BIN_FP8="$BUILD_DIR/bench/bench_fp8"
BIN_DIFFMOE="$BUILD_DIR/src/cli/diffmoe"
built=0
if step configure "$LOG_DIR/configure.log" "${CONFIGURE[@]}"; then
  step build "$LOG_DIR/build.log" ninja -C "$BUILD_DIR" -j"$JOBS" "${TARGETS[@]}" && built=1
else
  skip build "configure failed"
fi
if [[ $built == 0 && -n "$PREBUILT" ]]; then
  echo "== using prebuilt binaries from $PREBUILT"
  BIN_TEST="$PREBUILT/test_cuda_ops"
  BIN_DIST="$PREBUILT/test_cuda_dist"
  BIN_SERVE="$PREBUILT/test_serve_cuda"
  BIN_EVAL="$PREBUILT/test_cuda_eval"
  BIN_FP8MODEL="$PREBUILT/test_cuda_fp8_model"
  BIN_GRADSLOTS="$PREBUILT/test_cuda_grad_slots"
  BIN_MODEL="$PREBUILT/cuda_model_check"
  BIN_OPS="$PREBUILT/bench_ops"
  BIN_CASES="$PREBUILT/bench_op_cases"
  BIN_BENCH="$PREBUILT/bench_step"
  BIN_GG="$PREBUILT/bench_grouped_gemm"
  BIN_FP8="$PREBUILT/bench_fp8"
  BIN_DIFFMOE="$PREBUILT/diffmoe"
  export LD_LIBRARY_PATH="$PREBUILT/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  for i in "${!NAMES[@]}"; do  # a failed build here is expected where the dependencies are missing
    [[ ${RESULTS[$i]} == PASS ]] || RESULTS[$i]="${RESULTS[$i]}, used prebuilt"
  done
  NAMES+=("(binaries)")
  RESULTS+=("prebuilt: $PREBUILT")
  TIMES+=("0")
fi

# ---- checks (GPU_CHECK_PART=bench skips them: one device call may not hold everything)
PART="${GPU_CHECK_PART:-all}"
if [[ $PART != bench && $PART != profile ]]; then
if [[ -x "$BIN_TEST" ]]; then
  step test_cuda_ops "$LOG_DIR/test_cuda_ops.log" "$BIN_TEST" --gtest_brief=1
  grep -E "^\[  (PASSED|FAILED) |tests? from .* ran" "$LOG_DIR/test_cuda_ops.log" | tail -n 3
else
  skip test_cuda_ops "no binary"
fi
if [[ -x "$BIN_DIST" ]]; then  # the NCCL communicator with one GPU (src/dist/nccl_communicator.h)
  step test_cuda_dist "$LOG_DIR/test_cuda_dist.log" "$BIN_DIST" --gtest_brief=1
  grep -E "^\[  (PASSED|FAILED) |tests? from .* ran" "$LOG_DIR/test_cuda_dist.log" | tail -n 3
else
  skip test_cuda_dist "no binary"
fi
# the decode engine, the eval scorer, the fp8 mode's model step, ZeRO-2's gradient slots
for pair in "test_serve_cuda:$BIN_SERVE" "test_cuda_eval:$BIN_EVAL" "test_cuda_fp8_model:$BIN_FP8MODEL" \
            "test_cuda_grad_slots:$BIN_GRADSLOTS"; do
  name="${pair%%:*}" bin="${pair#*:}"
  if [[ -x "$bin" ]]; then
    step "$name" "$LOG_DIR/$name.log" "$bin" --gtest_brief=1
    grep -E "^\[  (PASSED|FAILED) |tests? from .* ran" "$LOG_DIR/$name.log" | tail -n 3
  else
    skip "$name" "no binary"
  fi
done
if [[ -x "$BIN_MODEL" ]]; then
  step cuda_model_check "$LOG_DIR/cuda_model_check.log" "$BIN_MODEL"
  grep -E "^==|worst|grad norm|cuda_model_check:|FAIL|differ" "$LOG_DIR/cuda_model_check.log" | head -n 40
  step model_check_bf16 "$LOG_DIR/cuda_model_check_bf16.log" "$BIN_MODEL" --precision bf16_gemm
  grep -E "^==|loss|worst|grad norm|cuda_model_check:|FAIL|differ" "$LOG_DIR/cuda_model_check_bf16.log" | head -n 40
else
  skip cuda_model_check "no binary"
fi
SANITIZER="$(command -v compute-sanitizer || true)"
[[ -n "$SANITIZER" ]] || SANITIZER=/usr/local/cuda/bin/compute-sanitizer
if [[ "${SANITIZE:-1}" == 1 && -x "$BIN_TEST" && -x "$SANITIZER" ]]; then
  step memcheck "$LOG_DIR/memcheck.log" "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$BIN_TEST" --gtest_brief=1 --gtest_filter="$SANITIZE_FILTER"
  grep -E "ERROR SUMMARY|^\[  (PASSED|FAILED) " "$LOG_DIR/memcheck.log" | tail -n 3
  step racecheck "$LOG_DIR/racecheck.log" "$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 20 \
    "$BIN_TEST" --gtest_brief=1 --gtest_filter="$RACE_FILTER"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|^\[  (PASSED|FAILED) " "$LOG_DIR/racecheck.log" | tail -n 3
  if [[ -x "$BIN_GG" ]]; then  # the grouped GEMM kernels' own small checks (every layout, bad offsets)
    step memcheck_grouped "$LOG_DIR/memcheck_grouped.log" "$SANITIZER" --tool memcheck --error-exitcode 3 \
      --print-limit 20 "$BIN_GG" --small
    grep -E "ERROR SUMMARY" "$LOG_DIR/memcheck_grouped.log" | tail -n 1
  fi
else
  skip memcheck "SANITIZE=0, no binary or no compute-sanitizer"
  skip racecheck "SANITIZE=0, no binary or no compute-sanitizer"
fi
fi  # checks

# ---- benchmark: the bench preset's training step, ours and PyTorch's, same card, same run
# (bench/README.md; BENCH=0 skips it, BENCH_BATCH sets ours — 8 is the preset's micro-batch).
if [[ "${BENCH:-1}" == 1 && $PART != checks && $PART != profile ]]; then
  # Op benchmarks: the attention kernels at the bench shape (f32 flash and bf16 tensor-core, ms), the
  # memory-bound element-wise ops (ms, GB/s) and the grouped expert GEMM (TFLOP/s beside cuBLAS);
  # PyTorch's versions come with bench_torch.
  if [[ "${OP_BENCH:-1}" != 1 ]]; then
    skip attention_timing "OP_BENCH=0"
  elif [[ -x "$BIN_OPS" ]]; then
    step attention_timing "$LOG_DIR/attention_timing.log" "$BIN_OPS" --case attention
    tail -n 12 "$LOG_DIR/attention_timing.log"
    step elementwise_timing "$LOG_DIR/elementwise_timing.log" "$BIN_OPS" --case elementwise
    tail -n 16 "$LOG_DIR/elementwise_timing.log"
  else
    skip attention_timing "no binary"
    skip elementwise_timing "no binary"
  fi
  # The op case table's bench-preset cases (tests/ops/op_cases): every op's forward and backward, GB/s
  # or TFLOP/s.
  if [[ "${OP_BENCH:-1}" == 1 && -x "$BIN_CASES" ]]; then
    step op_cases_timing "$LOG_DIR/op_cases_timing.log" "$BIN_CASES" --backend cuda --set bench
    tail -n 40 "$LOG_DIR/op_cases_timing.log"
  else
    skip op_cases_timing "OP_BENCH=0 or no binary"
  fi
  if [[ "${OP_BENCH:-1}" == 1 && -x "$BIN_GG" ]]; then
    step grouped_gemm "$LOG_DIR/grouped_gemm.log" "$BIN_GG"
    tail -n 12 "$LOG_DIR/grouped_gemm.log"
  else
    skip grouped_gemm "no binary"
  fi
  if [[ -x "$BIN_FP8" ]]; then  # act_quant GB/s, fp8_gemm and the grouped FP8 expert GEMMs beside bf16, bench shapes
    step bench_fp8 "$LOG_DIR/bench_fp8.log" "$BIN_FP8" --config configs/bench.yaml --tokens 16384
    tail -n 36 "$LOG_DIR/bench_fp8.log"
  else
    skip bench_fp8 "no binary"
  fi
  if [[ -x "$BIN_BENCH" ]]; then
    ours_batch="${BENCH_BATCH:-8}"
    if [[ "${BENCH_F32:-1}" != 1 ]]; then
      skip bench_diffmoe "BENCH_F32=0"
    elif ! step bench_diffmoe "$LOG_DIR/bench_diffmoe.log" "$BIN_BENCH" --device cuda --config configs/bench.yaml \
        --batch "$ours_batch" --seq 2048 --steps 3 --warmup 1 --optim; then
      ours_batch=$((ours_batch / 2))  # f32 activations may not fit: say so and halve
      step "bench_diffmoe(B=$ours_batch)" "$LOG_DIR/bench_diffmoe_half.log" "$BIN_BENCH" --device cuda --config configs/bench.yaml \
        --batch "$ours_batch" --seq 2048 --steps 3 --warmup 1 --optim
      cat "$LOG_DIR/bench_diffmoe_half.log" | tail -n 2
    fi
    cat "$LOG_DIR/bench_diffmoe.log" | tail -n 2
    step bench_diffmoe_bf16gemm "$LOG_DIR/bench_diffmoe_bf16gemm.log" "$BIN_BENCH" --device cuda --config configs/bench.yaml \
      --batch "$ours_batch" --seq 2048 --steps 5 --warmup 2 --optim --precision bf16_gemm
    cat "$LOG_DIR/bench_diffmoe_bf16gemm.log" | tail -n 3
    # The fp8 mode (docs/model.md §7): FP8 Linears and the routed experts' grouped FP8 kernels.
    step bench_diffmoe_fp8 "$LOG_DIR/bench_diffmoe_fp8.log" "$BIN_BENCH" --device cuda --config configs/bench.yaml \
      --batch "$ours_batch" --seq 2048 --steps 5 --warmup 2 --optim --precision fp8
    cat "$LOG_DIR/bench_diffmoe_fp8.log" | tail -n 3
    # World size 1 through the distributed path (DataParallel around AdamW), then the recompute
    # modes (activation memory against tokens/s), all bf16.
    step bench_dp1 "$LOG_DIR/bench_dp1.log" "$BIN_BENCH" --device cuda --config configs/bench.yaml \
      --batch "$ours_batch" --seq 2048 --steps 5 --warmup 2 --optim --precision bf16_gemm --data-parallel
    cat "$LOG_DIR/bench_dp1.log" | tail -n 3
    for mode in attention moe full; do
      step "bench_recompute_$mode" "$LOG_DIR/bench_recompute_$mode.log" "$BIN_BENCH" --device cuda --config configs/bench.yaml \
        --batch "$ours_batch" --seq 2048 --steps 5 --warmup 2 --optim --precision bf16_gemm --recompute "$mode"
      grep -E "tokens/s|activation arena" "$LOG_DIR/bench_recompute_$mode.log" | tail -n 2
    done
    # seed-slice (configs/seed-slice.yaml): seed-20b's layer shapes on one GPU, 4 × 4096 tokens, bf16
    # and fp8 (SEED_SLICE=0 skips it).
    if [[ "${SEED_SLICE:-1}" == 1 ]]; then
      for prec in bf16_gemm fp8; do
        step "seed_slice_$prec" "$LOG_DIR/seed_slice_$prec.log" "$BIN_BENCH" --device cuda --config configs/seed-slice.yaml \
          --batch 4 --seq 4096 --steps 5 --warmup 2 --optim --precision "$prec"
        grep -E "tokens/s|arena" "$LOG_DIR/seed_slice_$prec.log" | tail -n 3
      done
    fi
  else
    skip bench_diffmoe "no binary"
  fi
  # Decode (docs/evaluation.md "Benchmark"): the serving engine with its CUDA graphs at batch 1, 8 and 64,
  # with the model's bf16 weights and with FP8 weights (greedy agreement), each batch against its
  # bandwidth bound; PyTorch's decode loops come with bench_torch_decode (DECODE=0 skips both).
  if [[ "${DECODE:-1}" == 1 && -x "$BIN_DIFFMOE" ]]; then
    for w in model fp8; do
      step "decode_serve_$w" "$LOG_DIR/decode_serve_$w.log" "$BIN_DIFFMOE" bench --config configs/bench.yaml \
        --device cuda --precision bf16_gemm --no-train --engine serve --weights "$w" --report "$LOG_DIR/decode_serve_$w.json"
      grep -E "decode batch|CUDA graphs|agreement" "$LOG_DIR/decode_serve_$w.log"
    done
  else
    skip decode_serve "DECODE=0 or no binary"
  fi
  if [[ "${DECODE:-1}" == 1 ]] && python3 -c "import torch" 2>/dev/null; then
    step bench_torch_decode "$LOG_DIR/bench_torch_decode.log" python3 bench/torch_bench.py --decode-only \
      --json "$LOG_DIR/torch_decode.json" --time-budget-s "${TORCH_DECODE_BUDGET_S:-150}"
    grep -E "^\|" "$LOG_DIR/bench_torch_decode.log" | head -n 16
  fi
  if python3 -c "import torch" 2>/dev/null; then
    step bench_torch "$LOG_DIR/bench_torch.log" python3 bench/torch_bench.py --json "$LOG_DIR/torch_bench.json" \
      --time-budget-s "${TORCH_BUDGET_S:-420}"
    tail -n 30 "$LOG_DIR/bench_torch.log"
  else
    skip bench_torch "no PyTorch"
  fi
fi

# ---- profile (GPU_CHECK_PART=profile): Nsight Compute counters of the FP8 kernels at the bench shapes, one launch
# of each (after bench_fp8's warm-up launches of the same shape), with the lines that say what bounds them.
if [[ $PART == profile ]]; then
  NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
  if [[ -x "$BIN_FP8" && -n "$NCU" ]]; then
    ncu_args=(--clock-control none --kernel-name-base demangled --section SpeedOfLight --section Occupancy
              --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats
              --section InstructionStats)
    keys="Duration|Throughput|Issue Slots Busy|Executed Ipc Active|Occupancy|No Eligible|Warp Cycles Per Issued|Registers Per|act_quant|weight_quant|grouped_gemm"
    # act_quant: 12 launches skipped (the f32 source's three modes), then the bf16 source's rows, transposed, both.
    step ncu_act_quant "$LOG_DIR/ncu_act_quant.log" "$NCU" "${ncu_args[@]}" -k regex:act_quant_kernel \
      --launch-skip 12 --launch-count 12 "$BIN_FP8" --config configs/bench.yaml --only quant --iters 1
    grep -E "$keys" "$LOG_DIR/ncu_act_quant.log" | head -n 120
    step ncu_grouped_fp8 "$LOG_DIR/ncu_grouped_fp8.log" "$NCU" "${ncu_args[@]}" -k regex:grouped_gemm_fp8_kernel -c 1 \
      "$BIN_FP8" --config configs/bench.yaml --only grouped --iters 1
    grep -E "$keys" "$LOG_DIR/ncu_grouped_fp8.log" | head -n 40
    step ncu_grouped_bf16 "$LOG_DIR/ncu_grouped_bf16.log" "$NCU" "${ncu_args[@]}" -k regex:grouped_gemm_tma_kernel -c 1 \
      "$BIN_FP8" --config configs/bench.yaml --only grouped --iters 1
    grep -E "$keys" "$LOG_DIR/ncu_grouped_bf16.log" | head -n 40
  else
    skip ncu "no bench_fp8 binary or no ncu"
  fi
fi

# ---- summary
status=0
echo
echo "gpu-check summary (logs: $LOG_DIR)"
printf '%-18s %-44s %8s\n' "check" "result" "seconds"
for i in "${!NAMES[@]}"; do
  printf '%-18s %-44s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
  case "${RESULTS[$i]}" in PASS|prebuilt*|*"used prebuilt") ;; *) status=1 ;; esac
done
if [[ "${BENCH:-1}" == 1 && $PART != checks && $PART != profile ]]; then  # the headline numbers, from the logs above
  echo
  echo "gpu-check numbers (bench preset, 8 x 2048 tokens, fwd+bwd+AdamW; same card, same run)"
  ours() { grep -hoE "median [0-9.]+ s|[0-9]+ tokens/s, MFU [0-9.]+%" "$1" 2>/dev/null | tr '\n' ' '; }
  torch_row() { grep -hE "^\| $1 \|" "$LOG_DIR/bench_torch.log" 2>/dev/null | head -n 1 |
                awk -F'|' '{gsub(/ /, "", $3); gsub(/ /, "", $4); gsub(/ /, "", $5); print $3 " tokens/s, step " $4 " ms, MFU " $5}'; }
  printf '%-26s %s\n' "diffmoe f32" "$(ours "$LOG_DIR/bench_diffmoe.log")" \
    "diffmoe bf16_gemm" "$(ours "$LOG_DIR/bench_diffmoe_bf16gemm.log")" \
    "diffmoe bf16, DataParallel" "$(ours "$LOG_DIR/bench_dp1.log")" \
    "PyTorch eager" "$(torch_row eager)" "PyTorch compile" "$(torch_row compile)"
fi
exit $status
