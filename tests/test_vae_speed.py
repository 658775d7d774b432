"""VAE decode speed options against the plain streaming decode: the stream decoder's CPU path, channels-last 3D,
bfloat16 weights."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.vae import StreamDecoder, StreamingDecoder, build_tiny_vae, speed_up_vae, to_uint8_frames


def _latents(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 16, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


def _chunks() -> list[torch.Tensor]:
    return [_latents(3, seed) for seed in range(3)]


def test_stream_decoder_on_a_cpu_gives_exactly_the_streaming_frames():
    plain = StreamingDecoder(build_tiny_vae())
    stream = StreamDecoder(StreamingDecoder(build_tiny_vae()))
    assert stream.stream is None  # inert on a CPU: decodes in the caller
    pending = [stream.submit(z) for z in _chunks()]  # all submitted before any result is read
    for z, p in zip(_chunks(), pending, strict=True):
        expected = plain.decode(z)
        got = p.result()
        assert got.device.type == "cpu" and got.dtype == torch.uint8
        assert torch.equal(got, expected)


def test_channels_last_decoder_matches_the_default_layout():
    plain = StreamingDecoder(build_tiny_vae())
    fast_vae = speed_up_vae(build_tiny_vae(), channels_last=True)
    assert fast_vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    fast = StreamingDecoder(fast_vae)
    for z in _chunks():
        torch.testing.assert_close(fast.decode_float(z), plain.decode_float(z), rtol=1e-5, atol=1e-5)


def test_bfloat16_decoder_stays_close_to_float32():
    plain = StreamingDecoder(build_tiny_vae())
    fast_vae = speed_up_vae(build_tiny_vae(), dtype=torch.bfloat16)
    assert {p.dtype for p in fast_vae.parameters()} == {torch.bfloat16}
    fast = StreamingDecoder(fast_vae)
    for z in _chunks():
        ref, got = plain.decode_float(z), fast.decode_float(z).float()
        # the tiny random VAE: mean error ~0.003 on [-1, 1] (~0.4 uint8 levels); a wrong cast or layout is ~0.1
        assert (got - ref).abs().mean() < 0.02
        levels = (to_uint8_frames(got).int() - to_uint8_frames(ref).int()).abs().float().mean()
        assert levels < 2.0


@pytest.mark.parametrize("bad", [torch.zeros(2, 16, 3, 4), torch.zeros(2, 8, 1, 4, 6)])
def test_stream_decoder_rejects_bad_latents(bad):
    with pytest.raises(ValueError, match="latents"):
        StreamDecoder(StreamingDecoder(build_tiny_vae())).submit(bad)
