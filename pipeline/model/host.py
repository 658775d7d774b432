"""Device-to-host reads: many tensors in one transfer (`read_flat`), and a counter of reads for tests and benches.

Reading a device tensor on the host (``.item()``, ``.tolist()``, ``bool(t)``) waits for every kernel queued before it.
"""

from __future__ import annotations

import torch


def read_flat(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """``{name: tensor}`` (any shapes and dtypes, one device) -> ``{name: its values flattened, as floats}`` in one
    transfer (float64: integers below 2**53 and booleans come back exactly)."""
    if not tensors:
        return {}
    flat = [t.detach().reshape(-1).to(torch.float64) for t in tensors.values()]
    values = torch.cat(flat).tolist()
    out, at = {}, 0
    for name, part in zip(tensors, flat, strict=True):
        out[name] = values[at: at + part.numel()]
        at += part.numel()
    return out


# conversions of a tensor to host values; on CUDA each one waits for the device
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class HostReadCounter:
    """Counts conversions of tensors to host values (`HOST_READS`) while installed: ``with HostReadCounter() as c``.

    An upper bound of the host syncs of the code it wraps on CUDA (on a CPU nothing waits, but the same calls are
    made), for tests and benchmarks. It patches `torch.Tensor` for the duration of the block only."""

    def __init__(self) -> None:
        self.count = 0
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> HostReadCounter:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counted(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _counted(self, name: str, original):  # noqa: ANN202 - a wrapper with the original's signature
        def counted(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.count += 1
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return counted
