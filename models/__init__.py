"""fusionserve models: frame encoders, temporal heads, the fused classifier, checkpoints.

Importing the package registers the built-in encoders and heads.
"""

from models import backbones, encoders, heads  # noqa: F401  (registers built-in modules)
from models.checkpoint import Checkpoint, CheckpointError, InputSpec, load_checkpoint, read_metadata, save_checkpoint
from models.classifier import FusedClassifier, build_model
from models.config import (
    AttentionHeadConfig,
    LSTMHeadConfig,
    MeanHeadConfig,
    ModelConfig,
    ResNetConfig,
    SmallCNNConfig,
    TimmConfig,
    TorchvisionConfig,
)
from models.profile import ModelProfile, count_parameters, profile_config, profile_model
from models.registry import ENCODERS, HEADS, preset_config, preset_names
from models.weights import bundled_checkpoints, default_checkpoint

__all__ = [
    "ENCODERS",
    "HEADS",
    "AttentionHeadConfig",
    "Checkpoint",
    "CheckpointError",
    "FusedClassifier",
    "InputSpec",
    "LSTMHeadConfig",
    "MeanHeadConfig",
    "ModelConfig",
    "ModelProfile",
    "ResNetConfig",
    "SmallCNNConfig",
    "TimmConfig",
    "TorchvisionConfig",
    "build_model",
    "bundled_checkpoints",
    "count_parameters",
    "default_checkpoint",
    "load_checkpoint",
    "preset_config",
    "preset_names",
    "profile_config",
    "profile_model",
    "read_metadata",
    "save_checkpoint",
]
