"""nvdiffrast's JIT-built plugin is imported even when torch's loader leaves it out of sys.modules.

The failure on a GPU machine (torch 2.11 + CUDA 13): nvdiffrast builds its plugin, torch imports
the built library from its path without registering it, and nvdiffrast's
``importlib.import_module(name)`` raises ModuleNotFoundError. Reproduced here without CUDA: a
stand-in module in a fake TORCH_EXTENSIONS_DIR plays the built plugin."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from shards.raster.nvdiff_plugin import call_with_plugin, extension_build_dir, register_built_extension


def _fake_nvdiffrast_loader(name: str):
    """What nvdiffrast's `_get_plugin` does after building: load from the file (discarding the
    module, as torch's `_import_module_from_library` does), then import by name."""
    def get_plugin():
        path = Path(extension_build_dir(name)) / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        return importlib.import_module(name).get_log_level()
    return get_plugin


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("nvdiffrast_plugin_test")]:
        del sys.modules[name]


def test_built_module_is_registered_and_the_call_retried(extensions_dir):
    name = "nvdiffrast_plugin_test_py"
    build = Path(extension_build_dir(name))
    assert build == extensions_dir / name  # TORCH_EXTENSIONS_DIR decides the folder
    (build / f"{name}.py").write_text("def get_log_level():\n    return 3\n")
    loader = _fake_nvdiffrast_loader(name)
    with pytest.raises(ModuleNotFoundError):
        loader()  # the bug
    assert call_with_plugin(loader) == 3
    assert sys.modules[name].get_log_level() == 3
    assert str(build) not in sys.path  # registered by name, sys.path untouched
    assert call_with_plugin(loader) == 3


def test_other_import_errors_are_not_swallowed(extensions_dir):
    def missing_dependency():
        import some_module_that_does_not_exist  # noqa: F401

    with pytest.raises(ModuleNotFoundError, match="some_module_that_does_not_exist"):
        call_with_plugin(missing_dependency)


def test_missing_build_names_the_folder(extensions_dir):
    with pytest.raises(ModuleNotFoundError, match="build folder"):
        register_built_extension("nvdiffrast_plugin_test_never_built")
    assert "nvdiffrast_plugin_test_never_built" not in sys.modules


#: A multi-phase-initialised extension (PEP 489), as pybind11 >= 3 (torch's) generates: unlike a
#: single-phase one, loading it from its path does not put it in sys.modules.
STUB = """
#include <Python.h>
static PyObject* get_log_level(PyObject* self, PyObject* args) { return PyLong_FromLong(2); }
static PyMethodDef methods[] = {{"get_log_level", get_log_level, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
static PyModuleDef_Slot slots[] = {{0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "NAME", NULL, 0, methods, slots, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit_NAME(void) { return PyModuleDef_Init(&mod); }
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine loads the real plugin (test_raster, -m gpu)")
def test_real_nvdiffrast_loader_with_a_compiled_stub_plugin(extensions_dir, monkeypatch):
    """The installed nvdiffrast's own `_get_plugin`, against a tiny real extension module built
    where torch would have built the plugin."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    import nvdiffrast
    import nvdiffrast.torch as dr
    from nvdiffrast.torch import ops

    name = ops.sanitize_name(f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
    build = Path(extension_build_dir(name))
    (build / "stub.c").write_text(STUB.replace("NAME", name))
    ext = ".so"  # torch's cpp_extension names its builds <name>.so on Linux
    subprocess.run([compiler, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(build / "stub.c"),
                    "-o", str(build / f"{name}{ext}")], check=True)
    monkeypatch.setattr(ops, "_cached_plugin", {})
    monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ModuleNotFoundError, match=name):
        dr.get_log_level()  # the bug, with nvdiffrast's and torch's real loader
    monkeypatch.setattr(ops, "_cached_plugin", {})
    assert call_with_plugin(dr.get_log_level) == 2
    del sys.modules[name]


def test_fresh_process_finds_the_stand_in(extensions_dir):
    """A fresh interpreter (how preprocess workers start) with the stand-in built."""
    name = "nvdiffrast_plugin_test_proc"
    (Path(extension_build_dir(name)) / f"{name}.py").write_text("def get_log_level():\n    return 5\n")
    code = textwrap.dedent(f"""
        import importlib
        from shards.raster.nvdiff_plugin import call_with_plugin
        print(call_with_plugin(lambda: importlib.import_module({name!r}).get_log_level()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5"
