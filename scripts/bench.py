#!/usr/bin/env python3
"""qcow2rs against qemu-img, side by side, on the same workloads in the same run.

Builds the release `qcow2rs`, then for each workload and cache mode runs `qemu-img bench` and
`qcow2rs bench` with the same flags on freshly created identical images (both made by
`qemu-img create -f qcow2`) in one temporary directory, R times each with the order alternating,
and prints medians: throughput, the ratio ours/QEMU, our unsafe-mode throughput and the
writeback/unsafe ratio for allocating writes, and fdatasyncs per flush (ours from its own
count; QEMU's from `strace -c` in one extra untimed run, which counts the syncs at close too).

Workloads (full size; QCOW2RS_BENCH_SCALE or --scale or --quick shrinks sizes and counts):
  seq64k    sequential 64 KiB allocating writes filling a 1 GiB image (-s 64k -c 16384)
  rand4k    20,000 "random" 4 KiB allocating writes, flush every 64 (-d 64 --flush-interval 64)
  rand4k-f1 the same with a flush after every write (-d 1 --flush-interval 1)
  read4k    "random" 4 KiB reads of a fully allocated 1 GiB image (-c 262144 -d 64)
  convert   convert -O qcow2 of a 1 GiB raw file with mixed data, zeros and holes
  encrypted LUKS and legacy AES images: sequential 64 KiB writes and reads, scattered 4 KiB
            reads and allocating writes, against qemu-io aio batches of 64 (qemu-img bench has
            no --object, so it cannot open an encrypted image), plus our plaintext throughput on
            the same sequential workloads (in the same rounds, the order rotating, after one
            untimed fill that warms the page cache) and the cipher's own speed in memory
qemu-img bench has no random mode: the random workloads use a large step (an odd multiple of
4 KiB near 0.38 of the image) so that offsets wrap around the image and scatter; for writes the
step is chosen so that every request lands in a distinct, unallocated 64 KiB cluster.

Only the Python standard library is used. Run from anywhere:
  python3 scripts/bench.py            # full size, R=3 (about half an hour on a 2-core machine)
  python3 scripts/bench.py --quick    # 1/32 scale, R=1: a smoke run
"""

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(ROOT, "target", "release", "qcow2rs")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Workloads that allocate clusters: the writeback/unsafe target applies to them.
ALLOCATING = ("seq64k", "rand4k", "rand4k-f1")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(
            f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}{r.stderr}"
        )
    return r


