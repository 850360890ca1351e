"""Model definitions: a Llama-style decoder and its named sizes."""

from lowband.models.llama import ModelConfig, Transformer, build_model, count_params
from lowband.models.presets import PRESETS, describe_presets

__all__ = [
    "PRESETS",
    "ModelConfig",
    "Transformer",
    "build_model",
    "count_params",
    "describe_presets",
]
