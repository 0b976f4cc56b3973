#!/usr/bin/env bash
# Test the nbdkit plugin with QEMU's own NBD clients (qemu-io, qemu-img) as the oracle:
#   - writes, write-zeroes and discards through qemu-io over NBD, mirrored on a raw reference file;
#     read back over NBD, qemu-img convert from NBD to raw, qemu-img compare against the reference;
#   - parallel writes (qemu-img convert -m 8 -W into the NBD export);
#   - qemu-img map over NBD: holes and zeros come from the plugin's extents (qcow2_map);
#   - an encrypted (LUKS) image served with password-file=..., read back by qemu-io with the
#     secret; a wrong password stops the server cleanly with a message and no panic;
#   - readonly=true refuses writes;
#   - qemu-img check calls every image clean once the server has exited;
#   - then a smoke run of scripts/bench_nbd.py (16 MiB, 1 s runs).
# Usage: nbdkit/test.sh [PLUGIN.so]. Without an argument it installs the C library into a
# temporary prefix (scripts/install-c.sh) and builds the plugin there with its Makefile and
# pkg-config, as a user would. Needs nbdkit, nbdkit-plugin-dev, qemu-utils (and pkg-config, a C
# compiler). Every server runs under `nbdkit --run`, so none outlives its client.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

die() { printf 'nbdkit test: FAILED: %s\n' "$*" >&2; exit 1; }
for tool in nbdkit qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

T="$(mktemp -d "${TMPDIR:-/tmp}/qcow2rs-nbdkit.XXXXXX")"
trap 'rm -rf "$T"' EXIT

