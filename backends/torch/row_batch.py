"""Continuous batching on the static cache: many sequences, each at its own length and position, decode in one
step (the server's batched decode).

One pair of K/V buffers [L, rows + 1, Hkv, C, D] is allocated once; each sequence owns a row while it lives. Its
prefill, its compression rounds and its snapshots run through a RowRunner, a StaticRunner over a view of that row,
so they are exactly what a lone sequence does. The decode step runs every decoding sequence as one lane of a
batch: lane b is cache row rows[b] at position positions[b], written to slot slots[b] (StaticKVModel.decode).
On a GPU the step is captured in a CUDA graph for each lane count it meets (powers of two); the spare lanes of a
graph point at the scratch row (the last one), which no sequence owns, so they touch nothing of anyone's.
"""

from __future__ import annotations

import copy

import torch

from .static_model import GraphedDecodeStep, StaticKVModel
from .static_runner import StaticRunner


class RowRunner(StaticRunner):
    """A StaticRunner over one row of a RowBatch's buffers: a batch of one whose cache is that row (a view), never
    reallocated. Its length is the row's filled slots; the batch's decode step advances it."""

    def __init__(self, owner: "RowBatch", row: int):
        super().__init__(owner.model, owner.capacity, use_graph=False)  # decode steps run batched, not here
        self.row = row
        self.model.k_cache = owner.model.k_cache[:, row:row + 1]
        self.model.v_cache = owner.model.v_cache[:, row:row + 1]
        self.batch = 1

    def _ensure_batch(self, batch: int, needed: int = 0) -> None:
        if batch != 1 or needed > self.capacity:
            raise RuntimeError(f"a batch row holds one sequence of at most {self.capacity} slots")

    def select_rows(self, rows: list[int]) -> None:
        if list(rows) != [0]:
            raise RuntimeError("a batch row holds one sequence")


class RowBatch:
    """rows sequences of at most `capacity` slots each (B + N with TriAttention). acquire() a RowRunner for a new
    sequence, decode() a token for each of many at once, release() the row when the sequence ends."""

    def __init__(self, model: StaticKVModel, rows: int, capacity: int, use_graph: bool | None = None):
        self.model = copy.copy(model)  # the weights shared; these buffers are this batch's own
        self.model.allocate(rows + 1, capacity)
        self.rows, self.capacity = rows, capacity
        self.scratch = rows  # the spare lanes' row
        self.device = model.lm_head.weight.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.free = list(range(rows))
        self.steps: dict[int, GraphedDecodeStep] = {}  # by lane count
        self.device_logits = False
        probe = RowRunner(self, self.scratch)
        self.model.fused_decode = probe.use_kernels
        if probe.use_kernels and self.device.type == "cuda":
            probe._compile_kernels()  # on the scratch row: compile and tune before the first token
        if self.use_graph and self.device.type == "cuda":  # every lane count's graph now, not mid-stream
            lanes = 1
            while lanes < 2 * rows:
                self._step(lanes)
                lanes *= 2

    def acquire(self) -> RowRunner | None:
        """A runner over a free row (emptied), or None when every row is taken."""
        if not self.free:
            return None
        runner = RowRunner(self, self.free.pop(0))
        runner.device_logits = self.device_logits
        return runner

    def release(self, runner: RowRunner) -> None:
        if runner.row in self.free or runner.row == self.scratch:
            raise RuntimeError(f"row {runner.row} is not taken")
        self.free.append(runner.row)
        self.free.sort()  # low rows first: the lanes of a step stay few

    def in_use(self) -> int:
        return self.rows - len(self.free)

    def lanes_for(self, n: int) -> int:
        """The lane count of a step for n sequences: the next power of two (on a GPU, where each is a graph)."""
        if not self.use_graph:
            return n
        lanes = 1
        while lanes < n:
            lanes *= 2
        return lanes

    def _step(self, lanes: int) -> GraphedDecodeStep:
        step = self.steps.get(lanes)
        if step is None:
            step = GraphedDecodeStep(self.model, lanes, False)
            step.rows.fill_(self.scratch)  # the capture's warm-up steps write the scratch row only
            if self.use_graph and self.device.type == "cuda":
                step._capture()
            self.steps[lanes] = step
        return step

    @torch.inference_mode()
    def decode(self, runners: list[RowRunner], tokens: list[int], positions: list[int]):
        """One token for each sequence (its runner, its last token, that token's RoPE position), in one step.
        Returns the logits [n, vocab]: a torch tensor on the GPU when device_logits is set, else numpy."""
        n = len(runners)
        lanes = self.lanes_for(n)
        spare = lanes - n
        for r in runners:
            if r.length >= self.capacity:
                raise RuntimeError(f"static KV cache full: row {r.row} holds {r.length} of {self.capacity} slots")
        ids = torch.tensor(list(tokens) + [0] * spare, dtype=torch.long).view(lanes, 1)
        logits = self._step(lanes)(ids.to(self.device, non_blocking=True),
                                   torch.tensor(list(positions) + [0] * spare, dtype=torch.long),
                                   torch.tensor([r.length for r in runners] + [0] * spare, dtype=torch.long),
                                   torch.tensor([r.row for r in runners] + [self.scratch] * spare, dtype=torch.long))
        for r in runners:
            r.length += 1
        logits = logits[:n].float()
        if self.device_logits and self.device.type == "cuda":
            return logits
        return logits.cpu().numpy()


def rows_that_fit(kv_bytes_per_row: int, budget_bytes: int, most: int) -> int:
    """How many rows of KV a memory budget holds (at least one, at most `most`)."""
    return int(max(1, min(most, budget_bytes // max(1, kv_bytes_per_row))))


def row_bytes(model: StaticKVModel, capacity: int, dtype: torch.dtype | None = None) -> int:
    """K+V bytes of one row of `capacity` slots."""
    p = model.lm_head.weight
    size = torch.finfo(dtype or p.dtype).bits // 8
    return 2 * model.num_layers * model.kv_heads * capacity * model.head_dim * size
