"""A full disk and a read-only folder for tests: a small tmpfs when this process may mount one (root, as on the
development machine and CI containers), else a stand-in (say which in `kind`):

- full: without mount, every fsync under the folder fails with ENOSPC (files.py fsyncs each file before its rename,
  so this is where a full disk shows up for every writer that goes through it);
- read-only: without mount, the folder is chmod 0555 (meaningless as root, so then the test is skipped).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Folder:
    path: Path
    kind: str  # "tmpfs" or the stand-in used


def _mount(path: Path, *options: str) -> bool:
    if os.geteuid() != 0 or os.environ.get("TRIATTN_TEST_NO_MOUNT"):  # the variable tries the stand-ins
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def full_folder(tmp_path: Path, monkeypatch, size_kib: int = 64, populate=None):
    """A folder on a full file system; `populate(path)` runs first, while there is still room."""
    path = tmp_path / "full"
    path.mkdir()
    if _mount(path, f"size={size_kib}k", "mode=0755"):
        try:
            if populate:
                populate(path)
            fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
            try:  # fill it to the last byte
                for chunk in (4096, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * chunk)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
            finally:
                os.close(fd)
            yield Folder(path, "tmpfs")
        finally:
            _umount(path)
        return
    if populate:
        populate(path)
    real_fsync = os.fsync

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield Folder(path, "fake ENOSPC on fsync")


@contextlib.contextmanager
def read_only_folder(tmp_path: Path, populate=None):
    """A folder that cannot be written; `populate(path)` fills it first."""
    path = tmp_path / "ro"
    path.mkdir()
    if _mount(path, "size=4m", "mode=0755"):
        try:
            if populate:
                populate(path)
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
            yield Folder(path, "tmpfs")
        finally:
            _umount(path)
        return
    if os.geteuid() == 0:
        pytest.skip("root without mount: no way to make a read-only folder")
    if populate:
        populate(path)
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        yield Folder(path, "chmod 0555")
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


def files_under(path: Path) -> dict[str, bytes]:
    """Every regular file under `path` (no filler) with its bytes: what a failed write must leave unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != "filler"}


@contextlib.contextmanager
def writable_then_read_only(path: Path):
    """A folder that a test fills and then makes read-only by calling the yielded function (and writable again by
    calling it with False): a tmpfs remounted ro, else chmod of every folder in it (skipped as root without mount)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _mount(path, "size=64m", "mode=0755")
    if not mounted and os.geteuid() == 0:
        pytest.skip("root without mount: no way to make a read-only folder")

    def read_only(on: bool = True) -> str:
        if mounted:
            subprocess.run(["mount", "-o", "remount," + ("ro" if on else "rw"), str(path)], check=True,
                           capture_output=True)
            return "tmpfs"
        for p in [path, *path.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o555 if on else 0o755)
        return "chmod 0555"

    try:
        yield read_only
    finally:
        if mounted:
            _umount(path)
        else:
            read_only(False)
