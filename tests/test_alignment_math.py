"""Correctness of the hardening maths: Adam, ADAPT, HVPs, Richardson, conjugate gradient, Moreau vs unrolled."""

from __future__ import annotations

import random

import pytest
import torch

from alignment.adapt import SGD, Adam, Distribution, FineTuneConfig, adapt
from alignment.config import config_from_mapping
from alignment.functional import Batch, Denoiser, attention_weight_names, flat_dot, flat_norm, lora_init, lora_merge
from alignment.hvp import FD_EPSILON, AutogradHVP, FiniteDifferenceHVP, gradient
from alignment.hypergradient import HypergradientConfig, richardson, solve
from alignment.losses import Draw, FineTuneBatch, HarmLoss, finetune_loss
from auditing.config import ConfigError
from auditing.models.tiny import TinySpec, build_tiny_pipeline


def cosine(a: dict, b: dict) -> float:
    return float(flat_dot(a, b) / (flat_norm(a) * flat_norm(b)))


def flat(p: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in p.values()])


def unflat(v: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = v[i:i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


# -- Adam -----------------------------------------------------------------------------------
@pytest.mark.parametrize("in_place", [False, True])
def test_functional_adam_matches_torch_step_for_step(in_place):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen,
                                                                                           dtype=torch.float64)}
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    torch_adam = torch.optim.Adam(reference.values(), lr=1e-2)
    ours = Adam(1e-2)
    state = ours.init(params)
    x = torch.randn(16, 5, generator=gen, dtype=torch.float64)

    def loss(p):
        return torch.tanh(x @ p["w"] + p["b"]).pow(2).sum()

    for step in range(20):
        grads = dict(zip(params, torch.autograd.grad(loss({k: v.requires_grad_() for k, v in params.items()}),
                                                     list(params.values()))))
        params = {k: v.detach() for k, v in params.items()}
        if in_place:  # ADAPT's path off the tape
            state = ours.step_(params, grads, state)
        else:
            params, state = ours.step(params, grads, state)
        torch_adam.zero_grad()
        loss(reference).backward()
        torch_adam.step()
        for k in params:
            assert torch.equal(params[k], reference[k].detach()), f"step {step}: {k} differs from torch.optim.Adam"


def test_sgd_is_plain_gradient_descent():
    p = {"w": torch.tensor([1.0, -2.0])}
    new, _ = SGD(0.5).step(p, {"w": torch.tensor([2.0, 2.0])}, None)
    assert torch.equal(new["w"], torch.tensor([0.0, -3.0]))
    SGD(0.5).step_(p, {"w": torch.tensor([2.0, 2.0])}, None)
    assert torch.equal(p["w"], torch.tensor([0.0, -3.0]))


def test_adapt_off_the_tape_equals_the_functional_steps_and_leaves_theta_alone():
    """The in-place path computes what the differentiable (functional) path computes."""
    params, ft_loss, _ = _mlp_problem()
    before = {k: t.clone() for k, t in params.items()}
    for optimizer in ("sgd", "adam"):
        config = FineTuneConfig(optimizer=optimizer, learning_rate=1e-2, steps=5, method="full")
        star = adapt(params, lambda p, s: ft_loss(p), config, torch.Generator().manual_seed(0))
        taped = adapt({k: t.clone().requires_grad_() for k, t in params.items()}, lambda p, s: ft_loss(p), config,
                      torch.Generator().manual_seed(0), differentiable=True)
        assert all(torch.equal(star[k], taped[k].detach()) for k in params), optimizer
        assert not torch.equal(star["w1"], params["w1"])
    assert all(torch.equal(params[k], before[k]) for k in params)


# -- pi(C) ----------------------------------------------------------------------------------
def test_default_distribution_is_the_papers_grid_minus_unstable_pairs():
    grid = Distribution().grid()
    pairs = {(c.learning_rate, c.steps) for c in grid}
    assert (1e-4, 20) not in pairs and (1e-4, 30) not in pairs
    assert (1e-4, 10) in pairs and (1e-6, 30) in pairs
    assert len(grid) == 2 * (3 * 4 - 2) * 2 * 2  # optimisers x (lr, steps) x losses x methods
    rng = random.Random(0)
    assert {Distribution().sample(rng).method for _ in range(50)} == {"full", "lora"}


def test_distribution_that_excludes_everything_is_refused():
    with pytest.raises(ValueError, match="excludes every configuration"):
        Distribution(learning_rates=(1.0,), max_lr_steps=1e-3)


