"""The DaViT architecture (imports torch only)."""

from .davit import (
    ChannelAttention,
    ChannelBlock,
    DaViT,
    DaViTConfig,
    DaViTStage,
    FeatureInfo,
    SpatialBlock,
    WindowAttention,
    count_params,
    drop_path_rates,
)
from .variants import MODEL_CONFIGS, ModelInfo, get_config, list_models

__all__ = [
    "MODEL_CONFIGS",
    "ChannelAttention",
    "ChannelBlock",
    "DaViT",
    "DaViTConfig",
    "DaViTStage",
    "FeatureInfo",
    "ModelInfo",
    "SpatialBlock",
    "WindowAttention",
    "count_params",
    "drop_path_rates",
    "get_config",
    "list_models",
]
