"""qcow2rs.convert against qemu-img: what it writes compares equal (qemu-img compare) and checks
clean (qemu-img check); zeros stay unallocated; compressed and encrypted outputs; progress."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest

import qcow2rs

MiB = 1 << 20
Run = Callable[..., subprocess.CompletedProcess[str]]


def _raw(path: Path) -> bytes:
    """A disk with data, zero runs and a hole, compressible in places."""
    r = random.Random(5)
    data = bytearray(6 * MiB + 4096)
    data[0:MiB] = b"compressible text\n" * (MiB // 18) + b"x" * (MiB % 18)
    data[2 * MiB : 2 * MiB + 300_000] = r.randbytes(300_000)
    data[5 * MiB + 100 : 5 * MiB + 200] = b"y" * 100
    path.write_bytes(bytes(data))
    return bytes(data)


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_raw_to_qcow2_sparse_with_progress(tmp_path: Path, qemu_img: Run) -> None:
    raw = tmp_path / "src.raw"
    data = _raw(raw)
    dst = tmp_path / "dst.qcow2"
    calls: List[Tuple[int, int]] = []
    qcow2rs.convert(raw, dst, cluster_size=65536, progress=lambda d, t: calls.append((d, t)))
    _ok(qemu_img("check", dst))
    _ok(qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, dst))
    assert calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with qcow2rs.open(dst) as img:
        allocated = sum(e.length for e in img.map() if e.data)
    # The data: 1 MiB + 300,000 bytes + one cluster, in whole clusters; zeros left out.
    assert allocated <= MiB + 320 * 1024 + 64 * 1024, allocated
    # -S 0 writes everything.
    full = tmp_path / "full.qcow2"
    qcow2rs.convert(raw, full, sparse_size=0)
    with qcow2rs.open(full) as img:
        assert sum(e.length for e in img.map() if e.data) >= len(data) - 4096


def test_qcow2_to_compressed_qcow2_and_back_to_raw(tmp_path: Path, qemu_img: Run) -> None:
    raw = tmp_path / "src.raw"
    data = _raw(raw)
    src = tmp_path / "src.qcow2"
    _ok(qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src))
    comp = tmp_path / "comp.qcow2"
    qcow2rs.convert(src, comp, compress=True, compression_type="zstd")
    _ok(qemu_img("check", comp))
    _ok(qemu_img("compare", "-f", "qcow2", "-F", "qcow2", src, comp))
    m = json.loads(_ok(qemu_img("map", "--output=json", comp)))
    assert any(e.get("compressed") for e in m)
    out = tmp_path / "out.raw"
    qcow2rs.convert(comp, out, dst_format="raw")
    assert out.read_bytes() == data


def test_encrypted_source_and_destination(tmp_path: Path, qemu_img: Run) -> None:
    raw = tmp_path / "src.raw"
    _raw(raw)
    enc = tmp_path / "enc.qcow2"
    _ok(
        qemu_img(
            "convert", "-f", "raw", "-O", "qcow2", "--object", "secret,id=s0,data=pw",
            "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", raw, enc,
        )
    )
    mine = tmp_path / "mine.qcow2"
    qcow2rs.convert(enc, mine, src_password="pw", encrypt="luks", password="new", iter_time=10)
    with qcow2rs.open(mine, password="new") as img, raw.open("rb") as f:
        assert img.info().crypt_method == 2
        assert img.read_at(0, 6 * MiB + 4096) == f.read()
    _ok(
        qemu_img(
            "compare", "--object", "secret,id=s1,data=new", "--image-opts",
            f"driver=qcow2,file.filename={mine},encrypt.key-secret=s1",
            f"driver=raw,file.filename={raw}",
        )
    )


def _overlay(tmp_path: Path, qemu_img: Run, qemu_io: Run) -> Tuple[Path, Path]:
    """base.qcow2 (the _raw disk) and ov.qcow2 over it, whose top image holds new data, zeros
    written over the base's data (an explicit zero cluster and an allocated zero cluster) and
    leaves the rest to the base."""
    raw = tmp_path / "src.raw"
    _raw(raw)
    base = tmp_path / "base.qcow2"
    _ok(qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base))
    ov = tmp_path / "ov.qcow2"
    _ok(qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ov))
    _ok(qemu_io("-f", "qcow2", "-c", "write -P 0x5a 3M 200k", "-c", "write -z 0 128k",
                "-c", "write -P 0 2M 64k", "-c", "write -P 0x33 5M 1k", ov))
    return base, ov


def _top_allocated(qemu_img: Run, path: Path) -> int:
    m = json.loads(_ok(qemu_img("map", "--output=json", path)))
    return sum(e["length"] for e in m if e["depth"] == 0 and (e["data"] or e["zero"]))


def test_backing_file(tmp_path: Path, qemu_img: Run, qemu_io: Run, qemu_info: Any) -> None:
    base, ov = _overlay(tmp_path, qemu_img, qemu_io)
    out = tmp_path / "out.qcow2"
    qcow2rs.convert(ov, out, backing_file="base.qcow2", backing_format="qcow2")
    _ok(qemu_img("check", out))
    info = qemu_info(out)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == qemu_info(ov)["virtual-size"]
    # Reads as the overlay does (through the backing file): the zeros written over the base's
    # data included.
    _ok(qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ov, out))
    # Only what the overlay's top image holds is in out's top image, as with qemu-img -B.
    ref = tmp_path / "ref.qcow2"
    _ok(qemu_img("convert", "-f", "qcow2", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
                 ov, ref))
    assert _top_allocated(qemu_img, out) <= _top_allocated(qemu_img, ref)
    assert _top_allocated(qemu_img, out) < 1 * MiB
    # A raw source has no backing chain: everything is written, zeros as zeros.
    raw_out = tmp_path / "raw_out.qcow2"
    flat = tmp_path / "flat.raw"
    _ok(qemu_img("convert", "-f", "qcow2", "-O", "raw", ov, flat))
    qcow2rs.convert(flat, raw_out, backing_file="base.qcow2", backing_format="qcow2")
    _ok(qemu_img("check", raw_out))
    _ok(qemu_img("compare", "-f", "raw", "-F", "qcow2", flat, raw_out))


@pytest.mark.parametrize("dst_format", ["qcow2", "raw"])
def test_no_create_overwrites_an_existing_target(
    tmp_path: Path, qemu_img: Run, qemu_io: Run, dst_format: str
) -> None:
    raw = tmp_path / "src.raw"
    data = _raw(raw)
    dst = tmp_path / f"dst.{dst_format}"
    _ok(qemu_img("create", "-f", dst_format, dst, str(len(data))))
    # Old contents everywhere: the source's zero runs and holes must not let them show.
    _ok(qemu_io("-f", dst_format, "-c", f"write -P 0xaa 0 {len(data)}", dst))
    src = tmp_path / "src.qcow2"
    _ok(qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src))
    qcow2rs.convert(src, dst, dst_format=dst_format, no_create=True)
    if dst_format == "qcow2":
        _ok(qemu_img("check", dst))
    _ok(qemu_img("compare", "-f", "raw", "-F", dst_format, raw, dst))
    # From a raw source, compressed, into the same image again.
    if dst_format == "qcow2":
        _ok(qemu_io("-f", "qcow2", "-c", f"write -P 0xbb 0 {len(data)}", dst))
        qcow2rs.convert(raw, dst, no_create=True, compress=True)
        _ok(qemu_img("check", dst))
        _ok(qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, dst))


def test_no_create_errors(tmp_path: Path, qemu_img: Run) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(MiB))
    small = tmp_path / "small.qcow2"
    _ok(qemu_img("create", "-f", "qcow2", small, "512k"))
    before = small.read_bytes()
    with pytest.raises(qcow2rs.InvalidArgumentError, match="smaller than input"):
        qcow2rs.convert(raw, small, no_create=True)
    assert small.read_bytes() == before
    with pytest.raises(qcow2rs.InvalidArgumentError, match="cluster_size"):
        qcow2rs.convert(raw, small, no_create=True, cluster_size=4096)
    with pytest.raises(qcow2rs.NotFoundError):
        qcow2rs.convert(raw, tmp_path / "missing.qcow2", no_create=True)


def test_no_create_over_a_backing_file(
    tmp_path: Path, qemu_img: Run, qemu_io: Run
) -> None:
    base, ov = _overlay(tmp_path, qemu_img, qemu_io)
    out = tmp_path / "out.qcow2"
    _ok(qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", out))
    qcow2rs.convert(ov, out, no_create=True, backing_file="base.qcow2", backing_format="qcow2")
    _ok(qemu_img("check", out))
    _ok(qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ov, out))
    assert _top_allocated(qemu_img, out) < 1 * MiB


@pytest.mark.parametrize(
    "kwargs",
    [{"src_format": "vmdk"}, {"dst_format": "vdi"}, {"sparse_size": 100},
     {"dst_format": "raw", "compress": True}, {"backing_file": "b.qcow2"},
     {"backing_format": "qcow2"}, {"backing_file": "b", "backing_format": "vmdk"},
     {"dst_format": "raw", "backing_file": "b", "backing_format": "raw"}],
    ids=repr,
)
def test_bad_options(tmp_path: Path, kwargs: Any) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.convert(raw, tmp_path / "d", **kwargs)
