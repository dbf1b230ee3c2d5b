"""Names checked by one rule everywhere: person ids, which become folder and file names, Ray task names and SLURM
job names (the capture folders, every command's ``--persons``, jobs, results.json), and the host names services
listen on."""

from __future__ import annotations

import ipaddress
import re

#: The files the main job writes beside the person folders of ``<workdir>/runs``: a person of that name would be
#: cleared, trained and summarised into them (``--train.resume never`` failed every person's training on it).
RESERVED_NAMES = ("summary.json", "stages.json")
#: Person ids become folder, file, Ray task and SLURM job names and travel comma-joined between the main job's
#: stages: letters, digits, '.', '_', '-', a letter or digit first, at most 64 characters (the temporary names
#: beside a person's folder add at most ~100 to it: host, pid namespace and pid; within the 255 bytes of a
#: file name), none of RESERVED_NAMES.
#: Anchored: ``match`` is whole.
PERSON_ID_RE = re.compile(r"\A(?!(?:%s)\Z)[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"
                          % "|".join(map(re.escape, RESERVED_NAMES)))
PERSON_ID_RULE = ("letters, digits, '.', '_', '-', a letter or digit first, at most 64 characters, not "
                  + " or ".join(RESERVED_NAMES))


def person_id_problem(name: str) -> str | None:
    """Why ``name`` cannot be a person id, or None."""
    return None if PERSON_ID_RE.match(name) else f"{name!r} is not a person id ({PERSON_ID_RULE})"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be an address to listen on (not an IP address nor a host name, e.g. one with a port;
    empty, which would listen on every interface), or None (the metrics exporters' --train.metrics-host and
    --renderer.metrics-host). Whether the machine has the address shows when the exporter starts."""
    if not isinstance(host, str) or not host:
        return "empty (give an address: 127.0.0.1, the node's address, or 0.0.0.0 for every interface)"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    # a dotted quad out of range (256.0.0.1) is no host name either: a top-level label is never all digits
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return "not an IP address or a host name (without a port)"
    return None
