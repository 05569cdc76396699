"""Where a model's stats come from when --stats is not given: next to the model, in triattn's cache, or made now."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

STATS_FILE_NAME = "triattn_stats.safetensors"


def triattn_cache() -> Path:
    """triattn's own cache ($TRIATTN_CACHE, else ~/.cache/triattn): stats and the records of pulled models."""
    return Path(os.environ.get("TRIATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "triattn"))


def cache_dir() -> Path:
    return triattn_cache() / "stats"


def revision_stats_path(repo_id: str, commit: str) -> Path:
    """Stats of a Hub model are keyed by repo and commit: valid on every machine and path that holds that revision."""
    return cache_dir() / "hub" / repo_id.replace("/", "--") / f"{commit}.safetensors"


def hub_snapshot(model_dir: Path) -> tuple[str, str] | None:
    """(repo_id, commit) when model_dir is a snapshot in the Hugging Face cache (.../models--org--name/snapshots/SHA),
    or a file directly in one (a GGUF: the repo's quantizations of one model share its stats)."""
    path = Path(model_dir)
    if path.suffix == ".gguf":
        path = path.parent
    parts = path.parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return None
    return parts[-3][len("models--"):].replace("--", "/"), parts[-1]


def stats_target(model_dir: Path) -> Path:
    """Where stats calibrated for this model are cached: by revision for a Hub snapshot, else by path and config."""
    snapshot = hub_snapshot(model_dir)
    if snapshot is not None:
        return revision_stats_path(*snapshot)
    return cache_dir() / f"{model_key(model_dir)}.safetensors"


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
    """Stats for a model directory. For a Hub snapshot, stats cached for its revision come first: `triattn pull` only
    makes them when the repo publishes none (or publishes stats that do not fit the model)."""
    candidates = [model_dir / STATS_FILE_NAME, cache_dir() / f"{model_key(model_dir)}.safetensors"]
    snapshot = hub_snapshot(model_dir)
    if snapshot is not None:
        candidates.insert(0, revision_stats_path(*snapshot))
    for candidate in candidates:
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

    target = stats_target(model_dir)
    print(f"no TriAttention stats for {model_dir}: calibrating now (once; cached in {target})", file=sys.stderr)
    stats = engine.calibrate(default_calibration_text(), progress=True)
    snapshot = hub_snapshot(model_dir)
    if snapshot is not None:
        stats = stats.with_meta(model_revision=snapshot[1])
    stats.save(target)
    return stats
