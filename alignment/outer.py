"""Algorithm 2: the outer loop that meta-learns resilience over fine-tuning configurations.

Each outer step:
  1. L_harm(theta) and R(theta) on a harmful and a preservation batch;
  2. for j = 1..J: draw C ~ pi(C) and fine-tuning batches, theta*_j = ADAPT(theta, D, C),
     and the hypergradient x_j of L_harm(theta*_j) (Moreau / first-order / unrolled); a "full"
     configuration fine-tunes every UNet parameter, and x_j is the scope's part of its solution;
     each sample's drift ||theta*_j - theta|| / ||theta|| over the weights ADAPT trained is recorded;
  3. the gradient of Eq. 3 with the first-order meta approximation,
     ``(1 - beta) grad L_harm(theta) + alpha grad R(theta) + (beta / J) sum_j x_j``,
     pushed through the scope (for attention-LoRA, through the merge into the weights);
  4. gradient clipping and one AdamW step.

Beyond the paper, each off by default (docs/alignment.md): ``outer.min_drift`` rejects a sample whose drift
is below it before any solve and redraws it; ``distribution.sampling = "stratified"`` cycles through the
(optimizer, method) classes of pi(C); ``outer.aggregation = "cvar"`` averages step 3's x_j (and the objective's
L_harm(theta*_j)) over the worst ``cvar_fraction`` of the J samples by L_harm(theta*_j) instead of all of them;
``hypergradient.method = "random-perturbation"`` is the control that replaces theta* by theta plus an isotropic
step of the same length.

All randomness comes from one torch generator and one ``random.Random`` owned by the
aligner, so a run is a function of its seed, and a checkpoint of (parameters, optimiser
state, both generators, the stratified sampler's cycle, step) resumes it bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from auditing.config import ConfigError
from auditing.files import atomic_write
from auditing.models.conditioning import encode_text
from auditing.models.denoising import training_scheduler

from .adapt import ConfigSampler, FineTuneConfig, adapt
from .config import AlignConfig, config_from_mapping
from .data import AlignmentData, EncodedSet
from .functional import Batch, Denoiser, Params, attention_weight_names, flat_dot, flat_norm, lora_init, lora_merge
from .functional import scope_names as names_for_scope
from .hvp import FD_EPSILON, gradient, make_hvp
from .hypergradient import solve
from .losses import Draw, FineTuneBatch, HarmLoss, finetune_loss, preservation_loss

log = logging.getLogger(__name__)

CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_META = "state.json"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this step on the device it ran on: the CUDA allocator's peak, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def _no_solve() -> dict:
    """What a sample records when no Richardson solve ran (first-order, unrolled, random-perturbation)."""
    return {"gamma": None, "contraction": None, "omega": None, "relaxations": [], "backoffs": [], "fallback": False,
            "iterations": None, "products": 0}


def _distance(a: Params, b: Params, names: list[str]) -> float:
    """||a - b|| over ``names``, one tensor's difference at a time (a full configuration's are the whole UNet)."""
    with torch.no_grad():
        return float(torch.sqrt(sum(((a[k].detach() - b[k]).float() ** 2).sum() for k in names)))


@dataclass(frozen=True)
class Adapted:
    """One drawn configuration after ADAPT, before its hypergradient."""

    config: FineTuneConfig
    start: Params  # where ADAPT started: theta, with the rest of the UNet for a "full" configuration
    star: Params  # theta* (on the tape for "unrolled")
    moved: list[str]  # what ADAPT trains, the drift's space: all of start ("full"), the attention weights ("lora")
    distance: float  # ||theta* - theta|| over moved
    drift: float  # distance / ||theta|| over moved
    finetune_sampler: tuple[random.Random | None, torch.Generator | None]  # the Hessian batch continues its draws
    leaves: Params | None = None  # "unrolled": the copies of theta ADAPT ran from, on the tape


@dataclass(frozen=True)
class SampleResult:
    config: FineTuneConfig
    harm_after: float
    hypergradient_norm: float
    drift: float
    accepted: bool  # drift >= outer.min_drift (always with min_drift off); False: kept after max_redraws
    rejected: list  # the draws redrawn before it: configuration and drift each
    gamma: float | None
    contraction: float | None
    omega: float | None
    relaxations: list
    backoffs: list
    fallback: bool
    iterations: int | None  # solver steps of the accepted solve: K (CG: K - 1), or fewer after the residual stop
    products: int  # Hessian-vector products, every relaxed or backed-off repeat included

    def as_dict(self) -> dict:
        return {"config": self.config.as_dict(), "L_harm_star": self.harm_after,
                "hypergradient_norm": self.hypergradient_norm, "drift": self.drift, "accepted": self.accepted,
                "redraws": len(self.rejected), "rejected": self.rejected, "gamma": self.gamma,
                "contraction": self.contraction, "omega": self.omega, "relaxations": self.relaxations,
                "backoffs": self.backoffs, "fallback": self.fallback, "iterations": self.iterations,
                "products": self.products}


class Aligner:
    """Holds theta (as trainable leaves), the outer optimiser and the run's randomness."""

    def __init__(self, pipe, data: AlignmentData, config: AlignConfig):
        self.config = config
        self.data = data
        self.model = Denoiser(pipe.unet, config.precision, config.gradient_checkpointing)
        self.device = pipe.unet.device
        self.scheduler = training_scheduler(pipe.scheduler.config)
        own = dict(pipe.unet.named_parameters())
        self.names = names_for_scope(pipe.unet, config.outer.scope)
        self.lora_names = attention_weight_names(pipe.unet)
        # The original weights, by reference: the module is never modified, so it is the frozen teacher.
        self.base = {n: own[n].detach() for n in self.names}
        # The rest of the UNet, by reference: what a "full" configuration of pi(C) also trains.
        self.rest = {n: t.detach() for n, t in own.items() if n not in self.base}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.sampler = ConfigSampler(config.distribution)
        if config.outer.scope == "attention-lora":
            leaves = lora_init(self.base, config.outer.lora_rank, self.generator)
        else:
            leaves = {n: t.clone() for n, t in self.base.items()}
        self.leaves = {k: t.requires_grad_() for k, t in leaves.items()}
        self.optimizer = torch.optim.AdamW(list(self.leaves.values()), lr=config.outer.learning_rate,
                                           weight_decay=config.outer.weight_decay)
        obj = config.objective
        self.harm = HarmLoss(obj.harm, obj.harm_bound, obj.esd_eta,
                             anchor=encode_text(pipe, [obj.anchor_prompt]).hidden if obj.harm == "ablation" else None,
                             empty=encode_text(pipe, [""]).hidden if obj.harm == "esd" else None)
        self.step_index = 0

    # -- parameters -------------------------------------------------------------------------
    def theta(self) -> Params:
        """Effective weights of the scope, differentiable with respect to the leaves."""
        if self.config.outer.scope == "attention-lora":
            return lora_merge(self.base, self.leaves, 1.0)
        return dict(self.leaves)

    def merged(self) -> Params:
        with torch.no_grad():
            return {k: t.detach().clone() for k, t in self.theta().items()}

    # -- data -------------------------------------------------------------------------------
    def _batch(self, data: EncodedSet, size: int, rng: random.Random | None = None,
               generator: torch.Generator | None = None) -> tuple[Batch, Draw]:
        chosen = data.batch.take(data.draw(rng or self.rng, size))
        return chosen, Draw.sample(self.scheduler, chosen.latents, generator or self.generator)

    def _finetune_sampler(self) -> tuple[random.Random | None, torch.Generator | None]:
        """Where a sample's fine-tuning batches come from: the run's own draws, or (``fixed``, the
        "no meta over data" ablation) draws restarted from the seed, so every outer step fine-tunes
        on the same batches and noise."""
        if self.config.data.finetune_sampling == "resample":
            return None, None
        return random.Random(self.config.seed), torch.Generator().manual_seed(self.config.seed)

    def _finetune_batch(self, config: FineTuneConfig, rng: random.Random | None = None,
                        generator: torch.Generator | None = None) -> FineTuneBatch:
        data, draw = self._batch(self.data.finetune, config.batch_size, rng, generator)
        if config.loss != "prior":
            return FineTuneBatch(data, draw)
        prior, prior_draw = self._batch(self.data.preservation, config.batch_size, rng, generator)
        return FineTuneBatch(data, draw, prior, prior_draw)

    # -- one outer step ---------------------------------------------------------------------
    def _adapt(self, theta: Params, config: FineTuneConfig) -> Adapted:
        """Fine-tuning batches for ``config`` and theta* = ADAPT(theta), with its drift."""
        cfg = self.config
        rng, generator = self._finetune_sampler()
        batches = [self._finetune_batch(config, rng, generator) for _ in range(config.steps)]
        weight = cfg.objective.prior_weight

        def loss_at(params: Params, step: int) -> torch.Tensor:
            return finetune_loss(self.model, params, batches[step], weight)

        # A customer's full fine-tune trains every UNet parameter, not only the hardened scope: ADAPT and the
        # Hessian then live in the whole weight space, and theta's hypergradient is x's scope part.
        rest = self.rest if config.method == "full" else {}
        start, leaves = {**rest, **theta}, None
        if cfg.hypergradient.method == "unrolled":  # double backward through every step: the math attention kernel
            leaves = {k: t.clone().requires_grad_() for k, t in theta.items()}
            with sdpa_kernel(SDPBackend.MATH):
                star = adapt({**rest, **leaves}, loss_at, config, self.generator, self.lora_names,
                             cfg.proximal_gamma, differentiable=True)
        else:
            star = adapt(start, loss_at, config, self.generator, self.lora_names, cfg.proximal_gamma)
        moved = list(start) if config.method == "full" else self.lora_names
        distance = _distance(star, start, moved)
        with torch.no_grad():
            drift = distance / float(flat_norm({k: start[k] for k in moved}))
        return Adapted(config, start, star, moved, distance, drift, (rng, generator), leaves)

    def _draw(self, theta: Params) -> tuple[Adapted, bool, list[dict]]:
        """C ~ pi(C) and ADAPT; with ``outer.min_drift``, a sample that leaves the model where it was is rejected
        before any solve and redrawn (C and batches), at most ``outer.max_redraws`` times, then kept."""
        outer = self.config.outer
        rejected = []
        while True:
            sample = self._adapt(theta, self.sampler.draw(self.rng))
            if outer.min_drift is None or sample.drift >= outer.min_drift:
                return sample, True, rejected
            if len(rejected) == outer.max_redraws:
                log.warning("outer step %d: drift %.3g below min_drift %.3g after %d redraws; keeping the last "
                            "draw", self.step_index, sample.drift, outer.min_drift, len(rejected))
                return sample, False, rejected
            rejected.append({"config": sample.config.as_dict(), "drift": sample.drift})
            del sample

    def _perturbed(self, sample: Adapted) -> Params:
        """theta + d u / ||u||, u ~ N(0, I) over the weights ADAPT trained, d = ||theta* - theta||: the control's
        point, as far from theta as theta* in a direction that knows nothing of fine-tuning."""
        start = sample.start
        u = {k: torch.randn(start[k].shape, generator=self.generator).to(start[k]) for k in sample.moved}
        steps = list(u.values())
        torch._foreach_mul_(steps, sample.distance / float(flat_norm(u)))
        torch._foreach_add_(steps, [start[k] for k in u])
        return {**start, **u}

    def _hypergradient(self, theta: Params, sample: Adapted, harm_batch: Batch,
                       harm_draw: Draw) -> tuple[float, Params, dict]:
        """L_harm(theta*) and the hypergradient x for one sampled configuration."""
        cfg = self.config
        hcfg = cfg.hypergradient

        def harm_at(params: Params) -> torch.Tensor:
            return self.harm(self.model, params, {}, harm_batch, harm_draw)

        if hcfg.method == "unrolled":
            with sdpa_kernel(SDPBackend.MATH):
                harm_star = harm_at(sample.star)
                x = dict(zip(sample.leaves, torch.autograd.grad(harm_star, list(sample.leaves.values()))))
            return harm_star.item(), x, _no_solve()
        if hcfg.method == "random-perturbation":  # the point's Jacobian in theta is I: x = g, as first-order
            harm_star, g = gradient(harm_at, self._perturbed(sample))
            return float(harm_star), {k: g[k] for k in theta}, _no_solve()
        star = sample.star
        harm_star, g = gradient(harm_at, star)
        if hcfg.method == "first-order":
            return float(harm_star), {k: g[k] for k in theta}, _no_solve()
        rng, generator = sample.finetune_sampler
        hessian_batch = self._finetune_batch(sample.config, rng, generator)
        epsilon = hcfg.fd_epsilon or FD_EPSILON[cfg.precision]
        weight = cfg.objective.prior_weight
        hvp = make_hvp(hcfg.hvp, lambda p: finetune_loss(self.model, p, hessian_batch, weight), star, epsilon)
        sol = solve(hvp, g, hcfg)
        return float(harm_star), {k: sol.x[k] for k in theta}, {
            "gamma": sol.gamma, "contraction": sol.contraction, "omega": sol.omega,
            "relaxations": sol.relaxations, "backoffs": sol.backoffs, "fallback": sol.fallback,
            "iterations": sol.iterations, "products": sol.products}

    def _tail_size(self) -> int:
        """CVaR's tail: the ceil(cvar_fraction * J) worst samples (at least one)."""
        outer = self.config.outer
        return max(1, math.ceil(outer.cvar_fraction * outer.samples - 1e-9))

    def step(self) -> dict:
        cfg = self.config
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        theta = self.theta()
        harm_batch, harm_draw = self._batch(self.data.harmful, cfg.data.batch_size)
        pres_batch, pres_draw = self._batch(self.data.preservation, cfg.data.batch_size)
        harm = self.harm(self.model, theta, {}, harm_batch, harm_draw)
        pres = preservation_loss(self.model, theta, {}, pres_batch, pres_draw)
        beta, alpha = cfg.objective.beta, cfg.objective.alpha
        ((1 - beta) * harm + alpha * pres).backward()  # free these graphs before the J inner runs
        samples, meta, worst = [], {}, []
        theta_d = {k: t.detach() for k, t in theta.items()}
        cvar = cfg.outer.aggregation == "cvar"
        # beta = 0 is unlearning alone (Eq. 2): the resilience term has no weight, so no inner runs.
        for _ in range(cfg.outer.samples if beta > 0 else 0):
            sample, accepted, rejected = self._draw(theta_d)
            harm_star, x, info = self._hypergradient(theta_d, sample, harm_batch, harm_draw)
            samples.append(SampleResult(sample.config, harm_star, float(flat_norm(x)), sample.drift, accepted,
                                        rejected, **info))
            del sample
            if cvar:  # the x of the tail so far: the samples with the highest L_harm(theta*), earlier ones on ties
                worst.append((harm_star, len(samples) - 1, x))
                worst.sort(key=lambda w: -w[0])
                del worst[self._tail_size():]
            elif meta:  # a running sum in the first sample's own tensors: no copy per sample is kept
                torch._foreach_add_([meta[k] for k in x], [x[k] for k in x])
            else:
                meta = dict(x)
            del x
        for _, _, x in worst:
            if meta:
                torch._foreach_add_([meta[k] for k in x], [x[k] for k in x])
            else:
                meta = dict(x)
        used = sorted(i for _, i, _ in worst) if cvar else list(range(len(samples)))
        del worst
        if meta:  # d/d(leaves) of <meta, theta(leaves)> pushes the meta-gradient through the scope (LoRA merge)
            torch._foreach_div_(list(meta.values()), len(used))
            (beta * flat_dot(meta, self.theta())).backward()
        params = list(self.leaves.values())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.outer.clip_norm or float("inf")))
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise FloatingPointError(f"outer step {self.step_index}: non-finite gradient; lower the learning rate "
                                     "or bound the harm loss (objective.harm_bound)")
        self.optimizer.step()
        self.step_index += 1
        harm_after = sum(s.harm_after for s in samples) / len(samples) if samples else None  # no inner runs
        aggregate = sum(samples[i].harm_after for i in used) / len(used) if used else None  # the objective's
        drawn = sum(1 + len(s.rejected) for s in samples)
        return {
            "step": self.step_index, "L_harm": harm.item(), "R": pres.item(),
            "L_harm_star_mean": harm_after,
            "objective": harm.item() + alpha * pres.item() + (beta * (aggregate - harm.item()) if samples else 0.0),
            "samples": [{**s.as_dict(), "aggregated": i in used} for i, s in enumerate(samples)],
            "hypergradient_norm": float(flat_norm(meta)) if meta else 0.0,
            "grad_norm": grad_norm, "backoffs": sum(len(s.backoffs) for s in samples),
            "relaxations": sum(len(s.relaxations) for s in samples),
            "redraws": drawn - len(samples),
            "acceptance_rate": sum(s.accepted for s in samples) / drawn if drawn else None,
            "seconds": time.perf_counter() - start, "peak_memory_mb": peak_memory_mb(self.device),
        }

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Leaves, optimiser moments, generator states and step; written atomically."""
        tensors = {f"param.{k}": t.detach().contiguous() for k, t in self.leaves.items()}
        state = self.optimizer.state_dict()
        order = list(self.leaves)
        for i, moments in state["state"].items():
            for name, value in moments.items():
                tensors[f"opt.{order[i]}.{name}"] = value.contiguous()
        tensors["generator"] = self.generator.get_state()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{CHECKPOINT_TENSORS}.tmp"
        save_file(tensors, tmp)
        tmp.replace(folder / CHECKPOINT_TENSORS)
        version, internal, gauss = self.rng.getstate()
        atomic_write(folder / CHECKPOINT_META, json.dumps({
            "step": self.step_index, "rng": [version, list(internal), gauss], "pending_classes": self.sampler.pending,
            "param_groups": state["param_groups"], "config": self.config.as_dict()}))

    def load(self, folder: Path) -> None:
        meta = json.loads((folder / CHECKPOINT_META).read_text())
        try:  # read by today's fields: one added since the checkpoint was written takes its default
            recorded = config_from_mapping(meta["config"])
        except ConfigError:
            recorded = None
        if recorded != self.config:
            raise ValueError(f"{folder}: the checkpoint was written with a different configuration")
        tensors = load_file(folder / CHECKPOINT_TENSORS)
        with torch.no_grad():
            for k, t in self.leaves.items():
                t.copy_(tensors[f"param.{k}"])
        order = list(self.leaves)
        state = {}
        for i, k in enumerate(order):
            moments = {name: tensors[f"opt.{k}.{name}"] for name in ("step", "exp_avg", "exp_avg_sq")
                       if f"opt.{k}.{name}" in tensors}
            if moments:
                state[i] = moments
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.generator.set_state(tensors["generator"])
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.sampler.pending = meta.get("pending_classes", [])  # absent: written before stratified sampling
        self.step_index = meta["step"]
