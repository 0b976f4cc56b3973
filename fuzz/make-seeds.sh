#!/usr/bin/env bash
# Make the seed images of the fuzz targets in fuzz/seeds/ (git-ignored), with qemu-img and
# qemu-io and with our own CLI (built here): small virtual sizes and small clusters, so that
# each input runs fast; plain, compressed (zlib, zstd), subclusters, snapshots, refcount widths,
# v2, a backing file name, lazy refcounts, LUKS and legacy AES with the password "fuzz"
# (qcow2rs::fuzzing::PASSWORD) and 1 ms of PBKDF2. LUKS uses AES-128-CBC: 16-byte keys keep
# the key material (and the seeds) under libFuzzer's default input limit of 1 MiB. Then the corpora:
#   fuzz/corpus/open_read, fuzz/corpus/check_repair: the images
#   fuzz/corpus/mutate: each image followed by a 0 byte (no mutations: qcow2rs::fuzzing::mutate)
#   fuzz/corpus/header: each image's first 4 KiB after a 0 byte (the qcow2 header codec)
# Usage: fuzz/make-seeds.sh [QCOW2RS_CLI]   (default: builds and uses target/debug/qcow2rs,
#        which the test suite has built already)
set -euo pipefail
FUZZ="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$FUZZ")"
CLI="${1:-}"
if [ -z "$CLI" ]; then
    cargo build --locked -q -p qcow2rs-cli --manifest-path "$ROOT/Cargo.toml"
    CLI="${CARGO_TARGET_DIR:-$ROOT/target}/debug/qcow2rs"
fi
S="$FUZZ/seeds"
rm -rf "$S"
mkdir -p "$S"
cd "$S"
SECRET=(--object secret,id=sec0,data=fuzz)
Q() { qemu-img "$@" >/dev/null; }
IO() { # IMAGE COMMANDS... (qemu-io, one -c each)
    local img="$1"
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}
IOX() { # IMAGE COMMANDS... on an encrypted image
    local img="$1"
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io "${SECRET[@]}" --image-opts "${args[@]}" \
        "driver=qcow2,file.filename=$img,encrypt.key-secret=sec0" >/dev/null
}
WRITES=("write -P 0x11 0 3k" "write -P 0x22 64k 1k" "write -z 96k 8k" "write -P 0x33 200k 600")

# A raw source with data, for the compressed and our images.
head -c 262144 /dev/zero >raw.src
printf 'qcow2rs fuzz seed %.0s' $(seq 1 2000) | dd of=raw.src conv=notrunc status=none
printf 'tail %.0s' $(seq 1 100) | dd of=raw.src bs=1 seek=200000 conv=notrunc status=none

# qemu-img's images
Q create -f qcow2 -o cluster_size=512 q-plain-512.qcow2 256k
IO q-plain-512.qcow2 "${WRITES[@]}"
Q create -f qcow2 -o cluster_size=4k,compat=0.10 q-v2.qcow2 256k
IO q-v2.qcow2 "${WRITES[@]}"
Q create -f qcow2 -o cluster_size=1k,refcount_bits=1 q-ref1.qcow2 256k
IO q-ref1.qcow2 "${WRITES[@]}"
Q create -f qcow2 -o cluster_size=1k,refcount_bits=64 q-ref64.qcow2 256k
IO q-ref64.qcow2 "${WRITES[@]}"
Q create -f qcow2 -o cluster_size=16k,extended_l2=on q-subcluster.qcow2 256k
IO q-subcluster.qcow2 "${WRITES[@]}" "write -P 0x44 16k 512"
Q convert -c -f raw -O qcow2 -o cluster_size=4k raw.src q-zlib.qcow2
Q convert -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd raw.src q-zstd.qcow2
Q create -f qcow2 -o cluster_size=512 q-snap.qcow2 128k
IO q-snap.qcow2 "write -P 0x11 0 2k"
Q snapshot -c one q-snap.qcow2
IO q-snap.qcow2 "write -P 0x22 1k 2k"
Q snapshot -c two q-snap.qcow2
IO q-snap.qcow2 "write -P 0x33 64k 1k"
head -c 262144 /dev/zero >base.raw
Q create -f qcow2 -o cluster_size=512 -b base.raw -F raw q-backing.qcow2 256k
IO q-backing.qcow2 "write -P 0x11 0 1k"
rm base.raw
Q create -f qcow2 -o cluster_size=512,lazy_refcounts=on q-lazy.qcow2 256k
IO q-lazy.qcow2 "${WRITES[@]}"
Q create -f qcow2 -o cluster_size=512,preallocation=metadata q-prealloc.qcow2 64k
Q create "${SECRET[@]}" -f qcow2 \
    -o cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64 \
    q-luks.qcow2 128k
IOX q-luks.qcow2 "write -P 0x11 0 3k" "write -P 0x22 64k 1k"
# qemu-img 10 still creates legacy AES images (it only refuses to run them in a guest).
Q create "${SECRET[@]}" -f qcow2 -o cluster_size=512,encrypt.format=aes,encrypt.key-secret=sec0 \
    q-aes.qcow2 128k
IOX q-aes.qcow2 "write -P 0x11 0 3k" "write -P 0x22 64k 1k"

# Ours
"$CLI" convert -f raw -O qcow2 -o cluster_size=512 raw.src r-plain-512.qcow2
"$CLI" convert -f raw -O qcow2 -o cluster_size=2k,refcount_bits=4 raw.src r-ref4.qcow2
"$CLI" convert -c -f raw -O qcow2 -o cluster_size=4k raw.src r-zlib.qcow2
"$CLI" convert -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd raw.src r-zstd.qcow2
"$CLI" convert -f raw -O qcow2 -o cluster_size=16k,extended_l2=on raw.src r-subcluster.qcow2
"$CLI" convert -f raw -O qcow2 -o cluster_size=512 raw.src r-snap.qcow2
"$CLI" snapshot -c one r-snap.qcow2
IO r-snap.qcow2 "write -P 0x22 1k 2k"
"$CLI" snapshot -c two r-snap.qcow2
"$CLI" convert "${SECRET[@]}" -f raw -O qcow2 \
    -o cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv \
    raw.src r-luks.qcow2
"$CLI" convert "${SECRET[@]}" -f raw -O qcow2 \
    -o cluster_size=512,encrypt.format=aes,encrypt.key-secret=sec0 raw.src r-aes.qcow2
rm -f raw.src

C="$FUZZ/corpus"
mkdir -p "$C/open_read" "$C/check_repair" "$C/mutate" "$C/header"
for f in *.qcow2; do
    cp "$f" "$C/open_read/seed-$f"
    cp "$f" "$C/check_repair/seed-$f"
    { cat "$f"; printf '\0'; } >"$C/mutate/seed-$f"
    { printf '\0'; head -c 4096 "$f"; } >"$C/header/seed-$f"
done
echo "fuzz seeds: $(ls "$S" | wc -l) images in $S ($(du -sh "$S" | cut -f1))"