# -- Richardson against the exact Hessian ----------------------------------------------------
def _mlp_problem(seed=0):
    """A small tanh network: non-quadratic, small enough for the exact Hessian."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 1, generator=gen, dtype=torch.float64)
    params = {"w1": 0.5 * torch.randn(4, 6, generator=gen, dtype=torch.float64),
              "w2": 0.5 * torch.randn(6, 1, generator=gen, dtype=torch.float64)}

    def ft_loss(p):
        return ((torch.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2).mean()

    def harm_loss(p):
        return -(torch.tanh(x[:8] @ p["w1"]) @ p["w2"]).pow(2).mean()

    return params, ft_loss, harm_loss


def _exact_hessian(loss, params):
    v = flat(params).clone()
    return torch.autograd.functional.hessian(lambda z: loss(unflat(z, params)), v)


def test_richardson_converges_to_the_exact_moreau_solution():
    params, ft_loss, harm_loss = _mlp_problem()
    hessian = _exact_hessian(ft_loss, params)
    lam = torch.linalg.eigvalsh(hessian).abs().max().item()
    gamma = 0.5 / lam  # rho(gamma H) = 0.5: the iteration converges
    _, g = gradient(harm_loss, params)
    exact = torch.linalg.solve(hessian + torch.eye(len(hessian), dtype=hessian.dtype) / gamma, flat(g) / gamma)
    hvp = AutogradHVP(ft_loss, params)
    cos = {}
    for k in (1, 5, 30):
        sol = solve(hvp, g, HypergradientConfig(richardson_steps=k, gamma=gamma, hvp="autograd", residual_tol=0))
        assert not sol.backoffs
        cos[k] = float(torch.nn.functional.cosine_similarity(flat(sol.x), exact, dim=0))
    print(f"cosine to the exact solution: K=1 {cos[1]:.6f}, K=5 {cos[5]:.6f}, K=30 {cos[30]:.8f}")
    assert cos[30] >= 0.999999
    assert cos[5] >= 0.999
    assert cos[1] < cos[5] <= cos[30]


def _quadratic(n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    return gen, a, torch.randn(n, generator=gen, dtype=torch.float64)


def test_richardson_starts_from_zero_so_k_steps_keep_k_neumann_terms():
    _, a, g = _quadratic()
    gamma = 0.3 / torch.linalg.eigvalsh(a).max().item()
    calls = []

    def hvp(v):
        calls.append(1)
        return {"w": a @ v["w"]}

    for k in (1, 2, 4):
        calls.clear()
        sol = solve(hvp, {"w": g}, HypergradientConfig(richardson_steps=k, gamma=gamma, hvp="autograd",
                                                      residual_tol=0))
        terms = sum(torch.linalg.matrix_power(-gamma * a, i) @ g for i in range(k))
        assert torch.allclose(sol.x["w"], terms, atol=1e-12), f"K={k} is not the {k}-term Neumann series"
        assert len(calls) == k - 1  # the first step is of x = 0: no product


def test_richardson_divergence_is_damped_and_keeps_gamma(caplog):
    """rho(gamma H) = 4 on a positive-definite H: relaxation converges to (I + gamma H)^-1 g at the same gamma."""
    _, a, g = _quadratic()
    gamma = 4.0 / torch.linalg.eigvalsh(a).max().item()
    config = HypergradientConfig(richardson_steps=60, gamma=gamma, hvp="autograd")
    sol = solve(lambda v: {"w": a @ v["w"]}, {"w": g}, config)
    assert sol.relaxations and not sol.backoffs and not sol.fallback
    assert sol.gamma == gamma and sol.omega < 1 and "relaxing" in caplog.text
    exact = torch.linalg.solve(torch.eye(len(a), dtype=a.dtype) + gamma * a, g)
    assert float(torch.nn.functional.cosine_similarity(sol.x["w"], exact, dim=0)) > 0.9999


def test_richardson_backs_off_gamma_only_as_a_last_resort(caplog):
    """The tanh network's Hessian has curvature below -1/gamma, where no damping converges."""
    params, ft_loss, harm_loss = _mlp_problem()
    hessian = _exact_hessian(ft_loss, params)
    lam = torch.linalg.eigvalsh(hessian).abs().max().item()
    _, g = gradient(harm_loss, params)
    config = HypergradientConfig(richardson_steps=8, gamma=4.0 / lam, hvp="autograd")
    sol = solve(AutogradHVP(ft_loss, params), g, config)
    assert len(sol.relaxations) >= config.max_relaxations and sol.relaxations[0]["gamma"] == config.gamma
    assert sol.backoffs and sol.backoffs[0]["gamma"] == config.gamma
    assert sol.gamma < config.gamma and sol.gamma * lam < 1 and not sol.fallback
    assert "last resort" in caplog.text
    exact = torch.linalg.solve(hessian + torch.eye(len(hessian), dtype=hessian.dtype) / sol.gamma, flat(g) / sol.gamma)
    assert float(torch.nn.functional.cosine_similarity(flat(sol.x), exact, dim=0)) > 0.99

    fallback = solve(AutogradHVP(ft_loss, params), g, HypergradientConfig(richardson_steps=8, gamma=4.0 / lam,
                                                                           hvp="autograd", max_backoffs=0))
    assert fallback.fallback and torch.equal(flat(fallback.x), flat(g))
    assert fallback.relaxations[-1]["fallback"] == "first-order"


