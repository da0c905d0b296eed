"""``ftgate align`` end to end on a tiny model: records, checkpoints, resume, output, config errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from alignment.config import config_from_mapping, load_config
from alignment.run import run_alignment
from auditing.config import ConfigError
from auditing.models.loading import load_pipeline
from auditing.models.tiny import TinySpec, build_tiny_pipeline

CONFIG = """
model = "model"
output = "out"
seed = 7

[data]
harmful = "harmful"
preservation = "preservation.csv"
finetune = "finetune"
batch_size = 2

[generation]
inference_steps = 2
guidance_scale = 2.0
batch_size = 4

[objective]
harm = "{harm}"
harm_bound = 2.0

[outer]
steps = 4
samples = 2
learning_rate = 1e-3
scope = "{scope}"
checkpoint_every = 2

[hypergradient]
method = "{method}"
hvp = "{hvp}"
richardson_steps = 2

[distribution]
learning_rates = [1e-3]
steps = [2]
batch_sizes = [2]
max_lr_steps = 1.0
"""


def _folder(path, caption, colour, n=6):
    path.mkdir()
    rng = random.Random(0)
    for i in range(n):
        image = Image.new("RGB", (16, 16), tuple(min(255, c + rng.randrange(40)) for c in colour))
        image.save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(caption)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    build_tiny_pipeline(TinySpec(sample_size=8), seed=0).save_pretrained(root / "model", safe_serialization=True)
    _folder(root / "harmful", "a red triangle", (200, 0, 0))
    _folder(root / "finetune", "a blue circle", (0, 0, 200))
    (root / "preservation.csv").write_text("prompt\na blue circle\na green square\n")
    return root


def _config(root, name, harm="ga", scope="attention-lora", method="moreau", hvp="finite-difference", extra=""):
    path = root / f"{name}.toml"
    path.write_text(CONFIG.format(harm=harm, scope=scope, method=method, hvp=hvp).replace('output = "out"',
                                                                                       f'output = "{name}"') + extra)
    return path


def _records(folder):
    rows = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds"), r.pop("peak_memory_mb")
    return rows


def test_resume_continues_bit_for_bit(workspace):
    straight = run_alignment(_config(workspace, "straight"))
    config = _config(workspace, "resumed")
    work = run_alignment(config, stop_after=2)
    assert work.name == "resumed.work" and not (workspace / "resumed").exists()
    resumed = run_alignment(config, resume=True)
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(straight) == _records(resumed)
    base = load_file(workspace / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert changed and all(".attn" in k and k.endswith(".weight") for k in changed)  # only the LoRA scope moved


def test_output_folder_manifest_records_and_plot(workspace):
    out = workspace / "straight"
    if not out.exists():
        run_alignment(_config(workspace, "straight"))
    manifest = json.loads((out / "alignment.json").read_text())
    assert manifest["steps"] == 4 and manifest["seed"] == 7
    assert set(manifest["inputs"]) == {"harmful", "preservation", "finetune"}
    assert manifest["inputs"]["preservation"]["kind"] == "probes"  # rendered by the base model
    assert len(manifest["base_model"]["sha256"]) == 64 and len(manifest["output_sha256"]) == 64
    rows = _records(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    sample = rows[0]["samples"][0]
    assert {"config", "L_harm_star", "hypergradient_norm", "gamma", "omega", "relaxations", "backoffs"} <= set(sample)
    assert {"backoffs", "relaxations"} <= set(rows[0])
    solves = [s for r in rows for s in r["samples"]]  # K = 2: at most one product per solve that is kept
    assert all(1 <= s["iterations"] <= 2 and s["products"] >= s["iterations"] - 1 for s in solves)
    assert manifest["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # device = "auto"
    assert sample["config"]["learning_rate"] == 1e-3
    with Image.open(out / "curves.png") as plot:
        assert plot.format == "PNG" and plot.width > 300
    load_pipeline(out)  # a loadable diffusers folder


def test_existing_output_or_work_folder_is_not_overwritten(workspace):
    config = _config(workspace, "twice")
    run_alignment(config, stop_after=1)
    with pytest.raises(FileExistsError, match="--resume"):
        run_alignment(config)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_alignment(_config(workspace, "never-started"), resume=True)


@pytest.mark.parametrize("harm,scope,method,hvp", [
    ("esd", "attention", "moreau", "autograd"),
    ("ablation", "full", "first-order", "finite-difference"),
    ("ga", "attention", "unrolled", "finite-difference"),
])
def test_every_loss_scope_and_hypergradient_runs(workspace, harm, scope, method, hvp):
    name = f"{harm}-{scope}-{method}"
    out = run_alignment(_config(workspace, name, harm, scope, method, hvp))
    rows = _records(out)
    assert all(torch.isfinite(torch.tensor(r["objective"])) for r in rows)
    if method == "moreau":
        assert all(s["gamma"] is not None for r in rows for s in r["samples"])


@pytest.mark.parametrize("patch,message", [
    (("steps = 4", "steps = 0"), "outer.steps must be greater than or equal to 1 (got 0)"),
    (("steps = 4", "steps = 2000000"), "outer.steps must be less than or equal to 1000000 (got 2000000)"),
    (('scope = "attention-lora"', 'scope = "everything"'),
     "outer.scope must be 'attention-lora', 'attention' or 'full' (got 'everything')"),
    (("learning_rate = 1e-3\nscope", "learning_rate = 5.0\nscope"),
     "outer.learning_rate must be less than or equal to 1 (got 5.0)"),
    (('method = "moreau"', 'method = "newton"'), "hypergradient.method must be 'moreau', 'first-order', "
                                                 "'unrolled' or 'random-perturbation' (got 'newton')"),
    (("richardson_steps = 2", "richardson_steps = 0"),
     "hypergradient.richardson_steps must be greater than or equal to 1 (got 0)"),
    (("richardson_steps = 2", "richardson_steps = 2\nresidual_tol = 1.5"),
     "hypergradient.residual_tol must be less than 1 (got 1.5)"),
    (('harm = "ga"', 'harm = "forget"'), "objective.harm must be 'ga', 'esd' or 'ablation' (got 'forget')"),
    (("harm_bound = 2.0", "harm_bound = -1.0"), "objective.harm_bound must be greater than 0 (got -1.0)"),
    (("batch_size = 2\n\n[gen", "batch_size = 0\n\n[gen"),
     "data.batch_size must be greater than or equal to 1 (got 0)"),
    (("inference_steps = 2", "inference_steps = 0"),
     "generation.inference_steps must be greater than or equal to 1 (got 0)"),
    (("steps = [2]", "steps = []"), "distribution.steps must have at least 1 item"),
    (("steps = [2]", 'steps = ["two"]'), "distribution.steps[0] must be a valid integer (got 'two')"),
    (("steps = [2]", "steps = [0]"), "distribution.steps[0] must be greater than or equal to 1 (got 0)"),
    (("steps = [2]", 'steps = [2]\nlosses = ["standard", "forget"]'),
     "distribution.losses[1] must be 'standard' or 'prior' (got 'forget')"),
    (("max_lr_steps = 1.0", "max_lr_steps = 1e-9"), "distribution.max_lr_steps = 1e-09 excludes every configuration"),
    (("seed = 7", "seed = 7\ncolour = 1"), "colour is not a known field; allowed: ['model', 'output', 'data',"),
    (("[outer]", "[outer]\nspeed = 1"), "outer.speed is not a known field; allowed: ['steps', 'samples',"),
    (("steps = 4", 'steps = "four"'), "outer.steps must be a valid integer (got 'four')"),
    (("steps = 4", "steps = true"), "outer.steps must be a valid integer (got True)"),
    (('finetune = "finetune"', 'finetune = ["finetune", "harmful"]\nfinetune_shares = [0.9, 0.2]'),
     "data.finetune_shares must sum to 1 (got [0.9, 0.2])"),
    (('finetune = "finetune"', 'finetune = ["finetune", "harmful"]\nfinetune_shares = [1.5, -0.5]'),
     "data.finetune_shares[0] must be less than or equal to 1 (got 1.5)"),
    (('finetune = "finetune"', 'finetune = ["finetune", "harmful"]\nfinetune_shares = [1.0]'),
     "data.finetune_shares must have one share per finetune set (2; got 1)"),
    (('finetune = "finetune"', 'finetune = []'), "data.finetune must name a folder or a probe CSV"),
    (('finetune = "finetune"', 'finetune = ["finetune", 3]'), "data.finetune[1] must be a valid string (got 3)"),
    (('finetune = "finetune"', 'finetune = 3'), "data.finetune must name a folder or a probe CSV, or list several"),
    (("seed = 7", 'seed = 7\ndevice = "tpu"'), "device must match pattern '^(auto|cpu|cuda(:\\d+)?)$' (got 'tpu')"),
    (("seed = 7", 'seed = 7\nprecision = "fp64"'), "precision must be 'fp32', 'bf16' or 'fp16' (got 'fp64')"),
    (('output = "out"', 'output = " "'), "output must not be blank (got ' ')"),
])
def test_bad_config_fields_are_named(tmp_path, patch, message):
    assert_config_error(tmp_path, patch, message)


def assert_config_error(tmp_path, patch: tuple[str, str], message: str) -> None:
    """The test config with ``patch`` (old, new) applied fails to load with ``message``, naming its field."""
    text = CONFIG.format(harm="ga", scope="attention-lora", method="moreau", hvp="finite-difference")
    assert patch[0] in text
    path = tmp_path / "c.toml"
    path.write_text(text.replace(patch[0], patch[1], 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(message) and err.value.field == message.split()[0]


def test_every_shipped_config_loads():
    """The packaged TOML configs, and the config recorded in the hardened world's manifest, exactly."""
    root = Path(__file__).resolve().parents[1] / "alignment"
    tomls = sorted((root / "configs").glob("*.toml"))
    assert tomls and all(load_config(path).data.harmful for path in tomls)
    manifests = sorted((root / "pretrained").glob("*.json"))
    assert manifests
    for path in manifests:
        recorded = json.loads(path.read_text())["alignment"]["config"]
        loaded = json.loads(json.dumps(config_from_mapping(recorded).as_dict()))
        for key, value in recorded.items():  # fields added since it was recorded take their defaults
            assert ({f: loaded[key][f] for f in value} if isinstance(value, dict) else loaded[key]) == value


