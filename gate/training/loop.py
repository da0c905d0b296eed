"""The training loop LoRA and DreamBooth share, and the output folder it writes.

A method supplies the loss of one step, its trainable modules (each with a learning rate) and how to save
its weights; the loop owns precision, the optimiser and its schedule, gradient clipping, progress, samples,
checkpoints and resumable state. Batches come from a ``random.Random`` and noise and timesteps from a
``torch.Generator``, both seeded from the settings, so a run is repeatable bit for bit on the same machine,
resumed or not. Every ``max(steps // CHECKPOINTS_PER_RUN, 1)`` steps the weights are written, in the
final format, under ``checkpoints/step-N/`` (not for the last step: that is the final artifact), a sample
grid to ``samples/step-N.png``, and, given a state folder, the state a re-delivered job resumes from.

Mixed precision follows diffusers' training scripts: frozen weights in fp16/bf16, trainable ones kept in
fp32 and the forward pass under autocast (with a gradient scaler for fp16); the VAE stays fp32 (SDXL's
overflows in fp16).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from auditing.models.conditioning import text_encoders
from auditing.render import render_batch

from .settings import TrainingSettings
from .state import load_state, save_state

CHECKPOINTS_PER_RUN = 4
PROGRESS_UPDATES = 100  # at most one progress report per 1% of the steps
SAMPLE_IMAGES = 2
SAMPLE_INFERENCE_STEPS = 10
GUIDANCE_SCALE = 7.5  # StableDiffusionPipeline's default, for samples and class images alike
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Progress = Callable[[float, str], None]
# ``notify(kind, data)``: "loss" {step, loss} at each progress report, "sample" {step, path} once a sample grid
# is written, "checkpoint" {step} once a checkpoint is; the caller decides what to record (gate.pipeline.events).
Notify = Callable[[str, dict], None]
StepLoss = Callable[[random.Random, torch.Generator], torch.Tensor]
Save = Callable[[Path], Path]


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield ``out.partial`` to write into; it becomes ``out`` only if the body succeeds."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)


def begin(pipe, settings: TrainingSettings, full_unet: bool = False) -> int:
    """Freeze every component in its training precision (the UNet in fp32 when every weight of it
    trains), seed torch (adapter initialisation draws from it); return the training image side."""
    torch.manual_seed(settings.seed)
    if pipe.unet.device.type == "cuda":  # TF32 matmuls on Ampere and later, as diffusers' --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    frozen = PRECISIONS[settings.mixed_precision]
    dtypes = [(pipe.vae, torch.float32), *((e, frozen) for e in text_encoders(pipe)),
              (pipe.unet, torch.float32 if full_unet else frozen)]
    for module, dtype in dtypes:
        module.requires_grad_(False)
        if module.dtype != dtype:  # diffusers warns on every cast, needed or not
            module.to(dtype)
    if settings.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.set_progress_bar_config(disable=True)
    return settings.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


def autocast(pipe, settings: TrainingSettings) -> AbstractContextManager:
    """The forward passes' precision: autocast to fp16/bf16, or nothing for fp32 training."""
    if settings.mixed_precision == "no":
        return nullcontext()
    return torch.autocast(pipe.unet.device.type, dtype=PRECISIONS[settings.mixed_precision])


