#!/usr/bin/env python3
"""Internal snapshots: qcow2rs against qemu-img, side by side, on the same images in one run.

Both tools run as commands (`qemu-img snapshot` / `qcow2rs snapshot`, `qemu-img bench` /
`qcow2rs bench`), so process start-up is in both timings. Each tool works on its own copy of the
same image (made once by qemu-io), R times with the order alternating; medians are printed with
the ratio ours/QEMU (below 1: we are faster) and the fdatasyncs of each step (`strace -f -c` over
one extra untimed pass of every tool, the same way for both).

1. The lifecycle, on an image with 1 GiB of data written (64 KiB clusters, 16384 of them):
     create     snapshot -c s1
     cow-writes the first writes after the snapshot: 4 KiB writes scattered over the data
                (each lands in a shared cluster: copy-on-write of the cluster and, the first
                time, of its L2 table), through `bench -w -d 64 --flush-interval 64 -t writeback`
     apply      snapshot -a s1 (back to the snapshot; the copied clusters are freed)
     delete     snapshot -d s1
2. Scaling: the same image holding N = 1, 10, 100, 1000 snapshots (made by qcow2rs, then copied
   for both tools); one more create, list (-l), apply and delete of one in the middle, each on a
   fresh copy. Per-operation time should grow at most linearly with N (the snapshot table is
   rewritten whole on every change, in QEMU too).

Only the Python standard library is used. Run from anywhere:
  python3 scripts/bench_snapshots.py            # full size, R=3 (about 10 minutes here)
  python3 scripts/bench_snapshots.py --quick    # 1/16 scale, R=1, N up to 100: a smoke run
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import GiB, KiB, MiB, OURS, build, filesystem, log, run, strace_syncs  # noqa: E402


def tool(which):
    return "qemu-img" if which == "qemu" else OURS


class Bench:
    def __init__(self, a):
        self.a = a
        self.dir = tempfile.mkdtemp(prefix="qcow2rs-snapbench-", dir=a.dir)
        self.strace = shutil.which("strace")

    def path(self, name):
        return os.path.join(self.dir, name)

    def timed(self, cmd, count_syncs=False):
        """Run cmd; return (seconds, fdatasyncs or None)."""
        if count_syncs and self.strace:
            so = self.path("strace.txt")
            run([self.strace, "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", so] + cmd)
            return None, strace_syncs(so)
        t0 = time.perf_counter()
        run(cmd)
        return time.perf_counter() - t0, None

    def copy(self, src, dst):
        # Synced, so that no tool's first fdatasync pays for writing the copy back.
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return dst

    # ------------------------------------------------------------------ the base image

    def base(self, data):
        p = self.path("base.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", p, str(data)])
        # A pattern per 64 MiB so that the data is not all one value.
        step = min(data, 64 * MiB)
        cmds = []
        for i, off in enumerate(range(0, data, step)):
            cmds += ["-c", f"write -q -P {1 + i % 250} {off} {step}"]
        run(["qemu-io", "-f", "qcow2"] + cmds + [p])
        return p

    # ------------------------------------------------------------------ 1. the lifecycle

    def lifecycle_steps(self, img, data):
        n = self.a.cow_writes
        # An odd number of 4 KiB units near 0.38 of the data: offsets wrap around and scatter,
        # each in a different 64 KiB cluster for the first data/64 KiB writes.
        units = data // (4 * KiB)
        step = int(units * 0.38) | 1
        while step % 16 == 0 or units % step == 0:
            step += 2
        bench = ["bench", "-w", "-f", "qcow2", "-t", "writeback", "-c", str(n), "-s", "4k",
                 "-S", str(step * 4 * KiB), "-d", "64", "--flush-interval", "64"]
        return [
            ("create", lambda t: [tool(t), "snapshot", "-c", "s1", img[t]]),
            ("cow-writes", lambda t: [tool(t)] + bench + [img[t]]),
            ("apply", lambda t: [tool(t), "snapshot", "-a", "s1", img[t]]),
            ("delete", lambda t: [tool(t), "snapshot", "-d", "s1", img[t]]),
        ]

    def lifecycle(self, base, data):
        res = {}  # (step, tool) -> [seconds]
        syncs = {}
        order = ["qemu", "ours"]
        for rep in range(self.a.repeat + 1):
            count = rep == 0  # the first pass only counts fdatasyncs (under strace)
            img = {t: self.copy(base, self.path(f"life-{t}.qcow2")) for t in order}
            steps = self.lifecycle_steps(img, data)
            for name, cmd in steps:
                for t in order:
                    secs, n = self.timed(cmd(t), count_syncs=count)
                    if count:
                        syncs[(name, t)] = n
                    else:
                        res.setdefault((name, t), []).append(secs)
            for t in order:
                r = subprocess.run(["qemu-img", "check", img[t]], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"qemu-img check of {t}'s image failed:\n{r.stdout}")
                os.unlink(img[t])
            order.reverse()
            log(f"lifecycle pass {rep} done" + (" (fdatasync counts)" if count else ""))
        return res, syncs

    # ------------------------------------------------------------------ 2. scaling

    def with_snapshots(self, base, n):
        p = self.path(f"n{n}.qcow2")
        self.copy(base, p)
        # Ours makes them (1,000 qemu-img runs would take as long; the image is the same format).
        for i in range(n):
            run([OURS, "snapshot", "-c", f"s{i}", p])
        return p

    def scaling(self, base):
        res = {}
        syncs = {}
        for n in self.a.counts:
            t0 = time.perf_counter()
            src = self.with_snapshots(base, n)
            log(f"image with {n} snapshots made in {time.perf_counter() - t0:.1f} s")
            mid = f"s{n // 2}"
            ops = [
                ("create", lambda t, p: [tool(t), "snapshot", "-c", "extra", p]),
                ("list", lambda t, p: [tool(t), "snapshot", "-l", p]),
                ("apply", lambda t, p: [tool(t), "snapshot", "-a", mid, p]),
                ("delete", lambda t, p: [tool(t), "snapshot", "-d", mid, p]),
            ]
            order = ["qemu", "ours"]
            for rep in range(self.a.repeat + 1):
                count = rep == 0
                for name, cmd in ops:
                    for t in order:
                        p = self.copy(src, self.path(f"scale-{t}.qcow2"))
                        secs, k = self.timed(cmd(t, p), count_syncs=count)
                        if count:
                            syncs[(n, name, t)] = k
                        else:
                            res.setdefault((n, name, t), []).append(secs)
                        if name != "list":
                            r = subprocess.run(["qemu-img", "check", p], stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True)
                            if r.returncode != 0:
                                raise SystemExit(f"qemu-img check after {t} {name} with {n} "
                                                 f"snapshots failed:\n{r.stdout}")
                        os.unlink(p)
                order.reverse()
            os.unlink(src)
        return res, syncs


def fmt_s(x):
    return f"{x * 1000:8.1f} ms"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1/16 scale, one repetition, N up to 100")
    p.add_argument("--repeat", "-r", type=int, default=None, help="timed passes (default 3)")
    p.add_argument("--data", type=int, default=None, help="bytes of data in the image (default 1 GiB)")
    p.add_argument("--counts", default=None, help="snapshot counts for scaling (default 1,10,100,1000)")
    p.add_argument("--cow-writes", type=int, default=None, help="4 KiB writes after the snapshot (default 4096)")
    p.add_argument("--no-build", action="store_true", help="use the existing release binary")
    p.add_argument("--dir", default=None, help="where the images go (default $TMPDIR)")
    a = p.parse_args()
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.data = a.data or (GiB // 16 if a.quick else GiB)
    a.counts = [int(x) for x in (a.counts or ("1,10,100" if a.quick else "1,10,100,1000")).split(",")]
    a.cow_writes = a.cow_writes or (512 if a.quick else 4096)
    for prog in ("qemu-img", "qemu-io"):
        if not shutil.which(prog):
            raise SystemExit(f"{prog} is needed (apt-get install qemu-utils)")
    if not a.no_build:
        build()
    b = Bench(a)
    fs = filesystem(b.dir)
    qv = run(["qemu-img", "--version"]).stdout.splitlines()[0]
    log(f"images in {b.dir} ({fs}); {a.data >> 20} MiB of data; {a.repeat} timed pass(es); {qv}")
    try:
        base = b.base(a.data)
        life, life_syncs = b.lifecycle(base, a.data)
        scale, scale_syncs = b.scaling(base)
    finally:
        shutil.rmtree(b.dir, ignore_errors=True)

    def syncs(d, k):
        v = d.get(k)
        return "n/a" if v is None else str(v)

    ratios = []
    print(f"\nSnapshot lifecycle on an image with {a.data >> 20} MiB of data (64 KiB clusters), "
          f"median of {a.repeat}; whole commands, start-up included")
    print(f"{'step':<12} {'qemu-img':>11} {'qcow2rs':>11} {'ours/qemu':>10}   fdatasyncs qemu/ours")
    for name in ("create", "cow-writes", "apply", "delete"):
        q = statistics.median(life[(name, "qemu")])
        o = statistics.median(life[(name, "ours")])
        ratios.append((f"lifecycle {name}", o / q))
        extra = f" ({a.cow_writes} x 4 KiB)" if name == "cow-writes" else ""
        print(f"{name:<12} {fmt_s(q)} {fmt_s(o)} {o / q:10.2f}   "
              f"{syncs(life_syncs, (name, 'qemu'))}/{syncs(life_syncs, (name, 'ours'))}{extra}")

    print(f"\nScaling: one operation on an image already holding N snapshots, median of {a.repeat}")
    print(f"{'N':>5} {'op':<8} {'qemu-img':>11} {'qcow2rs':>11} {'ours/qemu':>10}   fdatasyncs qemu/ours")
    for n in a.counts:
        for name in ("create", "list", "apply", "delete"):
            q = statistics.median(scale[(n, name, "qemu")])
            o = statistics.median(scale[(n, name, "ours")])
            ratios.append((f"N={n} {name}", o / q))
            print(f"{n:>5} {name:<8} {fmt_s(q)} {fmt_s(o)} {o / q:10.2f}   "
                  f"{syncs(scale_syncs, (n, name, 'qemu'))}/{syncs(scale_syncs, (n, name, 'ours'))}")
    if len(a.counts) > 1:
        lo, hi = a.counts[0], a.counts[-1]
        print(f"\nGrowth from N={lo} to N={hi} ({hi // lo}x the snapshots), ours (qemu-img):")
        for name in ("create", "list", "apply", "delete"):
            g = statistics.median(scale[(hi, name, "ours")]) / statistics.median(scale[(lo, name, "ours")])
            gq = statistics.median(scale[(hi, name, "qemu")]) / statistics.median(scale[(lo, name, "qemu")])
            print(f"  {name:<8} x{g:.1f} (x{gq:.1f})")
    slower = [(k, r) for k, r in ratios if r > 1.0]
    print(f"\nsteps where qcow2rs took longer than qemu-img: "
          + (", ".join(f"{k} ({r:.2f})" for k, r in slower) if slower else "none"))


if __name__ == "__main__":
    main()
