"""Device-to-host transfers batched into one wait.

Reading a device tensor on the host (``.item()``, ``.tolist()``, ``bool(t)``) waits for every kernel queued before
it. The rollout reads its per-chunk figures through `to_host`, once per chunk, instead of one wait per figure.
"""

from __future__ import annotations

import torch


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """``{name: [B] tensor}`` (any dtype, one device) -> ``{name: [B] floats}`` in one transfer (float64: integers
    below 2**53 and booleans come back exactly)."""
    if not tensors:
        return {}
    names = list(tensors)
    sizes = {tuple(tensors[n].shape) for n in names}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"`tensors` must all be [B], got shapes { {n: tuple(tensors[n].shape) for n in names} }")
    packed = torch.stack([tensors[n].detach().to(torch.float64) for n in names]).tolist()
    return dict(zip(names, packed, strict=True))
