"""Checkpoints -> a diffusers `WanTransformer3DModel`: reading, key layouts, checked loading.

Reads ``.safetensors`` (preferred) or ``.pt``/``.pth``/``.bin`` with ``torch.load(weights_only=True)`` (anything but
tensors is refused, naming the global). Self Forcing / Rolling Forcing keys (``generator_ema``/``generator``,
``model.`` and FSDP wrapper prefixes) are undone, and the original Wan layout is converted to diffusers' with
diffusers' own converter (`to_diffusers_keys`; `to_original_keys` is its inverse). Every key remembers its file name.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_GENERATOR_KEYS = ("generator_ema", "generator")  # Self Forcing / Rolling Forcing, best first
_SHOW = 10  # keys listed per category in a WeightsError
# Segments torch inserts when a module is wrapped (FSDP, activation checkpointing, torch.compile, DataParallel/DDP).
_WRAPPERS = re.compile(r"(^|\.)(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\.")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")

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
        refused = _REFUSED_GLOBAL.search(str(exc))
        what = f"it references the global `{refused.group(1)}`, which was refused" if refused else "it is corrupt"
        raise WeightsError(
            f"`path` {path!r} was refused by torch.load(weights_only=True): {what} "
            f"({type(exc).__name__}); only tensors and plain containers load; convert it to .safetensors"
        ) from exc


@dataclass(frozen=True)
class Checkpoint:
    """A transformer state dict in diffusers names, with the name each key had in the file.

    Attributes:
        state: diffusers key -> tensor.
        stored: diffusers key -> the key as stored (entry and full name, e.g.
            `generator_ema/model._fsdp_wrapped_module.blocks.0.self_attn.q.weight`).
        source: how errors name where it came from.
        layout: the file's key layout, "original" (Wan names) or "diffusers".
    """

    state: dict[str, torch.Tensor]
    stored: dict[str, str]
    source: str
    layout: str = "diffusers"


def _select(obj: Any, key: str | None, source: str) -> tuple[Mapping[str, Any], str]:
    """The sub-dict under `key` (nested, or flattened as `key.` prefixes) and how its keys are stored; with no
    key, a generator if present, else the whole object."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a dict of tensors")
    for candidate in (key,) if key is not None else _GENERATOR_KEYS:
        if isinstance(obj.get(candidate), Mapping):
            return obj[candidate], f"{candidate}/"
        prefix = f"{candidate}."
        flat = {k[len(prefix) :]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
        if flat:
            return flat, prefix
    top = sorted(str(k) for k in obj)
    more = f" (+{len(top) - _SHOW} more)" if len(top) > _SHOW else ""
    if key is not None:
        raise WeightsError(f"`key` {key!r} is not in {source}; its top-level keys are {top[:_SHOW]}{more}")
    if any(not isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{source} holds no generator ({' / '.join(_GENERATOR_KEYS)}) and is not a flat dict of tensors: "
            f"its top-level keys are {top[:_SHOW]}{more}; pass `key` naming the entry that holds the generator"
        )
    return obj, ""


def strip_wrappers(name: str) -> str:
    """`name` without the segments torch's wrappers insert, wherever they occur (nested wrappers included)."""
    while True:
        stripped = _WRAPPERS.sub(r"\1", name)
        if stripped == name:
            return name
        name = stripped


def _extract(obj: Any, key: str | None, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with wrapper segments and a shared `model.` prefix removed, new key -> stored key)."""
    state, stored_prefix = _select(obj, key, source)
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{source} has {len(bad)} entries that are not tensors, e.g. {bad[:_SHOW]}")
    names = {k: strip_wrappers(k) for k in state}
    if names and all(n.startswith("model.") for n in names.values()):
        names = {k: n[len("model.") :] for k, n in names.items()}
    clashes = sorted(n for n in set(names.values()) if list(names.values()).count(n) > 1)
    if clashes:
        raise WeightsError(f"{source} holds keys that differ only by wrapper prefixes: {clashes[:_SHOW]}")
    return {names[k]: v for k, v in state.items()}, {names[k]: stored_prefix + k for k in state}


def extract_state_dict(obj: Any, *, key: str | None = None, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """A loaded checkpoint -> a flat state dict: pick the generator (see `read_state_dict`), strip the wrapper
    segments torch adds (`_fsdp_wrapped_module.` and co.) anywhere in a key, then a `model.` prefix shared by all."""
    return _extract(obj, key, source)[0]


def read_state_dict(path: str, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a transformer state dict from `.safetensors` or `.pt`/`.pth`/`.bin` (weights-only unpickling).

    Args:
        path: a local file.
        key: the entry holding the generator in a training checkpoint; by default `generator_ema`, then
            `generator`, then the whole file. Wrapper segments (FSDP, checkpointing, compile, DDP) are removed
            wherever they occur, then a `model.` prefix shared by every key.

    Raises:
        WeightsError: naming `path` for a bad suffix, a missing or unreadable file, a refused pickle (and the
            refused global), a missing `key` or generator (with the file's top-level keys), non-tensor entries.
    """
    path = os.fspath(path)
    state = extract_state_dict(_load_raw(path), key=key, source=f"`path` {path!r}")
    logger.info("read %d tensors from %s", len(state), path)
    return state


def read_checkpoint(path_or_state: str | os.PathLike[str] | Mapping[str, Any], *, key: str | None = None
                    ) -> Checkpoint:
    """A file (or an already-loaded dict) -> a `Checkpoint` in diffusers names that remembers the stored names."""
    if isinstance(path_or_state, (str, os.PathLike)):
        path = os.fspath(path_or_state)
        source = f"`path_or_state` {path!r}"
        obj: Any = _load_raw(path)
    else:
        source, obj = "`path_or_state` (a dict)", path_or_state
    state, stored = _extract(obj, key, source)
    layout = detect_layout(state)
    if layout == "original":
        converted = to_diffusers_keys(state)
        stored = {k: stored.get(_original_name(k), f"? (converted to {k})") for k in converted}
        state = converted
    logger.info("read %d tensors from %s", len(state), source)
    return Checkpoint(state, stored, source, layout)


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


def _stored_name(ckpt: Checkpoint, key: str) -> str:
    """How `key` (a diffusers name) is, or would be, stored in the checkpoint's file."""
    if key in ckpt.stored:
        return ckpt.stored[key]
    return _original_name(key) if ckpt.layout == "original" else key


def _mismatch_report(model_state: Mapping[str, torch.Tensor], ckpt: Checkpoint) -> list[str]:
    """One line per problem category (missing, unexpected, wrong shape), each with counts and the first keys, every
    key named as converted (diffusers) and as stored in the file."""
    state = ckpt.state
    missing = [f"{k} (file: {_stored_name(ckpt, k)})" for k in sorted(set(model_state) - set(state))]
    unexpected = [f"{k} (file: {_stored_name(ckpt, k)})" for k in sorted(set(state) - set(model_state))]
    shapes = [
        f"{k} (file: {_stored_name(ckpt, k)}): checkpoint {tuple(state[k].shape)} "
        f"vs model {tuple(model_state[k].shape)}"
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
    model: WanTransformer3DModel,
    path_or_state: str | os.PathLike[str] | Mapping[str, Any] | Checkpoint,
    *,
    key: str | None = None,
) -> None:
    """Load a checkpoint (file path, already-loaded dict or `Checkpoint`) into `model` in place, in either layout.

    Every problem is collected first: missing keys, unexpected keys and shape mismatches raise one
    `WeightsError` listing them (counts and the first keys of each, as converted and as stored in the file).
    When shapes differ, the message says and how to build a model that fits. Dtypes are cast to the
    model's.
    """
    ckpt = path_or_state if isinstance(path_or_state, Checkpoint) else read_checkpoint(path_or_state, key=key)
    problems = _mismatch_report(model.state_dict(), ckpt)
    if problems:
        hint = ""
        if any("shape mismatch" in line for line in problems):
            hint = ("; the file's dims differ from the model's: build the model from the file with "
                    "`pipeline.model.weights.transformer_config_from_checkpoint` "
                    "(what `--model tiny --weights FILE` does) "
                    "or give the diffusers folder the file was trained from")
        raise WeightsError(f"{ckpt.source} does not fit the {type(model).__name__}: " + "; ".join(problems) + hint)
    model.load_state_dict(ckpt.state, strict=True)
    logger.info("loaded %d tensors into %s", len(ckpt.state), type(model).__name__)


def _dims(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"{source} has no `{key}`: cannot infer the transformer config from it")
    return tuple(state[key].shape)


def transformer_config_from_checkpoint(ckpt: Checkpoint, base: Mapping[str, Any]) -> dict[str, Any]:
    """`base` (a `WanTransformer3DModel` config) with every dim the checkpoint's shapes fix replaced by the file's.

    Inferred: num_layers, patch_size, in/out_channels, ffn_dim, text_dim, freq_dim, image_dim,
    added_kv_proj_dim, cross_attn_norm and the heads (see below). Kept from `base`: qk_norm, eps,
    rope_max_seq_len. Shapes fix only heads x head_dim; the split is `base`'s when the width is unchanged, else
    Wan's head_dim of 128 when it divides the width, else `base`'s head_dim when that divides it.

    Raises:
        WeightsError: naming the key and shape that cannot be read, or the width no head split fits.
    """
    state, src = ckpt.state, ckpt.source
    dim, in_channels, *patch = _dims(state, "patch_embedding.weight", src)  # [dim, C_in, p_t, p_h, p_w]
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise WeightsError(f"{src} must hold blocks 0..L-1, got block indices {layers[:_SHOW]}")
    out_features = _dims(state, "proj_out.weight", src)[0]  # [C_out * p_t * p_h * p_w, dim]
    volume = patch[0] * patch[1] * patch[2]
    config = dict(base)
    config.update(
        num_layers=len(layers), patch_size=tuple(patch), in_channels=in_channels, out_channels=out_features // volume,
        ffn_dim=_dims(state, "blocks.0.ffn.net.0.proj.weight", src)[0],  # [ffn, dim]
        text_dim=_dims(state, "condition_embedder.text_embedder.linear_1.weight", src)[1],  # [dim, text_dim]
        freq_dim=_dims(state, "condition_embedder.time_embedder.linear_1.weight", src)[1],  # [dim, freq_dim]
        cross_attn_norm="blocks.0.norm2.weight" in state,
        image_dim=state["condition_embedder.image_embedder.norm1.weight"].shape[0]
        if "condition_embedder.image_embedder.norm1.weight" in state else None,
        added_kv_proj_dim=state["blocks.0.attn2.add_k_proj.weight"].shape[1]
        if "blocks.0.attn2.add_k_proj.weight" in state else None,
    )
    base_dim = base["num_attention_heads"] * base["attention_head_dim"]
    fits = [d for d in (128, base["attention_head_dim"]) if dim % d == 0]
    head_dim = base["attention_head_dim"] if dim == base_dim else (fits[0] if fits else 0)
    if not head_dim:
        raise WeightsError(
            f"{src}: `patch_embedding.weight` has width {dim}, which the preset's heads x head_dim "
            f"({base['num_attention_heads']} x {base['attention_head_dim']} = {base_dim}) and Wan's head_dim 128 do "
            f"not fit; the head split is not stored in a checkpoint: give the diffusers folder (its "
            f"transformer/config.json) the file was trained from"
        )
    config.update(num_attention_heads=dim // head_dim, attention_head_dim=head_dim)
    return config
