"""Threads: one image shared by several threads; disk calls release the GIL."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List

import qcow2rs

MiB = 1 << 20


def test_concurrent_reads(disk: Path, rng: random.Random) -> None:
    model = rng.randbytes(8 * MiB)
    with qcow2rs.open(disk, "rw") as img:
        img.write_at(0, model)
    with qcow2rs.open(disk) as img:
        barrier = threading.Barrier(8)

        def reader(seed: int) -> int:
            r = random.Random(seed)
            barrier.wait()
            for _ in range(150):
                off = r.randrange(len(model))
                n = r.randrange(1, 300000)
                if img.read_at(off, n) != model[off : off + n]:
                    return 1
            return 0

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(reader, range(8))) == [0] * 8


def test_concurrent_writes_to_disjoint_ranges(disk: Path, rng: random.Random, qemu_img: Any) -> None:
    chunks: List[bytes] = [rng.randbytes(MiB) for _ in range(8)]
    with qcow2rs.open(disk, "rw") as img:
        barrier = threading.Barrier(8)

        def writer(i: int) -> None:
            barrier.wait()
            # Unaligned pieces, interleaved with the other threads' allocations.
            for start in range(0, MiB, 40000):
                img.write_at(i * MiB + start, chunks[i][start : start + 40000])
            img.flush()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(writer, range(8)))
        assert img.read_at(0, 8 * MiB) == b"".join(chunks)
        assert img.check().is_clean
    assert qemu_img("check", disk).returncode == 0


# Opens a FIFO as an image. open(2) on a FIFO blocks until a writer arrives, and the writer is a
# Python thread that needs the GIL: if qcow2rs held the GIL while blocked in the open, this
# deadlocks. The feeder waits until the main thread really is blocked in the kernel first.
GIL_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    import qcow2rs

    fifo = sys.argv[1]
    main_tid = threading.get_native_id()

    def blocked_in_open():
        try:
            with open(f"/proc/self/task/{main_tid}/wchan") as f:
                wchan = f.read()
            if "wait_for_partner" in wchan or "fifo" in wchan:
                return True
            with open(f"/proc/self/task/{main_tid}/syscall") as f:
                return f.read().split()[0] in ("2", "56", "257")  # open/openat (x86_64, arm64)
        except OSError:
            return False

    def feeder():
        deadline = time.monotonic() + 5
        while not blocked_in_open() and time.monotonic() < deadline:
            time.sleep(0.01)
        fd = os.open(fifo, os.O_WRONLY)
        os.write(fd, b"not an image" * 10)
        os.close(fd)

    t = threading.Thread(target=feeder)
    t.start()
    try:
        qcow2rs.open(fifo).close()
    except qcow2rs.Error as e:
        print("error:", type(e).__name__)
    t.join()
    print("done")
    """
)


def test_open_releases_the_gil(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = subprocess.run(
        [sys.executable, "-c", GIL_SCRIPT, str(fifo)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,  # not a directory holding the qcow2rs sources, which would shadow the install
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "done"
    assert "error: CorruptImageError" in r.stdout


def test_threads_share_a_compressed_image_qemu_wrote(tmp_path: Path, qemu_img: Any) -> None:
    """Compressed clusters are decompressed outside the image's lock (a large read's on all
    cores): threads reading one image qemu-img compressed, with readinto_at and read_at, get
    exactly the raw file's bytes while another thread rewrites other clusters."""
    raw = tmp_path / "src.raw"
    lines = b"".join(b"line %06d of a compressible disk\n" % i for i in range(200_000))
    model = (lines * (8 * MiB // len(lines) + 1))[: 8 * MiB]
    raw.write_bytes(model)
    img_path = tmp_path / "c.qcow2"
    r = qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, img_path)
    assert r.returncode == 0, r.stderr
    with qcow2rs.open(img_path, "r+b") as img:
        assert all(e.compressed for e in img.map(0, 6 * MiB))

        def reader(seed: int) -> int:
            r = random.Random(seed)
            bad = 0
            for _ in range(60):
                n = r.choice([512, 4096, 100_000, 2 * MiB])
                off = r.randrange(6 * MiB - n)  # the writer's clusters lie beyond
                if seed % 2:
                    buf = bytearray(n)
                    got = img.readinto_at(off, buf)
                    bad += bytes(buf[:got]) != model[off : off + n]
                else:
                    bad += img.read_at(off, n) != model[off : off + n]
            return bad

        def writer() -> int:
            for k in range(40):
                img.write_at(6 * MiB + (k % 32) * 65536, bytes([k]) * 65536)
            return 0

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(reader, s) for s in range(4)] + [pool.submit(writer)]
            assert [f.result() for f in futures] == [0] * 5
    r = qemu_img("check", img_path)
    assert r.returncode == 0, r.stdout + r.stderr
