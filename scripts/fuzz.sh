#!/usr/bin/env bash
# Run the fuzz targets (fuzz/, cargo-fuzz and libFuzzer), one after the other, each for
# $QCOW2RS_FUZZ_SECONDS seconds (default 20), on the seeds made by fuzz/make-seeds.sh and the
# inputs kept in tests/fuzz-regressions/<target>/. Any finding fails the script: a panic, an
# input taking over 1 s (-timeout=1), a single allocation over 256 MiB (-malloc_limit_mb) or
# 2 GiB resident (-rss_limit_mb). libFuzzer saves the input in fuzz/artifacts/<target>/; replay
# it with `scripts/fuzz.sh --replay TARGET FILE`, then keep it (minimized: cargo fuzz tmin) in
# tests/fuzz-regressions/<target>/, where `cargo test` replays it from then on.
#
# Usage: scripts/fuzz.sh [TARGET...]          (default: header open_read check_repair mutate)
#        scripts/fuzz.sh --replay TARGET FILE
# Installs cargo-fuzz (cargo install --locked) when missing. The toolchain is stable: cargo fuzz
# needs nightly flags (-Z sanitizer), which RUSTC_BOOTSTRAP=1 allows.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export RUSTC_BOOTSTRAP=1
SECONDS_EACH="${QCOW2RS_FUZZ_SECONDS:-20}"
ALL=(header open_read check_repair mutate)
# -a: debug assertions (overflow checks) on, as in the tests.
BUILD_FLAGS=(-a)
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
    say "fuzz $t: ${SECONDS_EACH} s"
    mkdir -p "corpus/$t"
    # New inputs go to the first directory (corpus/, git-ignored); the kept ones are read only.
    log="logs/$t.log"
    mkdir -p logs
    rc=0
    cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "corpus/$t" "$ROOT/tests/fuzz-regressions/$t" -- \
        "${LIBFUZZER_FLAGS[@]}" -max_total_time="$SECONDS_EACH" >"$log" 2>&1 || rc=$?
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
echo "fuzz: no findings (${targets[*]}, ${SECONDS_EACH} s each)"
