#!/usr/bin/env bash
# Writer scaling: allocating writes into a fresh image, then overwrites of the same clusters, with
# 1, 2 and 4 writer threads (`qcow2rs bench -d J`, one thread per request in flight).
#
#   scripts/bench_writers.sh [QCOW2RS_BINARY]
#   scripts/bench_writers.sh raw [RAW_WRITERS_BINARY]
#
# Requests are scattered: request i goes to i * (cluster + 4 KiB) modulo the image size, so every
# 4 KiB request allocates a cluster of its own (64 KiB clusters) and 64 KiB requests straddle two.
# Env: QCOW2RS_BENCH_MB (data per run, default 256 MB), QCOW2RS_BENCH_DIR (default /tmp),
# QCOW2RS_BENCH_CACHE (default writeback; none = O_DIRECT), QCOW2RS_BENCH_LUKS=1 (a LUKS image,
# password "bench", 10 ms key-slot iterations), QCOW2RS_BENCH_REPS (runs per figure, default 3:
# the median is printed), QCOW2RS_BENCH_SIZES (default "4096 65536"), QCOW2RS_BENCH_THREADS
# (default "1 2 4"). Prints one line per figure: size, kind, threads, MB/s and IOPS (medians),
# and the ratio to the first thread count.
#
# `raw` is the ceiling: the same request pattern written by cli/examples/raw_writers.rs (build it
# with `cargo build --release -p qcow2rs-cli --example raw_writers`) to a RAW file, no qcow2 and no
# locks of ours, in each state the file can be in (extend: empty, every write extends it; sparse:
# truncated to size, every write fills a hole; prealloc: fallocated; overwrite: written before),
# buffered and O_DIRECT: what the kernel and file system allow parallel writers of one file.
set -euo pipefail
MB="${QCOW2RS_BENCH_MB:-256}"
DIR="${QCOW2RS_BENCH_DIR:-/tmp}"
CACHE="${QCOW2RS_BENCH_CACHE:-writeback}"
REPS="${QCOW2RS_BENCH_REPS:-3}"
SIZES="${QCOW2RS_BENCH_SIZES:-4096 65536}"
THREADS="${QCOW2RS_BENCH_THREADS:-1 2 4}"
STEP=$((65536 + 4096))
IMG="$DIR/bench_writers.$$.img"
PW="$DIR/bench_writers.$$.pw"
trap 'rm -f "$IMG" "$PW"' EXIT

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Prints the table from lines "size kind threads MB/s IOPS" (one per figure) on stdin.
table() {
    printf '%-6s %-10s %7s %9s %8s %6s\n' size kind threads MB/s IOPS ratio
    awk '{ key = $1 " " $2; if (!(key in base)) base[key] = $5;
           printf "%-6s %-10s %7s %9s %8s %6.2f\n", $1, $2, $3, $4, $5, $5 / base[key] }'
}

# Runs `$@` REPS times (each prints "MB/s IOPS"), prints the medians.
medians() {
    local mbs=() iops=() a b i
    for ((i = 0; i < REPS; i++)); do
        read -r a b < <("$@")
        mbs+=("$a")
        iops+=("$b")
    done
    echo "$(printf '%s\n' "${mbs[@]}" | median) $(printf '%s\n' "${iops[@]}" | median)"
}

if [ "${1:-}" = raw ]; then
    RAW="${2:-${CARGO_TARGET_DIR:-target}/release/examples/raw_writers}"
    echo "raw file ceiling, $MB MB per run, medians of $REPS, in $DIR"
    for cache in buffered direct; do
        echo "== $cache"
        for size in $SIZES; do
            count=$((MB * 1000000 / size))
            for mode in extend sparse prealloc overwrite; do
                for j in $THREADS; do
                    echo "$size $mode $j $(medians "$RAW" "$IMG" "$mode" "$cache" "$size" "$STEP" "$count" "$j")"
                done
            done
        done | table
    done
    exit 0
fi

BIN="${1:-${QCOW2RS_BIN:-qcow2rs}}"
SEC=()
CREATE=(-o cluster_size=65536)
if [ "${QCOW2RS_BENCH_LUKS:-0}" = 1 ]; then
    printf bench >"$PW"
    SEC=(--password-file "$PW")
    CREATE=(--object "secret,id=k,file=$PW" -o
        "cluster_size=65536,encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10")
fi

bench() { # size count threads -> prints "MB/s IOPS"
    local out secs
    out="$("$BIN" bench "${SEC[@]}" -f qcow2 -w -t "$CACHE" -s "$1" -S "$STEP" -c "$2" -d "$3" "$IMG")"
    secs="$(sed -nE 's/.*Run completed in ([0-9.]+) seconds.*/\1/p' <<<"$out")"
    awk -v s="$secs" -v n="$2" -v b="$1" 'BEGIN { printf "%.1f %.0f\n", n * b / s / 1e6, n / s }'
}

one() { # size count kind threads
    "$BIN" create -q -f qcow2 "${CREATE[@]}" "$IMG" 64G >/dev/null
    if [ "$3" = overwrite ]; then
        bench "$1" "$2" 1 >/dev/null
    fi
    bench "$1" "$2" "$4"
}

echo "qcow2 ($BIN), cache=$CACHE, luks=${QCOW2RS_BENCH_LUKS:-0}, $MB MB per run, medians of $REPS, in $DIR"
for size in $SIZES; do
    count=$((MB * 1000000 / size))
    for kind in allocating overwrite; do
        for j in $THREADS; do
            echo "$size $kind $j $(medians one "$size" "$count" "$kind" "$j")"
        done
    done
done | table