def test_residual_stop_ends_a_well_conditioned_solve_early_and_reports_its_iterations():
    _, a, g = _quadratic()
    gamma = 0.05 / torch.linalg.eigvalsh(a).max().item()  # rho(gamma H) = 0.05: a few terms suffice
    calls = []

    def hvp(v):
        calls.append(1)
        return {"w": a @ v["w"]}

    exact = torch.linalg.solve(torch.eye(len(a), dtype=a.dtype) + gamma * a, g)
    sol = solve(hvp, {"w": g}, HypergradientConfig(richardson_steps=20, gamma=gamma, residual_tol=1e-3))
    assert 1 < sol.iterations < 20 and sol.products == len(calls) == sol.iterations - 1
    residual = g - sol.x["w"] - gamma * a @ sol.x["w"]
    assert residual.norm() <= 1e-3 * g.norm()
    assert torch.allclose(sol.x["w"], exact, rtol=1e-3)
    fixed = solve(hvp, {"w": g}, HypergradientConfig(richardson_steps=20, gamma=gamma, residual_tol=0))
    assert fixed.iterations == 20 and fixed.products == 19  # 0: the paper's fixed K


def _previous_richardson(hvp, g, gamma, steps, omega=1.0):
    """The solver before it worked in place (out of place, dict by dict), kept as the reference."""
    x = {k: omega * t for k, t in g.items()}
    for _ in range(steps - 1):
        hx = hvp(x)
        x = {k: x[k] + omega * (g[k] - x[k] - gamma * hx[k]) for k in x}
    return x


@pytest.mark.parametrize("omega", [1.0, 0.6])
def test_in_place_richardson_equals_the_previous_solver(omega):
    params, ft_loss, harm_loss = _mlp_problem()
    lam = torch.linalg.eigvalsh(_exact_hessian(ft_loss, params)).abs().max().item()
    _, g = gradient(harm_loss, params)
    hvp = AutogradHVP(ft_loss, params)
    expected = _previous_richardson(hvp, g, 0.5 / lam, 8, omega)
    got = richardson(hvp, g, 0.5 / lam, 8, omega)
    assert got.products == 7 and not got.converged
    for k in g:
        assert torch.allclose(got.x[k], expected[k], rtol=1e-12, atol=1e-15), k
    assert all(torch.equal(g[k], gradient(harm_loss, params)[1][k]) for k in g)  # g itself is left alone


def test_finite_difference_solve_computes_the_base_gradient_once():
    """One-sided products share g(theta*): a solve costs its products plus one gradient, repeats included."""
    params, ft_loss, harm_loss = _mlp_problem()
    lam = torch.linalg.eigvalsh(_exact_hessian(ft_loss, params)).abs().max().item()
    _, g = gradient(harm_loss, params)
    calls = []

    def counted(p):
        calls.append(1)
        return ft_loss(p)

    for gamma, k in ((0.5 / lam, 5), (4.0 / lam, 8)):  # converging; diverging (relaxations, back-offs)
        calls.clear()
        sol = solve(FiniteDifferenceHVP(counted, params), g,
                    HypergradientConfig(richardson_steps=k, gamma=gamma, residual_tol=0))
        assert len(calls) == sol.products + 1
    assert sol.relaxations and sol.products > k  # the repeats shared the same base gradient
    calls.clear()
    solve(FiniteDifferenceHVP(counted, params), g, HypergradientConfig(richardson_steps=5, gamma=0.5 / lam,
                                                                       residual_tol=0))
    assert len(calls) == 5  # K steps from x = 0: K - 1 products and the base, against 2 (K - 1) central


