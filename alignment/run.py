"""An ``ftgate align`` run: set-up, the outer loop with records and checkpoints, the output folder.

Layout for ``output = OUT``:

* ``OUT.work/``: the run's state while it runs: ``steps.jsonl`` (one line per outer step),
  ``checkpoint/`` (every ``outer.checkpoint_every`` steps and at the end), the render cache
  of prompt-only data sets, and the shapes-world data when the config names it.
* ``OUT/``: appears only when the run is complete (written as ``OUT.partial`` and renamed):
  a diffusers pipeline folder with the hardened weights merged into the UNet,
  ``alignment.json`` (the manifest), ``steps.jsonl`` and ``curves.png``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from auditing.files import atomic_write
from auditing.models.conditioning import is_sdxl
from auditing.models.hashing import weights_sha256
from auditing.models.loading import load_pipeline
from auditing.shapes.cli import PRETRAINED_WORLD, world_record
from auditing.shapes.datasets import write_world_data
from auditing.shapes.scene import DEFAULT_UNSAFE, Concept

from .config import WORLD, AlignConfig, load_config
from .data import load_data
from .outer import Aligner
from .plots import plot_curves

log = logging.getLogger(__name__)

WORLD_DATA_PREFIX = f"{WORLD}:"
MANIFEST = "alignment.json"
STEPS = "steps.jsonl"


@dataclass(frozen=True)
class RunPaths:
    output: Path
    work: Path

    @property
    def checkpoint(self) -> Path:
        return self.work / "checkpoint"

    @property
    def steps(self) -> Path:
        return self.work / STEPS


def _code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"ftgate {version('ftgate')}" + (f" ({commit})" if commit else "")


def _model_path(config: AlignConfig, base_dir: Path) -> Path:
    return PRETRAINED_WORLD if config.model == WORLD else (base_dir / config.model).resolve()


def _resolve_data(config: AlignConfig, base_dir: Path, work: Path, model: Path) -> AlignConfig:
    """Map ``shapes-world:`` data paths onto world data generated once under the work folder."""
    world_dir = work / "world-data"

    def resolve(value: str) -> str:
        if value.startswith(WORLD_DATA_PREFIX):
            if not world_dir.exists():
                unsafe = (world_record(model)["config"]["unsafe_concept"] if (model / "world.json").is_file()
                          else " ".join(DEFAULT_UNSAFE))
                write_world_data(world_dir, Concept.parse(unsafe))
            value = str(world_dir / value[len(WORLD_DATA_PREFIX):])
        return str((base_dir / value).resolve())

    data = config.data
    finetune = resolve(data.finetune) if isinstance(data.finetune, str) else tuple(map(resolve, data.finetune))
    return replace(config, data=replace(data, harmful=resolve(data.harmful), preservation=resolve(data.preservation),
                                        finetune=finetune))


def run_alignment(config_path: str | Path, resume: bool = False, stop_after: int | None = None,
                  output: str | Path | None = None) -> Path:
    """Harden the configured model; returns the output folder.

    ``stop_after`` ends the session after that many outer steps in total, with a
    checkpoint (for preemptible machines); the work folder is returned and ``--resume``
    continues the run. ``output`` (relative to the working directory) replaces the config's.
    """
    config_path = Path(config_path)
    config = load_config(config_path)
    base_dir = config_path.resolve().parent
    output = Path(output).resolve() if output is not None else (base_dir / config.output).resolve()
    paths = RunPaths(output, output.with_name(output.name + ".work"))
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new output or remove it")
    if resume and not (paths.checkpoint / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {paths.checkpoint}")
    if not resume and paths.work.exists():
        raise FileExistsError(f"{paths.work} exists from an earlier run; pass --resume to continue it or remove it")
    paths.work.mkdir(parents=True, exist_ok=True)

    model = _model_path(config, base_dir)
    resolved = _resolve_data(config, base_dir, paths.work, model)
    device = config.torch_device()
    torch.manual_seed(config.seed)
    # fp32 weights are the master copy; config.precision is the forward passes' autocast dtype
    pipe = load_pipeline(model, torch_dtype=torch.float32, device=device)
    if is_sdxl(pipe):
        raise ValueError(f"model: {model} is an SDXL pipeline; hardening supports SD 1.x and 2.x UNets (SDXL's "
                         "pooled-text and time-id conditioning is not implemented in alignment/)")
    model_sha = weights_sha256(model)
    data = load_data(pipe, model_sha, resolved.data, config.generation, cache_dir=paths.work / "renders")
    aligner = Aligner(pipe, data, config)
    if resume:
        aligner.load(paths.checkpoint)
        lines = paths.steps.read_text().splitlines()[:aligner.step_index] if paths.steps.exists() else []
        atomic_write(paths.steps, "".join(line + "\n" for line in lines))
        log.info("resumed at outer step %d", aligner.step_index)
    total = config.outer.steps
    stop = total if stop_after is None else min(total, stop_after)
    start = time.perf_counter()
    with open(paths.steps, "a") as records, \
            tqdm(total=total, initial=aligner.step_index, desc="align", unit="step") as bar:
        while aligner.step_index < stop:
            record = aligner.step()
            records.write(json.dumps(record) + "\n")
            records.flush()
            star = record["L_harm_star_mean"]
            bar.set_postfix(L_harm=f"{record['L_harm']:.4f}", L_harm_star="-" if star is None else f"{star:.4f}",
                            R=f"{record['R']:.4f}", backoffs=record["backoffs"])
            bar.update(1)
            if aligner.step_index % config.outer.checkpoint_every == 0 or aligner.step_index == total:
                aligner.save(paths.checkpoint)
    if aligner.step_index < total:
        aligner.save(paths.checkpoint)
        log.info("stopped at outer step %d of %d; continue with --resume", aligner.step_index, total)
        return paths.work
    return _write_output(pipe, aligner, config, resolved, model, model_sha, data.sources(), paths,
                         time.perf_counter() - start)


def _write_output(pipe, aligner: Aligner, config: AlignConfig, resolved: AlignConfig, model: Path, model_sha: str,
                  sources: dict, paths: RunPaths, seconds: float) -> Path:
    tmp = paths.output.with_name(paths.output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        own = dict(pipe.unet.named_parameters())
        with torch.no_grad():
            for name, value in aligner.merged().items():
                own[name].copy_(value)
        pipe.save_pretrained(tmp, safe_serialization=True)
        records = [json.loads(line) for line in paths.steps.read_text().splitlines()]
        shutil.copy(paths.steps, tmp / STEPS)
        plot_curves(records, tmp / "curves.png")
        manifest = {
            "kind": "ftgate.alignment", "version": 1, "code": _code_version(),
            "torch": torch.__version__, "diffusers": version("diffusers"),
            "base_model": {"path": str(model), "sha256": model_sha},
            "config": config.as_dict(), "resolved_data": asdict(resolved.data), "seed": config.seed,
            "inputs": sources, "steps": aligner.step_index, "device": str(aligner.device),
            "backoffs": sum(r["backoffs"] for r in records),
            "seconds_this_session": round(seconds, 1),
            "final": {k: records[-1][k] for k in ("L_harm", "L_harm_star_mean", "R")} if records else {},
            "output_sha256": weights_sha256(tmp),
        }
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(paths.output)
    return paths.output
