"""What triattn promises about the files it writes (README "What it promises"): a temporary name beside the target
renamed over it, the target's mode kept, a symlinked target followed, unique backups, private files 0600, and a full
disk or read-only folder ending in one line with nothing partial."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fs_helpers import files_under, full_folder, read_only_folder
from triattn_local.errors import UserError
from triattn_local.serve.openclaw import merge

ENTRY = {"baseUrl": "http://127.0.0.1:8000/v1", "api": "openai-completions", "models": [{"id": "demo"}]}
OTHER = {"models": {"providers": {"other": {"apiKey": "sk-secret", "baseUrl": "http://other/v1"}}}}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_openclaw_config_is_created_private_and_keeps_its_mode(tmp_path):
    path = tmp_path / "new" / "openclaw.json"
    merge(path, "triattn", ENTRY)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(OTHER))
    keys.chmod(0o600)
    merge(keys, "triattn", ENTRY)
    assert mode(keys) == 0o600
    shared = tmp_path / "shared.json"
    shared.write_text("{}")
    shared.chmod(0o640)
    merge(shared, "triattn", ENTRY)
    assert mode(shared) == 0o640
    assert not list(tmp_path.rglob("*.tmp"))


def test_openclaw_backups_in_the_same_second_never_share_a_name(tmp_path):
    path = tmp_path / "openclaw.json"
    versions = [json.dumps({"version": i}) for i in range(3)]
    path.write_text(versions[0])
    merge(path, "a", ENTRY)  # both writes fall in the same second (or the next): each keeps its own backup
    first_merged = path.read_text()
    merge(path, "b", ENTRY)
    backups = sorted(tmp_path.glob("openclaw.json.bak-*"), key=lambda p: p.stat().st_mtime_ns)
    assert len(backups) == 2
    assert {b.read_text() for b in backups} == {versions[0], first_merged}


def test_openclaw_follows_a_symlinked_config(tmp_path):
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    real = dotfiles / "openclaw.json"
    real.write_text(json.dumps(OTHER))
    real.chmod(0o600)
    link = tmp_path / "openclaw.json"
    link.symlink_to(real)
    backup = merge(link, "triattn", ENTRY)
    assert link.is_symlink() and os.readlink(link) == str(real)
    config = json.loads(real.read_text())
    assert config["models"]["providers"]["triattn"] == ENTRY and "other" in config["models"]["providers"]
    assert mode(real) == 0o600 and json.loads(backup.read_text()) == OTHER


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity"])
def test_openclaw_refuses_numbers_json_cannot_write_back(tmp_path, number):
    path = tmp_path / "openclaw.json"
    text = '{"agents": {"limit": %s}}' % number
    path.write_text(text)
    with pytest.raises(UserError) as e:
        merge(path, "triattn", ENTRY)
    assert "\n" not in str(e.value)
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["openclaw.json"]


def test_openclaw_directory_at_the_path_is_one_line(tmp_path):
    path = tmp_path / "openclaw.json"
    path.mkdir()
    with pytest.raises(UserError, match="is a directory"):
        merge(path, "triattn", ENTRY)


def test_openclaw_on_a_full_disk_leaves_nothing_partial(tmp_path, monkeypatch):
    original = json.dumps(OTHER)
    with full_folder(tmp_path, monkeypatch, populate=lambda p: (p / "openclaw.json").write_text(original)) as full:
        before = files_under(full.path)
        with pytest.raises(UserError, match="cannot write") as e:
            merge(full.path / "openclaw.json", "triattn", ENTRY)
        assert "\n" not in str(e.value), full.kind
        assert files_under(full.path) == before, full.kind  # no .tmp, no partial backup, the config intact
        with pytest.raises(UserError, match="cannot write"):
            merge(full.path / "new.json", "triattn", ENTRY)
        assert files_under(full.path) == before, full.kind


def test_openclaw_in_a_read_only_folder_is_one_line(tmp_path):
    with read_only_folder(tmp_path, populate=lambda p: (p / "openclaw.json").write_text("{}")) as ro:
        with pytest.raises(UserError, match="cannot write"):
            merge(ro.path / "openclaw.json", "triattn", ENTRY)
        assert files_under(ro.path) == {"openclaw.json": b"{}"}


# ---- convert, calibrate and stats: outputs ------------------------------------------------------------------------

import sys  # noqa: E402

from triattn_local.registry import demo_model_dir  # noqa: E402

DEMO_STATS = demo_model_dir() / "triattn_stats.safetensors"


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The triattn command in this process (so a stand-in full disk applies), as (exit code, stderr)."""
    from triattn_local.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["triattn", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def one_line_error(code: int, err: str, *words: str) -> None:
    """Exit 2 and one line of error (after any progress bar), no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith(("error", "internal error")) for line in lines) == 1, err
    for w in words:
        assert w in err, err


@pytest.fixture
def failing_converter(tmp_path):
    """A llama.cpp tree whose converter writes half a file to --outfile and then fails, as on a crash."""
    tree = tmp_path / "llama.cpp"
    tree.mkdir()
    (tree / "convert_hf_to_gguf.py").write_text(
        "import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF partial')\nsys.exit('converter crashed')\n")
    return tree


def test_a_failed_convert_keeps_the_old_gguf_and_the_users_tmp(tmp_path, monkeypatch, capsys, failing_converter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.gguf").write_bytes(b"GGUF a good model")
    (out / "model.gguf.tmp").write_bytes(b"the user's own file")
    before = files_under(out)
    code, err = cli(monkeypatch, capsys, "convert", "demo", "--to", "gguf", "-o", out, "--converter", failing_converter)
    one_line_error(code, err, "converter failed", "converter crashed")
    assert files_under(out) == before


def test_convert_to_a_folder_where_the_gguf_goes_leaves_nothing(tmp_path, monkeypatch, capsys, failing_converter):
    out = tmp_path / "out"
    (out / "model.gguf").mkdir(parents=True)
    code, err = cli(monkeypatch, capsys, "convert", "demo", "--to", "gguf", "-o", out, "--converter", failing_converter)
    one_line_error(code, err, "directory")
    assert [p.name for p in out.iterdir()] == ["model.gguf"] and not any((out / "model.gguf").iterdir())
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    code, err = cli(monkeypatch, capsys, "convert", "demo", "--to", "gguf", "-o", file_out, "--converter",
                    failing_converter)
    one_line_error(code, err)
    assert file_out.read_text() == "x"


def test_sdist_names_that_leave_the_folder_are_refused():
    from triattn_local.convert import _inside

    assert _inside("gguf-py/gguf/__init__.py") and _inside("convert_hf_to_gguf.py")
    for bad in ("gguf-py/../../../etc/passwd", "/etc/passwd", "conversion/..", "gguf-py\\..\\..\\x", ""):
        assert not _inside(bad), bad


def test_stats_writes_on_a_read_only_folder_are_one_line(tmp_path, monkeypatch, capsys):
    exported = tmp_path / "ref.pt"
    assert cli(monkeypatch, capsys, "stats", "export", DEMO_STATS, "-o", exported)[0] == 0
    with read_only_folder(tmp_path, populate=lambda p: (p / "stats.safetensors").write_bytes(b"old")) as ro:
        target = ro.path / "stats.safetensors"
        for args in (["calibrate", "demo", "-o", target, "--max-tokens", "32"],
                     ["stats", "import", exported, "--model", demo_model_dir(), "-o", target],
                     ["stats", "export", DEMO_STATS, "-o", ro.path / "ref.pt"]):
            code, err = cli(monkeypatch, capsys, *args)
            one_line_error(code, err, "cannot write", str(ro.path))
            assert "calibrat" not in err.lower() or args[0] != "calibrate"
        assert files_under(ro.path) == {"stats.safetensors": b"old"}, ro.kind


def test_stats_writes_on_a_full_disk_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    exported = tmp_path / "ref.pt"
    assert cli(monkeypatch, capsys, "stats", "export", DEMO_STATS, "-o", exported)[0] == 0
    with full_folder(tmp_path, monkeypatch, size_kib=64,
                     populate=lambda p: (p / "stats.safetensors").write_bytes(b"old")) as full:
        target = full.path / "stats.safetensors"
        for args in (["calibrate", "demo", "-o", target, "--max-tokens", "32"],
                     ["stats", "import", exported, "--model", demo_model_dir(), "-o", target],
                     ["stats", "export", DEMO_STATS, "-o", full.path / "ref.pt"]):
            code, err = cli(monkeypatch, capsys, *args)
            one_line_error(code, err, "cannot write")
            assert files_under(full.path) == {"stats.safetensors": b"old"}, (full.kind, args)


def test_stats_keep_the_targets_mode_and_symlink(tmp_path, monkeypatch, capsys):
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert cli(monkeypatch, capsys, "stats", "export", DEMO_STATS, "-o", tmp_path / "ref.pt")[0] == 0
    code, err = cli(monkeypatch, capsys, "stats", "import", tmp_path / "ref.pt", "--model", demo_model_dir(),
                    "-o", link)
    assert code == 0, err
    assert link.is_symlink() and mode(real) == 0o640 and real.read_bytes()[:8] != b"old"