if [ $# -ge 1 ]; then
    PLUGIN="$(realpath "$1")"
else
    echo "== installing libqcow2rs into $T/prefix and building the plugin with pkg-config"
    PREFIX="$T/prefix" bash "$ROOT/scripts/install-c.sh" >"$T/install.log" 2>&1 ||
        { cat "$T/install.log"; die "scripts/install-c.sh failed"; }
    mkdir "$T/build"
    cp "$HERE/qcow2rs.c" "$HERE/Makefile" "$T/build/"
    PKG_CONFIG_PATH="$T/prefix/lib/pkgconfig" make -s -C "$T/build" >/dev/null ||
        die "the plugin does not build against the installed library"
    PLUGIN="$T/build/nbdkit-qcow2rs-plugin.so"
fi
unset LD_LIBRARY_PATH

# serve IMAGE [PLUGIN ARGS...] -- COMMAND...: run COMMAND with $uri (nbd+unix:///?socket=...)
# exported while nbdkit serves IMAGE; the server exits with the command.
serve() {
    local image="$1"
    shift
    local args=()
    while [ "$1" != "--" ]; do args+=("$1"); shift; done
    shift
    { declare -f die; echo "export -f die"; printf '%q ' "$@"; echo; } >"$T/run.sh"
    nbdkit --exit-with-parent -U - "$PLUGIN" file="$image" "${args[@]}" --run "export uri; bash $T/run.sh"
}

clean() { # IMAGE [qemu-img options]: qemu-img check must call it clean
    local out
    out="$(qemu-img check "$@" 2>&1)" || die "qemu-img check $*: $out"
    [[ "$out" == *"No errors were found on the image."* ]] || die "qemu-img check $*: $out"
}

ops=(
    "write -P 0xaa 0 1M"
    "write -P 0x55 10M 64k"
    "write -P 0x11 2109497 3000"
    "write -P 0x77 20M 2M"
    "write -z 20M 1M"
    "write -P 0x33 30M 4M"
    "discard 30M 2M"
    "write -P 0x44 63M 1M"
)
qio_args=()
for op in "${ops[@]}"; do qio_args+=(-c "$op"); done

echo "== read-write: qemu-io over NBD, against a raw reference"
qemu-img create -q -f qcow2 "$T/disk.qcow2" 64M
qemu-img create -q -f raw "$T/ref.raw" 64M
qemu-io -f raw "${qio_args[@]}" "$T/ref.raw" >/dev/null
# The client script: runs inside nbdkit --run, with $uri set.
cat >"$T/client-rw.sh" <<'EOF'
set -euo pipefail
T="$1"; shift
qemu-io -f raw "$@" "$uri" >"$T/qio.out" || die "qemu-io writes over NBD failed: $(cat "$T/qio.out")"
out="$(qemu-io -f raw -c "read -P 0xaa 0 1M" -c "read -P 0x55 10M 64k" -c "read -P 0 20M 1M" \
    -c "read -P 0x77 21M 1M" -c "read -P 0 30M 2M" -c "read -P 0x33 32M 2M" "$uri")" ||
    die "qemu-io read back over NBD failed: $out"
[[ "$out" != *"Pattern verification failed"* ]] || die "read back over NBD: $out"
qemu-img convert -f raw -O raw "$uri" "$T/out.raw"
qemu-img compare -q -f raw -F raw "$T/ref.raw" "$T/out.raw" || die "qemu-img convert from NBD differs from the reference"
qemu-img compare -q -f raw -F raw "$T/ref.raw" "$uri" || die "the NBD export differs from the reference"
qemu-img map --output=json -f raw "$uri" >"$T/map.json"
EOF
serve "$T/disk.qcow2" -- bash "$T/client-rw.sh" "$T" "${qio_args[@]}"
clean "$T/disk.qcow2"
qemu-img compare -q -f raw -F qcow2 "$T/ref.raw" "$T/disk.qcow2" || die "the image differs from the reference after the server exited"

echo "== block status: qemu-img map over NBD shows holes and zeros"
python3 - "$T/map.json" <<'EOF' || die "qemu-img map over NBD does not show the extents (see above)"
import json, sys
m = json.load(open(sys.argv[1]))
def at(off):
    for e in m:
        if e["start"] <= off < e["start"] + e["length"]:
            return e
    raise SystemExit(f"no extent at {off}: {m}")
M = 1 << 20
want = {0: (True, False), 5 * M: (False, True), 10 * M: (True, False), 20 * M: (False, True),
        21 * M: (True, False), 30 * M: (False, True), 32 * M: (True, False), 50 * M: (False, True)}
bad = [(off, at(off)) for off, (data, zero) in want.items()
       if (at(off)["data"], at(off)["zero"]) != (data, zero)]
if bad:
    print("unexpected extents:", bad, "\nmap:", json.dumps(m), file=sys.stderr)
    sys.exit(1)
print(f"   {len(m)} extents, data/zero as written")
EOF

echo "== parallel writes: qemu-img convert -m 8 -W into the export"
python3 -c "
import os, sys
with open(sys.argv[1], 'wb') as f:
    for i in range(48):
        f.write(os.urandom(65536) if i % 3 else bytes(65536))
        f.write(bytes([i]) * 65536 * 15)
" "$T/src.raw"
qemu-img create -q -f qcow2 "$T/par.qcow2" "$(stat -c %s "$T/src.raw")"
cat >"$T/client-par.sh" <<'EOF'
set -euo pipefail
qemu-img convert -n -m 8 -W -f raw -O raw "$1" "$uri"
qemu-img compare -q -f raw -F raw "$1" "$uri" || die "parallel writes over NBD: the export differs from the source"
EOF
serve "$T/par.qcow2" -- bash "$T/client-par.sh" "$T/src.raw"
clean "$T/par.qcow2"
qemu-img compare -q -f raw -F qcow2 "$T/src.raw" "$T/par.qcow2" || die "parallel writes: the image differs from the source"

echo "== encryption: LUKS image served with password-file="
printf 'correct horse battery staple' >"$T/pw"
printf 'wrong password 12345' >"$T/bad-pw"
qemu-img create -q -f qcow2 --object secret,id=sec0,file="$T/pw" \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 "$T/enc.qcow2" 16M
cat >"$T/client-enc.sh" <<'EOF'
set -euo pipefail
out="$(qemu-io -f raw -c "write -P 0x5a 1M 1M" -c "write -P 0xa5 8M 4k" -c "read -P 0x5a 1M 1M" -c "read -P 0 0 1M" "$uri")" ||
    die "qemu-io over NBD on the encrypted image: $out"
[[ "$out" != *"Pattern verification failed"* ]] || die "encrypted image over NBD: $out"
EOF
serve "$T/enc.qcow2" password-file="$T/pw" -- bash "$T/client-enc.sh"
secret=(--object secret,id=sec0,file="$T/pw")
opts="driver=qcow2,file.filename=$T/enc.qcow2,encrypt.key-secret=sec0"
out="$(qemu-io "${secret[@]}" --image-opts -c "read -P 0x5a 1M 1M" -c "read -P 0xa5 8M 4k" -c "read -P 0 2M 6M" "$opts")" ||
    die "qemu-io cannot read what was written over NBD into the encrypted image: $out"
[[ "$out" != *"Pattern verification failed"* ]] || die "encrypted image read by qemu-io: $out"
clean "${secret[@]}" --image-opts "$opts"
# The wrong password: the server must refuse to start, say why, and neither panic nor show it.
if nbdkit -U - "$PLUGIN" file="$T/enc.qcow2" password-file="$T/bad-pw" --run 'true' >"$T/bad.out" 2>&1; then
    die "nbdkit started with a wrong password"
fi
grep -qi "password\|key" "$T/bad.out" || die "a wrong password gives no clear message: $(cat "$T/bad.out")"
grep -qi "panic" "$T/bad.out" && die "a wrong password panicked: $(cat "$T/bad.out")"
grep -q "wrong password 12345\|correct horse" "$T/bad.out" && die "the error shows a password: $(cat "$T/bad.out")"
echo "   wrong password refused: $(grep -i 'password\|key' "$T/bad.out" | head -1)"
# A missing file is named.
if nbdkit -U - "$PLUGIN" file="$T/enc.qcow2" password-file="$T/no-such-file" --run 'true' >"$T/missing.out" 2>&1; then
    die "nbdkit started with a missing password file"
fi
grep -q "no-such-file" "$T/missing.out" || die "a missing password file is not named: $(cat "$T/missing.out")"

echo "== readonly=true refuses writes; force-share=true needs readonly"
cat >"$T/client-ro.sh" <<'EOF'
set -euo pipefail
qemu-io -r -f raw -c "read -P 0xaa 0 1M" "$uri" | grep -q "read 1048576" || die "readonly: read failed"
if out="$(qemu-io -f raw -c "write -P 1 0 4k" "$uri" 2>&1)" && [[ "$out" != *"failed"* ]]; then
    die "readonly=true accepted a write: $out"
fi
EOF
serve "$T/disk.qcow2" readonly=true -- bash "$T/client-ro.sh"
if nbdkit -U - "$PLUGIN" file="$T/disk.qcow2" force-share=true --run 'true' >/dev/null 2>&1; then
    die "force-share=true without readonly=true was accepted"
fi
clean "$T/disk.qcow2"
qemu-img compare -q -f raw -F qcow2 "$T/ref.raw" "$T/disk.qcow2" || die "a read-only export changed the image"

# A smoke run of the benchmark (scripts/bench_nbd.py), tiny: the script works end to end, with
# fio's nbd engine, qemu-nbd and the strace counts. QCOW2RS_NBD_BENCH=0 skips it.
if [ "${QCOW2RS_NBD_BENCH:-1}" != 0 ]; then
    echo "== benchmark smoke run (scripts/bench_nbd.py --size 16M --runtime 1)"
    for tool in fio qemu-nbd strace; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
    python3 "$ROOT/scripts/bench_nbd.py" --plugin "$PLUGIN" --size 16M --runtime 1 --ramp 0 \
        --repeats 1 --depths 1 >"$T/bench.out" 2>&1 || { cat "$T/bench.out"; die "scripts/bench_nbd.py failed"; }
    grep -q "^lowest ratio ours/qemu-nbd" "$T/bench.out" || { cat "$T/bench.out"; die "scripts/bench_nbd.py printed no summary"; }
    sed -n '/^workload/,$p' "$T/bench.out"
fi

echo "nbdkit test: all passed"
