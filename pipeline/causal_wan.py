"""Causal Wan2.1: diffusers' `WanTransformer3DModel` run one AR chunk at a time over a `KVCache`.

The weights, blocks, embeddings and output head are diffusers' own; only the self-attention processor of every
block is swapped for `CachedSelfAttention`, which places the chunk at its absolute frame index and attends to the
cached context. Two kinds of pass:

- `denoise`: the chunk at a noise level attends to the cache and itself; the cache is left as it was.
- `commit`: the clean chunk at t = 0 writes its K/V into the cache (the clean context pass).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pipeline.attention import CachedSelfAttention, PassState
from pipeline.kv_cache import KVCache, SinkRope
from pipeline.rope import rope_for_frames

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

logger = logging.getLogger(__name__)


class CausalWan:
    """Block-causal, cached inference over diffusers' Wan transformer."""

    def __init__(self, transformer: WanTransformer3DModel) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        cfg = transformer.config
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)
        self.num_layers: int = cfg.num_layers
        self.heads: int = cfg.num_attention_heads
        self.head_dim: int = cfg.attention_head_dim
        self.in_channels: int = cfg.in_channels
        self.text_dim: int = cfg.text_dim
        self.state = PassState()
        for i, block in enumerate(transformer.blocks):
            block.attn1.set_processor(CachedSelfAttention(i, self.state))

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of a latent frame of ``height x width``."""
        _, p_h, p_w = self.patch_size
        if height % p_h or width % p_w:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {self.patch_size}")
        return height // p_h, width // p_w

    def tokens_per_frame(self, height: int, width: int) -> int:
        grid_h, grid_w = self.grid(height, width)
        return grid_h * grid_w

    def new_cache(self, batch_size: int, height: int, width: int, *, sink_frames: int = 0,
                  window_frames: int | None = None, sink_rope: SinkRope = "absolute") -> KVCache:
        """An empty cache sized for this model and latent frame size."""
        return KVCache(self.num_layers, batch_size, self.heads, self.head_dim, self.tokens_per_frame(height, width),
                       sink_frames=sink_frames, window_frames=window_frames, sink_rope=sink_rope, dtype=self.dtype,
                       device=self.device)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, cache: KVCache | None,
                first_frame: int) -> torch.Tensor:
        """One pass over the frames ``first_frame .. first_frame+F-1``.

        Args:
            latents: ``[B, C, F, H, W]`` noisy (or clean) latents of the pass.
            timestep: ``[B]`` (one level for the pass) or ``[B, F]`` (a level per frame), in ``[0, 1000]``.
            text: ``[B, text_len, text_dim]`` prompt embeddings.
            cache: the context to attend to (written into; see `denoise` and `commit`), or None for no context.
        Returns:
            The flow prediction ``[B, C, F, H, W]``.
        """
        batch, _, frames, height, width = latents.shape
        grid_h, grid_w = self.grid(height, width)
        positions = torch.arange(first_frame, first_frame + frames)
        self.state.cache = cache
        if cache is not None:
            self._place_sink(cache, first_frame)
        # diffusers keeps the tables in float64; rotating in float32 keeps bf16 activations off fp64 kernels
        cos, sin = rope_for_frames(self.transformer.rope, positions, grid_h, grid_w)
        self.state.rotary = (cos.to(self.device, torch.float32), sin.to(self.device, torch.float32))
        if timestep.ndim == 2 and bool((timestep == timestep[:, :1]).all()):
            timestep = timestep[:, 0]
        if timestep.ndim == 2:
            # a level per frame -> a level per token, frame-major like the patch embedding: [B, F] -> [B, F*gh*gw]
            timestep = timestep.repeat_interleave(grid_h * grid_w, dim=1)
        try:
            out = self.transformer(latents.to(self.dtype), timestep.to(self.device), text.to(self.dtype),
                                   return_dict=False)[0]
        finally:
            self.state.cache, self.state.rotary = None, None
        return out

    def _place_sink(self, cache: KVCache, first_frame: int) -> None:
        """Re-rotate an adjacent sink for a pass starting at ``first_frame`` (a no-op when it is in place)."""
        shift = cache.sink_shift_for(first_frame)
        if shift != cache.sink_shift:
            # a pure temporal rotation: frame `shift` on a 1x1 grid (h = w = 0 rotate by nothing)
            cos, sin = rope_for_frames(self.transformer.rope, torch.tensor([shift]), 1, 1)
            cache.shift_sink(shift, cos.to(self.device, torch.float32), sin.to(self.device, torch.float32))

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, cache: KVCache,
                first_frame: int) -> torch.Tensor:
        """Flow prediction for a noisy chunk attending to ``cache``; the cache is unchanged."""
        try:
            return self.forward(latents, timestep, text, cache, first_frame)
        finally:
            cache.end_pass()

    def commit(self, latents: torch.Tensor, text: torch.Tensor, cache: KVCache, first_frame: int) -> None:
        """The clean context pass: ``latents [B, C, F, H, W]`` at t = 0 write their K/V into ``cache``."""
        zero = torch.zeros(latents.shape[0], device=self.device)
        try:
            self.forward(latents, zero, text, cache, first_frame)
        except BaseException:
            cache.end_pass()
            raise
        cache.commit(list(range(first_frame, first_frame + latents.shape[2])))
