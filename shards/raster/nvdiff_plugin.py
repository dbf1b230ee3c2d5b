"""Loading nvdiffrast's JIT-built CUDA plugin so that it imports on any CUDA machine.

nvdiffrast (`diffrp-nvdiffrast`) builds its plugin with `torch.utils.cpp_extension` into
`<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/<py>_<cuda>>/nvdiffrast_plugin_<ver>_torch<ver>/`
and then imports it *by name* (`importlib.import_module`). torch's loader imports the built
library from its file path and discards the module; that only left it in `sys.modules` as a side
effect of single-phase extension initialisation. pybind11 >= 3 (shipped with recent torch)
initialises extensions in multi-phase (PEP 489), which registers nothing, and the build folder is
not on `sys.path`, so the import fails with `ModuleNotFoundError: nvdiffrast_plugin_...` although
the build succeeded (seen with torch 2.11 + CUDA 13). :func:`call_with_plugin` catches exactly
that error, imports the built module from the folder torch built it in (the same
`_get_build_directory` nvdiffrast and torch use, so `TORCH_EXTENSIONS_DIR` is honoured),
registers it under its name, and calls again; nothing else (no `sys.path` change, no patching).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Callable, TypeVar

#: Module-name prefix of nvdiffrast's CUDA (and GL) plugins.
PLUGIN_PREFIX = "nvdiffrast_plugin_"

T = TypeVar("T")


def call_with_plugin(call: Callable[[], T]) -> T:
    """Run `call` (anything that makes nvdiffrast load its plugin, e.g. `dr.get_log_level`),
    registering the built plugin and retrying once if nvdiffrast cannot import it by name."""
    try:
        return call()
    except ModuleNotFoundError as e:
        name = e.name or ""
        if not name.startswith(PLUGIN_PREFIX) or name in sys.modules:
            raise
        register_built_extension(name)
        return call()


def extension_build_dir(name: str) -> str:
    """The folder torch's cpp_extension loader builds extension `name` in."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, verbose=False)


def register_built_extension(name: str) -> ModuleType:
    """Import the extension module `name` from its torch build folder into `sys.modules`."""
    build_dir = extension_build_dir(name)
    spec = importlib.machinery.PathFinder.find_spec(name, [build_dir])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"{name} is not in its torch extension build folder {build_dir} (did the JIT build fail? "
            f"TORCH_EXTENSIONS_DIR decides the folder)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
