"""Errors: one hierarchy rooted in OSError, errno and filename set, the core's messages."""

from __future__ import annotations

import errno
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

import qcow2rs

MiB = 1 << 20


def test_hierarchy() -> None:
    assert issubclass(qcow2rs.Error, OSError)
    for cls in (
        qcow2rs.NotFoundError,
        qcow2rs.PermissionDeniedError,
        qcow2rs.CorruptImageError,
        qcow2rs.UnsupportedError,
        qcow2rs.InvalidArgumentError,
        qcow2rs.BadKeyError,
        qcow2rs.ReadOnlyError,
        qcow2rs.ImageLockedError,
        qcow2rs.NoSpaceError,
        qcow2rs.SnapshotNotFoundError,
    ):
        assert issubclass(cls, qcow2rs.Error), cls
        assert cls.__module__ == "qcow2rs"
        assert getattr(qcow2rs, cls.__name__) is cls
    assert issubclass(qcow2rs.NotFoundError, FileNotFoundError)
    assert issubclass(qcow2rs.PermissionDeniedError, PermissionError)
    assert issubclass(qcow2rs.InvalidArgumentError, ValueError)
    assert issubclass(qcow2rs.SnapshotNotFoundError, LookupError)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.qcow2"
    with pytest.raises(FileNotFoundError) as ei:
        qcow2rs.open(path)
    err = ei.value
    assert isinstance(err, qcow2rs.Error)
    assert isinstance(err, qcow2rs.NotFoundError)
    assert err.errno == errno.ENOENT
    assert err.filename == str(path)
    assert str(path) in str(err)
    assert str(err) == err.strerror  # the core's message, not OSError's "[Errno 2] ..." format
    assert not str(err).startswith("[Errno")


