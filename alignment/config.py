"""``ftgate align`` configuration: one TOML or YAML file, every field validated.

Sections map to frozen dataclasses; an unknown key, a value of the wrong type or out of
range is an error naming ``section.field`` and what is allowed. Relative paths are
relative to the config file. ``model = "shapes-world"`` names the packaged world model,
and data paths ``shapes-world:<path>`` name files of the world's generated data
(``ftgate world data``), written once into the run's work folder.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from auditing.render import RenderSettings

from .adapt import Distribution
from .data import DataConfig
from .functional import PRECISIONS, SCOPES
from .hypergradient import HypergradientConfig
from .losses import HARM_LOSSES

WORLD = "shapes-world"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Eq. 3: L_harm(theta) + alpha R(theta) + beta [L_harm(theta*) - L_harm(theta)]."""

    harm: str = "ga"
    harm_bound: float | None = None
    esd_eta: float = 1.0
    anchor_prompt: str = ""
    alpha: float = 1.0
    beta: float = 0.9  # the paper's best lies below 1 (0.8-0.9, Tab. 14); 1 drops grad L_harm(theta)
    prior_weight: float = 1.0

    def __post_init__(self):
        if self.harm not in HARM_LOSSES:
            raise ValueError(f"objective.harm {self.harm!r} not in {HARM_LOSSES}")
        if self.harm_bound is not None and not 0 < self.harm_bound <= 1e3:
            raise ValueError(f"objective.harm_bound must be in (0, 1000] or absent (got {self.harm_bound})")
        for name in ("alpha", "beta", "prior_weight", "esd_eta"):
            if not 0 <= getattr(self, name) <= 1e3:
                raise ValueError(f"objective.{name} must be in [0, 1000] (got {getattr(self, name)})")


@dataclass(frozen=True)
class OuterConfig:
    """Algorithm 2's outer loop."""

    steps: int = 200
    samples: int = 3  # J configurations per outer step
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    scope: str = "attention-lora"
    lora_rank: int = 4
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"outer.scope {self.scope!r} not in {SCOPES}")
        for name, lo, hi in (("steps", 1, 1_000_000), ("samples", 1, 64), ("lora_rank", 1, 1024),
                             ("checkpoint_every", 1, 1_000_000)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"outer.{name} must be in [{lo}, {hi}] (got {getattr(self, name)})")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"outer.learning_rate must be in (0, 1] (got {self.learning_rate})")
        if not 0 <= self.weight_decay <= 1:
            raise ValueError(f"outer.weight_decay must be in [0, 1] (got {self.weight_decay})")
        if self.clip_norm is not None and not 0 < self.clip_norm <= 1e6:
            raise ValueError(f"outer.clip_norm must be in (0, 1e6] or absent (got {self.clip_norm})")


@dataclass(frozen=True)
class AlignConfig:
    model: str
    output: str
    data: DataConfig
    seed: int = 0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    hypergradient: HypergradientConfig = field(default_factory=HypergradientConfig)
    distribution: Distribution = field(default_factory=Distribution)
    proximal_gamma: float | None = None  # proximal term in ADAPT (the Moreau model's own inner problem)
    generation: RenderSettings = field(default_factory=RenderSettings)
    device: str = "auto"  # cuda when available, else cpu
    precision: str = "fp32"  # autocast dtype of forward passes; parameters stay fp32
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2^63) (got {self.seed})")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {self.device!r})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not in {tuple(PRECISIONS)}")
        if self.proximal_gamma is not None and not 0 < self.proximal_gamma <= 1e6:
            raise ValueError(f"proximal_gamma must be in (0, 1e6] or absent (got {self.proximal_gamma})")

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


SECTIONS = {"data": DataConfig, "objective": ObjectiveConfig, "outer": OuterConfig,
            "hypergradient": HypergradientConfig, "distribution": Distribution, "generation": RenderSettings}


def _check_type(value, annotation, where: str):
    """Coerce lists to tuples and ints to floats where the field wants them; reject the rest."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        kinds = [a for a in options if a is not type(None)]
        for kind in kinds[:-1]:
            try:
                return _check_type(value, kind, where)
            except ValueError:
                pass
        return _check_type(value, kinds[-1], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list (got {value!r})")
        item = typing.get_args(annotation)[0]
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (not isinstance(value, annotation) or
                                                   (annotation is int and isinstance(value, bool))):
        raise ValueError(f"{where} must be of type {annotation.__name__} (got {value!r})")
    return value


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a table/mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(f'{where}{k}' for k in unknown)}; allowed: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        if key in SECTIONS and cls is AlignConfig:
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
        else:
            kwargs[key] = _check_type(value, hints[key], f"{where}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"{where or 'config'}: {exc}") from None
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(where) or not where else f"{where}{message}") from None


def config_from_mapping(data) -> AlignConfig:
    """A validated config from parsed TOML/YAML/JSON; errors name ``section.field``."""
    return _build(AlignConfig, data, "")


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
