"""The `triattn` command line as a user runs it: a real subprocess, its output and exit code."""

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "triattn_local.cli"]


def triattn(*args, stdin=None, env_extra=None, tmp_cache=None):
    env = dict(os.environ, **(env_extra or {}))
    if tmp_cache:
        env["TRIATTN_CACHE"] = str(tmp_cache)
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, input=stdin, env=env,
                          timeout=300)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0]


@pytest.fixture(scope="module")
def model_and_stats(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("qwen3")
    stats = tmp_path_factory.mktemp("stats") / "qwen3.safetensors"
    r = triattn("calibrate", model, "--output", stats, "--max-tokens", "400")
    assert r.returncode == 0, r.stderr
    return model, stats


@pytest.mark.parametrize("cmd", [[], ["run"], ["calibrate"], ["stats"], ["stats", "show"], ["stats", "import"],
                                 ["stats", "export"], ["doctor"], ["eval"]])
def test_every_command_has_help(cmd):
    r = triattn(*cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_run_streams_and_summarises(model_and_stats, tmp_path):
    model, stats = model_and_stats
    trace = tmp_path / "trace.jsonl"
    r = triattn("run", model, "Count to ten.", "--stats", stats, "--budget", "40", "--divide-length", "8",
                "--window", "4", "--max-tokens", "60", "--temperature", "0", "--pruning-mode", "per_layer_head",
                "--kv-trace", trace)
    assert r.returncode == 0, r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert "tok/s" in summary and "peak KV" in summary and "compression rounds" in summary
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    rounds = {x["round"] for x in lines}
    assert len(rounds) >= 2
    assert len(lines) == len(rounds) * 3 * 2  # one line per (layer, kv head) per round: 3 layers x 2 kv heads
    first = lines[0]
    assert set(first) == {"round", "step", "layer", "kv_head", "kept_positions"}
    assert len(first["kept_positions"]) == 40 and first["kept_positions"] == sorted(first["kept_positions"])
    peak = int(summary.split("peak KV ")[1].split()[0])
    assert peak <= 48


def test_run_global_mode_trace_has_shared_lines(model_and_stats, tmp_path):
    model, stats = model_and_stats
    trace = tmp_path / "trace.jsonl"
    r = triattn("run", model, "--stats", stats, "--budget", "32", "--divide-length", "8", "--window", "4",
                "--max-tokens", "40", "--temperature", "0", "--pruning-mode", "global", "--raw", "--kv-trace", trace,
                stdin="a prompt from stdin, long enough to need compression while it is prefilled " * 2)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines and all(x["layer"] is None and x["kv_head"] is None for x in lines)


def test_no_compress_and_greedy_are_deterministic(model_and_stats):
    model, _ = model_and_stats
    a = triattn("run", model, "hi", "--no-compress", "--temperature", "0", "--max-tokens", "20")
    b = triattn("run", model, "hi", "--no-compress", "--temperature", "0", "--max-tokens", "20")
    assert a.returncode == 0 and a.stdout == b.stdout and "0 compression rounds" in a.stderr


def test_run_calibrates_once_when_no_stats_are_given(model_and_stats, tmp_path):
    model, _ = model_and_stats
    r = triattn("run", model, "hi", "--max-tokens", "5", tmp_cache=tmp_path)
    assert r.returncode == 0 and "calibrating now" in r.stderr
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 1
    r = triattn("run", model, "hi", "--max-tokens", "5", tmp_cache=tmp_path)
    assert r.returncode == 0 and "calibrating" not in r.stderr


def test_bad_input_gives_one_line_and_exit_2(model_and_stats, tmp_path, tiny_model_factory):
    model, stats = model_and_stats
    assert_one_line_error(triattn("run", tmp_path / "missing", "hi"), "no such model directory")
    assert_one_line_error(triattn("run", tmp_path, "hi"), "not a model directory")
    assert_one_line_error(triattn("run", model, "hi", "--budget", "100", "--window", "96", "--sink", "4"),
                          "budget 100", "window + sinks")
    assert_one_line_error(triattn("run", model, "hi", "--pruning-mode", "diagonal"), "unknown pruning mode")
    assert_one_line_error(triattn("run", model, "hi", "--backend", "vulkan"), "unknown backend")
    assert_one_line_error(triattn("run", model, "hi", "--max-tokens", "0"), "--max-tokens")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    assert_one_line_error(triattn("run", model, "hi", "--stats", corrupt), str(corrupt))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(stats.read_bytes()[:200])
    assert_one_line_error(triattn("run", model, "hi", "--stats", truncated), str(truncated))
    other = tiny_model_factory("qwen3", num_hidden_layers=2)
    assert_one_line_error(triattn("run", other, "hi", "--stats", stats), "num_layers is 3 in the stats, 2 in the model")
    assert_one_line_error(triattn("run", tiny_model_factory("qwen2"), "hi", "--stats", stats), "in the stats", "in the model")
    assert_one_line_error(triattn("calibrate", model, "--output", tmp_path / "x.safetensors", "--input",
                                  tmp_path / "nope.txt"), "not found")
    r = triattn("run", model, "hi", "--no-such-flag")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_stats_show_reports_concentration(model_and_stats):
    _, stats = model_and_stats
    r = triattn("stats", "show", stats)
    assert r.returncode == 0, r.stderr
    assert "concentration" in r.stdout.lower() and "Qwen3ForCausalLM" in r.stdout


def test_stats_import_export_round_trip(reference_stats_dir, tmp_path):
    import torch

    config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=131072)
    model = tmp_path / "ds-qwen7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    ours = tmp_path / "ds.safetensors"
    r = triattn("stats", "import", reference_stats_dir / "ds_qwen7b.pt", "--model", model, "--output", ours)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ds_qwen7b.pt"
    r = triattn("stats", "export", ours, "--format", "reference", "--output", out)
    assert r.returncode == 0, r.stderr
    a = torch.load(reference_stats_dir / "ds_qwen7b.pt", weights_only=True)
    b = torch.load(out, weights_only=True)
    assert a["metadata"] == b["metadata"] and list(a["stats"]) == list(b["stats"])
    assert all(torch.equal(a["stats"][k][n], b["stats"][k][n]) for k in a["stats"] for n in a["stats"][k])
    config["num_hidden_layers"] = 24
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line_error(triattn("stats", "import", reference_stats_dir / "ds_qwen7b.pt", "--model", model,
                                  "--output", tmp_path / "y.safetensors"), "28", "24")
    assert_one_line_error(triattn("stats", "export", ours, "--format", "vllm", "--output", out), "unknown export format")


def test_doctor_names_the_auto_backend():
    r = triattn("doctor")
    assert r.returncode == 0, r.stderr
    assert "--backend auto picks torch" in r.stdout and "transformers" in r.stdout
