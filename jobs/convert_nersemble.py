"""Convert a NeRSemble download + NPHM / MonoNPHM / FLAME tracking into the capture layout.

    python jobs/convert_nersemble.py --convert.nersemble /data/nersemble --convert.tracking /data/tracking \\
        --convert.out data/captures --convert.persons 017,018

What the tracking folder must hold is described in `shards/nersemble.py` and the README
("From a real NeRSemble download"). Then: `python jobs/ingest.py --captures data/captures`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import tyro

from common.io import DataError
from shards.nersemble import ConvertConfig, convert_person, list_participants


@dataclass
class ConvertArgs:
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """Inputs, output and conversion settings."""


def main(args: ConvertArgs) -> dict[str, str]:
    """Converts every participant; returns {id: 'converted' | 'skipped' | 'failed: <reason>'}."""
    results: dict[str, str] = {}
    for pid in list_participants(args.convert):
        try:
            results[pid] = convert_person(args.convert, pid)
        except DataError as e:  # one broken participant does not stop the others
            results[pid] = f"failed: {e}"
        except Exception as e:  # nor does an error the checks did not foresee (it leaves no partial output)
            results[pid] = f"failed: {type(e).__name__}: {e}"
        print(f"{pid}: {results[pid]}", flush=True)
    return results


if __name__ == "__main__":
    try:
        out = main(tyro.cli(ConvertArgs))
    except DataError as e:  # a root that does not exist or holds no participant: nothing was converted
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if any(v.startswith("failed") for v in out.values()) else 0)
