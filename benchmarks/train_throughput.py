"""Steps per second of the gate's LoRA trainer against a bare diffusers + peft loop with the same settings.

The bare loop is what a customer would write from diffusers' ``train_text_to_image_lora.py``: latents
encoded once, a DDPM training scheduler, a peft adapter on the UNet's attention, AdamW, MSE on the noise,
gradient clipping at 1.0, and, as that script does, validation images and LoRA checkpoints along the way
(here the same ones the gate makes: two 10-step images and a checkpoint every quarter of the run). The
gate's trainer (``gate.training.train_job``) adds what a service needs (progress, LR schedule, precision
handling, resumable state when asked), all counted against it. Both run in this process, on the same tiny
pipeline, best of three each, alternated, so the ratio is free of machine drift.

    python -m benchmarks.train_throughput [--steps 200] [--families sd1 sdxl]   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from auditing.models.conditioning import encode_text, predict
from auditing.models.denoising import add_noise, denoising_loss, training_scheduler
from auditing.models.examples import TrainingImages
from auditing.models.tiny import TinySpec, build_tiny_pipeline
from gate.training import train_job
from gate.training.loop import CHECKPOINTS_PER_RUN, SAMPLE_IMAGES, SAMPLE_INFERENCE_STEPS

GOAL = 0.95
REPEATS = 3
BATCH = 2
RANK = 4


def _examples(n: int = 8) -> list[tuple[Image.Image, str]]:
    rng = random.Random(0)
    return [(Image.new("RGB", (32, 24), tuple(rng.randrange(256) for _ in range(3))), f"a plain card {i}")
            for i in range(n)]


def bare_loop(family: str, steps: int) -> float:
    """Seconds for ``steps`` steps of a plain diffusers + peft LoRA loop (setup excluded, as in the gate)."""
    pipe = build_tiny_pipeline(TinySpec(family=family))
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    examples = _examples()
    started = time.perf_counter()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = TrainingImages(pipe, [im for im, _ in examples], size)
    text = encode_text(pipe, [c for _, c in examples])
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    scheduler = training_scheduler(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    every = max(steps // CHECKPOINTS_PER_RUN, 1)
    out = Path(tempfile.mkdtemp())
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(examples), (BATCH,), generator=gen)
        latents, time_ids = images.batch(idx, random.Random(0))
        batch = add_noise(scheduler, latents, generator=gen)
        loss = denoising_loss(predict(pipe.unet, batch.noisy, batch.timesteps, text[idx], time_ids), batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            pipe(["a plain card"] * SAMPLE_IMAGES, num_inference_steps=SAMPLE_INFERENCE_STEPS, height=size, width=size,
                 generator=[torch.Generator().manual_seed(i) for i in range(SAMPLE_IMAGES)]).images[0].save(
                out / f"sample-{step}.png")
            type(pipe).save_lora_weights(out / f"step-{step}", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    shutil.rmtree(out)
    return time.perf_counter() - started


def gate_trainer(family: str, steps: int) -> float:
    pipe = build_tiny_pipeline(TinySpec(family=family))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        train_job("lora", pipe, _examples(), {"steps": steps, "batch_size": BATCH, "rank": RANK}, Path(tmp) / "out")
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--families", nargs="+", default=["sd1", "sdxl"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"benchmark": "train_throughput", "steps": args.steps, "batch_size": BATCH, "rank": RANK,
              "device": "cpu", "goal": GOAL}
    for family in args.families:
        bare_loop(family, 5)  # warm both paths up
        gate_trainer(family, 5)
        bare, gate = [], []
        for _ in range(REPEATS):  # alternated, so drift on a shared machine hits both alike
            bare.append(bare_loop(family, args.steps))
            gate.append(gate_trainer(family, args.steps))
        result[family] = {"bare_steps_per_s": round(args.steps / min(bare), 2),
                          "gate_steps_per_s": round(args.steps / min(gate), 2),
                          "gate_over_bare": round(min(bare) / min(gate), 3)}
    result["met"] = all(result[f]["gate_over_bare"] >= GOAL for f in args.families)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
