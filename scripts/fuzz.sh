#!/usr/bin/env bash
# Run the fuzz targets (fuzz/, cargo-fuzz and libFuzzer), one after the other, on the seeds made by
# fuzz/make-seeds.sh and the inputs kept in tests/fuzz-regressions/<target>/. Two modes:
#   - the gate (default; CI): a fixed number of executions per target (RUNS below) from a fixed
#     libFuzzer seed (QCOW2RS_FUZZ_SEED, default 1): the same work on a slow machine as on a fast
#     one, and nearly the same inputs (not quite: the library's hash maps are randomly seeded, which
#     changes coverage and so the corpus a little);
#   - exploration: QCOW2RS_FUZZ_SECONDS=N runs each target N seconds from a random seed.
# Any finding fails the script: a panic (debug assertions, overflow checks included), an input
# taking over 1 s (-timeout=1), a single allocation over 256 MiB (-malloc_limit_mb) or 2 GiB
# resident (-rss_limit_mb). libFuzzer saves the input in fuzz/artifacts/<target>/; replay it with
# `scripts/fuzz.sh --replay TARGET FILE`, then keep it (minimized: cargo fuzz tmin) in
# tests/fuzz-regressions/<target>/, where `cargo test` replays it from then on.
#
# The targets are built without a sanitizer by default (QCOW2RS_FUZZ_SANITIZER=address for
# AddressSanitizer): the core is #![deny(unsafe_code)] but for one fcntl call, so ASan adds
# little there and costs 5-10x in executions and minutes of build; the unsafe SIMD code of vaes/ is
# covered by its own tests against the RustCrypto ciphers, and long runs should use both.
#
# Usage: scripts/fuzz.sh [TARGET...]          (default: header open_read check_repair mutate)
#        scripts/fuzz.sh --replay TARGET FILE
# Installs cargo-fuzz (cargo install --locked) when missing. The toolchain is stable: cargo fuzz
# needs nightly flags (-Z sanitizer), which RUSTC_BOOTSTRAP=1 allows.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export RUSTC_BOOTSTRAP=1
SECONDS_EACH="${QCOW2RS_FUZZ_SECONDS:-}"
SEED="${QCOW2RS_FUZZ_SEED:-1}"
ALL=(header open_read check_repair mutate)
# The gate's executions per target: about 10-20 s each on a 2-core machine.
declare -A RUNS=([header]=2000000 [open_read]=40000 [check_repair]=30000 [mutate]=6000)
# -a: debug assertions (overflow checks) on, as in the tests.
BUILD_FLAGS=(-a -s "${QCOW2RS_FUZZ_SANITIZER:-none}")
LIBFUZZER_FLAGS=(-timeout=1 -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1)

if ! cargo fuzz --version >/dev/null 2>&1; then
    say "Installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

cd "$ROOT/fuzz"
if [ "${1:-}" = "--replay" ]; then
    [ $# -eq 3 ] || die "usage: scripts/fuzz.sh --replay TARGET FILE"
    file="$(cd "$(dirname "$3")" && pwd)/$(basename "$3")"
    exec cargo fuzz run "${BUILD_FLAGS[@]}" "$2" "$file" -- "${LIBFUZZER_FLAGS[@]}"
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")

say "Building the fuzz targets"
cargo fuzz build "${BUILD_FLAGS[@]}"
[ -d seeds ] || ./make-seeds.sh

failed=()
for t in "${targets[@]}"; do
    if [ -n "$SECONDS_EACH" ]; then
        budget=(-max_total_time="$SECONDS_EACH")
        say "fuzz $t: ${SECONDS_EACH} s"
    else
        budget=(-runs="${RUNS[$t]}" -seed="$SEED")
        say "fuzz $t: ${RUNS[$t]} executions from seed $SEED"
    fi
    mkdir -p "corpus/$t"
    # New inputs go to the first directory (corpus/, git-ignored); the kept ones are read only.
    log="logs/$t.log"
    mkdir -p logs
    rc=0
    cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "corpus/$t" "$ROOT/tests/fuzz-regressions/$t" -- \
        "${LIBFUZZER_FLAGS[@]}" "${budget[@]}" >"$log" 2>&1 || rc=$?
    # The executions, and on a finding what it was and where its input went.
    grep -aE '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|==[0-9]+== ?ERROR|SUMMARY|thread .* panicked|.*Test unit written)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FINDINGS in: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz: no findings (${targets[*]})"
