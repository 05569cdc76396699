"""A decoder with a pre-allocated, bounded KV cache whose decode step is captured in a CUDA graph (gpt-fast style).

TriAttention bounds the cache to B + N slots, so every decode step has the same shapes: attention always runs over
the whole buffer of `capacity` slots, with a mask that hides the slots not filled yet. The step is captured once
in a CUDA graph and replayed; every N tokens, between replays, the cache is scored and compacted in place (Triton
kernels, kernels.py), so the buffers keep their addresses and the graph stays valid. The reference vLLM plugin has
to run eagerly; this is the point of bounding the cache.

Slots hold keys in position order (compaction keeps ascending slots, new tokens go after the last filled slot),
so "slot ≤ the query's own slot" is the causal mask. Keys keep their original RoPE positions: the position of a new
token and the slot it is written to are separate inputs.

The module mirrors transformers' parameter names (model.layers.i.self_attn.q_proj …) for Qwen3, Qwen2 and Llama,
so an HF checkpoint's state dict loads as is; the rotary embedding is transformers' own for that architecture
(default, linear, llama3 and yarn scaling alike). Loading fuses q/k/v into one qkv_proj and gate/up into one
gate_up_proj (gpt-fast style): a decode step then reads each layer's weights in four matrix products. On a GPU the
decode step runs the fused Triton kernels of decode_kernels.py between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        hidden = cfg["hidden_size"]
        qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False))
        self.qkv_proj = nn.Linear(hidden, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bool(cfg.get("attention_bias", False))
                                and cfg.get("model_type") != "qwen2")
        # The pre-RoPE query is q_norm's output in every architecture (an identity where there is no q/k norm):
        # calibration hooks it.
        if cfg.get("model_type") == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
            self.k_norm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
        else:
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.scale = self.head_dim ** -0.5

    def split_sizes(self) -> list[int]:
        return [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask, rows=None):
        """x [B, n, hidden]; k/v_cache [B, Hkv, C, D] written at `slots` [n]; mask [n, C] bool (True = attend).
        With rows [B] (one token per lane, continuous batching): lane b is cache row rows[b], written at slots[b];
        k/v_cache then have any number of rows and mask is [B, 1, 1, C]."""
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes(), dim=-1)
        q = self.q_norm(q.view(b, n, self.heads, self.head_dim))
        k = self.k_norm(k.view(b, n, self.kv_heads, self.head_dim))
        v = v.view(b, n, self.kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, n, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if rows is None:
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
        else:
            k_cache[rows, :, slots] = k[:, :, 0].to(k_cache.dtype)
            v_cache[rows, :, slots] = v[:, :, 0].to(v_cache.dtype)
            k_cache, v_cache = k_cache[rows], v_cache[rows]
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)  # gate rows, then up rows
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# Fused projection → the checkpoint's projections it concatenates (along the output dimension).
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
_AWQ_TENSORS = ("qweight", "qzeros", "scales")  # [K, N…]: their output dimension is the last one


def fuse_state_dict(state: dict, num_layers: int) -> dict:
    """A checkpoint's state dict (HF names) with each layer's q/k/v and gate/up tensors concatenated into the fused
    projections', layer by layer (the parts are dropped as they are merged, so memory grows by one layer at most)."""
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            for tensor in ("weight", "bias") + _AWQ_TENSORS:
                names = [f"{prefix}{p}.{tensor}" for p in parts]
                if all(n in state for n in names):
                    dim = 1 if tensor in _AWQ_TENSORS else 0
                    state[f"{prefix}{fused}.{tensor}"] = torch.cat([state.pop(n) for n in names], dim=dim)
    return state


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class Decoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class StaticKVModel(nn.Module):
    """Qwen3 / Qwen2 / Llama with a static KV cache of `capacity` slots per (row, layer, KV head)."""

    def __init__(self, config, rotary: nn.Module):
        super().__init__()
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_word_embeddings"):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = rotary  # transformers' own rotary embedding of this architecture
        quant = cfg.get("quantization_config") or {}
        if quant:
            self._quantize_linears(quant)
        attn = self.model.layers[0].self_attn
        self.num_layers, self.kv_heads, self.head_dim = len(self.model.layers), attn.kv_heads, attn.head_dim
        self.k_cache: torch.Tensor | None = None  # [L, B, Hkv, C, D]
        self.v_cache: torch.Tensor | None = None
        self.fused_decode = False  # decode steps through decode_kernels (Triton): set where Triton can run

    def _quantize_linears(self, quant: dict) -> None:
        """Swap the attention and MLP projections for int4 AWQ layers (embeddings and lm_head stay as they are)."""
        from .int4 import AWQLinear

        method, bits = str(quant.get("quant_method", "")).lower(), quant.get("bits", 4)
        if method != "awq" or bits != 4 or str(quant.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"unsupported quantization {method} {bits}-bit {quant.get('version')} "
                             "(supported: AWQ 4-bit GEMM, e.g. Qwen/Qwen3-32B-AWQ)")
        group = quant.get("group_size", 128)
        for block in self.model.layers:
            for parent in (block.self_attn, block.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, AWQLinear(child.in_features, child.out_features, group,
                                                        bias=child.bias is not None))

    @classmethod
    def from_pretrained(cls, path, device: str, dtype: torch.dtype) -> "StaticKVModel":
        """Load a model directory's safetensors straight into this module (int4 AWQ checkpoints included, which
        transformers itself cannot load without extra packages)."""
        from pathlib import Path

        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
            model = cls(config, None)
        with torch.device(device):
            model.rotary = type(skeleton.model.rotary_emb)(config)
        state = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            if file.name != "triattn_stats.safetensors":
                state.update(load_file(str(file), device=device))
        state = {k: (v.to(dtype) if v.is_floating_point() and "scales" not in k else v) for k, v in state.items()}
        state = fuse_state_dict(state, model.num_layers)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = model.cfg.get("tie_word_embeddings")
        missing = [m for m in missing if not m.startswith("rotary.") and not (tied and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "StaticKVModel":
        """The same weights as a loaded transformers model, held once: each layer's q/k/v (gate/up) weights are
        concatenated into the fused projection and the transformers model's own projections are re-pointed at
        slices of it, so both models keep working and no second copy of the weights stays in memory."""
        with torch.device("meta"):  # no memory and no random init: the weights come from hf_model
            model = cls(hf_model.config, None)
        model.rotary = hf_model.model.rotary_emb
        fused_names = {f"{p}.{t}" for parts in FUSED.values() for p in parts for t in ("weight", "bias")}
        state = {k: v for k, v in hf_model.state_dict().items()
                 if not any(k.endswith(n) for n in fused_names)}
        for i, hf_layer in enumerate(hf_model.model.layers):
            for fused, parts in FUSED.items():
                linears = [hf_layer.get_submodule(p) for p in parts]
                for tensor in ("weight", "bias"):
                    params = [getattr(lin, tensor) for lin in linears]
                    if params[0] is None:
                        continue
                    whole = torch.cat([p.data for p in params])
                    for param, view in zip(params, whole.split([p.shape[0] for p in params])):
                        param.data = view
                    state[f"model.layers.{i}.{fused}.{tensor}"] = whole
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith("rotary.")]
        if missing or [u for u in unexpected if "rotary" not in u]:
            raise ValueError(f"weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if model.cfg.get("tie_word_embeddings"):
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(next(hf_model.parameters()).device).eval()

    def allocate(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> None:
        """(Re)allocate the cache buffers: the only allocation of KV memory, done once."""
        p = self.lm_head.weight
        shape = (self.num_layers, batch, self.kv_heads, capacity, self.head_dim)
        self.k_cache = torch.zeros(shape, device=p.device, dtype=dtype or p.dtype)
        self.v_cache = torch.zeros(shape, device=p.device, dtype=dtype or p.dtype)

    @property
    def capacity(self) -> int:
        return self.k_cache.shape[3]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] at RoPE positions [n], written to cache slots [n] (ascending, contiguous); returns the
        logits [B, vocab] of the last token. Queries see every slot up to their own."""
        if tokens.shape[1] == 1 and self.fused_decode:
            batch = tokens.shape[0]
            lanes = torch.arange(batch, device=tokens.device)
            return self.decode_step(tokens, positions.expand(batch), slots.expand(batch), lanes)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(x, positions[None])  # [1, n, D]
        cos, sin = cos[:, None], sin[:, None]
        mask = torch.arange(self.capacity, device=tokens.device)[None, :] <= slots[:, None]  # [n, C]
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, self.k_cache[i], self.v_cache[i], slots,
                                    mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x[:, -1]))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
        """One token per lane, each lane at its own position and slot in its own cache row (continuous batching:
        sequences of different lengths decode together): tokens [B, 1]; positions, slots, rows [B]. Lane b
        attends to slots 0..slots[b] of cache row rows[b]. Returns the logits [B, vocab]."""
        if self.fused_decode:
            return self.decode_step(tokens, positions, slots, rows)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(x, positions[:, None])  # [B, 1, D]
        cos, sin = cos[:, None], sin[:, None]
        mask = (torch.arange(self.capacity, device=tokens.device)[None, :] <= slots[:, None])[:, None, None]
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, self.k_cache[i], self.v_cache[i], slots,
                                    mask, rows)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x[:, -1]))

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
        """decode with the fused Triton kernels: per layer a norm, the qkv product, one kernel for q/k norm +
        rotary + cache write, attention over the filled slots, o_proj, a residual norm, gate/up, the activation
        and down. The residual stream is updated in place by the norms."""
        from . import decode_kernels as dk

        batch = tokens.shape[0]
        residual = self.model.embed_tokens(tokens[:, 0])  # [B, hidden]
        cos, sin = self.rotary(residual[:, None], positions[:, None])
        cos, sin = cos.reshape(batch, -1), sin.reshape(batch, -1)  # [B, D]: each lane at its own position
        delta = None
        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            ln = layer.input_layernorm
            h = dk.rms_norm(residual, ln.weight, ln.eps) if delta is None else \
                dk.rms_norm(delta, ln.weight, ln.eps, residual=residual)
            norm = isinstance(attn.q_norm, RMSNorm)
            q = dk.qk_norm_rope_cache(dk.linear(h, attn.qkv_proj), attn.q_norm.weight if norm else None,
                                      attn.k_norm.weight if norm else None, attn.q_norm.eps if norm else 0.0,
                                      cos, sin, self.k_cache[i], self.v_cache[i], slots, attn.heads, rows)
            out = dk.decode_attention(q, self.k_cache[i], self.v_cache[i], slots, attn.scale, rows)
            delta = dk.linear(out.reshape(batch, -1), attn.o_proj)
            ln = layer.post_attention_layernorm
            h = dk.rms_norm(delta, ln.weight, ln.eps, residual=residual)
            delta = dk.linear(dk.silu_mul(dk.linear(h, mlp.gate_up_proj)), mlp.down_proj)
        h = dk.rms_norm(delta, self.model.norm.weight, self.model.norm.eps, residual=residual)
        return self.lm_head(h)


class GraphedDecodeStep:
    """One decode step (a token per lane) captured in a CUDA graph; on a CPU it simply calls the model.

    Inputs are copied into static tensors before each replay: the token ids and each lane's RoPE position, slot
    and cache row (by default lane b is row b)."""

    def __init__(self, model: StaticKVModel, batch: int, use_graph: bool):
        device = model.lm_head.weight.device
        self.model = model
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)
        self.graph = None
        self.logits = None
        if use_graph:
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (kernel selection, autotune)
            for _ in range(2):
                self.model.decode(self.tokens, self.positions, self.slots, self.rows)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode(self.tokens, self.positions, self.slots, self.rows)

    @staticmethod
    def _set(static: torch.Tensor, value) -> None:
        if isinstance(value, int):
            static.fill_(value)
        else:
            static.copy_(torch.as_tensor(value, dtype=static.dtype), non_blocking=True)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions, slots, rows=None) -> torch.Tensor:
        """Logits [B, vocab] of tokens [B, 1]; positions, slots (and rows): an int for every lane, or one per lane."""
        self.tokens.copy_(tokens)
        self._set(self.positions, positions)
        self._set(self.slots, slots)
        if rows is not None:
            self._set(self.rows, rows)
        if self.graph is None:
            return self.model.decode(self.tokens, self.positions, self.slots, self.rows)
        self.graph.replay()
        return self.logits
