"""`RolloutConfig.early_stop`: transformer passes saved against host reads added, per mode, without and with pruning.

Each variant runs the same seeded rollout with early_stop off and on, counting host reads per chunk
(`HostReadCounter`), transformer passes (a hook on the first block) and wall time, and checks that the latents are
identical (early_stop must change nothing but the work). Pruning: never-prune TokenTrim, or TokenTrim regenerating
every odd chunk from chunk 3 on (a jump injected at a few tokens). Then the trade at full size: a skipped pass costs
its FLOPs (`bench.flops`, at ``--peak-tflops`` x ``--utilization``), a read one device wait (``--read-us``, assumed:
no GPU measured it), giving the prune rate above which early_stop pays.

    python -m bench.early_stop [--preset tiny|mid] [--chunks 8]
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from bench.common import PROMPT, Reporter, base_parser, command_line, set_threads
from bench.flops import H100_SXM_DENSE_BF16_TFLOPS, SELF_FORCING_CONTEXT, Shape, pass_flops
from bench.speed import NEVER, PRUNE, _corrupt_odd_chunks, build
from pipeline.config import RolloutConfig
from pipeline.model.backend import WAN_1_3B_TRANSFORMER, WAN_HEIGHT_PX, WAN_TEXT_LEN, WAN_WIDTH_PX, WanBackend
from pipeline.model.host import HostReadCounter
from pipeline.rollout.loop import Rollout
from tokentrim import TrimConfig


def run(backend: WanBackend, config: RolloutConfig, trim: TrimConfig, prune: bool) -> dict[str, Any]:
    """Reads, passes and seconds per chunk of one rollout, its latents and its regenerated chunks."""
    rollout = Rollout(backend, config, [PROMPT], [0], trim)
    rollout.perturb = _corrupt_odd_chunks if prune else None
    passes = [0]
    hook = backend.causal.transformer.blocks[0].register_forward_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
    reads, seconds, latents, regenerated = [], [], [], 0
    try:
        for _ in range(config.num_chunks):
            began = time.perf_counter()
            with HostReadCounter() as counter:
                record = rollout.step()
            seconds.append(time.perf_counter() - began)
            reads.append(counter.count)
            latents.append(record.latents)
            regenerated += max(s.attempts for s in record.stats) > 1
    finally:
        hook.remove()
    return {"reads": sum(reads), "passes": passes[0], "seconds": sum(seconds),
            "latents": torch.cat(latents, dim=2), "regenerated": regenerated}


def full_size_pass_ms(peak_tflops: float, utilization: float) -> float:
    """Milliseconds of one self-forcing denoising pass at Wan2.1-1.3B 480x832 (`bench.flops` steady state)."""
    tokens = (WAN_HEIGHT_PX // 16) * (WAN_WIDTH_PX // 16)  # 8x VAE x 2x2 patches
    shape = Shape.of(WAN_1_3B_TRANSFORMER, WAN_TEXT_LEN)
    flops = sum(pass_flops(shape, 3 * tokens, SELF_FORCING_CONTEXT * tokens).values())
    return 1e3 * flops / (peak_tflops * 1e12 * utilization)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["mid", "tiny"], default="tiny")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_DENSE_BF16_TFLOPS)
    parser.add_argument("--utilization", type=float, default=0.4)
    parser.add_argument("--read-us", type=float, default=50.0,
                        help="assumed cost of one host read on a GPU (a device wait and the launch gap after it)")
    args = parser.parse_args()
    set_threads(args.threads)
    rep = Reporter("early_stop", command_line("bench.early_stop"))
    backend = build(args.preset, args.seed)
    pass_ms = full_size_pass_ms(args.peak_tflops, args.utilization)
    print(f"early_stop: {args.preset} model, {args.chunks} chunks, B = 1; full-size pass {pass_ms:.1f} ms at "
          f"{args.peak_tflops:g} TFLOP/s x {args.utilization:g}, a read {args.read_us:g} us (assumed)", flush=True)
    for mode in ("self-forcing", "rolling-forcing"):
        for name, trim, prune in (("never-prune", NEVER, False), ("pruning", PRUNE, True)):
            config = RolloutConfig(mode=mode, num_chunks=args.chunks, window_frames=6, early_stop=False)
            off = run(backend, config, trim, prune)
            on = run(backend, dataclasses.replace(config, early_stop=True), trim, prune)
            if not torch.equal(on["latents"], off["latents"]):
                raise RuntimeError(f"{mode} {name}: early_stop changed the latents")
            if prune and not off["regenerated"]:
                raise RuntimeError(f"{mode} {name}: no chunk was regenerated; the variant measures nothing")
            saved, added = off["passes"] - on["passes"], on["reads"] - off["reads"]
            per_regen = saved / off["regenerated"] if off["regenerated"] else 0.0
            label = f"{mode}, {name}"
            rep.report(f"{label}: passes saved per chunk", saved / args.chunks, None, unit=" passes",
                       note=f"{off['passes']} -> {on['passes']} passes over {args.chunks} chunks, "
                            f"{off['regenerated']} regenerated ({per_regen:.1f} saved per regenerated chunk)")
            rep.report(f"{label}: host reads added per chunk", added / args.chunks, None, unit=" reads",
                       note=f"{off['reads']} -> {on['reads']} reads; latents identical")
            rep.report(f"{label}: wall time on / off (this CPU: reads cost nothing)", on["seconds"] / off["seconds"],
                       None, note=f"{off['seconds']:.2f} s -> {on['seconds']:.2f} s")
            if mode == "self-forcing" and prune and added:
                cost = added / args.chunks * args.read_us / 1e3  # ms per chunk
                gain = per_regen * pass_ms  # ms per regenerated chunk
                rep.report("self-forcing at full size: prune rate above which early_stop pays", 100 * cost / gain,
                           None, unit="%", note=f"{cost * 1e3:.0f} us of reads per chunk vs {gain:.0f} ms saved per "
                                         "regenerated chunk")
    rep.finish()


if __name__ == "__main__":
    main()
