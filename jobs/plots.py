"""The charts of the report pages (`jobs.report`, `jobs.regress`), drawn with matplotlib as inline SVG text.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot, so no GUI backend or global figure
state is involved (safe in workers and threads); x is always the chunk index with one tick per chunk, and legends sit
outside the axes, below them, so they never cover a curve.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SIZE = (6.4, 3.4)  # inches; 100 dpi in the SVG
# one style per regression variant, so that identical curves stay visible one over the other
STYLES = {"tokentrim": {"color": "#1f77b4", "linestyle": "-", "marker": "o", "linewidth": 3.0, "alpha": 0.6},
          "no-trim": {"color": "#d62728", "linestyle": "--", "marker": "x", "linewidth": 1.5},
          "probe": {"color": "#2ca02c", "linestyle": ":", "marker": "s", "linewidth": 1.5}}


def _figure() -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=SIZE, layout="constrained")


def _chunk_axis(ax: Axes, chunks: int) -> None:
    """x = chunk index, one integer tick per chunk (thinned past 24 chunks)."""
    step = max(1, math.ceil(chunks / 24))
    ax.set_xticks(range(0, max(chunks, 1), step))
    ax.set_xlim(-0.5, max(chunks, 1) - 0.5)
    ax.set_xlabel("chunk")
    ax.grid(True, alpha=0.3)


def _legend_below(fig: Figure, ax: Axes, *others: Axes) -> None:
    handles, labels = ax.get_legend_handles_labels()
    for other in others:
        h, lab = other.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(handles)), frameon=False)


def to_svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), to inline in a page or write as a file."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, selectable, searchable
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def severity_chart(chunks: Sequence[int], severity: Sequence[float], threshold: Sequence[float],
                   verdicts: Sequence[str], latent_dist_first: Sequence[float]) -> str:
    """One prompt: TokenTrim's severity and threshold per chunk (pruned chunks marked, warm-up chunks shaded), and
    the latent distance to the first chunk on a second axis."""
    fig = _figure()
    ax = fig.add_subplot()
    n = len(chunks)
    for c, v in zip(chunks, verdicts):
        if v == "warmup":
            ax.axvspan(c - 0.5, c + 0.5, color="#bbbbbb", alpha=0.25, linewidth=0)
    ax.plot(chunks, severity, color="#1f77b4", marker="o", label="severity (top-p tokens)")
    ax.step(chunks, threshold, where="mid", color="#ff7f0e", linestyle="--", label="threshold μ + λσ")
    pruned = [(c, s) for c, s, v in zip(chunks, severity, verdicts) if v == "pruned"]
    if pruned:
        ax.scatter([c for c, _ in pruned], [s for _, s in pruned], s=120, facecolors="none", edgecolors="#d62728",
                   linewidths=2, zorder=5, label="pruned, regenerated")
    ax.set_ylabel("latent L2 drift per token")
    twin = ax.twinx()
    twin.plot(chunks, latent_dist_first, color="#7f7f7f", linestyle=":", marker=".",
              label="distance to chunk 0 (right)")
    twin.set_ylabel("latent RMS distance")
    _chunk_axis(ax, n)
    ax.set_title("TokenTrim per chunk (grey: warm-up, not judged)", fontsize=10)
    _legend_below(fig, ax, twin)
    return to_svg(fig)


def curves_chart(title: str, unit: str, curves: Mapping[str, Sequence[float]]) -> str:
    """A regression metric per chunk, one line per variant (mean over the prompts)."""
    fig = _figure()
    ax = fig.add_subplot()
    length = max((len(c) for c in curves.values()), default=0)
    for name, curve in curves.items():
        ax.plot(range(len(curve)), curve, label=name, **STYLES.get(name, {}))  # type: ignore[arg-type]
    ax.set_ylabel(unit)
    ax.set_title(f"{title} per chunk, mean over prompts", fontsize=10)
    _chunk_axis(ax, length)
    _legend_below(fig, ax)
    return to_svg(fig)
