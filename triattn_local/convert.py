"""`triattn convert MODEL --to gguf`: a Hugging Face model directory → a GGUF directory for the llamacpp backend.

It runs llama.cpp's own converter (convert_hf_to_gguf.py with the gguf-py of the same llama.cpp), then fixes what the
converter leaves wrong for tokenizers like the demo's (SentencePiece, chat tokens only in tokenizer.json): added
tokens (<|im_start|>, <|im_end|>, <think> …) typed NORMAL, which llama.cpp then neither reads as one token in a prompt
nor renders as special, are re-typed as tokenizer.json says (CONTROL if special, else USER_DEFINED); and a missing
add_space_prefix, which llama.cpp takes as true for SentencePiece (a space before every prompt), is written as the
tokenizer.model says. The stats next to the model are copied along: the backend hands keys to the scorer in the HF
pair layout, so the same stats apply.

The converter comes from --converter DIR (a llama.cpp checkout), else $TRIATTN_LLAMA_CPP, else the source
distribution of the installed llama-cpp-python (its vendor/llama.cpp, so converter and runtime agree), fetched once
with `pip download` and kept in triattn's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError
from .files import atomic_path, check_writable
from .registry import resolve_model
from .stats_cache import STATS_FILE_NAME

OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
GGUF_NAME = "model.gguf"
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # gguf.TokenType
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # what the converter needs from a llama.cpp tree


def convert_to_gguf(model: str, output: str | None = None, outtype: str = "auto", converter: str | None = None,
                    quiet: bool = False) -> Path:
    """Convert a model directory (or alias) and return the output directory (model.gguf + the stats)."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r} (choose {', '.join(OUTTYPES)})")
    src = resolve_model(model)
    if not (src / "config.json").is_file():
        raise UserError(f"{model}: not a Hugging Face model directory (no config.json)")
    name = "demo" if model == "demo" else src.name
    out = Path(output).expanduser() if output else Path.cwd() / f"{name}-gguf"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{out}: is a file; -o names the output folder") from None
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    target = out / GGUF_NAME
    check_writable(target)
    tree = find_converter(converter, quiet=quiet)
    paths = [str(tree / "gguf-py")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))  # the converter's own gguf-py comes first
    # the converter writes to a fresh temporary name beside the target: a failure leaves an old model.gguf as it was
    with atomic_path(target) as tmp:
        cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(src), "--outfile", str(tmp),
               "--outtype", outtype]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            tail = "; ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise UserError(f"llama.cpp's converter failed on {src}: {tail}")
        fixed = fix_tokenizer(tmp, src, tree)
    if (src / STATS_FILE_NAME).is_file():
        with atomic_path(out / STATS_FILE_NAME) as stats_tmp:
            shutil.copyfile(src / STATS_FILE_NAME, stats_tmp)
    if not quiet:
        note = f"; tokenizer fixed: {', '.join(fixed)}" if fixed else ""
        print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB, {outtype}{note})", file=sys.stderr)
    return out


def added_token_types(model_dir: Path) -> dict[str, int]:
    """Added tokens of a HF tokenizer → the GGUF token type they need (CONTROL if special, else USER_DEFINED)."""
    types: dict[str, int] = {}
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        for t in json.loads(tok_json.read_text()).get("added_tokens", []):
            types[t["content"]] = CONTROL if t.get("special") else USER_DEFINED
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        for t in json.loads(cfg.read_text()).get("added_tokens_decoder", {}).values():
            types.setdefault(t["content"], CONTROL if t.get("special") else USER_DEFINED)
    return types


