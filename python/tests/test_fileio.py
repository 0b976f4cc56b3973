"""An open image is a binary file: io.RawIOBase behaviour, shutil and io.Buffered* on top."""

from __future__ import annotations

import array
import io
import random
import shutil
from pathlib import Path

import pytest

import qcow2rs

MiB = 1 << 20


@pytest.fixture
def filled(disk: Path, rng: random.Random) -> bytes:
    """Write scattered random data into `disk`; return the whole expected disk contents."""
    model = bytearray(8 * MiB)
    with qcow2rs.open(disk, "rw") as img:
        for _ in range(40):
            off = rng.randrange(8 * MiB - 100000)
            data = rng.randbytes(rng.randrange(1, 100000))
            img.write_at(off, data)
            model[off : off + len(data)] = data
    return bytes(model)


def test_is_a_raw_io(rw: qcow2rs.Image) -> None:
    assert isinstance(rw, io.RawIOBase)
    assert isinstance(rw, io.IOBase)
    assert rw.readable() and rw.writable() and rw.seekable()
    assert not rw.isatty()
    with pytest.raises(io.UnsupportedOperation):
        rw.fileno()


def test_seek_and_tell(rw: qcow2rs.Image) -> None:
    size = rw.virtual_size
    assert rw.tell() == 0
    assert rw.seek(1000) == 1000 and rw.tell() == 1000
    assert rw.seek(24, io.SEEK_CUR) == 1024
    assert rw.seek(-24, io.SEEK_CUR) == 1000
    assert rw.seek(0, io.SEEK_END) == size
    assert rw.seek(-512, io.SEEK_END) == size - 512
    assert rw.seek(size + 4096) == size + 4096  # past the end is allowed, like a file
    assert rw.read(10) == b""
    with pytest.raises(ValueError):
        rw.seek(-1)
    rw.seek(0)
    with pytest.raises(ValueError):
        rw.seek(-1, io.SEEK_CUR)
    with pytest.raises(ValueError):
        rw.seek(0, 7)
    assert rw.tell() == 0


def test_read_readinto_write_move_the_position(rw: qcow2rs.Image) -> None:
    assert rw.write(b"hello, ") == 7
    assert rw.write(bytearray(b"world")) == 5
    assert rw.tell() == 12
    rw.seek(0)
    assert rw.read(5) == b"hello"
    assert rw.tell() == 5
    buf = bytearray(7)
    assert rw.readinto(buf) == 7
    assert buf == b", world"
    assert rw.tell() == 12
    view = memoryview(bytearray(10))
    rw.seek(7)
    assert rw.readinto(view[2:7]) == 5
    assert bytes(view) == b"\0\0world\0\0\0"
    words = array.array("I", [0, 0])
    rw.seek(0)
    assert rw.readinto(words) == 8
    assert words.tobytes() == b"hello, w"


def test_read_at_end_of_disk(rw: qcow2rs.Image) -> None:
    size = rw.virtual_size
    rw.seek(size - 3)
    assert rw.write(b"end") == 3
    rw.seek(size - 3)
    assert rw.read(100) == b"end"
    assert rw.read(100) == b""
    assert rw.tell() == size
    buf = bytearray(4)
    assert rw.readinto(buf) == 0
    rw.seek(size - 2)
    assert rw.readinto(buf) == 2 and buf[:2] == b"nd"


def test_write_past_end_raises_and_keeps_position(rw: qcow2rs.Image) -> None:
    size = rw.virtual_size
    rw.seek(size - 2)
    with pytest.raises(qcow2rs.InvalidArgumentError, match="does not grow"):
        rw.write(b"abc")
    assert rw.tell() == size - 2
    assert rw.read() == b"\0\0"


def test_read_all(disk: Path, filled: bytes) -> None:
    with qcow2rs.open(disk) as img:
        assert img.read() == filled
        assert img.read() == b""
        img.seek(8 * MiB - 1000)
        assert img.readall() == filled[-1000:]
        img.seek(5)
        assert img.read(-1) == filled[5:]
        img.seek(5)
        assert img.read(None) == filled[5:]


def test_copyfileobj_out_and_back(disk: Path, filled: bytes, tmp_path: Path) -> None:
    out = io.BytesIO()
    with qcow2rs.open(disk) as img:
        shutil.copyfileobj(img, out, length=100003)  # an odd chunk size
    assert out.getvalue() == filled

    copy = tmp_path / "copy.qcow2"
    qcow2rs.create(copy, len(filled), cluster_size=4096)
    out.seek(0)
    with qcow2rs.open(copy, "rw") as img:
        shutil.copyfileobj(out, img)
        assert img.tell() == len(filled)
    with qcow2rs.open(copy) as img:
        assert img.read_at(0, len(filled)) == filled


def test_buffered_reader(disk: Path, filled: bytes, rng: random.Random) -> None:
    with io.BufferedReader(qcow2rs.open(disk), buffer_size=4096) as f:
        assert f.read(10) == filled[:10]
        assert f.peek(1)[:1] == filled[10:11]
        assert f.read(70000) == filled[10:70010]
        for _ in range(50):
            pos = rng.randrange(len(filled))
            n = rng.randrange(1, 20000)
            assert f.seek(pos) == pos
            assert f.read(n) == filled[pos : pos + n]
        f.seek(-10, io.SEEK_END)
        assert f.read() == filled[-10:]
        assert f.raw.name.endswith("disk.qcow2")
    assert f.closed and f.raw.closed


def test_buffered_random_writes_through(disk: Path, filled: bytes) -> None:
    with io.BufferedRandom(qcow2rs.open(disk, "rw"), buffer_size=8192) as f:
        f.seek(100)
        for i in range(1000):
            f.write(b"%04d" % i)
        f.seek(100)
        assert f.read(8) == b"00000001"
    expect = filled[:100] + b"".join(b"%04d" % i for i in range(1000)) + filled[4100:]
    with qcow2rs.open(disk) as img:
        assert img.read() == expect


def test_buffered_writer_refuses_read_only(disk: Path) -> None:
    with qcow2rs.open(disk) as img:
        with pytest.raises(io.UnsupportedOperation):
            io.BufferedWriter(img)
