"""Write a frame strip (PNG) of canary renders: a row per prompt, every 4th frame.

    python -m canary.strip --out canary/strip.png [--mode self-forcing] [--chunks 6]
"""

from __future__ import annotations

import argparse

import torch

from canary.sample import frame_grid, sample_videos, write_png
from canary.train import SAMPLE_PROMPTS
from pipeline.model.backend import load_backend


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="self-forcing", choices=("self-forcing", "rolling-forcing"))
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", action="append", help="a caption (repeatable); default: four grammar captions")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    prompts = args.prompt or SAMPLE_PROMPTS
    videos, _ = sample_videos(load_backend("canary"), prompts, [args.seed + i for i in range(len(prompts))],
                              mode=args.mode, num_chunks=args.chunks)
    write_png(args.out, frame_grid(videos))
    print(f"wrote {args.out}: {len(prompts)} rows x {videos.shape[1]} frames (every 4th shown)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
