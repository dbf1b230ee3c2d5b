"""A backend that is not there is named, with how to get it, before any work starts."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from cluster.preflight import BackendUnavailable, check_backend, check_ray, check_slurm


def _fake_commands(tmp_path: Path, scripts: dict[str, str]) -> str:
    """A PATH whose SLURM commands are the given shell scripts (and nothing else of SLURM)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        f = bin_dir / name
        f.write_text("#!/bin/sh\n" + body + "\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


NO_CONFIG = ('echo "sinfo: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host" >&2\n'
             'echo "sinfo: fatal: Could not establish a configuration source" >&2\nexit 1')
OK = {"sbatch": "exit 0", "scancel": "exit 0", "sinfo": 'echo "debug*"\necho "gpu"', "sacct": "exit 0"}


def test_slurm_without_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_commands(tmp_path, {**OK, "sinfo": NO_CONFIG}))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    with pytest.raises(BackendUnavailable) as e:
        check_slurm()
    msg = str(e.value)
    assert "SLURM_CONF is not set" in msg and "Could not establish a configuration source" in msg
    assert "slurm/local/start-slurm.sh" in msg and "export SLURM_CONF" in msg


def test_slurm_conf_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_commands(tmp_path, OK))
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere.conf"))
    with pytest.raises(BackendUnavailable, match="nowhere.conf does not exist"):
        check_slurm()


def test_slurm_commands_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM command at all
    with pytest.raises(BackendUnavailable, match="sbatch, sinfo, scancel are not on PATH.*slurm-client"):
        check_slurm()


def test_slurm_controller_down_and_partitions(tmp_path, monkeypatch):
    down = ('echo "sinfo: error: slurm_load_partitions: Unable to contact slurm controller (connect failure)" >&2\n'
            "exit 1")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.setenv("PATH", _fake_commands(tmp_path, {**OK, "sinfo": down}))
    with pytest.raises(BackendUnavailable, match=f"SLURM_CONF={conf}.*Unable to contact slurm controller"):
        check_slurm()
    (tmp_path / "ok").mkdir()
    monkeypatch.setenv("PATH", _fake_commands(tmp_path / "ok", OK))
    assert check_slurm() == []
    assert check_slurm("gpu") == []
    with pytest.raises(BackendUnavailable, match="partition 'big'.*it has: debug, gpu"):
        check_slurm("big")


def test_slurm_without_accounting_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_commands(
        tmp_path, {**OK, "sacct": 'echo "sacct: error: Slurm accounting storage is disabled" >&2\nexit 1'}))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    (warning,) = check_slurm()
    assert "accounting storage is disabled" in warning and "slurmdbd" in warning


@pytest.mark.skipif(shutil.which("sinfo") is None or Path("/etc/slurm/slurm.conf").exists(),
                    reason="needs SLURM's sinfo and no system-wide slurm.conf")
def test_real_sinfo_without_configuration(monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    with pytest.raises(BackendUnavailable, match="configuration source"):
        check_slurm()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_that_does_not_answer(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _closed_port()
    with pytest.raises(BackendUnavailable) as e:
        check_ray(f"127.0.0.1:{port}")
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in str(e.value) and "ray start --head" in str(e.value)
    with pytest.raises(BackendUnavailable, match="is not host:port"):
        check_ray("my-head")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what `ray job submit` sets
    with pytest.raises(BackendUnavailable, match=f"RAY_ADDRESS=127.0.0.1:{port}"):
        check_ray(None)


def test_ray_auto_without_cluster_and_a_listening_head(monkeypatch):
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    with pytest.raises(BackendUnavailable, match="auto: no running Ray cluster was found"):
        check_ray("auto")
    check_ray(None)  # embedded: nothing to check
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray(f"127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: f"127.0.0.1:{server.getsockname()[1]}")
        check_ray("auto")


def test_check_backend_covers_the_evaluation_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_closed_port()}"
    assert check_backend("local", None) == []
    with pytest.raises(BackendUnavailable):
        check_backend("local", address, evaluate=True)  # the evaluation would join it
    assert check_backend("local", address, evaluate=False) == []


def test_launch_all_stops_before_any_work(tmp_path, monkeypatch, capsys):
    """`launch_all --backend slurm` without SLURM, and `--ray-address` of nothing: exit code 2,
    one line that says what is missing, and nothing written (not even the synthetic data)."""
    import tyro

    from jobs.launch_all import LaunchAllArgs, main

    monkeypatch.setenv("PATH", _fake_commands(tmp_path, {**OK, "sinfo": NO_CONFIG}) + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    work = tmp_path / "work"
    assert main(tyro.cli(LaunchAllArgs, args=["--workdir", str(work), "--backend", "slurm"])) == 2
    err = capsys.readouterr().err
    assert "error: --backend slurm: SLURM is not reachable" in err and "start-slurm.sh" in err
    assert "Traceback" not in err
    address = f"127.0.0.1:{_closed_port()}"
    assert main(tyro.cli(LaunchAllArgs, args=["--workdir", str(work), "--ray-address", address])) == 2
    assert f"no Ray cluster answers at {address}" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == []


def test_launch_all_refuses_a_bad_evaluation_parallelism_before_any_work(tmp_path, capsys):
    """`--eval-parallel-persons 0` is refused with exit code 2 and one line naming the option,
    before the work directory is created (not after the training, when the evaluation starts)."""
    import tyro

    from jobs.launch_all import LaunchAllArgs, main

    work = tmp_path / "work"
    assert main(tyro.cli(LaunchAllArgs, args=["--workdir", str(work), "--eval-parallel-persons", "0"])) == 2
    err = capsys.readouterr().err
    assert "error: --eval-parallel-persons must be at least 1, got 0" in err and "Traceback" not in err
    assert not work.exists()


def test_an_embedded_rays_bind_host_must_be_an_address_of_this_machine(tmp_path, monkeypatch, capsys):
    """--ray-bind-host that no socket here can bind (a typo, another machine's address) is refused before any
    work with the flag named (an embedded Ray started on it waited for its own GCS without end); a joined
    cluster's run does not use it, and loopback addresses pass."""
    import tyro

    from jobs.launch_all import LaunchAllArgs, main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for host in ("192.0.2.1", "no-such-host.invalid"):  # TEST-NET-1: never an address of a machine
        with pytest.raises(BackendUnavailable, match=f"--ray-bind-host {host} is not an address of this machine"):
            check_backend("ray", None, ray_bind_host=host)
        with pytest.raises(BackendUnavailable, match="--ray-bind-host"):
            check_backend("local", None, evaluate=True, ray_bind_host=host)  # the evaluation's embedded Ray
    assert check_backend("local", None, evaluate=False, ray_bind_host="192.0.2.1") == []
    for host in ("127.0.0.1", "127.0.0.2", "localhost"):
        assert check_backend("ray", None, ray_bind_host=host) == []
    with socket.create_server(("127.0.0.1", 0)) as server:  # a joined cluster: its own addresses
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert check_backend("ray", address, ray_bind_host="192.0.2.1") == []
    work = tmp_path / "work"
    assert main(tyro.cli(LaunchAllArgs, args=["--workdir", str(work), "--ray-bind-host", "192.0.2.1"])) == 2
    err = capsys.readouterr().err
    assert "error: --ray-bind-host 192.0.2.1 is not an address of this machine" in err and "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == []
