#!/usr/bin/env bash
# Run the crash simulator once per ordering mutant (qcow2rs::mutants::ALL, core/src/mutants.rs)
# and require each to be killed (at least one failing crash state, failing guest read or failing
# workload).
#
#   scripts/mutants.sh                 # baseline (no mutant: must find 0 corruptions), then all
#   scripts/mutants.sh dirty-bit comp-pos   # baseline, then only these
#
# Each mutant runs with QCOW2RS_MUTANT=<name> and QCOW2RS_CRASH_STOP_FIRST=1 (no new jobs after
# the first failing state, so a kill is quick) and QCOW2RS_CRASH_STATES=$QCOW2RS_MUTANT_STATES
# (default 3000; the chosen workloads' deterministic states always run), first against the
# workloads known to catch it (catchers below, QCOW2RS_CRASH_ONLY), and, if they miss it,
# against every workload. Other QCOW2RS_CRASH_* variables pass through (QCOW2RS_CRASH_SEED,
# QCOW2RS_CRASH_RANDOM, ...); qemu-img check is sampled more sparsely than in CI
# (QCOW2RS_CRASH_QEMU_EVERY, default here 200). A baseline run without a mutant comes first
# (QCOW2RS_MUTANT_BASELINE=0 skips it: test.sh does, right after the crash-sim step ran the same
# workloads). Logs go to $QCOW2RS_MUTANT_LOGS (default target/mutants/).
#
# Prints a table: mutant | killed | states until the first kill | seconds | the workload that
# caught it. Exits non-zero if the baseline finds anything or any mutant survives. Works from
# any directory.
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

# The workloads that catch each mutant (QCOW2RS_CRASH_ONLY substrings), as the full runs found:
# each mutant first runs against these alone, and against every workload if they miss it.
catchers() {
    case "$1" in
        l2-refcount-dep | len-pending) echo run_turnover ;;
        data-barrier) echo cow_backing ;;
        pre-barrier) echo new_l2,first_write ;;
        virgin-check) echo reuse,resize ;;
        deferred-frees | punch-late) echo reuse,discard ;;
        repair-copied-order) echo snapshots ;;
        dirty-bit) echo dirty_bit ;;
        unlinked-flag) echo flush_window,unlinked_flag ;;
        comp-pos) echo comp_reuse ;;
        comp-cache) echo comp_cache ;;
        refblock-barrier) echo refblock_growth ;;
        reftable-barrier) echo reftable_growth ;;
        l1-grow-barrier) echo l1_growth ;;
        zero-alloc-barrier) echo write_zeroes ;;
        compressed-barrier) echo compressed ;;
        failed-flush) echo failed_flush ;;
        resize-zero-order) echo resize ;;
        crypt-virgin | reserve-iv) echo encrypted ;;
        par-early-link) echo par_writers,cow_backing ;;
        par-stale-link) echo par_writers ;;
        keyslot-*) echo key_slots ;;
        snap-*) echo snapshots ;;
        *) echo "" ;;
    esac
}

# run NAME LOG [MUTANT [ONLY]]: one simulator run (with ONLY: those workloads alone).
run_sim() {
    local log="$1" mutant="${2:-}" only="${3:-}" start=$SECONDS
    if [ -n "$mutant" ]; then
        env QCOW2RS_MUTANT="$mutant" QCOW2RS_CRASH_STOP_FIRST=1 QCOW2RS_CRASH_STATES="$STATES" \
            ${only:+QCOW2RS_CRASH_ONLY="$only"} \
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
if [ "${QCOW2RS_MUTANT_BASELINE:-1}" != "0" ]; then
    say "Baseline (no mutant), $STATES states"
    run_sim "$LOGS/baseline.log"
    echo "baseline: $STATES_RUN states, $CORRUPT corruptions, $SECS s (log: $LOGS/baseline.log)"
    if [ "$CORRUPT" != "0" ]; then
        echo "baseline: NOT CLEAN: the simulator finds failures without any mutant (see the log)"
        FAILED=1
    fi
fi

ROWS=()
SURVIVORS=()
for m in "${MUTANTS[@]}"; do
    say "Mutant $m"
    only="$(catchers "$m")"
    total=0
    if [ -n "$only" ]; then
        run_sim "$LOGS/$m.log" "$m" "$only"
        total=$SECS
        if [ "$CORRUPT" = "crashed" ] || [ "$CORRUPT" = "0" ]; then
            # Missed (or the run died, e.g. on a catcher name that matches nothing): all of them.
            echo "$m: not caught by $only alone ($CORRUPT); running every workload"
            only=""
        fi
    fi
    if [ -z "$only" ]; then
        run_sim "$LOGS/$m.log" "$m"
        SECS=$((SECS + total))
    fi
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
    echo "$m: killed $killed, first kill after $FIRST states (workload $BY; run on ${only:-every workload}), $SECS s"
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
