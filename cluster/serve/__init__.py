"""Renderer service: one Ray Serve application that renders every person's frames in batches.

`renderer` (no Ray): RendererConfig, RenderRequest, RenderResult, FrameRenderer.
`validation` (no Ray): validate_request, InvalidRequest (each request checked before batching).
`deployment` (Ray Serve): AvatarRenderer, deploy_renderer, person_handle, delete_renderer, ModelLoadError.
Ray is imported only when a deployment name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from cluster.serve.renderer import FrameRenderer, RendererConfig, RenderRequest, RenderResult
from cluster.serve.validation import InvalidRequest, validate_request

_LAZY = {"AvatarRenderer", "ModelLoadError", "deploy_renderer", "delete_renderer", "ensure_serve", "person_handle"}
__all__ = ["AvatarRenderer", "FrameRenderer", "InvalidRequest", "ModelLoadError", "RenderRequest", "RenderResult",
           "RendererConfig", "delete_renderer", "deploy_renderer", "ensure_serve", "person_handle", "validate_request"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("cluster.serve.deployment"), name)
    raise AttributeError(f"module 'cluster.serve' has no attribute {name!r}")