# -- Moreau = unrolled on a quadratic with proximal ADAPT -------------------------------------
def test_moreau_hypergradient_equals_unrolled_on_a_quadratic():
    gen, a, b = _quadratic()
    n = len(a)
    theta = {"w": torch.randn(n, generator=gen, dtype=torch.float64)}
    gamma = 0.5

    def ft_loss(p, step=0):
        return 0.5 * p["w"] @ a @ p["w"] - b @ p["w"]

    def harm(p):
        return torch.sin(p["w"]).sum() + (p["w"] ** 3).sum() / 10

    config = FineTuneConfig(optimizer="sgd", learning_rate=0.2, steps=400, method="full")
    leaves = {"w": theta["w"].clone().requires_grad_()}
    star = adapt(leaves, ft_loss, config, gen, proximal_gamma=gamma, differentiable=True)
    unrolled = torch.autograd.grad(harm(star), [leaves["w"]])[0]

    star_d = adapt(theta, ft_loss, config, gen, proximal_gamma=gamma)
    exact_star = torch.linalg.solve(a + torch.eye(n, dtype=torch.float64) / gamma, b + theta["w"] / gamma)
    assert torch.allclose(star_d["w"], exact_star, atol=1e-10)  # ADAPT ran to the proximal minimiser
    _, g = gradient(harm, star_d)
    lam = torch.linalg.eigvalsh(a).max().item()
    assert gamma * lam < 1
    sol = solve(AutogradHVP(ft_loss, star_d), g, HypergradientConfig(richardson_steps=80, gamma=gamma, hvp="autograd",
                                                                        residual_tol=0))
    assert torch.allclose(sol.x["w"], unrolled, rtol=1e-6, atol=1e-9)


# -- on a tiny UNet ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    pipe = build_tiny_pipeline(TinySpec(sample_size=8), seed=0)
    model = Denoiser(pipe.unet)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen)
    cond = torch.randn(4, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=gen)
    batch = Batch(latents, cond)
    ft = FineTuneBatch(batch, Draw.sample(pipe.scheduler, latents, gen))
    names = attention_weight_names(pipe.unet)
    return pipe, model, ft, names


def test_finite_difference_hvp_matches_autograd_on_a_tiny_unet(tiny):
    """The one-sided difference against the double-backward product, fp32."""
    pipe, model, ft, names = tiny
    theta = model.original(names)

    def loss(p):
        return finetune_loss(model, p, ft)

    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(t.shape, generator=gen) for k, t in theta.items()}
    exact = AutogradHVP(loss, theta)(v)
    approx = FiniteDifferenceHVP(loss, theta, epsilon=FD_EPSILON["fp32"])(v)
    cos = cosine(exact, approx)
    print(f"finite-difference vs autograd HVP cosine: {cos:.6f}")
    assert cos >= 0.99


def test_lora_adapt_leaves_theta_untouched(tiny):
    pipe, model, ft, names = tiny
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    theta = model.original(names)
    theta_copy = {k: v.clone() for k, v in theta.items()}
    config = FineTuneConfig(optimizer="adam", learning_rate=1e-2, steps=3, method="lora", batch_size=4)
    star = adapt(theta, lambda p, s: finetune_loss(model, p, ft), config, torch.Generator().manual_seed(0),
                 lora_names=names)
    for k in theta:
        assert torch.equal(theta[k], theta_copy[k])
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), f"ADAPT modified the module's {k}"
    assert any(not torch.equal(star[k], theta[k]) for k in names)  # and it did fine-tune


def test_merged_lora_computes_what_a_peft_adapter_computes(tiny):
    from peft import LoraConfig, inject_adapter_in_model

    pipe, model, ft, names = tiny
    theta = model.original(names)
    factors = lora_init(theta, 4, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    factors = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in factors.items()}  # B != 0
    ours = model(lora_merge(theta, factors, 1.0), ft.draw.noisy, ft.draw.timesteps, ft.data.cond)

    import copy

    peft_unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v",
                                                                                      "to_out.0"]),
                                        copy.deepcopy(pipe.unet))
    state = {}
    for name in names:
        prefix = name[: -len(".weight")]
        state[f"{prefix}.lora_A.default.weight"] = factors[f"{name}::A"]
        state[f"{prefix}.lora_B.default.weight"] = factors[f"{name}::B"]
    missing = set(state) - {k for k, _ in peft_unet.named_parameters()}
    assert not missing
    peft_unet.load_state_dict(state, strict=False)
    with torch.no_grad():
        theirs = peft_unet(ft.draw.noisy, ft.draw.timesteps, encoder_hidden_states=ft.data.cond).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, model({}, ft.draw.noisy, ft.draw.timesteps, ft.data.cond), atol=1e-3)


