"""Writing files safely: every file the project writes goes to a unique temporary name beside its target and is
renamed over it, so a crash, a full disk or a read-only folder never leaves a partial or truncated file behind."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import UserError


def resolve_target(path: str | Path) -> Path:
    """The file a write should replace: a symlinked target (dotfiles) is followed, so the link stays a link."""
    path = Path(path).expanduser()
    try:
        return Path(os.path.realpath(path)) if path.is_symlink() else path
    except OSError as e:  # a symlink loop
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _os_error(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_path(target: str | Path, *, private: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target`; when the block ends without error it is renamed over the target.

    The target's mode is kept when it exists; a new file gets 0600 when `private` (keys, conversations), else the
    usual 0644-under-umask. On any error the temporary file is removed and an OSError becomes a one-line UserError.
    """
    dest = resolve_target(target)
    if dest.is_dir():
        raise UserError(f"cannot write {dest}: it is a directory")
    if dest.exists() and not dest.is_file():  # a device or a FIFO: renaming over it would replace it
        raise UserError(f"cannot write {dest}: not a regular file")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as e:
        raise _os_error(dest, e) from None
    tmp = Path(name)
    try:
        yield tmp
        mode = _mode_for(dest, private)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:  # the data is on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(dest, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(target: str | Path, *, private: bool = False) -> None:
    """Fail now, in one line, if `target` could not be written (a read-only folder, a directory at the path), so
    that long work (calibration, conversion) is not thrown away at the end. Leaves nothing behind."""
    dest = resolve_target(target)
    if dest.is_dir():
        raise UserError(f"cannot write {dest}: it is a directory")
    if dest.exists() and not dest.is_file():  # a device or a FIFO: renaming over it would replace it
        raise UserError(f"cannot write {dest}: not a regular file")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise _os_error(dest, e) from None


def _mode_for(dest: Path, private: bool) -> int:
    try:
        return stat.S_IMODE(dest.stat().st_mode)
    except FileNotFoundError:
        if private:
            return 0o600
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(target: str | Path, data: bytes | str, *, private: bool = False) -> Path:
    """Write `data` to `target` through a temporary file and a rename; returns the path written."""
    with atomic_path(target, private=private) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return resolve_target(target)


def unique_backup(path: str | Path) -> Path:
    """Copy `path` to a backup name that was never used before (time stamp plus a counter), keeping its mode."""
    src = resolve_target(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        backup = src.with_name(f"{src.name}.bak-{stamp}" + (f"-{n}" if n else ""))
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(src.stat().st_mode))
        except FileExistsError:
            continue
        except OSError as e:
            raise _os_error(backup, e) from None
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(src.read_bytes())
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            backup.unlink(missing_ok=True)
            raise _os_error(backup, e) from None
        return backup
    raise UserError(f"cannot back up {src}: too many backups this second")
