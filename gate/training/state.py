"""Resumable training state, written without pickle.

A job re-delivered after its worker died continues from its last checkpoint instead of step 0. Each
checkpoint step writes ``step-N/`` under the job's state folder: the trainable parameters and every
optimiser tensor in one ``.safetensors`` file, and in ``state.json`` the step, the optimiser's
hyperparameters, the gradient scaler, both random streams and a fingerprint of the run's settings.
The learning-rate schedule is a pure function of the step and is replayed. A folder appears only
complete (written as ``.partial``, then renamed), and a state whose fingerprint differs (other settings,
data or base model) is ignored, so a resumed run computes bit for bit what the uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

TENSORS = "state.safetensors"
META = "state.json"


def _tensors_and_meta(named: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    tensors = {f"param.{name}": p.detach().float().contiguous() for name, p in named.items()}
    opt_state = opt.state_dict()
    scalars = {}
    for index, entries in opt_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "optimizer_scalars": scalars}


def save_state(folder: Path, step: int, fingerprint: str, named: dict[str, torch.nn.Parameter],
               opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rng: random.Random,
               gen: torch.Generator) -> None:
    """Write ``folder/step-{step}`` atomically and drop older steps."""
    tensors, meta = _tensors_and_meta(named, opt)
    tensors["generator"] = gen.get_state()
    version, internal, gauss = rng.getstate()
    meta.update(step=step, fingerprint=fingerprint, scaler=scaler.state_dict(),
                rng=[version, list(internal), gauss])
    final = folder / f"step-{step}"
    tmp = folder / f"step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / TENSORS))
    (tmp / META).write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _latest(folder: Path) -> Path | None:
    steps = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")
             and (p / META).is_file() and p.name.removeprefix("step-").isdigit()]
    return max(steps, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def load_state(folder: Path | None, fingerprint: str, named: dict[str, torch.nn.Parameter],
               opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rng: random.Random,
               gen: torch.Generator) -> int:
    """Restore the latest state of this run into the given objects; return its step (0: none usable)."""
    latest = None if folder is None or not folder.is_dir() else _latest(folder)
    if latest is None:
        return 0
    meta = json.loads((latest / META).read_text())
    if meta["fingerprint"] != fingerprint:
        log.warning("training state %s belongs to another run (settings, data or model differ); starting at step 0",
                    latest)
        return 0
    tensors = load_file(str(latest / TENSORS))
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[f"param.{name}"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, entry = key.split(".", 2)
            state.setdefault(int(index), {})[entry] = value
    for key, value in meta["optimizer_scalars"].items():
        index, entry = key.split(".", 1)
        state.setdefault(int(index), {})[entry] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if meta["scaler"]:  # empty when the scaler is disabled (no fp16)
        scaler.load_state_dict(meta["scaler"])
    version, internal, gauss = meta["rng"]
    rng.setstate((version, tuple(internal), gauss))
    gen.set_state(tensors["generator"])
    log.info("resumed training from %s (step %d)", latest, meta["step"])
    return int(meta["step"])