# -- conjugate gradient (hypergradient.solver = "cg") ---------------------------------------
def _counted(a):
    calls = []

    def hvp(v):
        calls.append(1)
        return {"w": a @ v["w"]}

    return hvp, calls


def test_cg_solves_a_positive_definite_system_in_n_products_where_richardson_diverges():
    """rho(gamma H) = 4: Richardson's omega = 1 diverges; CG is exact after n products, at the configured gamma."""
    _, a, g = _quadratic()
    n = len(a)
    gamma = 4.0 / torch.linalg.eigvalsh(a).max().item()
    exact = torch.linalg.solve(torch.eye(n, dtype=a.dtype) + gamma * a, g)
    hvp, calls = _counted(a)
    sol = solve(hvp, {"w": g}, HypergradientConfig(solver="cg", richardson_steps=n + 1, gamma=gamma, residual_tol=0))
    assert len(calls) == sol.products == sol.iterations == n  # K = n + 1 steps' budget: n products
    assert not (sol.relaxations or sol.backoffs or sol.fallback) and sol.gamma == gamma and sol.omega == 1.0
    assert torch.allclose(sol.x["w"], exact, rtol=1e-8, atol=1e-10)
    fewer = solve(hvp, {"w": g}, HypergradientConfig(solver="cg", richardson_steps=n, gamma=gamma, residual_tol=0))
    assert fewer.products == n - 1 and not torch.allclose(fewer.x["w"], exact, rtol=1e-5)
    richardson_run = solve(hvp, {"w": g}, HypergradientConfig(richardson_steps=n + 1, gamma=gamma, residual_tol=0))
    assert richardson_run.relaxations  # the same budget diverges at omega = 1


def test_cg_matches_a_dense_solve_and_leaves_g_alone():
    gen, a, _ = _quadratic(n=12, seed=4)
    g = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64),
         "b": torch.randn(6, generator=gen, dtype=torch.float64)}  # two tensors: the foreach paths per key
    before = {k: t.clone() for k, t in g.items()}
    gamma = 2.0 / torch.linalg.eigvalsh(a).max().item()

    def hvp(v):
        return unflat(a @ flat(v), v)

    sol = solve(hvp, g, HypergradientConfig(solver="cg", richardson_steps=30, gamma=gamma, residual_tol=1e-12))
    exact = torch.linalg.solve(torch.eye(12, dtype=a.dtype) + gamma * a, flat(g))
    assert torch.allclose(flat(sol.x), exact, rtol=1e-5, atol=1e-8)
    assert sol.products <= 12 and all(torch.equal(g[k], before[k]) for k in g)


def test_cg_residual_stop_ends_early_at_the_tolerance():
    _, a, g = _quadratic()
    gamma = 0.05 / torch.linalg.eigvalsh(a).max().item()
    hvp, calls = _counted(a)
    sol = solve(hvp, {"w": g}, HypergradientConfig(solver="cg", richardson_steps=20, gamma=gamma, residual_tol=1e-3))
    assert 1 <= sol.iterations == sol.products == len(calls) < len(a)
    residual = g - sol.x["w"] - gamma * a @ sol.x["w"]
    assert residual.norm() <= 1e-3 * g.norm()
    previous = solve(hvp, {"w": g}, HypergradientConfig(solver="cg", richardson_steps=sol.products, gamma=gamma,
                                                        residual_tol=1e-3))
    assert (g - previous.x["w"] - gamma * a @ previous.x["w"]).norm() > 1e-3 * g.norm()  # one step fewer misses it
    zero = solve(hvp, {"w": torch.zeros_like(g)}, HypergradientConfig(solver="cg", residual_tol=0))
    assert zero.products == 0 and torch.equal(zero.x["w"], torch.zeros_like(g))


