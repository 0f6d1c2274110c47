"""Per block of a model: TAMP's layer sparsities (uniform default, DAS with ``das=1``) and ABS's
saliency and visual-token budget, in the literal and the scaled form.

    .venv/bin/python benchmarks/weight_selection_scales.py --model toy-large --nsamples 32

Only dense sweeps run (no pruning), so it takes seconds on the toy model.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from vlmprune import toyworld, weights
from vlmprune.models import get_adapter
from vlmprune.weights.sequential import select_linears, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-large")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = toyworld.load(args.model)
    calibration = toyworld.calibration(processor, n=args.nsamples)
    captured = weights.capture(model, calibration)

    tamp = weights.from_spec(f"tamp:sparsity={args.sparsity},das=1")
    per_block = select_linears(model, get_adapter(model), None, None)
    sweep(model, calibration, tamp.observe_dense, linears=per_block, captured=captured, desc="tamp dense")
    tamp.allocate(per_block)
    print(f"TAMP das=1 at {args.sparsity}: per block, min / mean / max layer sparsity (default tamp: "
          f"{args.sparsity} everywhere)")
    for b, linears in enumerate(per_block):
        values = [tamp.layer_sparsity(name) for name in linears]
        print(f"  block {b}: {min(values):.3f} / {statistics.mean(values):.3f} / {max(values):.3f}")
    by_kind: dict[str, list[float]] = {}
    for linears in per_block:
        for name in linears:
            by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(tamp.layer_sparsity(name))
    print("  by projection (mean over blocks): "
          + ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in by_kind.items()))

    for saliency in ("attention-literal", "attention"):
        atv = weights.ATV(saliency=saliency)
        sweep(model, calibration, lambda ctx: atv.collect(ctx)[1], linears=per_block, captured=captured, desc=saliency)
        print(f"ABS saliency={saliency}: per block sbar, mean visual tokens selected per sample")
        print("  " + "; ".join(f"{h['block']}: {h['saliency']:.4f}, {h['visual_tokens']:.1f}" for h in atv.history))


if __name__ == "__main__":
    main()
