"""The model registry: names, tags, raw repos and paths, what each backend pulls, and how run finds pulled models."""

import json
import re
from pathlib import Path

import pytest

from triattn_local.errors import UserError
from triattn_local.registry import artifact_for, demo_model_dir, known_models, resolve_model

REQUIRED = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "qwen3-32b-int4",
            "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b", "demo"]
BACKENDS = ("torch", "mlx", "llamacpp")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIATTN_CACHE", str(tmp_path / "triattn"))
    monkeypatch.delenv("TRIATTN_REGISTRY", raising=False)


@pytest.mark.parametrize("name", REQUIRED[:-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_required_name_has_a_build_for_every_backend(name, backend):
    a = artifact_for(name, backend)
    assert re.fullmatch(r"[A-Za-z0-9-]+/[A-Za-z0-9._-]+", a.repo), a.repo
    assert a.backend == backend and a.quant
    if backend == "llamacpp":
        assert a.file.endswith(".gguf") and "Q4_K_M" in a.file and "GGUF" in a.repo
    else:
        assert a.file is None
    if backend == "mlx":
        assert a.repo.startswith("mlx-community/") and a.repo.endswith("-4bit")


def test_issue_examples():
    assert artifact_for("qwen3-32b-int4", "torch").repo == "Qwen/Qwen3-32B-AWQ"
    assert artifact_for("qwen3-32b-int4", "mlx").repo == "mlx-community/Qwen3-32B-4bit"
    gguf = artifact_for("qwen3-8b:q4", "llamacpp")
    assert (gguf.repo, gguf.file) == ("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf")
    full = artifact_for("qwen3-8b", "torch")
    assert (full.name, full.repo) == ("qwen3-8b:bf16", "Qwen/Qwen3-8B")
    assert artifact_for("qwen3-8b:q4", "torch").repo == "Qwen/Qwen3-8B-AWQ"
    assert artifact_for("qwen3-32b-int4", "torch").name == artifact_for("qwen3-32b:q4", "torch").name
    assert artifact_for("deepseek-r1-distill-llama-8b", "torch").repo == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert artifact_for("demo", "torch").builtin == demo_model_dir()


def test_tags_raw_repos_and_unknown_names():
    with pytest.raises(UserError, match="no tag 'q3'.*bf16, q4"):
        artifact_for("qwen3-8b:q3", "torch")
    with pytest.raises(UserError, match="qwen3-0.6b:q4 has no build for the torch backend"):
        artifact_for("qwen3-0.6b:q4", "torch")
    raw = artifact_for("someone/some-model", "torch")
    assert (raw.name, raw.repo, raw.file) == ("someone/some-model", "someone/some-model", None)
    assert artifact_for("someone/some-GGUF:Q8_0", "llamacpp").quant == "Q8_0"
    with pytest.raises(UserError, match="takes no tag"):
        artifact_for("someone/some-model:q4", "torch")
    with pytest.raises(UserError, match="unknown model 'qwen3-9b': did you mean qwen3-8b"):
        artifact_for("qwen3-9b", "torch")


def test_list_available_names_every_build():
    rows = known_models()
    assert ("qwen3-8b:q4", "torch", "Qwen/Qwen3-8B-AWQ (AWQ int4)") in rows
    assert ("qwen3-8b", "llamacpp", "Qwen/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf (Q4_K_M)") in rows
    assert {r[0] for r in rows} >= set(REQUIRED)


def test_resolve_model_paths_demo_and_unpulled_names(tmp_path):
    assert resolve_model("demo") == demo_model_dir()
    assert resolve_model(str(tmp_path)) == tmp_path
    missing = tmp_path / "missing"
    assert resolve_model(str(missing)) == missing  # the engine then says "no such model directory"
    with pytest.raises(UserError, match=r"qwen3-8b is not pulled yet: run `triattn pull qwen3-8b`"):
        resolve_model("qwen3-8b")
    with pytest.raises(UserError, match=r"Qwen/Qwen3-8B is not pulled yet"):
        resolve_model("Qwen/Qwen3-8B")


def test_pulled_names_resolve_to_their_snapshot_per_backend(tmp_path):
    from triattn_local.models import PulledModel, record_path, save_record

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-8B-AWQ" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    save_record(PulledModel(name="qwen3-8b:q4", backend="torch", repo="Qwen/Qwen3-8B-AWQ", commit="a" * 40,
                            path=str(snapshot), files={"config.json": 10}))
    assert resolve_model("qwen3-8b:q4", backend="torch") == snapshot
    with pytest.raises(UserError, match="not pulled"):  # the mlx build is another artifact
        resolve_model("qwen3-8b:q4", backend="mlx")
    with pytest.raises(UserError, match="not pulled"):  # the default torch build is bf16, not q4
        resolve_model("qwen3-8b", backend="torch")
    snapshot.rmdir()
    with pytest.raises(UserError, match="files are gone"):
        resolve_model("qwen3-8b:q4", backend="torch")
    assert record_path("qwen3-8b:q4", "torch").is_file()


def test_load_engine_refuses_an_unpulled_name_before_loading_anything():
    from triattn_local.backends import load_engine

    with pytest.raises(UserError, match="triattn pull qwen3-4b"):
        load_engine("qwen3-4b", backend="torch")


def test_extra_registry_file(tmp_path, monkeypatch):
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps({"models": {"mini": {"default": {"torch": "x"},
                                                     "tags": {"x": {"torch": {"repo": "me/mini"}}}}},
                                 "aliases": {"m": "mini:x"}}))
    monkeypatch.setenv("TRIATTN_REGISTRY", str(extra))
    assert artifact_for("m", "torch").repo == "me/mini"
    assert artifact_for("qwen3-8b", "torch").repo == "Qwen/Qwen3-8B"  # merged, not replaced
    extra.write_text("{not json")
    with pytest.raises(UserError, match="TRIATTN_REGISTRY"):
        artifact_for("m", "torch")


def test_registry_file_ships_with_the_package():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/*.json"' in pyproject


def test_hub_snapshot_stats_are_keyed_by_repo_and_commit(tmp_path):
    from triattn_local.stats_cache import STATS_FILE_NAME, find_stats, hub_snapshot, revision_stats_path

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--name" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert hub_snapshot(snap) == ("org/name", commit)
    assert hub_snapshot(tmp_path) is None
    assert find_stats(snap) is None
    (snap / STATS_FILE_NAME).write_bytes(b"published")
    assert find_stats(snap) == snap / STATS_FILE_NAME
    cached = revision_stats_path("org/name", commit)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"calibrated")
    assert find_stats(snap) == cached  # made by pull only when the published ones do not fit
    other_place = tmp_path / "elsewhere" / "models--org--name" / "snapshots" / commit
    other_place.mkdir(parents=True)
    assert find_stats(other_place) == cached  # same revision, another path or machine
