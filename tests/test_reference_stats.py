"""Reference TriAttention .pt stats: import against a config.json, save/load in our format, export back identically.

The four real reference files live in ../shared/reference-stats/ (never copied into the project); the tests that
need them skip when it is absent (fixture reference_stats_dir).
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from triattn_local.errors import UserError
from triattn_local.stats.format import QueryStats

torch = pytest.importorskip("torch", reason="reference .pt stats need torch (the [torch] extra)")

from triattn_local.stats.reference import export_reference, import_reference, render_stats  # noqa: E402

CONFIGS = {
    "qwen3_8b.pt": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
    },
    "ds_qwen7b.pt": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rope_theta": 10000.0,
        "max_position_embeddings": 131072,
    },
    "ds_llama8b.pt": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "max_position_embeddings": 131072,
    },
    "gpt_oss_120b_stats.pt": {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "num_hidden_layers": 36,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 150000,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "max_position_embeddings": 131072,
    },
}
MODEL_IDS = {
    "qwen3_8b.pt": "Qwen/Qwen3-8B",
    "ds_qwen7b.pt": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "ds_llama8b.pt": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "gpt_oss_120b_stats.pt": "openai/gpt-oss-120b",
}


def model_dir(tmp_path, config: dict, name: str = "model"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def load_pt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def archive_name(path) -> str:
    """The folder name inside a torch zip file: torch.save takes it from the file stem at save time."""
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/")[0]


@pytest.mark.parametrize("file", sorted(CONFIGS))
def test_import_save_load_export_round_trip(file, reference_stats_dir, tmp_path):
    original_path = reference_stats_dir / file
    stats = import_reference(original_path, model_dir(tmp_path, CONFIGS[file]))
    cfg = CONFIGS[file]
    m = stats.meta
    assert (m.num_layers, m.num_heads, m.num_kv_heads) == (
        cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    )
    assert m.model_id == MODEL_IDS[file] and m.source == f"reference import: {file}"
    assert m.architecture == cfg["architectures"][0] and m.rope_pairing == "half"

    ours = tmp_path / "stats.safetensors"
    stats.save(ours)
    back = QueryStats.load(ours)
    assert back.meta == stats.meta
    # Exported under the name torch gave the archive inside the original: the same bytes come back.
    out = tmp_path / "out" / f"{archive_name(original_path)}.pt"
    export_reference(back, out)

    original, exported = load_pt(original_path), load_pt(out)
    assert exported["metadata"] == original["metadata"]
    assert list(exported["metadata"]) == list(original["metadata"])
    assert list(exported["stats"]) == list(original["stats"])
    for key, entry in original["stats"].items():
        assert list(exported["stats"][key]) == list(entry)
        for name, tensor in entry.items():
            assert exported["stats"][key][name].dtype == torch.float32
            assert torch.equal(exported["stats"][key][name], tensor), (key, name)
    assert out.read_bytes() == original_path.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind


def test_import_values_and_model_id(reference_stats_dir, tmp_path):
    path = reference_stats_dir / "ds_qwen7b.pt"
    stats = import_reference(path, model_dir(tmp_path, CONFIGS["ds_qwen7b.pt"]), model_id="my/model")
    entry = load_pt(path)["stats"]["layer27_head05"]
    assert stats.meta.model_id == "my/model"
    assert np.array_equal(stats.q_mean_real[27, 5], entry["q_mean_real"].numpy())
    assert np.array_equal(stats.q_abs_mean[27, 5], entry["q_abs_mean"].numpy())
    assert stats.freq_scale.tolist() == [1.0] * 64 and stats.inv_freq[0] == 1.0


def test_gpt_oss_yarn_frequencies(reference_stats_dir, tmp_path):
    stats = import_reference(reference_stats_dir / "gpt_oss_120b_stats.pt", model_dir(tmp_path, CONFIGS["gpt_oss_120b_stats.pt"]))
    assert stats.meta.rope_type == "yarn"
    assert stats.freq_scale[0] == pytest.approx(0.1 * np.log(32.0) + 1.0)  # yarn attention factor
    assert stats.inv_freq[-1] == pytest.approx(150000 ** (-62 / 64) / 32.0)  # lowest frequency interpolated


@pytest.mark.parametrize(
    "file, config, words",
    [
        ("qwen3_8b.pt", "ds_qwen7b.pt", "the number of layers is 36 in the stats, 28 in the model"),
        ("ds_qwen7b.pt", "gpt_oss_120b_stats.pt", "head_dim is 128 in the stats, 64 in the model"),
        ("ds_llama8b.pt", "qwen3_8b.pt", "the number of layers is 32 in the stats, 36 in the model"),
        ("gpt_oss_120b_stats.pt", "qwen3_8b.pt", "head_dim is 64 in the stats, 128 in the model"),
    ],
)
def test_mismatched_model_refused(file, config, words, reference_stats_dir, tmp_path):
    with pytest.raises(UserError) as e:
        import_reference(reference_stats_dir / file, model_dir(tmp_path, CONFIGS[config]))
    assert str(e.value) == f"{file} does not match the model: {words}"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_attention_heads": 32, "head_dim": 64}, "the number of query heads is 64 in the stats, 32 in the model"),
        ({"num_key_value_heads": 4}, "the number of kv heads is 8 in the stats, 4 in the model"),
        ({"rope_theta": 10000.0}, "rope_theta is 150000 in the stats, 10000 in the model"),
        ({"rope_scaling": dict(CONFIGS["gpt_oss_120b_stats.pt"]["rope_scaling"], factor=16.0)},
         "rope_scaling.factor is 32.0 in the stats, 16.0 in the model"),
        ({"rope_scaling": None}, "rope_type is yarn in the stats, default in the model"),
    ],
)
def test_gpt_oss_metadata_checked(change, words, reference_stats_dir, tmp_path):
    config = dict(CONFIGS["gpt_oss_120b_stats.pt"], **change)
    with pytest.raises(UserError, match=words):
        import_reference(reference_stats_dir / "gpt_oss_120b_stats.pt", model_dir(tmp_path, config))


def test_qwen2_heads_refused_without_metadata(reference_stats_dir, tmp_path):
    """Files without num_attention_heads are checked by the heads their stats cover."""
    config = dict(CONFIGS["ds_qwen7b.pt"], num_attention_heads=32, head_dim=128)
    with pytest.raises(UserError, match="the number of query heads is 28 in the stats, 32 in the model"):
        import_reference(reference_stats_dir / "ds_qwen7b.pt", model_dir(tmp_path, config))


def test_qwen3_8b_concentration(reference_stats_dir, tmp_path):
    """The figure the issue quotes: Qwen3-8B's per-head query concentration has a median near 0.85."""
    stats = import_reference(reference_stats_dir / "qwen3_8b.pt", model_dir(tmp_path, CONFIGS["qwen3_8b.pt"]))
    conc = stats.concentration()
    assert conc.shape == (36, 32)
    assert 0.75 <= float(np.median(conc)) <= 0.95
    assert (conc > 0).all() and (conc <= 1 + 1e-6).all()