def test_a_config_that_is_not_a_table_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- model\n")
    with pytest.raises(ConfigError, match=r"^config must be a table/mapping \(got \['model'\]\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="^data is required"):
        config_from_mapping({"model": "m", "output": "o"})


def test_yaml_config_reads_like_toml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noutput: o\ndata: {harmful: h, preservation: p.csv, finetune: f}\n"
                    "outer: {steps: 3, clip_norm: null}\ndistribution: {learning_rates: [0.001, 0.0001]}\n")
    config = load_config(path)
    assert config.outer.steps == 3 and config.outer.clip_norm is None
    assert config.distribution.learning_rates == (1e-3, 1e-4)


@pytest.mark.parametrize("precision, hvp", [
    ("fp32", "autograd"),  # double backward through recomputed blocks, under the math kernel
    pytest.param("bf16", "finite-difference", marks=pytest.mark.slow),  # bf16 on CPU: ~20 s
    pytest.param("bf16", "autograd", marks=pytest.mark.slow),
])
def test_checkpointed_runs_at_each_precision(workspace, precision, hvp):
    config = _config(workspace, f"ckpt-{precision}-{hvp}", hvp=hvp)
    config.write_text(config.read_text().replace(
        "seed = 7", f'seed = 7\nprecision = "{precision}"\ngradient_checkpointing = true'))
    rows = _records(run_alignment(config))
    assert len(rows) == 4 and all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)


