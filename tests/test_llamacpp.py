"""The llamacpp backend end to end on GGUFs converted here (`triattn convert`), against the torch backend on the same
Hugging Face weights and stats: same greedy tokens, same kept positions per round (global mode), the same keys read
back from llama.cpp, KV cells bounded by B + N, and the same calibration."""

import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from triattn_local.backends import load_engine  # noqa: E402
from triattn_local.demo.task import make_problem, parse_answer  # noqa: E402
from triattn_local.engine import CompressionEvent, CompressionSettings, DoneEvent, TextEvent, TokenEvent  # noqa: E402
from triattn_local.errors import UserError  # noqa: E402
from triattn_local.policy import BudgetPolicy  # noqa: E402
from triattn_local.registry import demo_model_dir  # noqa: E402
from triattn_local.sampling import SamplingParams  # noqa: E402
from triattn_local.stats.format import QueryStats  # noqa: E402

DEMO = demo_model_dir()
STATS = QueryStats.load(DEMO / "triattn_stats.safetensors")


def convert(src, out, outtype="f32"):
    """`triattn convert SRC --to gguf`, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "triattn_local.cli", "convert", str(src), "--to", "gguf", "-o", str(out),
                        "--outtype", outtype], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The torch references run on one thread: on a small shared CPU, more threads than free cores spin and make
    them several times slower (the llamacpp backend defaults to half the CPUs for the same reason)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    return convert("demo", tmp_path_factory.mktemp("demo-gguf"))


@pytest.fixture(scope="module")
def torch_demo():
    return load_engine("demo", backend="torch", device="cpu")


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, tiny_model_factory):
    """A tiny random Llama (llama3 rope scaling) with the demo's SentencePiece tokenizer, and its GGUF: the converter
    permutes Q/K so that llama.cpp rotates adjacent pairs."""
    src = tmp_path_factory.mktemp("tiny-llama")
    shutil.copytree(tiny_model_factory("llama", vocab_size=384), src, dirs_exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, src / name)
    gguf = convert(src, tmp_path_factory.mktemp("tiny-llama-gguf"))
    return (load_engine(str(src), backend="torch", device="cpu"),
            load_engine(str(gguf), backend="llamacpp", dtype="float32"))


def generate(engine, prompt, settings, n, prepare=None):
    """Greedy tokens, the kept positions of every round, text, the done event and the session; prepare(session) may
    wrap the session's methods first."""
    session = engine.session(settings)
    if prepare is not None:
        prepare(session)
    tokens, rounds, text, done = [], [], "", None
    for ev in session.generate(prompt, SamplingParams(max_tokens=n, temperature=0)):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
        elif isinstance(ev, CompressionEvent):
            rounds.append(ev.record.kept[0][2])
        elif isinstance(ev, TextEvent):
            text += ev.text
        elif isinstance(ev, DoneEvent):
            done = ev
    return tokens, rounds, text, done, session


def after_forward(watch):
    """A prepare() that calls watch(session) after every forward of the runner."""
    def prepare(session):
        forward = session.runner.forward

        def watched(ids, start):
            out = forward(ids, start)
            watch(session)
            return out

        session.runner.forward = watched
    return prepare


def test_converted_demo_tokenizes_like_transformers(demo_gguf, torch_demo):
    """Chat tokens come out of `triattn convert` as special tokens: one id in a prompt, rendered on decode, and
    <|im_end|> ends generation."""
    engine = load_engine(str(demo_gguf))  # auto: a folder with a .gguf and no config.json
    assert engine.backend == "llamacpp"
    p = make_problem(random.Random(1), steps=50)
    ids = engine.encode_prompt(p.prompt)
    assert ids == torch_demo.encode_prompt(p.prompt)
    assert ids[0] == 3 and engine.tokenizer.decode(ids[:2]) == "<|im_start|>u"
    assert engine.tokenizer.encode("</think>", add_special_tokens=False) == [6]
    assert 4 in engine.eos_token_ids() and engine.tokenizer.decode(ids) == torch_demo.tokenizer.decode(ids)