def test_stats_show_summary(reference_stats_dir, tmp_path):
    from rich.console import Console

    stats = import_reference(reference_stats_dir / "qwen3_8b.pt", model_dir(tmp_path, CONFIGS["qwen3_8b.pt"]))
    console = Console(record=True, width=120, color_system=None)
    render_stats(stats, console)
    text = console.export_text()
    median = np.median(stats.concentration())
    for words in ("Qwen/Qwen3-8B", "Qwen3ForCausalLM", "36 layers, 32 heads, 8 kv heads, head_dim 128",
                  "theta 1e+06", "reference import: qwen3_8b.pt", f"median {median:.3f}", "L 30-35"):
        assert words in text, words


# --- refusals that need no reference file -----------------------------------------------------------------------

SMALL = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
}


def small_reference(layers=2, heads=4, head_dim=16, **metadata) -> dict:
    rng = np.random.default_rng(0)
    md = {"rope_style": "half", "head_dim": head_dim, "model_name": "t/small",
          "sampled_heads": [[layer, h] for layer in range(layers) for h in range(heads)], **metadata}
    stats = {
        f"layer{layer:02d}_head{h:02d}": {
            n: torch.from_numpy(rng.random(head_dim // 2, dtype=np.float32)) for n in ("q_mean_real", "q_mean_imag", "q_abs_mean")
        }
        for layer in range(layers)
        for h in range(heads)
    }
    return {"metadata": md, "stats": stats}


def test_synthesized_export_imports_back(tmp_path):
    from test_stats_format import make_stats

    config = dict(SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0})
    stats = make_stats(config)
    out = tmp_path / "ours.pt"
    export_reference(stats, out)
    md = load_pt(out)["metadata"]
    assert md["sampled_heads"][:3] == [[0, 0], [0, 1], [0, 2]] and len(md["sampled_heads"]) == 8
    assert (md["num_layers"], md["num_attention_heads"], md["num_kv_heads"], md["head_dim"]) == (2, 4, 2, 16)
    assert md["rope_scaling"] == {"factor": 2.0, "rope_type": "linear"} and md["rope_style"] == "half"
    back = import_reference(out, model_dir(tmp_path, config), model_id=stats.meta.model_id)
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean", "inv_freq", "freq_scale"):
        assert np.array_equal(getattr(back, name), getattr(stats, name)), name


def test_partial_stats_refused(tmp_path):
    data = small_reference()
    del data["stats"]["layer01_head02"]
    data["metadata"]["sampled_heads"].remove([1, 2])
    torch.save(data, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"partial.pt: stats cover 7 of 8 heads \(first missing: layer 1 head 2\)"):
        import_reference(tmp_path / "partial.pt", model_dir(tmp_path, SMALL))


def test_interleaved_or_unknown_rope_style_refused(tmp_path):
    torch.save(small_reference(rope_style="interleaved"), tmp_path / "i.pt")
    with pytest.raises(UserError, match="rope pairing is interleaved in the stats, half in the model"):
        import_reference(tmp_path / "i.pt", model_dir(tmp_path, SMALL))
    torch.save(small_reference(rope_style="neox"), tmp_path / "n.pt")
    with pytest.raises(UserError, match="unknown rope_style 'neox'"):
        import_reference(tmp_path / "n.pt", model_dir(tmp_path, SMALL, "m2"))


@pytest.mark.parametrize("kind", ["random", "truncated", "safetensors", "pickle", "structure", "keys", "tensor"])
def test_corrupt_reference_file_refused(kind, tmp_path):
    path = tmp_path / "bad.pt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(2).bytes(5000))
    elif kind == "truncated":
        torch.save(small_reference(), path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "safetensors":
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(4, dtype=np.float32)}, str(path))
    elif kind == "pickle":  # a torch file holding an arbitrary object: weights_only refuses to build it
        torch.save({"metadata": {}, "stats": {}, "obj": zipfile.ZipInfo("x")}, path)
    elif kind == "structure":
        torch.save([1, 2, 3], path)
    elif kind == "keys":
        data = small_reference()
        data["stats"]["something"] = {}
        torch.save(data, path)
    else:
        data = small_reference()
        data["stats"]["layer00_head00"]["q_abs_mean"] = torch.zeros(3)
        torch.save(data, path)
    with pytest.raises(UserError) as e:
        import_reference(path, model_dir(tmp_path, SMALL))
    assert "\n" not in str(e.value) and str(e.value).startswith("bad.pt")


def test_missing_file_and_missing_config(tmp_path):
    with pytest.raises(UserError, match="not found"):
        import_reference(tmp_path / "none.pt", model_dir(tmp_path, SMALL))
    torch.save(small_reference(), tmp_path / "ok.pt")
    with pytest.raises(UserError, match="no config.json"):
        import_reference(tmp_path / "ok.pt", tmp_path / "empty")


def test_export_to_unwritable_place_refused(tmp_path):
    from test_stats_format import make_stats

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        export_reference(make_stats(), tmp_path / "taken")  # a non-empty directory is in the way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
