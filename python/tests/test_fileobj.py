"""qcow2rs.Image as a binary file: the modes of the built-in open, the io machinery, and the
standard library modules that take a file object (shutil, hashlib, tarfile, zipfile)."""

from __future__ import annotations

import array
import hashlib
import io
import pydoc
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

import qcow2rs

MiB = 1 << 20


@pytest.mark.parametrize(
    "mode, read_only, shown",
    [
        ("rb", True, "rb"),
        ("r", True, "rb"),
        ("r+b", False, "rb+"),
        ("rb+", False, "rb+"),
        ("r+", False, "rb+"),
        ("rw", False, "rb+"),
    ],
)
def test_modes_as_open_spells_them(disk: Path, mode: str, read_only: bool, shown: str) -> None:
    with qcow2rs.open(disk, mode) as img:
        assert img.read_only is read_only
        assert img.mode == shown
        assert img.writable() is not read_only
        assert img.name == str(disk)
    # The default is read-only.
    with qcow2rs.open(disk) as img:
        assert img.mode == "rb"


def test_help_shows_the_whole_docstrings() -> None:
    text = pydoc.render_doc(qcow2rs.create, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    for word in ("compression_type", "preallocation", "backing_format", "iter_time"):
        assert word in text, word
    assert "r+b" in (qcow2rs.open.__doc__ or "")
    assert "C-contiguous" in (qcow2rs.Image.readinto_at.__doc__ or "")


def test_truncate_resizes_and_keeps_the_position(disk: Path) -> None:
    with qcow2rs.open(disk, "r+b") as img:
        img.seek(MiB)
        assert img.truncate() == MiB
        assert img.size == MiB and img.tell() == MiB
        assert img.truncate(16 * MiB) == 16 * MiB
        assert img.size == 16 * MiB
        assert img.seek(0, io.SEEK_END) == 16 * MiB
    with qcow2rs.open(disk) as img:
        assert img.size == 16 * MiB
        with pytest.raises(qcow2rs.ReadOnlyError) as ei:
            img.truncate(MiB)
        assert ei.value.filename == str(disk)


def test_buffers_of_any_kind_without_a_copy(disk: Path) -> None:
    with qcow2rs.open(disk, "r+b") as img:
        ints = array.array("i", range(1024))  # 4 KiB, items of 4 bytes
        img.write_at(4096, ints)
        img.write_at(8192, memoryview(bytearray(b"x" * 512))[100:200])
        assert img.read_at(4096, 4096) == ints.tobytes()
        assert img.read_at(8192, 100) == b"x" * 100
        target = bytearray(5000)
        assert img.readinto_at(4096, target) == 5000
        assert target[:4096] == ints.tobytes()
        back = array.array("i", bytes(4096))
        assert img.readinto_at(4096, back) == 4096 and back == ints
        # Into a slice of a larger buffer, and short at the end of the disk.
        big = bytearray(b"\xee" * 8192)
        assert img.readinto_at(img.size - 1000, memoryview(big)[10:]) == 1000
        assert big[:10] == b"\xee" * 10 and big[1010:] == b"\xee" * (8192 - 1010)
        assert img.readinto_at(img.size, big) == 0
        with pytest.raises(TypeError):
            img.readinto_at(0, b"read-only bytes")
        with pytest.raises(BufferError):
            img.write_at(0, memoryview(bytearray(64))[::2])
        # A buffer exported to the read cannot be resized meanwhile; afterwards it can.
        target.extend(b"more")


def test_errors_of_image_calls_name_the_file(disk: Path) -> None:
    with qcow2rs.open(disk, "r+b") as img:
        with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
            img.write_at(img.size - 1, b"ab")
        assert ei.value.filename == str(disk)
        assert ei.value.errno == 22
        # The message names the file once.
        assert str(ei.value).count(str(disk)) == 1
        with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
            img.add_password("x")
        assert ei.value.filename == str(disk)
        assert "not encrypted" in str(ei.value)


def _content(size: int) -> bytes:
    return bytes((i * 7 + i // 4096) & 0xFF for i in range(size))


def test_copyfileobj_both_ways(disk: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(_content(8 * MiB))
    with raw.open("rb") as src, qcow2rs.open(disk, "r+b") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        assert dst.tell() == 8 * MiB
    out = tmp_path / "out.img"
    with qcow2rs.open(disk) as src, out.open("wb") as dst2:
        shutil.copyfileobj(src, dst2)
    assert out.read_bytes() == raw.read_bytes()


def test_buffered_reader_and_random(disk: Path) -> None:
    data = _content(3 * 65536 + 123)
    with qcow2rs.open(disk, "r+b") as img, io.BufferedRandom(img, 4096) as f:
        f.write(data)
        f.seek(65536 - 10)
        assert f.read(20) == data[65536 - 10 : 65536 + 10]
        f.seek(5)
        f.write(b"HELLO")
        f.flush()
        assert img.read_at(0, 16) == data[:5] + b"HELLO" + data[10:16]
    with qcow2rs.open(disk) as img, io.BufferedReader(img, 8192) as r:
        assert r.read(5) == data[:5]
        assert r.peek(5)[:5] == b"HELLO"
        r.seek(3 * 65536)
        assert r.read(123) == data[3 * 65536 :]
        assert r.tell() == 3 * 65536 + 123


def test_hashlib_file_digest(disk: Path) -> None:
    data = _content(2 * MiB)
    with qcow2rs.open(disk, "r+b") as img:
        img.write_at(0, data)
    want = hashlib.sha256(data + bytes(6 * MiB)).hexdigest()
    with qcow2rs.open(disk) as img:
        assert hashlib.file_digest(img, "sha256").hexdigest() == want


def test_tarfile_and_zipfile_read_from_an_image(tmp_path: Path) -> None:
    files = {"a.txt": b"alpha" * 1000, "dir/b.bin": _content(300_000)}
    for kind in ("tar", "zip"):
        archive = io.BytesIO()
        if kind == "tar":
            with tarfile.open(fileobj=archive, mode="w") as t:
                for name, body in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(body)
                    t.addfile(info, io.BytesIO(body))
        else:
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                for name, body in files.items():
                    z.writestr(name, body)
        blob = archive.getvalue()
        path = tmp_path / f"{kind}.qcow2"
        # The disk is exactly the archive, so the archive's end is the disk's end.
        qcow2rs.create(path, len(blob) + (-len(blob)) % 512)
        with qcow2rs.open(path, "r+b") as img:
            img.write_at(0, blob)
        with qcow2rs.open(path) as img:
            if kind == "tar":
                with tarfile.open(fileobj=img, mode="r:") as t:
                    got = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]
            else:
                with zipfile.ZipFile(io.BufferedReader(img)) as z:
                    got = {n: z.read(n) for n in z.namelist()}
        assert got == files, kind


def test_key_slots(tmp_path: Path) -> None:
    path = tmp_path / "enc.qcow2"
    qcow2rs.create(path, MiB, encrypt="luks", password="one", iter_time=10)
    with qcow2rs.open(path, "r+b", password="one") as img:
        assert img.add_password("two", iter_time=10) == 1
        assert img.add_password(b"three", slot=5, iter_time=10) == 5
        img.write_at(0, b"secret data")
    with qcow2rs.open(path, password="three") as img:
        assert img.read_at(0, 11) == b"secret data"
    with qcow2rs.open(path, "r+b", password="two") as img:
        assert img.remove_password("one") == [0]
        img.remove_key_slot(5)
    for gone in ("one", "three"):
        with pytest.raises(qcow2rs.BadPasswordError) as ei:
            qcow2rs.open(path, password=gone)
        assert ei.value.filename == str(path)
    with qcow2rs.open(path, "r+b", password="two") as img:
        with pytest.raises(qcow2rs.Error):
            img.remove_password("two")  # the last one needs force
        assert img.read_at(0, 11) == b"secret data"
