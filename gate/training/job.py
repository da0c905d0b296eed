"""The one call a worker makes to train a customer job, whatever the method.

Torch and diffusers are imported only when a job runs, so the API can import
``gate.training`` for ``HYPERPARAMETERS`` and ``settings_for`` without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .settings import settings_for

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainingResult:
    """What a finished job left under its output folder.

    ``kind`` says how to apply ``weights``: "lora" is a diffusers LoRA file
    (``pipe.load_lora_weights``), "unet" a full UNet state dict with diffusers key names
    (``auditing.models.loading.load_unet_weights``).
    """

    weights: Path
    kind: str
    samples: list[Path]
    checkpoints: list[Path]
    seconds: float
    resumed_from_step: int = 0  # > 0: continued from the state an earlier attempt saved


def train_job(method: str, pipe, examples: list[tuple[Image.Image, str]], hyperparameters: dict, out: Path,
              progress: Callable[[float, str], None] | None = None, state_dir: Path | None = None,
              notify: Callable[[str, dict], None] | None = None) -> TrainingResult:
    """Validate the customer's hyperparameters, train with ``method``, write ``out``.

    ``out`` appears only when training succeeded; ``progress(fraction, stage)`` is called
    at most about once per 1% of the steps. With ``state_dir``, each checkpoint step saves resumable
    state there, and a run given the folder of an interrupted run with the same settings and data
    continues where it stopped. ``notify(kind, data)`` hears of losses, sample grids and checkpoints as they
    come (``gate.training.loop.Notify``).
    """
    settings = settings_for(method, hyperparameters)
    if method == "lora":
        from .lora import train_lora as train
    else:
        from .dreambooth import train_dreambooth as train
    result = train(pipe, examples, settings, Path(out), progress, state_dir, notify)
    log.info("%s job wrote %s in %.1f s", method, result.weights, result.seconds)
    return result
