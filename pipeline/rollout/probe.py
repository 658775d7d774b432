"""A known fault to inject into a rollout: what the regression and the benches measure TokenTrim against.

A `Probe` adds ``amount`` to the latent tokens (cells of the 1x2x2 patch grid) at ``positions`` of chunk ``chunk``,
at every denoising step and every attempt: a persistent corruption that regenerating the chunk cannot remove, so
what is left to TokenTrim is keeping it out of the cache that later chunks attend to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch import at runtime: job specs (and `--help`) load this module
    import torch


def add_to_tokens(x0: torch.Tensor, positions: Sequence[int], amount: float,
                  patch: Sequence[int] = (1, 2, 2)) -> torch.Tensor:
    """A copy of ``x0`` ``[B, C, F, h, w]`` with ``amount`` added to the tokens of the ``(t, h, w)`` ``patch`` grid
    (the transformer's; default 1x2x2) at ``positions`` (row-major over the ``h/p_h x w/p_w`` grid)."""
    x0 = x0.clone()
    _, p_h, p_w = patch
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

    def __call__(self, chunk: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
        """The rollout's ``perturb`` hook."""
        return add_to_tokens(x0, self.positions, self.amount) if chunk == self.chunk else x0

    def to_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "positions": list(self.positions), "amount": float(self.amount)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Probe:
        if not isinstance(d, dict) or set(d) - {"chunk", "positions", "amount"}:
            raise ValueError(f"a probe must be an object with chunk, positions, amount; got {d!r}")
        return cls(int(d["chunk"]), tuple(int(p) for p in d.get("positions", (5, 6, 9, 10))),
                   float(d.get("amount", 4.0)))
