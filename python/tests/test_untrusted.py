"""Untrusted images: the `backing` policy of qcow2rs.open, and a missing backing file's error."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

import qcow2rs

MiB = 1 << 20

QemuImg = Callable[..., "subprocess.CompletedProcess[str]"]


def overlay(qemu_img: QemuImg, path: Path, backing: str, fmt: str) -> None:
    """An overlay naming `backing`, made with `qemu-img create -u` (which opens nothing)."""
    r = qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "1M")
    assert r.returncode == 0, r.stderr


def test_backing_policy(tmp_path: Path, qemu_img: QemuImg) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "base.raw").write_bytes(b"\x11" * MiB)
    ov = images / "ov.qcow2"
    overlay(qemu_img, ov, "base.raw", "raw")
    for allowed in ([images], [str(images)], (str(tmp_path / "x"), images)):
        with qcow2rs.open(ov, backing=allowed) as img:
            assert img.read_at(0, 4096) == b"\x11" * 4096
    with qcow2rs.open(ov, backing="none") as img:
        assert img.read_at(0, 4096) == bytes(4096)

    # A system file, outside the allowed directory: refused, naming the backing file.
    overlay(qemu_img, ov, "/etc/passwd", "raw")
    with pytest.raises(PermissionError) as ei:
        qcow2rs.open(ov, backing=[images])
    err = ei.value
    assert isinstance(err, qcow2rs.PermissionDeniedError)
    assert err.errno == errno.EACCES
    assert err.filename == "/etc/passwd"
    assert str(ov) in str(err) and "backing policy" in str(err), str(err)
    with pytest.raises(qcow2rs.PermissionDeniedError):
        qcow2rs.open(ov, backing=[])
    with qcow2rs.open(ov, backing="none") as img:
        assert img.read_at(0, 512) == bytes(512)

    # A FIFO: refused at once under every policy (opening it for reading would block).
    os.mkfifo(images / "fifo")
    overlay(qemu_img, ov, "fifo", "raw")
    for policy in ("any", [images]):
        with pytest.raises(qcow2rs.Error) as fifo:
            qcow2rs.open(ov, backing=policy)
        assert "FIFO" in str(fifo.value)

    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.open(ov, backing="/tmp")  # a single directory must be given as a list


def test_missing_backing_file_is_file_not_found(tmp_path: Path, qemu_img: QemuImg) -> None:
    ov = tmp_path / "ov.qcow2"
    overlay(qemu_img, ov, "base.qcow2", "qcow2")
    with pytest.raises(FileNotFoundError) as ei:
        qcow2rs.open(ov)
    err = ei.value
    assert isinstance(err, qcow2rs.NotFoundError)
    assert err.errno == errno.ENOENT
    base = str(tmp_path / "base.qcow2")
    assert err.filename == base
    assert str(err) == f"{ov}: Could not open backing file '{base}': No such file or directory"


def test_damaged_image(tmp_path: Path, qemu_img: QemuImg, qemu_io: QemuImg) -> None:
    img_path = tmp_path / "t.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", img_path, "4M").returncode == 0
    r = qemu_io("-c", "write -P 0xaa 0 1M", img_path)
    assert r.returncode == 0, r.stderr
    # Cut inside the refcount table: the L1 table (at 0x30000) is gone.
    os.truncate(img_path, 0x18000)
    with pytest.raises(qcow2rs.CorruptImageError):
        qcow2rs.open(img_path)
    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.open(img_path, "rw", damaged=True)
    with qcow2rs.open(img_path, damaged=True) as img:
        assert any(d.startswith("L1 table at 0x30000") for d in img.damage())
        result = img.check()
        assert result.corruptions > 0
        q = qemu_img("check", "--output=json", img_path)
        assert q.returncode == 2
        assert result.corruptions == json.loads(q.stdout)["corruptions"]
