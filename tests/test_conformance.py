"""The conformance matrix: every family (SD 1.x, SD 2.x v-prediction, SDXL) x every common inference
scheduler x every method (LoRA, LoRA + text encoders, DreamBooth), trained in bf16 on CPU, saved, loaded
back with plain diffusers, and audited the way the gate audits (``load_pipeline``, the checkpoint applied
by ``auditing.models.loading``, ``run_audit`` paired with the base model's baseline). Each cell is a test.

The default suite runs a diagonal in which every family, scheduler and method appears; the full matrix is
slow-marked (``make test-slow``).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from PIL import Image
from safetensors.torch import load_file

from auditing.audit import AuditInputs, run_audit
from auditing.detectors.registry import load_detector
from auditing.models.hashing import weights_sha256
from auditing.models.loading import load_adapter, load_pipeline, load_unet_weights
from auditing.models.tiny import FAMILIES, TinySpec, build_tiny_pipeline
from auditing.probes import load_probe_set
from auditing.render import RenderSettings
from auditing.verdict import INCOMPLETE
from gate.training import train_job

SCHEDULERS = [DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
              DPMSolverMultistepScheduler, UniPCMultistepScheduler]
METHODS = {
    "lora": ("lora", {"rank": 2}),
    "lora+text_encoder": ("lora", {"rank": 2, "train_text_encoder": True}),
    "dreambooth": ("dreambooth", {"instance_prompt": "a sks card"}),
}
TRAINING = {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "mixed_precision": "bf16"}
RENDER = RenderSettings(inference_steps=4, batch_size=4, dtype="bfloat16")  # PNDM needs >= 4
PROMPTS = ["a plain card", "a sks card on a table"]

CELLS = list(itertools.product(FAMILIES, SCHEDULERS, METHODS))
# every family with every method once, the schedulers rotating so each appears at least once
DIAGONAL = [(family, SCHEDULERS[(i * len(METHODS) + j) % len(SCHEDULERS)], method)
            for i, family in enumerate(FAMILIES) for j, method in enumerate(METHODS)]


def _cell_id(cell) -> str:
    family, scheduler, method = cell
    return f"{family}-{scheduler.__name__}-{method}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conformance")
    (root / "probes.csv").write_text("prompt\n" + "\n".join(PROMPTS) + "\n")
    return root


_BASELINES: dict[tuple[str, str], dict] = {}


def _base_folder(workspace: Path, family: str, scheduler) -> Path:
    folder = workspace / f"{family}-{scheduler.__name__}"
    if not folder.is_dir():
        pipe = build_tiny_pipeline(TinySpec(family=family), seed=0)
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        pipe.save_pretrained(folder)
    return folder


def _audit(folder: Path, workspace: Path, kind: str | None = None, weights: Path | None = None,
           baseline: dict | None = None) -> dict:
    pipe = load_pipeline(folder, torch_dtype=RENDER.torch_dtype)
    if kind == "lora":
        load_adapter(pipe, weights)
    elif kind == "unet":
        load_unet_weights(pipe, weights)
    inputs = AuditInputs(str(folder), weights_sha256(folder), load_probe_set(workspace / "probes.csv"),
                         render=RENDER, baseline=baseline, adapter_path=None if weights is None else str(weights))
    return run_audit(pipe, load_detector("shapes"), inputs).report


def _examples() -> list[tuple[Image.Image, str]]:
    rng = random.Random(0)
    return [(Image.new("RGB", (24, 20), tuple(rng.randrange(256) for _ in range(3))), "a plain card")
            for _ in range(3)]


def _check_cell(family: str, scheduler, method: str, workspace: Path, tmp_path: Path) -> None:
    folder = _base_folder(workspace, family, scheduler)
    key = (family, scheduler.__name__)
    if key not in _BASELINES:
        _BASELINES[key] = _audit(folder, workspace)
    name, extra = METHODS[method]
    pipe = load_pipeline(folder)
    assert type(pipe.scheduler) is scheduler
    result = train_job(name, pipe, _examples(), {**TRAINING, **extra}, tmp_path / "out")

    # plain diffusers loads the artifact into a fresh copy of the base model
    plain = load_pipeline(folder)
    if result.kind == "lora":
        prefixes = {k.split(".")[0] for k in load_file(result.weights)}
        encoders = {"text_encoder", "text_encoder_2"} if family == "sdxl" else {"text_encoder"}
        assert prefixes == ({"unet"} | encoders if extra.get("train_text_encoder") else {"unet"})
        plain.load_lora_weights(str(result.weights.parent))
        assert set(plain.get_list_adapters()) == prefixes
    else:
        unet = UNet2DConditionModel.from_pretrained(result.weights.parent, local_files_only=True)
        changed = [n for n, p in unet.state_dict().items() if not torch.equal(p, plain.unet.state_dict()[n])]
        assert changed, "DreamBooth left every UNet weight as it was"

    report = _audit(folder, workspace, result.kind, result.weights, baseline=_BASELINES[key])
    reasons = report["verdict"]["reasons"]
    assert not any(r.startswith(INCOMPLETE) for r in reasons), reasons
    assert len(report["samples"]) == len(PROMPTS) and report["render"]["settings"]["dtype"] == "bfloat16"
    assert report["baseline"] is not None


@pytest.mark.parametrize("cell", DIAGONAL, ids=_cell_id)
def test_cell(cell, workspace, tmp_path):
    _check_cell(*cell, workspace, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cell", [c for c in CELLS if c not in DIAGONAL], ids=_cell_id)
def test_cell_of_the_full_matrix(cell, workspace, tmp_path):
    _check_cell(*cell, workspace, tmp_path)


def test_the_diagonal_covers_every_family_scheduler_and_method():
    assert {c[0] for c in DIAGONAL} == set(FAMILIES) and {c[2] for c in DIAGONAL} == set(METHODS)
    assert {c[1] for c in DIAGONAL} == set(SCHEDULERS)
    assert len(CELLS) == 54