def test_unlearning_alone_runs_no_inner_fine_tuning(workspace, monkeypatch):
    """beta = 0 is Eq. 2 alone: no ADAPT runs, no hypergradients, and the weights still move."""
    import alignment.outer

    def no_adapt(*args, **kwargs):
        raise AssertionError("ADAPT ran although beta = 0")

    monkeypatch.setattr(alignment.outer, "adapt", no_adapt)
    config = _config(workspace, "unlearn-only")
    config.write_text(config.read_text().replace('harm_bound = 2.0', 'harm_bound = 2.0\nbeta = 0.0'))
    out = run_alignment(config)
    rows = _records(out)
    assert all(r["samples"] == [] and r["L_harm_star_mean"] is None for r in rows)
    a = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(workspace / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)


@pytest.mark.parametrize("sampling", ["resample", "fixed"])
def test_fixed_finetune_sampling_repeats_the_same_batches(workspace, monkeypatch, sampling):
    """The "no meta over data" ablation: every outer step fine-tunes on identical batches and noise."""
    from alignment.outer import Aligner

    seen = []
    real = Aligner._finetune_batch

    def spy(self, config, rng=None, generator=None):
        batch = real(self, config, rng, generator)
        seen.append((self.step_index, batch.data.latents.clone(), batch.draw.noisy.clone()))
        return batch

    monkeypatch.setattr(Aligner, "_finetune_batch", spy)
    config = _config(workspace, f"sampling-{sampling}")
    config.write_text(config.read_text().replace("batch_size = 2\n\n[gen",
                                                 f'batch_size = 2\nfinetune_sampling = "{sampling}"\n\n[gen'))
    run_alignment(config, stop_after=2)
    first = [(lat, noisy) for step, lat, noisy in seen if step == 0]
    second = [(lat, noisy) for step, lat, noisy in seen if step == 1]
    assert first and len(first) == len(second)
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert same == (sampling == "fixed")


