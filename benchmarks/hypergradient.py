"""Cost of the Moreau hypergradient: HVP / gradient, Moreau / first-order outer step, peak memory.

    python -m benchmarks.hypergradient [--model shapes-world|sd-v1.4] [--latent N] [--samples J]
                                       [--adapt-steps S] [--methods full lora] [--gamma G]
                                       [--solver richardson|cg] [--dtype float32|bfloat16] [--device cpu|cuda]

``shapes-world`` is the packaged world model; ``sd-v1.4`` is a UNet of SD v1.4's shape with
random weights (860M parameters) at a reduced latent size on CPU. All figures come from
one run on one model:

* ``hvp_fd_over_grad``: one one-sided finite-difference HVP / one gradient of the same loss, amortised
  the way the solver uses it (K products at theta*, sharing one base gradient: (K + 1) / K gradients).
* ``hvp_autograd_over_grad``: one double-backward HVP / one gradient, amortised the way the
  solver uses it (graph built once at theta*, K products); ``..._single`` = build + 1 product.
* ``hvp_fd_vs_autograd_cos``: cosine between the two products of the same vector.
* ``moreau_over_first_order_step``: outer-step seconds with K=5 Richardson (``--solver cg``: conjugate gradient
  with the same K - 1 products) / first-order, same seed, so the same J configurations and ADAPT runs. A
  back-off repeats the solve, so
  ``moreau_backoffs_per_sample`` says how many the timed steps needed (random weights need them), and
  ``moreau_products_per_sample`` how many HVPs a sample's solves cost (fewer than K - 1 after the
  residual stop, more when relaxations or back-offs repeat the solve).
* ``moreau_vs_exact_cos``: cosine of the solve the step uses (one-sided finite differences, residual stop)
  to the same system solved by the same solver with exact (autograd) products and all K steps (CG: all its
  K - 1 products), at the original weights.
* ``*_vs_unrolled_cos`` (shapes world only): for one SGD configuration, the cosine of the
  Moreau hypergradient (K=5), the Moreau hypergradient after a proximal ADAPT, and the
  first-order one to the exact unrolled hypergradient of that ADAPT run.
* ``resalign_over_finetune_peak_mem``: peak memory of one ResAlign outer step / one plain
  fine-tuning step of the same scope (customer-style LoRA step with AdamW). Each is
  measured in a fresh process: peak RSS (sampled every millisecond) minus the RSS before
  the model is built on CPU, ``torch.cuda.max_memory_allocated`` on a GPU. The step's own
  working memory (peak minus just before the step) is reported beside it.

Prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
import transformers

from alignment.adapt import Distribution
from alignment.config import AlignConfig, ObjectiveConfig, OuterConfig
from alignment.data import AlignmentData, DataConfig, EncodedSet
from alignment.functional import Batch, Denoiser, attention_weight_names, flat_dot, flat_norm
from alignment.hvp import AutogradHVP, FiniteDifferenceHVP, gradient
from alignment.hypergradient import HypergradientConfig
from alignment.losses import Draw, FineTuneBatch, finetune_loss
from alignment.outer import Aligner


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _build(args):
    """(unet, scheduler, text states width, latent shape) for the chosen model."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if args.model == "shapes-world":
        from auditing.models.denoising import training_scheduler
        from auditing.models.loading import load_pipeline
        from auditing.shapes.cli import PRETRAINED_WORLD

        pipe = load_pipeline(PRETRAINED_WORLD)
        unet, scheduler = pipe.unet, training_scheduler(pipe.scheduler.config)
        cond = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
        latent = unet.config.sample_size
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=args.latent, cross_attention_dim=768)  # SD v1.x defaults otherwise
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        cond, latent = (77, 768), args.latent
    unet = unet.to(device=args.device, dtype=getattr(torch, args.dtype))
    return unet, scheduler, cond, latent


def _data(args, cond, latent, n=16) -> AlignmentData:
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)

    def encoded(name):
        batch = Batch(torch.randn(n, 4, latent, latent, generator=gen).to(args.device, dtype),
                      torch.randn(n, *cond, generator=gen).to(args.device, dtype))
        return EncodedSet(batch, ("",) * n, {"name": name})

    return AlignmentData(encoded("harmful"), encoded("preservation"), encoded("finetune"))


def _config(args, method: str) -> AlignConfig:
    return AlignConfig(
        model="benchmark", output="none", seed=0,
        data=DataConfig("h", "p", "f", batch_size=args.batch_size),
        # Unbounded: a bound clips random weights' large losses to a zero gradient, and a zero
        # right-hand side makes the Richardson solve free (every product of 0 is skipped).
        objective=ObjectiveConfig(harm="ga"),
        outer=OuterConfig(steps=100, samples=args.samples, scope="attention-lora"),
        hypergradient=HypergradientConfig(method=method, hvp="finite-difference", richardson_steps=5,
                                          gamma=args.gamma, solver=args.solver),
        distribution=Distribution(learning_rates=(1e-5,), steps=(args.adapt_steps,), batch_sizes=(args.batch_size,),
                                  losses=("standard",), methods=tuple(args.methods), optimizers=("adam",)),
    )


