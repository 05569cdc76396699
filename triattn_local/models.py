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
from .files import write_atomic
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
    # the files triattn itself downloaded into the cache (rm deletes only these); None: a record from before this
    # was noted, so nothing is known to be triattn's and rm keeps the files
    created: list[str] | None = None

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
    return write_atomic(record_path(model.name, model.backend), json.dumps(asdict(model), indent=1))


def downloading_path(name: str, backend: str) -> Path:
    """A note of the files a pull is about to download, written first: a pull killed half-way and finished later
    still knows which files in the cache are triattn's."""
    return record_path(name, backend).with_suffix(".downloading")


def note_downloading(name: str, backend: str, snapshot: Path, files: list[str]) -> None:
    before = noted_downloads(name, backend, snapshot)
    note = {"path": str(snapshot), "files": sorted({*before, *files})}
    write_atomic(downloading_path(name, backend), json.dumps(note))


def noted_downloads(name: str, backend: str, snapshot: Path) -> set[str]:
    try:
        note = json.loads(downloading_path(name, backend).read_text())
        return set(note["files"]) if note.get("path") == str(snapshot) else set()
    except (OSError, ValueError, TypeError, KeyError):
        return set()


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
    dtype, width = default_kv_dtype(backend)
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * width
    rows.append((f"KV cache ({dtype})", f"{kv / 1024:.0f} KiB/token: {gib(kv * (budget + divide_length))} at budget "
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


def default_kv_dtype(backend: str) -> tuple[str, int]:
    """(name, bytes per value) of the KV cache `triattn run` keeps here with --dtype auto: float32 on a CPU (torch,
    MLX), bfloat16 on a CUDA GPU, the model's 16-bit type on a Mac GPU, float16 on llama.cpp."""
    if backend == "llamacpp":
        return "float16", 2
    if backend == "mlx":
        import mlx.core as mx

        return ("float32", 4) if mx.default_device() == mx.cpu else ("16-bit", 2)
    import torch

    return ("bfloat16", 2) if torch.cuda.is_available() else ("float32", 4)


def _record_for(name: str, backend: str) -> PulledModel | None:
    from .registry import artifact_for, looks_like_path

    if name == "demo" or looks_like_path(name):
        return None
    return find_pulled(artifact_for(name, backend).name, backend)


# ---- rm ---------------------------------------------------------------------------------------------------------


def remove_model(name: str, backend: str) -> str:
    """Forget a pulled model and delete the files triattn downloaded for it, and its cached stats. Returns a
    one-line report that says what was kept and why.

    Kept: files another tool had in the cache before the pull (triattn downloaded none of them), blobs another
    snapshot links to, a snapshot another pulled name or another tool uses (files triattn did not download are in
    it), and any link target outside the repo's `blobs/` (never followed out of the cache). Files go first, the
    record last: a failure leaves the model listed, and `rm` can be run again."""
    from .registry import artifact_for, looks_like_path

    if name == "demo":
        raise UserError("demo ships with triattn and cannot be removed")
    if looks_like_path(name):
        raise UserError(f"{name} is a local directory, not a pulled model: delete it yourself if you mean to")
    canonical = artifact_for(name, backend).name
    record = find_pulled(canonical, backend)
    if record is None:
        raise UserError(f"{name} is not pulled (for the {backend} backend): `triattn list` shows what is")
    path = record_path(canonical, backend)
    shared = [m for m in all_pulled() if m.path == record.path and (m.name, m.backend) != (canonical, backend)]
    snapshot = Path(record.path)
    stats = revision_stats_path(record.repo, record.commit)
    freed, kept = 0, ""
    if shared:  # the other name now owns the files triattn downloaded
        other = shared[0]
        if record.created:
            other.created = sorted({*(other.created or []), *record.created})
            save_record(other)
        kept = f"; files kept, also used by {other.name}"
    elif record.created is None:
        kept = ("; files kept: this record is older than triattn's note of which files it downloaded "
                f"(they are in {snapshot})")
    elif not record.created:
        kept = f"; files kept: they were in the Hugging Face cache before the pull ({snapshot})"
    else:
        _check_removable([path.parent, stats.parent, snapshot, snapshot.parent.parent / "blobs"])
        try:
            freed, notes = _delete_snapshot_files(snapshot, record.created)
            stats.unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"cannot remove {canonical}: {e.strerror or e} ({e.filename}); it stays listed, run "
                            "`triattn rm` again once that is fixed") from None
        kept = "".join(f"; {n}" for n in notes)
    try:
        path.unlink()
        downloading_path(canonical, backend).unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot remove the record {path}: {e.strerror or e}") from None
    return f"removed {canonical} ({record.backend}, freed {human_size(freed)}{kept})"


def _check_removable(folders: list[Path]) -> None:
    """A read-only cache is found before anything is deleted, so rm never stops half-way on it."""
    for folder in folders:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"cannot remove files from {folder}: it is read-only (nothing was removed)")


def in_blobs(snapshot: Path, target: str | Path) -> bool:
    """Whether `target` (a resolved path) is a file in the repo's own `blobs/` folder of the Hugging Face cache."""
    blobs = Path(os.path.realpath(snapshot.parent.parent / "blobs"))
    target = Path(target)
    return target.parent == blobs and target.is_file() and not target.is_symlink()


def _delete_snapshot_files(snapshot: Path, created: list[str]) -> tuple[int, list[str]]:
    """Delete the files triattn downloaded into one snapshot: the links, and their blobs when they are in the repo's
    `blobs/` and no other snapshot links to them. Returns (bytes freed, notes on what was kept and why)."""
    notes: list[str] = []
    real_snapshot = Path(os.path.realpath(snapshot))
    if snapshot.is_symlink() or not snapshot.is_dir():
        return 0, [f"{snapshot} is not a folder of the cache: nothing in it deleted"] if snapshot.exists() else []
    foreign = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*")
                     if (p.is_file() or p.is_symlink()) and str(p.relative_to(snapshot)) not in created)
    if foreign:  # another tool fetched these (or the pull found them): it uses this snapshot, keep it whole
        what = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return 0, [f"files kept: {snapshot} also holds {what}, which triattn did not download (another tool uses it)"]
    repo_dir = snapshot.parent.parent  # .../models--org--name
    freed, doomed, outside = 0, set(), []
    for rel in created:
        link = snapshot / rel
        if Path(os.path.realpath(link.parent)) != real_snapshot / Path(rel).parent:
            outside.append(rel)  # a linked folder inside the snapshot: its files are not the cache's
            continue
        if link.is_symlink():
            target = Path(os.path.realpath(link))
            if in_blobs(snapshot, target):
                doomed.add(target)
            elif target.exists():
                outside.append(rel)
            link.unlink()
        elif link.is_file():  # no symlinks on this system: the snapshot holds the file itself
            freed += link.stat().st_size
            link.unlink()
    others = {Path(os.path.realpath(p)) for p in repo_dir.glob("snapshots/*/**/*") if p.is_symlink()}
    used = doomed & others
    for blob in doomed - others:
        freed += blob.stat().st_size
        blob.unlink()
    if used:
        notes.append(f"{len(used)} blob(s) kept, linked from another snapshot of {repo_dir.name}")
    if outside:
        notes.append(f"kept {', '.join(outside[:3])}: linked from the cache to files outside it")
    for d in sorted((p for p in snapshot.rglob("*") if p.is_dir() and not p.is_symlink()),
                    key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if not any(snapshot.iterdir()):
        snapshot.rmdir()
    return freed, notes
