#!/usr/bin/env bash
# Set up qcow2rs on a fresh machine and run the main job end to end:
#   1. install what is missing (qemu-utils, a C compiler; Rust and Python 3 must be there),
#   2. build (release) and install the `qcow2rs` command into ~/.cargo/bin,
#   3. build and install the C library with scripts/install-c.sh (libqcow2rs.so.0, .a, qcow2rs.h and
#      qcow2rs.pc into $PREFIX, default /usr/local; PREFIX=$HOME/.local needs no root),
#   4. build and install the Python module (pip install ./python),
#   5. create an image and write and read it through the CLI, Python and C, and have qemu-img
#      check every image and compare its content.
# Works from any directory. Re-running it is harmless.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_system_tools

say "Building the CLI and the C library (cargo build --release)"
cargo build --release --locked -p qcow2rs-cli -p qcow2rs-capi

BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
mkdir -p "$BIN_DIR"
install -m 755 target/release/qcow2rs "$BIN_DIR/qcow2rs"
say "Installed $BIN_DIR/qcow2rs"
case ":$PATH:" in *":$BIN_DIR:"*) ;; *) echo "note: add $BIN_DIR to your PATH"; export PATH="$BIN_DIR:$PATH" ;; esac

say "Installing the C library (scripts/install-c.sh, PREFIX=${PREFIX:-/usr/local})"
bash "$ROOT/scripts/install-c.sh"
C_PREFIX="${PREFIX:-/usr/local}"
case "$C_PREFIX" in /*) ;; *) C_PREFIX="$ROOT/$C_PREFIX" ;; esac
export PKG_CONFIG_PATH="$C_PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

install_python_module

DEMO="$ROOT/target/setup-demo"
rm -rf "$DEMO"
mkdir -p "$DEMO"
cd "$DEMO"

# Reference data: text, zeros and a little randomness, 4 MiB.
"$PY" - <<'PYEOF'
import os
chunks = []
for i in range(64):
    if i % 4 == 3:
        chunks.append(bytes(65536))
    elif i % 4 == 2:
        chunks.append(os.urandom(65536))
    else:
        line = ("qcow2rs setup demo, cluster %02d: the quick brown fox jumps over the lazy dog\n" % i).encode()
        chunks.append((line * (65536 // len(line) + 1))[:65536])
open("data.raw", "wb").write(b"".join(chunks))
PYEOF

qemu_ok() { # IMAGE: qemu-img check must say the image is clean
    local out
    out="$(qemu-img check -f qcow2 "$1" 2>&1)" || die "qemu-img check $1 failed: $out"
    [[ "$out" == *"No errors were found on the image."* ]] || die "qemu-img check: $1 is not clean: $out"
}
qemu_reads() { # IMAGE OFFSET LENGTH TEXT: qemu-io must find TEXT (spaces shown as dots) there
    local out
    out="$(qemu-io -f qcow2 -c "read -v $2 $3" "$1")" || die "qemu-io failed on $1: $out"
    [[ "$out" == *"$4"* ]] || die "qemu-io does not read '$4' at offset $2 of $1: $out"
}

say "CLI: qcow2rs create / convert / check / compare / info"
qcow2rs create -f qcow2 cli.qcow2 64M
qcow2rs convert -f raw -O qcow2 data.raw cli-data.qcow2
qcow2rs convert -c -f raw -O qcow2 data.raw cli-compressed.qcow2
qcow2rs convert -f qcow2 -O raw cli-data.qcow2 cli-back.raw
cmp data.raw cli-back.raw
qcow2rs check cli-data.qcow2
qcow2rs compare data.raw cli-compressed.qcow2
qcow2rs info cli-compressed.qcow2
for img in cli.qcow2 cli-data.qcow2 cli-compressed.qcow2; do qemu_ok "$img"; done
qemu-img compare -f raw -F qcow2 data.raw cli-compressed.qcow2

say "Python: import qcow2rs"
"$PY" - <<'PYEOF'
import qcow2rs

data = open("data.raw", "rb").read()
qcow2rs.create("py.qcow2", 64 << 20)
with qcow2rs.open("py.qcow2", "rw") as img:
    img.write_at(1 << 20, data)
    img.write_at(40 << 20, b"hello from Python")
    img.flush()
    assert img.read_at(1 << 20, len(data)) == data
    assert img.read_at(40 << 20, 17) == b"hello from Python"
    result = img.check()
    assert result.corruptions == 0 and result.leaks == 0, result
print("python: wrote and read back", len(data) + 17, "bytes with qcow2rs", qcow2rs.__version__)
PYEOF
qemu_ok py.qcow2
qemu_reads py.qcow2 $((40 << 20)) 17 "hello.from.Pytho"
qemu-img convert -f qcow2 -O raw py.qcow2 py.raw
cmp -n $((4 << 20)) data.raw py.raw 0 $((1 << 20))   # what Python wrote at 1 MiB, read by qemu-img

say "C: compile against the installed library with pkg-config (cflags and libs of qcow2rs)"
cat > demo.c <<'CEOF'
#include <stdio.h>
#include <string.h>
#include "qcow2rs.h"

static int fail(const char *what) {
    char msg[512];
    qcow2_last_error_message(msg, sizeof msg);
    fprintf(stderr, "%s failed: %s\n", what, msg);
    return 1;
}

int main(void) {
    const char text[] = "hello from C";
    char back[sizeof text];
    qcow2_image *img;
    if (qcow2_create("c.qcow2", 64 << 20, NULL) != QCOW2_OK) return fail("qcow2_create");
    if (qcow2_open("c.qcow2", 0, &img) != QCOW2_OK) return fail("qcow2_open");
    if (qcow2_write(img, 1 << 20, (const uint8_t *)text, sizeof text) != QCOW2_OK) return fail("qcow2_write");
    if (qcow2_read(img, 1 << 20, (uint8_t *)back, sizeof back) != QCOW2_OK) return fail("qcow2_read");
    if (qcow2_close(img) != QCOW2_OK) return fail("qcow2_close");
    if (memcmp(text, back, sizeof text) != 0) { fprintf(stderr, "read back differs\n"); return 1; }
    printf("c: wrote and read back \"%s\" with libqcow2rs %s\n", back, qcow2_version());
    return 0;
}
CEOF
CC="$(command -v cc || command -v gcc)"
# shellcheck disable=SC2046 # pkg-config's output is a list of words
"$CC" -std=c11 -Wall -Wextra -Werror demo.c $(pkg-config --cflags --libs qcow2rs) -o demo
env -u LD_LIBRARY_PATH ./demo
qemu_ok c.qcow2
qemu_reads c.qcow2 $((1 << 20)) 12 "hello.from.C"

say "All set: qcow2rs $(qcow2rs --version 2>/dev/null | awk '{print $2}') is installed; the demo images are in $DEMO"
