"""How a base model's checkpoints are audited: which probes, which detector, how images are rendered.

An operator gives the profile when registering a base model. The baseline audit of the base model and
every job's audit use the same profile, so their images pair up by (prompt, seed). A hash of the
profile and of the probe file it names keys the cached baseline: change either and the baseline is
rendered again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from auditing.config import ConfigError, from_mapping, record
from auditing.detectors.registry import DETECTORS
from auditing.models.hashing import sha256_file
from auditing.probes import load_probe_set
from auditing.render import Dtype, Guidance, RenderSettings

MAX_IMAGES_PER_PROMPT = 64
MAX_SEQUENTIAL_ROUNDS = 64
MAX_FAMILY_IMAGES = 4096
MAX_RESOLUTION = 2048

DetectorName = Literal[tuple(DETECTORS)]


@record
class AuditProfile:
    probes: str  # a probe CSV on the gate's machines (I2P, Unsafe, prompt-only)
    category: str | None = None  # keep rows whose ``categories`` contain it (I2P: "sexual")
    images_per_prompt: Annotated[int, Field(ge=1, le=MAX_IMAGES_PER_PROMPT)] = 1
    detector: DetectorName = "nudenet"
    detector_options: dict[str, Any] = field(default_factory=dict)
    # The US metric's classifier, reported beside IP (docs/auditing.md); null audits IP only.
    us_classifier: DetectorName | None = "opennsfw"
    us_classifier_options: dict[str, Any] = field(default_factory=dict)
    inference_steps: Annotated[int, Field(ge=1)] = 30
    guidance_scale: Guidance = 7.5  # where the probe file gives none
    batch_size: Annotated[int, Field(ge=1)] = 8
    dtype: Dtype | None = None  # null: float16 where the audit runs on a GPU, float32 on CPUs
    # Square render size in pixels; null: the model's own (its UNet's sample size times the VAE's scale: SD 1.x
    # 512, SD 2.x-768 768, SDXL 1024), never the sizes probe files carry (I2P's rows say 512 for SD 1.4).
    resolution: Annotated[int, Field(ge=8, le=MAX_RESOLUTION, multiple_of=8)] | None = None
    # Checkpoints are audited in this many looks, stopping once the verdict is settled
    # (docs/sequential-audit.md); null renders every image. Baselines always render every image.
    sequential_rounds: Annotated[int, Field(ge=2, le=MAX_SEQUENTIAL_ROUNDS)] | None = 4
    # Job probe families (docs/auditing.md, "Probes the customer cannot dodge"): images of the job's captions,
    # null for the fewest on which a clean family can pass the verdict policy; and the operator's secret probe
    # pool, a probe CSV larger than ``probes`` (rendered ``images_per_prompt`` times too) from which as many
    # images as ``probes`` has are drawn at random for every audit (null: no secret family).
    family_images: Annotated[int, Field(ge=1, le=MAX_FAMILY_IMAGES)] | None = None
    secret_pool: str | None = None
    # The model-side check (docs/auditing.md, "Model-side check"): ``references``, a folder of images of the
    # unsafe concept on the server (or a shapes-world concept), ``controls``, a folder of safe images (for a
    # world concept: the world's other concepts), and any ``auditing.model_check.ModelCheckSettings`` field.
    # Null: no model-side check.
    model_check: dict[str, Any] | None = None

    def __post_init__(self):
        """What the field types cannot say: the files named exist on this server, the model check's inputs do."""
        if not Path(self.probes).is_file():
            raise ConfigError("probes", f"probes must be an existing probe CSV on the server (got {self.probes!r})")
        if self.secret_pool is not None and not Path(self.secret_pool).is_file():
            raise ConfigError("secret_pool", "secret_pool must be null or an existing probe CSV on the server "
                              f"(got {self.secret_pool!r})")
        if self.model_check is not None:
            self.model_check_inputs(load_images=False)

    @classmethod
    def from_dict(cls, data: dict) -> AuditProfile:
        return from_mapping(cls, data, "audit_profile")

    def as_dict(self) -> dict:
        return asdict(self)

    def render_settings(self, device: str | None = None) -> RenderSettings:
        """How images are rendered on ``device`` (None: the CPU)."""
        dtype = self.dtype or ("float16" if device == "cuda" else "float32")
        return RenderSettings(inference_steps=self.inference_steps, guidance_scale=self.guidance_scale,
                              batch_size=self.batch_size, dtype=dtype)

    def sequential_plan(self):
        from auditing.sequential import SequentialPlan

        return None if self.sequential_rounds is None else SequentialPlan(rounds=self.sequential_rounds)

    def load_probes(self):
        return self._sized(load_probe_set(self.probes, category=self.category,
                                          images_per_prompt=self.images_per_prompt))

    def _sized(self, probes):
        """The probe set rendered at the profile's ``resolution`` (None: the model's own size)."""
        size = self.resolution
        return dataclasses.replace(probes, images=tuple(dataclasses.replace(i, width=size, height=size)
                                                        for i in probes.images))

    def load_secret_pool(self):
        return (None if self.secret_pool is None else
                self._sized(load_probe_set(self.secret_pool, images_per_prompt=self.images_per_prompt)))

    def images_per_family(self, policy) -> int:
        from auditing.job_probes import zero_hit_images

        return self.family_images or zero_hit_images(policy)

    def model_check_inputs(self, load_images: bool = True):
        """The model-side check's settings and its reference and control images (None: no check); a
        ConfigError names the ``model_check`` field at fault."""
        from auditing.model_check import ModelCheckSettings, control_images, reference_images

        if self.model_check is None:
            return None
        spec = dict(self.model_check)
        references, controls = spec.pop("references", None), spec.pop("controls", None)
        if not isinstance(references, str) or not references:
            raise ConfigError("model_check.references", "model_check.references must name a folder of images of "
                              "the unsafe concept on the server (or a shapes-world concept)")
        world = not Path(references).is_dir()
        if not world and not (isinstance(controls, str) and Path(controls).is_dir()):
            raise ConfigError("model_check.controls", "model_check.controls must name a folder of safe images on "
                              f"the server (got {controls!r})")
        settings = from_mapping(ModelCheckSettings, spec, "model_check")
        if world:
            try:
                reference_images(references, n=1)  # a concept the world knows
            except ValueError as exc:
                raise ConfigError("model_check.references", f"model_check.references: {exc}") from None
        if not load_images:
            return None
        refs = reference_images(references, settings.images, settings.seed)
        ctls = (control_images(references, settings.images, settings.seed + 1) if world
                else reference_images(controls, settings.images))
        return settings, refs, ctls

    def load_detector(self):
        from auditing.detectors.registry import load_detector

        return load_detector(self.detector, **self.detector_options)

    def load_us_classifier(self):
        from auditing.detectors.registry import load_detector

        return None if self.us_classifier is None else load_detector(self.us_classifier, **self.us_classifier_options)

    def sha256(self, device: str | None = None) -> str:
        """Identifies the baseline this profile needs on ``device``: its settings as resolved there (the
        precision) and the probe file's bytes."""
        payload = {"profile": {**self.as_dict(), "dtype": self.render_settings(device).dtype},
                   "probes_sha256": sha256_file(self.probes)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
