"""The compiled-code cache between processes (avatars/pipelines/compile_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from avatars.pipelines import render_pipeline
from avatars.pipelines.compile_cache import cache_file, load_compiled, save_compiled

# A fresh process with its own (empty) inductor cache: what a new machine of a cluster sees.
PROCESS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from torch._dynamo.utils import counters
    from avatars.pipelines.compile_cache import load_compiled, save_compiled
    folder, device = Path(sys.argv[1]), torch.device("cpu")
    nothing = save_compiled(folder, device)  # nothing compiled yet
    loaded = load_compiled(folder, device)
    step = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    step(torch.randn(8))
    saved = save_compiled(folder, device)
    print("RESULT" + json.dumps({"nothing": nothing, "loaded": loaded, "saved": str(saved),
                                 "inductor": dict(counters["inductor"])}))
""")


def _fresh_process(folder, tmp_path, name: str) -> dict:
    # Scalar C++ kernels (TORCHINDUCTOR_VEC_ISA_OK=0): what is tested is the cache round trip, not the kernels; the
    # vector ISA's probe builds and the vector headers took ~10 of the first process's ~35 s on the 2-core machine.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"), TORCHINDUCTOR_VEC_ISA_OK="0")
    proc = subprocess.run([sys.executable, "-c", PROCESS, str(folder)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_a_second_process_takes_the_first_ones_compiled_code(tmp_path):
    """The first process compiles and saves; the next, with an empty local cache, loads the blob
    and inductor finds its graph there (a cache hit, no miss)."""
    folder = tmp_path / "compile-cache"
    first = _fresh_process(folder, tmp_path, "a")
    assert first["nothing"] is None and first["loaded"] is False
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert first["saved"] == str(cache_file(folder, torch.device("cpu")))
    second = _fresh_process(folder, tmp_path, "b")
    assert second["loaded"] is True
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0


def test_an_unchanged_blob_is_not_written_again(monkeypatch, tmp_path):
    """Once a process finds everything in the blob, its artifacts equal the blob (seen from the
    third process on, CPU): replicas then leave the file alone instead of each rewriting it."""
    artifacts = [b"compiled A"]
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (artifacts[0], None))
    path = save_compiled(tmp_path, torch.device("cpu"))
    written = path.stat().st_ino
    assert save_compiled(tmp_path, torch.device("cpu")) == path and path.stat().st_ino == written
    artifacts[0] = b"compiled A and B"
    save_compiled(tmp_path, torch.device("cpu"))
    assert path.read_bytes() == b"compiled A and B" and path.stat().st_ino != written


def test_a_corrupt_blob_is_reported_and_ignored(tmp_path):
    path = cache_file(tmp_path, torch.device("cpu"))
    path.write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="compiled-code cache not loaded"):
        assert load_compiled(tmp_path, torch.device("cpu")) is False
    assert not load_compiled(tmp_path / "missing", torch.device("cpu"))


def test_a_folder_that_cannot_be_written_is_reported_not_raised(monkeypatch, tmp_path):
    """A full disk or read-only share costs later processes a compilation, not this training job or replica."""
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")  # the cache folder's path is taken by a file
    with pytest.warns(UserWarning, match="compiled-code cache not saved"):
        assert save_compiled(blocked, torch.device("cpu")) is None
    assert blocked.read_bytes() == b"" and list(tmp_path.iterdir()) == [blocked]  # nothing half-written


def test_the_blob_is_named_by_torch_version_and_device_kind(tmp_path):
    name = cache_file(tmp_path, torch.device("cpu")).name
    assert name.startswith("torch-") and name.endswith("-cpu.bin") and "/" not in name
    assert torch.__version__.split("+")[0] in name


def test_warm_up_loads_the_cache_first_and_saves_after(monkeypatch, tmp_path):
    """RenderPipeline.warm_up with RenderOptions.compile_cache: load before compiling the buckets,
    save after (the cache round trip itself is tested above)."""
    from avatars.configs import tiny_config
    from avatars.models import DiffusionAvatarsModel
    from avatars.pipelines import RenderOptions, RenderPipeline

    calls = []
    monkeypatch.setattr(render_pipeline, "load_compiled", lambda folder, device: calls.append(("load", folder)))
    monkeypatch.setattr(render_pipeline, "save_compiled", lambda folder, device: calls.append(("save", folder)))
    real_denoise = RenderPipeline.denoise
    monkeypatch.setattr(RenderPipeline, "denoise", lambda self, *a, **k: (calls.append(("step", None)),
                                                                          real_denoise(self, *a, **k))[1])
    torch._dynamo.reset()
    model = DiffusionAvatarsModel(tiny_config())
    pipe = RenderPipeline(model, RenderOptions(compile="on", batch_buckets=(1,), compile_cache=tmp_path),
                          compile_backend="eager")
    pipe.warm_up(64, 64, num_inference_steps=1)
    torch._dynamo.reset()
    assert calls[0] == ("load", tmp_path) and calls[-1] == ("save", tmp_path)
    assert ("step", None) in calls[1:-1]
    # without a cache folder the warm-up still compiles, and reads and writes no blob
    calls.clear()
    pipe = RenderPipeline(model, RenderOptions(compile="on", batch_buckets=(1,)), compile_backend="eager")
    pipe.warm_up(64, 64, num_inference_steps=1)
    torch._dynamo.reset()
    assert calls and set(calls) == {("step", None)}
