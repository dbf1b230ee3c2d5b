"""Atomic writes: a reader sees the old content or the new one, never a part, and nothing is left behind."""

import errno
import os
import pickle
import stat
from pathlib import Path

import pytest

from common import io as cio
from common.io import DataError, atomic_directory, atomic_file, atomic_write_json, naming


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "video.mp4"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".mp4" and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o666 & ~cio.umask()
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["video.mp4"]
    with atomic_file(target, mode=0o640) as tmp:
        tmp.write_bytes(b"x")
    assert _mode(target) == 0o640


def test_atomic_write_json_is_sorted_and_complete(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_atomic_directory_replaces_the_old_one_or_leaves_it(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert _mode(tmp) == 0o777 & ~cio.umask()
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # untouched until the block succeeds
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise ValueError("failed half-way")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folders


def test_replace_directory_puts_the_old_one_back_when_the_rename_fails(tmp_path, monkeypatch):
    target, new = tmp_path / "store", tmp_path / "new"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    new.mkdir()
    real_replace = os.replace

    def failing(src, dst):
        if str(src) == str(new):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        cio.replace_directory(new, target)
    assert (target / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "store"]


def test_data_error_names_the_file_and_survives_pickling(tmp_path):
    err = DataError(tmp_path / "x.json", "field 'a' is missing")
    assert str(err) == f"{tmp_path / 'x.json'}: field 'a' is missing"
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError) and again.path == err.path and str(again) == str(err)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() says: no file name


def test_io_errors_name_the_path_being_written(tmp_path, monkeypatch):
    """A full disk surfaces as "[Errno 28] No space left on device: '<the file being written>'",
    with the same errno (and OSError subclass) as the original."""
    target = tmp_path / "runs" / "summary.json"
    monkeypatch.setattr(Path, "write_bytes", _full_disk)
    with pytest.raises(OSError) as err:
        atomic_write_json(target, {"a": 1})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert str(err.value) == f"[Errno 28] No space left on device: '{target}'"
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing half-written
    with pytest.raises(PermissionError) as err:  # the subclass survives
        with naming(tmp_path / "x"):
            raise OSError(errno.EACCES, "Permission denied")
    assert err.value.filename == str(tmp_path / "x")
    with pytest.raises(FileNotFoundError) as err:  # an error naming another file keeps its name
        with naming(tmp_path / "x"):
            open(tmp_path / "elsewhere" / "y")
    assert err.value.filename == str(tmp_path / "elsewhere" / "y")


def test_atomic_directory_names_the_directory(tmp_path):
    with pytest.raises(OSError) as err:
        with atomic_directory(tmp_path / "store.zarr") as tmp:
            (tmp / "a").write_text("x")
            _full_disk()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "store.zarr")
    assert list(tmp_path.iterdir()) == []