def _aligner(args, method):
    unet, scheduler, cond, latent = _build(args)
    return Aligner(SimpleNamespace(unet=unet, scheduler=scheduler), _data(args, cond, latent), _config(args, method))


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


class PeakSampler:
    """Peak memory while a block runs: CUDA's allocator counters, or RSS sampled every millisecond on CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2 ** 20
        else:
            self.before = _rss_mb()
            self.peak = self.before
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_mb())


def measure_memory(args, kind: str) -> dict:
    """Memory of one step of ``kind`` (``resalign`` or ``finetune``), in this fresh process.

    ``total``: peak minus what the process held before the model was built (weights, data,
    optimiser state and the step's working memory); ``step``: peak minus what it held just
    before the step.
    """
    start = 0.0 if args.device == "cuda" else _rss_mb()
    aligner = _aligner(args, "moreau")
    if kind == "resalign":
        step = aligner.step
    else:
        batch = FineTuneBatch(aligner.data.finetune.batch.take(torch.arange(args.batch_size)),
                              Draw.sample(aligner.scheduler, aligner.data.finetune.batch.latents[:args.batch_size],
                                          torch.Generator().manual_seed(0)))

        def step():
            aligner.optimizer.zero_grad()
            finetune_loss(aligner.model, aligner.theta(), batch).backward()
            aligner.optimizer.step()
    with PeakSampler(args.device) as sampler:
        step()
    return {"total_mb": sampler.peak - start, "step_mb": sampler.peak - sampler.before}


def solve_vs_exact(model, theta, data, scheduler, loss, args) -> float:
    """Cosine of the step's solve (its config: one-sided differences, residual stop) to exact products, all K."""
    from alignment.hypergradient import solve
    from alignment.losses import HarmLoss

    harm_batch = data.harmful.batch.take(torch.arange(args.batch_size))
    harm_draw = Draw.sample(scheduler, harm_batch.latents, torch.Generator().manual_seed(3))
    _, g = gradient(lambda p: HarmLoss("ga")(model, p, {}, harm_batch, harm_draw), theta)
    config = _config(args, "moreau").hypergradient
    ours = solve(FiniteDifferenceHVP(loss, theta), g, config).x
    exact = solve(AutogradHVP(loss, theta), g, replace(config, hvp="autograd", residual_tol=0)).x
    return float(flat_dot(ours, exact) / (flat_norm(ours) * flat_norm(exact)))


def compare_with_unrolled(model, theta, data, scheduler, args) -> dict:
    """Cosines to the unrolled hypergradient, with and without the proximal term in ADAPT."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from alignment.adapt import FineTuneConfig, adapt
    from alignment.hypergradient import solve
    from alignment.losses import HarmLoss

    gen = torch.Generator().manual_seed(2)
    n = args.batch_size
    batches = [FineTuneBatch(data.finetune.batch.take(torch.randperm(16, generator=gen)[:n]), None)
               for _ in range(args.adapt_steps)]
    batches = [FineTuneBatch(b.data, Draw.sample(scheduler, b.data.latents, gen)) for b in batches]
    harm_batch = data.harmful.batch.take(torch.arange(n))
    harm_draw = Draw.sample(scheduler, harm_batch.latents, gen)
    harm = HarmLoss("ga", 1.0)
    config = FineTuneConfig(optimizer="sgd", learning_rate=args.compare_lr, steps=args.adapt_steps, method="full")
    gamma = args.compare_lr * args.adapt_steps  # k SGD steps of size lr ~ one proximal step of size k * lr

    def loss_at(p, step):
        return finetune_loss(model, p, batches[step])

    def harm_at(p):
        return harm(model, p, {}, harm_batch, harm_draw)

    leaves = {k: t.clone().requires_grad_() for k, t in theta.items()}
    with sdpa_kernel(SDPBackend.MATH):
        star = adapt(leaves, loss_at, config, gen, differentiable=True)
        unrolled = dict(zip(leaves, torch.autograd.grad(harm_at(star), list(leaves.values()))))
    out = {"compare_config": {**config.as_dict(), "gamma": gamma}}
    for name, prox in (("moreau", None), ("moreau_proximal", gamma)):
        star = adapt(theta, loss_at, config, gen, proximal_gamma=prox)
        _, g = gradient(harm_at, star)
        x = solve(FiniteDifferenceHVP(lambda p: finetune_loss(model, p, batches[-1]), star), g,
                  HypergradientConfig(gamma=gamma, solver=args.solver)).x
        out[f"{name}_vs_unrolled_cos"] = round(float(flat_dot(x, unrolled) / (flat_norm(x) * flat_norm(unrolled))), 6)
        if name == "moreau":
            cos_g = flat_dot(g, unrolled) / (flat_norm(g) * flat_norm(unrolled))
            out["first_order_vs_unrolled_cos"] = round(float(cos_g), 6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("shapes-world", "sd-v1.4"), default="shapes-world")
    parser.add_argument("--latent", type=int, default=16, help="latent side for sd-v1.4 (64 = 512 px)")
    parser.add_argument("--samples", type=int, default=3, help="J configurations per outer step")
    parser.add_argument("--adapt-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=("full", "lora"), default=["full", "lora"],
                        help="pi(C)'s methods; a full configuration simulates a fine-tune of every weight "
                             "(on sd-v1.4 that is several 3.4 GB copies: about 20 GB of RAM)")
    parser.add_argument("--gamma", type=float, default=1.0,
                        help="the Moreau model's gamma (1: the config default; the ADAPT's lr x steps models it)")
    parser.add_argument("--solver", choices=("richardson", "cg"), default="richardson",
                        help="the Moreau solve (cg: conjugate gradient with the same K - 1 products)")
    parser.add_argument("--compare-lr", type=float, default=1e-2, help="SGD learning rate of the unrolled comparison")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure-memory", choices=("resalign", "finetune"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if args.measure_memory:
        print(json.dumps(measure_memory(args, args.measure_memory)))
        return

    unet, scheduler, cond, latent = _build(args)
    model = Denoiser(unet)
    data = _data(args, cond, latent)
    draw = Draw.sample(scheduler, data.finetune.batch.latents[:args.batch_size], torch.Generator().manual_seed(1))
    ft = FineTuneBatch(data.finetune.batch.take(torch.arange(args.batch_size)), draw)
    theta = model.original(attention_weight_names(unet))

    def loss(p):
        return finetune_loss(model, p, ft)

    grad_s, (_, g) = _timed(lambda: gradient(loss, theta), args.repeats)
    k = 5

    def fd_k():
        op = FiniteDifferenceHVP(loss, theta)
        return [op(g) for _ in range(k)][0]

    fd_k_s, fd_v = _timed(fd_k, args.repeats)

    def autograd_k():
        op = AutogradHVP(loss, theta)
        return [op(g) for _ in range(k)][0]

    ag_k_s, ag_v = _timed(autograd_k, args.repeats)
    ag_1_s, _ = _timed(lambda: AutogradHVP(loss, theta)(g), args.repeats)
    cos = float(flat_dot(fd_v, ag_v) / (flat_norm(fd_v) * flat_norm(ag_v)))
    exact_cos = solve_vs_exact(model, theta, data, scheduler, loss, args)
    unrolled = compare_with_unrolled(model, theta, data, scheduler, args) if args.model == "shapes-world" else {}

    steps, samples = {}, {}
    for method in ("moreau", "first-order"):
        aligner = _aligner(args, method)
        aligner.step()  # warm-up
        records = []
        steps[method], _ = _timed(lambda step=aligner.step: records.append(step()), args.repeats)
        samples[method] = [sample for record in records for sample in record["samples"]]
        if any(sample["hypergradient_norm"] == 0.0 for sample in samples[method]):
            raise SystemExit(f"{method}: a sample's hypergradient is zero, so its step time measures no solve")
        del aligner

    peaks = {}
    for kind in ("resalign", "finetune"):
        cmd = [sys.executable, "-m", "benchmarks.hypergradient", "--measure-memory", kind]
        for flag in ("model", "latent", "samples", "adapt_steps", "batch_size", "gamma", "solver", "dtype", "device"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--methods", *args.methods]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[kind] = json.loads(out)

    print(json.dumps({
        "benchmark": "hypergradient", "model": args.model if args.model == "shapes-world"
        else f"sd-v1.4-shaped UNet, random weights, {args.latent}x{args.latent} latents",
        "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size, "samples_J": args.samples,
        "adapt_steps": args.adapt_steps, "methods": args.methods, "richardson_K": k, "gamma": args.gamma,
        "solver": args.solver,
        "scope": "attention-lora",
        "gradient_s": round(grad_s, 4),
        "hvp_fd_over_grad": round(fd_k_s / k / grad_s, 3),
        "hvp_autograd_over_grad": round(ag_k_s / k / grad_s, 3),
        "hvp_autograd_over_grad_single": round(ag_1_s / grad_s, 3),
        "hvp_fd_vs_autograd_cos": round(cos, 6),
        "moreau_step_s": round(steps["moreau"], 3), "first_order_step_s": round(steps["first-order"], 3),
        "moreau_over_first_order_step": round(steps["moreau"] / steps["first-order"], 3),
        "moreau_backoffs_per_sample": round(statistics.fmean(len(s["backoffs"]) for s in samples["moreau"]), 3),
        "moreau_products_per_sample": round(statistics.fmean(s["products"] for s in samples["moreau"]), 3),
        "moreau_vs_exact_cos": round(exact_cos, 6),
        "resalign_peak_mb": round(peaks["resalign"]["total_mb"], 1),
        "finetune_peak_mb": round(peaks["finetune"]["total_mb"], 1),
        "resalign_over_finetune_peak_mem": round(peaks["resalign"]["total_mb"] / peaks["finetune"]["total_mb"], 3),
        "resalign_step_working_mb": round(peaks["resalign"]["step_mb"], 1),
        "finetune_step_working_mb": round(peaks["finetune"]["step_mb"], 1),
        **unrolled,
    }))


if __name__ == "__main__":
    main()
