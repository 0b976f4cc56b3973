"""Image.info().to_dict() against ``qemu-img info --output=json``: the same keys and values."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

import qcow2rs

MiB = 1 << 20
Run = Callable[..., subprocess.CompletedProcess[str]]


def _same(path: Path, qemu_info: Callable[[Path], Any], password: str | None = None) -> None:
    with qcow2rs.open(path, password=password) as img:
        info = img.info()
    assert info.to_dict() == qemu_info(path)


def test_plain_with_backing_and_snapshots(
    tmp_path: Path, qemu_img: Run, qemu_info: Callable[[Path], Any]
) -> None:
    base = tmp_path / "base.qcow2"
    qcow2rs.create(base, 4 * MiB)
    top = tmp_path / "top.qcow2"
    qcow2rs.create(top, 8 * MiB, backing_file="base.qcow2", backing_format="qcow2",
                   cluster_size=4096, lazy_refcounts=True, compression_type="zstd")
    with qcow2rs.open(top, "r+b") as img:
        img.write_at(0, b"x" * 100_000)
        img.create_snapshot("one", vm_clock_nsec=3_500_000_123)
        img.create_snapshot("two", icount=None)
    _same(top, qemu_info)
    _same(base, qemu_info)
    v2 = tmp_path / "v2.qcow2"
    r = qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
    assert r.returncode == 0, r.stderr
    _same(v2, qemu_info)


def test_encrypted_images_qemu_made(
    tmp_path: Path, qemu_img: Run, qemu_info: Callable[[Path], Any]
) -> None:
    luks = tmp_path / "luks.qcow2"
    r = qemu_img(
        "create", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
        "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", luks, "2M",
    )
    assert r.returncode == 0, r.stderr
    _same(luks, qemu_info, password="pw")
    mine = tmp_path / "mine.qcow2"
    qcow2rs.create(mine, 2 * MiB, encrypt="luks", password="pw", iter_time=10,
                   cipher_mode="cbc", ivgen_alg="essiv")
    with qcow2rs.open(mine, "r+b", password="pw") as img:
        img.add_password("other", slot=3, iter_time=10)
    _same(mine, qemu_info, password="other")
    with qcow2rs.open(mine, password="pw") as img:
        enc = img.info().encryption
    assert enc is not None and enc["format"] == "luks" and enc["cipher-mode"] == "cbc"
    assert [s["active"] for s in enc["slots"]] == [True, False, False, True] + [False] * 4
