"""What the regression measures from the rendered videos themselves: on the canary what the detector sees, and what
a known corruption (`pipeline.rollout.probe`) does. Every metric is "higher is worse".

The probe is judged by its effect, not by identity (a regenerated chunk differs from the clean run by construction):
the chunks after it are decoded by a decoder warmed on the clean run, so the VAE's causal cache does not carry the
corrupted chunk's look forward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jobs.layout import JobOutput
from pipeline.rollout.probe import Probe
from pipeline.store import Store

CANARY_METRICS = ("canary_miss", "traj_err", "mass_err", "background_err")
PROBE_CANARY_METRICS = ("probe_artefacts", "probe_mass_err", "probe_traj_err")
LOST_TRAJ_ERR = 4.0  # px per frame: a video where the named colour is never found (faster than any motion)


def video_frames(out: Store, key: str) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames of the mp4 at ``key``."""
    from pipeline.outputs.video import decode_mp4

    return decode_mp4(out.get_bytes(key))


def canary_measures(frames: np.ndarray, prompt: str) -> dict[str, float]:
    """The canary-aware metrics of one video of a grammar ``prompt``."""
    import torch

    from canary.detect import canary_metrics, detect
    from canary.grammar import parse_caption

    colour, shape, motion, background = parse_caption(prompt)
    video = torch.from_numpy(np.ascontiguousarray(frames))
    found = detect(video, colour)
    m = canary_metrics(video, colour, shape, motion, background)
    traj = m["traj_err"][~m["traj_err"].isnan()]
    return {"canary_miss": float((found.colour, found.motion) != (colour, motion)),
            "traj_err": float(traj.mean()) if traj.numel() else LOST_TRAJ_ERR,
            "mass_err": float((1.0 - m["mass_ratio"]).abs().mean()),
            "background_err": float(m["background_err"].mean())}


def probe_records(out: JobOutput, row: dict[str, Any]) -> list[Any]:
    """The verified `ChunkRecord`s a rollout kept under ``rollouts/<id>/`` (the job ran with ``keep_state``)."""
    from pipeline.outputs.checkpoint import RolloutCheckpoints

    pid = row["prompt_id"]
    records = RolloutCheckpoints(out.rollout(pid), row["render_hash"], [pid]).load()
    expected = row.get("num_chunks")
    if not records or (isinstance(expected, int) and len(records) != expected):
        raise ValueError(f"{pid}: {len(records)} committed chunks under rollouts/{pid}/, expected {expected}")
    return records


def probe_missed(records: list[Any], probe: Probe) -> float:
    """1 - the share of the probe's token positions among those TokenTrim pruned while generating the probed chunk
    and the next one (sample 0 of each record)."""
    pruned: set[int] = set()
    for record in records[probe.chunk: probe.chunk + 2]:
        for event in record.prunes:
            if bool(event.samples[0]):
                pruned.update(int(p) for p in event.positions[0].tolist())
    return 1.0 - len(pruned & set(probe.positions)) / len(probe.positions)


def probe_quality(backend: Any, clean: list[Any], probed: list[Any], probe: Probe, prompt: str,
                  chunk_frames: int) -> dict[str, float]:
    """The detector's figures on the probed rollout's chunks after ``probe.chunk``, decoded after the clean
    rollout's chunks up to it (records of sample 0)."""
    from canary.effect import judge_video, warm_decode

    start = probe.chunk + 1
    video = warm_decode(backend.new_decoder, [r.latents for r in clean[:start]], [r.latents for r in probed[start:]])
    verdicts = list(judge_video(video[0], prompt, len(probed), chunk_frames, range(start, len(probed))).values())
    traj = [v.traj_err for v in verdicts if v.traj_err == v.traj_err]
    return {"probe_artefacts": sum(not v.clean for v in verdicts) / len(verdicts),
            "probe_mass_err": sum(v.mass_err for v in verdicts) / len(verdicts),
            "probe_traj_err": sum(traj) / len(traj) if traj else LOST_TRAJ_ERR}


def mean_measures(per_video: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    """Mean of each measure over the videos (0 when none)."""
    return {n: sum(v[n] for v in per_video) / len(per_video) if per_video else 0.0 for n in names}


def ok_ids(results: list[dict[str, Any]]) -> list[str]:
    """The prompts of a job report that have a video (rendered now or before)."""
    return [r["prompt_id"] for r in results if r["status"] == "ok"]


def failed_rows(results: list[dict[str, Any]]) -> list[str]:
    """``"<prompt_id>: <status> <error>"`` for every row of a job report that should have rendered and did not."""
    return [f"{r['prompt_id']}: {r['status']} {r['error'] or ''}".strip() for r in results
            if r["status"] not in ("ok", "excluded")]
