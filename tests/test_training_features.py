"""The training features customers bring from diffusers' scripts, on tiny pipelines: SDXL's conditioning
as its pipeline computes it, aspect-preserving crops, mixed precision with fp32 trainables, noise offset,
gradient clipping, validation prompts, and resumption that continues bit for bit."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from auditing.models.conditioning import encode_text, is_sdxl, predict, time_ids
from auditing.models.denoising import add_noise, training_scheduler
from auditing.models.examples import TrainingImages, crop_square
from auditing.models.tiny import TinySpec, build_tiny_pipeline
from gate.training import train_job

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(n: int = 4, size: tuple[int, int] = (40, 24)) -> list[tuple[Image.Image, str]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        image.paste((255, 255, 255), (0, 0, size[0] // 4, size[1]))  # a white band on the left: flips show
        out.append((image, f"a plain card number {i}"))
    return out


def test_sdxl_conditioning_is_what_its_pipeline_feeds_the_unet():
    pipe = build_tiny_pipeline(TinySpec(family="sdxl"))
    assert is_sdxl(pipe) and not is_sdxl(build_tiny_pipeline(TinySpec(family="sd1")))
    prompt = "a plain card"
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    text = encode_text(pipe, [prompt])
    torch.testing.assert_close(text.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(text.pooled, pooled, rtol=0, atol=0)
    expected = pipe._get_add_time_ids((24, 40), (0, 5), (16, 16), torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert expected.tolist() == [time_ids((24, 40), (0, 5), (16, 16))]


def test_sdxl_unet_refuses_missing_added_conditioning():
    pipe = build_tiny_pipeline(TinySpec(family="sdxl"))
    text = encode_text(pipe, ["a card"])
    with pytest.raises(ValueError, match="time ids"):
        predict(pipe.unet, torch.zeros(1, 4, 8, 8), torch.tensor([10]), text)


def test_crops_keep_the_aspect_ratio_and_record_where_they_came_from():
    image = _examples(1)[0][0]  # 40 x 24, white band on the left quarter
    view, ids = crop_square(image, 16)
    assert view.size == (16, 16)
    assert ids == [24, 40, 0, 5, 16, 16]  # resized to 27 x 16, the centre square starts at x = 5
    rng = random.Random(1)
    corners = {tuple(crop_square(image, 16, "random", rng=rng)[1][2:4]) for _ in range(40)}
    assert {top for top, _ in corners} == {0} and len({left for _, left in corners}) > 3
    left_column = {crop_square(image, 16, "center", flip=True, rng=rng)[0].getpixel((0, 8)) for _ in range(40)}
    assert len(left_column) == 2  # mirrored about half the time: the band moves to the right
    with pytest.raises(ValueError, match="crop must be one of"):
        crop_square(image, 16, "left")


def test_fixed_crops_are_encoded_once_and_random_ones_per_batch():
    pipe = build_tiny_pipeline(TinySpec(family="sdxl"))
    images = [im for im, _ in _examples()]
    fixed = TrainingImages(pipe, images, 16)
    idx = torch.tensor([2, 0])
    latents, ids = fixed.batch(idx, random.Random(0))
    side = 16 // pipe.vae_scale_factor
    assert latents.shape == (2, 4, side, side) and ids.tolist() == [[24, 40, 0, 5, 16, 16]] * 2
    torch.testing.assert_close(latents, fixed.latents[idx], rtol=0, atol=0)
    drawn = TrainingImages(pipe, images, 16, crop="random", flip=True)
    assert not hasattr(drawn, "latents")
    lefts = {drawn.batch(idx, random.Random(seed))[1][0, 3].item() for seed in range(10)}
    assert len(lefts) > 1


def test_noise_offset_adds_a_per_channel_constant():
    scheduler = training_scheduler(build_tiny_pipeline(TinySpec()).scheduler.config)
    latents = torch.zeros(3, 4, 8, 8)
    plain = add_noise(scheduler, latents, generator=torch.Generator().manual_seed(0))
    offset = add_noise(scheduler, latents, generator=torch.Generator().manual_seed(0), noise_offset=0.1)
    shift = offset.target - plain.target  # epsilon target: the noise itself
    assert torch.equal(offset.timesteps, plain.timesteps)
    assert shift.abs().max() > 0
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_mixed_precision_keeps_trainables_in_fp32(family, tmp_path):
    pipe = build_tiny_pipeline(TinySpec(family=family))
    train_job("lora", pipe, _examples(), {"steps": 2, "batch_size": 2, "mixed_precision": "bf16",
                                          "train_text_encoder": True, "resolution": 16}, tmp_path / "out")
    lora = {n: p.dtype for n, p in pipe.unet.named_parameters() if "lora" in n}
    base = {n: p.dtype for n, p in pipe.unet.named_parameters() if "lora" not in n}
    assert lora and set(lora.values()) == {torch.float32}
    assert set(base.values()) == {torch.bfloat16}
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    saved = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_sdxl_lora_on_both_text_encoders_loads_with_plain_diffusers(tmp_path):
    pipe = build_tiny_pipeline(TinySpec(family="sdxl"))
    hyper = {"steps": 3, "batch_size": 2, "learning_rate": 1e-2, "train_text_encoder": True, "resolution": 16}
    result = train_job("lora", pipe, _examples(), hyper, tmp_path / "out")
    prefixes = {key.split(".")[0] for key in load_file(result.weights)}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    fresh = build_tiny_pipeline(TinySpec(family="sdxl"))
    assert isinstance(fresh, StableDiffusionXLPipeline)

    def render(p):
        return p("a plain card", num_inference_steps=2, height=16, width=16, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        before = render(fresh)
        fresh.load_lora_weights(str(result.weights.parent))  # the customer's own one-liner
        after = render(fresh)
    assert fresh.get_list_adapters().keys() == {"unet", "text_encoder", "text_encoder_2"}
    assert not torch.allclose(before, after)


def test_clipping_and_validation_prompt_change_what_they_should(tmp_path):
    base = {"steps": 2, "batch_size": 2, "learning_rate": 1e-2, "resolution": 16}

    def run(name, **extra):
        return train_job("lora", build_tiny_pipeline(TinySpec()), _examples(), {**base, **extra}, tmp_path / name)

    default, unclipped, tight = run("default"), run("unclipped", max_grad_norm=None), run("tight", max_grad_norm=1e-4)
    assert default.weights.read_bytes() != tight.weights.read_bytes()
    assert unclipped.weights.read_bytes() != tight.weights.read_bytes()
    prompted = run("prompted", validation_prompt="a different prompt entirely")
    assert prompted.weights.read_bytes() == default.weights.read_bytes()  # samples only
    assert prompted.samples[-1].read_bytes() != default.samples[-1].read_bytes()


class Killed(Exception):
    pass


def _kill_after(fraction: float):
    def progress(done, stage):
        if stage == "training" and done >= fraction:
            raise Killed
    return progress


@pytest.mark.parametrize("method, hyper", [
    ("lora", {"train_text_encoder": True, "lr_scheduler": "cosine", "lr_warmup_steps": 3, "crop": "random",
              "random_flip": True, "noise_offset": 0.05}),
    ("dreambooth", {"instance_prompt": "a sks card", "lr_scheduler": "linear", "snr_gamma": 5.0}),
])
def test_a_killed_run_resumes_bit_for_bit(method, hyper, tmp_path):
    hyper = {**hyper, "steps": 8, "batch_size": 2, "learning_rate": 1e-3, "resolution": 16}
    family = "sdxl" if method == "lora" else "sd2"
    whole = train_job(method, build_tiny_pipeline(TinySpec(family=family)), _examples(), hyper, tmp_path / "whole")
    state = tmp_path / "state"
    with pytest.raises(Killed):
        train_job(method, build_tiny_pipeline(TinySpec(family=family)), _examples(), hyper, tmp_path / "first",
                  progress=_kill_after(0.5), state_dir=state)
    assert [p.name for p in state.iterdir()] == ["step-4"]  # the last checkpoint step, older ones dropped
    assert not (tmp_path / "first").exists()
    resumed = train_job(method, build_tiny_pipeline(TinySpec(family=family)), _examples(), hyper,
                        tmp_path / "second", state_dir=state)
    assert resumed.resumed_from_step == 4 and whole.resumed_from_step == 0
    assert resumed.weights.read_bytes() == whole.weights.read_bytes()


def test_state_of_another_run_is_not_resumed(tmp_path):
    hyper = {"steps": 4, "batch_size": 2, "resolution": 16}
    state = tmp_path / "state"
    with pytest.raises(Killed):
        train_job("lora", build_tiny_pipeline(TinySpec()), _examples(), hyper, tmp_path / "a",
                  progress=_kill_after(0.5), state_dir=state)
    other = train_job("lora", build_tiny_pipeline(TinySpec()), _examples(), {**hyper, "learning_rate": 1e-3},
                      tmp_path / "b", state_dir=state)
    assert other.resumed_from_step == 0
