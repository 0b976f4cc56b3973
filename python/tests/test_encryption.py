"""Encrypted images from Python: create and open with password= (str or bytes), LUKS options,
BadPasswordError, legacy AES, qemu-img reading what we wrote, no plaintext in the file."""

from __future__ import annotations

import subprocess
import shutil
from pathlib import Path
from typing import Any, Dict

import pytest

import qcow2rs

MiB = 1 << 20
MARK = b"python-plaintext-marker-0xfeed" * 40


def qemu_read(path: Path, password: str, offset: int, data: bytes) -> None:
    exe = shutil.which("qemu-io")
    if exe is None:
        pytest.skip("qemu-io is not installed")
    r = subprocess.run(
        [
            exe,
            "--object",
            f"secret,id=k,data={password}",
            "--image-opts",
            "-c",
            f"read -v {offset} {len(data)}",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=k",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    # `read -v` dumps the bytes in hex; compare the first 16.
    first = r.stdout.splitlines()[0].split(":")[1].split()[:16]
    assert bytes(int(x, 16) for x in first) == data[:16]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(encrypt="luks", iter_time=10),
        dict(encrypt="luks", iter_time=10, cipher_alg="aes-128", cipher_mode="cbc",
             ivgen_alg="essiv", hash_alg="sha512"),
        dict(encrypt="aes"),
    ],
)
def test_create_write_read_reopen(tmp_path: Path, kwargs: Dict[str, Any]) -> None:
    path = tmp_path / "enc.qcow2"
    qcow2rs.create(path, 8 * MiB, password="s3cret", **kwargs)
    with qcow2rs.open(path, "r+", password=b"s3cret") as img:
        img.write_at(12345, MARK)
        img.flush()
    assert MARK[:30] not in path.read_bytes()
    with qcow2rs.open(path, password="s3cret") as img:
        assert img.read_at(12345, len(MARK)) == MARK
        info = img.info()
        assert info.crypt_method == (2 if kwargs["encrypt"] == "luks" else 1)
    qemu_read(path, "s3cret", 12345, MARK)


def test_wrong_and_missing_password(tmp_path: Path) -> None:
    path = tmp_path / "l.qcow2"
    qcow2rs.create(path, MiB, encrypt="luks", password="right", iter_time=10)
    with pytest.raises(qcow2rs.BadPasswordError) as ei:
        qcow2rs.open(path, password="xyzzy-hunter2")
    assert ei.value is not None and isinstance(ei.value, qcow2rs.BadKeyError)
    assert ei.value.filename == str(path)
    assert "Invalid password" in str(ei.value)
    assert "xyzzy" not in str(ei.value)
    with pytest.raises(qcow2rs.BadPasswordError):
        qcow2rs.open(path)
    with pytest.raises(TypeError):
        qcow2rs.open(path, password=12345)  # type: ignore[arg-type]


def test_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.create(path, MiB, encrypt="luks")  # no password
    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.create(path, MiB, password="pw")  # no encrypt=
    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.create(path, MiB, encrypt="luks", password="pw", cipher_alg="twofish-256")
    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.create(path, MiB, encrypt="rot13", password="pw")


def test_encrypted_overlay_over_encrypted_base(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qcow2rs.create(base, 2 * MiB, encrypt="luks", password="base-pw", iter_time=10)
    with qcow2rs.open(base, "r+", password="base-pw") as b:
        b.write_at(0, b"\x42" * (2 * MiB))
    top = tmp_path / "top.qcow2"
    qcow2rs.create(top, 2 * MiB, backing_file="base.qcow2", backing_format="qcow2",
                   backing_password="base-pw", encrypt="luks", password="top-pw", iter_time=10)
    with qcow2rs.open(top, "r+", password="top-pw", backing_password=b"base-pw") as t:
        t.write_at(1000, b"\xee" * 100)
        data = t.read_at(0, 70000)
    assert data[:1000] == b"\x42" * 1000
    assert data[1000:1100] == b"\xee" * 100
    assert data[1100:] == b"\x42" * (70000 - 1100)
