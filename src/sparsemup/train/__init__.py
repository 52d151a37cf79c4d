"""Training the reference GPT: config (schema, loading, validation), data, model building, the trainer,
checkpoints, multi-process wrapping and evaluation."""

from .build import build_model
from .config import load_config
from .evaluate import Evaluation, evaluate_checkpoint
from .schema import Config, ConfigError
from .trainer import Completed, Diverged, Trainer, TrainResult, train
from .validate import validate

__all__ = ["Completed", "Config", "ConfigError", "Diverged", "Evaluation", "TrainResult", "Trainer", "build_model",
           "evaluate_checkpoint", "load_config", "train", "validate"]
