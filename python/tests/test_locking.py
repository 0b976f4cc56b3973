"""Image locks: ImageLockedError between two opens (in this process, and against qemu-io),
force_share for inspection, and the locks gone once the image is closed."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

import qcow2rs

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    qcow2rs.create(path, 4 * MiB)
    return path


def locked_bytes(path: Path) -> set[int]:
    ino = os.stat(path).st_ino
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[5].endswith(f":{ino}"):
                out.update(range(int(fields[6]), int(fields[7]) + 1))
    return out


def test_second_read_write_open_is_refused(image: Path) -> None:
    with qcow2rs.open(image, "rw") as img:
        img.write_at(0, b"x" * 512)
        img.flush()
        with pytest.raises(qcow2rs.ImageLockedError) as ei:
            qcow2rs.open(image, "rw")
        err = ei.value
        assert isinstance(err, qcow2rs.Error) and isinstance(err, OSError)
        assert qcow2rs.LockedError is qcow2rs.ImageLockedError
        assert err.errno == errno.EAGAIN
        assert err.filename == str(image)
        assert 'Failed to get "write" lock' in str(err)
        assert f"Is another process using the image [{image}]?" in str(err)
        # A reader would not share writing with the writer...
        with pytest.raises(qcow2rs.ImageLockedError, match='shared "write"'):
            qcow2rs.open(image)
        # ... unless it shares everything.
        with qcow2rs.open(image, force_share=True) as view:
            assert view.read_at(0, 512) == b"x" * 512
    assert locked_bytes(image) == set()
    qcow2rs.open(image, "rw").close()


def test_readers_share(image: Path) -> None:
    with qcow2rs.open(image) as a, qcow2rs.open(image) as b:
        assert a.read_at(0, 16) == b.read_at(0, 16)
        assert locked_bytes(image) == {100, 201, 203}
        with pytest.raises(qcow2rs.ImageLockedError):
            qcow2rs.open(image, "r+")


def test_force_share_needs_read_only(image: Path) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError, match="force-share"):
        qcow2rs.open(image, "rw", force_share=True)


@pytest.fixture
def qemu_writer(image: Path) -> Iterator[subprocess.Popen[bytes]]:
    if shutil.which("qemu-io") is None:
        pytest.fail("qemu-io is required (apt-get install qemu-utils)")
    with subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            deadline = time.monotonic() + 30
            while locked_bytes(image) != {100, 101, 103, 201, 203}:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "qemu-io never locked the image"
                time.sleep(0.02)
            yield proc
        finally:
            proc.kill()


def test_qemu_io_writer_refuses_us(image: Path, qemu_writer: subprocess.Popen[bytes]) -> None:
    with pytest.raises(qcow2rs.ImageLockedError, match='Failed to get "write" lock'):
        qcow2rs.open(image, "rw")
    with pytest.raises(qcow2rs.ImageLockedError, match='Failed to get shared "write" lock'):
        qcow2rs.open(image)
    with qcow2rs.open(image, force_share=True) as view:
        assert view.info().virtual_size == 4 * MiB


def test_our_writer_refuses_qemu_img(image: Path) -> None:
    with qcow2rs.open(image, "rw"):
        r = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
        assert r.returncode == 1
        assert 'Failed to get shared "write" lock' in r.stderr
        r = subprocess.run(["qemu-img", "info", "-U", str(image)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
