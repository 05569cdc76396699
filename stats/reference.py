"""The reference TriAttention stats file (a torch .pt) to and from stats format v1, and the `stats show` summary.

The reference project publishes calibrated stats as `{"metadata": {...}, "stats": {"layer00_head00": {...}}}` saved
with torch.save. We read it with torch.load(weights_only=True) only (never a full unpickle), check it against the
model's config.json, and keep its metadata verbatim so that exporting gives the same file back (spec in FORMAT.md).
torch is an optional dependency, so it is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..rope import ModelShape
from .format import QueryStats, meta_for_model

PER_HEAD = ("q_mean_real", "q_mean_imag", "q_abs_mean")
_KEY = re.compile(r"layer(\d+)_head(\d+)")
_PAIRING = {"half": "half", "interleaved": "interleaved"}  # reference rope_style -> our rope_pairing


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError("reading or writing reference .pt stats needs torch: pip install 'triattn-local[torch]'") from None
    return torch


def head_key(layer: int, head: int) -> str:
    return f"layer{layer:02d}_head{head:02d}"


def _load_pt(path: Path) -> dict:
    """torch.load with weights_only=True; any failure is a one-line UserError."""
    torch = _torch()
    if not path.is_file():
        raise UserError(f"{path}: reference stats file not found")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path.name}: not a readable torch stats file ({first})") from None
    if not (isinstance(data, dict) and isinstance(data.get("metadata"), dict) and isinstance(data.get("stats"), dict)):
        raise UserError(f"{path.name}: not a reference stats file (expected a dict with 'metadata' and 'stats')")
    return data


def _mismatch(name: str, what: str, in_stats, in_model) -> UserError:
    return UserError(f"{name} does not match the model: {what} is {in_stats} in the stats, {in_model} in the model")


def _same_number(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return a == b


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def _check_metadata(name: str, md: dict, shape: ModelShape) -> None:
    """Refuse a file whose own metadata names another model shape or RoPE."""
    style = md.get("rope_style", "half")
    if style not in _PAIRING:
        raise UserError(f"{name}: unknown rope_style {style!r} (known: half, interleaved)")
    if _PAIRING[style] != shape.rope_pairing:
        raise _mismatch(name, "the rope pairing", _PAIRING[style], shape.rope_pairing)
    checks = (
        ("head_dim", "head_dim", shape.head_dim),
        ("num_layers", "the number of layers", shape.num_layers),
        ("num_attention_heads", "the number of query heads", shape.num_heads),
        ("num_kv_heads", "the number of kv heads", shape.num_kv_heads),
    )
    for key, what, model_value in checks:
        if key in md and md[key] != model_value:
            raise _mismatch(name, what, md[key], model_value)
    if "rope_type" in md and md["rope_type"] != shape.rope_type:
        raise _mismatch(name, "rope_type", md["rope_type"], shape.rope_type)
    if "rope_theta" in md and not _same_number(md["rope_theta"], shape.rope_theta):
        raise _mismatch(name, "rope_theta", _number(md["rope_theta"]), f"{shape.rope_theta:g}")
    scaling = md.get("rope_scaling") or {}
    if isinstance(scaling, dict):
        for key, value in scaling.items():
            if key in ("rope_type", "type") or key not in shape.rope_scaling:
                continue
            if not _same_number(value, shape.rope_scaling[key]):
                raise _mismatch(name, f"rope_scaling.{key}", value, shape.rope_scaling[key])


def _heads_in(name: str, data: dict) -> dict[tuple[int, int], dict]:
    """(layer, head) -> per-head tensors, from the stats keys; sampled_heads must agree."""
    heads = {}
    for key, entry in data["stats"].items():
        m = _KEY.fullmatch(str(key))
        if not m or not isinstance(entry, dict):
            raise UserError(f"{name}: unexpected stats entry {key!r} (expected layerLL_headHH -> dict of tensors)")
        heads[(int(m.group(1)), int(m.group(2)))] = entry
    sampled = data["metadata"].get("sampled_heads")
    if sampled is not None:
        try:
            listed = {(int(layer), int(head)) for layer, head in sampled}
        except (TypeError, ValueError):
            raise UserError(f"{name}: sampled_heads is not a list of [layer, head] pairs") from None
        if listed != set(heads):
            raise UserError(f"{name}: sampled_heads lists {len(listed)} heads, the stats hold {len(heads)}")
    if not heads:
        raise UserError(f"{name}: the file holds no stats")
    return heads


def import_reference(ref_path: str | Path, model_dir: str | Path, model_id: str | None = None) -> QueryStats:
    """Read a reference .pt, check it against the model's config.json, and return it as QueryStats."""
    torch = _torch()
    path = Path(ref_path)
    name = path.name
    data = _load_pt(path)
    md = data["metadata"]
    shape = ModelShape.from_model_dir(model_dir)
    _check_metadata(name, md, shape)
    try:
        json.dumps(md)  # kept verbatim in our metadata, which is JSON
    except (TypeError, ValueError) as e:
        raise UserError(f"{name}: reference metadata is not plain data ({e})") from None
    heads = _heads_in(name, data)
    layers = max(layer for layer, _ in heads) + 1
    if layers != shape.num_layers:
        raise _mismatch(name, "the number of layers", layers, shape.num_layers)
    per_layer = max(head for _, head in heads) + 1
    if per_layer != shape.num_heads:
        raise _mismatch(name, "the number of query heads", per_layer, shape.num_heads)
    missing = [(lay, h) for lay in range(shape.num_layers) for h in range(shape.num_heads) if (lay, h) not in heads]
    if missing:
        lay, h = missing[0]
        total = shape.num_layers * shape.num_heads
        raise UserError(f"{name}: stats cover {total - len(missing)} of {total} heads (first missing: layer {lay} head {h})")

    nf = shape.num_freqs
    arrays = {t: np.empty((shape.num_layers, shape.num_heads, nf), dtype=np.float32) for t in PER_HEAD}
    for (lay, h), entry in heads.items():
        for t in PER_HEAD:
            value = entry.get(t)
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{name}: {head_key(lay, h)} has no tensor {t}")
            if tuple(value.shape) != (nf,):
                raise _mismatch(name, f"the length of {t}", f"{list(value.shape)}", f"[{nf}] (head_dim/2)")
            arrays[t][lay, h] = value.detach().to(torch.float32).numpy()

    inv_freq, freq_scale = shape.rope_frequencies()
    meta = meta_for_model(
        shape,
        model_id or str(md.get("model_name") or Path(model_dir).name),
        source=f"reference import: {name}",
        reference_metadata=md,
    )
    stats = QueryStats(meta, arrays["q_mean_real"], arrays["q_mean_imag"], arrays["q_abs_mean"], inv_freq, freq_scale)
    stats.validate(name)
    return stats


