"""Checkpoint formats: safe I/O, conversion from every public layout, the published-weights registry."""

from .convert import SOURCES, ConvertedStateDict, convert_state_dict, detect_source, unwrap_state_dict
from .io import (
    CheckpointError,
    atomic_write,
    davit_config_of,
    read_checkpoint,
    read_safetensors_metadata,
    remove_stale_temps,
    save_safetensors,
)
from .load import LoadReport, load_checkpoint, load_state
from .registry import WEIGHTS, WeightInfo, list_weights, resolve_pretrained

__all__ = [
    "SOURCES",
    "WEIGHTS",
    "CheckpointError",
    "ConvertedStateDict",
    "LoadReport",
    "WeightInfo",
    "atomic_write",
    "davit_config_of",
    "convert_state_dict",
    "detect_source",
    "list_weights",
    "load_checkpoint",
    "load_state",
    "read_checkpoint",
    "read_safetensors_metadata",
    "remove_stale_temps",
    "resolve_pretrained",
    "save_safetensors",
    "unwrap_state_dict",
]
