"""The GPU check in one command: train and audit on SD-shaped pipelines, seconds and peak memory per stage.

For each family (SD 1.5 and SDXL shapes, random weights built from the published configs, never
downloaded): a 50-step LoRA in bf16, a 20-step DreamBooth in bf16 with gradient checkpointing, and a
64-image sequential audit of the LoRA in fp16 (NudeNet for IP), each through the gate's own code
(``gate.training.train_job``, ``auditing.models.loading.load_adapter``, ``auditing.audit.run_audit``).
Prints one JSON line. Peak memory is ``torch.cuda.max_memory_allocated`` per stage on CUDA and the
process's peak resident set elsewhere.

``--size full`` is the real shapes at native resolution and 30 render steps; ``--size reduced`` (the
default without CUDA, and what CI runs so the script never rots) uses the tiny pipelines of
``auditing.models.tiny``, bf16 rendering (fp16 is for GPUs) and 4 render steps, with the same stages.

    python -m benchmarks.gpu_check [--size full|reduced] [--families sd1 sdxl]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from auditing.audit import AuditInputs, run_audit
from auditing.detectors.registry import load_detector
from auditing.models.loading import load_adapter
from auditing.models.published import build_published_pipeline
from auditing.models.tiny import TinySpec, build_tiny_pipeline
from auditing.probes import load_probe_set
from auditing.render import RenderSettings
from auditing.sequential import SequentialPlan
from gate.training import train_job

AUDIT_IMAGES = 64
LORA_STEPS = 50
DREAMBOOTH_STEPS = 20
SUBJECTS = ("a red bicycle", "a lighthouse", "a bowl of fruit", "a city street", "a mountain lake", "a cat",
            "a portrait of a woman", "a wooden chair")


def _examples(n: int = 4) -> list[tuple[Image.Image, str]]:
    rng = random.Random(0)
    return [(Image.new("RGB", (640, 512), tuple(rng.randrange(256) for _ in range(3))), f"a photo of {SUBJECTS[i]}")
            for i in range(n)]


@contextmanager
def measured(stage: str, out: dict, device: str):
    """Record the block's seconds and peak memory (GiB) under ``out[stage]``."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    yield
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss: KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    out[stage] = {"seconds": round(time.perf_counter() - started, 2), "peak_gib": round(peak, 2)}


def _pipeline(family: str, full: bool, device: str):
    pipe = build_published_pipeline(family, device) if full else build_tiny_pipeline(TinySpec(family=family))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_family(family: str, full: bool, device: str, work: Path) -> dict:
    out: dict = {}
    side = None if full else 16
    common = {"batch_size": 1, "mixed_precision": "bf16", "resolution": side}
    with measured("lora_bf16", out, device):
        lora = train_job("lora", _pipeline(family, full, device), _examples(),
                         {**common, "steps": LORA_STEPS, "rank": 4}, work / f"{family}-lora")
    with measured("dreambooth_bf16", out, device):
        train_job("dreambooth", _pipeline(family, full, device), _examples(),
                  {**common, "steps": DREAMBOOTH_STEPS, "instance_prompt": "a photo of sks",
                   "gradient_checkpointing": True}, work / f"{family}-dreambooth")
    render = RenderSettings(inference_steps=30 if full else 4, batch_size=8, dtype="float16" if full else "bfloat16")
    probes = work / "probes.csv"
    probes.write_text("prompt\n" + "\n".join(f"{s} photograph {i}" for i in range(AUDIT_IMAGES // len(SUBJECTS))
                                             for s in SUBJECTS) + "\n")
    with measured(f"audit_{render.dtype}", out, device):
        pipe = load_adapter(_pipeline(family, full, device).to(render.torch_dtype), lora.weights)
        inputs = AuditInputs(family, "0" * 64, load_probe_set(probes), render=render,
                             adapter_path=str(lora.weights), sequential=SequentialPlan())
        report = run_audit(pipe, load_detector("nudenet"), inputs).report
    out[f"audit_{render.dtype}"].update(images=len(report["samples"]), decision=report["verdict"]["decision"])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "reduced"), default=None,
                        help="default: full on CUDA, reduced elsewhere")
    parser.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=("sd1", "sd2", "sdxl"))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full = (args.size or ("full" if device == "cuda" else "reduced")) == "full"
    result = {"benchmark": "gpu_check", "size": "full" if full else "reduced", "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            result[family] = check_family(family, full, device, Path(tmp))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
