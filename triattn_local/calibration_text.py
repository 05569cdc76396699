"""The calibration text: the one shipped with the package, or a user's file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import UserError


def default_calibration_text() -> str:
    """The calibration text shipped with the package (varied English prose, reasoning-model style)."""
    return (resources.files("triattn_local") / "data" / "calibration.txt").read_text(encoding="utf-8")


def load_calibration_text(path: str | None) -> str:
    """The user's --input file, or the shipped text when path is None. Bad files are a UserError, not a traceback."""
    if path is None:
        return default_calibration_text()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: calibration text file not found")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read calibration text ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: calibration text is not UTF-8 (bad byte at offset {e.start})") from None
    if not text.strip():
        raise UserError(f"{path}: calibration text is empty")
    return text
