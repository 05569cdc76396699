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
