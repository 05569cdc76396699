"""Checks of command-line input that need no heavy library, run before torch or a model loads: a mistyped path, a
wrong file or a number out of range costs a fraction of a second and ends in one line on stderr (exit 2).

Text: arguments and stdin must be UTF-8. Python hands undecodable argv bytes over as lone surrogates
(surrogateescape); a prompt holding them, or stdin that does not decode, is refused with the offset of the first bad
byte rather than silently altered, since the model would see different text than the user sent.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import UserError

INT_MAX = 2**31 - 1  # larger counts overflow the 32-bit integers of the backends (and no model has that context)
SEED_MAX = 2**63 - 1
DEVICES = ("auto", "cpu", "cuda", "gpu")  # gpu: llama.cpp's name for its GPU build
DTYPES = ("auto", "float32", "float16", "bfloat16", "f32", "f16", "bf16", "q8_0")  # the short ones: llama.cpp KV types
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def integer(flag: str, value: int | None, low: int = 1, high: int = INT_MAX) -> None:
    """`value` within [low, high] (None passes: the option was not given)."""
    if value is not None and not low <= value <= high:
        raise UserError(f"{flag} must be between {low} and {high} (got {value})")


def number(flag: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    """A finite float within [low, high], or (low, high] with low_open; NaN and infinities are refused."""
    if value is None:
        return
    inside = low < value <= high if low_open else low <= value <= high
    if not math.isfinite(value) or not inside:
        span = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise UserError(f"{flag} must be a number in {span} (got {value})")


def choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {flag} {printable(value)} (choose {', '.join(choices)})")


def printable(value: str) -> str:
    """repr of user text, with undecodable argv bytes shown as \\xNN instead of surrogates."""
    return repr(os.fsencode(value).decode("utf-8", "backslashreplace")) if _has_surrogates(value) else repr(value)


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def text(what: str, value: str) -> str:
    """Text given as an argument: UTF-8 (no undecodable argv bytes) and not empty or only whitespace."""
    if _has_surrogates(value):
        raw = os.fsencode(value)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                            "convert it first, e.g. with iconv -t utf-8") from None
        raise UserError(f"{what} holds text that is not valid UTF-8")
    if not value.strip():
        raise UserError(f"{what} is empty")
    return value


def nonempty(what: str, value: str) -> str:
    """A name or path: not empty or only whitespace (undecodable bytes are fine in a path on Linux)."""
    if not value.strip():
        raise UserError(f"{what} is empty")
    return value


def escape_errors(error: UnicodeEncodeError) -> tuple[str, int]:
    """Codec error handler for messages: undecodable argv bytes (lone surrogates) back as \\xNN, other
    unencodable characters as \\uNNNN."""
    bad = error.object[error.start:error.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                   for c in bad), error.end


def decode(raw: bytes, what: str) -> str:
    """UTF-8 bytes (a leading byte-order mark dropped) to text, refusing anything else with the bad byte's offset."""
    try:
        result = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "convert it first, e.g. with iconv -t utf-8") from None
    return result.removeprefix("\ufeff")


def _stat(path: Path, what: str, missing: str | None = None) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: {missing or 'no such ' + what}") from None
    except OSError as e:  # a symlink loop, a file where a folder is expected, no permission
        raise UserError(f"{path}: cannot open {what} ({e.strerror or e})") from None


def input_file(path: str, what: str) -> Path:
    """A regular file that exists and can be opened for reading."""
    p = Path(nonempty(what, path)).expanduser()
    import stat

    if stat.S_ISDIR(_stat(p, what, missing=f"{what} not found").st_mode):
        raise UserError(f"{path}: is a directory, not a {what}")
    if not stat.S_ISREG(os.stat(p).st_mode):
        raise UserError(f"{path}: not a regular file (a {what} is expected)")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    return p


def output_file(path: str, what: str) -> Path:
    """A file triattn may (re)write: not a directory, and its folder, if it exists, is a folder."""
    from .files import resolve_target

    p = resolve_target(nonempty(what, path))
    if p.is_dir():
        raise UserError(f"{path}: is a directory (give a file name for the {what})")
    if p.exists() and not p.is_file():
        raise UserError(f"{path}: not a regular file (a device or a pipe cannot take the {what})")
    for parent in p.parents:
        try:
            if os.path.exists(parent):
                if not os.path.isdir(parent):
                    raise UserError(f"{path}: {parent} is not a directory")
                break
        except OSError as e:
            raise UserError(f"{path}: {e.strerror or e}") from None
    return p


def output_dir(path: str, what: str) -> Path:
    """A folder triattn may write into: absent (made later) or a directory."""
    p = Path(nonempty(what, path)).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{path}: not a directory (the {what} is a folder)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{path}: {parent} is not a directory")
            break
    return p


def stats_file(path: str) -> None:
    """A triattn stats file: safetensors with the right format header and sound tensors (numpy only, no torch)."""
    from .stats.format import QueryStats

    QueryStats.load(input_file(path, "stats file"))


def model(name: str, backend: str) -> None:
    """A model name or path the chosen backend can load: a known alias or pulled name, a Hugging Face model directory
    (a config.json object) or a GGUF file (or a folder holding one). Weights are not read."""
    from .backends import _pulled_for_another_backend, choose_backend
    from .registry import resolve_model

    nonempty("the model name", name)
    chosen, _ = choose_backend(backend)
    try:
        try:
            path = resolve_model(name, backend=chosen)
        except UserError:
            if backend != "auto":
                raise
            chosen, path = _pulled_for_another_backend(name, chosen)
    except OSError as e:  # a name too long for a path, ...
        raise UserError(f"{printable(name)[:200]}: not a usable model name or path ({e.strerror or e})") from None
    model_path(path)


def local_model(name: str) -> None:
    """For `pull`: a name that is a local path must be a model (a registry name or repo is checked by the pull)."""
    from .registry import looks_like_path

    nonempty("the model name", name)
    try:
        local = looks_like_path(name)
    except OSError:
        local = True
    if local:
        model_path(Path(name).expanduser())


def model_path(path: Path) -> None:
    """A directory with a readable config.json object, or a GGUF file, or a directory holding one."""
    import stat

    mode = _stat(path, "model directory").st_mode
    if stat.S_ISDIR(mode):
        config = path / "config.json"
        if config.exists():
            try:
                cfg = json.loads(config.read_bytes().decode("utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"{config}: unreadable model config ({_first_line(e)})") from None
            if not isinstance(cfg, dict):
                raise UserError(f"{config}: not a model config (a JSON object is expected)")
            return
        from .backends.llamacpp import gguf_file

        found = gguf_file(path)
        if found is None:
            raise UserError(f"{path}: not a model directory (no config.json or .gguf file)")
        path = found
    if path.suffix != ".gguf" or not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"{path}: not a model (a Hugging Face model directory or a .gguf file is expected)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read the model ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__


def fail(message: str) -> None:
    raise UserError(message)


def url(flag: str, value: str) -> str:
    """An http(s) URL with a host and, if given, a valid port."""
    from urllib.parse import urlsplit

    text(flag, value)
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as e:
        raise UserError(f"{flag} {printable(value)}: not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{flag} {printable(value)}: give an http:// or https:// URL with a host")
    del port
    return value


def integer_list(flag: str, value: str, low: int = 1, high: int = INT_MAX) -> list[int]:
    """Comma-separated integers within [low, high], at least one."""
    try:
        values = [int(v) for v in text(flag, value).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers (got {printable(value)})") from None
    if not values:
        raise UserError(f"{flag} names no value")
    for v in values:
        integer(flag, v, low, high)
    return values
