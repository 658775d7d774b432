"""One rollout on one device: model backends, KV cache, sampler, AR loop, video, stats, store."""
