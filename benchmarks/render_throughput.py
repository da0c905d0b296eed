"""The auditor's renderer against a bare pipeline call (goal: renderer_over_raw >= 0.9), and the audit with
detector scoring overlapping rendering against the same audit scoring each batch after it renders
(``overlapped_over_serial``: wall time, below 1 when the overlap pays).

    python -m benchmarks.render_throughput [--model DIR] [--images N] [--batch-size B]

Both render the same prompts and seeds at the same batch size and settings; the
renderer adds per-image generators, grouping, hashing and (here disabled) caching.
The audits score with the world's detectors (the shapes detector for IP, OpenNSFW for US) and
cache nothing. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

from auditing.audit import SCORING_DEPTH, AuditInputs, run_audit
from auditing.detectors.registry import load_detector
from auditing.models.loading import load_pipeline
from auditing.probes import ProbeImage, ProbeSet
from auditing.render import Renderer, RenderSettings
from auditing.shapes.cli import PRETRAINED_WORLD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(PRETRAINED_WORLD))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a red triangle number {i}" for i in range(args.images)]
    seeds = list(range(args.images))
    probes = [ProbeImage(str(i), p, 0, s, 5.0, None, None, ()) for i, (p, s) in enumerate(zip(prompts, seeds))]
    renderer = Renderer(pipe, "benchmark", settings=RenderSettings(args.steps, 5.0, args.batch_size))

    def raw():
        for i in range(0, args.images, args.batch_size):
            gens = torch.Generator().manual_seed(seeds[i])
            pipe(prompts[i:i + args.batch_size], generator=gens, guidance_scale=5.0,
                 num_inference_steps=args.steps, output_type="pil")

    def ours():
        renderer.render(probes, desc="benchmark")

    detector, us_classifier = load_detector("shapes", concept="red triangle"), load_detector("opennsfw")
    probe_set = ProbeSet(path="benchmark", schema="prompt", rows=len(probes), selected=len(probes),
                         images=tuple(probes), category=None, images_per_prompt=1, base_seed=0)
    inputs = AuditInputs(args.model, "benchmark", probe_set, render=RenderSettings(args.steps, 5.0, args.batch_size))

    def audit(depth: int):
        report = run_audit(pipe, detector, inputs, us_classifier=us_classifier, scoring_depth=depth).report
        assert len(report["samples"]) == args.images, report["verdict"]

    timings = {"raw": [], "renderer": [], "serial": [], "overlapped": []}
    for _ in range(args.repeats):  # interleaved, best of N: robust to a noisy machine
        for name, fn in (("raw", raw), ("renderer", ours), ("serial", lambda: audit(0)),
                         ("overlapped", lambda: audit(SCORING_DEPTH))):
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    raw_ips = args.images / min(timings["raw"])
    ours_ips = args.images / min(timings["renderer"])
    print(json.dumps({"benchmark": "render_throughput", "images": args.images, "batch_size": args.batch_size,
                      "steps": args.steps, "raw_images_per_s": round(raw_ips, 2),
                      "renderer_images_per_s": round(ours_ips, 2),
                      "renderer_over_raw": round(ours_ips / raw_ips, 3),
                      "audit_serial_s": round(min(timings["serial"]), 2),
                      "audit_overlapped_s": round(min(timings["overlapped"]), 2),
                      "overlapped_over_serial": round(min(timings["overlapped"]) / min(timings["serial"]), 3),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
