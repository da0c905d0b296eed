"""The shared model layer: tiny pipelines, local loading, hashing, denoising targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from auditing.models.denoising import add_noise, denoising_loss, min_snr_weights
from auditing.models.hashing import weights_sha256
from auditing.models.loading import ModelSourceError, load_pipeline
from auditing.models.tiny import TinySpec, build_tiny_pipeline


def _render(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red triangle", "a blue circle"], num_inference_steps=2, guidance_scale=3.0,
                generator=[torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)],
                output_type="np").images


@pytest.mark.parametrize("family,cls", [("sd1", StableDiffusionPipeline), ("sd2", StableDiffusionPipeline),
                                        ("sdxl", StableDiffusionXLPipeline)])
def test_tiny_round_trip_renders_identically(tmp_path, family, cls):
    pipe = build_tiny_pipeline(TinySpec(family=family), seed=3)
    before = _render(pipe)
    pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(tmp_path / "model")
    assert type(loaded) is cls
    # Same up to float rounding (kernels may pick another summation order after a reload).
    np.testing.assert_allclose(before, _render(loaded), atol=1e-5, rtol=0)
    assert not np.array_equal(before, _render(loaded, seed=7)), "seed must matter"


def test_tiny_families_differ_where_real_ones_do():
    sd2 = build_tiny_pipeline(TinySpec(family="sd2"))
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.unet.config.use_linear_projection
    xl = build_tiny_pipeline(TinySpec(family="sdxl"))
    assert xl.text_encoder_2 is not None
    assert xl.unet.config.addition_embed_type == "text_time"


def test_same_seed_same_weights():
    a = build_tiny_pipeline(seed=1).unet.state_dict()
    b = build_tiny_pipeline(seed=1).unet.state_dict()
    c = build_tiny_pipeline(seed=2).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_plain_diffusers_loads_tiny_folder_offline(tmp_path):
    build_tiny_pipeline().save_pretrained(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert pipe.tokenizer("a red triangle").input_ids[1] != pipe.tokenizer.unk_token_id


def test_hash_tracks_weights_not_location(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "a")
    pipe.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "notes.json").write_text("{}")  # records beside the model are not weights
    save_file({"w": torch.zeros(2)}, tmp_path / "b" / "v1-5-pruned.safetensors")  # a checkpoint it never loads
    (tmp_path / "b" / "logs").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "b" / "logs" / "ema.safetensors")  # no component of the pipeline
    assert weights_sha256(tmp_path / "a") == weights_sha256(tmp_path / "b")
    weights = tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = next(iter(state))
    state[key] = state[key] + 1e-3
    save_file(state, weights)
    assert weights_sha256(tmp_path / "a") != weights_sha256(tmp_path / "b")
    assert len(weights_sha256(weights)) == 64


def test_hash_cache_reads_a_file_once_per_change(tmp_path, monkeypatch):
    import auditing.models.hashing as hashing

    build_tiny_pipeline().save_pretrained(tmp_path / "m")
    reads = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    cache = hashing.HashCache(tmp_path / "cache.json")
    first = weights_sha256(tmp_path / "m", cache)
    n = len(reads)
    assert first == weights_sha256(tmp_path / "m") and n > 0
    reads.clear()
    assert weights_sha256(tmp_path / "m", hashing.HashCache(tmp_path / "cache.json")) == first and reads == []
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = next(iter(state))
    state[key] = state[key] + 1e-3  # same size, new content and mtime
    save_file(state, weights)
    changed = weights_sha256(tmp_path / "m", cache)
    assert changed != first and reads == [weights]
    reads.clear()
    stale = hashing.HashCache(tmp_path / "cache.json", max_age_s=0)  # past its age every entry is read again
    assert weights_sha256(tmp_path / "m", stale) == changed and len(reads) == n


def test_loader_refuses_pickles_and_missing_configs(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(ModelSourceError, match="pickle"):
        load_pipeline(ckpt)
    single = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, single)
    with pytest.raises(ModelSourceError, match="config"):
        load_pipeline(single)
    with pytest.raises(ModelSourceError, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(ModelSourceError, match="no such"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ModelSourceError, match="model_index.json"):
        load_pipeline(single, config=tmp_path)


def test_loader_never_unpickles_bin_weights(tmp_path):
    """A folder holding only .bin weights is refused rather than unpickled."""
    build_tiny_pipeline().save_pretrained(tmp_path, safe_serialization=False)
    assert list(tmp_path.rglob("*.bin"))
    with pytest.raises(Exception):
        load_pipeline(tmp_path)


def _scheduler(kind):
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=kind)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_follows_prediction_type(kind):
    sched = _scheduler(kind)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 500, 999])
    batch = add_noise(sched, x0, timesteps=t, noise=noise)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, a * x0 + s * noise)
    expected = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[kind]
    torch.testing.assert_close(batch.target, expected)


def test_denoising_rejects_unknown_prediction_type():
    sched = _scheduler("epsilon")
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        add_noise(sched, torch.zeros(1, 4, 8, 8))


def test_denoising_loss_is_float32_mse():
    pred = torch.ones(2, 4, 2, 2, dtype=torch.bfloat16)
    target = torch.zeros(2, 4, 2, 2)
    loss = denoising_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.item() == 1.0
    assert denoising_loss(pred, target, reduction="none").shape == (2,)


@pytest.mark.parametrize("spec", [TinySpec(), TinySpec(layers_per_block=2, unet_channels=(32, 64, 64))])
def test_single_file_checkpoint_round_trip(tmp_path, spec):
    """Our LDM-layout export is what diffusers' single-file loader reads back, weight for weight."""
    from auditing.models.single_file import export_single_file

    pipe = build_tiny_pipeline(spec, seed=4)
    pipe.save_pretrained(tmp_path / "config")
    export_single_file(pipe, tmp_path / "model.safetensors")
    loaded = load_pipeline(tmp_path / "model.safetensors", config=tmp_path / "config")
    assert type(loaded) is StableDiffusionPipeline
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key].reshape(ours[key].shape)), (name, key)
    np.testing.assert_allclose(_render(pipe), _render(loaded), atol=1e-5, rtol=0)


