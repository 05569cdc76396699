"""The command line under hostile input: every command, driven with generated and hand-written arguments, stdin and
files. Each case must end with exit 0 or 2; on exit 2 with exactly one line on stderr, `error: ...`, naming the
problem; never a traceback, never exit 1, never a temporary or partial file left behind.

Most cases run in-process (`cli.main` with patched argv and streams), with model loading, the server's bind, the
chat app and the GGUF converter replaced by a stop sign (`Reached`): a case that gets there has passed every check,
and hundreds of cases take seconds. What only a real process shows runs in one: undecodable argv bytes, a closed
stdout, Ctrl-C while generating, and that a rejected input never imports torch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triattn_local import cli
from triattn_local.errors import UserError
from triattn_local.registry import demo_model_dir

DEMO = demo_model_dir()
REACHED = "fuzz: reached the expensive part"
CASE_SECONDS = 60  # a blocked read (a FIFO opened before it is checked) fails the case instead of hanging CI


class Reached(UserError):
    def __init__(self, *args, **kwargs):
        super().__init__(REACHED)


def _reached(*args, **kwargs):
    raise Reached()


class _StubApp:
    def __init__(self, *args, **kwargs):
        pass

    run = _reached


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def reached(self) -> bool:
        return REACHED in self.err


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Files a hostile user points at, an isolated cache and data folder, and the stubs; cwd is sandbox/work."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "work").mkdir()
    (root / "dir").mkdir()
    stats = DEMO / "triattn_stats.safetensors"
    shutil.copy(stats, root / "stats.safetensors")
    (root / "truncated.safetensors").write_bytes(stats.read_bytes()[:300])
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "empty").write_bytes(b"")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me, na\xefve".encode("latin-1"))
    (root / "text.txt").write_text("A calibration text of a few words. " * 20)
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    os.mkfifo(root / "fifo")
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"], "num_hidden')
    (root / "binconfig").mkdir()
    (root / "binconfig" / "config.json").write_bytes(b"\xff\xfe\x00\x01" * 10)
    (root / "listconfig").mkdir()
    (root / "listconfig" / "config.json").write_text("[1, 2, 3]")
    (root / "fake.gguf").write_bytes(b"NOPE" + b"\x00" * 60)
    (root / "twogguf").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (root / "twogguf" / name).write_bytes(b"GGUF" + b"\x00" * 60)
    (root / "results").mkdir()
    (root / "results" / "fidelity.json").write_text('{"cells": [{"method": "full"}]}')
    (root / "home").mkdir()
    env = {"TRIATTN_CACHE": str(root / "cache"), "TRIATTN_DATA_DIR": str(root / "data"), "HF_HOME": str(root / "hf"),
           "HOME": str(root / "home"),
           "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "TRIATTN_DEBUG": ""}
    patches = [
        mock.patch.dict(os.environ, env),
        mock.patch("triattn_local.backends.load_engine", _reached),
        mock.patch("triattn_local.convert.convert_to_gguf", _reached),
        mock.patch("triattn_local.eval.run_eval", _reached),
        mock.patch("triattn_local.serve.server._bind", _reached),
        mock.patch("triattn_local.tui.app.ChatApp", _StubApp),
    ]
    # huggingface_hub reads its environment once, at import: an earlier test may have imported it already
    from huggingface_hub import constants
    patches += [mock.patch.object(constants, "HF_HUB_OFFLINE", True),
                mock.patch.object(constants, "ENDPOINT", env["HF_ENDPOINT"]),
                mock.patch.object(constants, "HF_HOME", env["HF_HOME"]),
                mock.patch.object(constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))]
    cwd = os.getcwd()
    for p in patches:
        p.start()
    os.chdir(root / "work")
    try:
        yield root
    finally:
        os.chdir(cwd)
        for p in reversed(patches):
            p.stop()


def _timeout(signum, frame):
    raise TimeoutError(f"a case ran over {CASE_SECONDS} s (a blocking read?)")


def invoke(args: list[str], stdin: bytes = b"") -> Result:
    """`triattn ARGS` in this process, stdin given, stdout and stderr captured as bytes."""
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    stdin_stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(CASE_SECONDS)
    try:
        with mock.patch.object(sys, "argv", ["triattn", *args]), mock.patch.object(sys, "stdout", stdout), \
                mock.patch.object(sys, "stderr", stderr), mock.patch.object(sys, "stdin", stdin_stream):
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return Result(code, out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace"))


def files_under(root: Path) -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("data", "hf", ".cache")]  # chat store, Hub and font caches
        found.update(os.path.relpath(os.path.join(folder, f), root) for f in files)
    return found


def check(args: list[str], result: Result, before: set[str], after: set[str]) -> None:
    where = f"triattn {' '.join(map(repr, args))}"
    assert result.code in (0, 2), f"{where}: exit {result.code}\n{result.err[-2000:]}"
    assert "Traceback" not in result.err and "Traceback" not in result.out, f"{where}\n{result.err[-2000:]}"
    if result.code == 2:
        lines = [line for line in result.err.splitlines() if line.strip()]
        if result.reached:  # past every check; what the command printed on its way there may precede the stop sign
            assert lines[-1] == f"error: {REACHED}", f"{where}: stderr is\n{result.err[-2000:]}"
        else:
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: stderr is\n{result.err[-2000:]}"
            assert len(lines[0]) > len("error: ") + 5
            assert after <= before, f"{where}: failed but left {sorted(after - before)}"
    partial = [f for f in after - before if f.endswith((".tmp", ".part", ".incomplete"))]
    assert not partial, f"{where}: left temporary files {partial}"


def run_case(sandbox: Path, args: list[str], stdin: bytes = b"") -> Result:
    before = files_under(sandbox)
    result = invoke(args, stdin)
    check(args, result, before, files_under(sandbox))
    return result


# ---- generated cases ------------------------------------------------------------------------------------------

SURROGATES = os.fsdecode(b"caf\xe9\xff")  # what Python makes of undecodable argv bytes


def paths(root: Path) -> list[str]:
    names = ["stats.safetensors", "truncated.safetensors", "binary.bin", "empty", "latin1.txt", "text.txt", "dir",
             "loop-a", "fifo", "badjson", "binconfig", "listconfig", "fake.gguf", "twogguf", "results",
             "binary.bin/child", "missing/deeper/file"]
    return [str(root / n) for n in names] + [str(DEMO), str(DEMO / "model.safetensors"), "demo", "/nonexistent",
                                             "", " ", SURROGATES, "x" * 5000, "-", "~/nope", "qwen3-8b"]


INTS = ["-1", "0", "1", "2", "3", "64", "2147483648", "99999999999999999999999", "nan", "inf", "1e3", "abc", "",
        " ", "0x10", "-0", "１２", "12 34", SURROGATES]
FLOATS = ["nan", "-nan", "inf", "-inf", "-0.5", "0", "0.6", "1", "2.5", "1e309", "abc", "", "1,5", SURROGATES]
TEXTS = ["", " ", "\t\n", "hello", SURROGATES, "a" * 100_000, "-", "--", "--budget", "😀", "\u202e"]
URLS = ["", "ftp://x", "http://", "http://127.0.0.1:99999", "http://127.0.0.1:abc", "not a url",
        "http://[::1", "http://127.0.0.1:9", SURROGATES]
STDINS = [b"", b"  \n\t", b"hello", b"hello\xff\xfe", b"\x00\x01\x02binary", b"\xef\xbb\xbfhi", b"\xed\xa0\x80",
          "caf\xe9".encode("latin-1"), b"\xff" * 1000]

# Per command: positional kinds and option kinds. A kind names a pool of values, or lists the values itself.
COMMON_RUN = {"--budget": "int", "--divide-length": "int", "--window": "int", "--sink": "int", "--stats": "path",
              "--max-tokens": "int", "--temperature": "float", "--top-p": "float", "--seed": "int",
              "--method": ["triattention", "snapkv", "nope", ""], "--pruning-mode": ["auto", "global", "diag", ""],
              "--device": ["auto", "cpu", "cuda", "tpu", ""], "--dtype": ["auto", "float32", "int3", ""],
              "--backend": ["auto", "torch", "vulkan", ""], "--no-compress": None, "--protect-prefill": None}
COMMANDS = {
    "run": (["model", "text"], dict(COMMON_RUN, **{"--kv-trace": "path", "--raw": None})),
    "chat": (["model"], dict(COMMON_RUN, **{"--system": "text", "--resume": None})),
    "calibrate": (["model"], {"--output": "path", "--input": "path", "--max-tokens": "int",
                              "--device": ["cpu", "x"], "--dtype": ["auto", "x"], "--backend": ["torch", "x"]}),
    "convert": (["model"], {"--to": ["gguf", "onnx", ""], "--output": "path", "--outtype": ["auto", "q4", ""]}),
    "stats show": (["path"], {}),
    "stats import": (["path"], {"--model": "model", "--output": "path"}),
    "stats export": (["path"], {"--format": ["reference", "vllm", ""], "--output": "path"}),
    "eval": ([], {"--model": "model", "--methods": ["full,snapkv", "nope", "", ",,,"], "--budgets": ["128", "a,b",
              "0", "", "-5,10"], "--problems": "int", "--limit": "int", "--window": "int", "--divide-length": "int",
              "--sink": "int", "--batch": "int", "--jobs": "int", "--max-offset": "int", "--out": "path",
              "--plot-only": None, "--device": ["cpu", "x"], "--dtype": ["auto", "x"]}),
    "bench": (["model"], {"--shape": ["qwen3-8b", "nope"], "--context": ["4096", "0", "a", ""], "--batch": ["1",
              "-1", ""], "--steps": "int", "--budget": "int", "--memory-gib": "float", "--out": "path",
              "--plot-only": None}),
    "serve": (["model"], dict(COMMON_RUN, **{"--port": "int", "--host": "text", "--parallel": "int",
                                            "--max-conversations": "int", "--conversation-memory": "int",
                                            "--log-level": ["info", "loud", ""], "--api-key": "text",
                                            "--served-model-name": "text"})),
    "openclaw": ([], {"--url": "url", "--provider": "text", "--api-key": "text", "--config": "path",
                      "--write": None}),
    "pull": (["model"], {"--backend": ["auto", "x"], "--budget": "int", "--divide-length": "int",
                         "--calibration-tokens": "int"}),
    "list": ([], {"--available": None}),
    "show": (["model"], {"--backend": ["auto", "torch", "x"], "--budget": "int"}),
    "rm": (["model"], {"--backend": ["auto", "x"]}),
    "doctor": ([], {}),
}


def pool(kind, root: Path) -> list[str]:
    if isinstance(kind, list):
        return kind
    return {"int": INTS, "float": FLOATS, "text": TEXTS, "url": URLS, "path": paths(root),
            "model": paths(root)}[kind]


@st.composite
def command_lines(draw, root: Path):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    positional, options = COMMANDS[name]
    args = name.split()
    for kind in positional:
        if draw(st.integers(0, 9)) > 0:  # now and then a positional argument is missing
            args.append(draw(st.sampled_from(pool(kind, root))))
    flags = sorted(options) + ["--no-such-flag", "-z"]
    for _ in range(draw(st.integers(0, 4))):  # a flag may come twice: the last one counts
        flag = draw(st.sampled_from(flags))
        kind = options.get(flag, "text")
        args.append(flag)
        if kind is not None and draw(st.integers(0, 14)) > 0:  # now and then the value is missing
            args.append(draw(st.sampled_from(pool(kind, root))))
    if draw(st.booleans()):
        args.append("--help")
    stdin = draw(st.sampled_from(STDINS)) if draw(st.booleans()) else draw(st.binary(max_size=64))
    return args, stdin


def test_generated_command_lines(sandbox):
    seen = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(command_lines(sandbox))
    def one(case):
        args, stdin = case
        result = run_case(sandbox, args, stdin)
        seen.append((args[0], result.code))

    one()
    assert len(seen) >= 300
    assert {c for _, c in seen} >= {0, 2}
    assert len({name for name, _ in seen}) >= 12  # every command gets its share


# ---- hand-written cases ---------------------------------------------------------------------------------------

def hostile_cases(root: Path) -> list[tuple[list[str], str, bytes]]:
    """(argv, a word the one-line error must contain, stdin); '' for a case that may pass."""
    s = str
    stats, trunc, binary, d = s(root / "stats.safetensors"), s(root / "truncated.safetensors"), s(root / "binary.bin"), s(root / "dir")
    return [
        (["run", "demo", ""], "empty", b""),
        (["run", "demo", "   \n"], "empty", b""),
        (["run", "demo"], "empty prompt on stdin", b""),
        (["run", "demo"], "empty prompt on stdin", b" \n\t "),
        (["run", "demo"], "not valid UTF-8", b"hello\xff\xfe"),
        (["run", "demo"], "not valid UTF-8", "caf\xe9".encode("latin-1")),
        (["run", "demo", SURROGATES], "not valid UTF-8", b""),
        (["run", "/no/such/dir", "hi"], "no such model directory", b""),
        (["run", d, "hi"], "not a model directory", b""),
        (["run", binary, "hi"], "not a model", b""),
        (["run", s(root / "loop-a"), "hi"], "symbolic links", b""),
        (["run", s(root / "binary.bin" / "child"), "hi"], "Not a directory", b""),
        (["run", s(root / "badjson"), "hi"], "config", b""),
        (["run", s(root / "binconfig"), "hi"], "config", b""),
        (["run", s(root / "listconfig"), "hi"], "JSON object", b""),
        (["run", s(root / "fake.gguf"), "hi"], "GGUF", b""),
        (["run", s(root / "twogguf"), "hi"], "several .gguf", b""),
        (["run", "demo", "hi", "--stats", "/etc/passwd"], "stats", b""),
        (["run", "demo", "hi", "--stats", trunc], "truncated", b""),
        (["run", "demo", "hi", "--stats", binary], "binary.bin", b""),
        (["run", "demo", "hi", "--stats", d], "directory", b""),
        (["run", "demo", "hi", "--stats", s(root / "fifo")], "regular file", b""),
        (["run", "demo", "hi", "--stats", s(root / "loop-a")], "symbolic links", b""),
        (["run", "demo", "hi", "--stats", s(DEMO / "model.safetensors")], "not a triattn stats file", b""),
        (["run", "demo", "hi", "--budget", "nan"], "--budget", b""),
        (["run", "demo", "hi", "--budget", "-5"], "--budget", b""),
        (["run", "demo", "hi", "--budget", "99999999999999999999"], "--budget", b""),
        (["run", "demo", "hi", "--window", "-1"], "--window", b""),
        (["run", "demo", "hi", "--budget", "100", "--window", "96", "--sink", "4"], "window + sinks", b""),
        (["run", "demo", "hi", "--temperature", "nan"], "--temperature", b""),
        (["run", "demo", "hi", "--temperature", "inf"], "--temperature", b""),
        (["run", "demo", "hi", "--top-p", "0"], "--top-p", b""),
        (["run", "demo", "hi", "--seed", "-1"], "--seed", b""),
        (["run", "demo", "hi", "--max-tokens", "0"], "--max-tokens", b""),
        (["run", "demo", "hi", "--max-tokens", "3000000000"], "--max-tokens", b""),
        (["run", "demo", "hi", "--device", "tpu"], "--device", b""),
        (["run", "demo", "hi", "--dtype", "int3"], "--dtype", b""),
        (["run", "demo", "hi", "--kv-trace", d], "directory", b""),
        (["run", "demo", "hi", "--kv-trace", s(root / "binary.bin" / "t.jsonl")], "not a directory", b""),
        (["run", "demo", "hi", "--kv-trace", s(root / "fifo")], "regular file", b""),
        (["run", "demo", "hi", "--no-such-flag"], "no-such-flag", b""),
        (["run", "demo", "hi", "--budget"], "--budget", b""),
        (["chat", "/nope"], "no such model directory", b""),
        (["chat", "demo", "--budget", "0"], "--budget", b""),
        (["chat", "demo", "--temperature", "-1"], "--temperature", b""),
        (["calibrate", "demo", "-o", d], "directory", b""),
        (["calibrate", "demo", "-o", s(root / "work" / "x.safetensors"), "--input", s(root / "latin1.txt")],
         "UTF-8", b""),
        (["calibrate", "demo", "-o", s(root / "work" / "x.safetensors"), "--input", s(root / "empty")], "empty", b""),
        (["calibrate", "demo", "-o", s(root / "work" / "x.safetensors"), "--input", d], "directory", b""),
        (["calibrate", "demo", "-o", s(root / "work" / "x.safetensors"), "--max-tokens", "0"], "--max-tokens", b""),
        (["convert", "demo", "--to", "onnx"], "--to", b""),
        (["convert", "demo", "--outtype", "q4"], "--outtype", b""),
        (["convert", binary], "not a model", b""),
        (["convert", "demo", "-o", binary], "not a directory", b""),
        (["stats", "show", d], "directory", b""),
        (["stats", "show", binary], "binary.bin", b""),
        (["stats", "show", trunc], "truncated", b""),
        (["stats", "show", s(root / "empty")], "empty", b""),
        (["stats", "show", "/nonexistent"], "not found", b""),
        (["stats", "import", binary, "--model", "demo", "-o", s(root / "work" / "o.safetensors")], "binary.bin", b""),
        (["stats", "import", stats, "--model", d, "-o", s(root / "work" / "o.safetensors")], "model", b""),
        (["stats", "import", stats, "--model", "demo", "-o", d], "directory", b""),
        (["stats", "export", stats, "--format", "vllm", "-o", s(root / "work" / "r.pt")], "export format", b""),
        (["stats", "export", trunc, "-o", s(root / "work" / "r.pt")], "truncated", b""),
        (["stats", "export", stats, "-o", d], "directory", b""),
        (["eval", "--limit", "0"], "--limit", b""),
        (["eval", "--budgets", "a,b"], "--budgets", b""),
        (["eval", "--budgets", ""], "--budgets", b""),
        (["eval", "--methods", "nope"], "unknown method", b""),
        (["eval", "--jobs", "100000"], "--jobs", b""),
        (["eval", "--out", binary], "not a directory", b""),
        (["eval", "--plot-only"], "--out", b""),
        (["eval", "--plot-only", "--out", d], "no results", b""),
        (["eval", "--plot-only", "--out", s(root / "results")], "fidelity", b""),
        (["serve", "--port", "70000"], "--port", b""),
        (["serve", "--port", "-1"], "--port", b""),
        (["serve", "--log-level", "loud"], "--log-level", b""),
        (["serve", "--host", ""], "--host", b""),
        (["serve", "/nope"], "no such model", b""),
        (["serve", "demo", "--stats", binary], "binary.bin", b""),
        (["serve", "demo", "--parallel", "0"], "--parallel", b""),
        (["openclaw", "--url", "ftp://x"], "--url", b""),
        (["openclaw", "--url", "http://127.0.0.1:99999"], "--url", b""),
        (["openclaw", "--url", "http://127.0.0.1:9"], "127.0.0.1:9", b""),
        (["openclaw", "--provider", "a/b"], "--provider", b""),
        (["openclaw", "--provider", ""], "--provider", b""),
        (["openclaw", "--write", "--config", d], "directory", b""),
        (["pull", ""], "empty", b""),
        (["pull", " "], "empty", b""),
        (["pull", SURROGATES], "unknown model", b""),
        (["run", SURROGATES, "hi"], "unknown model", b""),
        (["pull", "nonexistent-model"], "unknown model", b""),
        (["pull", "qwen3-8b"], "offline", b""),
        (["pull", "demo", "--budget", "0"], "--budget", b""),
        (["pull", "demo", "--calibration-tokens", "-3"], "--calibration-tokens", b""),
        (["show", "/nope"], "no such model", b""),
        (["show", "demo", "--budget", "0"], "--budget", b""),
        (["show", "qwen3-8b"], "not pulled", b""),
        (["rm", ""], "empty", b""),
        (["rm", "qwen3-8b"], "", b""),
        (["rm", "demo"], "", b""),
        (["bench", "--context", "0"], "--context", b""),
        (["bench", "--memory-gib", "nan"], "--memory-gib", b""),
        (["bench", "--steps", "1"], "--steps", b""),
        (["bench", "/nope"], "no such model", b""),
        (["bench", "--plot-only"], "--out", b""),
        (["nonsense"], "nonsense", b""),
        (["stats"], "", b""),
        ([], "", b""),
        (["list"], "", b""),
        (["--help"], "", b""),
    ]


def test_hand_written_hostile_cases(sandbox):
    for args, word, stdin in hostile_cases(sandbox):
        result = run_case(sandbox, args, stdin)
        if word:
            assert result.code == 2 and not result.reached, f"{args}: {result.code} {result.err}"
            assert word in result.err, f"{args}: {result.err}"


def test_valid_input_gets_past_every_check(sandbox):
    """The stop sign is reached only by input that passed the checks, and good input does reach it."""
    good = [
        ["run", "demo", "hi", "--budget", "512", "--kv-trace", str(sandbox / "work" / "t.jsonl")],
        ["run", str(DEMO), "--stats", str(sandbox / "stats.safetensors")],
        ["chat", "demo", "--seed", "3"],
        ["calibrate", "demo", "-o", str(sandbox / "work" / "c.safetensors"), "--input", str(sandbox / "text.txt")],
        ["convert", "demo", "-o", str(sandbox / "work" / "gguf")],
        ["eval", "--limit", "1", "--methods", "full,streaming", "--budgets", "128"],
        ["serve", "demo", "--port", "0", "--stats", str(sandbox / "stats.safetensors")],
    ]
    for args in good:
        result = run_case(sandbox, args, b"a prompt on stdin")
        assert result.reached, f"{args}: {result.code} {result.err}"
    assert not (sandbox / "work" / "t.jsonl").exists()  # the trace is written only by a generation


def test_eval_writes_a_fresh_folder_and_keeps_named_results(sandbox, monkeypatch, tmp_path):
    """A smoke run never writes to results/fidelity: it makes a new folder, unless --out names one."""
    from triattn_local import eval as eval_module

    def fake_run_eval(cfg, names, sizes, jobs=1, on_cell=None):
        cell = eval_module.Cell("streaming", sizes[0], cfg.problems, 1, 100.0, 1e6, 300.0, 0.1)
        on_cell(cell, [cell])
        return [cell]

    monkeypatch.setattr(eval_module, "run_eval", fake_run_eval)
    monkeypatch.chdir(tmp_path)
    shipped = tmp_path / "results" / "fidelity"
    shipped.mkdir(parents=True)
    (shipped / "fidelity.json").write_text("shipped")
    for _ in range(2):
        result = invoke(["eval", "--limit", "1", "--methods", "streaming", "--budgets", "128"])
        assert result.code == 0, result.err
    folders = sorted(p.name for p in tmp_path.glob("triattn-eval-*"))
    assert len(folders) == 2  # two runs in the same second get two folders
    for name in folders:
        data = json.loads((tmp_path / name / "fidelity.json").read_text())
        assert data["cells"][0]["method"] == "streaming" and (tmp_path / name / "fidelity.md").is_file()
    assert (shipped / "fidelity.json").read_text() == "shipped"
    named = tmp_path / "mine"
    assert invoke(["eval", "--limit", "1", "--methods", "streaming", "--budgets", "128", "--out", str(named)]).code == 0
    assert json.loads((named / "fidelity.json").read_text())["config"]["problems"] == 1


# ---- real processes -------------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "triattn_local.cli"]


def _env(root: Path) -> dict:
    return dict(os.environ, TRIATTN_CACHE=str(root / "cache"), TRIATTN_DATA_DIR=str(root / "data"),
                HF_HOME=str(root / "hf"), HOME=str(root / "home"), HF_HUB_OFFLINE="1", TRIATTN_DEBUG="", OMP_NUM_THREADS="1")


def assert_one_line(result: subprocess.CompletedProcess, word: str) -> None:
    err = result.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], err


def test_rejected_input_never_imports_torch(sandbox):
    """Mistakes are caught before the heavy imports: one process runs them all and checks sys.modules after each."""
    cases = [args for args, word, _ in hostile_cases(sandbox)
             if word and args[0] in ("run", "chat", "calibrate", "serve", "show", "pull", "eval")
             and "stats" not in " ".join(args[2:])] + [["run", "demo", "hi", "--stats", str(sandbox / "empty")]]
    script = (
        "import json, sys\n"
        "from triattn_local import cli\n"
        "bad = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['triattn', *args]\n"
        "    try:\n"
        "        cli.main()\n"
        "    except SystemExit as e:\n"
        "        if e.code != 2: bad.append([args, e.code])\n"
        "    if 'torch' in sys.modules: bad.append([args, 'imported torch']); break\n"
        "print(json.dumps(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", script, json.dumps(cases, ensure_ascii=False)], capture_output=True,
                       stdin=subprocess.DEVNULL, env=_env(sandbox), cwd=sandbox / "work", timeout=300,
                       errors="surrogateescape", text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == [], r.stdout
    assert len(cases) >= 40


def test_undecodable_argv_bytes(sandbox):
    r = subprocess.run([*CLI, "run", "demo", b"caf\xe9 \xff"], capture_output=True, env=_env(sandbox), timeout=120)
    assert_one_line(r, "not valid UTF-8 (byte 0xe9 at offset 3)")
    r = subprocess.run([*CLI, "run", b"/no/such/\xff", "hi"], capture_output=True, env=_env(sandbox), timeout=120)
    assert_one_line(r, "no such model directory")
    assert b"\\xff" in r.stderr


def test_stdin_that_is_not_utf8(sandbox):
    r = subprocess.run([*CLI, "run", "demo"], input=b"hello\xff\xfe", capture_output=True, env=_env(sandbox),
                       timeout=120)
    assert_one_line(r, "byte 0xff at offset 5")


def test_closed_stdout_exits_0_quietly(sandbox):
    """`triattn run demo ... | head -c1`: the reader has what it wanted; no error, no traceback, exit 0."""
    for args in (["run", "demo", "Count to ten.", "--max-tokens", "200", "--temperature", "0"],
                 ["list", "--available"], ["stats", "show", str(sandbox / "stats.safetensors")], ["--help"]):
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(sandbox))
        proc.stdout.read(1)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 0, (args, err)
        assert "Traceback" not in err and "error" not in err.lower(), (args, err)


def test_ctrl_c_stops_the_generation_and_keeps_its_output(sandbox):
    """SIGINT mid-generation ends it like a stop button: text so far, a summary saying cancelled, exit 0, and the KV
    trace written whole."""
    from triattn_local.demo.task import make_problem
    import random

    trace = sandbox / "work" / "sigint-trace.jsonl"
    prompt = make_problem(random.Random(1), steps=150).prompt
    proc = subprocess.Popen([*CLI, "run", "demo", "--temperature", "0", "--max-tokens", "4000", "--budget", "256",
                             "--divide-length", "16", "--window", "16", "--kv-trace", str(trace)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(sandbox))
    proc.stdin.write(prompt.encode())
    proc.stdin.close()
    first = proc.stdout.read(1)  # generation has begun
    assert first
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out = first + proc.stdout.read()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err
    summary = err.strip().splitlines()[-1]
    assert summary.endswith("cancelled]"), err
    generated = int(summary.split()[0].lstrip("["))
    assert 0 < generated < 4000 and out.strip()
    lines = trace.read_text().splitlines()
    assert lines  # the prompt alone needs rounds at this budget
    assert all(json.loads(line)["kept_positions"] is not None for line in lines)
    assert not [p for p in trace.parent.iterdir() if p.name.endswith(".tmp")]
