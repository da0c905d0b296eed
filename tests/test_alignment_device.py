"""Hardening on the configured device and precision: HVPs under autocast, checkpointing, the composed gradient."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from alignment.config import config_from_mapping
from alignment.data import AlignmentData, EncodedSet
from alignment.functional import Batch, Denoiser, attention_weight_names, flat_dot, flat_norm, lora_merge
from alignment.hvp import FD_EPSILON, AutogradHVP, FiniteDifferenceHVP
from alignment.losses import Draw, FineTuneBatch, finetune_loss, preservation_loss
from alignment.outer import Aligner, peak_memory_mb
from auditing.models.tiny import TinySpec, build_tiny_pipeline


def cosine(a: dict, b: dict) -> float:
    return float(flat_dot(a, b) / (flat_norm(a) * flat_norm(b)))


def _batch(pipe, n, seed):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=gen)
    cond = torch.randn(n, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=gen)
    return Batch(latents, cond), gen


@pytest.fixture(scope="module")
def problem():
    pipe = build_tiny_pipeline(TinySpec(sample_size=8), seed=0)
    batch, gen = _batch(pipe, 4, 0)
    ft = FineTuneBatch(batch, Draw.sample(pipe.scheduler, batch.latents, gen))
    names = attention_weight_names(pipe.unet)
    model = Denoiser(pipe.unet)
    theta = model.original(names)
    v = {k: torch.randn(t.shape, generator=gen) for k, t in theta.items()}
    exact = AutogradHVP(lambda p: finetune_loss(model, p, ft), theta)(v)
    return pipe, ft, theta, v, exact


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finite_difference_hvp_under_autocast_matches_the_fp32_autograd_hvp(problem, precision):
    pipe, ft, theta, v, exact = problem
    model = Denoiser(pipe.unet, precision)
    approx = FiniteDifferenceHVP(lambda p: finetune_loss(model, p, ft), theta, FD_EPSILON[precision])(v)
    at_fp32_epsilon = FiniteDifferenceHVP(lambda p: finetune_loss(model, p, ft), theta, FD_EPSILON["fp32"])(v)
    print(f"{precision}: cosine {cosine(exact, approx):.4f} at its epsilon, "
          f"{cosine(exact, at_fp32_epsilon):.4f} at fp32's")
    assert cosine(exact, approx) >= 0.99
    if precision == "bf16":  # the fp32 epsilon is rounded away: the precision's own one is needed
        assert cosine(exact, at_fp32_epsilon) < 0.9


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_checkpointing_recomputes_with_the_perturbed_weights(problem):
    pipe, ft, theta, v, exact = problem
    plain = Denoiser(pipe.unet)
    checkpointed = Denoiser(build_tiny_pipeline(TinySpec(sample_size=8), seed=0).unet, checkpointing=True)
    kept = {name: _saved_bytes(lambda m=m: finetune_loss(m, {k: t.requires_grad_() for k, t in
                                                           {k: t.clone() for k, t in theta.items()}.items()}, ft))
            for name, m in (("plain", plain), ("checkpointed", checkpointed))}
    assert kept["checkpointed"] < kept["plain"] / 2, kept  # the blocks' activations are recomputed, not kept
    with_ckpt = FiniteDifferenceHVP(lambda p: finetune_loss(checkpointed, p, ft), theta)(v)
    without = FiniteDifferenceHVP(lambda p: finetune_loss(plain, p, ft), theta)(v)
    # the HVP is of differences of gradients at theta +- r v: a recomputation at the original weights
    # would make both gradients equal and the product zero
    assert float(flat_norm({k: with_ckpt[k] - without[k] for k in v}) / flat_norm(without)) < 1e-4
    assert cosine(with_ckpt, exact) >= 0.99


def test_peak_memory_reports_the_device_used(problem):
    assert peak_memory_mb(torch.device("cpu")) > 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        x = torch.empty(2 ** 20, device="cuda")
        assert peak_memory_mb(torch.device("cuda")) >= 4
        del x


@pytest.mark.parametrize("field, value, message", [
    ("device", "gpu", r"^device must match pattern '\^\(auto\|cpu\|cuda\(:\\d\+\)\?\)\$' \(got 'gpu'\)"),
    ("device", "cuda:", r"^device must match pattern .* \(got 'cuda:'\)"),
    ("precision", "fp8", r"^precision must be 'fp32', 'bf16' or 'fp16' \(got 'fp8'\)"),
])
def test_device_and_precision_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_mapping({"model": "m", "output": "o", "data": {"harmful": "h", "preservation": "p",
                                                                   "finetune": "f"}, field: value})


def test_auto_device_is_cuda_when_there_is_one():
    config = config_from_mapping({"model": "m", "output": "o", "data": {"harmful": "h", "preservation": "p",
                                                                        "finetune": "f"}})
    assert config.device == "auto" and config.precision == "fp32"
    assert config.torch_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="needs a CUDA index this machine lacks")
def test_an_absent_cuda_device_is_an_error_naming_the_field():
    config = config_from_mapping({"model": "m", "output": "o", "device": "cuda:3",
                                  "data": {"harmful": "h", "preservation": "p", "finetune": "f"}})
    with pytest.raises(ValueError, match=r"device 'cuda:3': no such CUDA device on this machine"):
        config.torch_device()


def test_composed_outer_gradient_equals_autograd_of_the_objective():
    """The leaves' gradient is d/d(leaves) of (1-beta) L_harm(theta) + alpha R(theta) + beta L_harm(ADAPT(theta)),
    with ADAPT a full fine-tune of every UNet parameter, theta the LoRA-merged scope."""
    pipe = build_tiny_pipeline(TinySpec(sample_size=8), seed=0)
    sets = {name: EncodedSet(_batch(pipe, 4, seed)[0], ("p",) * 4, {}) for seed, name in
            enumerate(("harmful", "preservation", "finetune"))}
    config = config_from_mapping({
        "model": "m", "output": "o", "seed": 3,
        "data": {"harmful": "h", "preservation": "p", "finetune": "f", "batch_size": 2},
        "objective": {"harm": "ga", "harm_bound": 5.0, "alpha": 0.7, "beta": 0.8},
        "outer": {"samples": 1, "clip_norm": None, "lora_rank": 2},
        "hypergradient": {"method": "unrolled"},
        "distribution": {"learning_rates": [1e-2], "steps": [2], "losses": ["standard"], "methods": ["full"],
                         "optimizers": ["sgd"], "batch_sizes": [2], "max_lr_steps": 1.0}})
    aligner = Aligner(pipe, AlignmentData(**sets), config)
    with torch.no_grad():  # B != 0, so the merge's chain rule reaches A as well
        for k, t in aligner.leaves.items():
            t.add_(0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(k))))
    leaves0 = {k: t.detach().clone() for k, t in aligner.leaves.items()}
    rng, gen = aligner.rng.getstate(), aligner.generator.get_state()
    aligner.step()

    aligner.rng.setstate(rng)
    aligner.generator.set_state(gen)
    harm_batch, harm_draw = aligner._batch(aligner.data.harmful, 2)
    pres_batch, pres_draw = aligner._batch(aligner.data.preservation, 2)
    ft_config = config.distribution.sample(aligner.rng)
    batches = [aligner._finetune_batch(ft_config) for _ in range(ft_config.steps)]
    leaves = {k: t.clone().requires_grad_() for k, t in leaves0.items()}
    theta = lora_merge(aligner.base, leaves, 1.0)
    everything = {**{n: p.detach().clone().requires_grad_() for n, p in pipe.unet.named_parameters()}, **theta}
    model, harm = aligner.model, aligner.harm
    with sdpa_kernel(SDPBackend.MATH):  # double backward through ADAPT
        star = everything
        for b in batches:  # ADAPT: plain SGD on every parameter, on the tape
            loss = finetune_loss(model, star, b)
            grads = torch.autograd.grad(loss, [star[k] for k in star if star[k].requires_grad], create_graph=True)
            trainable = [k for k in star if star[k].requires_grad]
            star = {**star, **{k: star[k] - 1e-2 * g for k, g in zip(trainable, grads)}}
            star = {k: t if t.requires_grad else t.clone().requires_grad_() for k, t in star.items()}
        objective = (0.2 * harm(model, theta, {}, harm_batch, harm_draw)
                     + 0.7 * preservation_loss(model, theta, {}, pres_batch, pres_draw)
                     + 0.8 * harm(model, star, {}, harm_batch, harm_draw))
        expected = dict(zip(leaves, torch.autograd.grad(objective, list(leaves.values()))))
    got = {k: t.grad for k, t in aligner.leaves.items()}
    for k in expected:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-7), k
