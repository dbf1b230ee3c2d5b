"""DiffusionAvatars networks (diffusers-based)."""

from avatars.models.diffusion_avatars import DiffusionAvatarsModel
from avatars.models.expression_attention import ExpressionAttentionLayers, ExpressionTokens
from avatars.models.feature_planes import FeaturePlanes

__all__ = ["DiffusionAvatarsModel", "ExpressionAttentionLayers", "ExpressionTokens", "FeaturePlanes"]
