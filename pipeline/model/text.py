"""Prompt strings -> umT5 text embeddings, as Wan2.1 conditions its DiT.

Wan cleans each prompt (HTML entities, runs of whitespace), pads it to a fixed `text_len` tokens with
an end-of-sequence token appended, runs the umT5 encoder with the padding mask and then zeroes every
position past the prompt's own length. `TextEncoder.encode` does the same and returns
`[B, text_len, text_dim]`.

`build_tiny_text_encoder` builds a seeded stand-in (a byte-level tokenizer with a fixed vocabulary and
a 2-layer umT5) in-process, with no download; `load_text_encoder` reads a diffusers-format Wan folder.
"""

from __future__ import annotations

import html
import logging
import os
import re
from typing import TYPE_CHECKING

import torch

from pipeline.errors import InputError, WeightsError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

logger = logging.getLogger(__name__)

_PAD, _EOS, _UNK = "<pad>", "</s>", "<unk>"  # T5 conventions: pad id 0, eos id 1, unk id 2


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ftfy: unescape HTML entities twice, collapse whitespace, strip."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Prompt strings -> umT5 embeddings [B, text_len, text_dim], positions past each prompt's length zeroed (as Wan).

    Args:
        tokenizer: a Hugging Face tokenizer that appends an end-of-sequence token and pads on the right.
        encoder: a `transformers.UMT5EncoderModel` (eval mode is set here).
        text_len: the fixed number of token positions every prompt is padded or truncated to.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, encoder: UMT5EncoderModel, text_len: int) -> None:
        if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 1:
            raise ValueError(f"`text_len` must be a positive int, got {text_len!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"`tokenizer` must define a pad token, got pad_token={tokenizer.pad_token!r}")
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()
        self.text_len = text_len

    @property
    def text_dim(self) -> int:
        """Width of each embedding (the encoder's `d_model`)."""
        return int(self.encoder.config.d_model)

    def _check_prompts(self, prompts: list[str]) -> None:
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise InputError(f"`prompts` must be a non-empty list of str, got {prompts!r}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"`prompts[{i}]` must be a str, got {type(prompt).__name__}: {prompt!r}")

    @torch.no_grad()
    def encode(
        self, prompts: list[str], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Encode a batch of prompts.

        Args:
            prompts: B prompt strings (any unicode; the empty string is allowed, e.g. a negative prompt).
            device: where the result goes (default: the encoder's device).
            dtype: dtype of the result (default: the encoder's dtype).

        Returns:
            embeddings `[B, text_len, text_dim]`; rows past each prompt's token count (eos included) are zero.
        """
        self._check_prompts(prompts)
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        model_device = next(self.encoder.parameters()).device
        ids = tokens["input_ids"].to(model_device)  # [B, text_len]
        mask = tokens["attention_mask"].to(model_device)  # [B, text_len], 1 on real tokens
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, text_dim]
        hidden = hidden.masked_fill(mask.eq(0).unsqueeze(-1), 0.0)  # zero the padded positions
        return hidden.to(device=device or model_device, dtype=dtype or hidden.dtype)


def _byte_level_tokenizer(text_len: int) -> PreTrainedTokenizerBase:
    """A fixed-vocabulary byte-level tokenizer: 3 specials then one token per byte, so any unicode prompt encodes."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins, one per byte
    vocab = {_PAD: 0, _EOS: 1, _UNK: 2} | {ch: 3 + i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=_UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {_EOS}", special_tokens=[(_EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=_PAD,
        eos_token=_EOS,
        unk_token=_UNK,
        model_max_length=text_len,
        padding_side="right",
    )


def build_tiny_text_encoder(text_dim: int = 32, text_len: int = 32, seed: int = 0) -> TextEncoder:
    """A seeded, CPU-sized umT5 text encoder (2 layers, 2 heads x 16) for tests and demos; no download.

    The same `seed` gives the same weights in every process; the global RNG is left untouched.
    Returns a `TextEncoder` producing `[B, text_len, text_dim]`.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    if not isinstance(text_dim, int) or text_dim < 1:
        raise ValueError(f"`text_dim` must be a positive int, got {text_dim!r}")
    tokenizer = _byte_level_tokenizer(text_len)
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=text_dim,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(config)
    return TextEncoder(tokenizer, encoder, text_len)


def load_text_encoder(
    folder: str, text_len: int = 512, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TextEncoder:
    """Load the umT5 tokenizer and encoder of a diffusers-format Wan folder (`tokenizer/`, `text_encoder/`).

    Local files only. A missing or unreadable subfolder raises `WeightsError` naming the path.
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    paths = {name: os.path.join(folder, name) for name in ("tokenizer", "text_encoder")}
    for name, path in paths.items():
        if not os.path.isdir(path):
            raise WeightsError(f"`folder` {folder!r} has no `{name}/` subfolder (looked for {path!r})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True)
        encoder = UMT5EncoderModel.from_pretrained(paths["text_encoder"], local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load the text encoder from `folder` {folder!r}: {exc}") from exc
    logger.info("loaded text encoder from %s (d_model=%d, text_len=%d)", folder, encoder.config.d_model, text_len)
    return TextEncoder(tokenizer, encoder.to(device), text_len)
