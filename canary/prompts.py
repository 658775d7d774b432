"""The canary prompt table: every caption of the grammar as a Parquet row, in an order where any prefix is diverse.

    python -m canary.prompts jobs/data/canary_prompts.parquet

Rows are ordered as `canary.evaluate.covering_prompts` rounds (each round covers every colour x motion,
shapes and backgrounds rotating), so ``--limit 4`` already renders four colours and four motions. Columns:
``prompt_id`` (``<colour>-<shape>-<motion>-<background>``), ``prompt``, ``seed``.
"""

from __future__ import annotations

import sys

from canary.evaluate import covering_prompts
from canary.grammar import parse_caption


def prompt_rows() -> list[dict[str, object]]:
    """All 120 captions once, with their ids and seeds."""
    prompts, seeds, _ = covering_prompts(seeds_per_combo=6)  # 6 rounds x 20 = 120: every shape x background
    picked: list[tuple[str, int]] = []
    seen: set[str] = set()
    for prompt, seed in zip(prompts, seeds):
        if prompt not in seen:
            seen.add(prompt)
            picked.append((prompt, seed))

    def order(item: tuple[str, int]) -> tuple[int, bool, int]:
        seed = item[1]  # 1000 * round + 10 * colour + motion
        return seed // 1000, seed % 10 != seed // 10 % 10, seed % 1000

    # the first rows: four colours, four motions, every shape and both backgrounds
    return [{"prompt_id": "-".join(parse_caption(p)), "prompt": p, "seed": s} for p, s in sorted(picked, key=order)]


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa

    from pipeline.store import split_url

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m canary.prompts OUT.parquet", file=sys.stderr)
        return 2
    rows = prompt_rows()
    store, key = split_url(args[0])
    store.put_table(key, pa.Table.from_pylist(rows))
    print(f"{len(rows)} canary prompts -> {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
