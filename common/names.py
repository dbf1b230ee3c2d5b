"""Names that become folder and file names, Ray task names and SLURM job names, checked by one rule everywhere
(the capture folders, every command's ``--persons``, jobs, results.json)."""

from __future__ import annotations

import re

#: Person ids become folder, file, Ray task and SLURM job names and travel comma-joined between the main job's
#: stages: letters, digits, '.', '_', '-', a letter or digit first, at most 64 characters (the temporary names
#: beside a person's folder add ~20 to it, within the 255 bytes of a file name). Anchored: ``match`` is whole.
PERSON_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PERSON_ID_RULE = "letters, digits, '.', '_', '-', a letter or digit first, at most 64 characters"


def person_id_problem(name: str) -> str | None:
    """Why ``name`` cannot be a person id, or None."""
    return None if PERSON_ID_RE.match(name) else f"{name!r} is not a person id ({PERSON_ID_RULE})"
