#!/usr/bin/env python3
"""Benchmark qcow2rs over NBD (nbdkit + nbdkit/qcow2rs.c) against qemu-nbd (QEMU's qcow2 driver).

Both servers export the same kind of image (qcow2 made by qemu-img, 64 KiB clusters, the same
size; optionally LUKS-encrypted with --encrypt) with the same durability semantics (a write-back
cache: data is durable at NBD flush; qemu-nbd --cache=writeback --aio=threads). fio's nbd engine
drives each workload against each server, the two interleaved run by run (ours, qemu-nbd, ours,
...), each run on a fresh copy of the image:

  randread   4 KiB random reads (image filled beforehand)
  randwrite  4 KiB random writes into an empty image, a flush (fio fsync=64) every 64 writes
  seqwrite   64 KiB sequential writes into an empty image

each at iodepth 1 and 16. It prints the median IOPS and bandwidth of each, the ratio
ours/qemu-nbd, and the fdatasync/fsync count of each server (from an extra, untimed run of each
workload under `strace -f -c`).

Usage: scripts/bench_nbd.py [--size 1G] [--runtime 10] [--ramp 1] [--repeats 3] [--encrypt]
                            [--plugin PATH] [--workloads randread,randwrite,seqwrite]
                            [--depths 1,16] [--no-strace]
Without --plugin it installs the C library into a temporary prefix (scripts/install-c.sh) and
builds the plugin with its Makefile, as nbdkit/test.sh does. Needs nbdkit, nbdkit-plugin-dev,
qemu-utils (qemu-img, qemu-nbd), fio (with its nbd engine) and, for the counts, strace.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = b"bench password"

WORKLOADS = {
    # name: (fio options, image filled beforehand)
    "randread": (["--rw=randread", "--bs=4k"], True),
    "randwrite": (["--rw=randwrite", "--bs=4k", "--fsync=64"], False),
    "seqwrite": (["--rw=write", "--bs=64k"], False),
}


def die(msg):
    print(f"bench_nbd: error: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_size(text):
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        die(f"bad size {text!r} (want e.g. 512M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        die(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def build_plugin(tmp):
    prefix = os.path.join(tmp, "prefix")
    env = dict(os.environ, PREFIX=prefix)
    print("building: scripts/install-c.sh into a temporary prefix, then the plugin", flush=True)
    run(["bash", os.path.join(ROOT, "scripts", "install-c.sh")], env=env)
    build = os.path.join(tmp, "build")
    os.mkdir(build)
    for f in ("qcow2rs.c", "Makefile"):
        shutil.copy(os.path.join(ROOT, "nbdkit", f), build)
    env["PKG_CONFIG_PATH"] = os.path.join(prefix, "lib", "pkgconfig")
    run(["make", "-s", "-C", build], env=env)
    return os.path.join(build, "nbdkit-qcow2rs-plugin.so")


class Server:
    """One NBD server on a Unix socket, started on an image and stopped (SIGTERM) afterwards."""

    def __init__(self, kind, args, image, sock, strace_out=None):
        self.sock = sock
        self.traced = strace_out is not None
        if kind == "ours":
            cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, args.plugin, f"file={image}"]
            if args.encrypt:
                cmd.append(f"password-file={args.pwfile}")
        else:
            cmd = ["qemu-nbd", "--persistent", "--cache=writeback", "--aio=threads", "-k", sock]
            if args.encrypt:
                cmd += ["--object", f"secret,id=sec0,file={args.pwfile}", "--image-opts",
                        f"driver=qcow2,file.filename={image},encrypt.key-secret=sec0"]
            else:
                cmd += ["-f", "qcow2", image]
        if strace_out:
            cmd = ["strace", "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", strace_out] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        for _ in range(500):
            if os.path.exists(sock):
                return
            if self.proc.poll() is not None:
                die(f"{kind} server exited: {self.proc.stderr.read()}")
            time.sleep(0.01)
        self.stop()
        die(f"{kind} server did not create {sock}")

    def stop(self):
        if self.proc.poll() is None:
            # Under strace, stop the server itself (strace's child) so that strace sees it exit.
            target = self.proc.pid
            try:
                with open(f"/proc/{target}/task/{target}/children") as f:
                    children = f.read().split()
                if self.traced and children:
                    target = int(children[0])
            except OSError:
                pass
            os.kill(target, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def fio(args, workload, depth, sock):
    opts, _ = WORKLOADS[workload]
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
           f"--size={args.size}", f"--iodepth={depth}", "--output-format=json",
           "--randrepeat=1", "--norandommap", "--time_based", f"--runtime={args.runtime}",
           f"--ramp_time={args.ramp}"] + opts
    text = run(cmd)
    out = json.loads(text[text.index("{"):])  # the nbd engine prints a line before the JSON
    job = out["jobs"][0]
    part = job["read"] if workload == "randread" else job["write"]
    return part["iops"], part["bw_bytes"], job.get("sync", {}).get("total_ios", 0)


def fresh_image(args, workload, path):
    _, filled = WORKLOADS[workload]
    src = args.filled if filled else args.empty
    shutil.copyfile(src, path)


def make_images(args, tmp):
    enc = []
    if args.encrypt:
        enc = ["--object", f"secret,id=sec0,file={args.pwfile}", "-o",
               "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"]
    args.empty = os.path.join(tmp, "empty.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2"] + enc + ["-o", "cluster_size=65536",
                                                             args.empty, str(args.size)])
    args.filled = os.path.join(tmp, "filled.qcow2")
    shutil.copyfile(args.empty, args.filled)
    # Fill it through QEMU (whole clusters of a non-zero pattern), so reads hit allocated data.
    if args.encrypt:
        cmd = ["qemu-io", "--object", f"secret,id=sec0,file={args.pwfile}", "--image-opts",
               f"driver=qcow2,file.filename={args.filled},encrypt.key-secret=sec0"]
    else:
        cmd = ["qemu-io", "-f", "qcow2", args.filled]
    run(cmd + ["-c", f"write -P 0x5a 0 {args.size}"])


def strace_count(path):
    calls = {"fdatasync": 0, "fsync": 0}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if fields and fields[-1] in calls and len(fields) >= 5:
                calls[fields[-1]] = int(fields[3])
    return calls


def main():
    # SIGTERM (as SIGINT) unwinds, so that servers are stopped and the scratch directory removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="image size (default 1G)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--ramp", type=int, default=1, help="fio ramp_time, seconds (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per server and workload (median)")
    p.add_argument("--encrypt", action="store_true", help="LUKS-encrypted images for both")
    p.add_argument("--plugin", help="nbdkit-qcow2rs-plugin.so (default: build one)")
    p.add_argument("--workloads", default="randread,randwrite,seqwrite")
    p.add_argument("--depths", default="1,16")
    p.add_argument("--no-strace", action="store_true", help="skip the fdatasync counts")
    args = p.parse_args()
    args.size = parse_size(args.size)
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            die(f"unknown workload {w!r} (want {', '.join(WORKLOADS)})")
    depths = [int(d) for d in args.depths.split(",")]
    for tool in ["nbdkit", "qemu-nbd", "qemu-img", "qemu-io", "fio"] + (
            [] if args.no_strace else ["strace"]):
        if not shutil.which(tool):
            die(f"{tool} is not installed")
    if "nbd" not in run(["fio", "--enghelp"]):
        die("this fio has no nbd engine")

    tmp = tempfile.mkdtemp(prefix="qcow2rs-bench-nbd.")
    try:
        if args.plugin:
            args.plugin = os.path.abspath(args.plugin)
        else:
            args.plugin = build_plugin(tmp)
        args.pwfile = os.path.join(tmp, "pw")
        with open(args.pwfile, "wb") as f:
            f.write(PASSWORD)
        make_images(args, tmp)
        image = os.path.join(tmp, "disk.qcow2")
        sock = os.path.join(tmp, "nbd.sock")
        print(f"image: qcow2, 64 KiB clusters, {args.size >> 20} MiB"
              f"{', LUKS' if args.encrypt else ''}; fio {args.runtime} s per run, "
              f"{args.repeats} runs each, servers interleaved", flush=True)

        results = {}  # (workload, depth, server) -> [(iops, bw)]
        for rep in range(args.repeats):
            for w in workloads:
                for d in depths:
                    order = ["ours", "qemu"] if rep % 2 == 0 else ["qemu", "ours"]
                    for kind in order:
                        fresh_image(args, w, image)
                        srv = Server(kind, args, image, sock)
                        try:
                            r = fio(args, w, d, sock)
                        finally:
                            srv.stop()
                        results.setdefault((w, d, kind), []).append(r)
                        print(f"  run {rep + 1}: {w:9} qd{d:<2} {kind:4} {r[0]:10.0f} IOPS "
                              f"{r[1] / 2**20:8.1f} MiB/s", flush=True)

        syncs = {}
        if not args.no_strace:
            for w in workloads:
                for kind in ["ours", "qemu"]:
                    fresh_image(args, w, image)
                    out = os.path.join(tmp, f"strace-{w}-{kind}")
                    srv = Server(kind, args, image, sock, strace_out=out)
                    try:
                        flushes = fio(args, w, max(depths), sock)[2]
                    finally:
                        srv.stop()
                    syncs[(w, kind)] = strace_count(out)
                    syncs[(w, kind)]["flushes"] = flushes

        print()
        print(f"{'workload':10} {'qd':>3} {'ours IOPS':>11} {'qemu-nbd IOPS':>14} "
              f"{'ours MiB/s':>11} {'qemu MiB/s':>11} {'ratio':>6}")
        ratios = []
        for w in workloads:
            for d in depths:
                o = results[(w, d, "ours")]
                q = results[(w, d, "qemu")]
                oi = statistics.median(x[0] for x in o)
                qi = statistics.median(x[0] for x in q)
                ob = statistics.median(x[1] for x in o)
                qb = statistics.median(x[1] for x in q)
                ratio = oi / qi if qi else float("inf")
                ratios.append(ratio)
                print(f"{w:10} {d:>3} {oi:>11.0f} {qi:>14.0f} {ob / 2**20:>11.1f} "
                      f"{qb / 2**20:>11.1f} {ratio:>5.2f}x")
        if syncs:
            print()
            print(f"fdatasync/fsync calls in one extra run of {args.runtime} s at "
                  f"qd{max(depths)} (strace -f -c):")
            for w in workloads:
                line = f"  {w:10}"
                for kind, name in (("ours", "ours"), ("qemu", "qemu-nbd")):
                    c = syncs[(w, kind)]
                    n = c["fdatasync"] + c["fsync"]
                    per = f", {n / c['flushes']:.2f} per flush" if c["flushes"] else ""
                    line += (f"  {name}: {c['fdatasync']} fdatasync + {c['fsync']} fsync for "
                             f"{c['flushes']} NBD flushes{per};")
                print(line.rstrip(";"))
        print()
        print(f"lowest ratio ours/qemu-nbd: {min(ratios):.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
