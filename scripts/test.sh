#!/usr/bin/env bash
# Run the whole qcow2rs test suite:
#   cargo fmt --check, cargo clippy (warnings are errors), cargo test --workspace (unit tests, the
#   qemu-img interop suite, the C API tests, the README's Rust, C and command-line examples), the
#   crash simulator (its summary line shown), the ordering-mutant catalogue (scripts/mutants.sh:
#   every mutant must be killed), then pip install ./python and pytest python/tests (with the
#   README's Python example), the nbdkit plugin's test (nbdkit/test.sh, with a smoke run of
#   scripts/bench_nbd.py), then each fuzz target for a short budget (scripts/fuzz.sh).
# Every step runs even when an earlier one fails; the exit code is non-zero if any failed.
# Works from any directory. Needs qemu-img/qemu-io (qemu-utils) and a C compiler, which it
# installs with apt-get when they are missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_system_tools

FAILED=()
step() { # NAME COMMAND...
    local name="$1"
    shift
    say "$name: $*"
    local start=$SECONDS
    if "$@"; then
        echo "--- $name: ok ($((SECONDS - start)) s)"
    else
        echo "--- $name: FAILED ($((SECONDS - start)) s)"
        FAILED+=("$name")
    fi
}

pytest_step() {
    install_python_module || return 1
    "$PY" -c 'import pytest' 2>/dev/null || pip_install 'pytest>=8' || return 1
    "$PY" -m pytest python/tests || return 1
    # The checked-in stubs and py.typed: the tests type-check against the installed package,
    # and stubtest compares the native module's stub with what it has at run time.
    "$PY" -c 'import mypy' 2>/dev/null || pip_install 'mypy>=1.10' || return 1
    "$PY" -m mypy --strict --no-incremental python/tests || return 1
    "$PY" -m mypy.stubtest qcow2rs
}

step "rustfmt" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# The crash simulator runs in its own step so that its summary line is shown
# (`crash-sim: N states, C corruptions, L with leaks`; QCOW2RS_CRASH_STATES=N runs more).
step "cargo test" cargo test --workspace --locked --no-fail-fast -- --skip crash_sim
step "crash-sim" cargo test -p qcow2rs-tests --test crash_sim --locked -- --exact crash_sim --nocapture
# Every ordering mutant of core/src/mutants.rs must be caught by the simulator (kill table shown).
# No separate baseline: the crash-sim step just ran the same workloads without a mutant.
step "mutants" env QCOW2RS_MUTANT_BASELINE=0 bash scripts/mutants.sh
step "pytest" pytest_step
# The nbdkit plugin (nbdkit/): installs the C library into a temporary prefix, builds the plugin
# with pkg-config and tests it with qemu-io / qemu-img as NBD clients (nbdkit/test.sh).
nbdkit_step() {
    if ! { have nbdkit && have fio && [ -f /usr/include/nbdkit-plugin.h ]; }; then
        apt_install nbdkit nbdkit-plugin-dev libnbd-bin fio || return 1
    fi
    bash nbdkit/test.sh
}
step "nbdkit" nbdkit_step
# The fuzz targets (fuzz/, cargo-fuzz): a fixed number of executions from a fixed seed each
# (QCOW2RS_FUZZ_SECONDS=N: N seconds from a random seed instead); any finding fails the step.
# Installs cargo-fuzz when missing; QCOW2RS_FUZZ_SECONDS=0 skips the step.
if [ "${QCOW2RS_FUZZ_SECONDS:-20}" != 0 ]; then
    step "fuzz" bash scripts/fuzz.sh
fi

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "test.sh: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "test.sh: all steps passed (rustfmt, clippy, cargo test, crash-sim, mutants, pytest, nbdkit, fuzz)"
