"""Dataclass configs to and from JSON-able dicts, typed and checked (pydantic's TypeAdapter).

Every config of the project is a plain dataclass (tyro builds the CLIs from them). Crossing a
JSON boundary (a checkpoint's config.json, an sbatch job's --kwargs-json) they become dicts;
:func:`from_jsonable` turns such a dict back into the dataclass with every field converted to
its annotated type (Path, tuple, nested dataclasses, Literal choices) and refuses unknown fields
and wrong types with a message naming the field.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import pydantic

T = TypeVar("T")


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls, config=None)


def to_jsonable(config: Any) -> Any:
    """A dataclass instance -> dicts, lists, strings and numbers."""
    return _adapter(type(config)).dump_python(config, mode="json")


def from_jsonable(cls: type[T], data: Any) -> T:
    """The ``cls`` instance ``data`` (from :func:`to_jsonable`, or a subset of its fields: the
    rest keep their defaults) describes; ValueError naming every bad field."""
    try:
        return _adapter(cls).validate_python(data, extra="forbid")
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid {cls.__name__}: {problems}") from None


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied, recursing into nested dicts."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
