"""qcow2rs: crash-consistent qcow2 disk images.

Create an image, write to it and read it back::

    import qcow2rs

    qcow2rs.create("disk.qcow2", 1 << 30)              # 1 GiB virtual disk
    with qcow2rs.open("disk.qcow2", "rw") as img:
        img.write_at(1 << 20, b"hello, qcow2")
        assert img.read_at(1 << 20, 12) == b"hello, qcow2"
        img.seek(0)
        boot_sector = img.read(512)                     # it is a binary file, too

An open :class:`Image` is an :class:`io.RawIOBase`, so :func:`shutil.copyfileobj`,
:class:`io.BufferedReader` and friends work on it. Errors are :class:`qcow2rs.Error`, an
:class:`OSError` with ``errno`` and ``filename`` set. Calls that touch the disk release the GIL.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

try:
    from . import _qcow2rs
except ImportError as e:  # pragma: no cover - a broken installation
    raise ImportError(
        f"qcow2rs: the native module qcow2rs._qcow2rs is missing next to {__file__}. "
        "Install the package (`pip install ./python` from the repository root); when running "
        "from inside python/, the source directory qcow2rs/ shadows the installed package"
    ) from e
from ._errors import (
    BadKeyError,
    BadPasswordError,
    CorruptImageError,
    Error,
    InvalidArgumentError,
    LockedError,
    NoSpaceError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    UnsupportedError,
)
from ._qcow2rs import __version__, create

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "__version__",
    "create",
    "open",
    "Image",
    "ImageInfo",
    "MapEntry",
    "CheckResult",
    "Error",
    "NotFoundError",
    "PermissionDeniedError",
    "CorruptImageError",
    "UnsupportedError",
    "InvalidArgumentError",
    "BadKeyError",
    "BadPasswordError",
    "ReadOnlyError",
    "LockedError",
    "NoSpaceError",
]

StrPath = Union[str, "os.PathLike[str]"]


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
        mode: str = "r",
        *,
        cache: str = "writeback",
        l2_cache_size: Optional[int] = None,
        refcount_cache_size: Optional[int] = None,
        password: Optional[Union[str, bytes]] = None,
        backing_password: Optional[Union[str, bytes]] = None,
    ) -> None:
        """Open the image at `path`; see :func:`qcow2rs.open`."""
        super().__init__()
        self._native = _qcow2rs.open(
            path,
            mode,
            cache=cache,
            l2_cache_size=l2_cache_size,
            refcount_cache_size=refcount_cache_size,
            password=password,
            backing_password=backing_password,
        )
        self.name = os.fsdecode(path)
        self._mode = mode
        self._pos = 0

    # -- the image's own calls -------------------------------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """Read up to `length` bytes at `offset`: fewer (or none) at the end of the disk."""
        return self._native.read_at(offset, length)

    def write_at(self, offset: int, data: Buffer) -> None:
        """Write all of `data` (any bytes-like object) at `offset`.

        Raises :class:`InvalidArgumentError` if the write would end past the end of the disk.
        """
        self._native.write_at(offset, _as_bytes(data))

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

    def info(self) -> ImageInfo:
        """Facts about the image, as ``qemu-img info`` shows them."""
        return ImageInfo(**self._native.info())

    def map(self, offset: int = 0, length: Optional[int] = None) -> List[MapEntry]:
        """How ``[offset, offset + length)`` is stored (default: to the end of the disk)."""
        return [MapEntry(**e) for e in self._native.map(offset, length)]

    def check(self, repair: Optional[str] = None) -> CheckResult:
        """Check consistency like ``qemu-img check``; `repair` is None, ``"leaks"`` or ``"all"``
        (repairing needs an image open read-write)."""
        return CheckResult(**self._native.check(repair))

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
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return not self._native.read_only

    def seekable(self) -> bool:
        self._check_open()
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to `offset` relative to `whence` (SEEK_SET, SEEK_CUR, SEEK_END); return the new
        position. Positions past the end are allowed (reads there return nothing)."""
        self._check_open()
        offset = offset.__index__()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._native.virtual_size + offset
        else:
            raise ValueError(f"invalid whence ({whence!r}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

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
        with memoryview(buffer) as view, view.cast("B") as target:
            data = self._native.read_at(self._pos, target.nbytes)
            n = len(data)
            target[:n] = data
        self._pos += n
        return n

    def write(self, data: Buffer) -> int:
        """Write all of `data` at the current position; return its length.

        Raises :class:`InvalidArgumentError` if the write would end past the end of the disk.
        """
        self._check_open()
        b = _as_bytes(data)
        self._native.write_at(self._pos, b)
        self._pos += len(b)
        return len(b)

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


def open(  # noqa: A001 - like gzip.open and tarfile.open
    path: StrPath,
    mode: str = "r",
    *,
    cache: str = "writeback",
    l2_cache_size: Optional[int] = None,
    refcount_cache_size: Optional[int] = None,
    password: Optional[Union[str, bytes]] = None,
    backing_password: Optional[Union[str, bytes]] = None,
) -> Image:
    """Open the qcow2 image at `path` (a str or os.PathLike).

    `mode` is ``"r"`` (read-only) or ``"rw"`` / ``"r+"`` (read-write). `cache` is QEMU's cache
    mode: ``"writeback"`` (durable at flush), ``"writethrough"``, ``"none"``, ``"directsync"`` or
    ``"unsafe"``. `l2_cache_size` and `refcount_cache_size` bound the metadata caches, in bytes.
    `password` (str or bytes) opens an encrypted image; a wrong one raises
    :class:`BadPasswordError` (LUKS; legacy AES has no key check). `backing_password` is the
    password of encrypted backing files.
    """
    return Image(
        path,
        mode,
        cache=cache,
        l2_cache_size=l2_cache_size,
        refcount_cache_size=refcount_cache_size,
        password=password,
        backing_password=backing_password,
    )
