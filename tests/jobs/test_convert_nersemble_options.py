"""The conversion's options are checked when parsed."""

from __future__ import annotations

import pytest
import tyro

from jobs.convert_nersemble import ConvertArgs
from shards.nersemble import ConvertConfig


@pytest.mark.parametrize("size", [(0, 3208), (2200, 0), (-2200, 3208), (2200, -1)])
def test_intrinsics_size_below_1_is_refused(size):
    """0 divided by zero when the images' aspect was compared (every participant failed with a ZeroDivisionError);
    a negative size gave every camera negative intrinsics."""
    with pytest.raises(ValueError, match=f"--convert.intrinsics-size: .* must be >= 1, got {size[0]} {size[1]}"):
        ConvertConfig(intrinsics_size=size)
    assert ConvertConfig(intrinsics_size=(1, 1)).intrinsics_size == (1, 1)


def test_the_command_line_refuses_it_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        tyro.cli(ConvertArgs, args=["--convert.intrinsics-size", "0", "3208"])
    said = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert exit_.value.code == 2 and "--convert.intrinsics-size" in said, said
