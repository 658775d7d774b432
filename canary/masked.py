"""The generator's training forward: diffusers' Wan transformer over a whole `Sequence` with a frame mask.

Each block's self-attention projects and normalises as diffusers' processor does (and as
`pipeline.model.attention.CachedSelfAttention` does at inference), rotates queries and keys at the sequence's own RoPE
frame positions (the clean and the noisy half share positions) and attends under the block-causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from canary.sequence import Sequence
from pipeline.model.rope import apply_rope, rope_for_frames


@dataclass
class MaskState:
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    mask: torch.Tensor | None = None  # [B, 1, L, L] bool


class MaskedRopeAttention:
    """Self-attention processor for training: RoPE at given positions, a boolean mask, no cache."""

    def __init__(self, state: MaskState) -> None:
        self.state = state

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if self.state.rotary is None or self.state.mask is None:
            raise RuntimeError("MaskedRopeAttention called outside `masked_forward`")
        query, key = apply_rope(query, *self.state.rotary), apply_rope(key, *self.state.rotary)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.state.mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def install(transformer: Any) -> MaskState:
    """Swap every block's self-attention for `MaskedRopeAttention`; returns the state they share."""
    state = MaskState()
    for block in transformer.blocks:
        block.attn1.set_processor(MaskedRopeAttention(state))
    return state


def masked_forward(transformer: Any, state: MaskState, seq: Sequence, text: torch.Tensor) -> torch.Tensor:
    """Flow prediction ``[B, C, 2F, h, w]`` for every frame of ``seq`` (``install`` must have been called)."""
    _, p_h, p_w = transformer.config.patch_size
    height, width = seq.latents.shape[3:]
    grid_h, grid_w = height // p_h, width // p_w
    per_frame = grid_h * grid_w
    device = seq.latents.device
    cos, sin = rope_for_frames(transformer.rope, seq.positions, grid_h, grid_w)
    state.rotary = (cos.to(device, torch.float32), sin.to(device, torch.float32))
    vis = seq.visible.to(device)
    state.mask = vis.repeat_interleave(per_frame, dim=1).repeat_interleave(per_frame, dim=2)[:, None]
    timestep = seq.frame_levels.to(device).repeat_interleave(per_frame, dim=1)
    try:
        return transformer(seq.latents, timestep, text, return_dict=False)[0]
    finally:
        state.rotary, state.mask = None, None