def test_demo_solves_a_problem_with_the_same_greedy_tokens_as_torch(demo_gguf, torch_demo):
    """Budget above the whole sequence: token-for-token what the torch backend generates, and the right answer."""
    p = make_problem(random.Random(1), steps=50)  # `python -m triattn_local.demo.task --steps 50 --seed 1`
    engine = load_engine(str(demo_gguf))
    settings = CompressionSettings(BudgetPolicy(4096, 64, 64, 4, pruning_mode="global"), stats=STATS)
    ours, rounds, text, done, _ = generate(engine, engine.encode_prompt(p.prompt), settings, 700)
    ref, _, _, _, _ = generate(torch_demo, torch_demo.encode_prompt(p.prompt), settings, 700)
    assert rounds == [] and done.finish_reason == "stop"
    assert ours == ref
    assert parse_answer(text) == p.answer


def test_rounds_keep_the_positions_torch_keeps_and_cells_stay_within_b_plus_n(demo_gguf, torch_demo):
    """Global mode, f32 KV cache. Before every round the keys llama.cpp holds go through the torch backend's scoring
    (score_keys_torch) and the core's global selection: the positions the llamacpp round keeps are exactly those.
    The cells read back after every forward are the runner's positions, never more than B + N = n_ctx, and the run
    keeps the same positions and tokens as the torch backend on this prompt."""
    import copy

    import torch

    from triattn_local.backends.torch.cache import score_keys_torch

    engine = load_engine(str(demo_gguf), dtype="float32")
    budget, divide = 224, 32
    policy = BudgetPolicy(budget, divide, 32, 4, pruning_mode="global")
    p = make_problem(random.Random(7), steps=60)
    seen, checked = [], []

    def watch(session):
        cells = session.runner.cells()
        seen.append(len(cells))
        np.testing.assert_array_equal(cells, session.runner.runner.positions)

    def prepare(session):
        after_forward(watch)(session)
        compress = session._compress_on_host

        def compared():
            keys = session.runner.read_keys().keys
            rq = session.scorer.round_queries(session.state.round_start)
            scores = np.stack([score_keys_torch(torch.tensor(k), rq.virtual_query[i], rq.magnitude_weight[i]).numpy()
                               for i, k in enumerate(keys)])
            _, torch_choice = copy.deepcopy(session.state).plan(scores)
            event = compress()
            checked.append(event.record.kept == torch_choice.kept)
            return event

        session._compress_on_host = compared

    prompt = engine.encode_prompt(p.prompt)
    ours, rounds, _, done, session = generate(engine, prompt, CompressionSettings(policy, stats=STATS), 200, prepare)
    assert len(checked) >= 10 and all(checked)
    assert session.runner.n_ctx == budget + divide  # a multiple of 256: llama.cpp allocates exactly B + N cells
    np.testing.assert_array_equal(session.runner.cells(), session.state.positions[0, 0])  # what the core kept
    assert max(seen) == budget + divide and done.metrics.logical_tokens > 2 * (budget + divide)
    ref, ref_rounds, _, _, _ = generate(torch_demo, prompt, CompressionSettings(policy, stats=STATS), 200)
    assert rounds == ref_rounds and ours == ref


def test_the_keys_llama_cpp_holds_are_the_torch_keys(demo_gguf, torch_demo, llama_pair):
    """Keys read back from the cache (f32; Qwen's half pairs and Llama's adjacent pairs, 90 positions of RoPE) equal
    the torch backend's post-RoPE keys in HF's layout, so the same stats score them."""
    prompt = [int(x) for x in np.random.default_rng(0).integers(7, 300, size=90)]
    for hf, gguf in ((torch_demo, load_engine(str(demo_gguf), dtype="float32")), llama_pair):
        assert gguf.adjacent_pairs == (gguf.shape.architecture == "LlamaForCausalLM")
        a, b = hf.new_sequence_runner(), gguf.new_sequence_runner()
        a.forward(prompt, 0)
        b.forward(prompt, 0)
        cached = b.read_keys()
        assert cached.positions.tolist() == list(range(len(prompt)))
        for layer, keys in enumerate(cached.keys):
            ref = a.cache.layers[layer].keys[0].numpy()
            if layer == 0:  # straight from the embeddings: only float rounding apart
                np.testing.assert_allclose(keys, ref, rtol=1e-4, atol=1e-4)
            assert np.linalg.norm(keys - ref) < 5e-3 * np.linalg.norm(ref)  # deeper: the two backends' rounding


