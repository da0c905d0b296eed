"""Models as users keep them: weight variants, a separate VAE, a single-file checkpoint with its config folder;
loaded, hashed and used by the gate's stages with the same files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditing.models.hashing import weights_sha256
from auditing.models.loading import load_pipeline
from auditing.models.single_file import export_single_file
from auditing.models.sources import ModelSourceError, pipeline_files, weight_variant
from auditing.models.tiny import build_tiny_pipeline

UNET = "unet/diffusion_pytorch_model.safetensors"


def _same(module, other) -> bool:
    a, b = module.state_dict(), other.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``plain``: seed 1 saved plainly; ``both``: seed 1 plain plus seed 2 as the fp16 variant; ``fp16``: seed 2 as
    the variant only; ``vae``: seed 3's VAE alone; ``own_vae``: seed 1's VAE alone. Pipelines by seed."""
    root = tmp_path_factory.mktemp("models")
    pipes = {seed: build_tiny_pipeline(seed=seed) for seed in (1, 2, 3)}
    pipes[1].save_pretrained(root / "plain")
    pipes[1].save_pretrained(root / "both")
    pipes[2].save_pretrained(root / "both", variant="fp16")
    pipes[2].save_pretrained(root / "fp16", variant="fp16")
    pipes[3].vae.save_pretrained(root / "vae")
    pipes[1].vae.save_pretrained(root / "own_vae")
    return root, pipes


def test_weight_variant_reads_diffusers_names():
    assert weight_variant("diffusion_pytorch_model.safetensors") is None
    assert weight_variant("model-00001-of-00002.safetensors") is None
    assert weight_variant("diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert weight_variant("model.fp16-00001-of-00002.safetensors") == "fp16"
    assert weight_variant("diffusion_pytorch_model.non_ema.safetensors") == "non_ema"


def test_variant_loads_the_variant_files_and_hashes_them(models):
    root, pipes = models
    assert _same(load_pipeline(root / "both").unet, pipes[1].unet)
    assert _same(load_pipeline(root / "both", variant="fp16").unet, pipes[2].unet)
    # The plain hash ignores the variant files beside the plain ones; the variant's covers its own files only.
    assert weights_sha256(root / "both") == weights_sha256(root / "plain")
    assert weights_sha256(root / "both", variant="fp16") == weights_sha256(root / "fp16", variant="fp16")
    assert weights_sha256(root / "both", variant="fp16") != weights_sha256(root / "both")
    files = pipeline_files(root / "both", variant="fp16")
    assert {p.name for rel, p in files.items() if rel.suffix == ".safetensors"} == {
        "model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors"}


def test_variant_hash_tracks_the_variant_weights(models, tmp_path):
    root, _ = models
    shutil.copytree(root / "both", tmp_path / "m")
    plain, fp16 = weights_sha256(tmp_path / "m"), weights_sha256(tmp_path / "m", variant="fp16")
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    state = load_file(weights)
    key = next(iter(state))
    state[key] = state[key] + 1e-3
    save_file(state, weights)
    assert weights_sha256(tmp_path / "m") == plain
    assert weights_sha256(tmp_path / "m", variant="fp16") != fp16


def test_variant_errors_name_the_variant_and_the_folder(models, tmp_path):
    root, _ = models
    with pytest.raises(ModelSourceError, match=r"text_encoder: no \*\.bf16\.safetensors weights \(has model") as exc:
        load_pipeline(root / "both", variant="bf16")
    assert exc.value.field == "variant"
    with pytest.raises(ModelSourceError, match="no plain") as exc:  # only fp16 files: diffusers would fail late
        weights_sha256(root / "fp16")
    assert exc.value.field == "variant"
    with pytest.raises(ModelSourceError, match="letters, digits") as exc:
        pipeline_files(root / "both", variant="../fp16")
    assert exc.value.field == "variant"
    shutil.copytree(root / "both", tmp_path / "m")
    (tmp_path / "m" / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()  # no silent fallback
    with pytest.raises(ModelSourceError, match=f"{tmp_path / 'm' / 'vae'}: no"):
        load_pipeline(tmp_path / "m", variant="fp16")


def test_vae_override_changes_the_vae_and_the_hash(models):
    root, pipes = models
    loaded = load_pipeline(root / "plain", vae=root / "vae")
    assert _same(loaded.vae, pipes[3].vae) and _same(loaded.unet, pipes[1].unet)
    assert weights_sha256(root / "plain", vae=root / "vae") != weights_sha256(root / "plain")
    # The hash is of the files loaded: a VAE folder holding the model's own VAE loads what the folder would.
    assert weights_sha256(root / "plain", vae=root / "own_vae") == weights_sha256(root / "plain")
    both = load_pipeline(root / "both", variant="fp16", vae=root / "vae")  # the VAE need not have the variant
    assert _same(both.vae, pipes[3].vae) and _same(both.unet, pipes[2].unet)


def test_vae_errors_name_the_vae_folder(models, tmp_path):
    root, _ = models
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "no such VAE folder"), (tmp_path / "empty", "no config.json"),
             (root / "plain" / "unet", "UNet2DConditionModel', not an AutoencoderKL")]
    for folder, message in cases:
        with pytest.raises(ModelSourceError, match=message) as exc:
            load_pipeline(root / "plain", vae=folder)
        assert exc.value.field == "vae" and str(folder) in str(exc.value)