def scatter_step(image_size, count, block=4 * KiB, cluster=64 * KiB):
    """An odd multiple of `block` near 0.382 of the image (at most qemu's INT_MAX step) such
    that the first `count` requests land in distinct clusters."""
    blocks = image_size // block
    per = cluster // block
    limit = min(blocks, (2**31 - 1) // block)
    base = int(blocks * (3 - math.sqrt(5)) / 2) % limit
    distinct_possible = count <= blocks // per
    for d in range(0, limit):
        for k in (base + d, base - d):
            if k <= 0 or k >= limit or k % 2 == 0:
                continue
            if not distinct_possible:
                return k * block
            seen = set()
            for i in range(count):
                c = (i * k % blocks) // per
                if c in seen:
                    break
                seen.add(c)
            else:
                return k * block
    raise SystemExit(f"no scattering step for {count} requests on {image_size} bytes")


def flush_count(count, depth, interval):
    """Flushes qemu-img bench issues (its schedule; the last one at the end)."""
    if not interval:
        return 0
    burst = min(depth, count)
    first = burst + (count - burst) % interval
    return (count - first) // interval + 1


def qemu_time(out):
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise SystemExit(f"unexpected qemu-img bench output:\n{out}")
    return float(m.group(1))


def strace_syncs(path):
    n = 0
    with open(path) as f:
        for line in f:
            t = line.split()
            if t and t[-1] in ("fdatasync", "fsync") and len(t) >= 5:
                n += int(t[3])
    return n


class Bench:
    def __init__(self, args):
        self.a = args
        self.dir = tempfile.mkdtemp(prefix="qcow2rs-bench-", dir=args.dir)
        self.strace = shutil.which("strace") if not args.no_strace else None
        self.results = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def create(self, name, size):
        p = self.path(name)
        if os.path.exists(p):
            os.unlink(p)
        run(["qemu-img", "create", "-q", "-f", "qcow2", p, str(size)])
        return p

    # ------------------------------------------------------------------ one run of a tool

    def bench_qemu(self, img, flags, cache, strace=False):
        cmd = ["qemu-img", "bench", "-f", "qcow2", "-t", cache] + flags + [img]
        if strace:
            so = self.path("strace.txt")
            cmd = [self.strace, "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", so] + cmd
            r = run(cmd)
            return qemu_time(r.stdout), strace_syncs(so)
        return qemu_time(run(cmd).stdout), None

    def bench_ours(self, img, flags, cache, extra=()):
        cmd = [OURS, "bench", "-f", "qcow2", "-t", cache, "--output=json"] + list(extra) + flags + [img]
        j = json.loads(run(cmd).stdout)
        return j["seconds"], j

    def convert(self, tool, src, cache, strace=False):
        dst = self.path("conv.qcow2")
        if os.path.exists(dst):
            os.unlink(dst)
        prog = "qemu-img" if tool == "qemu" else OURS
        cmd = [prog, "convert", "-f", "raw", "-O", "qcow2"]
        if cache != "default":
            cmd += ["-t", cache]
        cmd += [src, dst]
        so = None
        if strace:
            so = self.path("strace.txt")
            cmd = [self.strace, "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", so] + cmd
        t0 = time.perf_counter()
        run(cmd)
        dt = time.perf_counter() - t0
        # Time until the output is durable: qemu-img's default (unsafe) never syncs it.
        fd = os.open(dst, os.O_RDONLY)
        os.fdatasync(fd)
        os.close(fd)
        dt_sync = time.perf_counter() - t0
        os.unlink(dst)
        return (dt, dt_sync), (strace_syncs(so) if so else None)

    # ------------------------------------------------------------------ workloads

    def workloads(self):
        s = self.a.scale
        seq_size = max(64 * MiB, int(GiB * s) // MiB * MiB)
        rand_size = max(64 * MiB, int(4 * GiB * s) // MiB * MiB)
        rand_count = max(64, int(20000 * s))
        read_size = seq_size
        read_count = max(1024, int(262144 * s))
        w = {
            "seq64k": dict(
                size=seq_size,
                flags=["-w", "-s", "64k", "-c", str(seq_size // (64 * KiB))],
                count=seq_size // (64 * KiB), bufsize=64 * KiB, depth=64, interval=0,
                what=f"sequential 64 KiB allocating writes, {seq_size // MiB} MiB",
            ),
            "rand4k": dict(
                size=rand_size,
                flags=["-w", "-c", str(rand_count), "-d", "64", "--flush-interval", "64",
                       "-S", str(scatter_step(rand_size, rand_count))],
                count=rand_count, bufsize=4 * KiB, depth=64, interval=64,
                what=f"{rand_count} scattered 4 KiB allocating writes on {rand_size // MiB} MiB, "
                     "flush every 64",
            ),
            "rand4k-f1": dict(
                size=rand_size,
                flags=["-w", "-c", str(rand_count), "-d", "1", "--flush-interval", "1",
                       "-S", str(scatter_step(rand_size, rand_count))],
                count=rand_count, bufsize=4 * KiB, depth=1, interval=1,
                what=f"{rand_count} scattered 4 KiB allocating writes, flush after each",
            ),
            "read4k": dict(
                size=read_size,
                flags=["-c", str(read_count), "-d", "64",
                       "-S", str(scatter_step(read_size, read_count, cluster=4 * KiB))],
                count=read_count, bufsize=4 * KiB, depth=64, interval=0,
                what=f"{read_count} scattered 4 KiB reads of an allocated {read_size // MiB} MiB image",
            ),
            "convert": dict(
                size=seq_size, what=f"convert -O qcow2 of a {seq_size // MiB} MiB raw file "
                                    "(1/2 random data, 1/8 text, 1/8 zeros, 1/4 holes)",
            ),
            "encrypted": dict(
                size=seq_size, count=max(1024, int(65536 * s)),
                what=f"LUKS (aes-256-xts) and legacy AES images of {seq_size // MiB} MiB: sequential "
                     "64 KiB writes and reads, scattered 4 KiB reads and allocating writes, "
                     "depth 64, writeback; qemu side: qemu-io aio batches (qemu-img bench takes no "
                     "secret)",
            ),
        }
        return {k: v for k, v in w.items() if k in self.a.workloads}

    def make_read_image(self, size):
        p = self.create("read.qcow2", size)
        run(["qemu-img", "bench", "-q", "-w", "-f", "qcow2", "-s", "64k", "-c",
             str(size // (64 * KiB)), "--pattern", "0x5a", p])
        return p

    def make_raw(self, size):
        p = self.path("src.raw")
        chunk = MiB
        text = (b"qcow2rs convert benchmark: compressible text block. " * 20000)[:chunk]
        with open(p, "wb") as f:
            f.truncate(size)
            for i in range(size // chunk):
                kind = i % 8
                if kind < 4:
                    f.seek(i * chunk)
                    f.write(os.urandom(chunk))
                elif kind == 4:
                    f.seek(i * chunk)
                    f.write(text)
                elif kind == 5:
                    f.seek(i * chunk)
                    f.write(bytes(chunk))
                # 6, 7: holes
            f.flush()
            os.fsync(f.fileno())
        return p

    # ------------------------------------------------------------------ encrypted images

    SECRET = "secret,id=k,data=bench-password"

    def create_encrypted(self, name, size, fmt):
        p = self.path(name)
        if os.path.exists(p):
            os.unlink(p)
        o = f"encrypt.format={fmt},encrypt.key-secret=k" + (",encrypt.iter-time=10" if fmt == "luks" else "")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", self.SECRET, "-o", o, p, str(size)])
        return p

    def qemu_io_time(self, img, offsets, bufsize, write, depth=64):
        """Wall time of qemu-io running the requests as aio batches of `depth` (each batch
        drained with aio_flush), minus the time of the same qemu-io opening and closing the
        image (start-up and PBKDF2)."""
        opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=k"
        # The commands go through stdin: hundreds of thousands of -c arguments exceed ARG_MAX.
        cmds = []
        for i, o in enumerate(offsets):
            cmds.append(f"aio_{'write' if write else 'read'} -q {o} {bufsize}")
            if (i + 1) % depth == 0:
                cmds.append("aio_flush")
        cmds.append("aio_flush")
        base = ["qemu-io", "-t", "writeback", "--object", self.SECRET, "--image-opts"]
        t0 = time.perf_counter()
        r = run(base + [opts], input="\n".join(cmds) + "\n")
        dt = time.perf_counter() - t0
        if "failed" in r.stdout:
            raise SystemExit(f"qemu-io failed: {r.stdout[-500:]}")
        t0 = time.perf_counter()
        run(base + [opts], input="aio_flush\n")
        return max(dt - (time.perf_counter() - t0), 1e-6)

    def ours_encrypted(self, img, flags):
        cmd = [OURS, "bench", "--object", self.SECRET, "--image-opts",
               f"driver=qcow2,file.filename={img},encrypt.key-secret=k",
               "-t", "writeback", "--output=json"] + flags
        return json.loads(run(cmd).stdout)["seconds"]

    def run_encrypted(self, w):
        R = self.a.repeat
        size, n4 = w["size"], w["count"]
        n64 = size // (64 * KiB)
        step_r = scatter_step(size, n4, cluster=4 * KiB)
        step_w = scatter_step(size, n4)
        seq = [i * 64 * KiB for i in range(n64)]
        scat = lambda step: [(i * step) % size for i in range(n4)]
        self.crypto = []
        # One untimed plaintext fill first: on a VM, page-cache pages the guest has never used
        # are slow to touch the first time (the host backs them on demand), which would
        # penalise whichever run comes first.
        img = self.create("warm.qcow2", size)
        self.bench_ours(img, ["-w", "-s", "64k", "-c", str(n64)], "writeback")
        os.unlink(img)
        for fmt in ("luks", "aes"):
            cells = {k: {"qemu": [], "ours": []} for k in ("seq64k-w", "seq64k-r", "rand4k-r", "rand4k-w")}
            # Our plaintext throughput on the same sequential workloads, for the "at least
            # half" target, measured in the same rounds (the order rotating) as the encrypted
            # runs it is compared with.
            plain = {"seq64k-w": [], "seq64k-r": []}
            for r in range(R):
                tools = ("qemu", "ours", "plain")
                order = tools[r % 3:] + tools[:r % 3]
                for tool in order:
                    if tool == "plain":
                        img = self.create("plain.qcow2", size)
                        t, _ = self.bench_ours(img, ["-w", "-s", "64k", "-c", str(n64)], "writeback")
                        plain["seq64k-w"].append(size / MiB / t)
                        t, _ = self.bench_ours(img, ["-s", "64k", "-c", str(n64)], "writeback")
                        plain["seq64k-r"].append(size / MiB / t)
                        os.unlink(img)
                        continue
                    img = self.create_encrypted(f"{tool}.qcow2", size, fmt)
                    if tool == "qemu":
                        cells["seq64k-w"]["qemu"].append(size / MiB / self.qemu_io_time(img, seq, 64 * KiB, True))
                        cells["seq64k-r"]["qemu"].append(size / MiB / self.qemu_io_time(img, seq, 64 * KiB, False))
                        cells["rand4k-r"]["qemu"].append(n4 / self.qemu_io_time(img, scat(step_r), 4 * KiB, False))
                        img = self.create_encrypted(f"{tool}.qcow2", size, fmt)
                        cells["rand4k-w"]["qemu"].append(n4 / self.qemu_io_time(img, scat(step_w), 4 * KiB, True))
                    else:
                        cells["seq64k-w"]["ours"].append(size / MiB / self.ours_encrypted(img, ["-w", "-s", "64k", "-c", str(n64)]))
                        cells["seq64k-r"]["ours"].append(size / MiB / self.ours_encrypted(img, ["-s", "64k", "-c", str(n64)]))
                        cells["rand4k-r"]["ours"].append(n4 / self.ours_encrypted(img, ["-c", str(n4), "-S", str(step_r)]))
                        img = self.create_encrypted(f"{tool}.qcow2", size, fmt)
                        cells["rand4k-w"]["ours"].append(n4 / self.ours_encrypted(img, ["-w", "-c", str(n4), "-S", str(step_w)]))
                    os.unlink(img)
            for k, v in cells.items():
                unit = "MiB/s" if k.startswith("seq") else "IOPS"
                row = dict(fmt=fmt, workload=k, unit=unit, qemu=statistics.median(v["qemu"]),
                           ours=statistics.median(v["ours"]), qemu_all=v["qemu"], ours_all=v["ours"])
                if k in plain:
                    row["plain"] = statistics.median(plain[k])
                    row["plain_all"] = plain[k]
                self.crypto.append(row)
                log(f"  {fmt:<5} {k:<9} qemu-io {fmt_list(row['qemu_all'])}  ours {fmt_list(row['ours_all'])} {unit}"
                    + (f"  ours plaintext {fmt_list(plain[k])}" if k in plain else ""))
        self.cipher = [json.loads(run([OURS, "bench", "--cipher-speed", c]).stdout)
                       for c in ("luks", "luks-cbc", "aes")]

    # ------------------------------------------------------------------ the runs

    def run_bench(self, name, w, caches):
        R = self.a.repeat
        img_name = "img.qcow2"
        read_img = self.make_read_image(w["size"]) if name == "read4k" else None
        mib = w["count"] * w["bufsize"] / MiB

        def fresh():
            return read_img if read_img else self.create(img_name, w["size"])

        # One repetition runs every cell once; odd repetitions run them in reverse order, so
        # each qemu/ours pair alternates and slow phases of the machine hit all cells alike.
        cells = []
        for cache in caches:
            cells += [("qemu", cache), ("ours", cache)]
        if name in ALLOCATING and "unsafe" in self.a.ours_extra:
            cells.append(("ours", "unsafe"))
            if w["interval"]:
                # The floor of a durable flush: unsafe, plus one fdatasync per flush.
                cells.append(("ours", "floor"))
        got = {c: [] for c in cells}
        for r in range(R):
            for tool, cache in (cells if r % 2 == 0 else cells[::-1]):
                img = fresh()
                if tool == "qemu":
                    t, j = self.bench_qemu(img, w["flags"], cache)
                elif cache == "floor":
                    t, j = self.bench_ours(img, w["flags"], "unsafe", ["--sync-flushes"])
                else:
                    t, j = self.bench_ours(img, w["flags"], cache)
                got[(tool, cache)].append((mib / t, j))
        med = lambda k: statistics.median(x for x, _ in got[k]) if got.get(k) else None
        allv = lambda k: [x for x, _ in got.get(k, [])]
        for cache in caches:
            qsync = None
            if self.strace:
                _, qsync = self.bench_qemu(fresh(), w["flags"], cache, strace=True)
            flushes = flush_count(w["count"], w["depth"], w["interval"])
            row = dict(
                workload=name, cache=cache, qemu=med(("qemu", cache)), ours=med(("ours", cache)),
                qemu_all=allv(("qemu", cache)), ours_all=allv(("ours", cache)),
                unsafe=med(("ours", "unsafe")), unsafe_all=allv(("ours", "unsafe")),
                floor=med(("ours", "floor")), floor_all=allv(("ours", "floor")),
                flushes=flushes, requests=w["count"],
                ours_syncs=statistics.median(j["fdatasyncs"] for _, j in got[("ours", cache)]),
                qemu_syncs=qsync,
            )
            self.results.append(row)
            self.report_row(row)
        if read_img:
            os.unlink(read_img)
        p = self.path(img_name)
        if os.path.exists(p):
            os.unlink(p)

    def run_convert(self, w):
        R = self.a.repeat
        src = self.make_raw(w["size"])
        mib = w["size"] / MiB
        caches = ("default", "writeback")
        cells = [(tool, c) for c in caches for tool in ("qemu", "ours")]
        got = {c: [] for c in cells}
        for r in range(R):
            for tool, cache in (cells if r % 2 == 0 else cells[::-1]):
                dt, _ = self.convert(tool, src, cache)
                got[(tool, cache)].append(dt)
        syncs = {}
        if self.strace:
            for cache in caches:
                for tool in ("qemu", "ours"):
                    syncs[(tool, cache)] = self.convert(tool, src, cache, strace=True)[1]
        rows = [("default", 0, "default (unsafe)"), ("default", 1, "default+fdatasync"),
                ("writeback", 0, "-t writeback")]
        for cache, k, label in rows:
            q = [mib / t[k] for t in got[("qemu", cache)]]
            o = [mib / t[k] for t in got[("ours", cache)]]
            row = dict(workload="convert", cache=label,
                       qemu=statistics.median(q), ours=statistics.median(o), qemu_all=q,
                       ours_all=o, unsafe=None, unsafe_all=[], floor=None, floor_all=[],
                       flushes=0, requests=0, ours_syncs=syncs.get(("ours", cache)),
                       qemu_syncs=syncs.get(("qemu", cache)))
            self.results.append(row)
            self.report_row(row)
        os.unlink(src)

    def report_row(self, r):
        log(f"  {r['workload']:<10} {r['cache']:<18} qemu {fmt_list(r['qemu_all'])}  "
            f"ours {fmt_list(r['ours_all'])}"
            + (f"  unsafe {fmt_list(r['unsafe_all'])}" if r["unsafe_all"] else "")
            + (f"  floor {fmt_list(r['floor_all'])}" if r["floor_all"] else "")
            + f"  syncs ours {r['ours_syncs']} qemu {r['qemu_syncs']}")


def fmt_list(xs):
    return "[" + ", ".join(f"{x:.0f}" for x in xs) + "]"


def per(n, d):
    if n is None or not d:
        return "n/a"
    return f"{n / d:.2f}"


def table(results, strace):
    hdr = ["workload", "cache", "qemu MiB/s", "ours MiB/s", "ours/qemu", "unsafe MiB/s",
           "ours/unsafe", "floor MiB/s", "ours/floor", "syncs/flush ours", "syncs/flush qemu*", "syncs/req ours",
           "syncs/req qemu*"]
    rows = []
    for r in results:
        conv = r["workload"] == "convert"
        rows.append([
            r["workload"], r["cache"], f"{r['qemu']:.1f}", f"{r['ours']:.1f}",
            f"{r['ours'] / r['qemu']:.2f}x",
            f"{r['unsafe']:.1f}" if r["unsafe"] else "-",
            f"{r['ours'] / r['unsafe']:.2f}x" if r["unsafe"] else "-",
            f"{r['floor']:.1f}" if r["floor"] else "-",
            f"{r['ours'] / r['floor']:.2f}x" if r["floor"] else "-",
            per(r["ours_syncs"], r["flushes"]) if r["flushes"] else "-",
            (per(r["qemu_syncs"], r["flushes"]) if strace else "n/a") if r["flushes"] else "-",
            (str(r["ours_syncs"]) + " total" if conv and r["ours_syncs"] is not None
             else ("n/a" if conv else per(r["ours_syncs"], r["requests"]))),
            ((str(r["qemu_syncs"]) + " total" if conv else per(r["qemu_syncs"], r["requests"]))
             if strace else "n/a"),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    out = [line(hdr), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def targets(results):
    """The issue's targets, checked on this run's medians."""
    out = []
    by = {(r["workload"], r["cache"]): r for r in results}
    for r in results:
        ok = r["ours"] >= r["qemu"]
        out.append((ok, f"{r['workload']} {r['cache']}: ours/qemu {r['ours'] / r['qemu']:.2f}x >= 1.0"))
    for w in ALLOCATING:
        r = by.get((w, "writeback"))
        if r and r["unsafe"]:
            q = r["ours"] / r["unsafe"]
            out.append((q >= 0.9, f"{w} writeback/unsafe {q:.2f}x >= 0.9"))
    for w in ("rand4k", "rand4k-f1"):
        r = by.get((w, "writeback"))
        if r:
            p = r["ours_syncs"] / r["flushes"]
            out.append((p <= 2.0, f"{w} writeback: {p:.2f} fdatasyncs per flush <= 2"))
        r = by.get((w, "writethrough"))
        if r:
            p = r["ours_syncs"] / r["requests"]
            out.append((p <= 2.0, f"{w} writethrough: {p:.2f} fdatasyncs per allocating write <= 2"))
    r = by.get(("seq64k", "writethrough"))
    if r:
        p = r["ours_syncs"] / r["requests"]
        out.append((p <= 2.0, f"seq64k writethrough: {p:.2f} fdatasyncs per allocating write <= 2"))
    for c in ("writeback", "writethrough"):
        r = by.get(("read4k", c))
        if r:
            out.append((r["ours_syncs"] == 0, f"read4k {c}: {r['ours_syncs']} fdatasyncs == 0"))
    return out


def build():
    log("building: cargo build --release -p qcow2rs-cli")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "qcow2rs-cli"], cwd=ROOT, check=True)


def filesystem(d):
    """The file system type of directory d; warns when fdatasync costs nothing there."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", d], stdout=subprocess.PIPE, text=True).stdout.strip()
    if fs == "tmpfs":
        log(f"warning: {d} is on tmpfs: fdatasync costs nothing there; use --dir on a disk")
    return fs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1/32 scale, one repetition (smoke run)")
    p.add_argument("--scale", type=float, default=None,
                   help="size/count factor (default $QCOW2RS_BENCH_SCALE or 1)")
    p.add_argument("--repeat", "-r", type=int, default=None, help="pairs per cell (default 3)")
    p.add_argument("--workloads", default="seq64k,rand4k,rand4k-f1,read4k,convert,encrypted")
    p.add_argument("--caches", default="writeback,writethrough")
    p.add_argument("--no-unsafe", dest="ours_extra", action="store_const", const=(),
                   default=("unsafe",), help="skip our unsafe-mode runs")
    p.add_argument("--no-strace", action="store_true", help="do not count QEMU's fdatasyncs")
    p.add_argument("--no-build", action="store_true", help="use the existing release binary")
    p.add_argument("--ours", default=None, metavar="PATH",
                   help="benchmark this qcow2rs binary instead (e.g. a build with a patched core); "
                        "implies --no-build")
    p.add_argument("--dir", default=None, help="where the images go (default $TMPDIR)")
    p.add_argument("--json", default=None, help="also write all measurements to this file")
    a = p.parse_args()
    if a.scale is None:
        a.scale = float(os.environ.get("QCOW2RS_BENCH_SCALE", 1.0 / 32 if a.quick else 1.0))
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3
    a.workloads = a.workloads.split(",")
    caches = a.caches.split(",")

    if not shutil.which("qemu-img"):
        raise SystemExit("qemu-img is needed (apt-get install qemu-utils)")
    global OURS
    if a.ours:
        OURS = os.path.abspath(a.ours)
        a.no_build = True
    if not a.no_build:
        build()
    b = Bench(a)
    fs = filesystem(b.dir)
    if not b.strace and not a.no_strace:
        log("strace not found: QEMU's fdatasync counts are reported as n/a")
    qv = run(["qemu-img", "--version"]).stdout.splitlines()[0]
    log(f"images in {b.dir} ({fs}); scale {a.scale:g}; {a.repeat} pair(s) per cell, order "
        f"alternating; {qv}; {os.cpu_count()} CPUs")
    wl = b.workloads()
    try:
        for name, w in wl.items():
            log(f"{name}: {w['what']}" + (f"\n    flags: {' '.join(w['flags'])}" if "flags" in w else ""))
            if name == "convert":
                b.run_convert(w)
            elif name == "encrypted":
                b.run_encrypted(w)
            else:
                b.run_bench(name, w, caches)
    finally:
        shutil.rmtree(b.dir, ignore_errors=True)

    print(f"qcow2rs ({os.path.relpath(OURS, ROOT)}) vs {qv}, same machine, same run; medians of "
          f"{a.repeat} alternating pair(s); scale {a.scale:g}")
    for name, w in wl.items():
        print(f"  {name}: {w['what']}" + (f"  [{' '.join(w['flags'])}]" if "flags" in w else ""))
    print("  (qemu-img bench has no random mode: 'scattered' = a large odd step that wraps around "
          "the image, the same flags for both tools)")
    print()
    if b.results:
        print(table(b.results, b.strace is not None))
        print()
    if getattr(b, "crypto", None):
        print("Encrypted images (qemu: qemu-io aio batches of 64, start-up and PBKDF2 subtracted; "
              "ours: qcow2rs bench -d 64; both -t writeback):")
        for r in b.crypto:
            print(f"  {r['fmt']:<5} {r['workload']:<9} qemu {r['qemu']:10.1f}  ours {r['ours']:10.1f} "
                  f"{r['unit']:<6} ours/qemu {r['ours'] / r['qemu']:.2f}x"
                  + (f"   ours plaintext {r['plain']:8.1f} (encrypted/plaintext {r['ours'] / r['plain']:.2f}x)"
                     if "plain" in r else ""))
        for c in b.cipher:
            print(f"  cipher {c['cipher']:<9} in memory: encrypt {c['encrypt-1-thread']} MiB/s "
                  f"(1 thread) {c['encrypt-all-cores']} MiB/s (all cores), decrypt "
                  f"{c['decrypt-1-thread']} / {c['decrypt-all-cores']} MiB/s")
        print()
    print("* QEMU's fdatasyncs: strace -f -c over one extra untimed run, including those at open "
          "and close; ours: counted by the engine during the run (the flush due at the end "
          "included, close excluded). Convert: strace for both, whole process.")
    print("  floor: ours in unsafe mode plus one fdatasync of the image file per flush: what any "
          "durable flush costs at least, without metadata ordering (hidden flag --sync-flushes).")
    print("  Throughput: requests x buffer size / qemu-img bench's timed interval (which ends "
          "when the last request completes); convert: image size / wall time of the process")
    print("  ('default+fdatasync': plus an fdatasync of the output afterwards, i.e. until the image "
          "is durable; qemu-img's default -t unsafe never syncs it, ours syncs once at close).")
    print()
    print("Targets:")
    checked = targets(b.results)
    for r in getattr(b, "crypto", []):
        q = r["ours"] / r["qemu"]
        checked.append((q >= 3.0, f"{r['fmt']} {r['workload']}: ours/qemu {q:.2f}x >= 3.0"))
        if "plain" in r:
            h = r["ours"] / r["plain"]
            checked.append((h >= 0.5, f"{r['fmt']} {r['workload']}: encrypted/plaintext {h:.2f}x >= 0.5"))
    for ok, what in checked:
        print(f"  [{'PASS' if ok else 'MISS'}] {what}")
    print(f"  {sum(ok for ok, _ in checked)} of {len(checked)} met")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(b.results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
