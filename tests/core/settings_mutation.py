"""Change one settings field at a time (the staleness tests): every leaf, another valid value.

Only the public settings API (no core/versions.py), so the tests that use it also run against
code that predates the version registry.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from arena_assets.core.settings import Settings

STRUCTURAL = {"student_family", "teacher_families", "compute.needs"}
"""Which assets exist (families) and per-step placement: tested on their own."""

SPECIAL: dict[str, Any] = {"attn_implementation": "sdpa"}
"""Leaf name -> the value to change to, where the first other choice would change nothing that
matters (eager -> flex_attention compute the same attention)."""


def leaves(obj: BaseModel, prefix: str = "") -> list[tuple[str, type[BaseModel], str, Any]]:
    """``(path, owning class, field name, value)`` of every leaf field (families recursed)."""
    out = []
    for name, f in type(obj).model_fields.items():
        if f.exclude:
            continue
        v, p = getattr(obj, name), f"{prefix}{name}"
        if isinstance(v, BaseModel):
            out += leaves(v, p + ".")
        elif isinstance(v, dict) and v and all(isinstance(x, BaseModel) for x in v.values()):
            for k, x in v.items():
                out += leaves(x, f"{p}.{k}.")
        elif p not in STRUCTURAL:
            out.append((p, type(obj), name, v))
    return out


def marker(cls: type[BaseModel], name: str) -> str:
    """The field's code-version marker (``speed_only``, ``unused``, ``hashed_as:...``) or ``hashed``."""
    extra = cls.model_fields[name].json_schema_extra
    return str(extra.get("code_version", "hashed")) if isinstance(extra, dict) else "hashed"


def _sample(t: Any) -> Any:
    if get_origin(t) is Literal:
        return get_args(t)[0]
    if get_origin(t) is list:
        return ["llama"] if get_args(t) and get_args(t)[0] is str else [{"key": "x"}]
    if get_origin(t) is dict:
        return {"key": "x"}
    return {bool: True, int: 7, float: 0.5, str: "/changed"}.get(t, "changed")


def other_value(t: Any, v: Any) -> Any:
    """A valid value of annotation ``t`` other than ``v``."""
    origin, args = get_origin(t), get_args(t)
    if origin is Literal:
        return next(a for a in args if a != v)
    if origin in (Union, types.UnionType):
        if v is None:
            return _sample(next(a for a in args if a is not type(None)))
        same = [a for a in args if a is not type(None) and (a is type(v) or get_origin(a) is type(v))]
        return other_value(same[0] if same else type(v), v)
    if origin is list or isinstance(v, list):
        inner = args[0] if args else str
        if get_origin(inner) is Literal:
            return v[1:] if len(v) > 1 else [next(a for a in get_args(inner) if a not in v)]
        return [*v, _sample(inner)] if inner is not Any else [{"key": "x"}]
    if origin is dict or isinstance(v, dict):
        return {"k": "v"}
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 2 + 0.25
    if isinstance(v, str):
        return v + "-changed"
    raise AssertionError(f"cannot change {v!r} of type {t}")


def mutated(settings: Settings, path: str) -> Settings:
    """``settings`` with the leaf at ``path`` set to another valid value."""
    raw = settings.model_dump(mode="python")
    *parents, leaf = path.split(".")
    obj: Any = settings
    d = raw
    for p in parents:
        obj = obj[p] if isinstance(obj, dict) else getattr(obj, p)
        d = d[p]
    value = SPECIAL[leaf] if leaf in SPECIAL else other_value(type(obj).model_fields[leaf].annotation, d[leaf])
    d[leaf] = value
    out = Settings.model_validate({**raw, "base_dir": settings.base_dir})
    return out