def test_single_file_hash_is_the_file_and_its_config_folders_configs(models, tmp_path):
    root, pipes = models
    export_single_file(pipes[1], tmp_path / "model.safetensors")
    shutil.copytree(root / "plain", tmp_path / "config")
    single = weights_sha256(tmp_path / "model.safetensors", config=tmp_path / "config")
    assert single != weights_sha256(tmp_path / "model.safetensors")  # the configs count too
    files = pipeline_files(tmp_path / "model.safetensors", config=tmp_path / "config")
    assert [p for p in files.values() if p.suffix == ".safetensors"] == [tmp_path / "model.safetensors"]
    (tmp_path / "config" / UNET).unlink()  # the config folder's weights are not read
    assert weights_sha256(tmp_path / "model.safetensors", config=tmp_path / "config") == single
    scheduler = tmp_path / "config" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"steps_offset": 0}))
    assert weights_sha256(tmp_path / "model.safetensors", config=tmp_path / "config") != single
    loaded = load_pipeline(tmp_path / "model.safetensors", config=tmp_path / "config", vae=root / "vae")
    assert _same(loaded.vae, pipes[3].vae)
    with pytest.raises(ModelSourceError, match="not in one checkpoint") as exc:
        load_pipeline(tmp_path / "model.safetensors", config=tmp_path / "config", variant="fp16")
    assert exc.value.field == "variant"
    with pytest.raises(ModelSourceError, match="needs config") as exc:
        pipeline_files(tmp_path / "model.safetensors")
    assert exc.value.field == "config"
    with pytest.raises(ModelSourceError, match="config is for a single-file") as exc:
        pipeline_files(root / "plain", config=tmp_path / "config")
    assert exc.value.field == "config"


@pytest.fixture
def rt(tmp_path):
    from gate.pipeline.runtime import Runtime
    from gate.settings import Settings
    from gate.storage.db import upgrade

    state = tmp_path / "state"
    settings = Settings(state_dir=state, database_url=f"sqlite:///{tmp_path / 'ftgate.db'}", broker_url=None,
                        artifacts_dir=state / "artifacts", lease_seconds=30)
    upgrade(settings.database_url)
    rt = Runtime.open(settings)
    yield rt
    rt.engine.dispose()


