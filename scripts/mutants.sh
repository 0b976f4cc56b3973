#!/usr/bin/env bash
# Run the crash simulator once per ordering mutant (qcow2rs::mutants::ALL, core/src/mutants.rs)
# and require each to be killed (at least one failing crash state, failing guest read or failing
# workload).
#
#   scripts/mutants.sh                 # baseline (no mutant: must find 0 corruptions), then all
#   scripts/mutants.sh dirty-bit comp-pos   # baseline, then only these
#
# Each mutant run sets QCOW2RS_MUTANT=<name> and QCOW2RS_CRASH_STOP_FIRST=1 (no new jobs after
# the first failing state, so a kill is quick) and QCOW2RS_CRASH_STATES=$QCOW2RS_MUTANT_STATES
# (default 3000; the fixed workloads' deterministic states always run). Other QCOW2RS_CRASH_*
# variables pass through (QCOW2RS_CRASH_SEED, QCOW2RS_CRASH_RANDOM, ...); qemu-img check is
# sampled more sparsely than in CI (QCOW2RS_CRASH_QEMU_EVERY, default here 200) to keep the
# catalogue fast. The workloads expected to catch a mutant run first (first_for below; override
# with QCOW2RS_CRASH_FIRST, empty for none); all the others still run if those do not kill it.
# Logs go to $QCOW2RS_MUTANT_LOGS (default target/mutants/).
#
# Prints a table: mutant | killed | states until the first kill | seconds | the workload that
# caught it. Exits non-zero if the
# baseline finds anything or any mutant survives. Works from any directory.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STATES="${QCOW2RS_MUTANT_STATES:-3000}"
LOGS="${QCOW2RS_MUTANT_LOGS:-$ROOT/target/mutants}"
export QCOW2RS_CRASH_QEMU_EVERY="${QCOW2RS_CRASH_QEMU_EVERY:-200}"
mkdir -p "$LOGS"

# The catalogue, parsed from core/src/mutants.rs: lines `"name",` right after `(`.
mapfile -t ALL < <(awk '/^pub const ALL/{on=1} on&&/^    \($/{getline; gsub(/[ ",]/,""); print} on&&/^\];/{exit}' core/src/mutants.rs)
[ "${#ALL[@]}" -gt 0 ] || die "no mutants found in core/src/mutants.rs"
if [ "$#" -gt 0 ]; then
    for m in "$@"; do
        printf '%s\n' "${ALL[@]}" | grep -qx -- "$m" || die "no such mutant: $m (known: ${ALL[*]})"
    done
    MUTANTS=("$@")
else
    MUTANTS=("${ALL[@]}")
fi

say "Building the crash simulator"
cargo test -p qcow2rs-tests --test crash_sim --no-run

# The workloads expected to catch each mutant soonest: their jobs run first
# (QCOW2RS_CRASH_FIRST), so a kill ends the run early. Every workload still runs if they do not.
first_for() {
    case "$1" in
        l2-refcount-dep | pre-barrier) echo new_l2,first_write ;;
        data-barrier) echo first_write,overwrite ;;
        len-pending) echo first_write,refblock_growth ;;
        virgin-check | deferred-frees) echo reuse,discard ;;
        dirty-bit) echo dirty_bit,lazy ;;
        unlinked-flag) echo unlinked_flag ;;
        comp-pos | comp-cache) echo comp_reuse,compressed ;;
        refblock-barrier) echo refblock_growth ;;
        reftable-barrier) echo reftable_growth ;;
        l1-grow-barrier) echo l1_growth ;;
        zero-alloc-barrier) echo write_zeroes ;;
        compressed-barrier) echo compressed ;;
        failed-flush) echo failed_flush ;;
        resize-zero-order) echo resize ;;
        keyslot-*) echo key_slots ;;
        snap-*) echo snapshots ;;
        *) echo "" ;;
    esac
}

# run NAME LOG [MUTANT]: one simulator run; sets STATES_RUN, FIRST, CORRUPT, SECS.
run_sim() {
    local log="$1" mutant="${2:-}" start=$SECONDS
    if [ -n "$mutant" ]; then
        env QCOW2RS_MUTANT="$mutant" QCOW2RS_CRASH_STOP_FIRST=1 QCOW2RS_CRASH_STATES="$STATES" \
            QCOW2RS_CRASH_FIRST="${QCOW2RS_CRASH_FIRST-$(first_for "$mutant")}" \
            cargo test -q -p qcow2rs-tests --test crash_sim -- --exact crash_sim --nocapture \
            >"$log" 2>&1 || true
    else
        env QCOW2RS_CRASH_STATES="$STATES" \
            cargo test -q -p qcow2rs-tests --test crash_sim -- --exact crash_sim --nocapture \
            >"$log" 2>&1 || true
    fi
    SECS=$((SECONDS - start))
    local summary
    summary="$(grep -E '^crash-sim: [0-9]+ states, [0-9]+ corruptions' "$log" | tail -1 || true)"
    if [ -z "$summary" ]; then
        STATES_RUN="?"
        CORRUPT="crashed"
    else
        STATES_RUN="$(sed -E 's/^crash-sim: ([0-9]+) states.*/\1/' <<<"$summary")"
        CORRUPT="$(sed -E 's/.* ([0-9]+) corruptions.*/\1/' <<<"$summary")"
    fi
    FIRST="$(grep -E '^crash-sim: first failure after' "$log" | sed -E 's/.*after ([0-9]+) states.*/\1/' || true)"
    FIRST="${FIRST:--}"
    BY="$(grep -m1 -oE "^crash-sim FAILURE:? (in )?workload '[^']*'" "$log" | sed -E "s/.*'(.*)'/\1/" || true)"
    BY="${BY:--}"
}

FAILED=0
say "Baseline (no mutant), $STATES states"
run_sim "$LOGS/baseline.log"
echo "baseline: $STATES_RUN states, $CORRUPT corruptions, $SECS s (log: $LOGS/baseline.log)"
if [ "$CORRUPT" != "0" ]; then
    echo "baseline: NOT CLEAN: the simulator finds failures without any mutant (see the log)"
    FAILED=1
fi

ROWS=()
SURVIVORS=()
for m in "${MUTANTS[@]}"; do
    say "Mutant $m"
    run_sim "$LOGS/$m.log" "$m"
    if [ "$CORRUPT" = "crashed" ]; then
        # The test binary died (a panic outside the per-state guard, an abort): that is a kill too,
        # but say so.
        killed="yes (run crashed)"
    elif [ "$CORRUPT" != "0" ]; then
        killed="yes"
    else
        killed="NO"
        SURVIVORS+=("$m")
    fi
    echo "$m: killed $killed, first kill after $FIRST states (workload $BY), $SECS s"
    ROWS+=("$(printf '%-20s | %-17s | %12s | %7s | %s' "$m" "$killed" "$FIRST" "$SECS" "$BY")")
done

echo
printf '%-20s | %-17s | %12s | %7s | %s\n' "mutant" "killed" "states" "seconds" "first caught by"
printf '%s\n' "---------------------+-------------------+--------------+---------+----------------"
printf '%s\n' "${ROWS[@]}"
echo
if [ "${#SURVIVORS[@]}" -gt 0 ]; then
    echo "mutants.sh: SURVIVED: ${SURVIVORS[*]} (logs in $LOGS)"
    FAILED=1
else
    echo "mutants.sh: all ${#MUTANTS[@]} mutants killed"
fi
exit "$FAILED"