def test_metrics_log_and_checkpoint_name_their_paths(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import torch

    from avatars.training import checkpoint
    from avatars.training.callbacks import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(Path, "open", lambda *a, **k: _full_disk())
    with pytest.raises(OSError) as err:
        log.on_log(None, {"step": 1, "loss": 0.5})
    assert err.value.filename == str(tmp_path / "metrics.jsonl")
    monkeypatch.undo()

    class FullDiskEngine:  # torch.save on a full disk: a RuntimeError that says nothing useful
        def save_checkpoint(self, *args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
    state = checkpoint.TrainerState(step=4)
    with pytest.raises(OSError) as err:
        checkpoint.save(FullDiskEngine(), tmp_path / "ckpt", state, torch.Generator(), keep_last=2)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "ckpt" / "step_0000004")
    assert "torch.save" in str(err.value)


def test_a_unix_socket_fits_up_to_107_bytes(tmp_path):
    """Checked against a real bind: Linux takes a socket path of 107 bytes, not 108."""
    import socket

    directory = str(tmp_path)
    for total in (107, 108):
        name = "/" + "s" * (total - len(directory) - 1)
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.bind(directory + name)
                bound = True
            except OSError:
                bound = False
        assert bound == cio.fits_unix_socket(directory, len(name)) == (total == 107), total


def test_the_umask_is_read_without_being_set(monkeypatch):
    """Reading the umask by setting it and setting it back is a race between threads (the evaluation writes from
    several): one could read the other's 0 and leave the process with umask 0. On Linux it is read from
    /proc/self/status and never set; elsewhere set and restored under a lock."""
    previous = os.umask(0o027)
    try:
        real_umask = os.umask

        def no_set(mask):
            raise AssertionError("umask() set the process umask")

        monkeypatch.setattr(os, "umask", no_set)
        assert cio.umask() == 0o027
        monkeypatch.setattr(os, "umask", real_umask)

        real_open = open

        def no_proc(path, *args, **kwargs):  # a system without /proc
            if str(path).startswith("/proc/"):
                raise FileNotFoundError(path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_proc)
        assert cio.umask() == 0o027 and real_umask(0o027) == 0o027  # read, and left as it was
    finally:
        os.umask(previous)


def test_an_atomic_file_is_on_the_disk_before_its_rename(tmp_path, monkeypatch):
    """Without the fsync, a power loss could keep the rename and lose the data: an empty file under the final name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert [kind for kind, _ in events] == ["fsync", "replace"] and events[0][1] == events[1][1], events


def test_a_damaged_marker_reads_as_none_with_a_warning_naming_it(tmp_path):
    marker = tmp_path / "done.json"
    assert cio.read_marker(marker) is None  # none: not complete, quietly
    atomic_write_json(marker, {"a": 1})
    assert cio.read_marker(marker) == {"a": 1}
    marker.write_text('{"a": ')
    with pytest.warns(RuntimeWarning, match=f"{marker}: unreadable completion marker"):
        assert cio.read_marker(marker) is None


def test_a_cut_off_safetensors_file_is_a_data_error_naming_it(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64)}, str(path))
    assert torch.equal(cio.read_safetensors(path)["w"], torch.ones(64))
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(DataError, match="unreadable safetensors file") as err:
        cio.read_safetensors(path)
    assert err.value.path == path


def test_what_a_killed_writer_left_is_removed_by_the_next_write_of_that_folder(tmp_path):
    """A writer SIGKILLed inside atomic_directory (a killed ingest: a whole store under .000.zarr.tmp-*; a kill
    between replace_directory's renames: the old store under .000.zarr.old-* too) left them for good. The next write
    of that folder removes them, with a warning; a live writer's, another host's and an older version's are kept."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "000.zarr"
    killed = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from common.io import atomic_directory\n"
              "target = Path(sys.argv[1])\n"
              "target.mkdir(exist_ok=True)\n"
              "(target / 'old').write_text('the store before')\n"
              "replace = os.replace\n"
              "def killed_at_the_second_rename(src, dst):\n"
              "    if Path(src) == tmp:  # the old store is aside, the new one not yet in place\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    replace(src, dst)\n"
              "with atomic_directory(target) as tmp:\n"
              "    (tmp / 'chunk').write_bytes(b'half a store')\n"
              "    os.replace = killed_at_the_second_rename\n")
    run = subprocess.run([sys.executable, "-c", killed, str(target)], cwd=Path(cio.__file__).parents[1])
    assert run.returncode == -signal.SIGKILL
    left = sorted(p.name.split("-", 1)[0] for p in tmp_path.iterdir())
    assert left == [".000.zarr.old", ".000.zarr.tmp"] and not target.exists()  # killed between the renames
    tag = cio._writer_tag().rsplit("@", 2)[0]
    kept = [tmp_path / f".000.zarr.tmp-{tag}@{os.getpid()}@live",  # a writer that runs (this process)
            tmp_path / ".000.zarr.tmp-otherhost@1@2@x",  # another host's, on a shared file system
            tmp_path / ".000.zarr.tmp-abc123"]  # an older version's (no tag)
    for folder in kept:
        folder.mkdir()
    with pytest.warns(RuntimeWarning, match=r"\.000\.zarr\.(tmp|old)-.*: removed, the temporary folder of a writer"):
        with atomic_directory(target) as tmp:
            (tmp / "chunk").write_bytes(b"a whole store")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["000.zarr", *(p.name for p in kept)])
    assert (target / "chunk").read_bytes() == b"a whole store"
