"""Cached self- and cross-attention processors for diffusers' Wan blocks.

`CachedSelfAttention` (every ``attn1``) projects like diffusers' `WanAttnProcessor` but applies RoPE at absolute
frame indices, writes the pass's K/V into the `KVCache` and attends over ``[sink | window | pass]``;
`CachedCrossAttention` (every ``attn2``) projects the prompt's K/V once per batch (`TextKV`). Per-pass inputs live in
one `PassState`. The static path (compile) attends over the whole fixed-capacity buffer with a length mask, so every
shape is fixed and one compiled graph serves all blocks and passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.model.kv_cache import KVCache, StaticPass
from pipeline.model.rope import apply_rope


@dataclass
class TextKV:
    """The cross-attention keys and values ``[B, heads, text_len, head_dim]`` of each block for one prompt batch.

    ``source`` is the prompt-embedding tensor they were computed for; `matches` says whether a pass's embeddings are
    that very tensor, unmodified (same object, same in-place version), so the K/V can be reused."""

    source: torch.Tensor
    version: int
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def matches(self, text: torch.Tensor) -> bool:
        return text is self.source and text._version == self.version


@dataclass
class PassState:
    """What one forward pass of the causal model attends with."""

    cache: KVCache | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    layer: int = 0  # the block being run (set by a forward pre-hook of each block)
    text_kv: TextKV | None = None  # the prompt K/V of the current pass; None: projected in every pass
    static: StaticPass | None = None  # set: attend over the full fixed-capacity buffers (compile path)
    # the current block's tensors, set by the pre-hook so that compiled code never indexes by a Python int
    layer_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    layer_text: tuple[torch.Tensor, torch.Tensor] | None = None


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, n, heads*head_dim]`` -> ``[B, heads, n, head_dim]``."""
    return t.unflatten(2, (heads, -1)).transpose(1, 2)


def text_kv_for(attn: Any, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention ``(key, value)`` ``[B, heads, text_len, head_dim]`` of ``attn`` for embedded ``text``,
    projected and normalised as diffusers' `WanAttnProcessor` does (T2V: no image branch)."""
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(text).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text), attn.to_v(text)
    return _heads(attn.norm_k(key), attn.heads), _heads(value, attn.heads)


class CachedSelfAttention:
    """Processor for the self-attention (``attn1``) of every block: reads and writes a `KVCache`."""

    def __init__(self, state: PassState) -> None:
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
        cache, static, mask = self.state.cache, self.state.static, None
        if static is not None and self.state.layer_kv is not None:
            keys, values = self.state.layer_kv  # [B, heads, capacity, head_dim]
            keys.index_copy_(2, static.index, key.to(keys.dtype))
            values.index_copy_(2, static.index, value.to(values.dtype))
            key, value, mask = keys, values, static.mask
        elif cache is not None:
            key, value = cache.attend(self.state.layer, key, value)
            mask = cache.attention_mask(query.shape[2])
        out = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)  # [B, n, heads*head_dim]
        return attn.to_out[1](attn.to_out[0](out))


class CachedCrossAttention:
    """Processor for the cross-attention (``attn2``) of every block: the prompt's K/V come from
    `PassState.layer_text` (set per block from a `TextKV`) instead of being projected in every pass; with no
    `TextKV` (``cache_text=False``) they are projected here, as diffusers does."""

    def __init__(self, state: PassState) -> None:
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if getattr(attn, "add_k_proj", None) is not None:
            raise TypeError("image-conditioned (I2V) Wan blocks are not supported by the causal backend")
        if encoder_hidden_states is None:
            raise TypeError("cross-attention needs `encoder_hidden_states`")
        query = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
        if self.state.layer_text is not None:
            key, value = self.state.layer_text
        else:
            key, value = text_kv_for(attn, encoder_hidden_states)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
