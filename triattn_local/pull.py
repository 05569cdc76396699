"""`triattn pull`: a name in, a model ready to run out: downloaded, checked, with TriAttention stats.

1. The name resolves (registry.artifact_for) to a Hub repo (and file) for this machine's backend.
2. The repo's file list (sizes, checksums) and config.json give a memory estimate before anything large moves.
3. huggingface_hub downloads into its standard cache (files other tools fetched are reused; a dropped connection is
   resumed with a Range request; a file interrupted by a killed process starts again, finished files are kept).
4. Every file is checked against the Hub's sha256 (LFS) or git hash; a bad one is fetched once more.
5. Stats: published with the repo (triattn_stats.safetensors) if valid, else calibrated here on the shipped text and
   cached by repo and commit.
6. Only then is a record written (models.py): a failed or interrupted pull is never listed or run.

HF_HUB_OFFLINE=1 skips the network: a model already in the cache is checked, given stats and recorded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .files import write_atomic
from .models import PulledModel, downloading_path, find_pulled, note_downloading, noted_downloads, save_record
from .registry import Artifact, artifact_for, looks_like_path

# What the torch and MLX backends load: weights, config, tokenizer and chat template. Not *.bin/*.pt/*.gguf.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def pull_model(name: str, backend: str = "auto", force: bool = False, budget: int = 2048, divide_length: int = 128,
               calibration_tokens: int | None = None) -> None:
    """Everything `triattn pull NAME` does; progress and results go to stderr, errors are UserError."""
    from rich.console import Console

    from .backends import choose_backend

    backend_name, _ = choose_backend(backend)
    console = Console(stderr=True)
    if name == "demo" or looks_like_path(name):
        path = Path(name).expanduser() if name != "demo" else None
        what = "demo ships with triattn" if path is None else f"{name} is a local directory"
        if path is not None and not path.is_dir():
            raise UserError(f"{name}: no such model directory")
        console.print(f"{what}: nothing to download")
        if path is not None:
            stats, source = ensure_stats(path, None, None, backend_name, console, calibration_tokens)
            console.print(f"stats: {source} ({stats})")  # no estimate was made, so they are always made
        console.print(f"ready: triattn run {name}")
        return
    artifact = artifact_for(name, backend_name)
    if artifact.builtin is not None:
        console.print(f"{artifact.name} ships with triattn: nothing to download\nready: triattn run {name}")
        return

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        if force:
            raise UserError("--force downloads again, and HF_HUB_OFFLINE is set")
        snapshot, files, verified = _from_cache(artifact, console), None, False
        sizes = _local_files(snapshot, artifact)
        config_path = snapshot / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        fits = _print_estimate(console, config, _weight_bytes(sizes), backend_name, budget, divide_length)
    else:
        info = _repo_info(artifact)
        files = select_files(artifact, info.siblings or [])
        sizes = {p: s.size or 0 for p, s in files.items()}
        _check_gated(artifact, info)
        # files not in the cache yet are the ones triattn downloads, and the only ones `triattn rm` may delete
        target = _snapshot_dir(artifact, info.sha)
        note_downloading(artifact.name, backend_name, target, [p for p in files if not (target / p).exists()])
        config = _fetch_config(artifact, info.sha, files)
        fits = _print_estimate(console, config, _weight_bytes(sizes), backend_name, budget, divide_length)
        snapshot = _download(artifact, info.sha, files, force, console)
        bad = verify(snapshot, files, console)
        if bad:  # fetch bad files once more, then give up with the way out
            console.print(f"[yellow]{', '.join(bad)}: corrupt (checksum mismatch): downloading again[/yellow]")
            for rel in bad:
                _remove_cached_file(snapshot / rel)
            snapshot = _download(artifact, info.sha, {p: files[p] for p in bad}, False, console)
            still = verify(snapshot, {p: files[p] for p in bad}, console)
            if still:
                for rel in still:
                    _remove_cached_file(snapshot / rel)
                raise UserError(f"{artifact.repo}: {', '.join(still)} did not match the Hub's checksum twice "
                                f"(corrupted in transit or on the server): run `triattn pull {name} --force` to retry")
        verified = True
    check_readable(snapshot, list(sizes))

    record = PulledModel(name=artifact.name, backend=backend_name, repo=artifact.repo, commit=snapshot.name,
                         path=str(snapshot), files=sizes, file=artifact.file, quant=artifact.quant,
                         verified=verified, created=_created_files(artifact.name, backend_name, snapshot, sizes))
    if artifact.file is None:
        stats, source = ensure_stats(snapshot, artifact.repo, snapshot.name, backend_name, console,
                                     calibration_tokens, fits=fits)
        record.stats, record.stats_source = (str(stats) if stats else None), source
        console.print(f"stats: {source}" + (f" ({stats})" if stats else ""))
    else:  # a GGUF file: no config.json, so the llama.cpp engine reads the shape and calibrates
        stats, source = ensure_gguf_stats(snapshot / artifact.file, console, calibration_tokens, fits=fits)
        record.stats, record.stats_source = (str(stats) if stats else None), source
        console.print(f"stats: {source}" + (f" ({stats})" if stats else ""))
    save_record(record)
    downloading_path(artifact.name, backend_name).unlink(missing_ok=True)
    console.print(f"ready: triattn run {name}")


def _created_files(name: str, backend: str, snapshot: Path, sizes: dict[str, int]) -> list[str] | None:
    """The files of this model that triattn downloaded: noted by this pull or an earlier one of the same snapshot."""
    created = noted_downloads(name, backend, snapshot)
    previous = find_pulled(name, backend)
    if previous is not None and previous.path == str(snapshot):
        if previous.created is None and not created:
            return None  # an older record: still unknown
        created |= set(previous.created or [])
    return sorted(created & set(sizes))


# ---- the Hub ----------------------------------------------------------------------------------------------------


@contextmanager
def _hub_errors(artifact: Artifact):
    """Turn huggingface_hub's exceptions into one-line UserErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = artifact.repo

    def unreachable(e: BaseException) -> UserError:
        return UserError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to fetch {repo} "
                         f"({_first_line(e)}); check the connection, or set HF_HUB_OFFLINE=1 to use models already "
                         f"downloaded")

    try:
        yield
    except GatedRepoError:
        raise UserError(f"{repo} is gated on the Hugging Face Hub: accept its terms at https://huggingface.co/{repo} "
                        f"and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo}: no such repository on the Hugging Face Hub (if it is private, log in with "
                        f"`hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo} has no revision {artifact.revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # the Hub could not be asked
        raise unreachable(e.__cause__ or e) from None
    except EntryNotFoundError as e:
        raise UserError(f"{repo}: file not found on the Hub ({_first_line(e)})") from None
    except HfHubHTTPError as e:
        raise UserError(f"the Hugging Face Hub answered {_first_line(e)} for {repo}; try again later") from None
    except OSError as e:
        if e.errno in NO_SPACE:
            raise UserError(f"disk full while downloading {repo} into {constants.HF_HUB_CACHE}: free some space and "
                            f"run `triattn pull` again (finished files are kept)") from None
        if "Consistency check failed" in str(e):
            raise UserError(f"{repo}: a download ended early or was the wrong size; run `triattn pull` again "
                            f"(add --force if it keeps failing)") from None
        if _is_connection_error(e):
            raise unreachable(e) from None
        raise
    except Exception as e:
        if _is_connection_error(e):
            raise unreachable(e) from None
        raise


def _is_connection_error(e: BaseException) -> bool:
    """httpx (or httpx2) connection and timeout errors, without importing either by name."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "RemoteProtocolError"})


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n\n")[0].split())
    return text or type(e).__name__


def _repo_info(artifact: Artifact):
    from huggingface_hub import HfApi

    with _hub_errors(artifact):
        return HfApi().model_info(artifact.repo, revision=artifact.revision, files_metadata=True)


def _check_gated(artifact: Artifact, info) -> None:
    """A gated repo lists its files to anyone but serves them only to users who accepted its terms; say so early
    when the Hub reports the gate and no token is configured."""
    if not info.gated:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise UserError(f"{artifact.repo} is gated on the Hugging Face Hub: accept its terms at "
                        f"https://huggingface.co/{artifact.repo} and log in (`hf auth login` or HF_TOKEN)")


def select_files(artifact: Artifact, siblings) -> dict:
    """{repo path: sibling} of what the backend needs from the repo."""
    from fnmatch import fnmatch

    by_path = {s.rfilename: s for s in siblings}
    if artifact.file is not None or artifact.backend == "llamacpp":
        file = artifact.file or _pick_gguf(artifact, list(by_path))
        if file not in by_path:
            raise UserError(f"{artifact.repo} has no file {file} (GGUF files: "
                            f"{', '.join(p for p in by_path if p.endswith('.gguf')) or 'none'})")
        return {file: by_path[file]}
    chosen = {p: s for p, s in by_path.items() if "/" not in p and any(fnmatch(p, pat) for pat in MODEL_PATTERNS)}
    weights = [p for p in chosen if p.endswith(".safetensors") and p != "triattn_stats.safetensors"]
    if "config.json" not in chosen or not weights:
        others = sorted({Path(p).suffix for p in by_path if Path(p).suffix}) or ["none"]
        raise UserError(f"{artifact.repo} has no config.json and safetensors weights for the {artifact.backend} "
                        f"backend (file types there: {', '.join(others)})")
    return chosen


def _pick_gguf(artifact: Artifact, paths: list[str]) -> str:
    """For a raw GGUF repo: the file whose name holds the tag (default Q4_K_M)."""
    want = (artifact.quant or "Q4_K_M").lower()
    matches = [p for p in paths if p.endswith(".gguf") and want in p.lower()]
    if not matches:
        raise UserError(f"{artifact.repo} has no GGUF file matching {want!r}")
    return sorted(matches, key=len)[0]


def _fetch_config(artifact: Artifact, commit: str, files: dict) -> dict | None:
    """config.json (small, first) for the memory estimate."""
    if "config.json" not in files:
        return None
    from huggingface_hub import hf_hub_download

    with _hub_errors(artifact):
        path = hf_hub_download(artifact.repo, "config.json", revision=commit)
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise UserError(f"{artifact.repo}: config.json is not valid JSON") from None


def _print_estimate(console, config, weights: int, backend: str, budget: int, divide_length: int) -> bool | None:
    """Print the memory estimate; return whether it fits (None: unknown)."""
    from .memory import estimate, render

    est = estimate(config, weights, backend, budget, divide_length)
    console.print(render(est, budget))
    return est.fits()


def _snapshot_dir(artifact: Artifact, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=artifact.repo, repo_type="model")
    return storage / "snapshots" / commit


def _download(artifact: Artifact, commit: str, files: dict, force: bool, console) -> Path:
    """snapshot_download of exactly these files, with one rich progress bar over their bytes."""
    from huggingface_hub import constants, snapshot_download

    from .models import human_size

    snapshot = _snapshot_dir(artifact, commit)
    storage = snapshot.parent.parent
    todo = {p: s for p, s in files.items() if force or not (snapshot / p).exists()}
    total = sum(s.size or 0 for s in todo.values())
    if not todo:
        console.print(f"{artifact.repo}: all {len(files)} files already in {snapshot}")
        return snapshot
    storage.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(storage)
    free = shutil.disk_usage(storage).free
    if free < total:
        raise UserError(f"not enough disk space for {artifact.repo}: {human_size(total)} to download, "
                        f"{human_size(free)} free in {constants.HF_HUB_CACHE} (set HF_HOME to use another disk)")
    with _hub_errors(artifact), _progress(console, f"pulling {artifact.repo}", total, len(todo)) as tqdm_class:
        path = snapshot_download(artifact.repo, revision=commit, allow_patterns=list(todo), force_download=force,
                                 tqdm_class=tqdm_class)
    _write_ref(storage, artifact.revision, commit)
    return Path(path)


def _remove_stale_partials(storage: Path, max_age_s: float = 3600) -> None:
    """Partial files of a killed download are never reused (huggingface_hub 2.x writes each attempt to a new temporary
    name): remove those untouched for an hour, so interrupted pulls do not fill the disk."""
    import time

    for partial in (storage / "blobs").glob("*.incomplete"):
        try:
            if time.time() - partial.stat().st_mtime > max_age_s:
                partial.unlink()
        except OSError:
            pass


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """Record that `revision` (a branch) is at `commit`, as the Hub cache does, so that other tools find the model
    offline by its branch name too (we download by commit to check files against one consistent listing)."""
    if revision == commit:
        return
    ref = storage / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            write_atomic(ref, commit)
    except (OSError, UserError):
        pass


def _from_cache(artifact: Artifact, console) -> Path:
    """HF_HUB_OFFLINE: the model's snapshot from the Hugging Face cache, or a clear error."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [artifact.file] if artifact.file else MODEL_PATTERNS
    try:
        path = Path(snapshot_download(artifact.repo, revision=artifact.revision, allow_patterns=patterns,
                                      local_files_only=True))
    except LocalEntryNotFoundError:  # also IncompleteSnapshotError: a pull that never finished
        raise UserError(f"offline (HF_HUB_OFFLINE is set) and {artifact.repo} is not complete in the Hugging Face "
                        f"cache ({constants.HF_HUB_CACHE}): pull it once with the network on") from None
    console.print(f"offline: using {artifact.repo} from the Hugging Face cache ({path})")
    return path


def _weight_bytes(sizes: dict[str, int]) -> int:
    return sum(n for p, n in sizes.items() if p.endswith((".safetensors", ".gguf"))
               and not p.endswith("triattn_stats.safetensors"))


def _local_files(snapshot: Path, artifact: Artifact) -> dict[str, int]:
    """{path: bytes} of the snapshot files this artifact uses (other tools may have fetched more into it)."""
    from fnmatch import fnmatch

    if artifact.file:
        return {artifact.file: (snapshot / artifact.file).stat().st_size}
    return {p.name: p.stat().st_size for p in sorted(snapshot.iterdir())
            if p.is_file() and any(fnmatch(p.name, pat) for pat in MODEL_PATTERNS)}


# ---- progress ---------------------------------------------------------------------------------------------------


@contextmanager
def _progress(console, label: str, total_bytes: int, n_files: int):
    """Yield a tqdm stand-in class for huggingface_hub's `tqdm_class`: every bar it creates that counts bytes feeds one
    rich progress bar (the largest count wins, since the Hub may count the same bytes on two bars: network and disk),
    and the file-count bar feeds the file counter."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[files]}"), console=console)
    task = progress.add_task(label, total=total_bytes or None, files=f"0/{n_files} files")
    lock = threading.Lock()
    bars: list = []

    class HubBar:
        def __init__(self, *args, **kwargs):
            self.unit = kwargs.get("unit", "it")
            self.total = kwargs.get("total")
            self.n = kwargs.get("initial") or 0
            self.format_dict = {"rate": None}
            with lock:
                bars.append(self)

        def update(self, n=1):
            with lock:
                self.n += n or 0
                if self.unit == "B":
                    done = max(b.n for b in bars if b.unit == "B")
                    progress.update(task, completed=min(done, total_bytes) if total_bytes else done)
                else:
                    progress.update(task, files=f"{self.n}/{n_files} files")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def refresh(self, *args, **kwargs):
            pass

        def set_description(self, *args, **kwargs):
            pass

        set_description_str = set_postfix = set_postfix_str = set_description

    with progress:
        yield HubBar
        progress.update(task, completed=total_bytes, files=f"{n_files}/{n_files} files")


# ---- checks -----------------------------------------------------------------------------------------------------


def verify(snapshot: Path, files: dict, console) -> list[str]:
    """Repo paths whose local bytes do not match the Hub's listing: size, then sha256 for LFS files (what the Hub's
    ETag is) or the git blob hash for small files. Shows a progress bar over the bytes hashed."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    total = sum(s.size or 0 for s in files.values())
    bad = []
    with Progress(TextColumn("verifying"), BarColumn(), DownloadColumn(), console=console, transient=True) as bar:
        task = bar.add_task("verifying", total=total)
        for rel, s in sorted(files.items()):
            path = snapshot / rel
            if not path.is_file() or (s.size is not None and path.stat().st_size != s.size):
                bad.append(rel)
                continue
            lfs = getattr(s, "lfs", None)
            if lfs is not None:
                ok = _file_hash(path, hashlib.sha256(), lambda k: bar.advance(task, k)) == lfs.sha256
            elif s.blob_id:
                h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
                ok = _file_hash(path, h, lambda k: bar.advance(task, k)) == s.blob_id
            else:
                ok = True
            if not ok:
                bad.append(rel)
    return bad


