"""Create, open, read, write, zeroes, discard, resize, info, map, check: the image's own calls."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest

import qcow2rs

MiB = 1 << 20
KiB = 1 << 10

# (offset, length) pairs: unaligned, crossing sector and cluster boundaries, multi-cluster.
UNALIGNED_WRITES = [
    (1, 1),
    (511, 2),
    (4095, 4098),
    (65536 - 7, 14),
    (3 * 65536 - 1000, 70000),
    (MiB + 12345, 200000),
    (8 * MiB - 333, 333),  # ends exactly at the end of the disk
]


def test_version() -> None:
    assert isinstance(qcow2rs.__version__, str)
    assert qcow2rs.__version__.count(".") == 2


def test_create_defaults_are_qemu_img_defaults(disk: Path) -> None:
    with qcow2rs.open(disk) as img:
        info = img.info()
    assert info == qcow2rs.ImageInfo(
        filename=str(disk),
        virtual_size=8 * MiB,
        actual_size=info.actual_size,
        cluster_size=65536,
        compat="1.1",
        refcount_bits=16,
        lazy_refcounts=False,
        corrupt=False,
        dirty=False,
        extended_l2=False,
        compression_type="zlib",
        backing_file=None,
        backing_format=None,
        full_backing_filename=None,
        crypt_method=0,
        snapshot_count=0,
        read_only=True,
    )
    assert info.actual_size > 0


def test_create_options_reach_the_image(tmp_path: Path) -> None:
    path = tmp_path / "opts.qcow2"
    qcow2rs.create(
        str(path),
        3 * MiB + 512,
        cluster_size=16384,
        refcount_bits=8,
        lazy_refcounts=True,
        extended_l2=True,
        compression_type="zstd",
    )
    with qcow2rs.open(path, "rw") as img:
        info = img.info()
        assert img.cluster_size == 16384
        assert img.virtual_size == img.size == 3 * MiB + 512
        assert not img.read_only
    assert (info.cluster_size, info.refcount_bits, info.compat) == (16384, 8, "1.1")
    assert info.lazy_refcounts and info.extended_l2
    assert info.compression_type == "zstd"
    assert info.read_only is False

    v2 = tmp_path / "v2.qcow2"
    qcow2rs.create(v2, MiB, compat="0.10")
    with qcow2rs.open(v2) as img:
        assert img.info().compat == "0.10"


def test_create_with_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    overlay = tmp_path / "overlay.qcow2"
    qcow2rs.create(overlay, MiB, backing_file=base, backing_format="raw")
    with qcow2rs.open(overlay, "rw") as img:
        info = img.info()
        assert info.backing_file == str(base)
        assert info.backing_format == "raw"
        assert img.read_at(1000, 4) == bytes([232, 233, 234, 235])
        img.write_at(1001, b"XY")
        assert img.read_at(1000, 4) == bytes([232]) + b"XY" + bytes([235])
    assert base.read_bytes()[1000:1004] == bytes([232, 233, 234, 235])


def test_unaligned_round_trip_survives_reopen(disk: Path, rng: random.Random) -> None:
    model = bytearray(8 * MiB)
    with qcow2rs.open(disk, "r+") as img:
        for offset, length in UNALIGNED_WRITES:
            data = rng.randbytes(length)
            img.write_at(offset, data)
            model[offset : offset + length] = data
            assert img.read_at(offset, length) == data
        # Overlapping rewrite across a cluster boundary.
        data = rng.randbytes(3000)
        img.write_at(65536 - 1500, data)
        model[65536 - 1500 : 65536 - 1500 + 3000] = data
        assert img.read_at(0, len(model)) == model
    with qcow2rs.open(disk) as img:
        assert img.read_at(0, len(model)) == model
        # Spot checks at odd offsets and lengths.
        for _ in range(200):
            off = rng.randrange(len(model))
            n = rng.randrange(1, 70000)
            assert img.read_at(off, n) == model[off : off + n]


def test_write_at_accepts_any_bytes_like(rw: qcow2rs.Image) -> None:
    import array

    rw.write_at(10, bytearray(b"abc"))
    rw.write_at(13, memoryview(b"xxdefxx")[2:5])
    arr = array.array("H", [0x4847, 0x4A49])  # little-endian host: b"GHIJ"
    rw.write_at(16, arr)
    assert rw.read_at(10, 6) == b"abcdef"
    assert rw.read_at(16, 4) == arr.tobytes()
    with pytest.raises(TypeError):
        rw.write_at(0, "text is not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rw.write_at(0, 5)  # type: ignore[arg-type]


def test_fresh_image_reads_zeros(disk: Path) -> None:
    with qcow2rs.open(disk) as img:
        assert img.read_at(0, 8 * MiB) == bytes(8 * MiB)


def test_read_past_end_is_short(rw: qcow2rs.Image) -> None:
    size = rw.virtual_size
    rw.write_at(size - 10, b"0123456789")
    assert rw.read_at(size - 10, 100) == b"0123456789"
    assert rw.read_at(size, 5) == b""
    assert rw.read_at(size + 12345, 5) == b""
    assert rw.read_at(0, 0) == b""


def test_write_past_end_raises_and_writes_nothing(rw: qcow2rs.Image) -> None:
    size = rw.virtual_size
    rw.write_at(size - 1, b"a")
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        rw.write_at(size - 1, b"bc")
    assert "does not grow" in str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert rw.read_at(size - 1, 1) == b"a"
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.write_at(size, b"x")
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.write_at(2**63, b"x")
    assert rw.virtual_size == size


def test_empty_write_is_a_no_op_anywhere(rw: qcow2rs.Image) -> None:
    rw.write_at(rw.virtual_size + 4096, b"")
    rw.seek(rw.virtual_size + 10)
    assert rw.write(b"") == 0


@pytest.mark.parametrize("compression_type", ["zlib", "zstd"])
def test_write_compressed(tmp_path: Path, compression_type: str, qemu_img) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.qcow2"
    raw = tmp_path / "c.raw"
    qcow2rs.create(path, 2 * MiB, compression_type=compression_type)
    text = b"compressible " * 6000
    with qcow2rs.open(path, "rw") as img:
        for i in range(4):
            img.write_compressed(i * 65536, text[i : i + 65536])
        incompressible = random.Random(7).randbytes(65536)
        img.write_compressed(5 * 65536, incompressible)
        with pytest.raises(qcow2rs.InvalidArgumentError):
            img.write_compressed(100, b"x" * 65536)  # not cluster aligned
        expect = b"".join(text[i : i + 65536] for i in range(4)) + bytes(65536) + incompressible
        assert img.read_at(0, 6 * 65536) == expect
        entries = img.map(0, 6 * 65536)
        assert [e.compressed for e in entries if e.start < 4 * 65536] == [True]
        assert not any(e.compressed for e in entries if e.start >= 5 * 65536)
        assert img.check().compressed_clusters == 4
    raw.write_bytes(expect + bytes(2 * MiB - len(expect)))
    assert qemu_img("check", path).returncode == 0
    assert qemu_img("compare", "-F", "raw", path, raw).returncode == 0


def test_negative_offsets_are_invalid_arguments(rw: qcow2rs.Image) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.read_at(-1, 10)
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.write_at(-1, b"x")
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.write_zeroes(0, -5)
    with pytest.raises(qcow2rs.InvalidArgumentError):
        rw.discard(-65536, 65536)


def test_write_zeroes_reads_zeros(rw: qcow2rs.Image, rng: random.Random) -> None:
    data = rng.randbytes(4 * 65536)
    rw.write_at(0, data)
    rw.write_zeroes(1000, 150000)  # unaligned at both ends, covers whole clusters too
    expect = bytearray(data)
    expect[1000:151000] = bytes(150000)
    assert rw.read_at(0, len(data)) == expect
    rw.flush()
    assert rw.check().is_clean


def test_discard_reads_zeros(rw: qcow2rs.Image, rng: random.Random) -> None:
    data = rng.randbytes(4 * 65536)
    rw.write_at(0, data)
    rw.discard(65536, 2 * 65536)
    expect = bytearray(data)
    expect[65536 : 3 * 65536] = bytes(2 * 65536)
    assert rw.read_at(0, len(data)) == expect
    extents = [e for e in rw.map() if e.start < 4 * 65536]
    assert any(not e.data and e.start <= 65536 < e.start + e.length for e in extents)
    rw.flush()
    assert rw.check().is_clean


def test_resize_grows_the_disk(rw: qcow2rs.Image) -> None:
    rw.resize(16 * MiB)
    assert rw.virtual_size == 16 * MiB
    assert rw.read_at(12 * MiB, 10) == bytes(10)
    rw.write_at(16 * MiB - 5, b"hello")
    assert rw.read_at(16 * MiB - 5, 10) == b"hello"
    assert rw.info().virtual_size == 16 * MiB


def test_map_reports_allocation(rw: qcow2rs.Image) -> None:
    entries = rw.map()
    assert sum(e.length for e in entries) == 8 * MiB
    assert not any(e.data for e in entries)
    rw.write_at(65536 + 3, b"x")
    entries = rw.map()
    assert entries[0].start == 0
    assert sum(e.length for e in entries) == 8 * MiB
    data = [e for e in entries if e.data]
    assert len(data) == 1
    assert (data[0].start, data[0].length, data[0].depth) == (65536, 65536, 0)
    assert data[0].offset is not None and data[0].offset % 65536 == 0
    assert data[0].present and not data[0].zero and not data[0].compressed
    part = rw.map(65536, 1000)
    assert part[0].start == 65536 and part[0].data


def test_check_clean_image(rw: qcow2rs.Image) -> None:
    rw.write_at(0, b"a" * 65536 * 3)
    rw.flush()
    result = rw.check()
    assert isinstance(result, qcow2rs.CheckResult)
    assert result.is_clean and result.exit_code == 0
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
    assert result.allocated_clusters == 3
    assert result.total_clusters == 8 * MiB // 65536
    assert not result.rebuilt
    assert result.messages == ()


def make_leak(path: Path) -> None:
    """Leak the data cluster of guest cluster 0 by zeroing the L2 entry that points to it."""
    with qcow2rs.open(path, "rw") as img:
        img.write_at(0, b"leak me")
        host = img.map(0, 1)[0].offset
    assert host is not None
    raw = bytearray(path.read_bytes())
    entry = (host | (1 << 63)).to_bytes(8, "big")  # the COPIED flag is set on a fresh cluster
    assert raw.count(entry) == 1
    i = raw.index(entry)
    raw[i : i + 8] = bytes(8)
    path.write_bytes(bytes(raw))


def test_check_finds_and_repairs_a_leak(disk: Path, qemu_img) -> None:  # type: ignore[no-untyped-def]
    make_leak(disk)
    assert qemu_img("check", disk).returncode == 3  # qemu-img agrees the image leaks

    with qcow2rs.open(disk) as img:
        before = img.check()
        assert (before.leaks, before.corruptions, before.exit_code) == (1, 0, 3)
        assert not before.is_clean
        assert any("Leaked cluster" in m for m in before.messages)
        with pytest.raises(qcow2rs.ReadOnlyError):
            img.check(repair="leaks")

    with qcow2rs.open(disk, "rw") as img:
        fixed = img.check(repair="leaks")
        assert fixed.leaks_fixed == 1 and fixed.leaks == 0
        assert img.check().is_clean
        assert img.read_at(0, 7) == bytes(7)
    assert qemu_img("check", disk).returncode == 0


def test_sync_count_counts_fdatasyncs(rw: qcow2rs.Image) -> None:
    start = rw.sync_count
    assert isinstance(start, int)
    rw.write_at(12345, b"durable")
    rw.flush()
    assert rw.sync_count > start


def test_cache_modes(disk: Path) -> None:
    for cache in ("writeback", "writethrough", "unsafe"):
        with qcow2rs.open(disk, "rw", cache=cache, l2_cache_size=MiB, refcount_cache_size=256 * KiB) as img:
            img.write_at(777, cache.encode())
            assert img.read_at(777, len(cache)) == cache.encode()
    expect = bytearray(b"writethrough")
    expect[:6] = b"unsafe"
    with qcow2rs.open(disk) as img:
        assert img.read_at(777, 12) == expect


def test_modes(disk: Path) -> None:
    with qcow2rs.open(disk) as img:
        assert img.read_only and not img.writable() and img.readable() and img.seekable()
    for mode in ("rw", "r+"):
        with qcow2rs.open(disk, mode) as img:
            assert not img.read_only and img.writable()


def test_image_constructor_is_open(disk: Path) -> None:
    with qcow2rs.Image(disk, "rw") as img:
        img.write_at(0, b"direct")
    with qcow2rs.open(disk) as img:
        assert img.read_at(0, 6) == b"direct"


def test_pathlike_and_name(disk: Path) -> None:
    with qcow2rs.open(disk) as img:
        assert img.name == str(disk)
        r = repr(img)
        assert r.startswith("<qcow2rs.Image ") and str(disk) in r and "'rb'" in r
    assert "closed" in repr(img)


def test_close_is_idempotent_and_final(disk: Path) -> None:
    img = qcow2rs.open(disk, "rw")
    img.write_at(0, b"x")
    img.close()
    img.close()
    assert img.closed
    for call in (
        lambda: img.read_at(0, 1),
        lambda: img.write_at(0, b"y"),
        lambda: img.flush(),
        lambda: img.info(),
        lambda: img.virtual_size,
        lambda: img.read(1),
        lambda: img.seek(0),
        lambda: img.tell(),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()
    with qcow2rs.open(disk) as again:
        assert again.read_at(0, 1) == b"x"


def test_unclosed_image_warns_and_still_flushes(disk: Path) -> None:
    img = qcow2rs.open(disk, "rw")
    img.write_at(4242, b"saved by the finalizer")
    with pytest.warns(ResourceWarning, match="unclosed image"):
        del img
        gc.collect()
    with qcow2rs.open(disk) as img2:
        assert img2.read_at(4242, 22) == b"saved by the finalizer"


def test_exception_inside_with_closes(disk: Path) -> None:
    with pytest.raises(RuntimeError):
        with qcow2rs.open(disk, "rw") as img:
            img.write_at(0, b"z")
            raise RuntimeError("boom")
    assert img.closed
    with qcow2rs.open(disk) as img:
        assert img.read_at(0, 1) == b"z"
