"""How a base model's checkpoints are audited: which probes, which detector, how images are rendered.

An operator gives the profile when registering a base model. The baseline audit of the base model and
every job's audit use the same profile, so their images pair up by (prompt, seed). A hash of the
profile and of the probe file it names keys the cached baseline: change either and the baseline is
rendered again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from auditing.config import from_mapping
from auditing.detectors.registry import DETECTORS
from auditing.models.hashing import sha256_file
from auditing.render import RenderSettings

MAX_IMAGES_PER_PROMPT = 64
MAX_SEQUENTIAL_ROUNDS = 64
MAX_FAMILY_IMAGES = 4096


@dataclass(frozen=True)
class AuditProfile:
    probes: str  # a probe CSV on the gate's machines (I2P, Unsafe, prompt-only)
    category: str | None = None  # keep rows whose ``categories`` contain it (I2P: "sexual")
    images_per_prompt: int = 1
    detector: str = "nudenet"
    detector_options: dict = field(default_factory=dict)
    # The US metric's classifier, reported beside IP (docs/auditing.md); null audits IP only.
    us_classifier: str | None = "opennsfw"
    us_classifier_options: dict = field(default_factory=dict)
    inference_steps: int = 30
    guidance_scale: float = 7.5  # where the probe file gives none
    batch_size: int = 8
    dtype: str = "float32"  # float16 / bfloat16 halve rendering memory on GPUs
    # Checkpoints are audited in this many looks, stopping once the verdict is settled
    # (docs/sequential-audit.md); null renders every image. Baselines always render every image.
    sequential_rounds: int | None = 4
    # Job probe families (docs/auditing.md, "Probes the customer cannot dodge"): images per family, null for
    # the fewest on which a clean family can pass the verdict policy; and the operator's secret probe pool, a
    # probe CSV larger than ``probes`` that a random share of is drawn from for every audit (null: none).
    family_images: int | None = None
    secret_pool: str | None = None

    def __post_init__(self):
        if not isinstance(self.probes, str) or not Path(self.probes).is_file():
            raise ValueError(f"audit_profile.probes must be an existing probe CSV on the server (got {self.probes!r})")
        if self.detector not in DETECTORS:
            raise ValueError(f"audit_profile.detector must be one of {sorted(DETECTORS)} (got {self.detector!r})")
        if self.us_classifier is not None and self.us_classifier not in DETECTORS:
            raise ValueError(f"audit_profile.us_classifier must be null or one of {sorted(DETECTORS)} "
                             f"(got {self.us_classifier!r})")
        for name in ("detector_options", "us_classifier_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"audit_profile.{name} must be an object")
        n = self.images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES_PER_PROMPT:
            raise ValueError(f"audit_profile.images_per_prompt must be an integer in [1, {MAX_IMAGES_PER_PROMPT}] "
                             f"(got {n!r})")
        rounds = self.sequential_rounds
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int)
                                   or not 2 <= rounds <= MAX_SEQUENTIAL_ROUNDS):
            raise ValueError(f"audit_profile.sequential_rounds must be null or an integer in "
                             f"[2, {MAX_SEQUENTIAL_ROUNDS}] (got {rounds!r})")
        n = self.family_images
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FAMILY_IMAGES):
            raise ValueError(f"audit_profile.family_images must be null or an integer in [1, {MAX_FAMILY_IMAGES}] "
                             f"(got {n!r})")
        if self.secret_pool is not None and (not isinstance(self.secret_pool, str)
                                             or not Path(self.secret_pool).is_file()):
            raise ValueError(f"audit_profile.secret_pool must be null or an existing probe CSV on the server "
                             f"(got {self.secret_pool!r})")
        try:
            self.render_settings()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit_profile: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict) -> AuditProfile:
        if not isinstance(data, dict):
            raise ValueError("audit_profile must be an object")
        return from_mapping(cls, data, "audit_profile")

    def as_dict(self) -> dict:
        return asdict(self)

    def render_settings(self) -> RenderSettings:
        return RenderSettings(inference_steps=self.inference_steps, guidance_scale=self.guidance_scale,
                              batch_size=self.batch_size, dtype=self.dtype)

    def sequential_plan(self):
        from auditing.sequential import SequentialPlan

        return None if self.sequential_rounds is None else SequentialPlan(rounds=self.sequential_rounds)

    def load_probes(self):
        from auditing.probes import load_probe_set

        return load_probe_set(self.probes, category=self.category, images_per_prompt=self.images_per_prompt)

    def load_secret_pool(self):
        from auditing.probes import load_probe_set

        return None if self.secret_pool is None else load_probe_set(self.secret_pool)

    def images_per_family(self, policy) -> int:
        from auditing.job_probes import zero_hit_images

        return self.family_images or zero_hit_images(policy)

    def load_detector(self):
        from auditing.detectors.registry import load_detector

        return load_detector(self.detector, **self.detector_options)

    def load_us_classifier(self):
        from auditing.detectors.registry import load_detector

        return None if self.us_classifier is None else load_detector(self.us_classifier, **self.us_classifier_options)

    def sha256(self) -> str:
        """Identifies the baseline this profile needs: its settings and the probe file's bytes."""
        payload = {"profile": self.as_dict(), "probes_sha256": sha256_file(self.probes)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
