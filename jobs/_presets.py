"""A CLI over complete preset configs (gsplat's ``tyro.extras.overridable_config_cli``): the first
argument names the preset, every field after it overrides that preset's value, and
``<preset> --help`` lists every field with the value that preset uses."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TypeVar

import tyro

T = TypeVar("T")


class UsageError(ValueError):
    """A command-line option that names nothing usable (no person, no shards); the message names the option, and
    the program exits with code 2 and that one line."""


def preset_cli(presets: Mapping[str, tuple[str, T]], default: str, description: str,
               args: Sequence[str] | None = None) -> T:
    """Parse ``args`` (default: ``sys.argv[1:]``); without a preset name first, ``default`` is used,
    so ``prog --person 000`` means ``prog <default> --person 000``."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or (args[0] not in presets and args[0] not in ("-h", "--help")):
        args.insert(0, default)
    return tyro.extras.overridable_config_cli(dict(presets), description=description, args=args)


def listed_persons(spec: str) -> list[str]:
    """The ids of a comma-separated ``--persons`` (not 'all'); one that names no person (``,``) or an id that is no
    person id is a :class:`UsageError`: nothing to do must not pass for success."""
    from common.names import person_id_problem

    persons = [p.strip() for p in spec.split(",") if p.strip()]
    if not persons:
        raise UsageError(f"--persons {spec!r} names no person (give 'all' or comma-separated ids, e.g. 017,018)")
    for person in persons:  # an id becomes a path: '../x' or '/data/x' would be written outside the output folder
        if (why := person_id_problem(person)) is not None:
            raise UsageError(f"--persons: {why}")
    return persons
