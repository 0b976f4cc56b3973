#!/usr/bin/env python3
"""The Python module against the other Python qcow2 readers, in one run (by hand, not in CI).

Readers: qcow2rs (this module), pyqcow (`pip install libqcow-python`), dissect.hypervisor
(`pip install dissect.hypervisor`), and for reference `qemu-io` and the Rust CLI
(`qcow2rs bench`) on the same workloads. A reader that is not installed is skipped.

Images (made by qemu-img from one raw file of SIZE bytes, default 1 GiB):
  plain       qemu-img convert -O qcow2 (incompressible data)
  aes         legacy AES (made by qcow2rs: qemu-img no longer creates them), same data
  compressed  qemu-img convert -c (compressible data)
Workloads: sequential 1 MiB reads of the whole disk; 20,000 random 4 KiB reads (the same
offsets for every reader); compressed reads on 1, 2 and 4 threads sharing one image, and on
as many separate handles; sequential 1 MiB writes and 20,000 random 4 KiB writes of a new
image. Every reader's bytes are hashed and compared with the raw file's (which qemu-img
compare matches to the image first): a reader that returns other bytes is reported as WRONG,
not timed as a win.

The machine may be shared and noisy: each figure is the median of ROUNDS runs (default 3).
  python3 scripts/bench_python.py                  # 1 GiB, 3 rounds
  python3 scripts/bench_python.py --size 64M --rounds 1 --random 2000   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import qcow2rs

MiB = 1 << 20
CHUNK = MiB
PASSWORD = "bench-password"


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s[-1:].upper() in units:
        return int(s[:-1]) * units[s[-1:].upper()]
    return int(s)


def make_raw(path: Path, size: int, compressible: bool) -> None:
    rng = random.Random(12345)
    with path.open("wb") as f:
        for i in range(size // MiB):
            if compressible:
                # Text-like: compresses about 3:1 with deflate.
                words = [b"qcow2", b"cluster", b"refcount"] + [b"%08d" % (i * 977 + j) for j in range(8)]
                line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
                block = (line * (MiB // len(line) + 1))[:MiB]
                # Vary every 4 KiB so that no two clusters are alike.
                block = b"".join(
                    block[k : k + 4096 - 8] + b"%08x" % (i * 256 + k // 4096)
                    for k in range(0, MiB, 4096)
                )
            else:
                block = rng.randbytes(MiB)
            f.write(block)


def run(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def median_time(rounds: int, f: Callable[[], object]) -> Tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# -- readers: each returns (read_at(off, n) -> bytes, close) ------------------------------------


def open_qcow2rs(path: Path, password: Optional[str]):
    img = qcow2rs.open(path, password=password)
    return img.read_at, img.close


def open_pyqcow(path: Path, password: Optional[str]):
    import pyqcow  # type: ignore[import-not-found]

    f = pyqcow.file()
    if password:
        f.set_password(password)
    f.open(str(path))
    return (lambda off, n: f.read_buffer_at_offset(n, off)), f.close


def open_dissect(path: Path, password: Optional[str]):
    if password:
        raise RuntimeError("dissect.hypervisor does not read encrypted qcow2")
    from dissect.hypervisor.disk.qcow2 import QCow2  # type: ignore[import-not-found]

    fh = path.open("rb")
    stream = QCow2(fh).open()

    def read_at(off: int, n: int) -> bytes:
        stream.seek(off)
        return stream.read(n)

    return read_at, fh.close


READERS = {"qcow2rs": open_qcow2rs, "pyqcow": open_pyqcow, "dissect": open_dissect}


def available(name: str) -> bool:
    mod = {"qcow2rs": "qcow2rs", "pyqcow": "pyqcow", "dissect": "dissect.hypervisor"}[name]
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


class NoHash:
    """Timed runs hash nothing (hashing would cost more than some readers' reads)."""

    def update(self, _b: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def seq_read(opener, path: Path, size: int, password: Optional[str], check: bool = False) -> str:
    read_at, close = opener(path, password)
    h = hashlib.sha256() if check else NoHash()
    try:
        for off in range(0, size, CHUNK):
            h.update(read_at(off, CHUNK))
    finally:
        close()
    return h.hexdigest()


def rand_read(opener, path: Path, offsets: List[int], password: Optional[str],
              check: bool = False) -> str:
    read_at, close = opener(path, password)
    h = hashlib.sha256() if check else NoHash()
    try:
        for off in offsets:
            h.update(read_at(off, 4096))
    finally:
        close()
    return h.hexdigest()


def reference(raw: Path, size: int, offsets: List[int]) -> Tuple[str, str]:
    seq, rnd = hashlib.sha256(), hashlib.sha256()
    with raw.open("rb") as f:
        for off in range(0, size, CHUNK):
            seq.update(f.read(CHUNK))
        for off in offsets:
            f.seek(off)
            rnd.update(f.read(4096))
    return seq.hexdigest(), rnd.hexdigest()


def threaded_reads(path: Path, size: int, threads: int, shared: bool,
                   offsets: Optional[List[int]] = None) -> None:
    """Sequential 1 MiB reads of the whole disk split into `threads` contiguous parts, or (with
    `offsets`) every thread reading all of `offsets` 4 KiB at a time."""
    imgs = [qcow2rs.open(path, force_share=True) for _ in range(1 if shared else threads)]
    part = size // threads

    def work(k: int) -> None:
        img = imgs[0 if shared else k]
        if offsets is not None:
            for off in offsets:
                img.read_at(off, 4096)
            return
        for off in range(k * part, (k + 1) * part, CHUNK):
            img.read_at(off, CHUNK)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for img in imgs:
        img.close()


def qemu_io_time(path: Path, size: int, password: Optional[str]) -> Optional[float]:
    exe = shutil.which("qemu-io")
    if exe is None:
        return None
    cmd = [exe, "-r", "-f", "qcow2", "-c", f"read -q 0 {size}"]
    if password:
        return None
    t = time.perf_counter()
    subprocess.run([*cmd, str(path)], check=True, capture_output=True)
    return time.perf_counter() - t


def cli_time(cli: Optional[str], path: Path, size: int) -> Optional[float]:
    if cli is None:
        return None
    out = run(cli, "bench", "-f", "qcow2", "-c", str(size // CHUNK), "-s", "1M", "-d", "1",
              str(path))
    for line in out.splitlines():
        if "Run completed in" in line:
            return float(line.split("in")[1].split()[0])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="1G", type=parse_size)
    ap.add_argument("--rounds", default=3, type=int)
    ap.add_argument("--random", default=20000, type=int, help="random 4 KiB requests")
    ap.add_argument("--cli", default=None, help="the qcow2rs CLI (default: found on PATH or "
                    "in $CARGO_TARGET_DIR/release)")
    a = ap.parse_args()
    size, rounds = a.size, a.rounds
    cli = a.cli or shutil.which("qcow2rs")
    if cli is None:
        cand = Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "release" / "qcow2rs"
        cli = str(cand) if cand.exists() else None
    rng = random.Random(7)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(a.random)]
    readers = [r for r in READERS if available(r)]
    print(f"size {size >> 20} MiB, {rounds} round(s), medians; readers: {', '.join(readers)}")
    print("(a shared, noisy machine: figures move by 10-20% between runs)\n")

    with tempfile.TemporaryDirectory(prefix="bench-py-") as d:
        tmp = Path(d)
        raw_plain, raw_comp = tmp / "plain.raw", tmp / "comp.raw"
        make_raw(raw_plain, size, compressible=False)
        make_raw(raw_comp, size, compressible=True)
        images: Dict[str, Tuple[Path, Path, Optional[str]]] = {}
        plain = tmp / "plain.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw_plain), str(plain))
        images["plain"] = (plain, raw_plain, None)
        aes = tmp / "aes.qcow2"
        qcow2rs.create(aes, size, encrypt="aes", password=PASSWORD)
        with qcow2rs.open(aes, "r+b", password=PASSWORD) as img, raw_plain.open("rb") as src:
            shutil.copyfileobj(src, img, 4 * MiB)
        images["aes"] = (aes, raw_plain, PASSWORD)
        comp = tmp / "comp.qcow2"
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw_comp), str(comp))
        images["compressed"] = (comp, raw_comp, None)
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw_plain), str(plain))
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw_comp), str(comp))

        for kind, (img, raw, pw) in images.items():
            want_seq, want_rnd = reference(raw, size, offsets)
            print(f"== {kind}")
            base_seq: Dict[str, float] = {}
            for r in readers:
                opener = READERS[r]
                try:
                    # One untimed pass checks the bytes (and warms the page cache).
                    hs = seq_read(opener, img, size, pw, check=True)
                    hr = rand_read(opener, img, offsets, pw, check=True)
                    ts, _ = median_time(rounds, lambda: seq_read(opener, img, size, pw))
                    tr, _ = median_time(rounds, lambda: rand_read(opener, img, offsets, pw))
                except Exception as e:  # noqa: BLE001 - a reader that cannot read this image
                    print(f"  {r:8} cannot read it: {type(e).__name__}: {e}")
                    continue
                ok = "" if (hs, hr) == (want_seq, want_rnd) else "   WRONG DATA"
                base_seq[r] = ts
                print(f"  {r:8} seq {size / ts / 1e6:8.0f} MB/s   rand4k {len(offsets) / tr:8.0f} "
                      f"IOPS{ok}")
            if "qcow2rs" in base_seq:
                for r, t in base_seq.items():
                    if r != "qcow2rs":
                        print(f"  qcow2rs/{r} sequential: {t / base_seq['qcow2rs']:.2f}x")
            qi = qemu_io_time(img, size, pw)
            if qi is not None:
                print(f"  qemu-io  seq (one read of the disk) {size / qi / 1e6:8.0f} MB/s "
                      f"(process start included)")
            if pw is None:
                tc = statistics.median(
                    t for t in (cli_time(cli, img, size) for _ in range(rounds)) if t is not None
                ) if cli else None
                if tc and "qcow2rs" in base_seq:
                    print(f"  Rust CLI bench -s 1M -d 1: {size / tc / 1e6:.0f} MB/s; Python/CLI "
                          f"{tc / base_seq['qcow2rs']:.2f}x")
        threaded_reads(comp, size, 1, True)  # warm the page cache
        for what, offs in (("sequential 1 MiB reads, disjoint parts", None),
                           ("random 4 KiB reads, all offsets on every thread", offsets)):
            print(f"== compressed, threads: {what}")
            one = None
            for n in (1, 2, 4):
                for shared in (True, False):
                    if n == 1 and not shared:
                        continue
                    t, _ = median_time(rounds, lambda: threaded_reads(comp, size, n, shared, offs))
                    work = size if offs is None else n * len(offs) * 4096
                    one = one or t / work
                    how = "one shared image" if shared else "separate handles"
                    print(f"  {n} thread(s), {how:16}: {work / t / 1e6:7.0f} MB/s  "
                          f"{one / (t / work):.2f}x")
        print("== writes (qcow2rs, a new image)")
        data = memoryview(raw_plain.read_bytes()[: 64 * MiB])
        new = tmp / "w.qcow2"

        def seq_write() -> None:
            qcow2rs.create(new, size)
            with qcow2rs.open(new, "r+b") as w:
                for off in range(0, size, CHUNK):
                    k = off % len(data)
                    w.write_at(off, data[k : k + CHUNK])

        def rand_write() -> None:
            qcow2rs.create(new, size)
            with qcow2rs.open(new, "r+b") as w:
                for i, off in enumerate(offsets):
                    w.write_at(off, data[i * 4096 % len(data) :][:4096])

        t, _ = median_time(rounds, seq_write)
        print(f"  sequential 1 MiB: {size / t / 1e6:.0f} MB/s")
        t, _ = median_time(rounds, rand_write)
        print(f"  random 4 KiB:     {len(offsets) / t:.0f} IOPS")
        run("qemu-img", "check", str(new))


if __name__ == "__main__":
    main()
