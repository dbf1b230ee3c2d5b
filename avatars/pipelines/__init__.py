"""Sampling pipelines: :class:`AvatarPipeline` (general; training validation) and
:class:`RenderPipeline` (fast; the Serve renderer).

The pipelines are imported on first use (PEP 562): a process that only needs a light submodule
(``compile_cache``, ``noise``) does not pay diffusers' ~10 s import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from avatars.configs import RenderOptions
    from avatars.pipelines.avatar_pipeline import AvatarPipeline
    from avatars.pipelines.render_pipeline import RenderPipeline

__all__ = ["AvatarPipeline", "RenderOptions", "RenderPipeline"]
_HOMES = {"AvatarPipeline": "avatars.pipelines.avatar_pipeline", "RenderOptions": "avatars.configs",
          "RenderPipeline": "avatars.pipelines.render_pipeline"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
