"""Does a canary render what its prompt says? The pass rate the tests, the training log and the bench share.

A render passes when `canary.detect.detect` finds the named colour as the dominant one and reads the named
motion over the whole video.
"""

from __future__ import annotations

from typing import Any

from canary.detect import detect
from canary.grammar import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, caption


def covering_prompts(seeds_per_combo: int = 1, first_seed: int = 0) -> tuple[list[str], list[int],
                                                                             list[tuple[str, str]]]:
    """Every colour x motion (20) ``seeds_per_combo`` times, shapes and backgrounds rotating so every colour meets
    every shape: ``(prompts, seeds, [(colour, motion)])``."""
    prompts, seeds, named = [], [], []
    for ci, colour in enumerate(COLOURS):
        for mi, motion in enumerate(MOTIONS):
            for k in range(seeds_per_combo):
                shape = SHAPES[(ci + mi + k) % len(SHAPES)]
                prompts.append(caption(colour, shape, motion, BACKGROUNDS[(mi + k) % 2]))
                seeds.append(first_seed + 1000 * k + 10 * ci + mi)
                named.append((colour, motion))
    return prompts, seeds, named


def pass_rate(backend: Any, *, mode: str, num_chunks: int, seeds_per_combo: int = 1,
              first_seed: int = 0) -> tuple[float, list[tuple[str, str | None, str, tuple[float, float]]]]:
    """``(fraction passed, misses)`` of the covering prompts rendered for ``num_chunks`` chunks; a miss is
    ``(prompt, colour found, motion found, velocity found)``."""
    from canary.sample import sample_videos

    prompts, seeds, named = covering_prompts(seeds_per_combo, first_seed)
    videos, _ = sample_videos(backend, prompts, seeds, mode=mode, num_chunks=num_chunks)
    misses = []
    for video, (colour, motion), prompt in zip(videos, named, prompts):
        found = detect(video, colour)
        if (found.colour, found.motion) != (colour, motion):
            misses.append((prompt, found.colour, found.motion, found.velocity))
    return 1.0 - len(misses) / len(prompts), misses
