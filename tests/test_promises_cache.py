"""`triattn rm` and `pull` delete only what triattn created (README "What it promises"): never a link target outside
the repo's blobs/, never a file another tool downloaded or another snapshot links to; files first, record last."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fs_helpers import writable_then_read_only
from test_pull import TINY, Env, hub, published_stats, tiny_files  # noqa: F401 (fixtures)
from triattn_local.models import _delete_snapshot_files


@pytest.fixture
def env(tmp_path, monkeypatch, capsys, hub):  # noqa: F811
    return Env(tmp_path, monkeypatch, capsys, hub)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hand_made_entry(env, user_dir: Path, files: dict[str, bytes]) -> Path:
    """models--org--x/snapshots/<sha>/<file> -> ~/usermodel/<file>, with refs/main: the cache entry a user makes
    by hand for a model they keep in their own folder."""
    user_dir.mkdir()
    for name, data in files.items():
        (user_dir / name).write_bytes(data)
    repo_dir = env.hf_cache / f"models--{TINY.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / env.hub.repos[TINY].sha
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).symlink_to(user_dir / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(env.hub.repos[TINY].sha)
    return snapshot


def test_rm_of_a_hand_made_entry_leaves_the_users_folder_alone(env, tmp_path, monkeypatch):
    from huggingface_hub import constants

    user_dir = tmp_path / "usermodel"
    hand_made_entry(env, user_dir, env.hub.repos[TINY].files)
    before = contents(user_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = env.cli("pull", "tiny")
    assert r.code == 0, r.err
    assert json.loads(env.record().read_text())["created"] == []
    r = env.cli("rm", "tiny")
    assert r.code == 0 and "removed tiny:f32" in r.err and "files kept" in r.err, r.err
    assert contents(user_dir) == before and not env.record().exists()


def test_pull_never_deletes_a_link_target_that_fails_its_checksum(env, tmp_path):
    user_dir = tmp_path / "usermodel"
    files = dict(env.hub.repos[TINY].files)
    files["config.json"] = files["config.json"].replace(b"{", b'{"edited": true, ', 1)  # the user's own edit
    snapshot = hand_made_entry(env, user_dir, files)
    before = contents(user_dir)
    r = env.cli("pull", "tiny")
    assert r.code == 0 and "config.json: corrupt (checksum mismatch): downloading again" in r.err, r.err
    assert contents(user_dir) == before  # the user's file is untouched; the cache got the Hub's bytes
    assert (snapshot / "config.json").read_bytes() == env.hub.repos[TINY].files["config.json"]
    assert env.cli("rm", "tiny").code == 0
    assert contents(user_dir) == before


def test_rm_follows_no_link_out_of_the_blobs_folder(tmp_path):
    """Even for files triattn noted as its own, a link whose target is not in the repo's blobs/ keeps its target."""
    user_dir = tmp_path / "usermodel"
    user_dir.mkdir()
    (user_dir / "model.safetensors").write_bytes(b"weights")
    snapshot = tmp_path / "hub" / "models--org--x" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(user_dir / "model.safetensors")
    (snapshot / "sub").symlink_to(user_dir, target_is_directory=True)  # a linked folder: its files are not ours
    freed, notes = _delete_snapshot_files(snapshot, ["model.safetensors", "sub", "sub/model.safetensors"])
    assert freed == 0 and contents(user_dir) == {"model.safetensors": b"weights"}
    assert any("outside" in n for n in notes) and not snapshot.exists()


def test_rm_keeps_what_another_tool_downloaded(env):
    from huggingface_hub import snapshot_download

    snapshot_download(TINY)  # another tool, earlier: the whole repo
    snapshot = env.snapshot(TINY)
    before = contents(snapshot)
    r = env.cli("pull", "tiny")
    assert r.code == 0 and "already in" in r.err, r.err
    r = env.cli("rm", "tiny")
    assert r.code == 0 and "freed 0 B" in r.err and "files kept" in r.err, r.err
    assert contents(snapshot) == before
    assert Path(snapshot_download(TINY, local_files_only=True)) == snapshot  # the other tool still loads it


def test_rm_keeps_a_snapshot_another_tool_added_files_to(env):
    from huggingface_hub import snapshot_download

    env.hub.repos[TINY].files["README.md"] = b"# tiny\n"  # triattn does not fetch it, the other tool does
    env.hub.add_repo(TINY, env.hub.repos[TINY].files)
    assert env.cli("pull", "tiny").code == 0
    snapshot_download(TINY)  # another tool, later
    before = contents(env.snapshot(TINY))
    r = env.cli("rm", "tiny")
    assert r.code == 0 and "README.md, which triattn did not download" in r.err, r.err
    assert contents(env.snapshot(TINY)) == before


def test_rm_keeps_blobs_another_snapshot_links_to(env):
    assert env.cli("pull", "tiny").code == 0
    snapshot = env.snapshot(TINY)
    other = snapshot.parent / ("0" * 40)  # another commit (of another tool) that shares the weights' blob
    other.mkdir()
    (other / "model.safetensors").symlink_to(os.readlink(snapshot / "model.safetensors"))
    weights = (other / "model.safetensors").read_bytes()
    r = env.cli("rm", "tiny")
    assert r.code == 0 and "1 blob(s) kept, linked from another snapshot" in r.err, r.err
    assert not snapshot.exists() and (other / "model.safetensors").read_bytes() == weights


def test_rm_on_a_read_only_cache_leaves_record_and_files_consistent(env):
    with writable_then_read_only(env.hf_cache) as read_only:
        assert env.cli("pull", "tiny").code == 0
        before = contents(env.snapshot(TINY))
        kind = read_only()
        r = env.cli("rm", "tiny")
        assert r.code == 2 and r.err.count("\n") == 1 and "read-only" in r.err and "nothing was removed" in r.err, (
            kind, r.err)
        assert env.record().exists() and "tiny:f32" in env.cli("list").out
        assert contents(env.snapshot(TINY)) == before
        read_only(False)
        r = env.cli("rm", "tiny")
        assert r.code == 0 and "freed 2.7 MB" in r.err, r.err
        assert not env.record().exists() and not env.snapshot(TINY).exists()


def test_killed_pull_finished_later_still_knows_its_files(env):
    """The files a pull downloads are noted before it starts: finished by a second pull, rm still frees them."""
    assert env.cli("pull", "tiny").code == 0
    record = json.loads(env.record().read_text())
    assert sorted(record["created"]) == sorted(env.hub.repos[TINY].files)
    env.record().unlink()  # as if killed before the record was written; the note of its downloads stays
    from triattn_local.models import note_downloading

    note_downloading("tiny:f32", "torch", env.snapshot(TINY), record["created"])
    assert env.cli("pull", "tiny").code == 0
    r = env.cli("rm", "tiny")
    assert r.code == 0 and "freed 2.7 MB" in r.err, r.err


@pytest.mark.parametrize("command", ["rm", "show", "pull", "run"])
@pytest.mark.parametrize("name", ["y" * 300, "org/" + "y" * 300, "org/" + "y" * 97])
def test_names_too_long_for_a_file_are_one_line(env, command, name):
    r = env.cli(command, name)
    assert r.code == 2 and r.err.count("\n") == 1 and r.err.startswith("error: unknown model"), r.err
