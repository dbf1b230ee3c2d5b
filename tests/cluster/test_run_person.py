"""cluster/run_person.py, the sbatch templates' CLI over run_attempt: exit codes and bad arguments."""

from __future__ import annotations

import json

import pytest

from cluster import run_person
from cluster.status import read_status


def echo(person: str, value: int = 0) -> dict:
    return {"person": person, "value": value}


@pytest.mark.parametrize("flags, error", [
    (["--person", "../017"], "--person '../017' is not a person id"),
    (["--person", "017", "--target", "no_colon"], "--target: target 'no_colon' must look like"),
    (["--person", "017", "--attempt", "-3"], "--attempt must be 1 or more, got -3"),
    (["--person", "017", "--attempt", "0"], "--attempt must be 1 or more, got 0"),
    (["--person", "017", "--kwargs-json", '{"status": 1}'], "--kwargs-json: 017: kwargs must not contain 'status'"),
])
def test_a_bad_argument_is_a_usage_error_naming_it(tmp_path, capsys, flags, error):
    """Exit code 2 and one usage line naming the option (a bad --person or --target was a traceback and
    --attempt -3 was recorded in the status file); no status file is written."""
    with pytest.raises(SystemExit) as exit_info:
        run_person.main([*flags, "--status-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and error in err and "Traceback" not in err
    assert read_status(tmp_path) == []


def test_a_good_call_runs_the_target_and_prints_its_result(tmp_path, capsys):
    code = run_person.main(["--person", "017", "--target", f"{__name__}:echo", "--kwargs-json", '{"value": 3}',
                            "--status-dir", str(tmp_path), "--attempt", "2"])
    assert code == 0 and json.loads(capsys.readouterr().out) == {"person": "017", "value": 3}
    (status,) = read_status(tmp_path)
    assert (status.state, status.attempt) == ("succeeded", 2)
