"""Running an experiment: options resolved and checked, the run built, the training loop
and its step, checkpoints, interruption, progress and the learning-curve plot."""

from pyro_bll.run.build import build_from_config, build_run, config_for_task, validate
from pyro_bll.run.options import RunConfig
from pyro_bll.run.training import Trainer, TrainingDiverged, main

__all__ = [
    "RunConfig",
    "Trainer",
    "TrainingDiverged",
    "build_from_config",
    "build_run",
    "config_for_task",
    "main",
    "validate",
]