def run_fingerprint(settings: TrainingSettings, examples: list[tuple[Image.Image, str]]) -> str:
    """Identifies a run's settings and data, so that only its own saved state is resumed."""
    digest = hashlib.sha256(json.dumps([type(settings).__name__, asdict(settings)], sort_keys=True).encode())
    for image, caption in examples:
        digest.update(f"{image.mode} {image.size} {caption}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def batch_indices(rng: random.Random, n: int, batch_size: int) -> torch.Tensor:
    """A batch of distinct example indices (the whole set when it is smaller than a batch)."""
    return torch.tensor(rng.sample(range(n), min(batch_size, n)))


def render_grid(pipe, prompt: str, seed: int, count: int, inference_steps: int, size: int):
    """``count`` images of one prompt side by side, image i from seed ``seed + i``, rendered with a
    fresh copy of the pipeline's inference scheduler, whose state the pipeline keeps untouched."""
    own = pipe.scheduler
    pipe.scheduler = type(own).from_config(own.config)
    try:
        images = render_batch(pipe, [prompt] * count, [seed + i for i in range(count)], GUIDANCE_SCALE,
                              inference_steps, width=size, height=size)
    finally:
        pipe.scheduler = own
    return make_image_grid(images, rows=1, cols=count)


def run_steps(pipe, settings: TrainingSettings, groups: list[tuple[torch.nn.Module, float]], step_loss: StepLoss,
              save: Save, sample_prompt: str, size: int, work: Path, progress: Progress | None, desc: str,
              state: tuple[Path, str] | None = None,
              notify: Notify | None = None) -> tuple[Path, list[Path], list[Path], int]:
    """Optimise the trainable parameters of each (module, learning rate) with AdamW; return the final
    weights, sample and checkpoint files (relative to ``work``) and the step resumed from.

    ``state`` is (folder, fingerprint): where resumable state is kept, and which run it must belong to."""
    report = progress or (lambda fraction, stage: None)
    tell = notify or (lambda kind, data: None)
    named = {f"{i}.{name}": p for i, (m, _) in enumerate(groups) for name, p in m.named_parameters()
             if p.requires_grad}
    for p in named.values():  # master weights in fp32 whatever the frozen weights are in
        p.data = p.data.float()
    opt = torch.optim.AdamW([{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr}
                             for m, lr in groups])
    scaler = torch.amp.GradScaler(pipe.unet.device.type, enabled=settings.mixed_precision == "fp16")
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    state_dir, fingerprint = state or (None, "")
    start = load_state(state_dir, fingerprint, named, opt, scaler, rng, gen)
    schedule = get_scheduler(settings.lr_scheduler, opt, num_warmup_steps=settings.lr_warmup_steps,
                             num_training_steps=settings.steps, last_epoch=start - 1)
    every = max(settings.steps // CHECKPOINTS_PER_RUN, 1)
    report_every = max(settings.steps // PROGRESS_UPDATES, 1)
    samples, checkpoints = [], []
    modules = [m for m, _ in groups]
    report(start / settings.steps, "training")
    for m in modules:
        m.train()
    steps = range(start + 1, settings.steps + 1)
    for step in (bar := tqdm(steps, desc=desc, unit="step", initial=start, total=settings.steps)):
        with autocast(pipe, settings):
            loss = step_loss(rng, gen)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if settings.max_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(named.values(), settings.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # tqdm redraws at its own pace
        if step % every == 0 or step == settings.steps:
            for m in modules:
                m.eval()
            sample = Path("samples") / f"step-{step}.png"
            (work / sample).parent.mkdir(exist_ok=True)
            with autocast(pipe, settings):
                grid = render_grid(pipe, sample_prompt, settings.seed, SAMPLE_IMAGES, SAMPLE_INFERENCE_STEPS, size)
            grid.save(work / sample)
            samples.append(sample)
            tell("sample", {"step": step, "path": work / sample})
            if step < settings.steps:
                checkpoints.append(save(work / "checkpoints" / f"step-{step}").relative_to(work))
                tell("checkpoint", {"step": step})
                if state_dir is not None:
                    save_state(state_dir, step, fingerprint, named, opt, scaler, rng, gen)
            for m in modules:
                m.train()
        if step % report_every == 0 or step == settings.steps:
            tell("loss", {"step": step, "loss": loss.item()})
        if step % report_every == 0 and step < settings.steps:
            report(step / settings.steps, "training")
    for m in modules:
        m.eval()
    report(1.0, "saving")
    return save(work).relative_to(work), samples, checkpoints, start
