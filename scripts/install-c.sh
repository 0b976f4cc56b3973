#!/usr/bin/env bash
# Build and install the C library like any other C library:
#   $PREFIX/lib/libqcow2rs.so.0.1.0, with libqcow2rs.so.0 and libqcow2rs.so symlinks (soname
#   libqcow2rs.so.0, set by capi/build.rs), $PREFIX/lib/libqcow2rs.a, $PREFIX/include/qcow2rs.h and
#   $PREFIX/lib/pkgconfig/qcow2rs.pc, so that
#       cc app.c $(pkg-config --cflags --libs qcow2rs)
#   builds and the program runs without LD_LIBRARY_PATH.
# PREFIX defaults to /usr/local (as root, or through sudo; ldconfig is run there). Any other prefix,
# e.g. PREFIX=$HOME/.local, needs no root: its qcow2rs.pc then carries -Wl,-rpath,$libdir, and
# pkg-config finds it once PKG_CONFIG_PATH includes $PREFIX/lib/pkgconfig (printed at the end).
# The installed libraries carry no debug information (stripped); the build tree keeps it.
# Why not cargo-c: see README "C" > "Installing the C library".
# Works from any directory. Re-running it is harmless (files are replaced).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PREFIX="${PREFIX:-/usr/local}"
case "$PREFIX" in /*) ;; *) PREFIX="$PWD/$PREFIX" ;; esac
LIBDIR="$PREFIX/lib"
INCLUDEDIR="$PREFIX/include"
PCDIR="$LIBDIR/pkgconfig"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET" in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac

for tool in strip install; do have "$tool" || die "$tool is needed (binutils/coreutils)"; done

say "Building the C library (cargo build --release -p qcow2rs-capi)"
cargo build --release --locked -p qcow2rs-capi
VERSION="$(cargo pkgid --offline -p qcow2rs-capi 2>/dev/null | sed 's/.*[#@]//')"
[[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "cannot tell the version of qcow2rs-capi (got '$VERSION')"
MAJOR="${VERSION%%.*}"
SONAME="libqcow2rs.so.$MAJOR"
REAL="libqcow2rs.so.$VERSION"
SO="$TARGET/release/libqcow2rs.so"
A="$TARGET/release/libqcow2rs.a"
[ -f "$SO" ] && [ -f "$A" ] || die "cargo did not produce $SO and $A"

# Install as root only where we cannot write: /usr/local as a normal user goes through sudo.
SUDO_RUN=()
probe="$PREFIX"
while [ ! -e "$probe" ]; do probe="$(dirname "$probe")"; done
if [ ! -w "$probe" ] && [ "$(id -u)" -ne 0 ]; then
    have sudo || die "$PREFIX is not writable: run as root, or choose a user prefix, e.g. PREFIX=\$HOME/.local $0"
    SUDO_RUN=(sudo)
fi
run_i() { "${SUDO_RUN[@]}" "$@"; }

# Where the run-time linker looks by itself (after ldconfig): there, no rpath is needed.
system_libdir=0
case "$LIBDIR" in /usr/local/lib | /usr/lib | /lib | /usr/lib/*-linux-gnu | /lib/*-linux-gnu) system_libdir=1 ;; esac

say "Installing into $PREFIX"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
# Strip the debug information (the release profile keeps some for profiling; 16 MB of it) and the
# non-exported symbols; the static library keeps its symbols, which the linker needs.
strip --strip-unneeded -o "$STAGE/$REAL" "$SO"
strip --strip-debug -o "$STAGE/libqcow2rs.a" "$A"
rpath=""
[ "$system_libdir" -eq 1 ] || rpath=" -Wl,-rpath,\${libdir}"
cat > "$STAGE/qcow2rs.pc" <<PCEOF
prefix=$PREFIX
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: qcow2rs
Description: crash-consistent qcow2 disk images, with LUKS encryption (C API of qcow2rs)
Version: $VERSION
Libs: -L\${libdir} -lqcow2rs$rpath
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
Cflags: -I\${includedir}
PCEOF

run_i install -d "$LIBDIR" "$INCLUDEDIR" "$PCDIR"
run_i install -m 755 "$STAGE/$REAL" "$LIBDIR/$REAL"
run_i ln -sfn "$REAL" "$LIBDIR/$SONAME"
run_i ln -sfn "$SONAME" "$LIBDIR/libqcow2rs.so"
run_i install -m 644 "$STAGE/libqcow2rs.a" "$LIBDIR/libqcow2rs.a"
run_i install -m 644 "$ROOT/include/qcow2rs.h" "$INCLUDEDIR/qcow2rs.h"
run_i install -m 644 "$STAGE/qcow2rs.pc" "$PCDIR/qcow2rs.pc"
# A system directory: refresh the run-time linker's cache so that it finds libqcow2rs.so.0.
if [ "$system_libdir" -eq 1 ]; then
    { { [ "$(id -u)" -eq 0 ] || [ "${#SUDO_RUN[@]}" -gt 0 ]; } && run_i ldconfig; } ||
        echo "note: run ldconfig as root so that programs find $LIBDIR/$SONAME"
fi

echo "installed: $LIBDIR/{$REAL,$SONAME,libqcow2rs.so,libqcow2rs.a} $INCLUDEDIR/qcow2rs.h $PCDIR/qcow2rs.pc"
if ! pkg-config --variable=pc_path pkg-config 2>/dev/null | tr ':' '\n' | grep -qx "$PCDIR"; then
    case ":${PKG_CONFIG_PATH:-}:" in
        *":$PCDIR:"*) ;;
        *) echo "note: for pkg-config to find qcow2rs, run:  export PKG_CONFIG_PATH=\"$PCDIR\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}\"" ;;
    esac
fi
echo "build a program with:  cc app.c \$(pkg-config --cflags --libs qcow2rs)"