def _file_hash(path: Path, h, advance) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            advance(len(chunk))
    return h.hexdigest()


def check_readable(snapshot: Path, names: list[str]) -> None:
    """Every safetensors file must have a parseable header and hold the bytes it promises (catches truncated or
    damaged files even offline, where there is no checksum to compare)."""
    for rel in names:
        if not rel.endswith(".safetensors"):
            continue
        path = snapshot / rel
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > 100_000_000:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                raise ValueError("file is shorter than its header says")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: damaged safetensors file ({e}): run `triattn pull --force` to fetch it "
                            f"again") from None


def _remove_cached_file(link: Path) -> None:
    """Remove a bad file from the Hub cache so it is fetched again: the snapshot link, and the blob it points to when
    that is in the repo's `blobs/` (named by its checksum, so every snapshot linking to it gets the good bytes
    back). A link to a file outside the cache is removed, never its target."""
    import os

    from .models import in_blobs

    snapshot = link.parent
    while snapshot.parent.name != "snapshots" and snapshot != snapshot.parent:
        snapshot = snapshot.parent
    try:
        if link.is_symlink():
            target = Path(os.path.realpath(link))
            link.unlink()
            if in_blobs(snapshot, target):
                target.unlink()
        elif (link.is_file() and not snapshot.is_symlink()
              and Path(os.path.realpath(link)).is_relative_to(os.path.realpath(snapshot))):
            link.unlink()
    except OSError as e:
        raise UserError(f"cannot remove the damaged {link} from the cache: {e.strerror or e}") from None


