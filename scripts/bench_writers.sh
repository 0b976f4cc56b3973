#!/usr/bin/env bash
# Writer scaling: allocating writes into a fresh image, then overwrites of the same clusters, with
# 1, 2 and 4 writer threads (`qcow2rs bench -d J`, one thread per request in flight).
#
#   scripts/bench_writers.sh [QCOW2RS_BINARY]
#
# Requests are scattered: request i goes to i * (cluster + 4 KiB) modulo the image size, so every
# 4 KiB request allocates a cluster of its own (64 KiB clusters) and 64 KiB requests straddle two.
# Env: QCOW2RS_BENCH_MB (data per run, default 256 MB), QCOW2RS_BENCH_DIR (default /tmp),
# QCOW2RS_BENCH_CACHE (default writeback), QCOW2RS_BENCH_OPTS (extra create -o options, e.g.
# encrypt.format=luks,encrypt.key-secret=... is not supported here: plain images only).
# Prints one line per run: size, kind, threads, MB/s and IOPS, and the ratio to 1 thread.
set -euo pipefail
BIN="${1:-${QCOW2RS_BIN:-qcow2rs}}"
MB="${QCOW2RS_BENCH_MB:-256}"
DIR="${QCOW2RS_BENCH_DIR:-/tmp}"
CACHE="${QCOW2RS_BENCH_CACHE:-writeback}"
IMG="$DIR/bench_writers.$$.qcow2"
trap 'rm -f "$IMG"' EXIT

run() { # size step threads -> prints "MB/s IOPS"
    local out secs
    out="$("$BIN" bench -f qcow2 -w -t "$CACHE" -s "$1" -S "$2" -c "$COUNT" -d "$3" "$IMG")"
    secs="$(sed -nE 's/.*Run completed in ([0-9.]+) seconds.*/\1/p' <<<"$out")"
    awk -v s="$secs" -v n="$COUNT" -v b="$1" 'BEGIN { printf "%.1f %.0f\n", n * b / s / 1e6, n / s }'
}

printf '%-6s %-10s %7s %9s %8s %6s\n' size kind threads MB/s IOPS ratio
for size in 4096 65536; do
    step=$((65536 + 4096))
    COUNT=$((MB * 1000000 / size))
    for kind in allocating overwrite; do
        base=""
        for j in 1 2 4; do
            "$BIN" create -f qcow2 -o cluster_size=65536 "$IMG" 64G >/dev/null
            if [ "$kind" = overwrite ]; then
                "$BIN" bench -f qcow2 -w -t "$CACHE" -s "$size" -S "$step" -c "$COUNT" -d 1 "$IMG" >/dev/null
            fi
            read -r mbs iops < <(run "$size" "$step" "$j")
            base="${base:-$iops}"
            printf '%-6s %-10s %7s %9s %8s %6s\n' "$size" "$kind" "$j" "$mbs" "$iops" \
                "$(awk -v a="$iops" -v b="$base" 'BEGIN { printf "%.2f", a / b }')"
        done
    done
done