def fix_tokenizer(gguf_path: Path, model_dir: Path, tree: Path) -> list[str]:
    """Rewrite the GGUF's tokenizer metadata where it disagrees with the HF tokenizer: added tokens left NORMAL get
    the type tokenizer.json gives them, and a SentencePiece vocabulary without a dummy prefix gets
    add_space_prefix = false (llama.cpp's default would prepend a space to every prompt). Returns what changed."""
    gguf = _import_gguf(tree)
    reader = gguf.GGUFReader(str(gguf_path))
    fields = reader.fields
    changes: dict[str, tuple] = {}  # key → (value, value type, array element type)
    notes: list[str] = []
    wanted = added_token_types(model_dir)
    tokens, types = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.token_type")
    if wanted and tokens is not None and types is not None:
        texts, values = tokens.contents(), [int(t) for t in types.contents()]
        for i, text in enumerate(texts):
            if text in wanted and values[i] == NORMAL:
                values[i] = wanted[text]
                notes.append(text)
        if notes:
            changes["tokenizer.ggml.token_type"] = (values, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    model_field = fields.get("tokenizer.ggml.model")
    is_spm = model_field is not None and model_field.contents() == "llama"
    if is_spm and "tokenizer.ggml.add_space_prefix" not in fields and not _spm_dummy_prefix(model_dir):
        changes["tokenizer.ggml.add_space_prefix"] = (False, gguf.GGUFValueType.BOOL, None)
        notes.append("add_space_prefix=false")
    if changes:
        _rewrite(gguf, reader, gguf_path, changes)
    return notes


def _spm_dummy_prefix(model_dir: Path) -> bool:
    """Whether the SentencePiece model prepends "▁" to a text (its add_dummy_prefix, seen in what it makes of "a";
    true, llama.cpp's default, when there is no tokenizer.model or sentencepiece cannot read it)."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return True
    try:
        import sentencepiece

        pieces = sentencepiece.SentencePieceProcessor(model_file=str(path)).encode("a", out_type=str)
        return bool(pieces) and pieces[0].startswith("\u2581")
    except Exception:  # noqa: BLE001 - unreadable: keep llama.cpp's default
        return True


def _rewrite(gguf, reader, path: Path, changes: dict[str, tuple]) -> None:
    """Copy the GGUF with some key/values replaced or added (GGUF has no in-place resize), then swap it in."""
    with atomic_path(path) as tmp:
        _copy_with_changes(gguf, reader, tmp, changes)


def _copy_with_changes(gguf, reader, tmp: Path, changes: dict[str, tuple]) -> None:
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value, vtype, sub_type = changes.pop(field.name, (field.contents(), vtype, sub_type))
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    for key, (value, vtype, sub_type) in changes.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def _import_gguf(tree: Path):
    """gguf-py of the converter's llama.cpp (the version the GGUF was written with)."""
    path = str(tree / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


def find_converter(converter: str | None = None, quiet: bool = False) -> Path:
    """A directory with convert_hf_to_gguf.py, conversion/ and gguf-py/ (see the module docstring for the order)."""
    for given in (converter, os.environ.get("TRIATTN_LLAMA_CPP")):
        if given:
            for tree in (Path(given), Path(given) / "vendor" / "llama.cpp"):
                if (tree / "convert_hf_to_gguf.py").is_file():
                    return tree
            raise UserError(f"{given}: no convert_hf_to_gguf.py there (give a llama.cpp checkout)")
    try:
        from importlib.metadata import PackageNotFoundError, version

        ver = version("llama-cpp-python")
    except PackageNotFoundError:
        raise UserError("converting needs llama-cpp-python installed (pip install 'triattn-local[llamacpp]') or "
                        "--converter pointing at a llama.cpp checkout") from None
    from .stats_cache import cache_dir

    tree = cache_dir().parent / f"llama.cpp-{ver}"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        _fetch_converter(ver, tree, quiet)
    return tree


def _inside(name: str) -> bool:
    """A relative archive name that stays inside the folder it is extracted to (no `..`, not absolute)."""
    return bool(name) and not name.startswith(("/", "\\")) and ".." not in name.replace("\\", "/").split("/")


def _fetch_converter(version: str, tree: Path, quiet: bool) -> None:
    """Download llama-cpp-python's sdist with pip and keep only the converter's files from its vendor/llama.cpp."""
    if not quiet:
        print(f"fetching llama.cpp's converter (llama-cpp-python {version} source, once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise UserError(f"could not download llama-cpp-python {version}'s source for its converter "
                            f"({(r.stderr or '').strip().splitlines()[-1:] or 'no archive'}); use --converter DIR")
        staging = Path(tmp) / "tree"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 3)  # <sdist>/vendor/llama.cpp/<rest>
                if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and member.isfile() \
                        and any(parts[3] == k or parts[3].startswith(k) for k in _KEEP) and _inside(parts[3]):
                    member.name = parts[3]
                    try:
                        tar.extract(member, staging, filter="data")
                    except TypeError:  # Python without extraction filters: _inside checked the name
                        tar.extract(member, staging)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"llama-cpp-python {version}'s source has no vendor/llama.cpp/convert_hf_to_gguf.py")
        tree.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tree, ignore_errors=True)
        shutil.move(str(staging), str(tree))