# ---- stats ------------------------------------------------------------------------------------------------------


def ensure_stats(model_dir: Path, repo: str | None, commit: str | None, backend: str, console,
                 calibration_tokens: int | None, fits: bool | None = None):
    """(stats path, where they came from): cached for this revision, published in the repo, or calibrated now on the
    shipped text with a progress bar. Skips calibration (returns None) when the model will not fit in memory here."""
    from .rope import ModelShape
    from .stats.format import QueryStats
    from .stats_cache import STATS_FILE_NAME, revision_stats_path, stats_target

    shape = ModelShape.from_model_dir(model_dir)
    target = revision_stats_path(repo, commit) if repo and commit else stats_target(model_dir)
    if target.is_file():
        try:
            QueryStats.load(target).check_matches(shape, where=f"stats {target}")
            return target, "cached for this revision"
        except UserError as e:
            console.print(f"[yellow]{e}: calibrating again[/yellow]")
    published = model_dir / STATS_FILE_NAME
    if published.is_file():
        try:
            QueryStats.load(published).check_matches(shape, where=f"published stats {published}")
            return published, "published with the model"
        except UserError as e:
            console.print(f"[yellow]{e}: calibrating instead[/yellow]")
    if fits is False:
        return None, "not made: the model does not fit in memory here (made on first run where it fits)"

    from .backends import load_engine
    from .calibration_text import default_calibration_text

    console.print(f"no published TriAttention stats: calibrating on this machine (once; cached in {target})")
    engine = load_engine(str(model_dir), backend=backend)
    engine.model_id = repo or str(model_dir)
    stats = engine.calibrate(default_calibration_text(), progress=True, max_tokens=calibration_tokens)
    if commit:
        stats = stats.with_meta(model_revision=commit)
    stats.save(target)
    return target, f"calibrated here on {stats.meta.calibration_tokens} tokens"


