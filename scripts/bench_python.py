#!/usr/bin/env python3
"""The Python module against the other Python qcow2 readers, in one run (by hand, not in CI).

Readers: qcow2rs (this module: `read_at`, a new bytes object per request, as every other reader
here returns), qcow2rs-into (`readinto_at` into one reused buffer, which is what the Rust CLI's
`bench` does), pyqcow (`pip install libqcow-python`), dissect.hypervisor (`pip install
dissect.hypervisor`). A reader that is not installed is skipped. For reference, on the same
images: the Rust CLI (`qcow2rs bench -s 1M -d 1`: sequential 1 MiB reads, one at a time, into
one buffer, the clock started after the open), `qemu-img bench` with the same flags, and
`qemu-io -c "read 0 SIZE"` (one request for the whole disk; the rate qemu-io reports itself, so
process start-up is not counted).

Images (from one raw file of SIZE bytes, default 1 GiB):
  plain       qemu-img convert -O qcow2 (incompressible data)
  aes         legacy AES (made by qcow2rs: qemu-img no longer creates them), same data
  compressed  qemu-img convert -c, of text (random words: every cluster really is compressed,
              to about a third, and inflating it is real work)
Workloads: sequential 1 MiB reads of the whole disk; 20,000 random 4 KiB reads (the same
offsets for every reader); compressed reads on 1, 2 and 4 threads sharing one image, and on
as many separate handles; sequential 1 MiB writes and 20,000 random 4 KiB writes of a new
image. Every reader's bytes are hashed in an untimed pass (which also brings the image into
the page cache) and compared with the raw file's (which qemu-img compare matches to the image
first): a reader that returns other bytes is reported as WRONG DATA, not timed as a win.

Timing. Every timed run opens the image first and closes it after the clock stops (the CLI and
qemu-img bench time no open either). Rounds are interleaved (round 1 of every reader, then
round 2, ...), so a burst of load from other processes hits all readers alike rather than one;
each figure is the median over ROUNDS (default 3). Next to each wall-clock rate is the rate per
second of CPU time the process used (all its threads): on a shared machine the wall-clock rate
also counts the time spent waiting for a core, the CPU rate does not (for a reader that uses
several cores it is lower than the wall-clock rate on an idle machine). The load average
(`uptime`) is printed before and after: with a load above the core count, wall-clock figures
mostly measure the other processes.

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
    pool = b""
    if compressible:
        # Text: words drawn from a vocabulary of 1,024 with Zipf's law, as in prose (deflate
        # gets each cluster to about 30%); each 1 MiB block is a slice of a 16 MiB pool at a
        # random offset, with a tag every 4 KiB so that no two clusters are alike.
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(1024)]
        zipf = [1 / (r + 1) for r in range(len(vocab))]
        pool = " ".join(rng.choices(vocab, weights=zipf, k=(16 * MiB) // 5)).encode()
    with path.open("wb") as f:
        for i in range(size // MiB):
            if compressible:
                at = rng.randrange(0, len(pool) - MiB)
                block = b"".join(
                    pool[at + k : at + k + 4096 - 8] + b"%08x" % (i * 256 + k // 4096)
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


class Timed:
    """Wall-clock and CPU seconds of the timed runs of one measurement, across rounds."""

    def __init__(self) -> None:
        self.wall: List[float] = []
        self.cpu: List[float] = []

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def rate(self, work: float) -> Tuple[float, float]:
        """(work per wall-clock second, work per CPU second), medians."""
        return work / statistics.median(self.wall), work / max(statistics.median(self.cpu), 1e-9)


# -- readers: each returns (read_at(off, n) -> bytes, close) ------------------------------------


def open_qcow2rs(path: Path, password: Optional[str]):
    img = qcow2rs.open(path, password=password)
    return img.read_at, img.close


def open_qcow2rs_into(path: Path, password: Optional[str]):
    img = qcow2rs.open(path, password=password)
    bufs: Dict[int, Tuple[bytearray, memoryview]] = {}

    def read_at(off: int, n: int) -> memoryview:
        if n not in bufs:
            b = bytearray(n)
            bufs[n] = (b, memoryview(b))
        b, v = bufs[n]
        return v[: img.readinto_at(off, b)]

    return read_at, img.close


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


READERS = {
    "qcow2rs": open_qcow2rs,
    "qcow2rs-into": open_qcow2rs_into,
    "pyqcow": open_pyqcow,
    "dissect": open_dissect,
}


def available(name: str) -> bool:
    mod = {"qcow2rs": "qcow2rs", "qcow2rs-into": "qcow2rs", "pyqcow": "pyqcow",
           "dissect": "dissect.hypervisor"}[name]
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


def seq_read(opener, path: Path, size: int, password: Optional[str], check: bool = False,
             timed: Optional[Timed] = None) -> str:
    read_at, close = opener(path, password)
    h = hashlib.sha256() if check else NoHash()
    try:
        t, c = time.perf_counter(), time.process_time()
        for off in range(0, size, CHUNK):
            h.update(read_at(off, CHUNK))
        if timed is not None:
            timed.add(time.perf_counter() - t, time.process_time() - c)
    finally:
        close()
    return h.hexdigest()


def rand_read(opener, path: Path, offsets: List[int], password: Optional[str],
              check: bool = False, timed: Optional[Timed] = None) -> str:
    read_at, close = opener(path, password)
    h = hashlib.sha256() if check else NoHash()
    try:
        t, c = time.perf_counter(), time.process_time()
        for off in offsets:
            h.update(read_at(off, 4096))
        if timed is not None:
            timed.add(time.perf_counter() - t, time.process_time() - c)
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
                   offsets: Optional[List[int]] = None, timed: Optional[Timed] = None) -> None:
    """Sequential 1 MiB reads of the whole disk split into `threads` contiguous parts, or (with
    `offsets`) every thread reading all of `offsets` 4 KiB at a time; the clock runs from the
    start of the first thread to the end of the last (the opens and closes are not timed)."""
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
    t, c = time.perf_counter(), time.process_time()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    if timed is not None:
        timed.add(time.perf_counter() - t, time.process_time() - c)
    for img in imgs:
        img.close()


def qemu_io_time(path: Path, size: int, password: Optional[str]) -> Optional[float]:
    """Seconds for one read of the whole disk, as qemu-io reports it (start-up not counted)."""
    exe = shutil.which("qemu-io")
    if exe is None or password:
        return None
    out = run(exe, "-r", "-f", "qcow2", "-c", f"read 0 {size}", str(path))
    # "1 GiB, 1 ops; 00.52 sec (1.9 GiB/sec and 1.9 ops/sec)", or "...; 00:00:02.36 (..."
    for line in out.splitlines():
        if " ops; " in line:
            t = line.split(" ops; ")[1].split(" (")[0].replace(" sec", "")
            secs = 0.0
            for field in t.split(":"):
                secs = secs * 60 + float(field)
            return secs
    return None


def bench_time(tool: Optional[str], path: Path, size: int) -> Optional[float]:
    """Seconds of `TOOL bench -s 1M -d 1` over the whole disk (qemu-img's or the Rust CLI's:
    sequential 1 MiB reads, one at a time, into one buffer; the open is not timed)."""
    if tool is None:
        return None
    out = run(tool, "bench", "-f", "qcow2", "-c", str(size // CHUNK), "-s", "1M", "-d", "1",
              str(path))
    for line in out.splitlines():
        if "Run completed in" in line:
            return float(line.split("in")[1].split()[0])
    return None


def load() -> str:
    return run("uptime").strip()


def fmt_rate(r: Tuple[float, float], unit: float, width: int = 7) -> str:
    return f"{r[0] / unit:{width}.0f} (cpu {r[1] / unit:{width}.0f})"


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
    qemu_img = shutil.which("qemu-img")
    rng = random.Random(7)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(a.random)]
    readers = [r for r in READERS if available(r)]
    print(f"size {size >> 20} MiB, {rounds} round(s) interleaved, medians; "
          f"{os.cpu_count()} cores; readers: {', '.join(readers)}; CLI: {cli}")
    print(f"load before: {load()}")
    print("rates: wall clock (cpu: per second of the process's CPU time, all threads)\n")

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
        print(f"compressed image: {comp.stat().st_size >> 20} MiB for {size >> 20} MiB of data")

        for kind, (img, raw, pw) in images.items():
            want_seq, want_rnd = reference(raw, size, offsets)
            print(f"== {kind}   MB/s sequential 1 MiB, IOPS random 4 KiB")
            ok: Dict[str, str] = {}
            for r in readers:
                opener = READERS[r]
                try:
                    # One untimed pass checks the bytes (and brings the image into the cache).
                    hs = seq_read(opener, img, size, pw, check=True)
                    hr = rand_read(opener, img, offsets, pw, check=True)
                except Exception as e:  # noqa: BLE001 - a reader that cannot read this image
                    print(f"  {r:12} cannot read it: {type(e).__name__}: {e}")
                    continue
                ok[r] = "" if (hs, hr) == (want_seq, want_rnd) else "   WRONG DATA"
            seq = {r: Timed() for r in ok}
            rnd = {r: Timed() for r in ok}
            tools = {"Rust CLI bench": cli, "qemu-img bench": qemu_img} if pw is None else {}
            tool_t: Dict[str, List[float]] = {t: [] for t in tools}
            qio: List[float] = []
            for _ in range(rounds):
                for r in ok:
                    seq_read(READERS[r], img, size, pw, timed=seq[r])
                    rand_read(READERS[r], img, offsets, pw, timed=rnd[r])
                for t, exe in tools.items():
                    secs = bench_time(exe, img, size)
                    if secs is not None:
                        tool_t[t].append(secs)
                qi = qemu_io_time(img, size, pw)
                if qi is not None:
                    qio.append(qi)
            for r in ok:
                print(f"  {r:12} seq {fmt_rate(seq[r].rate(size), 1e6)} MB/s   rand4k "
                      f"{fmt_rate(rnd[r].rate(len(offsets)), 1)} IOPS{ok[r]}")
            med = {r: seq[r].rate(size)[0] for r in ok}
            for t, ts in tool_t.items():
                if ts:
                    med[t] = size / statistics.median(ts)
                    print(f"  {t + ' -s 1M -d 1':24}: {med[t] / 1e6:6.0f} MB/s")
            if qio:
                med["qemu-io"] = size / statistics.median(qio)
                print(f"  {'qemu-io read 0 SIZE':24}: {med['qemu-io'] / 1e6:6.0f} MB/s "
                      "(its own report)")
            for mine in ("qcow2rs", "qcow2rs-into"):
                if mine in med:
                    print(f"  {mine} sequential / " + ", ".join(
                        f"{o} {med[mine] / v:.2f}x" for o, v in med.items()
                        if not o.startswith("qcow2rs")))
        print(f"load: {load()}")
        threaded_reads(comp, size, 1, True)  # warm the page cache
        for what, offs in (("sequential 1 MiB reads, disjoint parts", None),
                           ("random 4 KiB reads, all offsets on every thread", offsets)):
            print(f"== compressed, threads: {what}")
            runs = [(n, shared) for n in (1, 2, 4) for shared in (True, False)
                    if n > 1 or shared]
            timed = {k: Timed() for k in runs}
            for _ in range(rounds):
                for n, shared in runs:
                    threaded_reads(comp, size, n, shared, offs, timed=timed[(n, shared)])
            one = None
            for n, shared in runs:
                work = size if offs is None else n * len(offs) * 4096
                rate = timed[(n, shared)].rate(work)
                one = one or rate[0]
                how = "one shared image" if shared else "separate handles"
                print(f"  {n} thread(s), {how:16}: {fmt_rate(rate, 1e6)} MB/s  "
                      f"{rate[0] / one:.2f}x")
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
        print(f"load after: {load()}")


if __name__ == "__main__":
    main()