def _fresh(s: str) -> str:
    """A new str object equal to s (pickle memoizes by identity, so sharing shows in the bytes)."""
    return s[:1] + s[1:] if len(s) > 1 else s


def _rebuild(obj, values: dict):
    """Copy of JSON-like metadata where equal string values share one object and keys are distinct objects.

    That is how the reference script's metadata looks in memory (e.g. model_path is model_name, rope_type is
    rope_scaling's), and the pickle shows it; after our JSON round trip it is what makes export byte-identical.
    """
    if isinstance(obj, dict):
        return {(_fresh(k) if isinstance(k, str) else k): _rebuild(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rebuild(v, values) for v in obj]
    if isinstance(obj, str):
        return values.setdefault(obj, _fresh(obj))
    return obj


def reference_metadata(stats: QueryStats) -> dict:
    """The imported file's metadata if there is one, else metadata synthesized from ours."""
    m = stats.meta
    if m.reference_metadata is not None:
        return _rebuild(m.reference_metadata, {})
    md = {
        "rope_style": m.rope_pairing,
        "head_dim": m.head_dim,
        "model_name": m.model_id,
        "num_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_kv_heads": m.num_kv_heads,
        "rope_type": m.rope_type,
        "rope_theta": m.rope_theta,
    }
    if m.rope_scaling:
        md["rope_scaling"] = dict(m.rope_scaling, rope_type=m.rope_type)
    md["sampled_heads"] = [[layer, head] for layer in range(m.num_layers) for head in range(m.num_heads)]
    return md


def export_reference(stats: QueryStats, out_path: str | Path) -> None:
    """Write stats as a reference .pt that the reference TriAttention project can load.

    torch.save names the zip archive inside after the file's stem, so we save under that name in a temporary
    folder next to out_path and move it into place (this also never leaves a half-written file behind).
    """
    torch = _torch()
    out = Path(out_path)
    stats.validate(str(out))
    m = stats.meta
    entries = {}
    for layer in range(m.num_layers):
        for head in range(m.num_heads):
            entries[head_key(layer, head)] = {
                t: torch.from_numpy(np.ascontiguousarray(getattr(stats, t)[layer, head], dtype=np.float32)).clone()
                for t in PER_HEAD
            }
    data = {"metadata": reference_metadata(stats), "stats": entries}
    from ..files import atomic_path, resolve_target

    target = resolve_target(out)
    with atomic_path(target) as final:  # mode kept, symlink followed, renamed over the target only when complete
        tmp_dir = Path(tempfile.mkdtemp(prefix=".triattn-export-", dir=final.parent))
        try:
            torch.save(data, str(tmp_dir / target.name))
            (tmp_dir / target.name).replace(final)
        except RuntimeError as e:  # torch's zip writer: a full disk, say
            raise UserError(f"cannot write {out}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)


# --- `triattn stats show` ------------------------------------------------------------------------------------------

_SPARK = "▁▂▃▄▅▆▇█"


def _spark(values: np.ndarray) -> str:
    """One block character per value on a fixed 0..1 scale, so models compare at a glance."""
    idx = np.clip((np.asarray(values) * len(_SPARK)).astype(int), 0, len(_SPARK) - 1)
    return "".join(_SPARK[i] for i in idx)


def stats_summary(stats: QueryStats):
    """A rich renderable describing the stats and their query concentration (for `triattn stats show`)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    m = stats.meta
    conc = stats.concentration()  # [layers, heads]
    per_layer = np.median(conc, axis=1)

    rows = [
        ("model", m.model_id + (f" @ {m.model_revision}" if m.model_revision else "")),
        ("architecture", m.architecture),
        ("shape", f"{m.num_layers} layers, {m.num_heads} heads, {m.num_kv_heads} kv heads, head_dim {m.head_dim}"),
        ("rope", f"{m.rope_type}, pairing {m.rope_pairing}, theta {m.rope_theta:g}, scaling: "
                 + (", ".join(f"{k}={v}" for k, v in m.rope_scaling.items()) or "none")),
        ("calibration", f"{m.calibration_tokens} tokens" if m.calibration_tokens else "token count not recorded"),
    ]
    if m.calibration_text_sha256:
        rows.append(("text sha256", m.calibration_text_sha256))
    rows.append(("source", m.source))
    rows.append(("concentration", f"median {np.median(conc):.3f}, min {conc.min():.3f}, max {conc.max():.3f} "
                                  f"over {conc.size} heads"))
    hint = "1 = a head's queries always point one way, 0 = spread evenly"
    rows.append(("", hint))
    rows.append(("per layer", _spark(per_layer)))
    for start in range(0, len(per_layer), 10):
        chunk = per_layer[start : start + 10]
        rows.append(("", f"L{start:>3}-{start + len(chunk) - 1:<3} " + " ".join(f"{v:.2f}" for v in chunk)))

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:  # Text, not markup: model ids and file names may hold brackets
        table.add_row(label, Text(value, style="dim" if value is hint else ""))
    return Group(Text("TriAttention query stats", style="bold underline"), table)


def render_stats(stats: QueryStats, console=None) -> None:
    """Print stats_summary to the console (a new rich Console when none is given)."""
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(stats_summary(stats))
