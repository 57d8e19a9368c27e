"""A compact Llama-family decoder (Llama, Mistral, Qwen2) over a flattened token batch and a paged KV cache.

RMSNorm, RoPE (plain, linear, llama3), grouped-query attention, SwiGLU, optional q/k/v bias, tied embeddings.
Every projection is an `AdapterLinear`; the model stays plain and adapters arrive per step as `LinearDeltas`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, paged_attention
from .config import ModelConfig
from .linear import AdapterLinear, LinearDeltas
from .rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as transformers does, then scale in the model's dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        parts = {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size}
        self.qkv = AdapterLinear(layer_idx, cfg.hidden_size, parts, bias=cfg.qkv_bias)
        self.o_proj = AdapterLinear(layer_idx, cfg.q_size, {"o_proj": cfg.hidden_size})

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
        deltas: LinearDeltas | None,
    ) -> torch.Tensor:
        # x: [T, hidden]; cos, sin: [T, 1, head_dim]; cache: [2, slots, kv_heads, head_dim]
        qkv = self.qkv(x, deltas)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = apply_rope(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, cache, meta, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size), deltas)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        parts = {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
        self.gate_up = AdapterLinear(layer_idx, cfg.hidden_size, parts)
        self.down_proj = AdapterLinear(layer_idx, cfg.intermediate_size, {"down_proj": cfg.hidden_size})

    def forward(self, x: torch.Tensor, deltas: LinearDeltas | None) -> torch.Tensor:
        gate, up = self.gate_up(x, deltas).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up, deltas)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx)


class LlamaModel(nn.Module):
    """Maps a flattened batch of token ids to hidden states, reading and writing the paged KV cache."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        )
        # The logits product `logits_matmul(hidden, logits_weight())`: F.linear, or a packed one (prepack.py).
        self.logits_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
        self.rope_cos = self.rope_sin = torch.empty(0)
        self.set_max_positions(max_positions)

    def set_max_positions(self, max_positions: int) -> None:
        """(Re)build the float32 RoPE tables on the model's device; call again after moving the model."""
        device = self.embed_tokens.weight.device
        cos, sin = rope_cos_sin(self.cfg, max_positions)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def linears(self) -> list[AdapterLinear]:
        return [m for m in self.modules() if isinstance(m, AdapterLinear)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        deltas: LinearDeltas | None = None,
    ) -> torch.Tensor:
        # input_ids, positions: [T]; kv_cache: [layers, 2, slots, kv_heads, head_dim] -> hidden [T, hidden]
        h = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(h.dtype)[:, None, :]
        sin = self.rope_sin[positions].to(h.dtype)[:, None, :]
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, kv_cache[i], meta, deltas)
            h = h + layer.mlp(layer.post_attention_layernorm(h), deltas)
        return self.norm(h)

    def logits_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, vocab] in float32 (sampling and logprobs want full precision)
        return self.logits_matmul(hidden, self.logits_weight()).float()
