"""What a customer may ask of a training job, checked before any model is loaded.

Kept free of torch so that the API process can reject a bad request with the same rules the worker applies.
The settings are records (``auditing.config``): each field's type and bounds are its rule, checked on
construction and published in the API's JSON schema; the API adds the platform's upper limits
(``gate.settings.Limits``) on top.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Literal

from pydantic import Field

from auditing.config import ConfigError, from_mapping, record, text

MAX_SEED = 2**63 - 1  # torch generators take up to 2**64 - 1, and class images use seed + i
RESOLUTION_MULTIPLE = 8  # SD pipelines reject heights and widths that are not multiples of 8

MIXED_PRECISIONS = ("no", "fp16", "bf16")  # accelerate's names, as diffusers' scripts take them
# diffusers.optimization.get_scheduler's schedules that need no extra rule string
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CROPS = ("center", "random")  # auditing.models.examples.CROPS, kept free of torch here


def _number(**bounds):
    """A finite float within ``bounds`` (a JSON integer is a number too)."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds)]


Positive = Annotated[int, Field(ge=1)]
LearningRate = _number(gt=0, le=1)


@record
class TrainingSettings:
    """Fields both methods take, named as diffusers' training scripts name them (docs/training.md)."""

    steps: Positive = 500
    learning_rate: LearningRate = 1e-4
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"
    lr_warmup_steps: Annotated[int, Field(ge=0)] = 0
    max_grad_norm: _number(gt=0) | None = Field(default=1.0, description="null: no gradient clipping")
    batch_size: Positive = 4
    resolution: Annotated[int, Field(ge=RESOLUTION_MULTIPLE, multiple_of=RESOLUTION_MULTIPLE)] | None = Field(
        default=None, description="square training size; null: the pipeline's native size")
    crop: Literal[CROPS] = "center"
    random_flip: bool = False
    mixed_precision: Literal[MIXED_PRECISIONS] = "no"
    gradient_checkpointing: bool = False
    snr_gamma: _number(gt=0) | None = Field(default=None, description="Min-SNR loss weighting; null: plain MSE")
    noise_offset: _number(ge=0, le=1) = 0.0
    validation_prompt: text() | None = Field(default=None,
                                             description="the sample renders' prompt; null: the first caption")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0


@record
class LoraSettings(TrainingSettings):
    """A peft LoRA of ``rank`` on the UNet's attention, and on the text encoder's if asked."""

    rank: Positive = 4
    train_text_encoder: bool = Field(default=False, description="SDXL: both text encoders")
    text_encoder_lr: LearningRate | None = Field(default=None, description="null: learning_rate")


@record
class DreamBoothSettings(TrainingSettings):
    """Full UNet fine-tuning on ``instance_prompt``; prior preservation when ``class_prompt`` is given.

    Defaults follow diffusers' ``train_dreambooth.py`` (lr 5e-6, 400 steps, batch 1).
    """

    instance_prompt: text()
    class_prompt: text() | None = Field(default=None, description="prior preservation (class images) when given")
    num_class_images: Positive = 8
    prior_loss_weight: _number(gt=0) = 1.0
    learning_rate: LearningRate = 5e-6
    steps: Positive = 400
    batch_size: Positive = 1


SETTINGS = {"lora": LoraSettings, "dreambooth": DreamBoothSettings}
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {method: tuple(f.name for f in fields(cls))
                                                for method, cls in SETTINGS.items()}


def settings_for(method: str, hyperparameters: dict, what: str = "") -> LoraSettings | DreamBoothSettings:
    """The settings for a customer's JSON hyperparameters; a ``ConfigError`` (a ValueError) names the bad field,
    under ``what`` (e.g. ``hyperparameters.steps``; by default the bare name)."""
    if method not in SETTINGS:
        raise ConfigError("method", f"method must be one of {list(SETTINGS)} (got {method!r})",
                          allowed=list(SETTINGS))
    if not isinstance(hyperparameters, dict):
        raise ConfigError(what or "hyperparameters", f"{what or 'hyperparameters'} must be an object "
                                                     f"(got {hyperparameters!r})")
    return from_mapping(SETTINGS[method], hyperparameters, what)
