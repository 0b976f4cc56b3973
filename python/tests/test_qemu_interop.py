"""The real qemu-img and qemu-io are the oracle: what Python writes, qemu reads, and back."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import pytest

import qcow2rs

MiB = 1 << 20


def write_scattered(img: qcow2rs.Image, model: bytearray, rng: random.Random, count: int) -> None:
    for _ in range(count):
        off = rng.randrange(len(model) - 1)
        n = rng.randrange(1, min(150000, len(model) - off))
        data = rng.randbytes(n)
        img.write_at(off, data)
        model[off : off + n] = data


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cluster_size": 4096},
        {"cluster_size": 512, "refcount_bits": 1},
        {"cluster_size": 2 * MiB, "refcount_bits": 64},
        {"compat": "0.10"},
        {"lazy_refcounts": True},
        {"extended_l2": True, "cluster_size": 32768},
    ],
    ids=repr,
)
def test_python_written_image_passes_qemu_img(
    tmp_path: Path, rng: random.Random, qemu_img: Any, options: Dict[str, Any]
) -> None:
    size = 6 * MiB + 512
    path = tmp_path / "py.qcow2"
    raw = tmp_path / "reference.raw"
    qcow2rs.create(path, size, **options)
    model = bytearray(size)
    with qcow2rs.open(path, "rw") as img:
        write_scattered(img, model, rng, 30)
        img.write_zeroes(MiB + 7, 300000)
        model[MiB + 7 : MiB + 7 + 300000] = bytes(300000)
        cs = img.cluster_size
        start = 3 * MiB // cs * cs
        n = min(4, (size - start) // cs) * cs
        img.discard(start, n)
        model[start : start + n] = bytes(n)
        img.write_at(size - 100, b"T" * 100)
        model[size - 100 :] = b"T" * 100
        assert img.read_at(0, size) == model
    raw.write_bytes(bytes(model))

    check = qemu_img("check", path)
    assert check.returncode == 0, check.stdout + check.stderr
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "Images are identical" in cmp.stdout

    # Make sure compare can tell: flip one byte in the reference.
    model[size // 2] ^= 0xFF
    raw.write_bytes(bytes(model))
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw).returncode == 1


def test_qemu_img_reads_our_create_options(tmp_path: Path, qemu_info: Any) -> None:
    path = tmp_path / "opts.qcow2"
    qcow2rs.create(
        path,
        5 * MiB,
        cluster_size=32768,
        refcount_bits=32,
        lazy_refcounts=True,
        extended_l2=True,
        compression_type="zstd",
    )
    info = qemu_info(path)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 5 * MiB
    assert info["cluster-size"] == 32768
    data = info["format-specific"]["data"]
    assert data["compat"] == "1.1"
    assert data["refcount-bits"] == 32
    assert data["lazy-refcounts"] is True
    assert data["extended-l2"] is True
    assert data["compression-type"] == "zstd"

    v2 = tmp_path / "v2.qcow2"
    qcow2rs.create(v2, MiB, compat="0.10")
    assert qemu_info(v2)["format-specific"]["data"]["compat"] == "0.10"


def test_qemu_io_pattern_reads_back(tmp_path: Path, qemu_img: Any, qemu_io: Any) -> None:
    path = tmp_path / "qemu.qcow2"
    r = qemu_img("create", "-f", "qcow2", path, "4M")
    assert r.returncode == 0, r.stderr
    for cmd in ("write -P 0xab 0 128k", "write -P 0xcd 200000 3000", "write -z 65536 4096"):
        r = qemu_io("-f", "qcow2", "-c", cmd, path)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr

    expect = bytearray(4 * MiB)
    expect[0 : 128 * 1024] = b"\xab" * (128 * 1024)
    expect[200000:203000] = b"\xcd" * 3000
    expect[65536 : 65536 + 4096] = bytes(4096)
    with qcow2rs.open(path) as img:
        assert img.read_at(0, 128 * 1024) == b"\xab" * 65536 + bytes(4096) + b"\xab" * (65536 - 4096)
        assert img.read_at(128 * 1024, 10) == bytes(10)
        assert img.read() == expect
        info = img.info()
    assert info.cluster_size == 65536 and info.virtual_size == 4 * MiB


def test_qemu_io_reads_what_python_wrote(disk: Path, qemu_io: Any) -> None:
    with qcow2rs.open(disk, "rw") as img:
        img.write_at(4096, b"\x5a" * 8192)
    ok = qemu_io("-f", "qcow2", "-c", "read -P 0x5a 4096 8k", disk)
    assert ok.returncode == 0 and "Pattern verification failed" not in ok.stdout, ok.stdout
    bad = qemu_io("-f", "qcow2", "-c", "read -P 0x5b 4096 8k", disk)
    assert "Pattern verification failed" in bad.stdout


def test_backing_chain_with_qemu(tmp_path: Path, qemu_img: Any, rng: random.Random) -> None:
    base = tmp_path / "base.qcow2"
    overlay = tmp_path / "overlay.qcow2"
    raw = tmp_path / "expect.raw"
    qcow2rs.create(base, 2 * MiB)
    base_data = rng.randbytes(2 * MiB)
    with qcow2rs.open(base, "rw") as img:
        img.write(base_data)
    qcow2rs.create(overlay, 2 * MiB, backing_file=base.name, backing_format="qcow2")
    model = bytearray(base_data)
    with qcow2rs.open(overlay, "rw") as img:
        assert img.info().full_backing_filename == str(base)
        assert img.read_at(0, 2 * MiB) == base_data
        write_scattered(img, model, rng, 10)
        assert img.read_at(0, 2 * MiB) == model
    raw.write_bytes(bytes(model))
    assert qemu_img("check", overlay).returncode == 0
    cmp = qemu_img("compare", "-F", "raw", overlay, raw)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_check_agrees_with_qemu_img(disk: Path, qemu_img: Any, rng: random.Random) -> None:
    import json

    model = bytearray(8 * MiB)
    with qcow2rs.open(disk, "rw") as img:
        write_scattered(img, model, rng, 20)
    with qcow2rs.open(disk) as img:
        ours = img.check()
    r = qemu_img("check", "--output=json", disk)
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    assert ours.is_clean
    assert ours.allocated_clusters == theirs["allocated-clusters"]
    assert ours.image_end_offset == theirs["image-end-offset"]
    assert ours.total_clusters == theirs["total-clusters"]
