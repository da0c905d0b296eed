"""Customer fine-tuning (LoRA, DreamBooth) on a base model, with diffusers + peft.

Importing this package does not import torch: the API uses ``HYPERPARAMETERS`` and
``settings_for`` to reject a job before it is queued; workers call ``train_job``.
"""

from .job import TrainingResult, train_job
from .settings import HYPERPARAMETERS, DreamBoothSettings, LoraSettings, settings_for

__all__ = ["HYPERPARAMETERS", "DreamBoothSettings", "LoraSettings", "TrainingResult", "settings_for", "train_job"]
