"""Generate the synthetic multi-view head capture root (the default data set).

    python jobs/make_synthetic.py [--out data/captures] [--synthetic.persons 8 ...]

Exit code 2 on invalid input: a --synthetic.* value the generator cannot use is refused when the command line is
parsed, an --out that cannot be written with one line.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from common.io import DataError
from jobs._parallel import check_workers, default_workers, map_persons
from shards.synthetic import SyntheticConfig, generate


@dataclass
class MakeSyntheticArgs:
    out: Path = Path("data/captures")
    """Capture root to write (one folder per person)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """What to generate."""
    workers: int = field(default_factory=default_workers)
    """Persons generated in parallel (one process each)."""

    def __post_init__(self) -> None:
        check_workers(self.workers)


def _one(person: str, config: SyntheticConfig, out: Path) -> str:
    generate(config, out, [person])
    return person


def main(args: MakeSyntheticArgs) -> list[str]:
    persons = args.synthetic.person_ids
    map_persons(functools.partial(_one, config=args.synthetic, out=args.out), persons, args.workers, "synthetic")
    print(f"wrote {len(persons)} synthetic persons under {args.out}")
    return persons


if __name__ == "__main__":
    try:
        main(tyro.cli(MakeSyntheticArgs))
    except (DataError, OSError) as e:  # an --out that cannot be written (a file on the way, no permission, no space)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
