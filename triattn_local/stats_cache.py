"""Where a model's stats come from when --stats is not given: next to the model, in triattn's cache, or made now."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

STATS_FILE_NAME = "triattn_stats.safetensors"


def cache_dir() -> Path:
    base = os.environ.get("TRIATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "triattn")
    return Path(base) / "stats"


def model_key(model_dir: Path) -> str:
    """Cache key of a local model: its resolved path and config, so a changed model gets new stats."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        st = weights.stat()
        h.update(f"{weights.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def find_stats(model_dir: Path) -> Path | None:
    for candidate in (model_dir / STATS_FILE_NAME, cache_dir() / f"{model_key(model_dir)}.safetensors"):
        if candidate.is_file():
            return candidate
    return None


def resolve_stats(engine, stats_path: str | None):
    """The QueryStats for this engine's model: --stats, else found, else calibrated now and cached."""
    from .stats.format import QueryStats

    if stats_path:
        stats = QueryStats.load(stats_path)
        stats.check_matches(engine.shape, where=f"stats {stats_path}")
        return stats
    model_dir = Path(engine.model_path)
    found = find_stats(model_dir)
    if found is not None:
        stats = QueryStats.load(found)
        stats.check_matches(engine.shape, where=f"stats {found}")
        return stats
    from .calibration_text import default_calibration_text

    target = cache_dir() / f"{model_key(model_dir)}.safetensors"
    print(f"no TriAttention stats for {model_dir}: calibrating now (once; cached in {target})", file=sys.stderr)
    stats = engine.calibrate(default_calibration_text(), progress=True)
    stats.save(target)
    return stats
