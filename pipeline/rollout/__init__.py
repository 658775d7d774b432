"""The autoregressive loop: `loop.Rollout` (noise -> denoise -> judge -> prune/regenerate -> commit), the rolling
window, the sampler, the per-chunk records and stats. Empty on purpose: importing `records` does not load the loop."""
