"""TextEncoder: shapes, zeroed padding, determinism, unicode, cleaning, errors, loading a saved folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import InputError, WeightsError
from pipeline.model.text import TextEncoder, build_tiny_text_encoder, clean_prompt, load_text_encoder

PROMPTS = ["a red panda walking through a snowy bamboo forest", "a cat", ""]
UNICODE = [
    "熊猫在竹林里 🐼🎋",
    "café naïve — Ünïcödé",
    "مرحبا بالعالم",
    "e\u0301\u200d\U0001f469\u200d\U0001f4bb",
    "\x00\x07",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return build_tiny_text_encoder(text_dim=32, text_len=32, seed=0)


def _token_counts(enc: TextEncoder, prompts: list[str]) -> list[int]:
    """Real tokens (eos included) per prompt, after Wan's cleaning and truncation to text_len."""
    ids = enc.tokenizer([clean_prompt(p) for p in prompts], truncation=True, max_length=enc.text_len)["input_ids"]
    return [len(row) for row in ids]


def test_encode_returns_batch_text_len_text_dim(encoder: TextEncoder) -> None:
    out = encoder.encode(PROMPTS)
    assert out.shape == (len(PROMPTS), encoder.text_len, encoder.text_dim) == (3, 32, 32)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert encoder.encode(PROMPTS, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_positions_past_each_prompt_are_zero_and_real_ones_are_not(encoder: TextEncoder) -> None:
    out = encoder.encode(PROMPTS + UNICODE)
    for row, count in zip(out, _token_counts(encoder, PROMPTS + UNICODE), strict=True):
        assert 1 <= count <= encoder.text_len
        assert torch.equal(row[count:], torch.zeros_like(row[count:]))
        assert (row[:count].abs().sum(dim=-1) > 0).all()


def test_same_seed_same_outputs_and_global_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    a = build_tiny_text_encoder(seed=3)
    torch.manual_seed(1234)  # a different global state must not matter
    b = build_tiny_text_encoder(seed=3)
    torch.random.set_rng_state(state)
    for (name, pa), (_, pb) in zip(a.encoder.named_parameters(), b.encoder.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.encode(PROMPTS), b.encode(PROMPTS))
    c = build_tiny_text_encoder(seed=4)
    assert not torch.equal(a.encode(PROMPTS), c.encode(PROMPTS))
    state = torch.random.get_rng_state()
    build_tiny_text_encoder(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_any_unicode_prompt_encodes_byte_for_byte(encoder: TextEncoder) -> None:
    counts = _token_counts(encoder, UNICODE)
    for prompt, count in zip(UNICODE, counts, strict=True):
        assert count == min(len(clean_prompt(prompt).encode("utf-8")) + 1, encoder.text_len)
        ids = encoder.tokenizer(clean_prompt(prompt))["input_ids"]
        assert encoder.tokenizer.unk_token_id not in ids
        assert encoder.tokenizer.decode(ids, skip_special_tokens=True) == clean_prompt(prompt)
    assert torch.isfinite(encoder.encode(UNICODE)).all()


def test_long_prompt_is_truncated_to_text_len_ending_in_eos(encoder: TextEncoder) -> None:
    prompt = "a very long prompt " * 20
    ids = encoder.tokenizer(prompt, padding="max_length", truncation=True, max_length=encoder.text_len)["input_ids"]
    assert len(ids) == encoder.text_len and ids[-1] == encoder.tokenizer.eos_token_id
    out = encoder.encode([prompt])
    assert (out[0].abs().sum(dim=-1) > 0).all()


def test_prompts_are_cleaned_like_wan(encoder: TextEncoder) -> None:
    assert clean_prompt("  a \n\t red&amp;amp;panda  ") == "a red&panda"
    assert torch.equal(encoder.encode(["  a \n red   panda "]), encoder.encode(["a red panda"]))


def test_each_row_depends_only_on_its_prompt(encoder: TextEncoder) -> None:
    together = encoder.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(encoder.encode([prompt])[0], together[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("prompts", "match"),
    [([], r"`prompts`"), ("a cat", r"`prompts`"), (["ok", 3], r"`prompts\[1\]`.*int"), ([None], r"`prompts\[0\]`")],
)
def test_bad_prompts_raise_input_error_naming_them(encoder: TextEncoder, prompts: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        encoder.encode(prompts)  # type: ignore[arg-type]


def test_bad_text_len_is_refused(encoder: TextEncoder) -> None:
    with pytest.raises(ValueError, match=r"`text_len`.*0"):
        TextEncoder(encoder.tokenizer, encoder.encoder, 0)


def test_load_text_encoder_reads_a_saved_diffusers_folder(encoder: TextEncoder, tmp_path: Path) -> None:
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    encoder.encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = load_text_encoder(str(tmp_path), text_len=encoder.text_len)
    assert loaded.text_dim == encoder.text_dim
    assert torch.equal(loaded.encode(PROMPTS + UNICODE), encoder.encode(PROMPTS + UNICODE))


def test_load_text_encoder_without_subfolders_raises_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"`folder`.*tokenizer/"):
        load_text_encoder(str(tmp_path))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(WeightsError, match=r"`folder`"):
        load_text_encoder(str(tmp_path))
