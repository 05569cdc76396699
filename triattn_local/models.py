"""Pulled models on this machine: the record `triattn pull` writes once a model is complete, and `list`, `show`, `rm`.

The weights stay in the Hugging Face cache (shared with other tools); a record in ~/.cache/triattn/models says that a
name was pulled completely for a backend, at which commit, and where its files and stats are. No record, no model:
an interrupted or failed pull leaves none.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .stats_cache import find_stats, revision_stats_path, triattn_cache


@dataclass
class PulledModel:
    name: str  # canonical name: `qwen3-8b:bf16` or `org/repo`
    backend: str
    repo: str
    commit: str
    path: str  # the snapshot directory in the Hugging Face cache
    files: dict[str, int] = field(default_factory=dict)  # repo path -> bytes
    file: str | None = None  # the file to load (GGUF), else the directory
    quant: str = ""
    stats: str | None = None  # stats file made or found at pull time
    stats_source: str = ""
    verified: bool = False  # checksums matched the Hub's at pull time
    pulled_at: str = ""

    @property
    def model_path(self) -> Path:
        return Path(self.path) / self.file if self.file else Path(self.path)

    @property
    def size(self) -> int:
        return sum(self.files.values())


def records_dir() -> Path:
    return triattn_cache() / "models"


def record_path(name: str, backend: str) -> Path:
    return records_dir() / f"{name.replace('/', '--').replace(':', '@')}.{backend}.json"


def save_record(model: PulledModel) -> Path:
    """Write the record atomically: it is what marks a pull as complete."""
    model.pulled_at = model.pulled_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = record_path(model.name, model.backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(model), indent=1))
    tmp.replace(path)
    return path


def all_pulled() -> list[PulledModel]:
    out = []
    for path in sorted(records_dir().glob("*.json")):
        try:
            out.append(PulledModel(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # a foreign or damaged file is not a pulled model
    return out


def find_pulled(name: str, backend: str) -> PulledModel | None:
    path = record_path(name, backend)
    if not path.is_file():
        return None
    try:
        return PulledModel(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _console():
    """A console for tables: piped output gets whole lines (paths unwrapped), for grep and scripts."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = 1000
    return console


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- list -------------------------------------------------------------------------------------------------------


def list_models(available: bool = False) -> None:
    """Print the pulled models (and the built-in demo), or with available=True every name the registry knows."""
    from rich.table import Table

    from .registry import demo_model_dir, known_models

    console = _console()
    if available:
        table = Table("NAME", "BACKEND", "PULLS", box=None, pad_edge=False)
        table.columns[2].overflow = "fold"
        for name, backend, what in known_models():
            table.add_row(name, backend, what)
        console.print(table)
        return
    table = Table("NAME", "BACKEND", "SIZE", "STATS", "PATH", box=None, pad_edge=False)
    table.columns[4].overflow = "fold"
    demo = demo_model_dir()
    table.add_row("demo", "torch", human_size(dir_size(demo)), "yes", str(demo))
    for m in all_pulled():
        present = m.model_path.exists()
        stats = "yes" if present and find_stats(Path(m.path)) is not None else "no"
        table.add_row(m.name, m.backend, human_size(m.size), stats, str(m.model_path) + ("" if present else " (missing)"))
    console.print(table)


# ---- show -------------------------------------------------------------------------------------------------------


def safetensors_summary(model_dir: Path) -> tuple[int, dict[str, int]]:
    """(parameter count, {dtype: parameters}) from the safetensors headers: 8 bytes of length, then JSON."""
    total, by_dtype = 0, {}
    for path in sorted(model_dir.glob("*.safetensors")):
        if path.name == "triattn_stats.safetensors":
            continue
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            raise UserError(f"{path}: not a readable safetensors file (corrupt? `triattn pull` fetches it again)") from None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + count
    return total, by_dtype


def quantization(config: dict, by_dtype: dict[str, int]) -> str:
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method", "quantized")
        bits = q.get("bits") or q.get("w_bit")
        return f"{method}" + (f" {bits}-bit" if bits else "") + (f", group {q['group_size']}" if q.get("group_size") else "")
    if by_dtype:
        main = max(by_dtype, key=by_dtype.get)
        return f"none ({main} weights)"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return f"none ({dtype} weights)" if dtype else "none"


# llama.cpp's file types (general.file_type) for the common quantizations
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
                   18: "Q6_K", 32: "BF16"}


def describe_checkpoint(path: Path):
    """(ModelShape, hidden size, parameters, quantization) of a Hugging Face model directory or a GGUF model."""
    from .backends.llamacpp import gguf_file, is_gguf_model
    from .rope import ModelShape

    if is_gguf_model(path):
        from .backends.llamacpp.gguf_meta import model_shape, read_header

        header = read_header(gguf_file(path))
        params = 0
        for _, dims, _ in header.tensors.values():
            count = 1
            for d in dims:
                count *= d
            params += count
        m = header.metadata
        file_type = m.get("general.file_type")
        quant = f"GGUF {GGUF_FILE_TYPES.get(file_type, f'file type {file_type}')}"
        hidden = m.get(f"{m.get('general.architecture')}.embedding_length", "?")
        return model_shape(header), hidden, params, quant
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    config = json.loads(config_path.read_text())
    params, by_dtype = safetensors_summary(path)
    return ModelShape.from_hf_config(config), config.get("hidden_size", "?"), params, quantization(config, by_dtype)


