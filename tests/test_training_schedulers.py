"""Training noise comes from a DDPM training scheduler built from the model's config, whatever inference
scheduler the customer's folder carries: LoRA and DreamBooth train on tiny SD 1.x (epsilon) and SD 2.x
(v-prediction) pipelines under each common scheduler, with sample renders between steps."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from safetensors.torch import load_file

from auditing.models.denoising import add_noise, training_scheduler
from auditing.models.tiny import TinySpec, build_tiny_pipeline
from gate.training import train_job

SCHEDULERS = [DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
              DPMSolverMultistepScheduler, UniPCMultistepScheduler]
FAMILIES = {"sd1": "epsilon", "sd2": "v_prediction"}


def _pipe(family: str, scheduler_class):
    pipe = build_tiny_pipeline(TinySpec(family=family), seed=0)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe


def _examples(n: int = 4) -> list[tuple[Image.Image, str]]:
    rng = random.Random(0)
    return [(Image.new("RGB", (24, 16), tuple(rng.randrange(256) for _ in range(3))), "a plain card")
            for _ in range(n)]


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_scheduler_keeps_the_models_noise_schedule(family, scheduler_class):
    pipe = _pipe(family, scheduler_class)
    reference = build_tiny_pipeline(TinySpec(family=family), seed=0).scheduler  # the model's DDIM config
    noise = training_scheduler(pipe.scheduler.config)
    assert isinstance(noise, DDPMScheduler)
    assert noise.config.prediction_type == FAMILIES[family] == reference.config.prediction_type
    assert noise.config.num_train_timesteps == reference.config.num_train_timesteps
    torch.testing.assert_close(noise.alphas_cumprod, reference.alphas_cumprod)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_noise_does_not_depend_on_the_inference_schedulers_state(family):
    pipe = _pipe(family, EulerDiscreteScheduler)
    latents, noise = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def draw():
        return add_noise(training_scheduler(pipe.scheduler.config), latents,
                         generator=torch.Generator().manual_seed(1), noise=noise)

    before = draw()
    pipe.scheduler.set_timesteps(3)  # what a sample render does to the pipeline's scheduler
    after = draw()
    torch.testing.assert_close(before.noisy, after.noisy)
    torch.testing.assert_close(before.target, after.target)
    ddpm = training_scheduler(pipe.scheduler.config)
    # epsilon models regress the noise, v-prediction models the velocity of the same draw
    expected = noise if family == "sd1" else ddpm.get_velocity(latents, noise, after.timesteps)
    torch.testing.assert_close(after.target, expected, rtol=0, atol=0)
    torch.testing.assert_close(after.noisy, ddpm.add_noise(latents, noise, after.timesteps), rtol=0, atol=0)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_training_runs_under_every_inference_scheduler(method, family, scheduler_class, tmp_path):
    pipe = _pipe(family, scheduler_class)
    base = {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 0}  # a sample render after every step
    hyperparameters = {**base, "rank": 2} if method == "lora" else {**base, "instance_prompt": "a sks card"}
    result = train_job(method, pipe, _examples(), hyperparameters, tmp_path / "job")
    assert result.weights.is_file() and len(result.samples) == 3
    assert type(pipe.scheduler) is scheduler_class  # the customer's folder keeps its inference scheduler


@pytest.mark.parametrize("family", FAMILIES)
def test_the_inference_scheduler_does_not_change_the_trained_weights(family, tmp_path):
    """Only the sample renders see the inference scheduler: the same job under DDIM and under DPM-Solver
    (which noises at its own, render-dependent levels when asked) trains the same weights."""
    weights = []
    for scheduler_class in (DDIMScheduler, DPMSolverMultistepScheduler):
        result = train_job("lora", _pipe(family, scheduler_class), _examples(),
                           {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 0, "rank": 2},
                           tmp_path / scheduler_class.__name__)
        weights.append(load_file(result.weights))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0, msg=name)
