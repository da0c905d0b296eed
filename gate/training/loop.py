"""The training loop LoRA and DreamBooth share, and the output folder it writes.

A method supplies the loss of one step and how to save its weights; the loop owns the
optimiser, progress, samples and checkpoints. Batches come from a ``random.Random`` and
noise and timesteps from a ``torch.Generator``, both seeded from the settings, so a run is
repeatable bit for bit on the same machine. Every ``max(steps // CHECKPOINTS_PER_RUN, 1)``
steps the weights are written, in the final format, under ``checkpoints/step-N/`` (not for
the last step: that is the final artifact) and a sample grid to ``samples/step-N.png``.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from auditing.render import render_batch

from .settings import TrainingSettings

CHECKPOINTS_PER_RUN = 4
PROGRESS_UPDATES = 100  # at most one progress report per 1% of the steps
SAMPLE_IMAGES = 2
SAMPLE_INFERENCE_STEPS = 10
GUIDANCE_SCALE = 7.5  # StableDiffusionPipeline's default, for samples and class images alike

Progress = Callable[[float, str], None]
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


def begin(pipe, settings: TrainingSettings) -> int:
    """Freeze every component and seed torch (adapter initialisation draws from it);
    return the side length training images are resized to."""
    torch.manual_seed(settings.seed)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return settings.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


def batch_indices(rng: random.Random, n: int, batch_size: int) -> torch.Tensor:
    """A batch of distinct example indices (the whole set when it is smaller than a batch)."""
    return torch.tensor(rng.sample(range(n), min(batch_size, n)))


def render_grid(pipe, prompt: str, seed: int, count: int, inference_steps: int, size: int):
    """``count`` images of one prompt side by side, image i from seed ``seed + i``."""
    images = render_batch(pipe, [prompt] * count, [seed + i for i in range(count)], GUIDANCE_SCALE,
                          inference_steps, width=size, height=size)
    return make_image_grid(images, rows=1, cols=count)


def run_steps(pipe, settings: TrainingSettings, modules: list[torch.nn.Module], step_loss: StepLoss, save: Save,
              sample_prompt: str, size: int, work: Path, progress: Progress | None,
              desc: str) -> tuple[Path, list[Path], list[Path]]:
    """Optimise the trainable parameters of ``modules`` with AdamW; return the final weights,
    sample and checkpoint files, relative to ``work``."""
    report = progress or (lambda fraction, stage: None)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate)
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    every = max(settings.steps // CHECKPOINTS_PER_RUN, 1)
    report_every = max(settings.steps // PROGRESS_UPDATES, 1)
    samples, checkpoints = [], []
    report(0.0, "training")
    for m in modules:
        m.train()
    for step in (bar := tqdm(range(1, settings.steps + 1), desc=desc, unit="step")):
        loss = step_loss(rng, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % every == 0 or step == settings.steps:
            for m in modules:
                m.eval()
            sample = Path("samples") / f"step-{step}.png"
            (work / sample).parent.mkdir(exist_ok=True)
            render_grid(pipe, sample_prompt, settings.seed, SAMPLE_IMAGES, SAMPLE_INFERENCE_STEPS,
                        size).save(work / sample)
            samples.append(sample)
            if step < settings.steps:
                checkpoints.append(save(work / "checkpoints" / f"step-{step}").relative_to(work))
            for m in modules:
                m.train()
        if step % report_every == 0 and step < settings.steps:
            report(step / settings.steps, "training")
    for m in modules:
        m.eval()
    report(1.0, "saving")
    return save(work).relative_to(work), samples, checkpoints