def test_every_stage_loads_the_base_model_as_registered(models, rt, tmp_path, monkeypatch):
    """The baseline renders the variant's weights with the VAE override (and its hash check passes on those
    files); training and the checkpoint audit load the base model with the same arguments."""
    import io

    from test_api import RedScanner
    from test_pipeline import world_zip

    import auditing.models.loading as loading
    from gate.auth import ensure_tenant
    from gate.intake import IntakeLimits, ingest
    from gate.pipeline import audit, train
    from gate.storage.audit_log import SYSTEM
    from gate.storage.models import Artifact, BaseModel, Dataset, Job

    root, pipes = models
    probes = tmp_path / "probes.csv"
    probes.write_text("prompt\na red triangle\n")
    source = {"variant": "fp16", "vae": str(root / "vae")}
    with rt.sessions() as s:
        ensure_tenant(s, "acme", SYSTEM)
        base = BaseModel(name="tiny", path=str(root / "both"), variant="fp16", vae_path=str(root / "vae"),
                         weights_sha256=weights_sha256(root / "both", **source),
                         audit_profile={"probes": str(probes), "detector": "shapes", "inference_steps": 2,
                                        "detector_options": {"concept": "red triangle"}, "us_classifier": None})
        dataset = Dataset(tenant_id="acme", name="d", status="accepted", content_sha256="0" * 64,
                          artifact_path="k", size_bytes=1)
        s.add_all([base, dataset])
        s.flush()
        ingest(io.BytesIO(world_zip()), IntakeLimits(), rt.settings.dataset_folder("acme", dataset.id), RedScanner())
        job = Job(tenant_id="acme", base_model_id=base.id, dataset_id=dataset.id, method="lora", hyperparameters={})
        s.add(job)
        s.commit()
        base_id, job_id = base.id, job.id

    calls, real = [], loading.load_pipeline

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        pipe = real(*args, **kwargs)
        assert _same(pipe.unet, pipes[2].unet) and _same(pipe.vae, pipes[3].vae)
        if len(calls) > 1:  # past the baseline: no need to train or render
            raise RuntimeError("loaded as registered")
        return pipe

    monkeypatch.setattr(loading, "load_pipeline", spy)
    assert audit.ensure_baseline(rt, base_id)["model"]["sha256"] == weights_sha256(root / "both", **source)
    with pytest.raises(RuntimeError, match="loaded as registered"):
        train.train(rt, job_id, "w1/a")
    stored = rt.store.put("acme", io.BytesIO(b"a LoRA"), suffix=".safetensors")
    artifact = Artifact(tenant_id="acme", job_id=job_id, kind="lora", sha256=stored.sha256, path=stored.key,
                        size_bytes=stored.size_bytes)
    with rt.sessions() as s:
        base, job = s.get(BaseModel, base_id), s.get(Job, job_id)
    outcome = audit.audit_checkpoint(rt, base, artifact, job)
    assert "loaded as registered" in outcome.report["verdict"]["reasons"][0]
    assert [kwargs["variant"] for _, kwargs in calls] == ["fp16"] * 3
    assert [kwargs["vae"] for _, kwargs in calls] == [str(root / "vae")] * 3


def test_audit_command_loads_and_records_the_variant_vae_and_config(models, tmp_path, capsys):
    from gate.cli import main

    root, pipes = models
    probes = tmp_path / "probes.csv"
    probes.write_text("prompt\na red triangle\n")
    common = ["--probes", str(probes), "--detector", "shapes", "--detector-option", "concept=red triangle",
              "--us-classifier", "none", "--steps", "2", "--device", "cpu"]
    code = main(["audit", "--model", str(root / "both"), "--variant", "fp16", "--vae", str(root / "vae"), *common,
                 "--out", str(tmp_path / "a")])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert code == {"pass": 0, "flag": 1, "block": 2}[report["verdict"]["decision"]]
    assert report["model"]["sha256"] == weights_sha256(root / "both", variant="fp16", vae=root / "vae")
    export_single_file(pipes[1], tmp_path / "model.safetensors")
    main(["audit", "--model", str(tmp_path / "model.safetensors"), "--config", str(root / "plain"), *common,
          "--out", str(tmp_path / "single")])
    report = json.loads((tmp_path / "single" / "report.json").read_text())
    assert report["model"]["sha256"] == weights_sha256(tmp_path / "model.safetensors", config=root / "plain")
    assert "audit incomplete" not in report["verdict"]["reasons"][0]
    assert main(["audit", "--model", str(root / "both"), "--vae", str(tmp_path / "nope"), *common,
                 "--out", str(tmp_path / "b")]) == 2
    assert f"{tmp_path / 'nope'}: no such VAE folder" in capsys.readouterr().err
