"""Sampling pipelines."""

from avatars.pipelines.avatar_pipeline import AvatarPipeline

__all__ = ["AvatarPipeline"]
