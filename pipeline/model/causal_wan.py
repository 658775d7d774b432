"""Causal Wan2.1: diffusers' `WanTransformer3DModel` run one AR chunk at a time over a `KVCache`.

Weights, blocks and heads are diffusers' own; only each block's attention processors are swapped
(`pipeline.model.attention`). Two passes: `denoise` (the noisy chunk attends to the cache and itself; the cache is
unchanged) and `commit` (the clean chunk at t = 0 writes its K/V). No pass waits for the device.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import SinkRope
from pipeline.model.attention import CachedCrossAttention, CachedSelfAttention, PassState, TextKV, text_kv_for
from pipeline.model.kv_cache import KVCache
from pipeline.model.rope import rope_for_frames

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

logger = logging.getLogger(__name__)


class CausalWan:
    """Block-causal, cached inference over diffusers' Wan transformer."""

    def __init__(self, transformer: WanTransformer3DModel, *, cache_text: bool = True) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        cfg = transformer.config
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)
        self.num_layers: int = cfg.num_layers
        self.heads: int = cfg.num_attention_heads
        self.head_dim: int = cfg.attention_head_dim
        self.state = PassState()
        self.cache_text = cache_text  # False: project the prompt K/V in every pass (the reference path)
        self.static = False  # attend over fixed-capacity buffers with a length mask (set by `compile`)
        self.compiled = False
        self.compile_seconds = 0.0  # wall seconds of the passes that compiled (see `compile`)
        self._text_kv: TextKV | None = None
        self._compile_count = 0
        self._static_addresses = False
        self_attention, cross_attention = CachedSelfAttention(self.state), CachedCrossAttention(self.state)
        for i, block in enumerate(transformer.blocks):
            block.attn1.set_processor(self_attention)
            block.attn2.set_processor(cross_attention)
            block.register_forward_pre_hook(partial(self._enter_block, i))

    def _enter_block(self, layer: int, module: Any, args: Any) -> None:
        """Pre-hook of block ``layer`` (runs eagerly): hand the processors this block's tensors."""
        state = self.state
        state.layer = layer
        state.layer_text = state.text_kv.layers[layer] if state.text_kv is not None else None
        state.layer_kv = state.cache.layer_buffers(layer) if state.static is not None and state.cache else None
        if self._static_addresses:  # CUDA graphs: the buffers this block writes stay where they are between passes
            for tensor in (*(state.layer_kv or ()), *(state.layer_text or ())):
                torch._dynamo.mark_static_address(tensor)

    def compile(self, mode: str | None = None) -> CausalWan:
        """Compile every transformer block (``torch.compile``, static shapes) and switch to the static path.

        Identical blocks share one compiled graph; it is compiled on the first pass of a new shape (batch, tokens
        per pass, cache capacity) and reused after, so one backend pays it once per shape, not per prompt. The
        seconds of passes that compiled are added to `compile_seconds`. ``mode`` is torch.compile's (e.g.
        ``"max-autotune-no-cudagraphs"``; None: its default). With ``"reduce-overhead"`` (CUDA graphs) the K/V and
        prompt buffers are marked as static addresses, so that their in-place writes do not rule the graphs out
        (not yet tried on a GPU)."""
        if self.compiled:
            return self
        self._static_addresses = mode is not None and "reduce-overhead" in mode
        for block in self.transformer.blocks:
            block.forward = torch.compile(block.forward, dynamic=False, mode=mode)
        self.static = self.compiled = True
        return self

    def eager(self) -> CausalWan:
        """Undo `compile`: the blocks run eagerly on the dynamic path again (a later `compile` reuses the graphs)."""
        for block in self.transformer.blocks:
            block.__dict__.pop("forward", None)
        self.static = self.compiled = self._static_addresses = False
        return self

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
                       device=self.device, static=self.static)

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
        self.state.cache = cache
        if cache is not None:
            self._place_sink(cache, first_frame)
            if self.static and cache.static:
                self.state.static = cache.static_pass(frames * grid_h * grid_w)
        # diffusers keeps the tables in float64; rotating in float32 keeps bf16 activations off fp64 kernels
        cos, sin = rope_for_frames(self.transformer.rope, range(first_frame, first_frame + frames), grid_h, grid_w)
        self.state.rotary = (cos.to(self.device, torch.float32), sin.to(self.device, torch.float32))
        if timestep.ndim == 2:
            # a level per frame -> a level per token, frame-major like the patch embedding: [B, F] -> [B, F*gh*gw]
            timestep = timestep.repeat_interleave(grid_h * grid_w, dim=1)
        text = self._with_text_kv(text)
        began = time.perf_counter() if self.compiled else 0.0
        try:
            out = self.transformer(latents.to(self.dtype), timestep.to(self.device), text, return_dict=False)[0]
        finally:
            self.state.cache = self.state.rotary = self.state.static = self.state.text_kv = None
            self.state.layer_kv = self.state.layer_text = None
        if self.compiled:
            self._note_compile(time.perf_counter() - began)
        return out

    def _with_text_kv(self, text: torch.Tensor) -> torch.Tensor:
        """Set the prompt K/V of this pass (projected once per prompt tensor); returns ``text`` in the model dtype."""
        if not self.cache_text:
            return text.to(self.dtype)
        if self._text_kv is None or not self._text_kv.matches(text):
            embedded = self.transformer.condition_embedder.text_embedder(text.to(self.dtype))
            layers = [text_kv_for(block.attn2, embedded) for block in self.transformer.blocks]
            self._text_kv = TextKV(text, text._version, layers)
        self.state.text_kv = self._text_kv
        return text.to(self.dtype)

    def _note_compile(self, seconds: float) -> None:
        """Count a pass's seconds as compile time when dynamo compiled during it (torch's compile counter grew)."""
        from torch._dynamo.utils import counters

        compiled = counters["stats"]["unique_graphs"]
        if compiled != self._compile_count:
            self._compile_count = compiled
            self.compile_seconds += seconds

    def _place_sink(self, cache: KVCache, first_frame: int) -> None:
        """Re-rotate an adjacent sink for a pass starting at ``first_frame`` (a no-op when it is in place)."""
        shift = cache.sink_shift_for(first_frame)
        if shift != cache.sink_shift:
            # a pure temporal rotation: frame `shift` on a 1x1 grid (h = w = 0 rotate by nothing)
            cos, sin = rope_for_frames(self.transformer.rope, range(shift, shift + 1), 1, 1)
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
