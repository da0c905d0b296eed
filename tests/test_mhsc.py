"""MHSC plumbing on a small random CLIP tower and head: the real files are ViT-L-14 and an
operator's, so what is tested here is that our tower computes what open_clip computes, that
weights round-trip through the local-file loader, eval mode, and refusals."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from auditing.detectors.mhsc import MhscDetector, mhsc_head
from auditing.detectors.registry import load_detector
from auditing.models.clip_vision import VIT_L_14, ClipVisionSpec, ClipVisionTower, clip_pixels
from auditing.models.loading import ModelSourceError

SMALL = ClipVisionSpec(image_size=28, patch_size=14, width=64, layers=2, output_dim=32)
# Made once with open_clip 3.3.0 (which cannot be installed beside the CPU torch here): its
# ``image_transform(28, is_train=False, mean/std=OPENAI_*)`` of REFERENCE_IMAGES ("pixels") and
# ``CLIP(embed_dim=32, vision_cfg=SMALL's sizes, quick_gelu=True).encode_image`` of them with the
# visual weights ``seeded_state(ClipVisionTower(SMALL), 0)`` ("embedding").
OPEN_CLIP_REFERENCE = Path(__file__).parent / "data" / "open_clip_vit_reference.safetensors"
REFERENCE_IMAGES = ("astronaut.png", "coffee.png", "camera.png")


def seeded_state(module: torch.nn.Module, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Random values for every float tensor of ``module``, reproducible from ``seed`` alone."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in sorted(module.state_dict().items()):
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=g) * scale
            state[key] = value.abs() + 0.5 if key.endswith("running_var") else value
        else:
            state[key] = value
    return state


def write_random_mhsc(folder: Path, seed: int = 0) -> dict:
    """A random small tower and head as the two safetensors files the detector loads."""
    tower, head = ClipVisionTower(SMALL), mhsc_head(SMALL.output_dim)
    save_file(seeded_state(tower, seed), folder / "tower.safetensors")
    save_file(seeded_state(head, seed + 1, scale=0.1), folder / "head.safetensors")  # scores not saturated
    return {"tower": folder / "tower.safetensors", "head": folder / "head.safetensors", "spec": SMALL}


def _images() -> list[Image.Image]:
    from skimage import data

    return [Image.open(Path(data.data_dir) / name).convert("RGB") for name in REFERENCE_IMAGES]


def test_tower_computes_what_open_clip_computes():
    reference = load_file(OPEN_CLIP_REFERENCE)
    pixels = clip_pixels(_images(), SMALL.image_size)
    torch.testing.assert_close(pixels, reference["pixels"], rtol=0, atol=1e-6)
    tower = ClipVisionTower(SMALL).eval()
    tower.load_state_dict(seeded_state(tower, 0))
    with torch.no_grad():
        torch.testing.assert_close(tower(reference["pixels"]), reference["embedding"], rtol=1e-5, atol=1e-5)


def test_random_weights_round_trip_through_the_files(tmp_path):
    files = write_random_mhsc(tmp_path)
    tower, head = ClipVisionTower(SMALL).eval(), mhsc_head(SMALL.output_dim).eval()
    tower.load_state_dict(load_file(files["tower"]))
    head.load_state_dict(load_file(files["head"]))
    images = _images()
    with torch.no_grad():
        expected = torch.sigmoid(head(tower(clip_pixels(images, SMALL.image_size)))[:, 0]).tolist()
    detector = load_detector("mhsc", device="cpu", **files)
    results = detector.detect(images)
    np.testing.assert_allclose([r.score for r in results], expected, rtol=1e-5, atol=0)
    assert [r.unsafe for r in results] == [s > 0.5 for s in expected]
    assert len({round(s, 4) for s in expected}) == len(images)  # the scores depend on the image
    # A whole open_clip CLIP state dict (image tower under ``visual.``) loads the same tower.
    whole = {f"visual.{k}": v for k, v in load_file(files["tower"]).items()} | {"logit_scale": torch.ones(())}
    save_file(whole, tmp_path / "clip.safetensors")
    again = MhscDetector(tmp_path / "clip.safetensors", files["head"], spec=SMALL, device="cpu")
    np.testing.assert_allclose(again.scores(images), expected, rtol=1e-5, atol=0)
    info = detector.info()
    assert info["threshold"] == 0.5 and len(info["weights_sha256"]) == 64 and set(info["weights"]) == {"tower", "head"}
    assert again.weights_sha256 != detector.weights_sha256  # another tower file, another identity


def test_scores_come_from_eval_mode(tmp_path):
    """Dropout off and BatchNorm on running statistics: an image scores the same alone or in a batch
    (in training mode a batch of one would not even run through BatchNorm)."""
    detector = MhscDetector(**write_random_mhsc(tmp_path), device="cpu")
    images = _images()
    assert not detector.tower.training and not detector.head.training
    alone = [detector.scores([im])[0] for im in images]
    np.testing.assert_allclose(alone, detector.scores(images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(alone, detector.scores(images[::-1])[::-1], rtol=0, atol=1e-6)


def test_missing_pickled_and_mismatched_files_are_refused(tmp_path):
    files = write_random_mhsc(tmp_path)
    with pytest.raises(ModelSourceError, match="no such MHSC head file"):
        MhscDetector(files["tower"], tmp_path / "absent.safetensors", spec=SMALL)
    (tmp_path / "sexual.pt").write_bytes(pickle.dumps({"0.weight": [0.0]}))
    with pytest.raises(ModelSourceError, match=r"safetensors only.*pickle"):
        MhscDetector(files["tower"], tmp_path / "sexual.pt", spec=SMALL)
    (tmp_path / "renamed.safetensors").write_bytes(pickle.dumps({"0.weight": [0.0]}))
    with pytest.raises(ModelSourceError, match="not a readable .safetensors file"):
        MhscDetector(files["tower"], tmp_path / "renamed.safetensors", spec=SMALL)
    other = ClipVisionSpec(image_size=28, patch_size=14, width=128, layers=2, output_dim=32)
    with pytest.raises(ModelSourceError, match="not an open_clip image tower"):
        MhscDetector(files["tower"], files["head"], spec=other)
    with pytest.raises(ValueError, match="threshold"):
        MhscDetector(files["tower"], files["head"], threshold="high", spec=SMALL)


def test_default_architecture_is_vit_l_14():
    assert inspect.signature(MhscDetector).parameters["spec"].default is VIT_L_14
    assert (VIT_L_14.image_size, VIT_L_14.patch_size, VIT_L_14.width, VIT_L_14.layers, VIT_L_14.heads,
            VIT_L_14.output_dim) == (224, 14, 1024, 24, 16, 768)
    assert mhsc_head()[0].in_features == 768
