"""What a rollout leaves behind: `render` (the entry point), mp4 video, pixel proxies and latent-context
checkpoints."""
