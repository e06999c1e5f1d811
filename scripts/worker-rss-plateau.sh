#!/usr/bin/env bash
# Whether a worker's resident memory levels off once its KV pool has been reached
# (#23 item 5). The pool is allocated zeroed and its pages become resident as blocks
# are first written, so RSS rises while new blocks are reached; past that it must stay
# flat, or something grows per request. A small pool (--memory-budget 320MiB: what
# the weights leave, a 10,368-token pool with SmolLM2) is reached within about a
# hundred requests, so the rest of the run shows the plateau, or a leak.
#
#   scripts/worker-rss-plateau.sh [requests, default 600]
#
# Needs the release worker (cargo build --release -p gpuscale-inference-worker) and
# scripts/ensure-tools.sh's SmolLM2. Prints RSS (anonymous and file-backed) and open
# fds every 50 requests; every request must answer 200.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/ensure-tools.sh 2>/dev/null)"
n=${1:-600}
port=18089
bin=${WORKER_BIN:-target/release/inference-worker}
"$bin" --model "$GPUSCALE_SMOLLM2_GGUF" --port "$port" --host 127.0.0.1 \
    --model-name m --memory-budget 320MiB --max-seq-len 256 --max-batch 2 \
    --log-format json >/tmp/worker-plateau.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.2; done
# RSS split as the kernel counts it: anonymous (the heap, the pool) and file-backed
# (the binary and the mapped model, whose embedding rows are read from the map, so
# pages of it become resident as tokens are first seen: bounded by the table, and the
# kernel's to reclaim).
sample() {
    local s="/proc/$pid/status"
    printf '%6s requests  RSS %6.1f MiB (anonymous %6.1f, file %5.1f)  open fds %3s\n' "$1" \
        "$(awk '/VmRSS/ {print $2 / 1024}' "$s")" \
        "$(awk '/RssAnon/ {print $2 / 1024}' "$s")" \
        "$(awk '/RssFile/ {print $2 / 1024}' "$s")" \
        "$(ls "/proc/$pid/fd" | wc -l)"
}
sample 0
for i in $(seq 1 "$n"); do
    # A prompt no earlier request shares beyond its first words: each reaches blocks
    # the prefix cache does not hold.
    body=$(printf '{"model":"m","prompt":"Request %d: %s","max_tokens":16}' "$i" \
        "$(seq "$i" $((i + 40)) | tr '\n' ' ')")
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
        -d "$body" "http://127.0.0.1:$port/v1/completions")
    [ "$code" = 200 ] || { echo "request $i answered $code"; exit 1; }
    [ $((i % 50)) -eq 0 ] && sample "$i"
done
