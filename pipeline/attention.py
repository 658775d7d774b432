"""Cached self-attention for diffusers' Wan blocks.

`CachedSelfAttention` replaces the processor of ``blocks[i].attn1``. It projects and normalises exactly like
diffusers' `WanAttnProcessor`, applies RoPE at the *absolute* latent-frame indices of the current pass (diffusers
always starts at frame 0), writes the pass's keys (after RoPE) and values into the `KVCache`, and attends over
``[sink | cached window | current pass]``. The per-pass inputs (cache, rotary table) live in one `PassState` shared
by the processors of a model; the backend sets it before each forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.kv_cache import KVCache
from pipeline.rope import apply_rope


@dataclass
class PassState:
    """What one forward pass of the causal model attends with: the cache and the rotary tables of its tokens."""

    cache: KVCache | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


class CachedSelfAttention:
    """Processor for the self-attention (``attn1``) of block ``layer``: reads and writes a `KVCache`."""

    def __init__(self, layer: int, state: PassState) -> None:
        self.layer = layer
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, n, dim]`` -> ``[B, n, dim]``; diffusers' ``rotary_emb`` (from frame 0) is ignored."""
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        # [B, n, heads*head_dim] -> [B, n, heads, head_dim]
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if self.state.rotary is not None:
            query = apply_rope(query, *self.state.rotary)
            key = apply_rope(key, *self.state.rotary)
        # [B, n, heads, head_dim] -> [B, heads, n, head_dim]
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        cache, mask = self.state.cache, None
        if cache is not None:
            key, value = cache.attend(self.layer, key, value)
            mask = cache.attention_mask(query.shape[2])
        out = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)  # [B, n, heads*head_dim]
        return attn.to_out[1](attn.to_out[0](out))
