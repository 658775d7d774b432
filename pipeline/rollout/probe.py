"""A known fault to inject into a rollout: what the regression and the benches measure TokenTrim against.

A `Probe` adds ``amount`` to the latent tokens at ``positions`` of chunk ``chunk``, at every denoising step and every
attempt: a corruption that regenerating cannot remove, so what is left to TokenTrim is keeping it out of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch import at runtime: job specs (and `--help`) load this module
    import torch


def add_to_tokens(x0: torch.Tensor, positions: Sequence[int], amount: float,
                  patch_size: Sequence[int]) -> torch.Tensor:
    """A copy of ``x0`` ``[B, C, F, h, w]`` with ``amount`` added to the tokens at ``positions`` (row-major over the
    patch grid of ``patch_size`` (t, h, w): one token is a ``p_h x p_w`` patch of every latent frame)."""
    x0 = x0.clone()
    p_h, p_w = patch_size[1], patch_size[2]
    grid_w = x0.shape[4] // p_w
    for p in positions:
        i, j = divmod(p, grid_w)
        x0[:, :, :, p_h * i: p_h * i + p_h, p_w * j: p_w * j + p_w] += amount
    return x0


@dataclass(frozen=True)
class Probe:
    """Corrupt chunk ``chunk`` at token ``positions`` by ``amount`` (normalised latent units)."""

    chunk: int
    positions: tuple[int, ...] = (5, 6, 9, 10)
    amount: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"`chunk` must be an integer >= 0, got {self.chunk!r}")
        positions = tuple(self.positions)
        if not positions or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions):
            raise ValueError(f"`positions` must be token indices >= 0, got {self.positions!r}")
        object.__setattr__(self, "positions", positions)
        if not isinstance(self.amount, (int, float)) or isinstance(self.amount, bool):
            raise ValueError(f"`amount` must be a number, got {self.amount!r}")

    def apply(self, x0: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
        """``x0`` of chunk ``chunk`` with the fault added (`add_to_tokens` on the model's ``patch_size``)."""
        return add_to_tokens(x0, self.positions, self.amount, patch_size)

    def to_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "positions": list(self.positions), "amount": float(self.amount)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Probe:
        if not isinstance(d, dict) or set(d) - {"chunk", "positions", "amount"}:
            raise ValueError(f"a probe must be an object with chunk, positions, amount; got {d!r}")
        return cls(int(d["chunk"]), tuple(int(p) for p in d.get("positions", (5, 6, 9, 10))),
                   float(d.get("amount", 4.0)))
