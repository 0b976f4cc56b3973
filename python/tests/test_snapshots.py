"""Internal snapshots: create, list, apply, delete, read-only views, errors, and qemu-img agreeing
both ways (what Python snapshots qemu-img lists and applies, and the reverse)."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest

import qcow2rs

MiB = 1 << 20


def test_snapshot_not_found_error_class() -> None:
    cls = qcow2rs.SnapshotNotFoundError
    assert issubclass(cls, qcow2rs.Error) and issubclass(cls, LookupError)
    assert issubclass(cls, OSError) and not issubclass(cls, FileNotFoundError)
    assert cls.__module__ == "qcow2rs"
    assert "SnapshotNotFoundError" in qcow2rs.__all__
    assert "Snapshot" in qcow2rs.__all__


def test_create_list_apply_delete(rw: qcow2rs.Image, disk: Path) -> None:
    assert rw.snapshots() == []
    rw.write_at(0, b"A" * 100000)
    before = time.time()
    a = rw.create_snapshot("first")
    after = time.time()
    assert isinstance(a, qcow2rs.Snapshot)
    assert (a.id, a.name, a.disk_size, a.vm_state_size, a.vm_clock_nsec, a.icount) == (
        "1",
        "first",
        8 * MiB,
        0,
        0,
        0,
    )
    assert before - 1 <= a.date_sec <= after + 1 and 0 <= a.date_nsec < 10**9
    assert a.date.tzinfo is timezone.utc
    assert abs(a.date.timestamp() - (a.date_sec + a.date_nsec / 1e9)) < 1e-5

    # Writes after the snapshot copy on write; the snapshot keeps the old data.
    rw.write_at(50000, b"B" * 100000)
    b = rw.create_snapshot("second")
    assert b.id == "2"
    rw.write_at(0, b"C" * 300000)
    assert rw.snapshots() == [a, b]
    info = rw.info()
    assert info.snapshot_count == 2 and info.snapshots == (a, b)

    assert rw.apply_snapshot("first") == a
    assert rw.read_at(0, 150000) == b"A" * 100000 + bytes(50000)
    assert rw.apply_snapshot("2") == b
    assert rw.read_at(0, 150000) == b"A" * 50000 + b"B" * 100000
    assert rw.snapshots() == [a, b]  # applying keeps the snapshot

    assert rw.delete_snapshot("first") == a
    assert rw.snapshots() == [b]
    assert rw.read_at(0, 150000) == b"A" * 50000 + b"B" * 100000
    assert rw.check().is_clean

    # Durable, and seen by a later open.
    rw.close()
    with qcow2rs.open(disk) as img:
        assert img.snapshots() == [b]
        assert img.read_at(0, 150000) == b"A" * 50000 + b"B" * 100000


def test_id_is_looked_up_before_name(rw: qcow2rs.Image) -> None:
    rw.write_at(0, b"one")
    one = rw.create_snapshot("base")
    rw.write_at(0, b"two")
    named_1 = rw.create_snapshot("1")  # ID 2, named like snapshot 1's ID
    assert (one.id, named_1.id, named_1.name) == ("1", "2", "1")
    rw.apply_snapshot("1")
    assert rw.read_at(0, 3) == b"one"
    rw.apply_snapshot("base")
    assert rw.read_at(0, 3) == b"one"
    rw.write_at(0, b"new")
    rw.delete_snapshot("1")  # ID 1 ("base"), not the snapshot named "1"
    assert rw.snapshots() == [named_1]
    rw.apply_snapshot("1")  # now only a name matches
    assert rw.read_at(0, 3) == b"two"


def test_create_options(rw: qcow2rs.Image, qemu_info: Callable[[Path], Any], disk: Path) -> None:
    aware = datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=timezone.utc)
    s1 = rw.create_snapshot("aware", date=aware, vm_clock_nsec=5_000_000_007, icount=None)
    assert (s1.date_sec, s1.date_nsec) == (1700000000, 123456000)
    assert s1.date == aware
    assert s1.vm_clock_nsec == 5_000_000_007 and s1.icount is None

    s2 = rw.create_snapshot("exact", date=(1700000000, 987654321), icount=42)
    assert (s2.date_sec, s2.date_nsec, s2.icount) == (1700000000, 987654321, 42)
    assert s2.date == datetime(2023, 11, 14, 22, 13, 20, 987654, tzinfo=timezone.utc)

    naive = datetime(2020, 1, 2, 3, 4, 5)  # local time, as datetime.timestamp() takes it
    s3 = rw.create_snapshot("naive", date=naive)
    assert s3.date_sec == int(naive.timestamp()) and s3.date_nsec == 0
    other_zone = datetime(2023, 11, 15, 0, 13, 20, tzinfo=timezone(timedelta(hours=2)))
    assert rw.create_snapshot("zoned", date=other_zone).date_sec == 1700000000
    assert [s.name for s in rw.snapshots()] == ["aware", "exact", "naive", "zoned"]
    rw.close()

    # qemu-img reads back exactly what was recorded.
    got = {s["name"]: s for s in qemu_info(disk)["snapshots"]}
    assert got["aware"]["id"] == "1"
    assert (got["aware"]["date-sec"], got["aware"]["date-nsec"]) == (1700000000, 123456000)
    assert (got["aware"]["vm-clock-sec"], got["aware"]["vm-clock-nsec"]) == (5, 7)
    assert "icount" not in got["aware"]
    assert (got["exact"]["date-nsec"], got["exact"]["icount"]) == (987654321, 42)
    assert got["naive"]["date-sec"] == int(naive.timestamp())


def test_snapshot_is_a_frozen_value(rw: qcow2rs.Image) -> None:
    s = rw.create_snapshot("v", date=(86400, 999))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"  # type: ignore[misc]
    assert s == dataclasses.replace(s)
    assert hash(s) == hash(dataclasses.replace(s))
    assert s.date == datetime(1970, 1, 2, tzinfo=timezone.utc)  # 999 ns: under a microsecond
    assert "name='v'" in repr(s)


def test_apply_changes_the_size(rw: qcow2rs.Image) -> None:
    rw.write_at(8 * MiB - 5, b"small")
    small = rw.create_snapshot("small")
    rw.resize(12 * MiB)
    rw.write_at(12 * MiB - 3, b"big")
    big = rw.create_snapshot("big")
    assert (small.disk_size, big.disk_size) == (8 * MiB, 12 * MiB)

    rw.seek(10 * MiB)
    rw.apply_snapshot("small")
    # Nothing caches the size: every view of it follows the apply.
    assert rw.size == rw.virtual_size == rw.info().virtual_size == 8 * MiB
    assert rw.read(10) == b""  # the position is past the new end: end of file
    assert rw.seek(0, io.SEEK_END) == 8 * MiB
    rw.seek(8 * MiB - 5)
    assert rw.readall() == b"small"
    assert rw.read_at(8 * MiB - 5, 100) == b"small"
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.write_at(8 * MiB, b"x")
    rw.seek(0)
    assert len(rw.readall()) == 8 * MiB

    rw.apply_snapshot(big.id)
    assert rw.size == rw.virtual_size == 12 * MiB
    assert rw.seek(0, io.SEEK_END) == 12 * MiB
    assert rw.read_at(12 * MiB - 3, 100) == b"big"
    assert rw.read_at(8 * MiB - 5, 5) == b"small"
    assert rw.check().is_clean


def test_read_only_view(disk: Path) -> None:
    with qcow2rs.open(disk, "rw") as img:
        img.write_at(0, b"then")
        snap = img.create_snapshot("then")
        img.write_at(0, b"now!")
        img.resize(16 * MiB)
        assert img.snapshot_view is None

    for which in ("then", "1"):
        with qcow2rs.open(disk, snapshot=which) as view:
            assert view.snapshot_view == snap
            assert view.read_only and not view.writable()
            assert view.read_at(0, 4) == b"then"
            assert view.size == 8 * MiB
            with pytest.raises(qcow2rs.ReadOnlyError):
                view.write_at(0, b"x")
            with pytest.raises(qcow2rs.ReadOnlyError):
                view.create_snapshot("on-a-view")
            with pytest.raises(qcow2rs.ReadOnlyError):
                view.apply_snapshot("1")
            with pytest.raises(qcow2rs.ReadOnlyError):
                view.delete_snapshot("1")

    # The active disk is untouched by the views.
    with qcow2rs.open(disk) as img:
        assert img.read_at(0, 4) == b"now!" and img.size == 16 * MiB
        assert img.snapshot_view is None

    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.open(disk, "rw", snapshot="then")
    with pytest.raises(qcow2rs.SnapshotNotFoundError) as ei:
        qcow2rs.open(disk, snapshot="never")
    assert ei.value.errno == errno.ENOENT and ei.value.filename == str(disk)


def test_not_found(rw: qcow2rs.Image, disk: Path) -> None:
    rw.create_snapshot("exists")
    calls: Dict[str, Callable[[], Any]] = {
        "apply": lambda: rw.apply_snapshot("missing"),
        "delete": lambda: rw.delete_snapshot("missing"),
    }
    for name, call in calls.items():
        with pytest.raises(qcow2rs.SnapshotNotFoundError) as ei:
            call()
        err = ei.value
        assert isinstance(err, LookupError) and isinstance(err, qcow2rs.Error), name
        assert not isinstance(err, FileNotFoundError), name
        assert err.errno == errno.ENOENT, name
        assert err.filename == str(disk), name
        assert "missing" in str(err) and str(disk) in str(err), name
    # LookupError is how callers may catch it.
    with pytest.raises(LookupError):
        rw.delete_snapshot("2")
    assert [s.name for s in rw.snapshots()] == ["exists"]


def test_read_only_image_refuses_changes(disk: Path) -> None:
    with qcow2rs.open(disk, "rw") as img:
        img.create_snapshot("s")
    with qcow2rs.open(disk) as img:
        assert [s.name for s in img.snapshots()] == ["s"]
        calls: Tuple[Callable[[], object], ...] = (
            lambda: img.create_snapshot("t"),
            lambda: img.apply_snapshot("s"),
            lambda: img.delete_snapshot("s"),
        )
        for call in calls:
            with pytest.raises(qcow2rs.ReadOnlyError) as ei:
                call()
            assert ei.value.errno == errno.EROFS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vm_clock_nsec": -1},
        {"icount": -5},
        {"icount": 2**64},
        {"date": (-1, 0)},
        {"date": (0, 2**32)},
    ],
    ids=repr,
)
def test_bad_snapshot_options(rw: qcow2rs.Image, kwargs: Dict[str, Any]) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.create_snapshot("bad", **kwargs)
    assert rw.snapshots() == []


def test_bad_snapshot_arguments(rw: qcow2rs.Image) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError, match="NUL"):
        rw.create_snapshot("a\0b")
    with pytest.raises(TypeError):
        rw.create_snapshot("d", date="yesterday")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rw.create_snapshot(7)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rw.apply_snapshot(1)  # type: ignore[arg-type]
    assert rw.snapshots() == []


def test_closed_image(disk: Path) -> None:
    img = qcow2rs.open(disk, "rw")
    img.close()
    with pytest.raises(ValueError):
        img.snapshots()
    with pytest.raises(ValueError):
        img.create_snapshot("x")


# -- qemu-img as the oracle ------------------------------------------------------------------


def test_qemu_img_lists_and_applies_python_snapshots(
    tmp_path: Path, qemu_img: Any, qemu_info: Callable[[Path], Any]
) -> None:
    path = tmp_path / "ours.qcow2"
    qcow2rs.create(path, 6 * MiB, cluster_size=4096)
    states = {}
    with qcow2rs.open(path, "rw") as img:
        img.write_at(1000, b"x" * 200000)
        states["alpha"] = (img.create_snapshot("alpha"), img.read_at(0, img.size))
        img.write_at(100000, b"y" * 300000)
        img.discard(0, 65536)
        states["beta"] = (img.create_snapshot("beta", icount=None), img.read_at(0, img.size))
        img.resize(7 * MiB)
        img.write_at(7 * MiB - 10, b"z" * 10)
        states["gamma"] = (img.create_snapshot("gamma"), img.read_at(0, img.size))
        img.write_at(0, b"w" * 500000)
        img.delete_snapshot("beta")
        del states["beta"]
        ours = img.snapshots()

    check = qemu_img("check", path)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = qemu_img("snapshot", "-l", path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()[2:]
    assert [line.split()[:2] for line in lines] == [["1", "alpha"], ["3", "gamma"]]
    js = qemu_info(path)["snapshots"]
    assert [(s["id"], s["name"], s["date-sec"], s["date-nsec"]) for s in js] == [
        (s.id, s.name, s.date_sec, s.date_nsec) for s in ours
    ]

    # qemu-img extracts each snapshot as we saw it (convert -l writes the active disk's size:
    # compare the snapshot's), and applies it, size included.
    for name, (snap, data) in states.items():
        out = tmp_path / f"{name}.raw"
        r = qemu_img("convert", "-l", f"snapshot.id={snap.id}", "-O", "raw", path, out)
        assert r.returncode == 0, r.stderr
        assert len(data) == snap.disk_size
        assert out.read_bytes()[: snap.disk_size] == data, name
    r = qemu_img("snapshot", "-a", "alpha", path)
    assert r.returncode == 0, r.stderr
    with qcow2rs.open(path) as img:
        assert img.size == 6 * MiB
        assert img.read_at(0, img.size) == states["alpha"][1]
    with qcow2rs.open(path, snapshot="gamma") as view:
        assert view.read_at(0, view.size) == states["gamma"][1]


def test_python_lists_and_applies_qemu_snapshots(
    tmp_path: Path, qemu_img: Any, qemu_io: Any, qemu_info: Callable[[Path], Any]
) -> None:
    path = tmp_path / "theirs.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", path, "4M").returncode == 0
    assert qemu_io("-c", "write -P 0x11 0 1M", path).returncode == 0
    assert qemu_img("snapshot", "-c", "by-qemu", path).returncode == 0
    assert qemu_io("-c", "write -P 0x22 512k 1M", path).returncode == 0
    assert qemu_img("resize", "-q", path, "5M").returncode == 0
    assert qemu_img("snapshot", "-c", "by-qemu-2", path).returncode == 0
    assert qemu_io("-c", "write -P 0x33 0 4M", path).returncode == 0

    js = {s["name"]: s for s in qemu_info(path)["snapshots"]}
    with qcow2rs.open(path, "rw") as img:
        snaps = img.snapshots()
        assert [(s.id, s.name) for s in snaps] == [("1", "by-qemu"), ("2", "by-qemu-2")]
        for s in snaps:
            q = js[s.name]
            assert (s.date_sec, s.date_nsec, s.icount) == (q["date-sec"], q["date-nsec"], 0)
            assert s.vm_state_size == 0 and s.vm_clock_nsec == 0
        assert [s.disk_size for s in snaps] == [4 * MiB, 5 * MiB]

        img.apply_snapshot("by-qemu")
        assert img.size == 4 * MiB
        assert img.read_at(0, 2 * MiB) == b"\x11" * MiB + bytes(MiB)
        img.apply_snapshot("2")
        assert img.size == 5 * MiB
        assert img.read_at(0, 2 * MiB) == b"\x11" * (MiB // 2) + b"\x22" * MiB + bytes(MiB // 2)
        img.delete_snapshot("by-qemu")
        img.create_snapshot("by-python")

    check = qemu_img("check", path)
    assert check.returncode == 0, check.stdout + check.stderr
    after = [(s["id"], s["name"]) for s in qemu_info(path)["snapshots"]]
    assert after == [("2", "by-qemu-2"), ("3", "by-python")]
    r = qemu_io("-r", "-c", "read -P 0x22 512k 1M", path)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    assert json.loads(qemu_img("info", "--output=json", path).stdout)["virtual-size"] == 5 * MiB
