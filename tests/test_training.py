"""Customer training as the worker runs it: hyperparameters checked first, LoRA (with the
text encoder) and DreamBooth (with prior preservation) trained on the shapes world, and the
artifacts loaded back the way customers and the auditor load them."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from auditing.config import ConfigError
from auditing.models.conditioning import encode_text, tokenize
from auditing.models.hashing import weights_sha256
from auditing.models.loading import ModelSourceError, load_pipeline, load_unet_weights
from auditing.shapes.cli import PRETRAINED_WORLD
from auditing.shapes.scene import Concept, make_scene, render
from gate.training import (
    HYPERPARAMETERS,
    DreamBoothSettings,
    LoraSettings,
    TrainingResult,
    settings_for,
    train_job,
)

CAPTION = "a blue square"
LORA = {"steps": 4, "batch_size": 2, "rank": 4, "train_text_encoder": True, "learning_rate": 1e-3, "seed": 3}
DREAMBOOTH = {"instance_prompt": "a sks square", "class_prompt": "a square", "num_class_images": 3, "steps": 3,
              "batch_size": 2, "learning_rate": 1e-4, "resolution": 16, "seed": 5}


def _examples(n: int = 4) -> list[tuple[Image.Image, str]]:
    rng = random.Random(0)
    return [(render(make_scene(rng, [Concept("blue", "square")])), CAPTION) for _ in range(n)]


def _train(method: str, hyperparameters: dict, out: Path, pipe=None) -> tuple[TrainingResult, list]:
    calls = []
    result = train_job(method, pipe or load_pipeline(PRETRAINED_WORLD), _examples(), hyperparameters, out,
                       progress=lambda fraction, stage: calls.append((fraction, stage)))
    return result, calls


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_job(tmp_path_factory):
    return _train("lora", LORA, tmp_path_factory.mktemp("lora") / "job")


@pytest.fixture(scope="module")
def dreambooth_job(tmp_path_factory):
    base_sha = weights_sha256(PRETRAINED_WORLD)
    pipe = load_pipeline(PRETRAINED_WORLD)
    result, calls = _train("dreambooth", DREAMBOOTH, tmp_path_factory.mktemp("dreambooth") / "job", pipe)
    return result, calls, pipe, base_sha


@pytest.mark.parametrize("method, hyperparameters, field", [
    ("lora", {"steps": 10, "epochs": 3}, "epochs"),
    ("lora", {"instance_prompt": "a sks square"}, "instance_prompt"),  # a dreambooth key
    ("dreambooth", {"steps": 10}, "instance_prompt"),
    ("dreambooth", {"instance_prompt": "  "}, "instance_prompt"),
    ("dreambooth", {"instance_prompt": "x", "class_prompt": 3}, "class_prompt"),
    ("dreambooth", {"instance_prompt": "x", "prior_loss_weight": 0}, "prior_loss_weight"),
    ("lora", {"steps": "10"}, "steps"),
    ("lora", {"steps": True}, "steps"),
    ("lora", {"batch_size": 2.0}, "batch_size"),
    ("lora", {"learning_rate": 0}, "learning_rate"),
    ("lora", {"learning_rate": float("nan")}, "learning_rate"),
    ("lora", {"train_text_encoder": 1}, "train_text_encoder"),
    ("lora", {"resolution": 30}, "resolution"),
    ("lora", {"seed": -1}, "seed"),
    ("lora", {"mixed_precision": "fp8"}, "mixed_precision"),
    ("lora", {"lr_scheduler": "piecewise_constant"}, "lr_scheduler"),
    ("lora", {"lr_warmup_steps": -1}, "lr_warmup_steps"),
    ("lora", {"max_grad_norm": 0}, "max_grad_norm"),
    ("lora", {"crop": "left"}, "crop"),
    ("lora", {"snr_gamma": -5}, "snr_gamma"),
    ("lora", {"noise_offset": 2}, "noise_offset"),
    ("lora", {"validation_prompt": ""}, "validation_prompt"),
    ("lora", {"text_encoder_lr": 2}, "text_encoder_lr"),
    ("dreambooth", {"instance_prompt": "a sks dog", "text_encoder_lr": 1e-4}, "text_encoder_lr"),
    ("textual_inversion", {}, "method"),
])
def test_settings_for_names_the_bad_field(method, hyperparameters, field):
    with pytest.raises(ConfigError) as info:  # a ValueError
        settings_for(method, hyperparameters)
    assert info.value.field == field and str(info.value).startswith(f"{field} "), info.value
    if method in HYPERPARAMETERS:  # under a prefix, as the API names it
        with pytest.raises(ConfigError) as info:
            settings_for(method, hyperparameters, "hyperparameters")
        assert info.value.field == f"hyperparameters.{field}", info.value


def test_a_json_integer_is_a_number_and_nothing_else_is():
    settings = settings_for("lora", {"noise_offset": 1, "max_grad_norm": 2, "learning_rate": 1})
    assert (settings.noise_offset, settings.max_grad_norm, settings.learning_rate) == (1.0, 2.0, 1.0)
    for value in (True, "0.5", None):
        with pytest.raises(ConfigError, match="^noise_offset "):
            settings_for("lora", {"noise_offset": value})


def test_settings_for_fills_defaults_per_method():
    assert settings_for("lora", {"rank": 8, "train_text_encoder": True, "resolution": 64}) == \
        LoraSettings(rank=8, train_text_encoder=True, resolution=64)
    dreambooth = settings_for("dreambooth", {"instance_prompt": "a sks square", "class_prompt": None})
    assert dreambooth == DreamBoothSettings(instance_prompt="a sks square")
    assert (dreambooth.num_class_images, dreambooth.prior_loss_weight, dreambooth.learning_rate) == (8, 1.0, 5e-6)
    assert set(HYPERPARAMETERS["lora"]) ^ set(HYPERPARAMETERS["dreambooth"]) == {
        "rank", "train_text_encoder", "text_encoder_lr", "instance_prompt", "class_prompt", "num_class_images",
        "prior_loss_weight"}


def test_training_settings_name_diffusers_schedules_and_crops():
    from diffusers.optimization import SchedulerType

    from auditing.models.examples import CROPS
    from gate.training.settings import CROPS as SETTINGS_CROPS
    from gate.training.settings import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    assert SETTINGS_CROPS == CROPS


def test_the_api_can_import_training_without_torch():
    code = "import sys, gate.training; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_lora_with_text_encoder_loads_with_plain_diffusers(lora_job):
    result, _ = lora_job
    assert result.kind == "lora"
    prefixes = {key.split(".")[0] for key in load_file(result.weights)}
    assert prefixes == {"unet", "text_encoder"}
    pipe = load_pipeline(PRETRAINED_WORLD)
    with torch.no_grad():
        ids = tokenize(pipe, [CAPTION])[0]
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(result.weights.parent))  # the customer's own one-liner
        after = pipe.text_encoder(ids)[0]
    assert not torch.allclose(before, after, atol=1e-5)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_progress_samples_and_checkpoints(lora_job):
    result, calls = lora_job
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and calls[-1] == (1.0, "saving")
    assert {stage for _, stage in calls} == {"training", "saving"}
    out = result.weights.parent
    assert [p.relative_to(out).as_posix() for p in result.samples] == [f"samples/step-{n}.png" for n in (1, 2, 3, 4)]
    assert Image.open(result.samples[-1]).size == (2 * 32, 32)  # two images at the world's native 32 px
    assert [p.relative_to(out).parent.as_posix() for p in result.checkpoints] == \
        [f"checkpoints/step-{n}" for n in (1, 2, 3)]  # the last step's weights are the artifact itself
    final = load_file(result.weights)
    for checkpoint in result.checkpoints:
        assert checkpoint.name == result.weights.name and load_file(checkpoint).keys() == final.keys()
    assert not out.with_name(out.name + ".partial").exists()


def test_same_seed_gives_the_same_weights(lora_job, tmp_path):
    result, _ = lora_job
    again, _ = _train("lora", LORA, tmp_path / "again")
    assert again.weights.read_bytes() == result.weights.read_bytes()
    assert again.samples[-1].read_bytes() == result.samples[-1].read_bytes()


def test_dreambooth_renders_class_images_before_training(dreambooth_job):
    result, calls, _, _ = dreambooth_job
    out = result.weights.parents[1]
    assert result.kind == "unet" and result.weights == out / "unet" / "diffusion_pytorch_model.safetensors"
    assert (out / "unet" / "config.json").is_file()
    assert len(list((out / "class_images").glob("*.png"))) == DREAMBOOTH["num_class_images"]
    assert calls[0] == (0.0, "generating class images") and calls[-1] == (1.0, "saving")
    assert Image.open(result.samples[-1]).size == (2 * 16, 16)  # rendered at the training resolution
    assert [p.relative_to(out).as_posix() for p in result.checkpoints] == [
        f"checkpoints/step-{n}/unet/diffusion_pytorch_model.safetensors" for n in (1, 2)]


def test_dreambooth_weights_load_into_a_fresh_pipeline(dreambooth_job):
    result, _, trained, base_sha = dreambooth_job
    pipe = load_pipeline(PRETRAINED_WORLD)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        hidden = encode_text(pipe, [DREAMBOOTH["instance_prompt"]]).hidden
        before = pipe.unet(x, t, hidden).sample
        load_unet_weights(pipe, result.weights)
        after = pipe.unet(x, t, hidden).sample
        expected = trained.unet(x, t, hidden).sample
    assert not torch.allclose(before, after, atol=1e-5)
    assert torch.equal(after, expected)
    assert weights_sha256(PRETRAINED_WORLD) == base_sha  # the base model on disk is untouched


def test_dreambooth_is_repeatable_and_uses_the_prior_loss(dreambooth_job, tmp_path):
    result, _, _, _ = dreambooth_job
    again, _ = _train("dreambooth", DREAMBOOTH, tmp_path / "again")
    assert again.weights.read_bytes() == result.weights.read_bytes()
    heavier, _ = _train("dreambooth", {**DREAMBOOTH, "prior_loss_weight": 4.0}, tmp_path / "heavier")
    assert not torch.equal(load_file(heavier.weights)["conv_out.weight"], load_file(result.weights)["conv_out.weight"])


def test_load_unet_weights_refuses_other_files(lora_job, tmp_path):
    pipe = load_pipeline(PRETRAINED_WORLD)
    with pytest.raises(ModelSourceError, match="safetensors only"):
        load_unet_weights(pipe, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="not a UNet state dict"):
        load_unet_weights(pipe, lora_job[0].weights)  # a LoRA file, not a full UNet


def test_a_failed_run_leaves_no_output(tmp_path):
    out = tmp_path / "job"

    def fail_midway(fraction, stage):
        if fraction > 0:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        train_job("lora", load_pipeline(PRETRAINED_WORLD), _examples(), LORA, out, progress=fail_midway)
    assert not out.exists() and not (tmp_path / "job.partial").exists()
    out.mkdir()
    with pytest.raises(FileExistsError):
        train_job("lora", load_pipeline(PRETRAINED_WORLD), _examples(), LORA, out, progress=fail_midway)
