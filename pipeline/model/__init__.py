"""The model on one device: the causal Wan transformer over a prunable KV cache, RoPE, attention, weights,
text encoder and VAE, assembled by `pipeline.model.backend`."""