def ensure_gguf_stats(gguf: Path, console, calibration_tokens: int | None, fits: bool | None = None):
    """(stats path, where they came from) for a pulled GGUF file: cached for its revision (or beside it), else
    calibrated now through llama.cpp, so that `triattn run` finds them."""
    from .backends import load_engine
    from .stats.format import QueryStats
    from .stats_cache import find_stats, hub_snapshot, stats_target

    if fits is False:
        return None, "not made: the model does not fit in memory here (made on first run where it fits)"
    engine = load_engine(str(gguf), backend="llamacpp")
    model_dir = Path(engine.model_path)
    found = find_stats(model_dir)
    if found is not None:
        try:
            QueryStats.load(found).check_matches(engine.shape, where=f"stats {found}")
            return found, "cached for this revision"
        except UserError as e:
            console.print(f"[yellow]{e}: calibrating again[/yellow]")
    from .calibration_text import default_calibration_text

    target = stats_target(model_dir)
    console.print(f"no TriAttention stats: calibrating through llama.cpp on this machine (once; cached in {target})")
    stats = engine.calibrate(default_calibration_text(), progress=True, max_tokens=calibration_tokens)
    snapshot = hub_snapshot(model_dir)
    if snapshot is not None:
        stats = stats.with_meta(model_revision=snapshot[1])
    stats.save(target)
    return target, f"calibrated here on {stats.meta.calibration_tokens} tokens"
