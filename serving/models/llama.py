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
from .rope import rope_cos_sin
from .step_ops import TORCH_OPS, StepOps


class RMSNorm(nn.Module):
    """Holds the norm's weight; the model applies it through its `StepOps` (with the residual add fused)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)


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
        ops: StepOps,
    ) -> torch.Tensor:
        # x: [T, hidden]; cos, sin: [T, head_dim]; cache: [2, slots, kv_heads, head_dim]
        qkv = ops.rope(self.qkv(x, deltas), cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, cache, meta, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size), deltas)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        parts = {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
        self.gate_up = AdapterLinear(layer_idx, cfg.hidden_size, parts)
        self.down_proj = AdapterLinear(layer_idx, cfg.intermediate_size, {"down_proj": cfg.hidden_size})

    def forward(self, x: torch.Tensor, deltas: LinearDeltas | None, ops: StepOps) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up(x, deltas)), deltas)


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
        # The element-wise work between products: torch's ops, or compiled ones (step_ops.py), chosen once.
        self.ops: StepOps = TORCH_OPS
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
        ops = self.ops
        residual = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(residual.dtype)
        sin = self.rope_sin[positions].to(residual.dtype)
        # Each norm after the first adds the previous block's output into the residual stream as it normalises it.
        norms = [*(layer.input_layernorm for layer in self.layers), self.norm]
        x = ops.rms_norm(residual, norms[0].weight, norms[0].eps)
        for i, layer in enumerate(self.layers):
            post = layer.post_attention_layernorm
            attn = layer.self_attn(x, cos, sin, kv_cache[i], meta, deltas, ops)
            x, residual = ops.add_rms_norm(attn, residual, post.weight, post.eps)
            x, residual = ops.add_rms_norm(layer.mlp(x, deltas, ops), residual, norms[i + 1].weight, norms[i + 1].eps)
        return x

    def logits_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, vocab] in float32 (sampling and logprobs want full precision)
        return self.logits_matmul(hidden, self.logits_weight()).float()
