"""What the gate's audit of a job costs next to the job: seconds of the default audit / seconds of the LoRA job.

On the hardened shapes world (CPU; the demo's base model, probe set and policy) in one process: the demo's
LoRA job is trained, then audited on the profile's probes as ``gate.pipeline.audit.audit_checkpoint`` does
(fused LoRA at each of the gate's scales, paired with the base model's baseline) with the sequential audit
and with every image rendered. The gate's job probe families and model-side check come on top of this;
``benchmarks.evasion`` measures the whole audit against this part. The baseline is timed separately: it is
audited once per base model and profile, for every job. Renders are never cached between the variants, so
each one pays its own.

    python -m benchmarks.audit_cost            # one JSON line
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from alignment.hardened_world import materialize
from auditing.audit import AuditInputs, run_audit, strictest_scale
from auditing.models.hashing import weights_sha256
from auditing.models.loading import load_adapter, load_pipeline
from auditing.shapes.datasets import dataset_items, unrelated_concepts, unsafe_probes, write_probe_csv
from auditing.shapes.scene import Concept
from auditing.verdict import VerdictPolicy
from gate.demo import DATASET_IMAGES, DATASET_SEED, HYPERPARAMETERS, IMAGES_PER_PROBE, POLICY, UNSAFE
from gate.pipeline.audit import audit_scales
from gate.pipeline.profile import AuditProfile
from gate.settings import Limits
from gate.training import train_job

GOAL = 1.0


def main() -> None:
    torch.set_num_threads(1)
    unsafe = Concept.parse(UNSAFE)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = materialize(tmp / "world")
        model_sha = weights_sha256(model)
        probes = tmp / "unsafe.csv"
        write_probe_csv(probes, unsafe_probes(unsafe), seed=0, guidance_scale=5.0)
        profile = AuditProfile(probes=str(probes), detector="shapes", detector_options={"concept": UNSAFE},
                               images_per_prompt=IMAGES_PER_PROBE, inference_steps=20, guidance_scale=5.0,
                               batch_size=64, us_classifier=None)
        policy = VerdictPolicy(**POLICY)
        detector = profile.load_detector()
        examples = [(im, cap) for im, cap, _ in dataset_items(unsafe, DATASET_IMAGES, 0.0, DATASET_SEED,
                                                               pool=unrelated_concepts(unsafe))]

        started = time.perf_counter()
        lora = train_job("lora", load_pipeline(model), examples, HYPERPARAMETERS, tmp / "job").weights
        train_s = time.perf_counter() - started

        started = time.perf_counter()
        inputs = AuditInputs(str(model), model_sha, profile.load_probes(), policy=policy,
                             render=profile.render_settings())
        baseline = run_audit(load_pipeline(model), detector, inputs).report
        baseline_s = time.perf_counter() - started

        result = {"benchmark": "audit_cost", "device": "cpu", "base": "hardened shapes world",
                  "train_seconds": round(train_s, 1), "baseline_seconds": round(baseline_s, 1),
                  "images_planned": len(baseline["samples"]), "lora_scales": audit_scales("lora", Limits()),
                  "goal": GOAL}
        for name, plan in (("sequential", profile.sequential_plan()), ("full", None)):
            started = time.perf_counter()
            outcomes = []
            for scale in audit_scales("lora", Limits()):
                scaled = replace(inputs, baseline=baseline, adapter_path=str(lora), adapter_sha256="benchmark",
                                 adapter_scale=scale, sequential=plan)
                outcomes.append((scale, run_audit(load_adapter(load_pipeline(model), lora, scale), detector, scaled)))
            report = strictest_scale(outcomes).report
            seconds = time.perf_counter() - started
            result[name] = {"audit_seconds": round(seconds, 1), "audit_over_train": round(seconds / train_s, 3),
                            "images_rendered": sum(e["images"] for e in report["lora_scales"]),
                            "decision": report["verdict"]["decision"]}
        result["met"] = result["sequential"]["audit_over_train"] <= GOAL
        print(json.dumps(result))


if __name__ == "__main__":
    main()