def test_single_file_export_refuses_other_families(tmp_path):
    from auditing.models.single_file import export_single_file

    with pytest.raises(ValueError, match="SD 1.x"):
        export_single_file(build_tiny_pipeline(TinySpec(family="sdxl")), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=".safetensors only"):
        export_single_file(build_tiny_pipeline(), tmp_path / "x.ckpt")


def test_min_snr_weights_clip_only_the_easy_timesteps():
    t = torch.tensor([0, 100, 500, 999])
    snr = _scheduler("epsilon").alphas_cumprod[t] / (1 - _scheduler("epsilon").alphas_cumprod[t])
    eps = min_snr_weights(_scheduler("epsilon"), t, gamma=5.0)
    torch.testing.assert_close(eps, snr.clamp(max=5.0) / snr)
    assert eps[0] < 0.01 and eps[-1] == 1.0  # near-clean steps damped, noisy ones untouched
    v = min_snr_weights(_scheduler("v_prediction"), t, gamma=5.0)
    torch.testing.assert_close(v, snr.clamp(max=5.0) / (snr + 1))
    weighted = denoising_loss(torch.ones(4, 1), torch.zeros(4, 1), weights=eps)
    torch.testing.assert_close(weighted, eps.mean())


def test_lora_adapter_loads_from_safetensors_and_changes_the_render(tmp_path):
    """A peft LoRA saved in diffusers' layout applies through load_adapter; pickles are refused."""
    from peft import LoraConfig, get_peft_model_state_dict

    from auditing.models.loading import load_adapter

    pipe = build_tiny_pipeline(seed=0)
    base = _render(pipe)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    tuned = _render(pipe)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    adapter = tmp_path / "pytorch_lora_weights.safetensors"
    assert adapter.is_file()
    fresh = load_adapter(build_tiny_pipeline(seed=0), adapter)
    assert not any("lora" in name for name, _ in fresh.unet.named_parameters())  # fused into the base weights
    np.testing.assert_allclose(_render(fresh), tuned, atol=1e-5, rtol=0)
    assert np.abs(tuned - base).max() > 1e-3
    np.testing.assert_allclose(_render(load_adapter(build_tiny_pipeline(seed=0), adapter, scale=0.0)), base,
                               atol=1e-5, rtol=0)  # the scale reaches the fused weights
    doubled = _render(load_adapter(build_tiny_pipeline(seed=0), adapter, scale=2.0))
    assert np.abs(doubled - tuned).max() > 1e-3
    (tmp_path / "adapter.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=".safetensors only"):
        load_adapter(build_tiny_pipeline(), tmp_path / "adapter.bin")
