"""Model names a user can type, and what each means on this machine's backend.

A name is one of:
- a registry name from `data/models.json`, optionally with a tag: `qwen3-8b`, `qwen3-8b:q4`, `qwen3-32b-int4`;
- a Hugging Face repo `org/name`;
- a local model directory (any path that exists);
- `demo`, the model that ships inside the package.

`artifact_for` says what to download for a backend; `resolve_model` gives the directory to load, which for a pulled
name is its snapshot in the Hugging Face cache (see models.py for the records `triattn pull` keeps).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError

DEMO = "demo"
REGISTRY_ENV = "TRIATTN_REGISTRY"  # an extra registry file (same format), merged over the shipped one
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def demo_model_dir() -> Path:
    return Path(str(resources.files("triattn_local") / "demo" / "model"))


ALIASES = {DEMO: demo_model_dir}


@dataclass(frozen=True)
class Artifact:
    """One downloadable build of a model for one backend."""

    name: str  # canonical: `qwen3-8b:bf16`, `Qwen/Qwen3-8B`, or `demo`
    backend: str
    repo: str | None = None  # Hugging Face repo; None for the built-in demo
    revision: str = "main"
    file: str | None = None  # the one file to fetch (GGUF); None = the repo's weights, config and tokenizer
    quant: str = ""
    description: str = ""
    builtin: Path | None = None


def load_registry() -> dict:
    """The shipped registry, with the file named by $TRIATTN_REGISTRY (if any) merged over it."""
    data = json.loads((resources.files("triattn_local") / "data" / "models.json").read_text(encoding="utf-8"))
    extra_path = os.environ.get(REGISTRY_ENV)
    if extra_path:
        try:
            extra = json.loads(Path(extra_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{REGISTRY_ENV}={extra_path}: not a readable registry file ({e})") from None
        data["models"].update(extra.get("models", {}))
        data["aliases"].update(extra.get("aliases", {}))
    return data


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or _exists(Path(name))


def _exists(path: Path) -> bool:
    """Path.exists that says no to a name the file system refuses (over 255 bytes, say) instead of raising."""
    try:
        return path.exists()
    except OSError:
        return False


def is_repo_id(name: str) -> bool:
    """The Hub's rule: org/name, each part at most 96 characters."""
    return (bool(REPO_ID.match(name)) and ".." not in name and "--" not in name
            and all(len(part) <= 96 for part in name.split("/")))


def artifact_for(name: str, backend: str) -> Artifact:
    """What `name` means for `backend`. Raises UserError for unknown names, tags, or builds missing for the backend.
    Local paths are not artifacts: callers check for them first."""
    data = load_registry()
    base, _, tag = name.partition(":")
    if base in data["aliases"] and not tag:
        base, _, tag = data["aliases"][base].partition(":")
    models = data["models"]
    if base in models:
        entry = models[base]
        if "builtin" in entry:
            if tag:
                raise UserError(f"{base} has no tags")
            return Artifact(name=base, backend=backend, description=entry.get("description", ""),
                            builtin=Path(str(resources.files("triattn_local") / entry["builtin"])))
        tags = entry["tags"]
        if not tag:
            tag = entry.get("default", {}).get(backend)
            if tag is None:
                raise UserError(f"{base} has no build for the {backend} backend")
        if tag not in tags:
            raise UserError(f"{base} has no tag {tag!r} (tags: {', '.join(sorted(tags))})")
        build = tags[tag].get(backend)
        if build is None:
            others = ", ".join(sorted(tags[tag])) or "none"
            raise UserError(f"{base}:{tag} has no build for the {backend} backend (it has: {others})")
        return Artifact(name=f"{base}:{tag}", backend=backend, repo=build["repo"],
                        revision=build.get("revision", "main"), file=build.get("file"),
                        quant=build.get("quant", ""), description=entry.get("description", ""))
    if is_repo_id(base):
        if tag and backend != "llamacpp":
            raise UserError(f"{name}: a Hugging Face repo takes no tag for the {backend} backend")
        return Artifact(name=name, backend=backend, repo=base, quant=tag)  # llamacpp: the tag picks the GGUF file
    known = sorted(set(models) | set(data["aliases"]))
    close = difflib.get_close_matches(base, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"unknown model {name!r}: {hint}give a name from `triattn list --available`, "
                    f"a Hugging Face repo (org/name) or a model directory")


def known_models() -> list[tuple[str, str, str]]:
    """(name to type, backend, what it pulls) for every build in the registry; the names without a tag are the
    backend's default build."""
    data = load_registry()
    rows = []
    for name, entry in data["models"].items():
        if "builtin" in entry:
            rows.append((name, "any", "built in: " + entry.get("description", "")))
            continue
        for tag, builds in entry["tags"].items():
            for backend, build in builds.items():
                typed = name if entry.get("default", {}).get(backend) == tag else f"{name}:{tag}"
                what = build["repo"] + (f"/{build['file']}" if build.get("file") else "")
                rows.append((typed, backend, what + (f" ({build['quant']})" if build.get("quant") else "")))
    for alias, target in data["aliases"].items():
        rows.append((alias, "any", f"same as {target}"))
    return rows


def resolve_model(name: str, backend: str = "torch") -> Path:
    """The directory (or file) to load for a model name: `demo`, a local path, or a pulled name or repo.
    A registry name or repo that was not pulled yet is a one-line error saying how to pull it."""
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name).expanduser()
    if _exists(path) or looks_like_path(name):
        return path
    artifact = artifact_for(name, backend)
    if artifact.builtin is not None:
        return artifact.builtin
    from .models import find_pulled

    pulled = find_pulled(artifact.name, backend)
    if pulled is None:
        raise UserError(f"{name} is not pulled yet: run `triattn pull {name}` first")
    if not pulled.model_path.exists():
        raise UserError(f"{name}: its files are gone from {pulled.model_path}: run `triattn pull {name}` again")
    return pulled.model_path
