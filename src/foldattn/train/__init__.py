"""Training: ``foldattn train``'s engine, recipes, data and checkpoints.

>>> from foldattn.train import TrainConfig, train
>>> summary = train(TrainConfig(dataset="digits", attention="se", asr=True, epochs=2, output="runs/x"))

:class:`Trainer` runs one :class:`TrainConfig` (setup, train_one_epoch, validate on the folded
copy, checkpoint) with :mod:`~foldattn.train.callbacks` around it; :func:`train` is the
one-call form. Data: :mod:`foldattn.train.data`; checkpoints: :mod:`foldattn.train.checkpoint`.
"""

from .callbacks import Callback
from .config import (
    RECIPES,
    RESUME_IGNORED,
    TrainConfig,
    list_recipes,
    recipe_defaults,
    register_recipe,
    unregister_recipe,
)
from .engine import evaluate, training_step
from .model import build_model, deployed_copy, example_input, load_trained
from .plots import write_curves
from .runtime import TrainingInterrupted
from .trainer import Trainer, train

__all__ = [
    "TrainConfig", "Trainer", "train", "Callback", "TrainingInterrupted", "register_recipe", "unregister_recipe",
    "list_recipes", "recipe_defaults", "RECIPES", "RESUME_IGNORED", "build_model", "evaluate", "training_step",
    "deployed_copy", "write_curves", "load_trained", "example_input",
]
