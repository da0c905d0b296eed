"""How many parameter-sized tensors are alive while the Moreau solve computes a product.

    python -m benchmarks.solve_buffers [--method lora|full] [--samples J] [--solver richardson|cg]

One outer step of ResAlign on the tiny UNet (attention-LoRA scope, K = 5 and every step run, so each
solve asks for four products, Richardson's or conjugate gradient's). Each time the finite-difference HVP
asks for a gradient, the live tensors shaped like the first attention projection are counted (distinct
storages, by the garbage collector) and divided by how many UNet parameters have that shape, so the count
is in copies of the weights the solve works in; it includes the module's own weights and the step's merged
theta.
Prints one JSON line: the count at every gradient and its maximum.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

import alignment.hvp as hvp
from alignment.config import config_from_mapping
from alignment.data import AlignmentData, EncodedSet
from alignment.functional import Batch
from alignment.outer import Aligner
from auditing.models.tiny import TinySpec, build_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("lora", "full"), default="lora", help="pi(C)'s one method")
    parser.add_argument("--samples", type=int, default=3, help="J configurations per outer step")
    parser.add_argument("--solver", choices=("richardson", "cg"), default="richardson")
    args = parser.parse_args()
    pipe = build_tiny_pipeline(TinySpec(sample_size=8), seed=0)
    gen = torch.Generator().manual_seed(0)
    width = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)

    def encoded(n=8):
        return EncodedSet(Batch(torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, *width, generator=gen)),
                          ("",) * n, {})

    config = config_from_mapping({
        "model": "tiny", "output": "none",
        "data": {"harmful": "h", "preservation": "p", "finetune": "f", "batch_size": 2},
        "objective": {"harm": "ga"}, "outer": {"samples": args.samples},
        "hypergradient": {"richardson_steps": 5, "gamma": 1e-3, "residual_tol": 0, "solver": args.solver},
        "distribution": {"learning_rates": [1e-4], "steps": [3], "methods": [args.method], "optimizers": ["adam"],
                         "batch_sizes": [2], "max_lr_steps": 1.0}})
    aligner = Aligner(pipe, AlignmentData(encoded(), encoded(), encoded()), config)
    key = aligner.names[0]
    shape = dict(pipe.unet.named_parameters())[key].shape
    same = sum(1 for _, p in pipe.unet.named_parameters() if p.shape == shape)
    counts = []
    gradient = hvp.gradient

    def counting(loss_fn, params):
        storages = {t.untyped_storage().data_ptr() for t in gc.get_objects()
                    if isinstance(t, torch.Tensor) and t.shape == shape}
        counts.append(round(len(storages) / same, 2))
        return gradient(loss_fn, params)

    hvp.gradient = counting
    try:
        aligner.step()
    finally:
        hvp.gradient = gradient
    print(json.dumps({"benchmark": "solve_buffers", "method": args.method, "samples_J": args.samples,
                      "solver": args.solver, "copies_at_each_gradient": counts, "copies_max": max(counts)}))


if __name__ == "__main__":
    main()
