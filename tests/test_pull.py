"""`triattn pull`, `list`, `show`, `rm` against a local server that imitates the Hugging Face Hub (tests/fake_hub.py).

Most tests run the CLI in this process (huggingface_hub's endpoint, cache and offline settings monkeypatched, since it
reads them from the environment at import); the end-to-end ones run it as a subprocess with HF_ENDPOINT / HF_HOME /
HF_HUB_OFFLINE set, as a user would.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_hub import FakeHub
from triattn_local.errors import UserError

CLI = [sys.executable, "-m", "triattn_local.cli"]
TINY = "triattn-test/tiny"  # published stats
BARE = "triattn-test/tiny-bare"  # no stats: pull calibrates
AWQ = "triattn-test/tiny-AWQ"  # int4 AWQ weights, no stats
REGISTRY = {
    "models": {
        "tiny": {"description": "tiny test model", "default": {"torch": "f32"},
                 "tags": {"f32": {"torch": {"repo": TINY, "quant": "f32"}}}},
        "demo-gguf": {"description": "the demo model as a GGUF", "default": {"llamacpp": "q8"},
                      "tags": {"q8": {"llamacpp": {"repo": "triattn-test/demo-GGUF", "file": "demo-Q8_0.gguf",
                                                   "quant": "q8_0"}}}},
        "tiny-bare": {"description": "tiny test model without stats", "default": {"torch": "f32", "mlx": "f32"},
                      "tags": {"f32": {"torch": {"repo": BARE, "quant": "f32"}, "mlx": {"repo": BARE, "quant": "f32"}}}},
        "tiny-awq": {"description": "tiny test model in AWQ int4", "default": {"torch": "q4"},
                     "tags": {"q4": {"torch": {"repo": AWQ, "quant": "AWQ int4"}}}},
    },
    "aliases": {"tiny-int4": "tiny-awq:q4"},  # as qwen3-32b-int4 → qwen3-32b:q4
}


@pytest.fixture(scope="module")
def tiny_files(tiny_model_factory):
    model = tiny_model_factory("qwen3")
    return {p.name: p.read_bytes() for p in sorted(model.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def published_stats(tiny_model_factory, tmp_path_factory):
    from triattn_local.backends import load_engine

    engine = load_engine(str(tiny_model_factory("qwen3")), backend="torch")
    stats = engine.calibrate("The quick brown fox reasons step by step. " * 8, progress=False)
    path = tmp_path_factory.mktemp("published") / "triattn_stats.safetensors"
    stats.with_meta(model_id=TINY).save(path)
    return path.read_bytes()


@pytest.fixture
def hub(tiny_files, published_stats):
    with FakeHub() as h:
        h.add_repo(TINY, {**tiny_files, "triattn_stats.safetensors": published_stats})
        h.add_repo(BARE, tiny_files)
        h.add_repo("triattn-test/gated", tiny_files, gated=True)
        h.add_repo("triattn-test/pytorch-bin", {"config.json": tiny_files["config.json"], "pytorch_model.bin": b"x"})
        yield h


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        return [line for line in self.err.splitlines() if line.strip()][-1]


class Env:
    """Hub settings for this test: in-process (monkeypatched) and as environment variables for subprocesses."""

    def __init__(self, tmp_path, monkeypatch, capsys, hub):
        from huggingface_hub import constants

        self.hub, self.monkeypatch, self.capsys = hub, monkeypatch, capsys
        self.hf_home = tmp_path / "hf"
        self.hf_cache = self.hf_home / "hub"
        self.triattn_cache = tmp_path / "triattn"
        registry = tmp_path / "registry.json"
        registry.write_text(json.dumps(REGISTRY))
        monkeypatch.setenv("TRIATTN_CACHE", str(self.triattn_cache))
        monkeypatch.setenv("TRIATTN_REGISTRY", str(registry))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.hf_cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        self.point_at(hub.url)
        self.vars = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(self.hf_home),
                         TRIATTN_CACHE=str(self.triattn_cache), TRIATTN_REGISTRY=str(registry),
                         HF_HUB_DISABLE_TELEMETRY="1")
        self.vars.pop("HF_HUB_OFFLINE", None)

    def point_at(self, url: str) -> None:
        from huggingface_hub import constants

        self.monkeypatch.setattr(constants, "ENDPOINT", url)
        self.monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    def cli(self, *args) -> Result:
        from triattn_local.cli import main

        self.capsys.readouterr()
        self.monkeypatch.setattr(sys, "argv", ["triattn", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out, err = self.capsys.readouterr()
        return Result(e.value.code, out, err)

    def subprocess(self, *args, **extra) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300,
                              env=dict(self.vars, **extra))

    def snapshot(self, repo: str) -> Path:
        return self.hf_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / self.hub.repos[repo].sha

    def record(self, name: str = "tiny:f32") -> Path:
        return self.triattn_cache / "models" / f"{name.replace(':', '@')}.torch.json"


@pytest.fixture
def env(tmp_path, monkeypatch, capsys, hub):
    return Env(tmp_path, monkeypatch, capsys, hub)


def gets(hub, file):
    return [r for r in hub.requests("GET", file) if "/resolve/" in r.path]


def resolve_gets(hub):
    return [r for r in hub.requests("GET") if "/resolve/" in r.path]


def assert_same_files(snapshot: Path, files: dict):
    for name, data in files.items():
        assert (snapshot / name).read_bytes() == data, name


def test_new_commands_have_help():
    for cmd in ("pull", "list", "show", "rm"):
        r = subprocess.run(CLI + [cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


def test_pull_list_show_rm(env, hub):
    r = env.cli("pull", "tiny")
    assert r.code == 0, r.err
    snapshot = env.snapshot(TINY)
    assert_same_files(snapshot, hub.repos[TINY].files)
    assert "memory estimate" in r.err and "fits: weights + KV at budget 2048" in r.err
    weights = len(hub.repos[TINY].files["model.safetensors"]) / 1e6
    assert f"pulling {TINY}" in r.err and f"{weights:.1f}/{weights:.1f} MB" in r.err  # the final progress line
    assert "stats: published with the model" in r.err and r.last_line == "ready: triattn run tiny"
    assert all(len(gets(hub, f)) == 1 for f in hub.repos[TINY].files)
    record = json.loads(env.record().read_text())
    assert record["commit"] == hub.repos[TINY].sha and record["verified"] is True
    assert record["path"] == str(snapshot)

    again = env.cli("pull", "tiny")  # up to date: nothing is downloaded twice
    assert again.code == 0 and "already in" in again.err
    assert len(resolve_gets(hub)) == len(hub.repos[TINY].files)

    listing = env.cli("list")
    row = next(line for line in listing.out.splitlines() if line.startswith("tiny:f32"))
    assert row.split()[1:5] == ["torch", "2.7", "MB", "yes"] and str(env.hf_cache) in listing.out

    show = env.cli("show", "tiny")
    assert show.code == 0, show.err
    for expected in ("Qwen3ForCausalLM", "3 layers, 4 heads, 2 kv heads, head_dim 64", "4096 tokens",
                     "none (F32 weights)", f"{TINY} @ {hub.repos[TINY].sha[:12]}", "triattn calibrate",
                     "concentration"):
        assert expected in show.out, expected

    removed = env.cli("rm", "tiny")
    assert removed.code == 0 and "removed tiny:f32" in removed.err and "freed 2.7 MB" in removed.err
    assert not env.record().exists() and not snapshot.exists()
    assert not any(p.is_file() for p in (snapshot.parent.parent / "blobs").iterdir())
    assert "tiny" not in env.cli("list").out
    with pytest.raises(UserError, match="not pulled yet"):
        from triattn_local.registry import resolve_model

        resolve_model("tiny")
    gone = env.cli("rm", "tiny")
    assert gone.code == 2 and gone.err.startswith("error: tiny is not pulled")


@pytest.mark.parametrize("backend", ["torch", "mlx", "llamacpp"])
def test_pull_calibrates_then_run_works_offline(env, hub, backend):
    """End to end as a user runs it, on each installed backend that loads Hugging Face checkpoints: pull a model that
    publishes no stats (so pull calibrates), then run it with the network off."""
    from triattn_local.backends import installed

    if backend == "llamacpp":
        pytest.skip("llama.cpp runs GGUF files: test_pull_a_gguf_then_run_it_on_llamacpp")
    if not installed(backend):
        pytest.skip(f"the {backend} backend is not installed")
    r = env.subprocess("pull", "tiny-bare", "--calibration-tokens", "300", "--backend", backend)
    assert r.returncode == 0, r.stderr
    assert "calibrating on this machine" in r.stderr and "stats: calibrated here on 300 tokens" in r.stderr
    commit = hub.repos[BARE].sha
    stats_file = env.triattn_cache / "stats" / "hub" / BARE.replace("/", "--") / f"{commit}.safetensors"
    from triattn_local.rope import ModelShape
    from triattn_local.stats.format import QueryStats

    stats = QueryStats.load(stats_file)
    stats.check_matches(ModelShape.from_model_dir(env.snapshot(BARE)))
    assert (stats.meta.model_id, stats.meta.model_revision, stats.meta.calibration_tokens) == (BARE, commit, 300)
    requests_before = len(hub.log)
    run = env.subprocess("run", "tiny-bare", "Count to three.", "--max-tokens", "6", "--temperature", "0",
                         "--backend", backend, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert run.returncode == 0, run.stderr
    assert "calibrating" not in run.stderr and "tok/s" in run.stderr.splitlines()[-1]
    assert len(hub.log) == requests_before  # nothing asked of the Hub


def test_pull_an_awq_model_by_alias_then_run_it(env, hub, tiny_model_factory, tmp_path):
    """qwen3-32b-int4 on torch in small: an AWQ int4 repo pulled under an alias (calibrated at pull time through the
    static-cache model, which is what loads AWQ), then run offline with TriAttention."""
    from test_int4 import write_awq_checkpoint
    from triattn_local.backends import installed

    if not installed("torch"):
        pytest.skip("the torch backend is not installed")
    write_awq_checkpoint(tiny_model_factory("qwen3"), tmp_path / "awq", group=32)
    hub.add_repo(AWQ, tmp_path / "awq")
    r = env.subprocess("pull", "tiny-int4", "--calibration-tokens", "300", "--backend", "torch")
    assert r.returncode == 0, r.stderr
    assert "stats: calibrated here on 300 tokens" in r.stderr
    run = env.subprocess("run", "tiny-int4", "Count to three.", "--max-tokens", "30", "--temperature", "0",
                         "--budget", "24", "--divide-length", "8", "--window", "4", "--backend", "torch",
                         HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert run.returncode == 0, run.stderr
    summary = run.stderr.splitlines()[-1]
    assert "calibrating" not in run.stderr and "tok/s" in summary and " 0 compression rounds" not in summary


@pytest.fixture(scope="module")
def demo_gguf_bytes(tmp_path_factory):
    """The demo model converted by `triattn convert` (q8_0 weights), as a GGUF repo would publish it."""
    out = tmp_path_factory.mktemp("demo-gguf")
    r = subprocess.run(CLI + ["convert", "demo", "--to", "gguf", "-o", str(out), "--outtype", "q8_0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return (out / "model.gguf").read_bytes()


def test_pull_a_gguf_then_run_it_on_llamacpp(env, hub, demo_gguf_bytes):
    """llama.cpp's end to end: pull the GGUF build of a name (stats calibrated through llama.cpp at pull time), then
    run it with the network off: the demo solves a problem."""
    import random

    from triattn_local.backends import installed
    from triattn_local.demo.task import make_problem

    if not installed("llamacpp"):
        pytest.skip("the llamacpp backend is not installed")
    hub.add_repo("triattn-test/demo-GGUF", {"demo-Q8_0.gguf": demo_gguf_bytes, "README.md": b"demo"})
    r = env.subprocess("pull", "demo-gguf", "--calibration-tokens", "300", "--backend", "llamacpp")
    assert r.returncode == 0, r.stderr
    assert "calibrating through llama.cpp" in r.stderr and "stats: calibrated here on 300 tokens" in r.stderr
    assert [g.path.rsplit("/", 1)[-1] for g in gets(hub, "demo-Q8_0.gguf")] == ["demo-Q8_0.gguf"]
    assert not gets(hub, "README.md")  # only the chosen file is downloaded
    listed = env.subprocess("list")
    assert "demo-gguf" in listed.stdout and "llamacpp" in listed.stdout
    problem = make_problem(random.Random(2), steps=50)
    run = env.subprocess("run", "demo-gguf", problem.prompt, "--temperature", "0", "--budget", "736",
                         "--divide-length", "32", "--window", "320", HF_HUB_OFFLINE="1",
                         HF_ENDPOINT="http://127.0.0.1:9")
    assert run.returncode == 0, run.stderr
    assert "calibrating" not in run.stderr and f"The final value is {problem.answer}." in run.stdout


def test_dropped_connection_is_resumed_with_a_range_request(env, hub, tiny_model_factory, published_stats):
    """huggingface_hub keeps what it received in 10 MiB chunks, so the weights here are ~22 MB (a wider MLP: the
    attention shape, and so the published stats, stay the tiny model's)."""
    wide = tiny_model_factory("qwen3", intermediate_size=4096)
    files = {p.name: p.read_bytes() for p in wide.iterdir() if p.is_file()}
    files["triattn_stats.safetensors"] = published_stats
    hub.add_repo("triattn-test/tiny-wide", files)
    size = len(files["model.safetensors"])
    hub.faults.drop_after["model.safetensors"] = 15_000_000
    r = env.cli("pull", "triattn-test/tiny-wide")
    assert r.code == 0, r.err
    first, second = gets(hub, "model.safetensors")
    start = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert first.sent == 15_000_000 and second.status == 206 and 0 < start <= first.sent
    assert second.sent == size - start  # resumed where the kept bytes end, not restarted
    assert_same_files(env.snapshot("triattn-test/tiny-wide"), files)


def test_killed_pull_is_not_listed_and_resumes_with_the_files_it_finished(env, hub):
    hub.faults.stall_after["model.safetensors"] = 1_000_000
    proc = subprocess.Popen(CLI + ["pull", "tiny"], env=env.vars, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert hub.faults.stalled.wait(timeout=120), "the pull never reached the weights"
        small = [f for f in hub.repos[TINY].files if f != "model.safetensors"]
        deadline = time.time() + 30
        while not all((env.snapshot(TINY) / f).exists() for f in small) and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # as a power cut or a closed laptop would
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        hub.faults.release.set()
    assert not env.record().exists()
    assert "tiny" not in env.cli("list").out
    from triattn_local.registry import resolve_model

    with pytest.raises(UserError, match="not pulled yet"):
        resolve_model("tiny")
    partials = list((env.snapshot(TINY).parent.parent / "blobs").glob("*.incomplete"))
    assert partials  # the killed download's temporary file
    for p in partials:
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    r = env.cli("pull", "tiny")
    assert r.code == 0, r.err
    assert not any(p.exists() for p in partials)  # stale partial downloads are cleaned up
    assert all(len(gets(hub, f)) == 1 for f in small)  # finished files were kept
    assert len(gets(hub, "model.safetensors")) == 2
    assert_same_files(env.snapshot(TINY), hub.repos[TINY].files)


def test_offline_mode_uses_the_cache_and_says_what_is_missing(env, hub):
    from huggingface_hub import constants, snapshot_download

    snapshot_download(TINY)  # as another tool would have downloaded it: no triattn record
    requests_before = len(hub.log)
    r = env.subprocess("pull", "tiny", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert "offline: using triattn-test/tiny from the Hugging Face cache" in r.stderr
    assert "stats: published with the model" in r.stderr and env.record().exists()
    assert len(hub.log) == requests_before
    env.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    missing = env.cli("pull", "tiny-bare")
    assert missing.code == 2 and missing.err.count("\n") == 1
    assert "offline (HF_HUB_OFFLINE is set)" in missing.err and BARE in missing.err
    assert len(hub.log) == requests_before


def test_clear_errors_for_bad_names_and_repos(env, hub, tmp_path):
    cases = [
        (("pull", "qwen3-9b"), "unknown model 'qwen3-9b': did you mean qwen3-8b"),
        (("pull", "tiny:q4"), "tiny has no tag 'q4'"),
        (("pull", "nobody/nothing"), "nobody/nothing: no such repository on the Hugging Face Hub"),
        (("pull", "triattn-test/gated"), "triattn-test/gated is gated on the Hugging Face Hub"),
        (("pull", "triattn-test/pytorch-bin"), "has no config.json and safetensors weights"),
        (("pull", "tiny", "--budget", "0"), "--budget"),
        (("pull", tmp_path / "nowhere"), "no such model directory"),
        (("show", "tiny"), "tiny is not pulled yet: run `triattn pull tiny`"),
    ]
    for args, message in cases:
        r = env.cli(*args)
        assert r.code == 2, (args, r.err)
        assert r.err.count("\n") == 1 and r.err.startswith("error: ") and message in r.err, (args, r.err)
    env.point_at("http://127.0.0.1:9")  # nothing listens there
    r = env.cli("pull", "tiny")
    assert r.code == 2 and "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in r.err
    assert not env.record().exists()


def test_gated_files_are_refused_even_when_the_listing_is_not(env, hub, monkeypatch):
    """With a token (but no access) the gate shows up only when a file is fetched."""
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    r = env.cli("pull", "triattn-test/gated")
    assert r.code == 2 and "is gated" in r.last_line and "hf auth login" in r.last_line


def test_full_disk_is_a_clear_error_and_registers_nothing(env, hub, monkeypatch):
    from collections import namedtuple

    import huggingface_hub.file_download as fd
    import triattn_local.pull as pull

    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(pull.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
        r = env.cli("pull", "tiny")
    assert r.code == 2 and "not enough disk space for triattn-test/tiny: 2.7 MB to download, 1.0 KB free" in r.last_line
    assert not gets(hub, "model.safetensors")

    real_http_get = fd.http_get

    def fill_disk(url, temp_file, **kwargs):
        if not url.endswith("model.safetensors"):
            return real_http_get(url, temp_file, **kwargs)
        temp_file.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(fd, "http_get", fill_disk)
        r = env.cli("pull", "tiny")
    assert r.code == 2 and r.last_line.startswith("error: disk full while downloading triattn-test/tiny")
    assert not env.record().exists()
    blobs = env.snapshot(TINY).parent.parent / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    assert not (env.snapshot(TINY) / "model.safetensors").exists()
    r = env.cli("pull", "tiny")  # with space again: only the missing file is fetched
    assert r.code == 0, r.err
    assert len(gets(hub, "config.json")) == 1 and env.record().exists()


def test_corrupted_downloads_are_fetched_again_or_refused(env, hub):
    hub.faults.corrupt["model.safetensors"] = 1  # one bad transfer
    r = env.cli("pull", "tiny")
    assert r.code == 0, r.err
    assert "model.safetensors: corrupt (checksum mismatch): downloading again" in r.err
    assert_same_files(env.snapshot(TINY), hub.repos[TINY].files)

    env.cli("rm", "tiny")
    hub.faults.corrupt["model.safetensors"] = 2  # bad twice: give up, say how to retry, keep nothing
    r = env.cli("pull", "tiny")
    assert r.code == 2 and "did not match the Hub's checksum twice" in r.last_line and "--force" in r.last_line
    assert not env.record().exists() and not (env.snapshot(TINY) / "model.safetensors").exists()


def test_damaged_cache_is_repaired_by_pulling_again_and_force_refetches(env, hub):
    assert env.cli("pull", "tiny").code == 0
    weights = env.snapshot(TINY) / "model.safetensors"
    blob = Path(os.path.realpath(weights))
    data = bytearray(blob.read_bytes())
    data[5000:5100] = bytes(100)  # bit rot, same size
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    r = env.cli("pull", "tiny")
    assert r.code == 0 and "corrupt (checksum mismatch)" in r.err
    assert weights.read_bytes() == hub.repos[TINY].files["model.safetensors"]
    before = len(resolve_gets(hub))
    assert env.cli("pull", "tiny", "--force").code == 0
    assert len(resolve_gets(hub)) == before + len(hub.repos[TINY].files)


def write_gguf(path: Path, metadata: dict, tensors: dict) -> None:
    """A minimal GGUF v3 file: key/values (str, u32, f32) and F32 tensors."""
    import struct

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        if isinstance(value, str):
            out += string(key) + struct.pack("<I", 8) + string(value)
        elif isinstance(value, float):
            out += string(key) + struct.pack("<If", 6, value)
        else:
            out += string(key) + struct.pack("<II", 4, value)
    offset, data = 0, b""
    for name, dims in tensors.items():
        out += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)
        n = 4
        for d in dims:
            n *= d
        data += bytes(n)
        offset += n
    out += bytes(-len(out) % 32)
    path.write_bytes(out + data)


def test_show_describes_a_gguf_model(env, tmp_path):
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    write_gguf(folder / "model.gguf", {
        "general.architecture": "qwen3", "general.file_type": 15, "qwen3.block_count": 2,
        "qwen3.attention.head_count": 4, "qwen3.attention.head_count_kv": 2, "qwen3.embedding_length": 256,
        "qwen3.attention.key_length": 64, "qwen3.context_length": 8192, "qwen3.rope.freq_base": 1000000.0,
    }, {"token_embd.weight": [256, 10], "output.weight": [256, 10]})
    r = env.cli("show", folder)
    assert r.code == 0, r.err
    for expected in ("Qwen3ForCausalLM", "2 layers, 4 heads, 2 kv heads, head_dim 64, hidden 256", "8192 tokens",
                     "GGUF Q4_K_M", "0.01 M", "none yet"):
        assert expected in r.out, expected
