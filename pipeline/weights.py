"""Checkpoints -> a diffusers `WanTransformer3DModel`: reading, key layouts, checked loading.

Accepted files: `.safetensors` (preferred) and `.pt`/`.pth`/`.bin` read with `torch.load(weights_only=True)`,
so a pickle that holds anything but tensors and plain containers is refused. Self Forcing / Rolling
Forcing checkpoints hold the generator under `generator_ema` (preferred) or `generator`, with a `model.`
prefix on every key; both are undone here.

Two key layouts exist: diffusers (`blocks.0.attn1.to_q.weight`) and the original Wan code's
(`blocks.0.self_attn.q.weight`). `to_diffusers_keys` detects the layout and converts original names with
diffusers' own `convert_wan_transformer_to_diffusers`; `to_original_keys` is its exact inverse.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_GENERATOR_KEYS = ("generator_ema", "generator")  # Self Forcing / Rolling Forcing, best first
_SHOW = 10  # keys listed per category in a WeightsError

# Diffusers -> original Wan, applied in order to each key (the inverse of diffusers' conversion table).
_TO_ORIGINAL: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm([23])\.", lambda m: f"{m.group(1)}.norm{5 - int(m.group(2))}."),  # swap norm2/norm3
)
_ORIGINAL_MARKERS = re.compile(
    r"(^|\.)(self_attn|cross_attn|modulation)(\.|$)|^(time_embedding|text_embedding|time_projection|head)\."
)
_DIFFUSERS_MARKERS = re.compile(r"(^|\.)(attn1|attn2|scale_shift_table)(\.|$)|^(condition_embedder|proj_out)\.")


def _load_raw(path: str) -> Any:
    """The object stored at `path` (a dict for every accepted file); never unpickles arbitrary objects."""
    lower = path.lower()
    if not (lower.endswith(".safetensors") or lower.endswith(_TORCH_SUFFIXES)):
        raise WeightsError(f"`path` {path!r} must end in .safetensors, .pt, .pth or .bin")
    if not os.path.isfile(path):
        raise WeightsError(f"`path` {path!r} is not a file")
    if lower.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"`path` {path!r} is not a readable safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(
            f"`path` {path!r} was refused by torch.load(weights_only=True): it is corrupt or holds objects "
            f"other than tensors and plain containers ({type(exc).__name__}); convert it to .safetensors"
        ) from exc


def _select(obj: Any, key: str | None, source: str) -> Mapping[str, Any]:
    """The sub-dict under `key` (nested, or flattened as `key.` prefixes); with no key, a generator if present."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a dict of tensors")
    for candidate in (key,) if key is not None else _GENERATOR_KEYS:
        if isinstance(obj.get(candidate), Mapping):
            return obj[candidate]
        prefix = f"{candidate}."
        flat = {k[len(prefix) :]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
        if flat:
            return flat
    if key is not None:
        top = sorted(str(k) for k in obj)[:_SHOW]
        raise WeightsError(f"`key` {key!r} is not in {source}; its top-level keys include {top}")
    return obj


def extract_state_dict(obj: Any, *, key: str | None = None, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """A loaded checkpoint -> a flat state dict: pick the generator (see `read_state_dict`), strip `model.`."""
    state = _select(obj, key, source)
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{source} has {len(bad)} entries that are not tensors, e.g. {bad[:_SHOW]}")
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    return dict(state)


def read_state_dict(path: str, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a transformer state dict from `.safetensors` or `.pt`/`.pth`/`.bin` (weights-only unpickling).

    Args:
        path: a local file.
        key: the entry holding the generator in a training checkpoint; by default `generator_ema`, then
            `generator`, then the whole file. A `model.` prefix shared by every key is stripped.

    Raises:
        WeightsError: naming `path` for a bad suffix, a missing or unreadable file, a refused pickle,
            a missing `key` or non-tensor entries.
    """
    path = os.fspath(path)
    state = extract_state_dict(_load_raw(path), key=key, source=f"`path` {path!r}")
    logger.info("read %d tensors from %s", len(state), path)
    return state


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The key layout: `"original"` (Wan's own names) or `"diffusers"` (also when neither is recognisable).

    Raises:
        WeightsError: when `state_dict` mixes both layouts.
    """
    original = [k for k in state_dict if _ORIGINAL_MARKERS.search(k)]
    diffusers = [k for k in state_dict if _DIFFUSERS_MARKERS.search(k)]
    if original and diffusers:
        raise WeightsError(
            f"`state_dict` mixes key layouts: original Wan names such as {original[:3]} "
            f"and diffusers names such as {diffusers[:3]}"
        )
    return "original" if original else "diffusers"


def to_diffusers_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan transformer state dict to diffusers names; diffusers names pass through. Input is not modified."""
    if detect_layout(state_dict) == "diffusers":
        return dict(state_dict)
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(dict(state_dict))  # it pops from the dict it is given
    if len(converted) != len(state_dict):
        raise WeightsError(f"key conversion merged keys: {len(state_dict)} in, {len(converted)} out")
    return converted


def _original_name(key: str) -> str:
    for pattern, replacement in _TO_ORIGINAL:
        key = re.sub(pattern, replacement, key)
    return key


def to_original_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers keys to the original Wan names (the inverse of `to_diffusers_keys`); original names pass."""
    if detect_layout(state_dict) == "original":
        return dict(state_dict)
    return {_original_name(k): v for k, v in state_dict.items()}


def _mismatch_report(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per problem category (missing, unexpected, wrong shape), each with counts and the first keys."""
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in sorted(set(state) & set(model_state))
        if state[k].shape != model_state[k].shape
    ]
    lines = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            lines.append(f"{len(items)} {name}: {items[:_SHOW]}{more}")
    return lines


def load_transformer_weights(
    model: WanTransformer3DModel, path_or_state: str | os.PathLike[str] | Mapping[str, Any], *, key: str | None = None
) -> None:
    """Load a checkpoint (file path or already-loaded dict) into `model` in place, in either key layout.

    Every problem is collected first: missing keys, unexpected keys and shape mismatches raise one
    `WeightsError` listing them (counts and the first keys of each). Dtypes are cast to the model's.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = f"`path_or_state` {os.fspath(path_or_state)!r}"
        state = read_state_dict(os.fspath(path_or_state), key=key)
    else:
        source = "`path_or_state` (a dict)"
        state = extract_state_dict(path_or_state, key=key, source=source)
    state = to_diffusers_keys(state)
    problems = _mismatch_report(model.state_dict(), state)
    if problems:
        raise WeightsError(f"{source} does not fit the {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors into %s", len(state), type(model).__name__)