def test_create_in_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir.qcow2"
    with pytest.raises(qcow2rs.NotFoundError) as ei:
        qcow2rs.create(path, MiB)
    assert ei.value.errno == errno.ENOENT
    assert ei.value.filename == str(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(disk: Path) -> None:
    disk.chmod(0)
    with pytest.raises(PermissionError) as ei:
        qcow2rs.open(disk)
    assert isinstance(ei.value, qcow2rs.PermissionDeniedError)
    assert ei.value.errno == errno.EACCES


def _assert_corrupt(path: Path) -> qcow2rs.CorruptImageError:
    # Metadata is validated when it is first used: at open, or at the first read through it.
    with pytest.raises(qcow2rs.CorruptImageError) as ei:
        with qcow2rs.open(path) as img:
            img.read_at(0, img.virtual_size)
    err = ei.value
    assert err.errno == errno.EIO
    assert err.filename == str(path)
    assert str(path) in str(err)
    return err


def qcow2_header(**fields: int) -> bytes:
    """A version 3 header (104 bytes) of a 1 MiB image, with `fields` overridden."""
    f = dict(
        version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16, size=MiB,
        crypt_method=0, l1_size=1, l1_table_offset=0x30000, refcount_table_offset=0x10000,
        refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0, incompatible_features=0,
        compatible_features=0, autoclear_features=0, refcount_order=4, header_length=104,
    )  # fmt: skip
    f.update(fields)
    return b"QFI\xfb" + struct.pack(">IQIIQIIQQIIQQQQII", *f.values())


GARBAGE_HEADERS = {
    "l1 table unaligned": {"l1_table_offset": 0x12345},
    "l1 table too large": {"l1_size": 0xEEEEEEEE},
    "l1 table too small": {"l1_size": 0, "size": 1 << 40},
    "refcount table unaligned": {"refcount_table_offset": 0x777},
    "refcount table too large": {"refcount_table_clusters": 0xEEEEEEEE},
    "snapshot table unaligned": {"nb_snapshots": 5, "snapshots_offset": 0x123},
    "backing name out of header": {"backing_file_offset": 0xEEEEEEEE, "backing_file_size": 100},
    "header length too short": {"header_length": 20},
}


@pytest.mark.parametrize("fields", GARBAGE_HEADERS.values(), ids=GARBAGE_HEADERS.keys())
def test_garbage_header_is_corrupt(tmp_path: Path, fields: Dict[str, int]) -> None:
    path = tmp_path / "garbage.qcow2"
    path.write_bytes(qcow2_header(**fields) + bytes(0x40000))
    _assert_corrupt(path)


def test_sane_header_opens(tmp_path: Path) -> None:
    # The control for the test above: the same header, unmodified, is a valid empty image.
    path = tmp_path / "sane.qcow2"
    raw = bytearray(qcow2_header() + bytes(0x40000))
    raw[0x10000:0x10008] = (0x20000).to_bytes(8, "big")  # refcount table -> block at 0x20000
    for cluster in range(4):
        raw[0x20000 + 2 * cluster : 0x20000 + 2 * cluster + 2] = (1).to_bytes(2, "big")
    path.write_bytes(bytes(raw))
    with qcow2rs.open(path) as img:
        assert img.virtual_size == MiB
        assert img.read_at(0, 4096) == bytes(4096)
        assert img.check().is_clean


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "v7.qcow2"
    path.write_bytes(qcow2_header(version=7) + bytes(0x40000))
    with pytest.raises(qcow2rs.UnsupportedFeatureError) as ei:
        qcow2rs.open(path)
    assert qcow2rs.UnsupportedFeatureError is qcow2rs.UnsupportedError
    assert ei.value.errno == errno.EOPNOTSUPP
    assert ei.value.filename == str(path)


def test_not_a_qcow2_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "text.qcow2"
    path.write_bytes(b"this is not a disk image\n" * 100)
    _assert_corrupt(path)


def _l2_table_offset(path: Path) -> int:
    raw = path.read_bytes()
    l1_table_offset = int.from_bytes(raw[40:48], "big")
    return int.from_bytes(raw[l1_table_offset : l1_table_offset + 8], "big") & ((1 << 56) - 512)


@pytest.mark.parametrize("length", [0, 3, 40, 72, 104, 4096, 65536, "l1", "l2+1"])
def test_truncated_file_is_corrupt(disk: Path, length: object) -> None:
    with qcow2rs.open(disk, "rw") as img:
        img.write_at(0, b"x" * 200000)
    l2 = _l2_table_offset(disk)
    assert l2 > 0
    cut = {"l1": l2 - 65536, "l2+1": l2 + 1}.get(length, length)  # type: ignore[call-overload]
    with open(disk, "r+b") as f:
        f.truncate(cut)
    _assert_corrupt(disk)


def test_truncated_at_l2_table_is_corrupt(disk: Path) -> None:
    with qcow2rs.open(disk, "rw") as img:
        img.write_at(0, b"x" * 200000)
    with open(disk, "r+b") as f:
        f.truncate(_l2_table_offset(disk))
    _assert_corrupt(disk)


def test_write_to_read_only_image(disk: Path) -> None:
    with qcow2rs.open(disk) as img:
        calls: Dict[str, Callable[[], Any]] = {
            "write_at": lambda: img.write_at(0, b"x"),
            "write": lambda: img.write(b"x"),
            "write_zeroes": lambda: img.write_zeroes(0, 65536),
            "discard": lambda: img.discard(0, 65536),
            "resize": lambda: img.resize(16 * MiB),
            "check(repair)": lambda: img.check(repair="all"),
        }
        for name, call in calls.items():
            with pytest.raises(qcow2rs.ReadOnlyError) as ei:
                call()
            assert ei.value.errno == errno.EROFS, name
            assert ei.value.filename == str(disk), name
            assert str(disk) in str(ei.value), name
        assert img.read_at(0, 1) == b"\0"
        assert img.virtual_size == 8 * MiB


BAD_CREATE_OPTIONS = [
    {"cluster_size": 1000},
    {"cluster_size": 256},
    {"cluster_size": 4 * MiB},
    {"cluster_size": 2**40},
    {"refcount_bits": 3},
    {"compat": "2.0"},
    {"compat": "0.10", "refcount_bits": 8},
    {"compat": "0.10", "lazy_refcounts": True},
    {"preallocation": "full-speed"},
    {"compression_type": "lz4"},
    {"extended_l2": True, "cluster_size": 4096},
]


@pytest.mark.parametrize("options", BAD_CREATE_OPTIONS, ids=repr)
def test_bad_create_option(tmp_path: Path, options: Dict[str, Any]) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        qcow2rs.create(tmp_path / "bad.qcow2", MiB, **options)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.errno == errno.EINVAL
    assert str(err)


def test_negative_size_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError, match="size"):
        qcow2rs.create(tmp_path / "neg.qcow2", -1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "w"},
        {"mode": "wb"},
        {"mode": "r+w"},
        {"cache": "sometimes"},
        {"l2_cache_size": -1},
    ],
    ids=repr,
)
def test_bad_open_option(disk: Path, kwargs: Dict[str, Any]) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        qcow2rs.open(disk, **kwargs)
    assert ei.value.errno == errno.EINVAL
    assert ei.value.filename is None


def test_bad_repair_mode(rw: qcow2rs.Image) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError, match="repair"):
        rw.check(repair="everything")


def test_wrong_types_are_type_errors(disk: Path) -> None:
    with pytest.raises(TypeError):
        qcow2rs.create(disk, "1G")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        qcow2rs.open(12345)  # type: ignore[arg-type]


def test_errors_pickle(tmp_path: Path) -> None:
    path = tmp_path / "missing.qcow2"
    with pytest.raises(qcow2rs.Error) as ei:
        qcow2rs.open(path)
    again = pickle.loads(pickle.dumps(ei.value))
    assert type(again) is type(ei.value)
    assert (again.errno, again.strerror, again.filename, str(again)) == (
        ei.value.errno,
        ei.value.strerror,
        ei.value.filename,
        str(ei.value),
    )


def test_error_can_be_raised_by_users() -> None:
    err = qcow2rs.Error("plain message")
    assert str(err) == "plain message"
    assert err.errno is None
    err = qcow2rs.CorruptImageError(errno.EIO, "f: image is corrupt: bad", "f")
    assert (str(err), err.errno, err.filename) == ("f: image is corrupt: bad", errno.EIO, "f")
