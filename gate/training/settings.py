"""What a customer may ask of a training job, checked before any model is loaded.

Kept free of torch so that the API process can reject a bad request with the same rules the
worker applies. Each settings field's metadata holds its rule; the API adds the platform's
upper limits (``gate.settings.Limits``) on top.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

MAX_SEED = 2**63 - 1  # torch generators take up to 2**64 - 1, and class images use seed + i
RESOLUTION_MULTIPLE = 8  # SD pipelines reject heights and widths that are not multiples of 8

_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a non-empty string"}


def _rule(test, text: str) -> dict:
    return {"rule": (test, text)}


_POSITIVE = _rule(lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = _rule(lambda v: v >= 0, ">= 0")
_LEARNING_RATE = _rule(lambda v: 0 < v <= 1, "in (0, 1]")
_SEED = _rule(lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]")
_RESOLUTION = _rule(lambda v: v >= RESOLUTION_MULTIPLE and v % RESOLUTION_MULTIPLE == 0,
                    f"a multiple of {RESOLUTION_MULTIPLE}, >= {RESOLUTION_MULTIPLE}")


def _one_of(choices: tuple[str, ...]) -> dict:
    return _rule(lambda v: v in choices, f"one of {list(choices)}")


MIXED_PRECISIONS = ("no", "fp16", "bf16")  # accelerate's names, as diffusers' scripts take them
# diffusers.optimization.get_scheduler's schedules that need no extra rule string
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CROPS = ("center", "random")  # auditing.models.examples.CROPS, kept free of torch here


def _type_ok(kind: str, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true is not a step count
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str) and bool(value.strip())


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """Fields both methods take, named as diffusers' training scripts name them (docs/training.md).
    ``resolution`` None means the pipeline's native size."""

    steps: int = field(default=500, metadata=_POSITIVE)
    learning_rate: float = field(default=1e-4, metadata=_LEARNING_RATE)
    lr_scheduler: str = field(default="constant", metadata=_one_of(LR_SCHEDULERS))
    lr_warmup_steps: int = field(default=0, metadata=_NON_NEGATIVE)
    max_grad_norm: float | None = field(default=1.0, metadata=_rule(lambda v: v > 0, "> 0"))
    batch_size: int = field(default=4, metadata=_POSITIVE)
    resolution: int | None = field(default=None, metadata=_RESOLUTION)
    crop: str = field(default="center", metadata=_one_of(CROPS))
    random_flip: bool = False
    mixed_precision: str = field(default="no", metadata=_one_of(MIXED_PRECISIONS))
    gradient_checkpointing: bool = False
    snr_gamma: float | None = field(default=None, metadata=_rule(lambda v: v > 0, "> 0"))
    noise_offset: float = field(default=0.0, metadata=_rule(lambda v: 0 <= v <= 1, "in [0, 1]"))
    validation_prompt: str | None = None  # the sample renders' prompt; default the first caption
    seed: int = field(default=0, metadata=_SEED)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            kind, optional = f.type.removesuffix(" | None"), f.type.endswith(" | None")
            if value is None and optional:
                continue
            if not _type_ok(kind, value):
                raise ValueError(f"{f.name} must be {_KINDS[kind]}{' or null' if optional else ''} (got {value!r})")
            if "rule" in f.metadata:
                test, text = f.metadata["rule"]
                if not test(value):
                    raise ValueError(f"{f.name} must be {text} (got {value!r})")


@dataclass(frozen=True, kw_only=True)
class LoraSettings(TrainingSettings):
    """A peft LoRA of ``rank`` on the UNet's attention, and on the text encoder's if asked."""

    rank: int = field(default=4, metadata=_POSITIVE)
    train_text_encoder: bool = False  # SDXL: both text encoders
    text_encoder_lr: float | None = field(default=None, metadata=_LEARNING_RATE)  # None: learning_rate


@dataclass(frozen=True, kw_only=True)
class DreamBoothSettings(TrainingSettings):
    """Full UNet fine-tuning on ``instance_prompt``; prior preservation when ``class_prompt`` is given.

    Defaults follow diffusers' ``train_dreambooth.py`` (lr 5e-6, 400 steps, batch 1).
    """

    instance_prompt: str
    class_prompt: str | None = None
    num_class_images: int = field(default=8, metadata=_POSITIVE)
    prior_loss_weight: float = field(default=1.0, metadata=_rule(lambda v: v > 0, "> 0"))
    learning_rate: float = field(default=5e-6, metadata=_LEARNING_RATE)
    steps: int = field(default=400, metadata=_POSITIVE)
    batch_size: int = field(default=1, metadata=_POSITIVE)


SETTINGS = {"lora": LoraSettings, "dreambooth": DreamBoothSettings}
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {method: tuple(f.name for f in fields(cls))
                                                for method, cls in SETTINGS.items()}


def settings_for(method: str, hyperparameters: dict) -> LoraSettings | DreamBoothSettings:
    """The settings for a customer's JSON hyperparameters; a ValueError message starts with the bad field."""
    if method not in SETTINGS:
        raise ValueError(f"method must be one of {list(SETTINGS)} (got {method!r})")
    cls = SETTINGS[method]
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS[method]))
    if unknown:
        raise ValueError(f"{unknown[0]} is not a {method} hyperparameter (unknown: {unknown}; "
                         f"allowed: {list(HYPERPARAMETERS[method])})")
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in hyperparameters]
    if missing:
        raise ValueError(f"{missing[0]} is required for {method}")
    return cls(**hyperparameters)