def test_llama_gguf_reads_its_rope_and_matches_torch(llama_pair):
    """Llama 3 rope scaling survives conversion only as per-frequency factors: the shape recovered from them equals
    the HF config's; greedy tokens equal torch's."""
    hf, gguf = llama_pair
    assert gguf.shape.rope_type == "llama3"
    np.testing.assert_allclose(gguf.shape.rope_frequencies()[0], hf.shape.rope_frequencies()[0], rtol=1e-6)
    prompt = list(range(10, 60))
    settings = CompressionSettings(BudgetPolicy(4096, 16, 8, pruning_mode="global"), stats=None, method="streaming")
    ours, _, _, _, _ = generate(gguf, prompt, settings, 40)
    ref, _, _, _, _ = generate(hf, prompt, CompressionSettings(policy=None), 40)
    assert len(ours) >= 20 and ours == ref


def test_q8_0_kv_cache_with_triattention_solves_the_demo(demo_gguf):
    """q8_0 K/V (flash attention) composed with TriAttention: rounds read the quantized keys, cells stay bounded,
    the demo still solves a problem."""
    engine = load_engine(str(demo_gguf), dtype="q8_0")
    p = make_problem(random.Random(99), steps=50)
    policy = BudgetPolicy(736, 32, 320, 4, pruning_mode="global")
    seen = []
    _, rounds, text, done, session = generate(engine, engine.encode_prompt(p.prompt),
                                              CompressionSettings(policy, stats=STATS), 800,
                                              after_forward(lambda s: seen.append(len(s.runner.cells()))))
    assert session.runner.read_keys().key_type == 8  # GGML_TYPE_Q8_0
    assert len(rounds) >= 1 and max(seen) <= policy.capacity
    assert parse_answer(text) == p.answer
    assert engine.kv_bytes_per_token == 2 * 6 * 2 * 64 * 34 // 32


def test_n_ctx_really_bounds_the_cache(demo_gguf):
    """Without compression a context of 256 cells is full after 256 tokens; with B + N = 256 it runs on past it."""
    engine = load_engine(str(demo_gguf))
    runner = engine.new_runner(n_ctx=256)
    runner.forward([list(range(7, 263))], 0)
    with pytest.raises(UserError, match="KV cache is full"):
        runner.forward([[7]], 256)


def test_calibration_through_llama_cpp_matches_torch(demo_gguf, torch_demo, llama_pair):
    """Pre-RoPE queries captured with an eval callback (after Qwen3's q_norm; Llama's adjacent pairs put back in
    half layout) give the stats the torch calibration gives."""
    from triattn_local.demo.task import calibration_text

    text = calibration_text(1)
    for hf, gguf in ((torch_demo, load_engine(str(demo_gguf))), llama_pair):
        ours = gguf.calibrate(text, progress=False, max_tokens=600)
        ref = hf.calibrate(text, progress=False, max_tokens=600)
        assert ours.meta.calibration_tokens == ref.meta.calibration_tokens == 600
        for name in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
            np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=2e-3, atol=2e-3)
        ours.check_matches(hf.shape)


