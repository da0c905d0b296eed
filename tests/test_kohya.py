"""A LoRA in kohya's key format audits exactly like the same LoRA in diffusers' format.

Customers bring adapters from kohya's sd-scripts as often as from diffusers. The renderer
loads either through ``load_adapter`` (diffusers converts kohya keys); this test converts a
diffusers-format LoRA built on a tiny pipeline into kohya keys by kohya's own naming and
checks both files give the same pixels, and pixels unlike the base model's.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from auditing.models.loading import load_adapter
from auditing.models.tiny import build_tiny_pipeline
from auditing.render import render_batch

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_"}
SIDES = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}


def to_kohya(diffusers_lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/peft keys (``unet.<module>.lora_A.weight``) -> kohya keys
    (``lora_unet_<module with _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``)."""
    out = {}
    for key, value in diffusers_lora.items():
        prefix = next(p for p in PREFIXES if key.startswith(p))
        module, _, kind = key.removeprefix(prefix).rpartition(".lora_")
        if prefix == "text_encoder." and not module.startswith("text_model."):
            module = "text_model." + module  # kohya names CLIP modules as transformers 4 did
        name = PREFIXES[prefix] + module.replace(".", "_")
        out[f"{name}.{SIDES[kind]}"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    images = render_batch(pipe, ["a red triangle", "a blue circle"], [0, 1], guidance_scale=3.0, inference_steps=2)
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def test_kohya_and_diffusers_files_render_alike(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    base = _render(pipe)
    torch.manual_seed(1)  # random (not zero) LoRA weights, so the adapter changes the pictures
    # alpha = rank, as our training and diffusers' file (which keeps no alpha) assume
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_TARGETS, init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TEXT_TARGETS,
                                             init_lora_weights=False))
    tuned = _render(pipe)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                                              safe_serialization=True)
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"
    kohya = to_kohya(load_file(diffusers_file), alpha=RANK)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    save_file(kohya, tmp_path / "kohya.safetensors")
    # kohya scales by alpha / rank: twice the alpha with half the up weights is the same adapter.
    rescaled = {k: v / 2 if k.endswith("lora_up.weight") else v for k, v in to_kohya(load_file(diffusers_file),
                                                                                     alpha=2 * RANK).items()}
    save_file(rescaled, tmp_path / "kohya-alpha.safetensors")

    from_diffusers = _render(load_adapter(build_tiny_pipeline(seed=0), diffusers_file))
    np.testing.assert_allclose(from_diffusers, tuned, rtol=0, atol=1.0)  # 8-bit pixels: at most one level off
    for name in ("kohya.safetensors", "kohya-alpha.safetensors"):
        from_kohya = _render(load_adapter(build_tiny_pipeline(seed=0), tmp_path / name))
        np.testing.assert_allclose(from_kohya, from_diffusers, rtol=0, atol=1.0, err_msg=name)
    assert np.abs(from_diffusers - base).mean() > 3.0  # and the adapter is really applied (measured: 6.2)
