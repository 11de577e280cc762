#!/usr/bin/env bash
# Soak test of `diffmoe serve`: N concurrent streaming clients (curl loops with varied prompts,
# seeds and lengths; every fifth one hangs up mid-stream) for a fixed time, while the server's
# resident memory is sampled. Passes when every cache block is free at the end, no request failed
# or was refused (4xx/5xx), and the resident memory after warm-up stays flat (growth under
# --rss-slack percent).
#
# usage: bench/serve_soak.sh [--checkpoint PATH --tokenizer PATH] [--clients 64] [--duration 60]
#                            [--max-tokens 64] [--device cpu] [--build build | --bin PATH] [--work DIR]
#                            [--config configs/tiny.yaml] [--vocab-size 4096] [-- SERVE_ARGS...]
# Without --checkpoint it makes a model: --config's preset (the tiny one by default) freshly
# initialised, with a --vocab-size tokenizer trained on the bundled corpus (both cached in the work
# directory; --tokenizer without --checkpoint uses that tokenizer). Arguments after -- go to
# `diffmoe serve` (e.g. --precision bf16). With --device cuda the GPU's used memory (nvidia-smi) is
# sampled too and must stay flat like the resident memory.
# The GPU run of the bench preset: --device cuda --config configs/bench.yaml --vocab-size 32768
#   -- --precision bf16 (bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT="" TOKENIZER="" CLIENTS=64 DURATION=60 MAX_TOKENS=64 DEVICE=cpu BUILD=build BIN="" WORK=/tmp/diffmoe-serve-soak RSS_SLACK=10
CONFIG=configs/tiny.yaml VOCAB=4096 SERVE_ARGS=()
while [[ $# -gt 0 ]]; do
  # Every option but -- takes a value.
  [[ "$1" == -- || $# -ge 2 ]] || { echo "serve_soak: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --checkpoint) CHECKPOINT="$2"; shift 2 ;;
    --tokenizer) TOKENIZER="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --build) BUILD="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --vocab-size) VOCAB="$2"; shift 2 ;;
    --) shift; SERVE_ARGS=("$@"); break ;;
    --work) WORK="$2"; shift 2 ;;
    --rss-slack) RSS_SLACK="$2"; shift 2 ;;
    *) echo "serve_soak: unknown option $1" >&2; exit 2 ;;
  esac
done
for opt in clients:CLIENTS:1 duration:DURATION:1 max-tokens:MAX_TOKENS:1 vocab-size:VOCAB:1 rss-slack:RSS_SLACK:0; do
  IFS=: read -r name var min <<< "$opt"
  [[ "${!var}" =~ ^[0-9]+$ ]] && (( 10#${!var} >= min )) ||
    { echo "serve_soak: --$name '${!var}' must be an integer >= $min" >&2; exit 2; }
done
[[ -n "$BIN" ]] || BIN="$BUILD/src/cli/diffmoe"
[[ -x "$BIN" ]] || { echo "serve_soak: no $BIN (build first)" >&2; exit 2; }
mkdir -p "$WORK"
# One soak per work directory: a second one would take the first's port file and client logs.
exec 9> "$WORK/.lock"
flock -n 9 || { echo "serve_soak: another soak is using $WORK (pass --work DIR)" >&2; exit 2; }

if [[ -z "$CHECKPOINT" ]]; then
  NAME=$(basename "$CONFIG" .yaml)
  [[ -n "$TOKENIZER" ]] || TOKENIZER="$WORK/tokenizer-$VOCAB.json"
  [[ -f "$TOKENIZER" ]] || "$BIN" tokenizer train --input 'data/corpus/*.txt' --out "$TOKENIZER" --vocab-size "$VOCAB"
  CHECKPOINT="$WORK/$NAME.safetensors"
  [[ -f "$CHECKPOINT" ]] || "$BIN" init --config "$CONFIG" --out "$CHECKPOINT"
fi
TOK_ARGS=()
[[ -n "$TOKENIZER" ]] && TOK_ARGS=(--tokenizer "$TOKENIZER")

rm -f "$WORK/port" "$WORK"/client-*.log
OMP_WAIT_POLICY=passive "$BIN" serve --checkpoint "$CHECKPOINT" "${TOK_ARGS[@]}" --device "$DEVICE" --port 0 \
  --port-file "$WORK/port" --max-batch 32 --max-concurrency $((CLIENTS + 8)) --max-tokens 512 "${SERVE_ARGS[@]}" \
  > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 1200); do [[ -f "$WORK/port" ]] && break; kill -0 $SERVER 2>/dev/null || break; sleep 0.1; done
[[ -f "$WORK/port" ]] || { echo "serve_soak: the server did not start" >&2; cat "$WORK/server.log" >&2; exit 1; }
URL="http://127.0.0.1:$(cat "$WORK/port")"

PROMPTS=("It is a truth universally acknowledged" "Call me Ishmael." "Emma Woodhouse, handsome, clever, and rich"
         "The family of Dashwood had long been settled in Sussex." "No one who had ever seen Catherine Morland"
         "Sir Walter Elliot, of Kellynch-hall" "About thirty years ago, Miss Maria Ward")
END=$(( $(date +%s) + DURATION ))
client() {  # one client: streaming requests back to back until the end; every fifth one hangs up early
  local id=$1 n=0 status
  while (( $(date +%s) < END )); do
    local prompt="${PROMPTS[$(( (id + n) % ${#PROMPTS[@]} ))]}" tokens=$(( 8 + (id * 7 + n * 13) % MAX_TOKENS ))
    local body="{\"prompt\": \"$prompt\", \"max_tokens\": $tokens, \"temperature\": 0.8, \"seed\": $((id * 1000 + n)), \"stream\": true}"
    if (( (id + n) % 5 == 4 )); then
      status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 0.3 -H 'Content-Type: application/json' -d "$body" "$URL/v1/completions" || true)
      echo "hangup $status" >> "$WORK/client-$id.log"
    else
      status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 120 -H 'Content-Type: application/json' -d "$body" "$URL/v1/completions" || true)
      echo "done $status" >> "$WORK/client-$id.log"
    fi
    n=$((n + 1))
  done
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$SERVER/status"; }
gpu_mib() { [[ "$DEVICE" == cuda ]] && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1 || echo 0; }