def test_unsupported_settings_are_one_line_errors(demo_gguf):
    engine = load_engine(str(demo_gguf))
    with pytest.raises(UserError, match="pruning-mode global"):
        engine.session(CompressionSettings(BudgetPolicy(256, 32, 32, 4, pruning_mode="per_head"), stats=STATS))
    with pytest.raises(UserError, match="not available on the llamacpp backend"):
        engine.session(CompressionSettings(BudgetPolicy(256, 32, 32, 4, pruning_mode="global"), method="snapkv"))
    with pytest.raises(UserError, match="one sequence at a time"):
        engine.new_runner().forward([[7, 8], [9, 10]], 0)


def test_run_command_on_a_gguf(demo_gguf):
    p = make_problem(random.Random(5), steps=50)
    cmd = [sys.executable, "-m", "triattn_local.cli", "run", str(demo_gguf), p.prompt, "--temperature", "0",
           "--pruning-mode", "global", "--budget", "736", "--divide-length", "32", "--window", "320"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"The final value is {p.answer}." in r.stdout and "compression rounds" in r.stderr
    default = [c for c in cmd if c not in ("--pruning-mode", "global")]  # the default, auto, is global here
    r = subprocess.run(default, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"The final value is {p.answer}." in r.stdout, r.stderr
    per_head = cmd[:-8] + ["--pruning-mode", "per_head"]
    r = subprocess.run(per_head, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pruning-mode global" in r.stderr


def test_the_shipped_demo_gguf_is_what_triattn_convert_makes_of_the_demo(tmp_path):
    """The demo ships its GGUF (what `--backend auto` runs on a CPU): byte for byte `triattn convert demo`, so it
    cannot drift from the weights beside it."""
    import llama_cpp

    made_with = "0.3.36"  # the llama-cpp-python whose converter wrote the shipped file
    if llama_cpp.__version__ != made_with:
        pytest.skip(f"the shipped GGUF was made with llama-cpp-python {made_with}'s converter; this is "
                    f"{llama_cpp.__version__}: regenerate it (triattn convert demo --to gguf) and update made_with")
    out = convert("demo", tmp_path / "gguf", outtype="auto")
    assert (out / "model.gguf").read_bytes() == (DEMO / "model.gguf").read_bytes()


def test_auto_runs_the_demo_on_llama_cpp_without_a_gpu_unless_the_settings_need_torch(monkeypatch):
    import triattn_local.backends as backends
    from triattn_local.backends import llamacpp_runs

    assert llamacpp_runs(True, "triattention", "auto", "auto") and llamacpp_runs(False, "snapkv", "per_head", "auto")
    assert llamacpp_runs(True, "triattention", "global", "auto")
    assert not llamacpp_runs(True, "triattention", "per_head", "auto")  # the reference's per_head: torch
    assert not llamacpp_runs(True, "snapkv", "auto", "auto")  # the baselines run on transformers
    assert not llamacpp_runs(True, "triattention", "auto", "float32")  # a KV dtype llama.cpp does not take
    monkeypatch.setattr(backends, "torch_gpu_usable", lambda: False)
    assert load_engine("demo", llamacpp_ok=True).backend == "llamacpp"
    assert load_engine("demo", llamacpp_ok=False).backend == "torch"
    assert load_engine("demo", backend="torch", llamacpp_ok=True).backend == "torch"
    assert load_engine("demo", device="cpu", llamacpp_ok=True).backend == "llamacpp"
    monkeypatch.setattr(backends, "torch_gpu_usable", lambda: True)  # a GPU: torch, and its static path
    assert load_engine("demo", llamacpp_ok=True).backend == "torch"


@pytest.mark.parametrize("extra, backend", [([], "llamacpp"), (["--pruning-mode", "per_head"], "torch")])
def test_triattn_run_demo_says_which_backend_auto_picked(extra, backend):
    problem = make_problem(random.Random(5), steps=20)
    r = subprocess.run([sys.executable, "-m", "triattn_local.cli", "run", "demo", "--temperature", "0", "--budget", "256",
                        "--divide-length", "32", "--window", "32", *extra], input=problem.prompt, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert f"tok/s ({backend})" in summary and " 0 compression rounds" not in summary and r.stdout.strip()
