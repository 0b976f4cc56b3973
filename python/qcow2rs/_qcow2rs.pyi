"""The native half of qcow2rs (private: import ``qcow2rs``)."""

import os
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union, final

from typing_extensions import Buffer

__version__: str
__all__ = ["__version__", "create", "open", "NativeImage"]

def create(
    path: Union[str, os.PathLike[str]],
    size: Optional[int] = None,
    *,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    compat: str = "1.1",
    backing_file: Optional[Union[str, os.PathLike[str]]] = None,
    backing_format: Optional[str] = None,
    lazy_refcounts: bool = False,
    preallocation: str = "off",
    extended_l2: bool = False,
    compression_type: str = "zlib",
    encrypt: Optional[str] = None,
    password: Optional[Union[str, bytes]] = None,
    cipher_alg: str = "aes-256",
    cipher_mode: str = "xts",
    ivgen_alg: str = "plain64",
    ivgen_hash_alg: str = "sha256",
    hash_alg: str = "sha256",
    iter_time: int = 2000,
    backing_password: Optional[Union[str, bytes]] = None,
    open_backing: bool = True,
) -> None:
    """Create a new qcow2 image file (an existing file is overwritten).

    `size` is the virtual size in bytes (rounded up to 512); without it (with `backing_file`),
    the backing file's, as ``qemu-img create -b BASE -F FMT FILE`` takes it.
    The keyword arguments are qemu-img's ``-o`` options: `cluster_size` (512 to 2 MiB, a power
    of two), `refcount_bits`, `compat` is ``"1.1"`` (v3) or ``"0.10"``
    (v2); `preallocation` is ``"off"`` or ``"metadata"``; `compression_type` is ``"zlib"`` or
    ``"zstd"``; `backing_format` (``"qcow2"`` or ``"raw"``) is required with `backing_file`.
    `encrypt` is ``"luks"`` or ``"aes"`` (legacy, no key check: for old images only) and needs
    `password` (str or bytes); `cipher_alg`, `cipher_mode`, `ivgen_alg`, `ivgen_hash_alg`,
    `hash_alg` and `iter_time` (milliseconds of PBKDF2) are qemu-img's ``encrypt.*`` options
    for LUKS. `backing_password` opens an encrypted backing file. `open_backing=False`
    (``qemu-img create -u``) does not open the backing file, which need not exist yet: `size`
    is then required.
    """

def open(
    path: Union[str, os.PathLike[str]],
    mode: str = "rb",
    *,
    cache: str = "writeback",
    l2_cache_size: Optional[int] = None,
    refcount_cache_size: Optional[int] = None,
    password: Optional[Union[str, bytes]] = None,
    backing_password: Optional[Union[str, bytes]] = None,
    snapshot: Optional[str] = None,
    backing: Union[str, Iterable[Union[str, os.PathLike[str]]], None] = None,
    damaged: bool = False,
    force_share: bool = False,
    without_key: bool = False,
    lazy_refcounts: Optional[bool] = None,
) -> NativeImage: ...
@final
class NativeImage:
    def read_at(self, offset: int, length: int) -> bytes: ...
    def readinto_at(self, offset: int, buffer: Buffer) -> int: ...
    def write_at(self, offset: int, data: Buffer) -> None: ...
    def write_compressed(self, offset: int, data: bytes) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def resize(self, size: int) -> None: ...
    def info(self) -> Dict[str, Any]: ...
    def map(self, offset: int = 0, length: Optional[int] = None) -> List[Dict[str, Any]]: ...
    def check(self, repair: Optional[str] = None) -> Dict[str, Any]: ...
    def damage(self) -> List[str]: ...
    def snapshots(self) -> List[Dict[str, Any]]: ...
    def create_snapshot(
        self,
        name: str,
        *,
        vm_clock_nsec: int = 0,
        icount: Optional[int] = 0,
        date: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, Any]: ...
    def apply_snapshot(self, id_or_name: str) -> Dict[str, Any]: ...
    def delete_snapshot(self, id_or_name: str) -> Dict[str, Any]: ...
    @property
    def snapshot_view(self) -> Optional[Dict[str, Any]]: ...
    def change_key_slots(
        self,
        *,
        add: Optional[Union[str, bytes]] = None,
        remove: Optional[Union[str, bytes]] = None,
        slot: Optional[int] = None,
        iter_time: Optional[int] = None,
        force: bool = False,
    ) -> List[int]: ...
    @property
    def filename(self) -> str: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def sync_count(self) -> int: ...
