"""ResAlign beyond the paper: the random-perturbation control, stratified sampling of pi(C), and the rejection
and redraw of samples that do not move the model (docs/alignment.md). Each is off by default."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from safetensors.torch import load_file
from test_alignment_device import _batch, cosine
from test_alignment_run import _config, _records, assert_config_error, workspace  # noqa: F401  (workspace: a fixture)

from alignment.adapt import ConfigSampler, Distribution
from alignment.config import config_from_mapping
from alignment.data import AlignmentData, EncodedSet
from alignment.functional import attention_weight_names
from alignment.outer import Aligner
from alignment.run import run_alignment
from auditing.models.tiny import TinySpec, build_tiny_pipeline


def _aligner(scope="attention-lora", method="full", hypergradient="random-perturbation", outer=None,
             learning_rates=(1e-2,)):
    pipe = build_tiny_pipeline(TinySpec(sample_size=8), seed=0)
    sets = {name: EncodedSet(_batch(pipe, 4, seed)[0], ("p",) * 4, {}) for seed, name in
            enumerate(("harmful", "preservation", "finetune"))}
    config = config_from_mapping({
        "model": "m", "output": "o", "seed": 3,
        "data": {"harmful": "h", "preservation": "p", "finetune": "f", "batch_size": 2},
        "objective": {"harm": "ga", "harm_bound": 5.0},
        "outer": {"samples": 1, "scope": scope, **(outer or {})},
        "hypergradient": {"method": hypergradient},
        "distribution": {"learning_rates": list(learning_rates), "steps": [3], "losses": ["standard"],
                         "methods": [method], "optimizers": ["adam"], "batch_sizes": [2], "max_lr_steps": 1.0}})
    return pipe, Aligner(pipe, AlignmentData(**sets), config)


# -- random-perturbation ----------------------------------------------------------------------
@pytest.mark.parametrize("scope,method", [("attention-lora", "lora"), ("attention-lora", "full"), ("full", "lora")])
def test_random_perturbation_is_an_isotropic_step_as_long_as_adapts(monkeypatch, scope, method):
    """The control's point is theta + d u/||u|| over exactly the weights ADAPT trains, u the aligner's Gaussian
    draw, d ADAPT's own distance; x is grad L_harm there (Jacobian I), the scope's part."""
    import alignment.outer

    pipe, aligner = _aligner(scope, method)
    everything = {n: t.detach() for n, t in pipe.unet.named_parameters()}
    trained = set(everything) if method == "full" else set(attention_weight_names(pipe.unet))
    theta = aligner.merged()
    start = {**everything, **theta} if method == "full" else dict(theta)
    sample, accepted, rejected = aligner._draw(theta)
    assert accepted and not rejected
    harm_batch, harm_draw = aligner._batch(aligner.data.harmful, 2)
    before = aligner.generator.get_state()
    points = []
    real_gradient = alignment.outer.gradient

    def spy(loss_fn, params):
        points.append({k: t.detach().clone() for k, t in params.items()})
        return real_gradient(loss_fn, params)

    monkeypatch.setattr(alignment.outer, "gradient", spy)
    harm_star, x, info = aligner._hypergradient(theta, sample, harm_batch, harm_draw)
    (point,) = points
    assert set(point) == set(start) and info["products"] == 0
    step = {k: point[k] - start[k] for k in trained}
    adapt_step = {k: sample.star[k] - start[k] for k in trained}
    assert all(torch.equal(point[k], start[k]) for k in set(start) - trained)  # only what ADAPT trains moves
    assert all((step[k] != 0).all() for k in trained)
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in step.values())))
    adapt_norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in adapt_step.values())))
    assert norm == pytest.approx(adapt_norm, rel=1e-5) and adapt_norm > 0
    assert abs(cosine(step, adapt_step)) < 0.2  # not ADAPT's direction
    generator = torch.Generator().set_state(before)
    gaussian = {k: torch.randn(start[k].shape, generator=generator) for k in sample.moved}
    assert cosine(step, {k: gaussian[k] for k in trained}) > 0.9999  # the aligner's own N(0, I) draw
    leaves = {k: t.clone().requires_grad_() for k, t in point.items()}
    loss = aligner.harm(aligner.model, leaves, {}, harm_batch, harm_draw)
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    assert set(x) == set(theta)
    assert harm_star == pytest.approx(float(loss.detach()), rel=1e-6)
    for k in theta:
        assert torch.allclose(x[k], expected[k], rtol=1e-5, atol=1e-8), k


def test_random_perturbation_runs_end_to_end(workspace):  # noqa: F811
    rows = _records(run_alignment(_config(workspace, "random-perturbation", method="random-perturbation")))
    samples = [s for r in rows for s in r["samples"]]
    assert len(rows) == 4 and all(s["gamma"] is None and s["products"] == 0 and s["drift"] > 0 for s in samples)
    assert all(torch.isfinite(torch.tensor(r["objective"])) for r in rows)


# -- stratified sampling ------------------------------------------------------------------------
def _classes(configs) -> list[tuple[str, str]]:
    return [(c.optimizer, c.method) for c in configs]


def test_stratified_sampling_cycles_through_every_class_once_per_cycle():
    distribution = Distribution(learning_rates=(1e-3, 1e-4), steps=(5, 10), max_lr_steps=1.0, sampling="stratified")
    sampler = ConfigSampler(distribution)
    rng = random.Random(11)
    draws = [sampler.draw(rng) for _ in range(5 * 4)]
    everyone = {(o, m) for o in ("sgd", "adam") for m in ("full", "lora")}
    cycles = [_classes(draws[i:i + 4]) for i in range(0, len(draws), 4)]
    assert all(set(cycle) == everyone for cycle in cycles)
    assert len({tuple(cycle) for cycle in cycles}) > 1  # a fresh permutation per cycle
    for cls in everyone:  # within a class, C is drawn from all its configurations
        assert len({d for d in draws if (d.optimizer, d.method) == cls}) > 1
    for seed, same in ((11, True), (12, False)):  # the seed fixes the sequence
        again, rng = ConfigSampler(distribution), random.Random(seed)
        assert ([again.draw(rng) for _ in range(len(draws))] == draws) == same


def test_uniform_sampling_is_the_papers_draw():
    distribution = Distribution()
    sampler, a, b = ConfigSampler(distribution), random.Random(4), random.Random(4)
    assert [sampler.draw(a) for _ in range(30)] == [distribution.sample(b) for _ in range(30)]
    assert a.getstate() == b.getstate() and sampler.pending == []


def test_stratified_run_resumes_mid_cycle_bit_for_bit(workspace):  # noqa: F811
    """4 classes, J = 2: the checkpoint after step 1 is half way through a cycle."""
    def stratified(name):
        path = _config(workspace, name)
        path.write_text(path.read_text().replace("max_lr_steps = 1.0", 'max_lr_steps = 1.0\nsampling = "stratified"'))
        return path

    straight = run_alignment(stratified("stratified"))
    config = stratified("stratified-resumed")
    work = run_alignment(config, stop_after=1)
    assert len(json.loads((work / "checkpoint" / "state.json").read_text())["pending_classes"]) == 2
    resumed = run_alignment(config, resume=True)
    rows = _records(straight)
    assert rows == _records(resumed)
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drawn = [(s["config"]["optimizer"], s["config"]["method"]) for r in rows for s in r["samples"]]
    assert len(drawn) == 8 and len(set(drawn[:4])) == 4 and len(set(drawn[4:])) == 4


# -- rejection and redraw -----------------------------------------------------------------------
def test_samples_below_min_drift_are_redrawn_max_redraws_times_before_any_solve(workspace, monkeypatch,  # noqa: F811
                                                                                caplog):
    import alignment.outer

    solves = []
    real_solve = alignment.outer.solve
    monkeypatch.setattr(alignment.outer, "solve", lambda *a, **k: solves.append(1) or real_solve(*a, **k))
    config = _config(workspace, "redraw-all")
    config.write_text(config.read_text().replace("checkpoint_every = 2", "checkpoint_every = 2\nmin_drift = 1.0\n"
                                                                         "max_redraws = 2"))
    with caplog.at_level(logging.WARNING, logger="alignment.outer"):
        rows = _records(run_alignment(config, stop_after=2))
    samples = [s for r in rows for s in r["samples"]]
    assert len(samples) == 4 and len(solves) == 4  # rejected draws ran no solve
    assert all(s["redraws"] == 2 and len(s["rejected"]) == 2 and not s["accepted"] for s in samples)
    assert all(0 < d["drift"] < 1 for s in samples for d in s["rejected"] + [s])
    assert all(r["redraws"] == 4 and r["acceptance_rate"] == 0.0 for r in rows)
    assert sum("after 2 redraws; keeping the last draw" in m for m in caplog.messages) == 4


def test_without_min_drift_nothing_is_redrawn_and_a_threshold_below_every_drift_changes_nothing(workspace):  # noqa: F811
    plain = _records(run_alignment(_config(workspace, "redraw-off"), stop_after=2))
    config = _config(workspace, "redraw-below")
    config.write_text(config.read_text().replace("checkpoint_every = 2", "checkpoint_every = 2\nmin_drift = 1e-12"))
    low = _records(run_alignment(config, stop_after=2))
    assert all(r["redraws"] == 0 and r["acceptance_rate"] == 1.0 for r in plain)
    assert all(s["redraws"] == 0 and s["accepted"] and s["drift"] > 0 for r in plain for s in r["samples"])
    assert plain == low  # the check itself draws nothing


def test_a_checkpoint_from_before_the_new_fields_resumes(workspace):  # noqa: F811
    """A checkpoint whose config lacks fields added since resumes with their defaults; another config is refused."""
    config = _config(workspace, "old-checkpoint")
    work = run_alignment(config, stop_after=1)
    meta_path = work / "checkpoint" / "state.json"
    meta = json.loads(meta_path.read_text())
    for section, name in (("outer", "min_drift"), ("outer", "max_redraws"), ("distribution", "sampling")):
        del meta["config"][section][name]
    del meta["pending_classes"]
    meta_path.write_text(json.dumps(meta))
    assert run_alignment(config, resume=True, stop_after=2) == work
    config.write_text(config.read_text().replace("checkpoint_every = 2", "checkpoint_every = 2\nmin_drift = 0.5"))
    with pytest.raises(ValueError, match="different configuration"):
        run_alignment(config, resume=True)


# -- CVaR aggregation ---------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation,fraction,tail", [("mean", 0.25, 5), ("cvar", 0.4, 2), ("cvar", 0.01, 1)])
def test_cvar_averages_the_hypergradients_of_the_worst_samples(monkeypatch, aggregation, fraction, tail):
    """Step 3's meta-gradient is the mean x over the ceil(fraction J) samples with the highest L_harm(theta*)."""
    import alignment.outer

    _, aligner = _aligner(hypergradient="first-order", learning_rates=(3e-2, 1e-2, 3e-3, 1e-3),
                          outer={"samples": 5, "aggregation": aggregation, "cvar_fraction": fraction})
    produced, pushed = [], []
    real_hypergradient, real_dot = Aligner._hypergradient, alignment.outer.flat_dot

    def spy_hypergradient(self, *args):
        harm_star, x, info = real_hypergradient(self, *args)
        produced.append((harm_star, {k: t.clone() for k, t in x.items()}))
        return harm_star, x, info

    def spy_dot(a, b):
        pushed.append({k: t.clone() for k, t in a.items()})
        return real_dot(a, b)

    monkeypatch.setattr(Aligner, "_hypergradient", spy_hypergradient)
    monkeypatch.setattr(alignment.outer, "flat_dot", spy_dot)
    record = aligner.step()
    harms = [h for h, _ in produced]
    assert len(set(harms)) == 5  # the learning rates give distinct L_harm(theta*)
    chosen = sorted(range(5), key=lambda i: -harms[i])[:tail]
    assert [s["aggregated"] for s in record["samples"]] == [i in chosen for i in range(5)]
    (meta,) = pushed
    for k in meta:
        expected = sum(produced[i][1][k] for i in chosen) / tail
        assert torch.allclose(meta[k], expected, rtol=1e-5, atol=1e-9), k
    tail_mean = sum(harms[i] for i in chosen) / tail
    beta = aligner.config.objective.beta
    assert record["objective"] == pytest.approx(record["L_harm"] + record["R"] + beta * (tail_mean - record["L_harm"]))
    assert record["L_harm_star_mean"] == pytest.approx(sum(harms) / 5)


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("patch,message", [
    (("[outer]", "[outer]\nmin_drift = 0.0"), "outer.min_drift must be greater than 0 (got 0.0)"),
    (("[outer]", "[outer]\nmin_drift = 2.0"), "outer.min_drift must be less than or equal to 1 (got 2.0)"),
    (("[outer]", '[outer]\nmin_drift = "low"'), "outer.min_drift must be a valid number"),
    (("[outer]", "[outer]\nmax_redraws = 0"), "outer.max_redraws must be greater than or equal to 1 (got 0)"),
    (("[outer]", "[outer]\nmax_redraws = 1.5"), "outer.max_redraws must be a valid integer"),
    (("max_lr_steps = 1.0", 'max_lr_steps = 1.0\nsampling = "classes"'),
     "distribution.sampling must be 'uniform' or 'stratified' (got 'classes')"),
    (("[outer]", '[outer]\naggregation = "max"'), "outer.aggregation must be 'mean' or 'cvar' (got 'max')"),
    (("[outer]", "[outer]\ncvar_fraction = 0.0"), "outer.cvar_fraction must be greater than 0 (got 0.0)"),
    (("[outer]", "[outer]\ncvar_fraction = 1.5"), "outer.cvar_fraction must be less than or equal to 1 (got 1.5)"),
    (('method = "moreau"', 'method = "random"'), "hypergradient.method must be 'moreau', 'first-order', 'unrolled' "
                                                 "or 'random-perturbation' (got 'random')"),
])
def test_new_fields_are_validated_by_name(tmp_path, patch, message):
    assert_config_error(tmp_path, patch, message)


def test_defaults_are_the_papers():
    config = config_from_mapping({"model": "m", "output": "o",
                                  "data": {"harmful": "h", "preservation": "p", "finetune": "f"}})
    assert config.outer.min_drift is None and config.distribution.sampling == "uniform"
    assert config.outer.aggregation == "mean"
    assert config.hypergradient.method == "moreau"
