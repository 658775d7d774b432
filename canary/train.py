"""Train the canary from scratch: the VAE first, then the generator; seeded; weights + card written to ``--out``.

    python -m canary.train --out out/canary --seed 0 [--device cuda]

Writes ``transformer.safetensors``, ``vae.safetensors`` and ``card.json`` to ``--out`` and, as it goes, loss
curves (``progress/*.svg``, ``progress/log.jsonl``) and sample grids (``progress/samples_*.png``: a row per prompt,
every 4th frame, rendered through the real self-forcing rollout). Ship a run by copying the three weight files
into ``pipeline/model/canary_weights/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import torch

from canary.evaluate import pass_rate
from canary.grammar import caption
from canary.sample import frame_grid, sample_videos, write_png, write_svg_curves
from canary.train_gen import build_pool, train_generator
from canary.train_vae import VAE_FRAMES, finetune_decoder, held_out_psnr, latent_stats, train_vae
from pipeline.model import canary as models
from pipeline.model.vae import pixel_frames_for

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS = [caption("red", "circle", "right"), caption("blue", "square", "down", "striped"),
                  caption("yellow", "triangle", "bouncing"), caption("green", "circle", "left", "striped")]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m canary.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vae-steps", type=int, default=1800)
    p.add_argument("--vae-batch", type=int, default=2)
    p.add_argument("--gen-steps", type=int, default=7000)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-lr", type=float, default=3e-3)
    p.add_argument("--pool-clips", type=int, default=512)
    p.add_argument("--chunks", type=int, default=3, help="trained horizon in 3-latent-frame chunks")
    p.add_argument("--sample-every", type=int, default=1750)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--decoder-batch", type=int, default=2)
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="stage 1b: fine-tune the decoder on whole frames, encoder frozen (see --stage decoder)")
    p.add_argument("--vae-base-dim", type=int, default=models.VAE_CONFIG["base_dim"])
    p.add_argument("--gen-layers", type=int, default=models.TRANSFORMER_CONFIG["num_layers"])
    p.add_argument("--gen-dim", type=int, default=96, help="transformer width (heads of 32 channels)")
    p.add_argument("--patch", default="1,2,2", help="transformer patch t,h,w (canary-ctx: 1,1,1)")
    p.add_argument("--marks", action="store_true",
                   help="context canary: uncaptioned static marks in the clips (canary.marks)")
    p.add_argument("--name", default="canary", help="the model name the card records")
    p.add_argument("--vae-from", default=None,
                   help="stage gen: copy the VAE (vae.safetensors + its card fields) from this weights folder")
    p.add_argument("--init-from", default=None,
                   help="warm-start the generator from this weights folder (models.init_from: any patch, same width)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write transformer.safetensors + card.json to --out every N generator steps")
    p.add_argument("--stage", choices=("all", "vae", "decoder", "gen"), default="all",
                   help="vae: stop after the VAE (writes vae.safetensors + vae_card.json); decoder: only fine-tune "
                        "the decoder of the VAE in --out; gen: train the generator on the VAE already in --out")
    return p.parse_args(argv)


class Progress:
    """Writes the log (JSON lines) and the curves as training goes."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.curves: dict[str, list[float]] = {}
        self.start = time.monotonic()

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        row = {"stage": stage, "step": step, "wall_s": round(time.monotonic() - self.start, 1), **values}
        with open(os.path.join(self.folder, "log.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        logger.info("%s", row)
        if "loss" in values:
            self.curves.setdefault(stage, []).append(values["loss"])
            write_svg_curves(os.path.join(self.folder, f"loss_{stage}.svg"), {stage: self.curves[stage]},
                             f"canary {stage} loss (every log step)", log_y=True, x_label="log step")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _sample_grid(transformer: Any, text: Any, vae: Any, path: str, chunks: int) -> dict[str, float]:
    """Write a sample grid; return the pass rates (`canary.evaluate`) in both modes."""
    from pipeline.model.backend import PRESETS, WanBackend
    from pipeline.model.causal_wan import CausalWan

    backend = WanBackend(PRESETS["canary"], CausalWan(copy.deepcopy(transformer)), text, vae)
    videos, _ = sample_videos(backend, SAMPLE_PROMPTS, list(range(len(SAMPLE_PROMPTS))), num_chunks=chunks)
    write_png(path, frame_grid(videos))
    return {f"pass_{mode}": pass_rate(backend, mode=mode, num_chunks=chunks)[0]
            for mode in ("self-forcing", "rolling-forcing")}


def _train_vae_stage(args: argparse.Namespace, progress: Progress, command: str) -> tuple[Any, dict[str, Any]]:
    started = time.monotonic()
    vae = models.build_vae(args.seed, config=models.vae_config(args.vae_base_dim))
    curve = train_vae(vae, seed=args.seed, steps=args.vae_steps, batch=args.vae_batch, device=args.device,
                      on_log=lambda s, v: progress.log("vae", s, v), log_every=5)
    psnr = held_out_psnr(vae, device=args.device)
    mean, std = latent_stats(vae, seed=args.seed, device=args.device)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    progress.log("vae_eval", args.vae_steps, {"psnr_db": psnr})
    models.save_weights(vae, os.path.join(args.out, "vae.safetensors"), half=False)
    card = {"commands": [command], "vae_steps": args.vae_steps, "vae_batch": args.vae_batch,
            "vae_clip_frames": VAE_FRAMES, "final_vae_loss": _mean_tail(curve),
            "vae_psnr_db_held_out": psnr, "vae_seconds": round(time.monotonic() - started, 1),
            "latents_mean": mean, "latents_std": std, "vae_config": models.vae_config(args.vae_base_dim)}
    with open(os.path.join(args.out, "vae_card.json"), "w", encoding="utf-8") as fh:
        json.dump(card, fh, indent=1, sort_keys=True)
    return vae, card


def _decoder_stage(args: argparse.Namespace, progress: Progress, command: str, vae: Any,
                   card: dict[str, Any]) -> None:
    started = time.monotonic()
    path = os.path.join(args.out, "vae.safetensors")

    def checkpoint(step: int) -> None:
        models.save_weights(vae, os.path.join(args.out, "vae_decoder_ft.safetensors"), half=False)
        progress.log("decoder_ckpt", step, {})

    curve = finetune_decoder(vae, seed=args.seed, steps=args.decoder_steps, batch=args.decoder_batch,
                             device=args.device, on_log=lambda s, v: progress.log("decoder", s, v),
                             on_checkpoint=checkpoint)
    psnr = held_out_psnr(vae, device=args.device)
    progress.log("decoder_eval", args.decoder_steps, {"psnr_db": psnr})
    models.save_weights(vae, path, half=False)
    seconds = card["vae_seconds"] + round(time.monotonic() - started, 1)
    card.update({"commands": card["commands"] + ([command] if args.stage == "decoder" else []),
                 "decoder_steps": args.decoder_steps, "final_decoder_loss": _mean_tail(curve), "vae_seconds": seconds,
                 "vae_psnr_db_before_decoder_ft": card["vae_psnr_db_held_out"], "vae_psnr_db_held_out": psnr})
    with open(os.path.join(args.out, "vae_card.json"), "w", encoding="utf-8") as fh:
        json.dump(card, fh, indent=1, sort_keys=True)


def _mean_tail(curve: list[float], n: int = 20) -> float:
    tail = curve[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = Progress(os.path.join(args.out, "progress"))
    started = time.monotonic()
    torch.manual_seed(args.seed)  # diffusers' module init draws from the global generator; we seed it once here
    command = "python -m canary.train " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.vae_from is not None:
        _copy_vae(args.vae_from, args.out)
    if args.stage in ("gen", "decoder"):
        with open(os.path.join(args.out, "vae_card.json"), encoding="utf-8") as fh:
            vae_card = json.load(fh)
        vae = models.build_vae(args.seed, vae_card["latents_mean"], vae_card["latents_std"], vae_card["vae_config"])
        models._load_state(vae, os.path.join(args.out, "vae.safetensors"))
        vae = vae.eval()
        if args.stage == "decoder":
            _decoder_stage(args, progress, command, vae, vae_card)
            return 0
    else:
        vae, vae_card = _train_vae_stage(args, progress, command)
        if args.decoder_steps:
            _decoder_stage(args, progress, command, vae, vae_card)
        if args.stage == "vae":
            return 0
    text = models.build_text()
    pool = build_pool(vae, text, seed=args.seed, clips=args.pool_clips, chunks=args.chunks, device=args.device,
                      on_log=lambda s, v: progress.log("pool", s, v) if s % 128 == 0 else None, marks=args.marks)
    patch = tuple(int(v) for v in args.patch.split(","))
    transformer_config = models.transformer_config(args.gen_layers, args.gen_dim, patch)  # type: ignore[arg-type]
    transformer = models.build_transformer(args.seed, transformer_config)
    if args.init_from is not None:
        progress.log("init", 0, {"adapted": float(len(models.init_from(transformer, args.init_from)))})
    transformer = transformer.to(args.device)
    gen_curve: list[float] = []

    def sample(step: int) -> None:
        rates = _sample_grid(transformer, text, vae, os.path.join(progress.folder, f"samples_{step:05d}.png"),
                             args.chunks)
        progress.log("eval", step, rates)

    def checkpoint(step: int) -> None:
        models.save_weights(transformer, os.path.join(args.out, "transformer.safetensors"), half=False)
        partial = _card(args, vae_card, command, transformer_config, gen_curve, time.monotonic() - started)
        partial.update(gen_steps_done=step, note="checkpoint of a run still training (no pass rate measured)")
        with open(os.path.join(args.out, "card.json"), "w", encoding="utf-8") as fh:
            json.dump(partial, fh, indent=1, sort_keys=True)
        progress.log("checkpoint", step, {})

    gen_curve = train_generator(transformer, pool, seed=args.seed, steps=args.gen_steps, batch=args.gen_batch,
                                device=args.device, lr=args.gen_lr,
                                on_log=lambda s, v: progress.log("generator", s, v),
                                on_sample=sample, sample_every=args.sample_every, on_checkpoint=checkpoint,
                                checkpoint_every=args.checkpoint_every, curve=gen_curve)
    gen_s = time.monotonic() - started
    models.save_weights(transformer, os.path.join(args.out, "transformer.safetensors"), half=False)
    card = _card(args, vae_card, command, transformer_config, gen_curve, gen_s)
    rates = _sample_grid(transformer, text, vae, os.path.join(progress.folder, "samples_final.png"), args.chunks)
    progress.log("eval", args.gen_steps, rates)
    card["pass_rate_trained_horizon"] = rates
    with open(os.path.join(args.out, "card.json"), "w", encoding="utf-8") as fh:
        json.dump(card, fh, indent=1, sort_keys=True)
    print(json.dumps({k: card[k] for k in ("final_vae_loss", "final_generator_loss", "vae_psnr_db_held_out",
                                           "train_seconds")}))
    return 0


def _copy_vae(folder: str, out: str) -> None:
    """The VAE of a weights folder as this run's VAE stage: ``vae.safetensors`` and ``vae_card.json``."""
    import shutil

    os.makedirs(out, exist_ok=True)
    card = models.read_card(folder)
    keys = ("vae_steps", "vae_batch", "vae_clip_frames", "final_vae_loss", "vae_psnr_db_held_out", "vae_seconds",
            "latents_mean", "latents_std", "vae_config")
    vae_card = {k: card[k] for k in keys if k in card}
    vae_card["commands"] = [c for c in card.get("commands", []) if "--stage vae" in c]
    vae_card["vae_from"] = card.get("name", folder)
    shutil.copyfile(os.path.join(folder, "vae.safetensors"), os.path.join(out, "vae.safetensors"))
    with open(os.path.join(out, "vae_card.json"), "w", encoding="utf-8") as fh:
        json.dump(vae_card, fh, indent=1, sort_keys=True)


def _card(args: argparse.Namespace, vae_card: dict[str, Any], command: str, transformer_config: dict[str, Any],
          gen_curve: list[float], gen_s: float) -> dict[str, Any]:
    marks = (" Context canary: 0-2 uncaptioned static marks per clip (canary.marks: squares of 8-16 px of "
             "another colour, entering at a chunk boundary, never in chunk 0 of an anchored clip; the entry chunk's "
             "mark cells out of the loss)." if args.marks else "")
    return {
        **vae_card, "name": args.name, "commands": vae_card["commands"] + ([command] if args.stage == "gen" else []),
        "git_commit": _git_commit(), "seed": args.seed, "device": args.device, "torch": torch.__version__,
        "gen_steps": args.gen_steps, "gen_batch": args.gen_batch, "gen_lr": args.gen_lr, "pool_clips": args.pool_clips,
        "marks": args.marks, "init_from": args.init_from, "final_generator_loss": _mean_tail(gen_curve),
        "trained_horizon": {"chunks": args.chunks, "latent_frames": args.chunks * models.CHUNK_FRAMES,
                            "pixel_frames": pixel_frames_for(args.chunks * models.CHUNK_FRAMES)},
        "training_scheme": "VAE (Wan2.2-style residual shortcuts): L1+MSE reconstruction of 9-frame whole-frame "
                           "scenes of 3 objects, object pixels weighted ~30x falling to ~6x, decoder fed the "
                           "posterior mean + N(0, 0.02). Generator: flow matching on VAE latents (object latents "
                           "weighted 5x), one masked full-sequence forward over [clean | noisy] chunks: "
                           "self-forcing teacher forcing (noisy chunk at a warped sampler level over clean context) "
                           "mixed 50/50 with rolling-forcing window passes (staggered levels, joint window); half the "
                           "clips anchored at frame 0, half from a random frame (first chunk not in the loss); no "
                           "training on own rollouts." + marks,
        "train_seconds": {"vae": vae_card["vae_seconds"], "generator": round(gen_s, 1),
                          "total": round(vae_card["vae_seconds"] + gen_s, 1)},
        "transformer_config": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in transformer_config.items()},
        "text": {"text_len": models.TEXT_LEN, "text_dim": models.TEXT_DIM,
                 "seed": models.TEXT_SEED, "frozen": True},
    }


if __name__ == "__main__":
    sys.exit(main())
