#!/usr/bin/env python
"""How fast the realistic synthetic world generates training activations, against drawing the same
model the simple way (every feature's drive for every token), and optionally one SAE trained on a
long stream of it with generation included.

    python benchmarks/synthetic.py                       # rates at 2,048 x 128 and 256 x 64
    python benchmarks/synthetic.py --train-tokens 50000000   # + one 512-wide SAE on 50M tokens

Rates are tokens per second, medians over repeats, both ways in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = [(2048, 128, 16.0), (256, 64, 4.0)]
BATCHES = [512, 4096]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def simple_batch(data, n: int, g: torch.Generator) -> torch.Tensor:
    """A training batch the simple way: dense activity, magnitudes, a dense product."""
    from saesweep.data.synthetic import dense_active

    active = dense_active(data, n, g)
    sd = data.cfg.magnitude_std
    codes = active * data.world.mean_magnitude * torch.exp(sd * torch.randn(active.shape, generator=g) - sd * sd / 2)
    return codes @ data.ground_truth * data.scale


def rates(repeats: int = 5, tokens: int = 200_000) -> list[dict]:
    from saesweep.config.experiment import SyntheticSource
    from saesweep.data.synthetic import SyntheticActivations

    rows = []
    for F, d, l0 in SIZES:
        data = SyntheticActivations(SyntheticSource(n_features=F, d_in=d, sparsity=l0 / F), eval_tokens=1024)
        for batch in BATCHES:
            fast, slow = [], []
            it = data.train_batches(batch, 0)
            g = torch.Generator().manual_seed(0)
            for _ in range(repeats):  # interleaved, so that load changes touch both alike
                t, m = time.perf_counter(), 0
                while m < tokens:
                    m += len(next(it))
                fast.append(m / (time.perf_counter() - t))
                t, m = time.perf_counter(), 0
                while m < tokens // 4:
                    m += len(simple_batch(data, batch, g))
                slow.append(m / (time.perf_counter() - t))
            row = {"n_features": F, "d_in": d, "true_l0": l0, "batch": batch, "sparse_tok_s": _median(fast),
                   "dense_tok_s": _median(slow)}
            row["ratio"] = row["sparse_tok_s"] / row["dense_tok_s"]
            rows.append(row)
            print(f"{F} x {d} batch {batch}: sparse {row['sparse_tok_s']:,.0f} tok/s, simple {row['dense_tok_s']:,.0f} "
                  f"tok/s ({row['ratio']:.1f}x)", flush=True)
    return rows


def train_one(tokens: int) -> dict:
    """One ReLU SAE, 512 wide, on ``tokens`` of the 2,048 x 128 world, through ``saesweep train``'s
    code path (generation, training, evaluation), timed end to end."""
    from saesweep.config.experiment import parse_config
    from saesweep.training.run import run_pack

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config({"sae_type": "relu", "sparsity_coeff": 0.1, "lr": 1e-3, "dict_size_ratio": 4,
                            "source": {"kind": "synthetic", "n_features": 2048, "d_in": 128, "sparsity": 16 / 2048},
                            "train": {"tokens": tokens}, "output_dir": tmp})
        t = time.perf_counter()
        res = run_pack([cfg], show_progress=sys.stderr.isatty())[0]
        wall = time.perf_counter() - t
    m = res.metrics
    out = {"tokens": tokens, "wall_s": wall, "status": res.status, "l0": m.get("l0"), "fvu": m.get("fvu"),
           "feature_f1": m.get("feature_f1"), "synthsaebench_f1": m.get("synthsaebench_f1")}
    print(f"one 512-wide ReLU SAE on {tokens:,} tokens of the 2,048 x 128 world: {wall / 60:.1f} min "
          f"({res.status}; L0 {out['l0']:.1f}, FVU {out['fvu']:.3f}, feature_f1 {out['feature_f1']:.3f})", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-tokens", type=int, default=0, help="also train one 512-wide SAE on this many tokens")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/synthetic-<time>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"threads": torch.get_num_threads(), "rates": rates(args.repeats)}
    if args.train_tokens:
        result["train"] = train_one(args.train_tokens)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"synthetic-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
