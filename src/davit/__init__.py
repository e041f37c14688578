"""davit: DaViT (Dual Attention Vision Transformers), exact to the official code, fast, with every checkpoint format.

Quick use::

    import davit
    model = davit.create_model("davit_tiny", pretrained=True).eval()
    transform = davit.create_transform(**davit.resolve_data_config(model))  # the weights' own preprocessing
    logits = model(transform(pil_image)[None])  # (1, 1000)
"""

from __future__ import annotations

from . import accelerate
from .data.transforms import create_transform, resolve_data_config
from .factory import create_model
from .hub import push_to_hub
from .models import DaViT, DaViTConfig, count_params, list_models
from .optimize import optimize
from .weights import CheckpointError, convert_state_dict, list_weights, load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DaViT",
    "DaViTConfig",
    "__version__",
    "accelerate",
    "convert_state_dict",
    "count_params",
    "create_model",
    "create_transform",
    "list_models",
    "list_weights",
    "load_checkpoint",
    "optimize",
    "push_to_hub",
    "resolve_data_config",
]
