"""qcow2rs: crash-consistent qcow2 disk images.

Create an image, write to it and read it back::

    import qcow2rs

    qcow2rs.create("disk.qcow2", 1 << 30)              # 1 GiB virtual disk
    with qcow2rs.open("disk.qcow2", "r+b") as img:
        img.write_at(1 << 20, b"hello, qcow2")
        assert img.read_at(1 << 20, 12) == b"hello, qcow2"
        img.seek(0)
        boot_sector = img.read(512)                     # it is a binary file, too

An open :class:`Image` is an :class:`io.RawIOBase`, so :func:`shutil.copyfileobj`,
:class:`io.BufferedReader` and friends work on it. Errors are :class:`qcow2rs.Error`, an
:class:`OSError` with ``errno`` and ``filename`` set. Calls that touch the disk release the GIL.

Internal snapshots, as ``qemu-img snapshot`` makes them::

    with qcow2rs.open("disk.qcow2", "r+b") as img:
        snap = img.create_snapshot("before-upgrade")   # a Snapshot: id, name, date, ...
        img.write_at(0, b"oops")
        img.apply_snapshot(snap.id)                     # the disk is as it was
    with qcow2rs.open("disk.qcow2", snapshot="before-upgrade") as view:  # read-only view
        data = view.read_at(0, 4)
"""

from __future__ import annotations

import ast
import contextlib
import errno
import inspect
import io
import operator
import os
import re
import stat
import textwrap
import tokenize
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    Union,
)

try:
    from . import _qcow2rs
except ImportError:  # pragma: no cover - a broken installation (the cause is chained)
    raise ImportError(
        f"qcow2rs: the native module qcow2rs._qcow2rs is missing next to {__file__}. "
        "Install the package (`pip install ./python` from the repository root); when running "
        "from inside python/, the source directory qcow2rs/ shadows the installed package"
    )
from ._errors import (
    BadKeyError,
    BadPasswordError,
    CorruptImageError,
    Error,
    InvalidArgumentError,
    ImageLockedError,
    LockedError,
    NoSpaceError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    SnapshotNotFoundError,
    UnsupportedError,
    UnsupportedFeatureError,
)
from ._qcow2rs import __version__, create

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "__version__",
    "create",
    "convert",
    "open",
    "Image",
    "ImageInfo",
    "MapEntry",
    "CheckResult",
    "Snapshot",
    "Error",
    "NotFoundError",
    "PermissionDeniedError",
    "CorruptImageError",
    "UnsupportedError",
    "UnsupportedFeatureError",
    "InvalidArgumentError",
    "BadKeyError",
    "BadPasswordError",
    "ReadOnlyError",
    "ImageLockedError",
    "LockedError",
    "NoSpaceError",
    "SnapshotNotFoundError",
]