def show_model(name: str, backend: str, budget: int = 2048, divide_length: int = 128) -> None:
    """Architecture, context, quantization, memory at the budget, and a stats summary, for any model name."""
    import numpy as np
    from rich.table import Table
    from rich.text import Text

    from .memory import gib
    from .registry import resolve_model
    from .stats.format import QueryStats

    path = resolve_model(name, backend=backend)
    shape, hidden, params, quant = describe_checkpoint(path)
    rows: list[tuple[str, str]] = [("name", name)]
    record = _record_for(name, backend)
    if record is not None:
        rows.append(("source", f"{record.repo} @ {record.commit[:12]} ({backend})"))
    rows += [
        ("path", str(path)),
        ("architecture", shape.architecture),
        ("shape", f"{shape.num_layers} layers, {shape.num_heads} heads, {shape.num_kv_heads} kv heads, "
                  f"head_dim {shape.head_dim}, hidden {hidden}"),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"),
        ("context", f"{shape.max_position_embeddings} tokens"),
        ("rope", f"{shape.rope_type}, theta {shape.rope_theta:g}"),
        ("quantization", quant),
    ]
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2
    rows.append(("KV cache (16-bit)", f"{kv / 1024:.0f} KiB/token: {gib(kv * (budget + divide_length))} at budget "
                                      f"{budget}, {gib(kv * shape.max_position_embeddings)} at full context"))
    stats_path = find_stats(path)
    if stats_path is None:
        rows.append(("stats", "none yet (made on first run, or by `triattn pull`)"))
    else:
        stats = QueryStats.load(stats_path)
        m = stats.meta
        conc = stats.concentration()
        rows += [
            ("stats", str(stats_path)),
            ("stats source", m.source + (f", {m.calibration_tokens} tokens" if m.calibration_tokens else "")
             + (f", revision {m.model_revision[:12]}" if m.model_revision else "")),
            ("concentration", f"median {np.median(conc):.3f} (min {conc.min():.3f}, max {conc.max():.3f}) over "
                              f"{conc.size} heads; `triattn stats show` for per-layer detail"),
        ]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, Text(value))
    _console().print(table)


def _record_for(name: str, backend: str) -> PulledModel | None:
    from .registry import artifact_for, looks_like_path

    if name == "demo" or looks_like_path(name):
        return None
    return find_pulled(artifact_for(name, backend).name, backend)


# ---- rm ---------------------------------------------------------------------------------------------------------


def remove_model(name: str, backend: str) -> str:
    """Forget a pulled model and delete its files from the Hugging Face cache (blobs no other snapshot uses, and
    only if no other pulled name shares the snapshot) and its cached stats. Returns a one-line report."""
    from .registry import artifact_for, looks_like_path

    if name == "demo":
        raise UserError("demo ships with triattn and cannot be removed")
    if looks_like_path(name):
        raise UserError(f"{name} is a local directory, not a pulled model: delete it yourself if you mean to")
    canonical = artifact_for(name, backend).name
    record = find_pulled(canonical, backend)
    if record is None:
        raise UserError(f"{name} is not pulled (for the {backend} backend): `triattn list` shows what is")
    record_path(canonical, backend).unlink()
    shared = [m for m in all_pulled() if m.path == record.path]
    freed = 0
    if not shared:
        freed = _delete_snapshot_files(Path(record.path), list(record.files))
        stats = revision_stats_path(record.repo, record.commit)
        if stats.is_file():
            stats.unlink()
    kept = f"; files kept, also used by {shared[0].name}" if shared else ""
    return f"removed {canonical} ({record.backend}, freed {human_size(freed)}{kept})"


def _delete_snapshot_files(snapshot: Path, files: list[str]) -> int:
    """Delete these files of one snapshot: the links, and their blobs unless another snapshot links to them."""
    repo_dir = snapshot.parent.parent  # .../models--org--name
    freed = 0
    doomed = set()
    for rel in files:
        link = snapshot / rel
        if link.is_symlink():
            doomed.add(Path(os.path.realpath(link)))
            link.unlink()
        elif link.is_file():  # no symlinks on this system: the snapshot holds the file itself
            freed += link.stat().st_size
            link.unlink()
    still_used = {Path(os.path.realpath(p)) for p in repo_dir.glob("snapshots/*/**/*") if p.is_symlink()}
    for blob in doomed - still_used:
        if blob.is_file():
            freed += blob.stat().st_size
            blob.unlink()
    for d in sorted((p for p in snapshot.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if snapshot.is_dir() and not any(snapshot.iterdir()):
        snapshot.rmdir()
    return freed