echo "serve_soak: $CLIENTS streaming clients for $DURATION s against $URL ($(nproc) cores)"
PIDS=()
for i in $(seq 1 "$CLIENTS"); do client "$i" & PIDS+=($!); done
RSS=() GPU=()
T0=$(date +%s)
while (( $(date +%s) < END )); do
  sleep 5
  RSS+=("$(rss_kib)")
  GPU+=("$(gpu_mib)")
  echo "  t=$(( $(date +%s) - T0 ))s rss=$(( ${RSS[-1]} / 1024 )) MiB gpu=${GPU[-1]} MiB $(curl -s "$URL/health")"
done
for p in "${PIDS[@]}"; do wait "$p" || true; done
sleep 1
HEALTH=$(curl -s "$URL/health")
kill -TERM $SERVER
wait $SERVER || true
trap - EXIT

DONE=$(cat "$WORK"/client-*.log | grep -c '^done 200' || true)
HANGUPS=$(cat "$WORK"/client-*.log | grep -c '^hangup' || true)
FAILED=$(cat "$WORK"/client-*.log | grep -c ' 5[0-9][0-9]$' || true)
REFUSED=$(cat "$WORK"/client-*.log | grep -c ' 4[0-9][0-9]$' || true)
GEN=$(echo "$HEALTH" | sed -E 's/.*"generated_tokens":([0-9]+).*/\1/')
FREE=$(echo "$HEALTH" | sed -E 's/.*"free_blocks":([0-9]+).*/\1/')
TOTAL=$(echo "$HEALTH" | sed -E 's/.*"total_blocks":([0-9]+).*/\1/')
CANCELLED=$(echo "$HEALTH" | sed -E 's/.*"cancelled":([0-9]+).*/\1/')
FIRST=${RSS[1]:-${RSS[0]}} LAST=${RSS[-1]}  # the first sample after warm-up, the last one
GROWTH=$(( (LAST - FIRST) * 100 / FIRST ))
GPU_FIRST=${GPU[1]:-${GPU[0]}} GPU_LAST=${GPU[-1]}
GPU_GROWTH=$(( GPU_FIRST > 0 ? (GPU_LAST - GPU_FIRST) * 100 / GPU_FIRST : 0 ))
echo "serve_soak: $DONE streams completed, $HANGUPS hung up ($CANCELLED cancelled by the server), $FAILED 5xx, $REFUSED 4xx;" \
     "$GEN tokens generated ($(( GEN / DURATION )) tokens/s); blocks free $FREE/$TOTAL;" \
     "rss $(( FIRST / 1024 )) -> $(( LAST / 1024 )) MiB (${GROWTH}%)" \
     "$([[ "$DEVICE" == cuda ]] && echo "; gpu memory $GPU_FIRST -> $GPU_LAST MiB (${GPU_GROWTH}%)")"
OK=1
[[ "$FREE" == "$TOTAL" ]] || { echo "FAIL: $(( TOTAL - FREE )) cache blocks still taken"; OK=0; }
[[ "$FAILED" == 0 ]] || { echo "FAIL: $FAILED requests failed with 5xx"; OK=0; }
[[ "$REFUSED" == 0 ]] || { echo "FAIL: $REFUSED requests refused (4xx: a leaked concurrency slot?)"; OK=0; }
(( GROWTH <= RSS_SLACK )) || { echo "FAIL: resident memory grew ${GROWTH}% (slack ${RSS_SLACK}%)"; OK=0; }
(( GPU_GROWTH <= RSS_SLACK )) || { echo "FAIL: GPU memory grew ${GPU_GROWTH}% (slack ${RSS_SLACK}%)"; OK=0; }
(( DONE > 0 )) || { echo "FAIL: no stream completed"; OK=0; }
[[ $OK == 1 ]] && echo "PASS" || exit 1
