"""Sampling pipelines: :class:`AvatarPipeline` (general; training validation) and
:class:`RenderPipeline` (fast; the Serve renderer)."""

from avatars.configs import RenderOptions
from avatars.pipelines.avatar_pipeline import AvatarPipeline
from avatars.pipelines.render_pipeline import RenderPipeline

__all__ = ["AvatarPipeline", "RenderOptions", "RenderPipeline"]
