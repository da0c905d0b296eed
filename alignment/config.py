"""``ftgate align`` configuration: one TOML or YAML file, every field validated.

Sections map to ``auditing.config`` records; an unknown key, a value of the wrong type or out of
range is an error naming ``section.field`` and what is allowed. Relative paths are
relative to the config file. ``model = "shapes-world"`` names the packaged world model,
and data paths ``shapes-world:<path>`` name files of the world's generated data
(``ftgate world data``), written once into the run's work folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import torch
import yaml
from pydantic import Field

from auditing.config import ConfigError, from_mapping, record, section, text
from auditing.render import RenderSettings

from .adapt import Distribution
from .data import DataConfig
from .functional import PRECISIONS, SCOPES
from .hypergradient import HypergradientConfig
from .losses import HARM_LOSSES

WORLD = "shapes-world"
AGGREGATIONS = ("mean", "cvar")
Weight = Annotated[float, Field(ge=0, le=1e3)]


@record
class ObjectiveConfig:
    """Eq. 3: L_harm(theta) + alpha R(theta) + beta [L_harm(theta*) - L_harm(theta)]."""

    harm: Literal[HARM_LOSSES] = "ga"
    harm_bound: Annotated[float, Field(gt=0, le=1e3)] | None = None
    esd_eta: Weight = 1.0
    anchor_prompt: str = ""
    alpha: Weight = 1.0
    beta: Weight = 0.9  # the paper's best lies below 1 (0.8-0.9, Tab. 14); 1 drops grad L_harm(theta)
    prior_weight: Weight = 1.0


@record
class OuterConfig:
    """Algorithm 2's outer loop."""

    steps: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    samples: Annotated[int, Field(ge=1, le=64)] = 3  # J configurations per outer step
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    clip_norm: Annotated[float, Field(gt=0, le=1e6)] | None = 1.0
    scope: Literal[SCOPES] = "attention-lora"
    lora_rank: Annotated[int, Field(ge=1, le=1024)] = 4
    checkpoint_every: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    # Beyond the paper (docs/alignment.md): a sample whose relative drift ||theta* - theta|| / ||theta|| is below
    # min_drift is redrawn, at most max_redraws times; None: never (the paper).
    min_drift: Annotated[float, Field(gt=0, le=1)] | None = None
    max_redraws: Annotated[int, Field(ge=1, le=20)] = 3
    # Beyond the paper: "cvar" averages the x_j of the worst cvar_fraction of the J samples by L_harm(theta*_j).
    aggregation: Literal[AGGREGATIONS] = "mean"
    cvar_fraction: Annotated[float, Field(gt=0, le=1)] = 0.25


@record
class AlignConfig:
    model: text()
    output: text()
    data: section(DataConfig)
    seed: Annotated[int, Field(ge=0, lt=2 ** 63)] = 0
    objective: section(ObjectiveConfig) = field(default_factory=ObjectiveConfig)
    outer: section(OuterConfig) = field(default_factory=OuterConfig)
    hypergradient: section(HypergradientConfig) = field(default_factory=HypergradientConfig)
    distribution: section(Distribution) = field(default_factory=Distribution)
    # Proximal term in ADAPT (the Moreau model's own inner problem).
    proximal_gamma: Annotated[float, Field(gt=0, le=1e6)] | None = None
    generation: section(RenderSettings) = field(default_factory=RenderSettings)
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"  # auto: cuda when available, else cpu
    precision: Literal[tuple(PRECISIONS)] = "fp32"  # autocast dtype of forward passes; parameters stay fp32
    gradient_checkpointing: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def torch_device(self) -> torch.device:
        """The device this run computes on; an unavailable CUDA device is an error naming the field."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not (torch.cuda.is_available() and
                                          (device.index or 0) < torch.cuda.device_count()):
            raise ValueError(f"device {self.device!r}: no such CUDA device on this machine "
                             f"({torch.cuda.device_count()} visible)")
        return device


def config_from_mapping(data) -> AlignConfig:
    """A validated config from parsed TOML/YAML/JSON; errors name ``section.field``."""
    if not isinstance(data, dict):
        raise ConfigError("config", f"config must be a table/mapping (got {data!r})")
    return from_mapping(AlignConfig, data, "")


def load_config(path: str | Path) -> AlignConfig:
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        data = tomllib.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"{path}: config must be .toml, .yaml or .yml")
    return config_from_mapping(data)
