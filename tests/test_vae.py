"""Wan VAE: chunked streaming decode equals one whole decode, frame counts, seeding, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import WeightsError
from pipeline.model.vae import (
    StreamingDecoder,
    build_tiny_vae,
    denormalize_latents,
    load_vae,
    pixel_frames_for,
    to_uint8_frames,
)

Z_DIM, H, W = 16, 2, 3  # latent channels and size of the tiny VAE's test latents


@pytest.fixture(scope="module")
def vae():  # -> AutoencoderKLWan
    return build_tiny_vae(seed=0)


def _latents(frames: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Normalised latents [B, z_dim, F, h, w]."""
    return torch.randn(batch, Z_DIM, frames, H, W, generator=torch.Generator().manual_seed(seed))


def _whole_decode(vae, latents: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The oracle: diffusers' own decode of the whole sequence, pixels [B, 3, T, H, W]."""
    with torch.no_grad():
        return vae.decode(denormalize_latents(vae, latents)).sample


def _stream(decoder: StreamingDecoder, latents: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    parts, start = [], 0
    for size in sizes:
        parts.append(decoder.decode_float(latents[:, :, start : start + size]))
        start += size
    return parts


@pytest.mark.parametrize("sizes", [[3, 3, 3], [1, 2, 3], [2, 1, 1]])
def test_streaming_decode_equals_whole_decode(vae, sizes: list[int]) -> None:  # noqa: ANN001
    latents = _latents(sum(sizes))
    whole = _whole_decode(vae, latents)
    parts = _stream(StreamingDecoder(vae), latents, sizes)
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == whole.shape
    assert (streamed - whole).abs().max().item() <= 1e-6
    assert torch.equal(to_uint8_frames(streamed), to_uint8_frames(whole))


def test_uint8_decode_matches_whole_decode_chunk_by_chunk(vae) -> None:  # noqa: ANN001
    latents = _latents(9)
    expected = to_uint8_frames(_whole_decode(vae, latents))  # [B, T, H, W, 3]
    decoder = StreamingDecoder(vae)
    frames = [decoder.decode(latents[:, :, i : i + 3]) for i in (0, 3, 6)]
    assert [f.shape[1] for f in frames] == [9, 12, 12]
    assert frames[0].dtype == torch.uint8 and frames[0].shape == (2, 9, 8 * H, 8 * W, 3)
    assert torch.equal(torch.cat(frames, dim=1), expected)
    assert decoder.frames_decoded == 9


def test_frame_counts_first_call_then_four_per_latent_frame(vae) -> None:  # noqa: ANN001
    decoder = StreamingDecoder(vae)
    latents = _latents(6, batch=1)
    assert decoder.decode(latents[:, :, :2]).shape[1] == pixel_frames_for(2) == 5
    assert decoder.decode(latents[:, :, 2:5]).shape[1] == 12
    assert decoder.decode(latents[:, :, 5:6]).shape[1] == 4


def test_reset_starts_a_new_video(vae) -> None:  # noqa: ANN001
    decoder = StreamingDecoder(vae)
    latents = _latents(3)
    first = decoder.decode_float(latents)
    decoder.decode_float(_latents(2, seed=7))
    decoder.reset()
    assert decoder.frames_decoded == 0
    assert torch.equal(decoder.decode_float(latents), first)


def test_other_decodes_between_chunks_do_not_disturb_a_stream(vae) -> None:  # noqa: ANN001
    latents = _latents(6)
    whole = _whole_decode(vae, latents)
    decoder = StreamingDecoder(vae)
    first = decoder.decode_float(latents[:, :, :3])
    _whole_decode(vae, _latents(4, seed=9))  # clears the VAE's own cache
    StreamingDecoder(vae).decode_float(_latents(2, seed=8))
    second = decoder.decode_float(latents[:, :, 3:])
    assert torch.equal(torch.cat([first, second], dim=2), whole)


def test_bad_latent_shape_is_refused(vae) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"`latents`.*\(2, 8, 3, 2, 3\)"):
        StreamingDecoder(vae).decode(torch.zeros(2, 8, 3, H, W))
    with pytest.raises(ValueError, match=r"`latents`"):
        StreamingDecoder(vae).decode(torch.zeros(Z_DIM, 3, H, W))


def test_uint8_conversion_clamps_and_rounds() -> None:
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    frames = to_uint8_frames(video)
    assert frames.shape == (1, 5, 1, 1, 3)
    assert frames[0, :, 0, 0, 0].tolist() == [0, 0, round(127.5), 255, 255]


def test_tiny_vae_is_seeded_and_leaves_global_rng_alone(vae) -> None:  # noqa: ANN001
    state = torch.random.get_rng_state()
    again = build_tiny_vae(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), (_, b) in zip(vae.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    other = build_tiny_vae(seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(vae.parameters(), other.parameters(), strict=True))
    assert vae.config.z_dim == Z_DIM


@pytest.mark.parametrize(("pixel", "latent"), [(1, 1), (5, 2), (81, 21), (9, 3)])
def test_pixel_frames_follow_the_vae_temporal_scale(pixel: int, latent: int) -> None:
    assert pixel_frames_for(latent) == pixel


@pytest.mark.parametrize("bad", [0, -1, False, 2.0])
def test_pixel_frames_for_refuses_bad_counts(bad: object) -> None:
    with pytest.raises(ValueError, match="`latent_frames`"):
        pixel_frames_for(bad)  # type: ignore[arg-type]


def test_load_vae_reads_a_saved_diffusers_folder(vae, tmp_path: Path) -> None:  # noqa: ANN001
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path))
    latents = _latents(3)
    assert torch.equal(StreamingDecoder(loaded).decode(latents), StreamingDecoder(vae).decode(latents))


def test_load_vae_without_vae_folder_raises_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"`folder`.*vae/"):
        load_vae(str(tmp_path))
    (tmp_path / "vae").mkdir()
    with pytest.raises(WeightsError, match=r"`folder`"):
        load_vae(str(tmp_path))
