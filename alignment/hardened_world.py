"""The shapes world hardened with ResAlign, shipped as the difference it made to the weights.

``ftgate align --config alignment/configs/shapes-world.toml`` takes about 12 minutes on 2 cores; the demo
needs its result in seconds. The config's scope (attention-LoRA, merged at the end) changes only the
attention projections, each by a matrix of rank at most ``lora_rank``, so the run's output is stored as
rank-r factors of (hardened - base) per projection: a few hundred KB instead of a 16 MB UNet, with the
run's own manifest (config, seeds, input hashes, code version) beside it. ``materialize`` rebuilds the
diffusers folder: the packaged base world with the difference added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from auditing.models.hashing import weights_sha256
from auditing.shapes.cli import PRETRAINED_WORLD

PRETRAINED = Path(__file__).parent / "pretrained"
DELTA = PRETRAINED / "shapes-world-hardened.safetensors"
MANIFEST = PRETRAINED / "shapes-world-hardened.json"
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
MAX_RECONSTRUCTION_ERROR = 1e-5


def extract(hardened: Path, base: Path = PRETRAINED_WORLD, rank: int = 4) -> dict:
    """Factor ``hardened - base`` into rank-``rank`` pairs and write ``DELTA`` and ``MANIFEST`` (run once,
    after a hardening run); raises if any difference is not of that rank."""
    h, b = load_file(hardened / UNET_WEIGHTS), load_file(base / UNET_WEIGHTS)
    if h.keys() != b.keys():
        raise ValueError(f"{hardened} and {base} have different UNet parameters")
    factors, worst = {}, 0.0
    for name in sorted(h):
        diff = (h[name].double() - b[name].double())
        if not diff.any():
            continue
        if diff.dim() != 2:
            raise ValueError(f"{name} changed but is not a matrix: not an attention-LoRA run")
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        up, down = (u[:, :rank] * s[:rank]), vh[:rank]
        worst = max(worst, (up @ down - diff).abs().max().item())
        factors[f"{name}.up"], factors[f"{name}.down"] = up.float().contiguous(), down.float().contiguous()
    if worst > MAX_RECONSTRUCTION_ERROR:
        raise ValueError(f"the difference is not of rank {rank} (max error {worst:.2e})")
    PRETRAINED.mkdir(exist_ok=True)
    save_file(factors, DELTA, metadata={"rank": str(rank), "base_sha256": weights_sha256(base)})
    record = {"kind": "ftgate.hardened-world", "version": 1, "rank": rank, "matrices": len(factors) // 2,
              "max_reconstruction_error": worst, "alignment": json.loads((hardened / "alignment.json").read_text())}
    MANIFEST.write_text(json.dumps(record, indent=1))
    return record


def materialize(out: str | Path) -> Path:
    """The hardened world as a diffusers folder at ``out`` (built once; kept if already there)."""
    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(PRETRAINED_WORLD, tmp)
        weights = load_file(tmp / UNET_WEIGHTS)
        delta = load_file(DELTA)
        for key in {k.rsplit(".", 1)[0] for k in delta}:
            weights[key] = (weights[key].double() + delta[f"{key}.up"].double() @ delta[f"{key}.down"].double()).float()
        save_file(weights, tmp / UNET_WEIGHTS)
        shutil.copy(MANIFEST, tmp / "hardening.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return out