StrPath = Union[str, "os.PathLike[str]"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot, as ``qemu-img snapshot -l`` lists it."""

    id: str
    """The unique ID (QEMU numbers them: the highest numeric ID plus one)."""
    name: str
    """The name (tag); names need not be unique."""
    date_sec: int
    """Creation time: seconds since the Unix epoch."""
    date_nsec: int
    """Creation time: nanoseconds (see :attr:`date` for both as a datetime)."""
    vm_clock_nsec: int
    """The guest clock when the snapshot was taken, in nanoseconds (0 for disk-only snapshots)."""
    vm_state_size: int
    """Bytes of saved VM state (0 for disk-only snapshots such as ``qemu-img snapshot -c`` makes)."""
    disk_size: int
    """The virtual disk size when the snapshot was taken (applying it restores that size)."""
    icount: Optional[int]
    """The instruction count (record/replay), or None when not recorded (QEMU's -1)."""

    @property
    def date(self) -> datetime:
        """The creation time, as an aware datetime in UTC (to the microsecond)."""
        return _EPOCH + timedelta(seconds=self.date_sec, microseconds=self.date_nsec // 1000)

    def to_dict(self) -> Dict[str, Any]:
        """The snapshot as ``qemu-img info --output=json`` lists it (``snapshots``)."""
        d: Dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            d["icount"] = self.icount
        return d


def _snapshot_ref(snapshot: Union[str, Snapshot]) -> str:
    """A snapshot argument as the core takes it: an ID or a name; a Snapshot stands for its ID."""
    if isinstance(snapshot, Snapshot):
        return snapshot.id
    if isinstance(snapshot, str):
        return snapshot
    raise TypeError(f"a snapshot is an ID or a name (str) or a Snapshot, not {snapshot!r}")


def _date_arg(date: Union[datetime, Tuple[int, int], None]) -> Optional[Tuple[int, int]]:
    """A creation time as (seconds, nanoseconds) since the epoch; a naive datetime is local time,
    as :meth:`datetime.timestamp` takes it."""
    if date is None or isinstance(date, tuple):
        return date
    if not isinstance(date, datetime):
        raise TypeError(f"date must be a datetime or (seconds, nanoseconds), not {date!r}")
    delta = date.astimezone(timezone.utc) - _EPOCH
    return (delta.days * 86400 + delta.seconds, delta.microseconds * 1000)


@dataclass(frozen=True)
class ImageInfo:
    """Facts about an image, as ``qemu-img info`` shows them."""

    filename: str
    """The file name the image was opened with."""
    virtual_size: int
    """Virtual disk size in bytes."""
    actual_size: int
    """Bytes the host file occupies on disk."""
    cluster_size: int
    """Cluster size in bytes."""
    compat: str
    """Version: ``"0.10"`` (v2) or ``"1.1"`` (v3)."""
    refcount_bits: int
    """Refcount width in bits."""
    lazy_refcounts: bool
    """Lazy refcounts bit."""
    corrupt: bool
    """Corrupt bit."""
    dirty: bool
    """Dirty bit (lazy refcounts in use and not cleanly closed)."""
    extended_l2: bool
    """Extended L2 entries (subclusters)."""
    compression_type: str
    """``"zlib"`` or ``"zstd"``."""
    backing_file: Optional[str]
    """Backing file name as stored in the image."""
    backing_format: Optional[str]
    """Backing file format as stored in the image."""
    full_backing_filename: Optional[str]
    """Backing file name resolved against the image's directory."""
    crypt_method: int
    """Encryption method: 0 none, 1 AES, 2 LUKS."""
    snapshot_count: int
    """Number of internal snapshots."""
    read_only: bool
    """Whether the image is open read-only."""
    snapshots: Tuple[Snapshot, ...] = ()
    """The internal snapshots, in table order (``qemu-img snapshot -l``). Last and with a default
    so that code building an ImageInfo by keyword from before snapshots keeps working."""
    encryption: Optional[Dict[str, Any]] = None
    """The encryption (None for none), as the ``encrypt`` object of ``qemu-img info
    --output=json`` shows it: ``format`` (``"luks"`` or ``"aes"``) and, for LUKS, the cipher,
    the hash, the key slots (``slots``: ``active``, ``iters``, ``stripes``, ``key-offset``)..."""

    def to_dict(self) -> Dict[str, Any]:
        """The image as ``qemu-img info --output=json`` (without ``--backing-chain``) shows it:
        the same keys and values (the ``file`` child's sizes are read from the file now)."""
        st = os.stat(self.filename)
        actual = st.st_blocks * 512
        d: Dict[str, Any] = {
            "filename": self.filename,
            "format": "qcow2",
            "dirty-flag": self.dirty,
            "actual-size": actual,
            "virtual-size": self.virtual_size,
            "cluster-size": self.cluster_size,
        }
        if self.crypt_method != 0:
            d["encrypted"] = True
        if self.backing_file is not None:
            d["backing-filename"] = self.backing_file
            d["full-backing-filename"] = self.full_backing_filename
            if self.backing_format is not None:
                d["backing-filename-format"] = self.backing_format
        if self.snapshots:
            d["snapshots"] = [s.to_dict() for s in self.snapshots]
        data: Dict[str, Any] = {"compat": self.compat}
        if self.compat != "0.10":
            data["extended-l2"] = self.extended_l2
            data["lazy-refcounts"] = self.lazy_refcounts
            data["corrupt"] = self.corrupt
        data["refcount-bits"] = self.refcount_bits
        if self.encryption is not None:
            data["encrypt"] = dict(self.encryption)
        data["compression-type"] = self.compression_type
        d["format-specific"] = {"type": "qcow2", "data": data}
        size = -(-st.st_size // 512) * 512
        d["children"] = [
            {
                "name": "file",
                "info": {
                    "filename": self.filename,
                    "format": "file",
                    "dirty-flag": False,
                    "actual-size": actual,
                    "virtual-size": size,
                    "format-specific": {"type": "file", "data": {}},
                    "children": [],
                },
            }
        ]
        return d


@dataclass(frozen=True)
class MapEntry:
    """One extent of the guest address space, as ``qemu-img map --output=json`` shows it."""

    start: int
    """Guest offset."""
    length: int
    """Length in bytes."""
    depth: int
    """Backing-chain depth the data comes from (0 = this image)."""
    present: bool
    """Whether some image in the chain holds it."""
    zero: bool
    """Reads as zeros."""
    data: bool
    """Holds data (allocated)."""
    compressed: bool
    """Stored compressed."""
    offset: Optional[int]
    """Host offset in the file at ``depth``, for uncompressed data."""


@dataclass(frozen=True)
class CheckResult:
    """The result of :meth:`Image.check`, with the fields of ``qemu-img check --output=json``."""

    corruptions: int
    """Problems classified as corruptions (left after repair)."""
    leaks: int
    """Leaked clusters (left after repair)."""
    check_errors: int
    """Errors that prevented the check itself."""
    corruptions_fixed: int
    """Corruptions repaired."""
    leaks_fixed: int
    """Leaks repaired."""
    total_clusters: int
    """Guest clusters (virtual size / cluster size, rounded up), as qemu-img counts them."""
    allocated_clusters: int
    """Guest clusters allocated in this image."""
    fragmented_clusters: int
    """Allocated guest clusters not physically following their predecessor."""
    compressed_clusters: int
    """Compressed guest clusters."""
    image_end_offset: int
    """Highest host offset in use, rounded to a cluster."""
    messages: Tuple[str, ...]
    """One line per problem, worded as qemu-img words them."""
    rebuilt: bool
    """Whether the repair rebuilt the refcount structures."""
    is_clean: bool
    """True when no corruption, leak or check error remains."""
    exit_code: int
    """qemu-img's exit code for this result: 0 clean, 1 check errors, 2 corruptions, 3 leaks."""


def _as_bytes(data: Buffer) -> bytes:
    """`data` (any bytes-like object) as bytes, copying only when it is not bytes already."""
    if type(data) is bytes:
        return data
    with memoryview(data) as view:
        return view.tobytes()


class Image(io.RawIOBase):
    """An open qcow2 image: a binary file of the virtual disk's bytes, plus the image's own calls.

    Use it as a file (``read``, ``readinto``, ``write``, ``seek``, ``tell``, ``flush``, ``close``,
    ``with``), or at explicit offsets with :meth:`read_at` and :meth:`write_at`, which also suit
    several threads sharing one image. The virtual disk does not grow by writing: a write past its
    end raises :class:`InvalidArgumentError`; reads past it return short, as at end of file.
    """

    name: str
    """The path the image was opened with."""

    def __init__(
        self,
        path: StrPath,
        mode: str = "rb",
        *,
        cache: str = "writeback",
        l2_cache_size: Optional[int] = None,
        refcount_cache_size: Optional[int] = None,
        password: Optional[Union[str, bytes]] = None,
        backing_password: Optional[Union[str, bytes]] = None,
        snapshot: Union[str, Snapshot, None] = None,
        backing: Union[str, Iterable[StrPath], None] = "any",
        damaged: bool = False,
        force_share: bool = False,
        without_key: bool = False,
        lazy_refcounts: Optional[bool] = None,
    ) -> None:
        """Open the image at `path`; see :func:`qcow2rs.open`."""
        super().__init__()
        if not isinstance(mode, str):
            # As the built-in open words it.
            raise TypeError(f"open() argument 'mode' must be str, not {type(mode).__name__}")
        self._native = _qcow2rs.open(
            path,
            mode,
            cache=cache,
            l2_cache_size=l2_cache_size,
            refcount_cache_size=refcount_cache_size,
            password=password,
            backing_password=backing_password,
            snapshot=None if snapshot is None else _snapshot_ref(snapshot),
            backing=backing,
            damaged=damaged,
            force_share=force_share,
            without_key=without_key,
            lazy_refcounts=lazy_refcounts,
        )
        self.name = os.fsdecode(path)
        self._mode = "rb" if self._native.read_only else "rb+"
        self._pos = 0

    @property
    def mode(self) -> str:
        """``"rb"`` (read-only) or ``"rb+"`` (read-write), as :class:`io.FileIO` spells them."""
        return self._mode

    # -- the image's own calls -------------------------------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """Read up to `length` bytes at `offset`: fewer (or none) at the end of the disk."""
        return self._native.read_at(offset, length)

    def readinto_at(self, offset: int, buffer: Buffer) -> int:
        """Read into `buffer` (a writable, C-contiguous bytes-like object) at `offset`, without
        a copy; return the number of bytes read (fewer, or 0, at the end of the disk)."""
        return self._native.readinto_at(offset, buffer)

    def write_at(self, offset: int, data: Buffer) -> None:
        """Write all of `data` (any C-contiguous bytes-like object, not copied) at `offset`.

        Raises :class:`InvalidArgumentError` if the write would end past the end of the disk.
        """
        self._native.write_at(offset, data)

    def write_compressed(self, offset: int, data: Buffer) -> None:
        """Write `data`, compressed, as the whole cluster at the cluster-aligned `offset`.

        `data` is one cluster (less only for the last cluster of the disk), and the cluster must
        not be allocated yet; data that does not compress is written normally. The compression
        runs without the GIL, so several threads writing compressed clusters run in parallel.
        """
        self._native.write_compressed(offset, _as_bytes(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make `length` bytes at `offset` read as zeros, as cheaply as the format allows."""
        self._native.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Free the whole clusters inside the range; they read as zeros afterwards
        (or from the backing file in a v2 image that has one). Partial clusters are left alone."""
        self._native.discard(offset, length)

    def resize(self, size: int) -> None:
        """Change the virtual size. Shrinking requires the cut-off tail to be unallocated."""
        self._native.resize(size)

    def truncate(self, size: Optional[int] = None) -> int:
        """Resize the virtual disk to `size` bytes (default: the current position), as
        :meth:`resize` does; return the new size. The position does not move."""
        self._check_open()
        if size is None:
            size = self._pos
        self._native.resize(size)
        return size

    # -- LUKS key slots --------------------------------------------------------------------

    def add_password(
        self,
        password: Union[str, bytes],
        *,
        slot: Optional[int] = None,
        iter_time: Optional[int] = None,
        force: bool = False,
    ) -> int:
        """Add `password` to LUKS key slot `slot` (default: the first free one), as
        ``qemu-img amend -o encrypt.state=active,encrypt.new-secret=...`` does; return the
        slot. `iter_time` is the PBKDF2 time in milliseconds (default 2000); `force` allows
        overwriting an active slot. The image must be open read-write with a password."""
        return self._native.change_key_slots(
            add=password, slot=slot, iter_time=iter_time, force=force
        )[0]

    def remove_password(self, password: Union[str, bytes], *, force: bool = False) -> List[int]:
        """Erase every LUKS key slot that `password` opens; return those slots. Erasing the
        last working password needs `force`."""
        return self._native.change_key_slots(remove=password, force=force)

    def change_password(
        self,
        old: Union[str, bytes],
        new: Union[str, bytes],
        *,
        iter_time: Optional[int] = None,
    ) -> int:
        """Replace the password `old` by `new`: add `new` to the first free LUKS key slot, then
        erase every slot `old` opens (two ``qemu-img amend`` steps, each crash-safe: in between,
        both open the image); return the new slot. `old` and `new` must differ; when `old` opens no
        slot, nothing changes (:class:`InvalidArgumentError`)."""
        if (old.encode() if isinstance(old, str) else bytes(old)) == (
            new.encode() if isinstance(new, str) else bytes(new)
        ):
            raise InvalidArgumentError(
                errno.EINVAL, "the old and the new password are the same", self.name
            )
        slot = self.add_password(new, iter_time=iter_time)
        try:
            self.remove_password(old)
        except Error:
            # `old` opens no slot: take `new` out again, leaving the slots as they were.
            self.remove_key_slot(slot)
            raise
        return slot

    def remove_key_slot(self, slot: int, *, force: bool = False) -> None:
        """Erase LUKS key slot `slot`. Erasing the last active slot needs `force`."""
        self._native.change_key_slots(slot=slot, force=force)

    def info(self) -> ImageInfo:
        """Facts about the image, as ``qemu-img info`` shows them."""
        fields = self._native.info()
        fields["snapshots"] = tuple(Snapshot(**s) for s in fields["snapshots"])
        return ImageInfo(**fields)

    def map(self, offset: int = 0, length: Optional[int] = None) -> List[MapEntry]:
        """How ``[offset, offset + length)`` is stored (default: to the end of the disk)."""
        return [MapEntry(**e) for e in self._native.map(offset, length)]

    def damage(self) -> List[str]:
        """For an image opened with ``damaged=True``: the tables cut short by the end of the
        file (read as zeros there), one line each."""
        return self._native.damage()

    def check(self, repair: Optional[str] = None) -> CheckResult:
        """Check consistency like ``qemu-img check``; `repair` is None, ``"leaks"`` or ``"all"``
        (repairing needs an image open read-write)."""
        return CheckResult(**self._native.check(repair))

    # -- internal snapshots ----------------------------------------------------------------

    def snapshots(self) -> List[Snapshot]:
        """The internal snapshots, in table order, as ``qemu-img snapshot -l`` lists them."""
        return [Snapshot(**s) for s in self._native.snapshots()]

    def create_snapshot(
        self,
        name: str,
        *,
        vm_clock_nsec: int = 0,
        icount: Optional[int] = 0,
        date: Union[datetime, Tuple[int, int], None] = None,
    ) -> Snapshot:
        """Snapshot the disk as it is now, as ``qemu-img snapshot -c NAME`` does; return it.

        Names need not be unique; the new snapshot gets the next ID. `date` is the creation time
        to record (a datetime, or (seconds, nanoseconds) since the epoch; None: now),
        `vm_clock_nsec` the guest clock, `icount` the instruction count (None: none). Durable
        when it returns; later writes copy what they change, so the snapshot keeps today's data.
        Raises :class:`ReadOnlyError` on an image open read-only or on a snapshot view.
        """
        return Snapshot(
            **self._native.create_snapshot(
                name, vm_clock_nsec=vm_clock_nsec, icount=icount, date=_date_arg(date)
            )
        )

    def apply_snapshot(self, id_or_name: Union[str, Snapshot]) -> Snapshot:
        """Revert the disk to a snapshot, as ``qemu-img snapshot -a`` does; return it.

        `id_or_name` is looked up as an ID first, then as a name (a :class:`Snapshot` stands for
        its ID). The disk's contents and its
        virtual size become the snapshot's (:attr:`size` follows); the snapshot stays. Durable
        when it returns. Raises :class:`SnapshotNotFoundError` when there is no such snapshot.
        """
        return Snapshot(**self._native.apply_snapshot(_snapshot_ref(id_or_name)))

    def delete_snapshot(self, id_or_name: Union[str, Snapshot]) -> Snapshot:
        """Delete a snapshot (by ID, else by name; a :class:`Snapshot` by its ID), as ``qemu-img snapshot -d`` does, and free
        what only it used; return it. Raises :class:`SnapshotNotFoundError` when there is none."""
        return Snapshot(**self._native.delete_snapshot(_snapshot_ref(id_or_name)))

    @property
    def snapshot_view(self) -> Optional[Snapshot]:
        """The snapshot this image shows when it was opened with ``snapshot=``, else None."""
        view: Optional[Dict[str, Any]] = self._native.snapshot_view
        return None if view is None else Snapshot(**view)

    @property
    def virtual_size(self) -> int:
        """Virtual disk size in bytes."""
        return self._native.virtual_size

    @property
    def size(self) -> int:
        """Virtual disk size in bytes (same as :attr:`virtual_size`)."""
        return self._native.virtual_size

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return self._native.cluster_size

    @property
    def read_only(self) -> bool:
        """Whether the image is open read-only."""
        return self._native.read_only

    @property
    def sync_count(self) -> int:
        """Number of fdatasyncs issued on the image file so far."""
        return self._native.sync_count

    # -- io.RawIOBase ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed image")

    def readable(self) -> bool:
        """True: an image can always be read."""
        self._check_open()
        return True

    def writable(self) -> bool:
        """Whether the image is open read-write."""
        self._check_open()
        return not self._native.read_only

    def seekable(self) -> bool:
        """True: an image can always seek."""
        self._check_open()
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to `offset` relative to `whence` (SEEK_SET, SEEK_CUR, SEEK_END); return the new
        position. Positions past the end are allowed (reads there return nothing).
        ``os.SEEK_DATA`` and ``os.SEEK_HOLE`` move to the next data or hole at or after `offset`,
        as lseek(2) does in a sparse file (see :meth:`map`; the end of the disk is a hole):
        :class:`Error` with errno ENXIO when there is none."""
        self._check_open()
        offset = operator.index(offset)
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._native.virtual_size + offset
        elif whence in (_SEEK_DATA, _SEEK_HOLE):
            self._pos = self._next_extent(offset, data=whence == _SEEK_DATA)
            return self._pos
        else:
            # InvalidArgumentError: an OSError(EINVAL) as io.FileIO raises, and a ValueError as
            # io.BytesIO raises.
            raise InvalidArgumentError(
                errno.EINVAL, f"invalid whence ({whence!r}, should be 0, 1 or 2)", self.name
            )
        if pos < 0:
            raise InvalidArgumentError(errno.EINVAL, f"negative seek position {pos}", self.name)
        self._pos = pos
        return pos

    def _next_extent(self, offset: int, *, data: bool) -> int:
        """The first offset at or after `offset` that holds data (`data`) or is a hole, as
        lseek(2) finds it with SEEK_DATA / SEEK_HOLE. Data is what :meth:`map` calls data (in
        this image or its backing chain); zero and unallocated clusters are holes, and so is the
        end of the disk. ENXIO past the end, or when no data follows."""
        size = self._native.virtual_size
        if 0 <= offset < size:
            for e in self.map(offset):
                if e.data == data:
                    return max(e.start, offset)
            if not data:
                return size
        what = "past the end of the disk" if offset >= size else "no data follows"
        raise Error(errno.ENXIO, f"{self.name}: seek to offset {offset}: {what}", self.name)

    def tell(self) -> int:
        """The current position."""
        self._check_open()
        return self._pos

    def fileno(self) -> int:
        """An image has no file descriptor that reads as the virtual disk: raises
        :class:`io.UnsupportedOperation` (:class:`ValueError` once closed, as :class:`io.FileIO`)."""
        self._check_open()
        raise io.UnsupportedOperation("fileno")

    def read(self, size: Optional[int] = -1) -> bytes:
        """Read up to `size` bytes from the current position (all to the end if omitted)."""
        self._check_open()
        if size is None or size < 0:
            return self.readall()
        data = self._native.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        """Read from the current position to the end of the disk."""
        self._check_open()
        return self.read(max(self._native.virtual_size - self._pos, 0))

    def readinto(self, buffer: Buffer) -> int:
        """Read into `buffer` (a writable bytes-like object); return the number of bytes read."""
        self._check_open()
        n: int = self._native.readinto_at(self._pos, buffer)
        self._pos += n
        return n

    def write(self, data: Buffer) -> int:
        """Write all of `data` at the current position; return its length.

        Raises :class:`InvalidArgumentError` if the write would end past the end of the disk.
        """
        self._check_open()
        with memoryview(data) as view:
            n = view.nbytes
            if n == 0 and self._mode == "rb":
                # The core does nothing for nothing; io.FileIO still refuses it when read-only.
                raise ReadOnlyError(
                    errno.EROFS, f"{self.name}: image is read-only: opened read-only", self.name
                )
            self._native.write_at(self._pos, view)
        self._pos += n
        return n

    def flush(self) -> None:
        """Make everything written so far durable."""
        self._check_open()
        native = getattr(self, "_native", None)
        # While close() runs, the native image is already closed (and was flushed then).
        if native is not None and not native.closed:
            native.flush()

    def close(self) -> None:
        """Flush and close the image. Closing a closed image does nothing."""
        if self.closed:
            return
        native = getattr(self, "_native", None)
        try:
            if native is not None:
                native.close()
        finally:
            super().close()

    def __del__(self) -> None:
        if not self.closed and getattr(self, "_native", None) is not None:
            warnings.warn(f"unclosed image {self!r}", ResourceWarning, stacklevel=2, source=self)
        super().__del__()

    def __repr__(self) -> str:
        name = getattr(self, "name", "?")
        if self.closed:
            return f"<qcow2rs.Image name={name!r} closed>"
        return f"<qcow2rs.Image name={name!r} mode={getattr(self, '_mode', '?')!r}>"


_QCOW2_MAGIC = b"QFI\xfb"

# lseek(2)'s whence values for sparse files (Linux numbers, where os lacks them).
_SEEK_DATA: int = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE: int = getattr(os, "SEEK_HOLE", 4)

_CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")


# The image options create() takes (-o), which convert() passes on.
_CREATE_OPTIONS = frozenset(inspect.signature(create).parameters) - {"path", "size"}


def _detect_format(path: StrPath) -> str:
    with io.open(path, "rb") as f:
        return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"


def convert(
    src: StrPath,
    dst: StrPath,
    *,
    src_format: Optional[str] = None,
    dst_format: str = "qcow2",
    compress: bool = False,
    sparse_size: int = 4096,
    src_password: Optional[Union[str, bytes]] = None,
    progress: Optional[Callable[[int, int], object]] = None,
    chunk_size: int = 2 << 20,
    backing_file: Optional[str] = None,
    backing_format: Optional[str] = None,
    no_create: bool = False,
    snapshot: Union[str, Snapshot, None] = None,
    cache: str = "writeback",
    src_cache: str = "writeback",
    force_share: bool = False,
    **create_options: Any,
) -> None:
    """Copy the disk `src` into the image `dst`, as ``qemu-img convert`` does.

    `src_format` (``-f``) is ``"qcow2"`` or ``"raw"`` (default: told from the file's magic);
    `src_password` opens an encrypted source. `dst_format` (``-O``) is ``"qcow2"`` or ``"raw"``.
    `compress` (``-c``) writes every cluster compressed. Runs of zeros at least `sparse_size`
    bytes long (``-S``, default 4 KiB; 0 writes everything) and what the source does not
    allocate are not written, so they stay unallocated (sparse) in `dst`. The keyword arguments
    left (``-o``) go to :func:`create`: ``cluster_size``, ``compat``, ``compression_type``,
    ``encrypt`` with ``password`` (then `dst` is encrypted), ... `progress`, if given, is
    called as ``progress(done, total)`` in bytes after every chunk of `chunk_size` bytes
    (``-p``). An existing `dst` is overwritten, unless `no_create`.

    `backing_file` (``-B``, with `backing_format`, ``-F``, which it needs) makes `dst` a
    qcow2 image over that backing file (its name is stored as given, so a relative name is
    relative to `dst`'s directory), which is expected to read as the source's backing chain:
    what the source's top image does not allocate is left unallocated in `dst`, to be read
    from the backing file; zeros the source's top image holds are written as zeros.

    `no_create` (``-n``) writes into the existing image `dst` (of format `dst_format`, at least
    as large as the source) instead of creating it (a raw `dst` that is a block or character
    device is always written in place, zeros included); only ``password`` (an encrypted `dst`'s)
    may then be among the keyword arguments left. Zero runs are then written as zeros (the old
    contents must not show through), except where `backing_file` says to leave them to the
    backing file that the existing `dst` is expected to have.

    `snapshot` (``-l``, an ID or a name) copies that internal snapshot of a qcow2 `src` out
    instead of its active disk (:class:`SnapshotNotFoundError` when there is none). `cache`
    (``-t``) and `src_cache` (``-T``) are the cache modes of `dst` and `src`, as
    :func:`open` takes them (qemu-img's default for `dst` is ``"unsafe"``; here it is
    ``"writeback"``, which costs the same for one convert: `dst` is made durable once, when it
    is closed, except with ``"unsafe"``). `force_share` (``-U``) reads a qcow2 `src` that
    someone else (a running VM) has open for writing: see :func:`open`. Compression and
    encryption together are refused, as qemu-img refuses them.
    """
    unknown = set(create_options) - _CREATE_OPTIONS
    if unknown:
        # As Python words an unexpected keyword: convert() takes them, not create().
        raise TypeError(f"convert() got an unexpected keyword argument '{sorted(unknown)[0]}'")
    for what, mode in (("cache", cache), ("src_cache", src_cache)):
        if mode not in _CACHE_MODES:
            raise InvalidArgumentError(
                22, f"invalid {what} mode: {mode!r} (use {', '.join(map(repr, _CACHE_MODES))})"
            )
    if compress and create_options.get("encrypt") is not None:
        raise InvalidArgumentError(
            22, "Compression and encryption not supported at the same time (as in qemu-img)"
        )
    with _file_errors(src, "open"):
        fmt = src_format or _detect_format(src)
    if fmt not in ("qcow2", "raw"):
        raise InvalidArgumentError(22, f"invalid source format: {fmt!r} (use 'qcow2' or 'raw')")
    if dst_format not in ("qcow2", "raw"):
        raise InvalidArgumentError(
            22, f"invalid output format: {dst_format!r} (use 'qcow2' or 'raw')"
        )
    if snapshot is not None and fmt != "qcow2":
        raise InvalidArgumentError(22, "snapshot needs a qcow2 source (a raw file has none)")
    if dst_format == "raw" and (compress or create_options or backing_file is not None):
        raise InvalidArgumentError(
            22, "compress, backing_file and image options need dst_format='qcow2'"
        )
    if (backing_file is None) != (backing_format is None):
        raise InvalidArgumentError(
            22, "backing_file and backing_format go together (qemu-img convert -B needs -F)"
        )
    if backing_format is not None and backing_format not in ("qcow2", "raw"):
        raise InvalidArgumentError(
            22, f"invalid backing format: {backing_format!r} (use 'qcow2' or 'raw')"
        )
    dst_password = create_options.get("password")
    if no_create and set(create_options) - {"password"}:
        raise InvalidArgumentError(
            22,
            "image options have no effect with no_create=True: "
            + ", ".join(sorted(set(create_options) - {"password"})),
        )
    if sparse_size < 0 or (sparse_size and sparse_size % 512):
        raise InvalidArgumentError(22, f"sparse_size must be a multiple of 512, not {sparse_size}")
    if chunk_size <= 0:
        raise InvalidArgumentError(22, f"chunk_size must be positive, not {chunk_size}")
    has_backing = backing_file is not None
    # A raw target that is a device (a disk, /dev/null): written in place, neither created nor
    # truncated, and it does not read as zeros.
    with _file_errors(dst, "stat"):
        try:
            dst_mode: Optional[int] = os.stat(dst).st_mode
        except FileNotFoundError:
            dst_mode = None
    dst_device = dst_format == "raw" and dst_mode is not None and not stat.S_ISREG(dst_mode)
    # A new image without a backing file reads as zeros: zeros need not be written.
    zero_init = not no_create and not has_backing and not dst_device
    with contextlib.ExitStack() as stack:
        # The source: (size, read_at(off, n), extents: (start, length, is_data)); what no
        # extent covers is left to the target's backing file or reads as zeros already.
        extents: List[Tuple[int, int, bool]] = []
        if fmt == "qcow2":
            simg = stack.enter_context(
                Image(
                    src,
                    "rb",
                    password=src_password,
                    snapshot=snapshot,
                    cache=src_cache,
                    force_share=force_share,
                )
            )
            size = simg.virtual_size
            read_at: Callable[[int, int], bytes] = simg.read_at
            for e in simg.map():
                if has_backing and (e.depth > 0 or not e.present):
                    continue  # the target's backing file holds it
                if e.zero or not e.present:
                    if not zero_init:
                        extents.append((e.start, e.length, False))
                else:
                    extents.append((e.start, e.length, True))
        else:
            with _file_errors(src, "open"):
                sfile = stack.enter_context(io.open(src, "rb", buffering=0))
                # A block device (a disk) has no st_size: its end is where lseek finds it.
                size = os.lseek(sfile.fileno(), 0, os.SEEK_END)
            fd = sfile.fileno()

            def pread(off: int, n: int) -> bytes:
                with _file_errors(src, "read"):
                    return os.pread(fd, n, off)

            read_at = pread
            extents = [(0, size, True)]
        if dst_format == "qcow2":
            if not no_create:
                if has_backing:
                    create_options = dict(
                        create_options, backing_file=backing_file, backing_format=backing_format
                    )
                create(dst, -(-size // 512) * 512, **create_options)
            dimg = stack.enter_context(Image(dst, "r+b", password=dst_password, cache=cache))
            dst_size = dimg.virtual_size
            cluster = dimg.cluster_size
            step = max(chunk_size // cluster, 1) * cluster

            def write_at(off: int, data: bytes) -> None:
                if compress:
                    for k in range(0, len(data), cluster):
                        piece = data[k : k + cluster]
                        if piece.count(0) != len(piece):
                            dimg.write_compressed(off + k, piece)
                        elif not zero_init:
                            dimg.write_zeroes(off + k, len(piece))
                else:
                    dimg.write_at(off, data)

            write_zeros: Callable[[int, int], None] = dimg.write_zeroes
        else:
            with _file_errors(dst, "open"):
                if no_create or dst_device:
                    dfile = stack.enter_context(io.open(dst, "r+b", buffering=0))
                else:
                    dfile = stack.enter_context(io.open(dst, "wb", buffering=0))
                    dfile.truncate(size)
                if dst_mode is not None and stat.S_ISBLK(dst_mode):
                    dst_size = os.lseek(dfile.fileno(), 0, os.SEEK_END)
                elif dst_device:
                    dst_size = size  # a character device has no size to check
                else:
                    dst_size = os.fstat(dfile.fileno()).st_size
            cluster = 65536
            step = max(chunk_size // cluster, 1) * cluster
            dfd = dfile.fileno()

            def write_at(off: int, data: bytes) -> None:
                with _file_errors(dst, "write"):
                    os.pwrite(dfd, data, off)

            def write_zeros(off: int, n: int) -> None:
                zeros = bytes(min(n, step))
                while n > 0:
                    k = min(n, len(zeros))
                    with _file_errors(dst, "write"):
                        os.pwrite(dfd, zeros[:k], off)
                    off += k
                    n -= k

        if dst_size < size:
            raise InvalidArgumentError(
                22,
                f"{os.fspath(dst)!s}: output file is smaller than input file "
                f"({dst_size} < {size} bytes)",
                os.fspath(dst),
            )
        total = sum(n for _, n, _ in extents)
        done = 0
        # Zero runs are skipped (or written as zeros) at this granularity (whole clusters when
        # compressing).
        grain = cluster if compress else sparse_size
        for start, length, is_data in extents:
            # Chunks aligned to `step`, so that compressed writes get whole clusters.
            off = start
            end = start + length
            while off < end:
                n = min(end, (off // step + 1) * step) - off
                if is_data:
                    data = read_at(off, n)
                    _write_nonzero(write_at, off, data, grain, None if zero_init else write_zeros)
                else:
                    write_zeros(off, n)
                off += n
                done += n
                if progress is not None:
                    progress(done, total)
        if progress is not None and total == 0:
            progress(0, 0)
        if dst_format == "raw" and cache != "unsafe":
            with _file_errors(dst, "sync"):
                os.fsync(dfd)


@contextlib.contextmanager
def _file_errors(path: StrPath, what: str) -> Iterator[None]:
    """The OSErrors of a raw file that :func:`convert` opens, reads or writes itself, raised as
    the qcow2rs error naming it (as the core's errors name an image's files)."""
    try:
        yield
    except Error:
        raise
    except OSError as e:
        name = os.fsdecode(path)
        classes = {
            errno.ENOENT: NotFoundError,
            errno.EACCES: PermissionDeniedError,
            errno.EPERM: PermissionDeniedError,
            errno.ENOSPC: NoSpaceError,
        }
        cls = classes.get(e.errno or 0, Error)
        raise cls(e.errno, f"{name}: {what}: {e.strerror or e}", name) from e


def _write_nonzero(
    write_at: Callable[[int, bytes], None],
    off: int,
    data: bytes,
    grain: int,
    write_zeros: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Write `data` at `off`, leaving out the aligned runs of `grain` zero bytes (0: none), or
    writing them with `write_zeros(off, n)` when given."""
    if not grain:
        write_at(off, data)
        return
    view = memoryview(data)
    i = 0
    n = len(data)

    def zero(a: int, b: int) -> bool:
        return view[a:b].tobytes().count(0) == b - a

    while i < n:
        # The next piece: up to the next grain boundary of the guest offset.
        j = min(n, ((off + i) // grain + 1) * grain - off)
        is_zero = zero(i, j)
        # Extend over the following pieces of the same kind, for one write.
        k = j
        while k < n:
            nk = min(n, k + grain)
            if zero(k, nk) != is_zero:
                break
            k = nk
        if not is_zero:
            write_at(off + i, view[i:k].tobytes())
        elif write_zeros is not None:
            write_zeros(off + i, k - i)
        i = k


def open(  # noqa: A001 - like gzip.open and tarfile.open
    path: StrPath,
    mode: str = "rb",
    *,
    cache: str = "writeback",
    l2_cache_size: Optional[int] = None,
    refcount_cache_size: Optional[int] = None,
    password: Optional[Union[str, bytes]] = None,
    backing_password: Optional[Union[str, bytes]] = None,
    snapshot: Union[str, Snapshot, None] = None,
    backing: Union[str, Iterable[StrPath], None] = "any",
    damaged: bool = False,
    force_share: bool = False,
    without_key: bool = False,
    lazy_refcounts: Optional[bool] = None,
) -> Image:
    """Open the qcow2 image at `path` (a str or os.PathLike).

    `mode` is ``"rb"`` (read-only) or ``"r+b"`` (read-write), as the built-in :func:`open`
    spells them (``"r"``, ``"r+"``, ``"rb+"`` and the earlier ``"rw"`` are accepted too; modes
    that create or truncate are not: use :func:`create`). `cache` is QEMU's cache
    mode: ``"writeback"`` (durable at flush), ``"writethrough"``, ``"none"``, ``"directsync"`` or
    ``"unsafe"``. `l2_cache_size` and `refcount_cache_size` bound the metadata caches, in bytes.
    `password` (str or bytes) opens an encrypted image; a wrong one raises
    :class:`BadPasswordError` (LUKS; legacy AES has no key check). `backing_password` is the
    password of encrypted backing files. `without_key` opens an encrypted image without its
    password, for inspection, as ``qemu-img info``, ``map`` and ``check`` do: :meth:`Image.info`,
    :meth:`Image.map`, :meth:`Image.check` and :meth:`Image.snapshots` work, reading or writing
    the guest's data raises :class:`BadPasswordError`. `lazy_refcounts` (``True`` or ``False``;
    None: as the image's header says) overrides the image's lazy refcounts bit for this open,
    as ``--image-opts lazy-refcounts=on|off`` does. `snapshot` (an ID or a name, looked up as
    ``qemu-img snapshot`` does; or a :class:`Snapshot`) opens a read-only view of that internal
    snapshot instead of the active disk: `mode` must be ``"rb"``; a missing snapshot raises
    :class:`SnapshotNotFoundError`.

    `backing` says which backing files the image may make us open; an image's header can name
    any file, so use it for images from an untrusted source. ``"any"`` (the default) opens what
    the header names, as QEMU does (a FIFO or a socket is refused rather than hang the open).
    ``"none"`` opens no backing file: clusters the image does not allocate read as zeros. A list
    of directories opens only regular files whose real path (symbolic links and ``..``
    resolved) lies under one of them, for every file of the chain; anything else raises
    :class:`PermissionDeniedError` naming the backing file (``e.filename``). A missing backing
    file raises :class:`NotFoundError` (a :class:`FileNotFoundError`), naming it.

    `damaged` opens a damaged (truncated) image for inspection and rescue; `mode` must be
    ``"rb"``. Tables cut short by the end of the file read as zeros there, as QEMU reads them
    (:meth:`Image.damage` lists them), :meth:`Image.check` reports the damage as
    ``qemu-img check`` does, and reading what the file lost raises :class:`CorruptImageError`.
    The image is locked as QEMU locks it: opening it read-write while anyone else (QEMU, or
    another qcow2rs user, in this process too) has it open, or read-only while someone writes
    it, raises :class:`ImageLockedError`. `force_share` (``qemu-img -U``, mode ``"rb"`` only)
    opens it even while someone writes it, for inspection; what is read may then be
    inconsistent.
    """
    return Image(
        path,
        mode,
        cache=cache,
        l2_cache_size=l2_cache_size,
        refcount_cache_size=refcount_cache_size,
        password=password,
        backing_password=backing_password,
        snapshot=snapshot,
        backing=backing,
        damaged=damaged,
        force_share=force_share,
        without_key=without_key,
        lazy_refcounts=lazy_refcounts,
    )


def _document_fields(*classes: type) -> None:
    """Append each field's docstring (the string under it in the class body, which IDEs and
    Sphinx read but Python drops) to its class's docstring, so that ``help()`` shows them too.
    Without this module's source (a build without .py files) the docstrings stay as they are."""
    try:
        with tokenize.open(__file__) as f:
            source = f.read()
    except (OSError, SyntaxError):  # pragma: no cover - no source to read
        return
    for cls in classes:
        # Only the class's own block is parsed: the whole module would cost 15 ms at import.
        block = re.search(rf"^class {cls.__name__}\b.*?(?=^\S)", source, re.M | re.S)
        if block is None:  # pragma: no cover - the source does not match this module
            continue
        node = ast.parse(block.group()).body[0]
        assert isinstance(node, ast.ClassDef)
        entries = []
        for field, doc in zip(node.body, node.body[1:]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                text = " ".join(doc.value.value.split())
                body = textwrap.fill(text, 88, initial_indent="    ", subsequent_indent="    ")
                entries.append(f"{field.target.id}: {ast.unparse(field.annotation)}\n{body}")
        if entries:
            cls.__doc__ = f"{cls.__doc__ or ''}\n\nAttributes:\n\n" + "\n\n".join(entries)


_document_fields(Snapshot, ImageInfo, MapEntry, CheckResult)
