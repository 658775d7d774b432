"""CLI options built once, from the config dataclasses themselves.

`options(Config, group)` turns every field of a frozen config dataclass into a click option named after the field
(``num_chunks`` -> ``--num-chunks``), typed from its annotation (``Literal`` -> a choice, ``bool`` -> an on/off flag,
``tuple[float, ...]`` -> a repeatable option, ``tuple[int, int, int]`` -> three values), with the field's default and
the help text of the class docstring's ``field: text`` line. `build(Config, group, params)` makes the config back from
what click parsed. A field added to a config is an option at once; nothing is renamed on the way.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import click

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])

# Older spellings that scripts, infra manifests and other tests use; each is an extra name of the same option.
ALIASES = {"num_chunks": "--chunks", "window_frames": "--window", "sink_frames": "--sink", "height_px": "--height",
           "width_px": "--width"}
_SEP = "__"  # click parameter name = <group>__<field>: groups never collide, whatever fields they gain


def field_help(cls: type) -> dict[str, str]:
    """``field: text`` entries of a dataclass docstring (``a, b: text`` documents both; ``;`` or a blank line ends
    one), for the dataclass's own fields only."""
    names = {f.name for f in dataclasses.fields(cls)}
    pattern = re.compile(r"(?:^|(?<=[\s;]))([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): ")
    out: dict[str, str] = {}
    for paragraph in re.split(r"\n\s*\n", cls.__doc__ or ""):
        doc = " ".join(paragraph.split())
        hits = [m for m in pattern.finditer(doc) if all(n in names for n in m.group(1).split(", "))]
        for m, nxt in zip(hits, [*hits[1:], None]):
            text = doc[m.end(): nxt.start() if nxt else len(doc)].strip().rstrip(";").strip()
            for name in m.group(1).split(", "):
                out[name] = text.replace("``", "'")
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _option(group: str, f: dataclasses.Field, hint: Any, help_text: str, default: Any) -> click.Option | None:
    hint, _ = _unwrap(hint)
    flag = "--" + f.name.replace("_", "-")
    names = [flag, *([ALIASES[f.name]] if f.name in ALIASES else []), f"{group}{_SEP}{f.name}"]
    kw: dict[str, Any] = {"help": help_text, "show_default": default is not None}
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        names[0] = f"{flag}/--no-{f.name.replace('_', '-')}"
        return click.Option(names, default=default, **kw)
    if origin is Literal:
        return click.Option(names, type=click.Choice([str(a) for a in args]), default=default, **kw)
    if hint in (int, float, str):
        return click.Option(names, type=hint, default=default, **kw)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return click.Option(names, type=args[0], multiple=True, default=default or (), **kw)
    if origin is tuple and args and all(a is args[0] for a in args):
        return click.Option(names, type=args[0], nargs=len(args), default=default, **kw)
    return None  # a field the command line cannot express (a dict, a nested config): set it in code


def options(cls: type, group: str, *, exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None
            ) -> Callable[[F], F]:
    """A decorator adding one option per field of ``cls`` (except ``exclude``) to a click command."""
    hints = get_type_hints(cls)
    helps = field_help(cls)
    made = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        default = (defaults or {}).get(f.name, _default(f))
        option = _option(group, f, hints[f.name], helps.get(f.name, ""), default)
        if option is not None:
            made.append(option)

    def decorate(fn: F) -> F:
        params = getattr(fn, "__click_params__", [])
        params.extend(reversed(made))
        fn.__click_params__ = params  # type: ignore[attr-defined]
        return fn

    return decorate


def build(cls: type[C], group: str, params: dict[str, Any], **fixed: Any) -> C:
    """The ``cls`` instance from click's parsed ``params`` of ``group`` (and ``fixed`` fields); a bad value raises
    `click.BadParameter` naming the option."""
    prefix = group + _SEP
    values = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name, value in list(values.items()):
        if isinstance(value, tuple) and not value and _default(names[name]) is None:
            values[name] = None  # a repeatable option given no value: the field's None default
    try:
        return cls(**values, **fixed)
    except (TypeError, ValueError) as exc:
        named = re.search(r"`(\w+)`", str(exc))
        hint = "--" + named.group(1).replace("_", "-") if named and named.group(1) in names else None
        raise click.BadParameter(str(exc), param_hint=hint) from exc
