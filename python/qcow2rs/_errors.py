"""The exceptions of qcow2rs.

The native module raises them; which one is decided in one place, ``python/src/errors.rs``.
Each is an ``OSError`` built as ``cls(errno, message, filename)``: ``errno`` is the core's errno,
``strerror`` and ``str(err)`` are the core's message (which already names the file), ``filename``
is the file the core names, or None.
"""

from __future__ import annotations

import io

__all__ = [
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


class Error(OSError):
    """Root of every qcow2rs error: an ``OSError`` with ``errno``, ``strerror`` and ``filename``."""

    __module__ = "qcow2rs"

    def __str__(self) -> str:
        # The core's message names the file already; OSError's default would repeat it.
        if isinstance(self.strerror, str):
            return self.strerror
        return super().__str__()


class NotFoundError(Error, FileNotFoundError):
    """A file (the image or one in its backing chain) does not exist (ENOENT)."""

    __module__ = "qcow2rs"


class PermissionDeniedError(Error, PermissionError):
    """The host refused access to a file (EACCES, EPERM)."""

    __module__ = "qcow2rs"


class CorruptImageError(Error):
    """The image is malformed: a structure is out of range, misaligned or inconsistent (EIO)."""

    __module__ = "qcow2rs"


class UnsupportedError(Error):
    """The image uses a feature qcow2rs does not implement (EOPNOTSUPP)."""

    __module__ = "qcow2rs"


#: The name the issue tracker uses: the same class as :class:`UnsupportedError`.
UnsupportedFeatureError = UnsupportedError


class InvalidArgumentError(Error, ValueError):
    """A bad argument: an option value, an offset past the end, ... (EINVAL)."""

    __module__ = "qcow2rs"


class BadKeyError(Error):
    """The password does not unlock the image, or an encrypted image was opened without one
    (EPERM)."""

    __module__ = "qcow2rs"


#: The name the encryption docs use: the same class as :class:`BadKeyError`.
BadPasswordError = BadKeyError


class ReadOnlyError(Error, io.UnsupportedOperation):
    """A change was attempted on an image open read-only (EROFS). Also an
    :class:`io.UnsupportedOperation`, which :class:`io.FileIO` raises for a write to a file
    opened ``"rb"``."""

    __module__ = "qcow2rs"


class ImageLockedError(Error):
    """Another user of the image (QEMU, or another qcow2rs open, in this process too) holds
    locks that conflict with this open (EAGAIN), as QEMU's image locks do. ``filename`` is the
    locked file (a backing file, perhaps); the message is QEMU's (``Failed to get "write" lock``).
    Open read-only with ``force_share=True`` to inspect an image someone is writing."""

    __module__ = "qcow2rs"


#: The earlier name: the same class as :class:`ImageLockedError`.
LockedError = ImageLockedError


class NoSpaceError(Error):
    """The host file system is full (ENOSPC)."""

    __module__ = "qcow2rs"


class SnapshotNotFoundError(Error, LookupError):
    """No internal snapshot has the ID or name given (ENOENT). Also a :class:`LookupError`;
    not a :class:`FileNotFoundError`: the image file exists."""

    __module__ = "qcow2rs"