def test_cg_breakdown_on_an_indefinite_system_is_logged_and_backs_gamma_off(caplog):
    """I + gamma H with an eigenvalue below 0 (H's curvature below -1/gamma): p^T A p <= 0 stops CG."""
    gen, _, g = _quadratic()
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.tensor([-4.0, 0.5, 1.0, 2.0, 3.0, 5.0], dtype=torch.float64)) @ q.T
    config = HypergradientConfig(solver="cg", richardson_steps=20, gamma=1.0, residual_tol=0)
    sol = solve(lambda v: {"w": h @ v["w"]}, {"w": g}, config)
    event = sol.backoffs[0]
    assert event["gamma"] == 1.0 and event["curvature"] <= 0 and 1 <= event["breakdown"] <= 6
    assert event["new_gamma"] <= 0.5 / (1 - event["curvature"]) + 1e-12  # 1 + gamma' h >= 1/2 along that p
    assert "broke down" in caplog.text and "last resort" in caplog.text
    assert not sol.relaxations and not sol.fallback and sol.gamma < 0.25  # I + gamma H definite again
    exact = torch.linalg.solve(torch.eye(6, dtype=h.dtype) + sol.gamma * h, g)
    assert torch.allclose(sol.x["w"], exact, rtol=1e-8)
    assert sol.products == sum(e["breakdown"] for e in sol.backoffs) + sol.iterations

    caplog.clear()
    spent = solve(lambda v: {"w": h @ v["w"]}, {"w": g}, HypergradientConfig(solver="cg", gamma=1.0, max_backoffs=0,
                                                                            richardson_steps=20, residual_tol=0))
    assert spent.fallback and torch.equal(spent.x["w"], g) and not spent.backoffs
    assert "no back-off left" in caplog.text and "first-order" in caplog.text


@pytest.mark.parametrize("mapping,message", [
    ({"solver": "newton"}, "hypergradient.solver must be 'richardson' or 'cg' (got 'newton')"),
    ({"solver": "cg", "richardson_steps": 1}, "hypergradient.richardson_steps must be at least 2 with solver = 'cg'"),
])
def test_cg_config_is_validated_by_name(mapping, message):
    base = {"model": "m", "output": "o", "data": {"harmful": "h", "preservation": "p", "finetune": "f"}}
    with pytest.raises(ConfigError) as err:
        config_from_mapping({**base, "hypergradient": mapping})
    assert str(err.value).startswith(message) and err.value.field == message.split()[0]
    assert config_from_mapping(base).hypergradient.solver == "richardson"  # the paper's Alg. 1 stays the default


@pytest.mark.parametrize("gamma", [1.0, 4.0])
def test_cg_on_a_tiny_unet_matches_the_exact_solve_at_no_more_products_than_richardson(tiny, gamma):
    """One-sided products, the default K = 5 and residual stop. At gamma = 4 rho(gamma H) > 1 and Richardson relaxes
    (more products) while I + gamma H stays definite; gamma = 1 is well-conditioned for both."""
    pipe, model, ft, names = tiny
    theta = model.original(names)
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 4, 8, 8, generator=gen)
    harm_batch = Batch(latents, torch.randn(4, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size,
                                            generator=gen))
    harm_draw = Draw.sample(pipe.scheduler, latents, gen)
    _, g = gradient(lambda p: HarmLoss("ga")(model, p, {}, harm_batch, harm_draw), theta)

    def loss(p):
        return finetune_loss(model, p, ft)

    exact = solve(AutogradHVP(loss, theta), g, HypergradientConfig(solver="cg", hvp="autograd", gamma=gamma,
                                                                   richardson_steps=100, residual_tol=1e-7))
    assert not exact.backoffs and exact.products < 99  # converged: I + gamma H is definite on this Krylov space
    runs = {solver: solve(FiniteDifferenceHVP(loss, theta), g, HypergradientConfig(solver=solver, gamma=gamma))
            for solver in ("richardson", "cg")}
    cos = {solver: cosine(run.x, exact.x) for solver, run in runs.items()}
    print(f"gamma={gamma}: cosine to the exact solve {cos}, products {[r.products for r in runs.values()]}")
    assert cos["cg"] >= 0.99 and cos["cg"] >= cos["richardson"] - 1e-4
    assert runs["cg"].products <= min(4, runs["richardson"].products)
    assert not (runs["cg"].backoffs or runs["cg"].fallback)
    if gamma > 1:
        assert runs["richardson"].relaxations and runs["richardson"].products > runs["cg"].products
