# Shared by scripts/setup.sh and scripts/test.sh (sourced, not run).
# Sets ROOT (the repository root, also the working directory) and PY (the Python interpreter that
# gets the qcow2rs module), and defines the helpers below.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Run as root, or through sudo when that is available.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif have sudo; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    have apt-get || die "please install: $* (no apt-get on this machine)"
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# qemu-img and qemu-io (the test oracle), a C compiler and pkg-config (the installed C library).
ensure_system_tools() {
    local pkgs=()
    { have qemu-img && have qemu-io; } || pkgs+=(qemu-utils)
    have cc || have gcc || pkgs+=(gcc libc6-dev)
    have pkg-config || pkgs+=(pkg-config)
    if [ "${#pkgs[@]}" -gt 0 ]; then
        say "Installing ${pkgs[*]}"
        apt_install "${pkgs[@]}"
    fi
    have cargo || die "Rust is needed (cargo not found): see https://rustup.rs"
}

# The interpreter: $QCOW2RS_PYTHON, else the venv a previous run made, else python3.
if [ -n "${QCOW2RS_PYTHON:-}" ]; then
    PY="$QCOW2RS_PYTHON"
elif [ -x "$ROOT/python/.venv/bin/python" ]; then
    PY="$ROOT/python/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python || true)"
fi

# Make sure "$PY -m pip" can install packages. A system Python that forbids it (PEP 668, as
# Debian's does) or has no pip gets a virtual environment in python/.venv instead.
ensure_pip() {
    [ -n "$PY" ] || { apt_install python3 python3-pip python3-venv; PY="$(command -v python3)"; }
    local managed
    managed="$("$PY" - <<'PYEOF'
import os, sys, sysconfig
inside_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
print("yes" if (os.path.exists(marker) and not inside_venv) else "no")
PYEOF
)"
    if [ "$managed" = yes ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
        if [ ! -x "$ROOT/python/.venv/bin/python" ]; then
            say "Creating a Python virtual environment in python/.venv"
            "$PY" -m venv "$ROOT/python/.venv" 2>/dev/null || {
                apt_install python3-venv python3-pip
                "$PY" -m venv "$ROOT/python/.venv"
            }
        fi
        PY="$ROOT/python/.venv/bin/python"
    fi
}

pip_install() {
    "$PY" -m pip install --disable-pip-version-check -q "$@"
}

# Build and install the Python module (pip install ./python, built by maturin in release mode).
install_python_module() {
    ensure_pip
    say "pip install ./python  (with $PY)"
    pip_install ./python
}
