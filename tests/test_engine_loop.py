"""The shared generation loop on a scripted model: stop strings are never shown, not even their beginning."""

from types import SimpleNamespace

import numpy as np

from triattn_local.engine import DoneEvent, Engine, SequenceRunner, TextEvent
from triattn_local.sampling import Sampler, SamplingParams

EOS = 0


class CharTokenizer:
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i != EOS)


class ScriptedRunner:
    """Logits that make greedy decoding write `script`, then EOS."""

    def __init__(self, script: str):
        self.ids = [ord(c) for c in script] + [EOS]
        self.step = 0

    def forward(self, token_ids, start_position):
        logits = np.zeros((len(token_ids), 256), dtype=np.float32)
        logits[:, self.ids[min(self.step, len(self.ids) - 1)]] = 1.0
        self.step += 1
        return logits

    def reset(self):
        self.step = 0


class ScriptedEngine(Engine):
    backend = "scripted"
    shape = SimpleNamespace(num_layers=1, num_heads=4, num_kv_heads=2)
    kv_bytes_per_token = 0
    context_length = 4096

    def __init__(self, script):
        self.tokenizer = CharTokenizer()
        self.script = script

    def new_runner(self, scorer=None, capacity=None):
        return ScriptedRunner(self.script)

    def new_sequence_runner(self, scorer=None, capacity=None):
        return SequenceRunner(self.new_runner())


def texts(script, stop, max_tokens=100):
    session = ScriptedEngine(script).session()
    events = list(session.generate([ord("?")], SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop)))
    return [e.text for e in events if isinstance(e, TextEvent)], events[-1]


def test_a_stop_string_is_cut_and_its_beginning_never_streamed():
    chunks, done = texts("abc</s>def", ["</s>"])
    assert "".join(chunks) == "abc"
    assert not any("<" in c for c in chunks)
    assert isinstance(done, DoneEvent) and done.finish_reason == "stop"


def test_only_text_before_the_first_stop_string_is_shown():
    chunks, done = texts("abc STOP more <end>", ["STOP", "<end>"])
    assert "".join(chunks) == "abc " and done.finish_reason == "stop"
    chunks, _ = texts("abc ST", ["STOP"])  # ended otherwise: the held text was not a stop string
    assert "".join(chunks) == "abc ST"
    chunks, _ = texts("STOP", [])
    assert "".join(chunks) == "STOP"


def test_held_back_text_that_is_not_a_stop_string_is_flushed():
    chunks, done = texts("ab<x</", ["<y", "</q>"])  # ends (EOS) while "</" could still begin "</q>"
    assert "".join(chunks) == "ab<x</"
    assert done.finish_reason == "stop"
    chunks, done = texts("ab<<<<", ["<y"], max_tokens=4)  # cut by length while holding "<"
    assert "".join(chunks) == "ab<<" and done.finish_reason == "length"


def test_a_tiny_temperature_samples_like_greedy():
    logits = np.array([0.0, 3.0, 2.999, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=2e-308, seed=0))
    assert [sampler(logits) for _ in range(5)] == [1] * 5


def test_auto_pruning_mode_is_what_the_backend_can_do():
    from triattn_local.engine import CompressionSettings
    from triattn_local.policy import BudgetPolicy

    class GlobalOnly(ScriptedEngine):
        pruning_modes = ("global",)

    engine = ScriptedEngine("x")
    assert engine.default_pruning_mode() == "per_head" and GlobalOnly("x").default_pruning_mode() == "global"
    policy = BudgetPolicy(64, 16, 8, 2, pruning_mode="auto")
    settings = CompressionSettings(policy=policy, method="streaming")
    assert GlobalOnly("x").session(settings).compression.policy.pruning_mode == "global"
    assert policy.pruning_mode == "auto"  # the caller's settings are left as they were


class DeviceScriptedRunner(ScriptedRunner):
    """Returns its logits as a torch tensor once a loop asks for device logits (as the CUDA runners do)."""

    def __init__(self, script):
        super().__init__(script)
        self.device_logits = False

    def forward(self, token_ids, start_position):
        import torch

        logits = super().forward(token_ids, start_position)
        return torch.from_numpy(logits) if self.device_logits else logits


def test_the_loop_samples_logits_left_on_the_device():
    """A runner that can keep logits on its device is asked to, and the loop samples the tensors it returns."""
    import pytest

    pytest.importorskip("torch")
    runner = DeviceScriptedRunner("hello")
    engine = ScriptedEngine("hello")
    engine.new_sequence_runner = lambda scorer=None, capacity=None: SequenceRunner(runner)
    events = list(engine.session().generate([ord("?")], SamplingParams(max_tokens=20, temperature=0)))
    assert runner.device_logits
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == "hello"