def test_mixed_finetune_data_draws_each_set_by_its_share(workspace, monkeypatch):
    """D_FT as a mixture (App. B.4): benign and harmful sets, each example's set drawn by its share."""
    from alignment.data import EncodedSet

    drawn = []
    real = EncodedSet.draw

    def spy(self, rng, size):
        index = real(self, rng, size)
        if self.parts:
            drawn.append((self.parts, index))
        return index

    monkeypatch.setattr(EncodedSet, "draw", spy)
    config = _config(workspace, "mixed")
    config.write_text(config.read_text().replace('finetune = "finetune"',
                                                 'finetune = ["finetune", "harmful"]\nfinetune_shares = [0.75, 0.25]'))
    out = run_alignment(config)
    sources = json.loads((out / "alignment.json").read_text())["inputs"]["finetune"]
    assert [(s["path"].rsplit("/", 1)[-1], s["share"]) for s in sources] == [("finetune", 0.75), ("harmful", 0.25)]
    parts = drawn[0][0]
    assert parts == ((0, 6, 0.75), (6, 12, 0.25))
    index = torch.cat([i for _, i in drawn])
    harmful = int((index >= 6).sum())
    print(f"{harmful} of {len(index)} fine-tuning examples from the harmful set")
    assert len(index) >= 40 and 0.1 * len(index) <= harmful <= 0.4 * len(index)


def test_world_config_has_the_papers_beta_and_default_device():
    from pathlib import Path

    from alignment.config import ObjectiveConfig

    config = load_config(Path(__file__).resolve().parents[1] / "alignment" / "configs" / "shapes-world.toml")
    assert 0.8 <= config.objective.beta < 1 and config.objective.beta == ObjectiveConfig().beta  # Tab. 14
    assert config.device == "auto" and config.precision == "fp32"
