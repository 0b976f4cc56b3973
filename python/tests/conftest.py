"""Shared fixtures for the qcow2rs Python tests."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import qcow2rs

MiB = 1 << 20


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def qemu_img() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real qemu-img; returns the CompletedProcess (the test checks the exit code)."""
    return lambda *args: _run("qemu-img", *map(str, args))


@pytest.fixture
def qemu_io() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real qemu-io."""
    return lambda *args: _run("qemu-io", *map(str, args))


@pytest.fixture
def qemu_info(qemu_img: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[[Path], Any]:
    """`qemu-img info --output=json` of a file, parsed."""

    def info(path: Path) -> Any:
        r = qemu_img("info", "--output=json", path)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    return info


@pytest.fixture
def rng() -> random.Random:
    return random.Random(20240611)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A fresh 8 MiB qcow2 image with default options."""
    path = tmp_path / "disk.qcow2"
    qcow2rs.create(path, 8 * MiB)
    return path


@pytest.fixture
def rw(disk: Path) -> Iterator[qcow2rs.Image]:
    """The `disk` image, open read-write; closed after the test."""
    with qcow2rs.open(disk, "rw") as img:
        yield img
