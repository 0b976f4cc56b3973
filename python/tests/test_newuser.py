"""What a new user tries first, checked against what the built-in open, io.FileIO and qemu-img
do: the audit of issue 12 (modes, error messages and filenames, convert's qemu-img options,
inspection of an encrypted image without its password, help() on the result types)."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import pydoc
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest

import qcow2rs

MiB = 1 << 20


def builtin_open_error(tmp_path: Path, mode: str) -> Tuple[type, str]:
    """The exception type and message the built-in open gives for `mode`."""
    path = tmp_path / "plain.bin"
    path.write_bytes(b"x")
    try:
        open(path, mode).close()
    except (ValueError, TypeError) as e:
        return type(e), str(e)
    raise AssertionError(f"the built-in open took {mode!r}")


@pytest.mark.parametrize("mode", ["br", "+rb", "b+r", "+r", "rb+", "r+b"])
def test_every_spelling_of_open_is_taken(disk: Path, mode: str) -> None:
    # The built-in open takes the letters in any order.
    with io.FileIO(disk, mode) as f:
        builtin = f.mode
    with qcow2rs.open(disk, mode) as img:
        assert img.mode == builtin
        assert img.writable() is ("+" in mode)


@pytest.mark.parametrize("mode", ["rbb", "r++", "z", "U", "rU", "rb ", "rtb", "rwb", "", "b", "+", "t"])
def test_invalid_modes_fail_as_the_builtin_open_fails(
    disk: Path, tmp_path: Path, mode: str
) -> None:
    kind, message = builtin_open_error(tmp_path, mode)
    with pytest.raises(kind) as ei:
        qcow2rs.open(disk, mode)
    assert str(ei.value) == message
    assert isinstance(ei.value, qcow2rs.InvalidArgumentError)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("mode", ["w", "wb", "w+b", "a", "ab", "x", "xb"])
def test_modes_that_create_or_truncate_are_refused(disk: Path, mode: str) -> None:
    before = disk.read_bytes()
    with pytest.raises(ValueError, match=rf"^invalid mode: '{re.escape(mode)}'.*qcow2rs\.create"):
        qcow2rs.open(disk, mode)
    assert disk.read_bytes() == before


@pytest.mark.parametrize("mode", ["rt", "r+t"])
def test_text_modes_are_refused(disk: Path, mode: str) -> None:
    with pytest.raises(ValueError, match="invalid mode"):
        qcow2rs.open(disk, mode)


def test_a_mode_that_is_not_a_str_is_a_type_error(disk: Path) -> None:
    with pytest.raises(TypeError, match=r"^open\(\) argument 'mode' must be str, not int$"):
        qcow2rs.open(disk, 5)  # type: ignore[arg-type]


def test_seek_takes_integers_only(rw: qcow2rs.Image) -> None:
    with io.FileIO(os.devnull) as f, pytest.raises(TypeError) as builtin:
        f.seek(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as ours:
        rw.seek(3.0)  # type: ignore[arg-type]
    assert str(ours.value) == str(builtin.value)


def test_fileno_of_a_closed_image_is_a_value_error(disk: Path) -> None:
    img = qcow2rs.open(disk)
    with pytest.raises(io.UnsupportedOperation):
        img.fileno()
    img.close()
    with pytest.raises(ValueError, match="closed"):
        img.fileno()


# -- error messages and filenames ------------------------------------------------------------


def test_invalid_argument_messages_do_not_repeat_themselves(rw: qcow2rs.Image) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        rw.check(repair="everything")
    assert str(ei.value) == "invalid repair mode: 'everything' (use None, 'leaks' or 'all')"
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        rw.write_at(rw.size, b"x")
    # Like every other error of a call on an image: the file first, then what is wrong.
    assert str(ei.value).startswith(f"{rw.name}: cannot write 1 bytes")
    assert "invalid argument" not in str(ei.value)


BAD_CALLS: List[Tuple[str, Callable[[qcow2rs.Image], Any]]] = [
    ("read_at", lambda img: img.read_at(-1, 1)),
    ("read_at length", lambda img: img.read_at(0, -1)),
    ("readinto_at", lambda img: img.readinto_at(-1, bytearray(1))),
    ("write_at", lambda img: img.write_at(-1, b"x")),
    ("write_zeroes", lambda img: img.write_zeroes(0, -1)),
    ("discard", lambda img: img.discard(-1, 1)),
    ("resize", lambda img: img.resize(-1)),
    ("truncate", lambda img: img.truncate(-1)),
    ("map", lambda img: img.map(-1)),
    ("check", lambda img: img.check(repair="everything")),
    ("create_snapshot", lambda img: img.create_snapshot("s", vm_clock_nsec=-1)),
    ("add_password", lambda img: img.add_password("pw", iter_time=-1)),
]


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[n for n, _ in BAD_CALLS])
def test_bad_arguments_on_an_image_name_it(rw: qcow2rs.Image, call: Callable[..., Any]) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        call(rw)
    assert ei.value.errno == errno.EINVAL
    assert ei.value.filename == rw.name


def test_open_errors_name_the_file(disk: Path) -> None:
    with qcow2rs.open(disk, "r+b") as img:
        img.create_snapshot("s")
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        qcow2rs.open(disk, "r+b", snapshot="s")
    assert ei.value.filename == str(disk)
    assert str(ei.value).startswith(f"{disk}: ")


def test_create_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.qcow2"
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        qcow2rs.create(path, MiB, cluster_size=1000)
    assert ei.value.filename == str(path)


# -- an encrypted image without its password, as qemu-img info / map / check inspect it ------


def test_inspect_an_encrypted_image_without_its_password(tmp_path: Path, qemu_info: Any) -> None:
    path = tmp_path / "enc.qcow2"
    qcow2rs.create(path, 4 * MiB, encrypt="luks", password="pw", iter_time=10)
    with qcow2rs.open(path, "r+b", password="pw") as img:
        img.write_at(0, b"secret data")
        img.create_snapshot("one")
    with qcow2rs.open(path, without_key=True) as img:
        assert img.info().to_dict() == qemu_info(path)
        assert [s.name for s in img.snapshots()] == ["one"]
        assert img.check().is_clean
        assert img.map()[0].data
        with pytest.raises(qcow2rs.BadPasswordError) as ei:
            img.read_at(0, 11)
        assert ei.value.filename == str(path)


# -- convert: the qemu-img convert options a user looks for ----------------------------------


@pytest.fixture
def raw_src(tmp_path: Path) -> Path:
    path = tmp_path / "src.raw"
    path.write_bytes(os.urandom(MiB) + bytes(MiB))
    return path


def test_convert_refuses_compression_with_encryption(raw_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "ce.qcow2"
    # qemu-img: "Compression and encryption not supported at the same time"
    with pytest.raises(qcow2rs.InvalidArgumentError, match="ompression and encryption"):
        qcow2rs.convert(raw_src, dst, compress=True, encrypt="luks", password="pw", iter_time=10)
    assert not dst.exists()


def test_convert_a_snapshot_out(tmp_path: Path, qemu_img: Any) -> None:
    src = tmp_path / "src.qcow2"
    qcow2rs.create(src, 2 * MiB)
    with qcow2rs.open(src, "r+b") as img:
        img.write_at(0, b"then")
        img.create_snapshot("then")
        img.write_at(0, b"now!")
    dst = tmp_path / "then.raw"
    qcow2rs.convert(src, dst, dst_format="raw", snapshot="then")  # qemu-img convert -l then
    assert dst.read_bytes()[:4] == b"then"
    ref = tmp_path / "ref.raw"
    assert qemu_img("convert", "-l", "then", "-O", "raw", src, ref).returncode == 0
    assert ref.read_bytes() == dst.read_bytes()
    with pytest.raises(qcow2rs.SnapshotNotFoundError):
        qcow2rs.convert(src, tmp_path / "x.raw", dst_format="raw", snapshot="never")


@pytest.mark.parametrize("cache", ["writeback", "writethrough", "unsafe", "none"])
def test_convert_cache_mode(raw_src: Path, tmp_path: Path, qemu_img: Any, cache: str) -> None:
    dst = tmp_path / "t.qcow2"
    qcow2rs.convert(raw_src, dst, cache=cache)  # qemu-img convert -t CACHE
    assert qemu_img("compare", raw_src, dst).returncode == 0


def test_convert_bad_cache_mode(raw_src: Path, tmp_path: Path) -> None:
    with pytest.raises(qcow2rs.InvalidArgumentError, match="cache"):
        qcow2rs.convert(raw_src, tmp_path / "t.qcow2", cache="sometimes")


def test_convert_names_itself_for_an_unknown_option(raw_src: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^convert\(\) got an unexpected keyword argument 'clustersize'"):
        qcow2rs.convert(raw_src, tmp_path / "t.qcow2", clustersize=4096)


def test_convert_size_error_names_the_target(raw_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "small.qcow2"
    qcow2rs.create(dst, MiB)
    with pytest.raises(qcow2rs.InvalidArgumentError) as ei:
        qcow2rs.convert(raw_src, dst, no_create=True)
    assert ei.value.filename == str(dst)


# -- help() shows what the source documents -------------------------------------------------


@pytest.mark.parametrize(
    "cls, field, words",
    [
        (qcow2rs.ImageInfo, "actual_size", "occupies on disk"),
        (qcow2rs.MapEntry, "depth", "Backing-chain depth"),
        (qcow2rs.CheckResult, "exit_code", "qemu-img's exit code"),
        (qcow2rs.Snapshot, "icount", "instruction count"),
    ],
)
def test_help_shows_the_fields_of_result_types(cls: type, field: str, words: str) -> None:
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    assert field in text and words in text


# -- create over a backing file, as qemu-img create -b -F does it ----------------------------


def test_create_takes_the_size_of_the_backing_file(tmp_path: Path, qemu_info: Any) -> None:
    base = tmp_path / "base.qcow2"
    qcow2rs.create(base, 3 * MiB)
    top = tmp_path / "top.qcow2"
    # qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2   (no size)
    qcow2rs.create(top, backing_file="base.qcow2", backing_format="qcow2")
    assert qemu_info(top)["virtual-size"] == 3 * MiB
    raw = tmp_path / "base.raw"
    raw.write_bytes(bytes(5 * MiB))
    qcow2rs.create(top, backing_file=str(raw), backing_format="raw")
    assert qemu_info(top)["virtual-size"] == 5 * MiB


def test_create_without_a_size_or_a_backing_file(tmp_path: Path) -> None:
    path = tmp_path / "nosize.qcow2"
    with pytest.raises(qcow2rs.InvalidArgumentError, match="needs a size") as ei:
        qcow2rs.create(path)
    assert ei.value.filename == str(path)


def test_create_needs_the_backing_format(tmp_path: Path) -> None:
    # As documented, and as qemu-img refuses it: the format is not guessed.
    qcow2rs.create(tmp_path / "base.qcow2", MiB)
    path = tmp_path / "top.qcow2"
    with pytest.raises(qcow2rs.InvalidArgumentError, match="without backing format") as ei:
        qcow2rs.create(path, MiB, backing_file="base.qcow2")
    assert ei.value.filename == str(path)
    assert not path.exists()


def test_writing_a_read_only_image_is_unsupported_as_with_fileio(disk: Path) -> None:
    # io.FileIO opened "rb" raises io.UnsupportedOperation for write and truncate; so do we
    # (ReadOnlyError is one), and the mode is checked before the position, as FileIO does.
    with qcow2rs.open(disk) as img:
        img.seek(0, io.SEEK_END)
        calls: List[Callable[[], Any]] = [
            lambda: img.write(b"x"),
            lambda: img.write_at(img.size, b"x"),
            lambda: img.truncate(0),
            lambda: img.write(b""),
        ]
        for call in calls:
            with pytest.raises(io.UnsupportedOperation) as ei:
                call()
            assert isinstance(ei.value, qcow2rs.ReadOnlyError)
            assert ei.value.errno == errno.EROFS
            assert ei.value.filename == str(disk)


def test_a_snapshot_object_names_its_snapshot(disk: Path) -> None:
    with qcow2rs.open(disk, "r+b") as img:
        img.write_at(0, b"one")
        snap = img.create_snapshot("same name")
        img.write_at(0, b"two")
        img.create_snapshot("same name")
        assert img.apply_snapshot(snap) == snap  # by its ID: the name is not unique
        assert img.read_at(0, 3) == b"one"
    with qcow2rs.open(disk, snapshot=snap) as view:
        assert view.snapshot_view == snap
    with qcow2rs.open(disk, "r+b") as img:
        assert img.delete_snapshot(snap) == snap
        assert [s.id for s in img.snapshots()] == ["2"]


def test_convert_force_share_reads_an_image_in_use(disk: Path, tmp_path: Path) -> None:
    with qcow2rs.open(disk, "r+b") as img:
        img.write_at(0, b"busy")
        img.flush()
        out = tmp_path / "copy.raw"
        with pytest.raises(qcow2rs.ImageLockedError):
            qcow2rs.convert(disk, out, dst_format="raw")
        qcow2rs.convert(disk, out, dst_format="raw", force_share=True)  # qemu-img convert -U
        assert out.read_bytes()[:4] == b"busy"


def test_convert_raises_qcow2rs_errors_for_raw_files(raw_src: Path, tmp_path: Path) -> None:
    # Whatever the formats, a failing file is a qcow2rs.Error naming it.
    missing = tmp_path / "missing.raw"
    with pytest.raises(qcow2rs.NotFoundError) as ei:
        qcow2rs.convert(missing, tmp_path / "o.qcow2")
    assert ei.value.filename == str(missing) and ei.value.errno == errno.ENOENT
    with pytest.raises(qcow2rs.NotFoundError) as ei:
        qcow2rs.convert(missing, tmp_path / "o.qcow2", src_format="raw")
    assert ei.value.filename == str(missing)
    dst = tmp_path / "no" / "such" / "dir.raw"
    with pytest.raises(qcow2rs.NotFoundError) as ei:
        qcow2rs.convert(raw_src, dst, dst_format="raw")
    assert ei.value.filename == str(dst)
    with pytest.raises(qcow2rs.Error) as other:
        qcow2rs.convert(tmp_path, tmp_path / "o.qcow2", src_format="raw")
    assert other.value.errno == errno.EISDIR and other.value.filename == str(tmp_path)


def test_bad_seeks_fail_as_fileio_fails(rw: qcow2rs.Image) -> None:
    # io.FileIO raises OSError(EINVAL); io.BytesIO a ValueError: InvalidArgumentError is both.
    rw.seek(100)
    for args in [(-1,), (-101, io.SEEK_CUR), (-rw.size - 1, io.SEEK_END), (0, 7)]:
        with pytest.raises(OSError) as ei:
            rw.seek(*args)
        assert isinstance(ei.value, qcow2rs.InvalidArgumentError)
        assert ei.value.errno == errno.EINVAL and ei.value.filename == rw.name
        assert rw.tell() == 100


def test_create_without_opening_the_backing_file(tmp_path: Path, qemu_info: Any) -> None:
    # qemu-img create -u: the backing file need not exist yet; then the size must be given.
    path = tmp_path / "top.qcow2"
    qcow2rs.create(path, 2 * MiB, backing_file="later.qcow2", backing_format="qcow2",
                   open_backing=False)
    info = qemu_info(path)
    assert info["backing-filename"] == "later.qcow2" and info["virtual-size"] == 2 * MiB
    with pytest.raises(qcow2rs.InvalidArgumentError):
        qcow2rs.create(path, backing_file="later.qcow2", backing_format="qcow2",
                       open_backing=False)


def test_open_overrides_lazy_refcounts(disk: Path, qemu_info: Any) -> None:
    # --image-opts lazy-refcounts=on: refcounts written at close; the dirty bit meanwhile.
    with qcow2rs.open(disk, "r+b", lazy_refcounts=True) as img:
        img.write_at(0, b"x" * 65536)
        img.flush()
        assert img.info().dirty
    assert not qemu_info(disk)["dirty-flag"]


def test_seek_data_and_hole_as_lseek(rw: qcow2rs.Image, qemu_img: Any) -> None:
    # os.SEEK_DATA / os.SEEK_HOLE, as lseek(2) answers them for a sparse file: data is what
    # qemu-img map calls data; zero clusters and unallocated ones are holes, the end is one.
    rw.write_at(MiB, b"d" * 65536)
    rw.write_at(3 * MiB, b"e" * 4096)
    rw.write_zeroes(3 * MiB + 65536, 65536)
    rw.flush()
    json_map = qemu_img("map", "-U", "--output=json", rw.name)
    assert json_map.returncode == 0
    data: List[Tuple[int, int]] = []
    for e in json.loads(json_map.stdout):
        if not e["data"]:
            continue
        if data and data[-1][1] == e["start"]:
            data[-1] = (data[-1][0], e["start"] + e["length"])
        else:
            data.append((e["start"], e["start"] + e["length"]))
    assert data == [(MiB, MiB + 65536), (3 * MiB, 3 * MiB + 65536)]
    assert rw.seek(0, os.SEEK_DATA) == MiB
    assert rw.tell() == MiB
    assert rw.seek(MiB + 5, os.SEEK_DATA) == MiB + 5
    assert rw.seek(MiB + 5, os.SEEK_HOLE) == MiB + 65536
    assert rw.seek(MiB + 65536, os.SEEK_DATA) == 3 * MiB
    assert rw.seek(3 * MiB, os.SEEK_HOLE) == 3 * MiB + 65536
    assert rw.seek(0, os.SEEK_HOLE) == 0
    assert rw.seek(3 * MiB + 65536, os.SEEK_HOLE) == 3 * MiB + 65536
    for offset in (3 * MiB + 65536, rw.size, rw.size + 1):
        with pytest.raises(qcow2rs.Error) as ei:
            rw.seek(offset, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO and ei.value.filename == rw.name
    with pytest.raises(qcow2rs.Error) as ei:
        rw.seek(rw.size, os.SEEK_HOLE)
    assert ei.value.errno == errno.ENXIO
    assert rw.tell() == 3 * MiB + 65536


def test_close_while_other_threads_read_and_write(disk: Path) -> None:
    # close() waits for the calls in flight; later calls raise ValueError, as on a closed file.
    img = qcow2rs.open(disk, "r+b")
    started = threading.Barrier(5)
    ended: List[BaseException] = []

    def worker(k: int) -> None:
        started.wait()
        try:
            while True:
                if k % 2:
                    img.write_at(k * MiB, bytes([k]) * 65536)
                else:
                    img.read_at(0, 4 * MiB)
        except BaseException as e:  # noqa: B902 - the test looks at what ended the loop
            ended.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.05)
    img.close()
    for t in threads:
        t.join(timeout=30)
    assert len(ended) == 4
    assert all(type(e) is ValueError and "closed" in str(e) for e in ended), ended
    with qcow2rs.open(disk) as img:
        assert img.check().is_clean


@pytest.mark.parametrize(
    "cls",
    [c for c in vars(qcow2rs).values() if isinstance(c, type) and issubclass(c, qcow2rs.Error)],
    ids=lambda c: c.__name__,
)
def test_every_error_class_pickles(cls: type[qcow2rs.Error]) -> None:
    err = cls(errno.EIO, "disk.qcow2: what went wrong", "disk.qcow2")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, OSError)
    assert type(again) is cls
    assert (again.errno, again.filename, str(again)) == (
        errno.EIO,
        "disk.qcow2",
        "disk.qcow2: what went wrong",
    )


def test_os_error_messages_read_as_python_words_them(tmp_path: Path) -> None:
    # "x: Could not open: No such file or directory", not Rust's "... (os error 2)": the errno
    # is in e.errno already.
    path = tmp_path / "missing.qcow2"
    with pytest.raises(qcow2rs.NotFoundError) as ei:
        qcow2rs.open(path)
    assert str(ei.value) == f"{path}: Could not open: {os.strerror(errno.ENOENT)}"
    with pytest.raises(qcow2rs.Error) as other:
        qcow2rs.create(tmp_path, MiB)
    assert str(other.value).endswith(os.strerror(errno.EISDIR))


def test_change_password_and_qemu_agrees(tmp_path: Path, qemu_img: Any) -> None:
    path = tmp_path / "enc.qcow2"
    qcow2rs.create(path, MiB, encrypt="luks", password="old", iter_time=10)
    with qcow2rs.open(path, "r+b", password="old") as img:
        img.write_at(0, b"secret data")
        assert img.change_password("old", "new", iter_time=10) == 1
        with pytest.raises(qcow2rs.InvalidArgumentError):
            img.change_password("new", "new")
        with pytest.raises(qcow2rs.InvalidArgumentError, match="no keyslots match"):
            img.change_password("wrong", "newer", iter_time=10)
        slots = [s["active"] for s in (img.info().encryption or {})["slots"]]
        assert slots == [False, True] + [False] * 6

    def qemu_check(pw: str) -> Any:
        return qemu_img("check", "--object", f"secret,id=k,data={pw}", "--image-opts",
                        f"driver=qcow2,file.filename={path},encrypt.key-secret=k")

    assert qemu_check("new").returncode == 0
    bad = qemu_check("old")
    assert bad.returncode != 0 and "Invalid password" in bad.stderr
    with pytest.raises(qcow2rs.BadPasswordError):
        qcow2rs.open(path, password="old")
    with qcow2rs.open(path, password="new") as img:
        assert img.read_at(0, 11) == b"secret data"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_convert_to_a_full_raw_target_is_no_space(raw_src: Path) -> None:
    # /dev/full refuses every write with ENOSPC. A device is written in place (not created,
    # not truncated), with or without -n.
    for no_create in (False, True):
        with pytest.raises(qcow2rs.NoSpaceError) as ei:
            qcow2rs.convert(raw_src, "/dev/full", dst_format="raw", no_create=no_create)
        assert ei.value.errno == errno.ENOSPC and ei.value.filename == "/dev/full"


def test_convert_into_a_block_device_writes_the_zeros(raw_src: Path, tmp_path: Path) -> None:
    # qemu-img convert -O raw disk.qcow2 /dev/sdX: a device does not read as zeros, so the
    # zero runs must be written too. A loop device stands in for the disk (root only).
    losetup = shutil.which("losetup")
    if losetup is None or os.geteuid() != 0:
        pytest.skip("needs losetup and root")
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xff" * (3 * MiB))
    r = subprocess.run([losetup, "--find", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"losetup: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        src = tmp_path / "src.qcow2"
        qcow2rs.convert(raw_src, src)
        qcow2rs.convert(src, dev, dst_format="raw")
        with open(dev, "rb") as f:
            assert f.read(2 * MiB) == raw_src.read_bytes()
            assert f.read() == b"\xff" * MiB  # past the source: untouched
        big = tmp_path / "big.raw"
        big.write_bytes(bytes(4 * MiB))
        with pytest.raises(qcow2rs.InvalidArgumentError, match="smaller"):
            qcow2rs.convert(big, dev, dst_format="raw")
        # And from the device: qemu-img convert -f raw /dev/sdX disk.qcow2.
        out = tmp_path / "from-device.qcow2"
        qcow2rs.convert(dev, out)
        with qcow2rs.open(out) as img:
            assert img.size == 3 * MiB
            assert img.read() == raw_src.read_bytes() + b"\xff" * MiB
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def test_inspect_an_encrypted_chain_without_passwords(tmp_path: Path, qemu_info: Any) -> None:
    # qemu-img info needs no key, for the image or its encrypted backing file; nor does
    # qemu-img create -b over an encrypted base (the size is metadata).
    base = tmp_path / "base.qcow2"
    qcow2rs.create(base, 2 * MiB, encrypt="luks", password="basepw", iter_time=10)
    top = tmp_path / "top.qcow2"
    qcow2rs.create(top, backing_file="base.qcow2", backing_format="qcow2", encrypt="luks",
                   password="toppw", iter_time=10)
    assert qemu_info(top)["virtual-size"] == 2 * MiB
    with pytest.raises(qcow2rs.BadPasswordError):
        qcow2rs.create(top, backing_file="base.qcow2", backing_format="qcow2",
                       backing_password="wrong")
    with qcow2rs.open(top, without_key=True) as img:
        assert img.info().to_dict() == qemu_info(top)
        assert [(e.depth, e.present) for e in img.map()] == [(1, False)]
        with pytest.raises(qcow2rs.BadPasswordError):
            img.read_at(0, 1)
    with qcow2rs.open(top, password="toppw", without_key=True) as img:
        with pytest.raises(qcow2rs.BadPasswordError) as ei:
            img.read_at(0, 1)  # the data is the base's, whose key was not given
        assert ei.value.filename is not None and ei.value.filename.endswith("base.qcow2")
    with pytest.raises(qcow2rs.BadPasswordError):
        qcow2rs.open(top, password="toppw")  # without without_key, the base's key is needed
