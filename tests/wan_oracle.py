"""The oracle for the cached causal model: diffusers' own Wan forward over the whole sequence with a mask.

`MaskedWanProcessor` is diffusers' `WanAttnProcessor` called with an attention mask (the blocks pass none), so the
reference is diffusers' code end to end; only which keys each query may see is ours to state.
"""

from __future__ import annotations

import copy

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def tiny_transformer(seed: int = 0, layers: int = 2) -> WanTransformer3DModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        )
        # diffusers zero-initialises nothing we rely on, but make every weight non-trivial and seeded
        for p in model.parameters():
            p.data.normal_(0.0, 0.2)
    return model.eval()


class MaskedWanProcessor:
    def __init__(self, mask: torch.Tensor) -> None:
        self.inner = WanAttnProcessor()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def reference_forward(model: WanTransformer3DModel, latents: torch.Tensor, frame_timesteps: torch.Tensor,
                      text: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """diffusers forward over ``latents [B, C, F, H, W]`` where token i may attend to token j iff ``visible[b, i, j]``.

    ``frame_timesteps [B, F]`` gives each frame its own noise level (per-token timesteps in diffusers' API).
    """
    ref = copy.deepcopy(model)
    mask = visible[:, None]  # [B, 1, L, L]
    for block in ref.blocks:
        block.attn1.set_processor(MaskedWanProcessor(mask))
    tokens = latents.shape[3] * latents.shape[4] // 4
    timestep = frame_timesteps.repeat_interleave(tokens, dim=1)
    with torch.no_grad():
        return ref(latents, timestep, text, return_dict=False)[0]


def visibility(frame_of_token: torch.Tensor, visible_frames: dict[int, set[int]]) -> torch.Tensor:
    """``[L, L]`` bool: query token i sees key token j iff frame(j) in visible_frames[frame(i)]."""
    frames = frame_of_token.tolist()
    rows = [[fj in visible_frames[fi] for fj in frames] for fi in frames]
    return torch.tensor(rows, dtype=torch.bool)


def frame_keep_mask(cache, frame: int) -> torch.Tensor:
    """``[B, tokens_per_frame]`` bool: which spatial positions of ``frame`` each sample of a `KVCache` still holds."""
    seg = next((s for s in cache.segments if s.frame == frame), None)
    if seg is None:
        raise KeyError(f"frame {frame} is not in the cache")
    rows = slice(seg.start, seg.start + seg.length)
    # padding rows point at an extra column that is cut off afterwards
    index = cache.positions[:, rows].masked_fill(~cache.valid[:, rows], cache.tokens_per_frame)
    keep = torch.zeros(cache.batch_size, cache.tokens_per_frame + 1, dtype=torch.bool, device=cache.device)
    keep.scatter_(1, index, True)
    return keep[:, : cache.tokens_per_frame]
