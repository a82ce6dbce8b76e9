#!/usr/bin/env python
"""SAE quality against the peer: saesweep's SAE types and SAELens's own trainer, trained on the
same activations with the same budget, compared at equal L0.

    python benchmarks/quality.py              # stories260K (when ../shared has it) + synthetic
    python benchmarks/quality.py --quick      # a smaller token budget, fewer coefficients
    python benchmarks/quality.py --sources synthetic --types relu,jumprelu,batchtopk,matryoshka
    python benchmarks/quality.py --sources stories260k --targets 8,16,32,64 --types relu,gated --no-peer

``--targets`` checks ``target_l0``: each coefficient-driven type is trained once per target (one
pack), then at fixed coefficients around the ones its controller ended with (x 2/3, 1, 3/2); the
table gives each target's held-out L0, its error, its FVU and the FVU of the fixed-coefficient
frontier interpolated in log L0 at the same L0 (``vs_fixed``: the relative difference; the aim is
at most +2 %).

For each source, every type is trained at dict_size_ratio 16 and lr 1e-3 with the default
budget (``train.tokens`` and ``train.batch_size`` of the experiment config; 1.9M tokens on
stories260K, which holds 1.97M) across a range of
sparsity coefficients (the TopK types, which take none, across ``k``: their ``coeff`` column
holds k); SAELens's ``StandardTrainingSAE`` + ``SAETrainer`` trains on exactly the
same stream of normalised activations (saesweep's source, unit mean squared norm) with the same
lr schedule, across the same coefficients (its loss, SSE + l1 * sum_i |f_i| ||W_dec,i||, has the
form of saesweep's ReLU loss). Each type with a SAELens counterpart is also compared with it
(``PEERS``: gated, TopK, BatchTopK, Matryoshka BatchTopK, and JumpReLU both as SAELens defaults and
with its straight-through estimator reaching the encoder), trained the same way. Every SAE, the
peers' included, is evaluated by saesweep's own metric code on the same held-out activations and
tokens (SAELens's inference weights are loaded into the saesweep type with the same inference
function).

Writes ``benchmarks/results/quality-<time>/``: ``table.md`` (L0, FVU, ce_loss_score,
kl_div_score, dead fraction, frac_recovered, per trial), ``quality.json``, and
``frontier_<source>.png`` (L0 vs FVU, log L0). The summary compares each type's L0-FVU
frontier with SAELens's, interpolated in log L0 over L0 5-40 (where both reach).

The synthetic source is a realistic world shaped like SynthSAEBench's (``WORLD``: 2,048
features in d 128 with true L0 16, SAEs 512 wide: a quarter of the true dictionary, as its
4,096 latents are of its 16K features; ``--world`` sets another size). There the types are also
ranked by ``feature_f1`` at the true L0, beside SynthSAEBench's published F1 and the random
baselines at the same L0 and width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's trainer bars

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "stories260K-sampled"
RESULTS = REPO / "benchmarks" / "results"
TYPES = ("relu", "gated", "hard_concrete", "gated_hard_concrete", "topk", "batchtopk", "jumprelu", "matryoshka")
#: the TopK types set L0 with k, not a coefficient: their frontier runs over these
KS = [4, 8, 16, 32, 64]
QUICK_KS = [8, 16, 32]
COEFFS = [0.01, 0.03, 0.06, 0.1, 0.17, 0.3, 0.5]
QUICK_COEFFS = [0.03, 0.1, 0.3]
#: the fixed-coefficient frontier a quadratic-rule type's target-L0 SAEs are compared with
FRONTIER_COEFFS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
#: SAELens's JumpReLU l0_coefficients per variant (its loss: SSE + l0_coefficient * L0 on the same
#: normalised inputs; with the straight-through estimator reaching the encoder the same L0 takes ~100x less)
L0_COEFFS = {"jumprelu": [0.1, 0.3, 1.0, 3.0], "jumprelu_ste": [0.0005, 0.001, 0.002, 0.004]}
L0_RANGE = (5.0, 40.0)
STORIES_TOKENS = 1_900_000
#: the synthetic world of the ranking: SynthSAEBench's shape (16K features in d 768, L0 about 25,
#: SAEs a quarter as wide as the true dictionary) scaled to what a CPU trains in minutes
WORLD = {"n_features": 2048, "d_in": 128, "true_l0": 16.0}
#: SynthSAEBench's published feature F1 at L0 25, width 4096, on its 16K x 768 world
SYNTHSAEBENCH_F1 = {"relu": 0.56, "jumprelu": 0.73, "batchtopk": 0.73, "matryoshka": 0.88}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def base_config(source: str, tokens: Optional[int], out: Path, dtype: str = "auto", world: Optional[dict] = None,
                hook: str = "blocks.2.hook_resid_pre", batch: Optional[int] = None, ratio: Optional[float] = None) -> dict:
    from saesweep.config.experiment import TrainConfig

    # stories260K-sampled holds 1.97M training tokens: its runs take 1.9M unless told otherwise
    default = TrainConfig().tokens if source == "synthetic" else min(TrainConfig().tokens, STORIES_TOKENS)
    train: dict[str, Any] = {"tokens": tokens or default, "dtype": dtype, **({"batch_size": batch} if batch else {})}
    cfg: dict[str, Any] = {"lr": 1e-3, "dict_size_ratio": 16, "train": train, "output_dir": str(out / "runs"),
                           "cache_dir": str(out.parent / "cache")}
    if source == "stories260k":
        cfg["source"] = {"kind": "hf", "model": str(MODEL), "dataset": str(DATA), "split": "train",
                         "eval_split": "validation", "context_length": 256, "hook": hook}
        cfg["eval"] = {"tokens": 65_536, "ce_tokens": 16_384}
    else:
        w = world or WORLD
        cfg["source"] = {"kind": "synthetic", "n_features": w["n_features"], "d_in": w["d_in"],
                         "sparsity": w["true_l0"] / w["n_features"]}
        cfg["dict_size_ratio"] = w["n_features"] / 4 / w["d_in"]
    if ratio:
        cfg["dict_size_ratio"] = ratio
    return cfg


def row_of(kind: str, coeff: float, m: dict, wall: float) -> dict:
    keys = ("l0", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "feature_f1", "feature_mcc", "absorption",
            "frac_f1_50", "decoder_frac_cos90", "probe_f1", "true_l0", "synthsaebench_f1", "synthsaebench_uniqueness")
    return {"trainer": kind, "coeff": coeff, **{k: m.get(k) for k in keys}, "train_s": wall}


def run_saesweep(sae_type: str, base: dict, coeffs: list[float], ks: list[int]) -> list[dict]:
    """One pack of ``sae_type`` across the coefficients (or, for the TopK types, the ks)."""
    from saesweep import saes
    from saesweep.config.experiment import parse_config
    from saesweep.training.run import run_pack

    knob = "sparsity_coeff" if saes.get(sae_type).uses_sparsity_coeff else "k"
    coeffs = coeffs if knob == "sparsity_coeff" else ks
    cfgs = [parse_config({**base, "sae_type": sae_type, knob: c}) for c in coeffs]
    t = time.perf_counter()
    res = run_pack(cfgs, show_progress=False)
    wall = time.perf_counter() - t
    rows = []
    for c, r in zip(coeffs, res):
        rows.append(row_of(sae_type, c, r.metrics if r.ok else {}, wall / len(coeffs)))
        log(f"{sae_type} c={c}: {r.status} L0 {r.metrics.get('l0', float('nan')):.1f} "
            f"FVU {r.metrics.get('fvu', float('nan')):.3f} dead {r.metrics.get('dead_fraction', float('nan')):.2f}")
    return rows


#: saesweep's type -> the SAELens training architectures that are its peers (the knob: l1, l0 or k)
PEERS = {"relu": ["standard"], "gated": ["gated"], "topk": ["topk"], "batchtopk": ["batchtopk"],
         "jumprelu": ["jumprelu", "jumprelu_ste"], "matryoshka": ["matryoshka_batchtopk"]}
#: the SAELens architectures that take k (the others take a coefficient)
K_PEERS = ("topk", "batchtopk", "matryoshka_batchtopk")
#: the SAELens architectures that take an L0 (count) coefficient, on the quadratic-rule coefficients
L0_PEERS = ("jumprelu", "jumprelu_ste")
#: a SAELens peer's state loads into this saesweep type (same inference function)
PEER_TYPE = {"standard": "relu", "gated": "gated", "topk": "topk", "batchtopk": "batchtopk",
             "jumprelu": "jumprelu", "jumprelu_ste": "jumprelu", "matryoshka_batchtopk": "matryoshka"}


def _saelens_sae(arch: str, d: int, m: int, value: float, warmup: int):
    """SAELens's training SAE ``arch`` at coefficient or k ``value``: its defaults but the knob, except
    ``jumprelu_ste`` (its straight-through estimator also reaching the encoder's input weights) and
    Matryoshka's prefixes, which end where saesweep's default ``group_fractions`` do."""
    import sae_lens

    common = {"d_in": d, "d_sae": m, "dtype": "float32", "device": "cpu"}
    if arch == "standard":
        return sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(
            **common, l1_coefficient=value, l1_warm_up_steps=warmup))
    if arch == "gated":
        return sae_lens.GatedTrainingSAE(sae_lens.GatedTrainingSAEConfig(
            **common, l1_coefficient=value, l1_warm_up_steps=warmup))
    if arch in L0_PEERS:
        return sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(
            **common, l0_coefficient=value, l0_warm_up_steps=warmup, jumprelu_ste_to_input=arch == "jumprelu_ste"))
    if arch == "topk":
        return sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(**common, k=int(value)))
    if arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**common, k=int(value)))
    if arch == "matryoshka_batchtopk":
        widths = sorted({max(1, round(f * m)) for f in (0.0625, 0.125, 0.25, 0.5, 1.0)})
        return sae_lens.MatryoshkaBatchTopKTrainingSAE(sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            **common, k=int(value), matryoshka_widths=widths))
    raise ValueError(f"no SAELens peer {arch!r}")


def _copy_into_ours(arch: str, sae, d: int, m: int, value: float):
    """A saesweep SAE computing the same inference function as SAELens's ``sae`` (for saesweep's metric
    code): SAELens's own inference state (decoder norms folded, BatchTopK's threshold as JumpReLU's)
    loaded into the saesweep type that shares its inference form."""
    from saesweep import saes

    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    kind = PEER_TYPE[arch]
    hp = {"k": int(value)} if arch in K_PEERS else {"sparsity_coeff": value}
    ours = saes.get(kind)(d, m, [hp], [0])
    ours.load_member_state(state)
    return ours


def run_saelens(base: dict, coeffs: list[float], arch: str = "standard", scaled_windows: bool = False) -> list[dict]:
    """SAELens's ``arch`` SAE and its own trainer on saesweep's activation stream (the same batches,
    lr schedule and Adam), evaluated by saesweep's metric code; ``coeffs`` are its l1 or l0 coefficients, or ks.
    ``scaled_windows``: its dead-latent and feature-sampling windows a 20th and a 10th of the run (at
    most its defaults, 1,000 and 2,000 steps, which are made for runs of 100M samples)."""
    from sae_lens import LoggingConfig, SAETrainer
    from sae_lens.config import SAETrainerConfig

    from saesweep.config.experiment import parse_config
    from saesweep.data import open_source
    from saesweep.metrics.reconstruction import evaluate

    cfg = parse_config({**base, "sae_type": "relu"})
    tc = cfg.train
    data = open_source(cfg)
    d = data.d_in
    m = int(d * cfg.dict_size_ratio)
    steps = tc.steps
    rows = []
    for c in coeffs:
        sae = _saelens_sae(arch, d, m, c, int(tc.sparsity_warmup_frac * steps))
        trainer = SAETrainer(SAETrainerConfig(
            total_training_samples=steps * tc.batch_size, train_batch_size_samples=tc.batch_size, lr=cfg.lr,
            lr_scheduler_name="cosineannealing", lr_warm_up_steps=max(1, int(tc.lr_warmup_frac * steps)),
            lr_end=cfg.lr * tc.min_lr_factor, adam_beta1=tc.adam_beta1, adam_beta2=tc.adam_beta2, device="cpu",
            autocast=False, logger=LoggingConfig(log_to_wandb=False), save_final_checkpoint=False, n_checkpoints=0,
            **({"dead_feature_window": min(1000, max(10, steps // 20)),
                "feature_sampling_window": min(2000, max(20, steps // 10))} if scaled_windows else {})),
            sae, data.train_batches(tc.batch_size, tc.seed))
        t = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t
        ours = _copy_into_ours(arch, sae, d, m, c)
        metrics = evaluate(ours, data, cfg.eval.batch_size)[0]
        rows.append(row_of(f"saelens_{arch}", c, metrics, wall))
        log(f"saelens {arch} {c}: L0 {metrics['l0']:.1f} FVU {metrics['fvu']:.3f} dead {metrics['dead_fraction']:.2f}")
    data.close()
    return rows


# --------------------------------------------------------------------- frontier comparison
def frontier(rows: list[dict]) -> list[tuple[float, float]]:
    """(L0, FVU) Pareto points, L0 ascending (lower is better for both)."""
    pts = sorted((r["l0"], r["fvu"]) for r in rows if _ok(r.get("l0")) and _ok(r.get("fvu")) and r["l0"] > 0)
    out: list[tuple[float, float]] = []
    for l0, fvu in pts:
        if not out or fvu < out[-1][1]:
            out.append((l0, fvu))
    return out


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def interp(front: list[tuple[float, float]], l0: float) -> Optional[float]:
    """FVU of the frontier at ``l0``, linear in log L0 between points; None outside its range."""
    if len(front) < 2 or not front[0][0] <= l0 <= front[-1][0]:
        return None
    xs = np.log([p[0] for p in front])
    return float(np.interp(math.log(l0), xs, [p[1] for p in front]))


def compare(rows: list[dict], kind: str, peer: str = "saelens_standard") -> dict:
    a = frontier([r for r in rows if r["trainer"] == kind])
    b = frontier([r for r in rows if r["trainer"] == peer])
    grid = np.exp(np.linspace(math.log(L0_RANGE[0]), math.log(L0_RANGE[1]), 15))
    diffs = [(float(x), fa, fb) for x in grid
             if (fa := interp(a, float(x))) is not None and (fb := interp(b, float(x))) is not None]
    def dead(k: str) -> float:
        v = [r["dead_fraction"] for r in rows if r["trainer"] == k and _ok(r.get("dead_fraction"))]
        return max(v) if v else math.nan

    if not diffs:
        return {"kind": kind, "peer": peer, "points": 0, "dead": dead(kind), "peer_dead": dead(peer)}
    delta = [fa - fb for _, fa, fb in diffs]
    return {"kind": kind, "peer": peer, "points": len(diffs), "dead": dead(kind), "peer_dead": dead(peer), "l0_from": diffs[0][0], "l0_to": diffs[-1][0],
            "mean_delta_fvu": float(np.mean(delta)), "max_delta_fvu": float(np.max(delta)),
            "mean_ratio": float(np.mean([fa / fb for _, fa, fb in diffs]))}


def at_l0(rows: list[dict], kind: str, key: str, l0: float) -> Optional[float]:
    """``key`` of ``kind``'s SAEs at ``l0``, linear in log L0 between the two nearest trained L0s."""
    pts = sorted((r["l0"], r[key]) for r in rows if r["trainer"] == kind and _ok(r.get("l0")) and r["l0"] > 0
                 and _ok(r.get(key)))
    if len(pts) < 2 or not pts[0][0] <= l0 <= pts[-1][0]:
        return None
    return float(np.interp(math.log(l0), np.log([p[0] for p in pts]), [p[1] for p in pts]))


def ranking(rows: list[dict], l0: float, baselines: list[dict]) -> str:
    """Each type's feature F1 (and FVU) at ``l0``, best first, beside SynthSAEBench's published F1."""
    kinds = list(dict.fromkeys(r["trainer"] for r in rows))
    found = [(k, at_l0(rows, k, "feature_f1", l0), at_l0(rows, k, "fvu", l0), at_l0(rows, k, "absorption", l0))
             for k in kinds]
    found.sort(key=lambda t: -(t[1] if t[1] is not None else -1))
    probe = next((r["probe_f1"] for r in rows if _ok(r.get("probe_f1"))), None)
    out = [f"Feature F1 at L0 {l0:g} (the world's true L0), interpolated in log L0"
           + (f"; a supervised linear probe reaches {probe:.3f}" if probe is not None else "") + ":", "",
           "| rank | type | feature_f1 | fvu | absorption | SynthSAEBench F1 (L0 25, 16K x 768) |", "|---|---|---|---|---|---|"]
    for i, (k, f1, fvu, ab) in enumerate(found, 1):
        cell = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        pub = SYNTHSAEBENCH_F1.get(k)
        out.append(f"| {i if f1 is not None else '–'} | {k} | {cell(f1)} | {cell(fvu)} | {cell(ab)} | "
                   f"{'' if pub is None else pub} |")
    for b in baselines:
        out.append(f"| – | baseline: {b['baseline']} | {b.get('feature_f1', float('nan')):.3f} | {b['fvu']:.3f} | "
                   f"{b.get('absorption', float('nan')):.3f} | |")
    ours = [k for k, f1, _, _ in found if f1 is not None and k in SYNTHSAEBENCH_F1]
    if len(ours) < 2:
        return "\n".join(out + ["", "Fewer than two types have SAEs on both sides of this L0: no order to compare."])
    theirs = sorted(ours, key=lambda k: -SYNTHSAEBENCH_F1[k])
    ties = {k for k in ours if sum(SYNTHSAEBENCH_F1[j] == SYNTHSAEBENCH_F1[k] for j in ours) > 1}
    agree = all(a == b or (a in ties and b in ties) for a, b in zip(ours, theirs))
    out += ["", f"Order here: {' > '.join(ours)}; SynthSAEBench's: {' > '.join(theirs)} "
            f"({'the same' if agree else 'different'}{', its tied types in either order' if ties else ''})."]
    return "\n".join(out)


def synthetic_baselines(base: dict, l0: float) -> list[dict]:
    from saesweep.config.experiment import parse_config
    from saesweep.data import open_source
    from saesweep.metrics.baselines import baselines

    cfg = parse_config({**base, "sae_type": "relu"})
    data = open_source(cfg)
    rows = baselines(data, cfg.d_sae(data.d_in), [l0], downstream=False)
    for r in rows:
        log(f"baseline {r['baseline']}: L0 {r['l0']:.1f} FVU {r['fvu']:.3f} feature_f1 {r['feature_f1']:.3f}")
    return rows


# --------------------------------------------------------------------- ranking at convergence
#: the last doubling of the budget must move F1 by less than this (relative) for a rank to be stated
CONVERGED = 0.02
RANKING_TYPES = ("relu", "jumprelu", "batchtopk", "matryoshka")
RANKING_METRICS = ("synthsaebench_f1", "feature_f1")


def run_ranking(base: dict, types: list[str], budgets: list[int], l0: float, peers: bool,
                save: Optional[Path] = None) -> list[dict]:
    """Each type trained once per budget at the world's true L0 (``k`` for the TopK types,
    ``target_l0`` for the others), and SAELens's TopK-family peers (k = the true L0, their windows
    scaled to the run) at the same budgets on the same stream; the rows so far are written to
    ``save`` after each run."""
    from saesweep import saes
    from saesweep.config.experiment import parse_config
    from saesweep.training.run import run_pack

    rows = []
    for t in types:
        for n in budgets:
            knob = {"k": round(l0)} if "k" in saes.get(t).hyperparams else {"target_l0": l0}
            cfg = parse_config({**base, "sae_type": t, **knob, "train": {**base["train"], "tokens": n}})
            t0 = time.perf_counter()
            r = run_pack([cfg], show_progress=False)[0]
            row = {**row_of(t, round(l0), r.metrics if r.ok else {}, time.perf_counter() - t0), "tokens": n,
                   **{k: r.metrics.get(k) for k in RANKING_METRICS}}
            rows.append(row)
            if save is not None:
                save.write_text(json.dumps(rows, indent=1))
            log(f"ranking {t} {n:,} tokens: {r.status} L0 {r.metrics.get('l0', float('nan')):.1f} "
                f"F1 {r.metrics.get('synthsaebench_f1', float('nan')):.3f} / {r.metrics.get('feature_f1', float('nan')):.3f}")
        for arch in PEERS.get(t, []) if peers else []:
            if arch not in K_PEERS:
                continue
            for n in budgets:
                b = {**base, "train": {**base["train"], "tokens": n}}
                got = run_saelens(b, [round(l0)], arch, scaled_windows=True)[0]
                rows.append({**got, "tokens": n})
                if save is not None:
                    save.write_text(json.dumps(rows, indent=1))
    return rows


def convergence(rows: list[dict], metric: str = "synthsaebench_f1") -> list[dict]:
    """Per trainer: its metric at each budget, the last doubling's relative change, and whether it
    has converged (that change below :data:`CONVERGED`)."""
    out = []
    for k in dict.fromkeys(r["trainer"] for r in rows):
        pts = sorted((r["tokens"], r.get(metric)) for r in rows if r["trainer"] == k and _ok(r.get(metric)))
        if not pts:
            continue
        last = pts[-1][1]
        change = (last - pts[-2][1]) / abs(pts[-2][1]) if len(pts) > 1 and pts[-2][1] else math.nan
        out.append({"trainer": k, "points": pts, "last": last, "tokens": pts[-1][0], "change": change,
                    "converged": _ok(change) and abs(change) < CONVERGED})
    return out


def ranking_table(rows: list[dict], budgets: list[int]) -> str:
    conv = convergence(rows)
    head = " | ".join(f"{n / 1e6:g}M" for n in budgets)
    out = [f"SynthSAEBench's classification F1 (one-to-one feature_f1 in brackets) at each budget; a rank is "
           f"stated only where the last doubling moved F1 by less than {CONVERGED:.0%}:", "",
           f"| trainer | {head} | last doubling | rank |", "|---|" + "---|" * len(budgets) + "---|---|"]
    order = sorted((c for c in conv if c["converged"]), key=lambda c: -c["last"])
    rank = {c["trainer"]: i for i, c in enumerate(order, 1)}
    for c in conv:
        cells = []
        for n in budgets:
            r = next((r for r in rows if r["trainer"] == c["trainer"] and r["tokens"] == n), None)
            f1, one = (r or {}).get("synthsaebench_f1"), (r or {}).get("feature_f1")
            cells.append("–" if not _ok(f1) else f"{f1:.3f}" + (f" ({one:.3f})" if _ok(one) else ""))
        verdict = rank.get(c["trainer"], f"not converged at {c['tokens'] / 1e6:g}M tokens")
        out.append(f"| {c['trainer']} | {' | '.join(cells)} | {c['change']:+.1%} | {verdict} |")
    if len(order) > 1:
        out += ["", f"Order among converged trainers: {' > '.join(c['trainer'] for c in order)}."]
    return "\n".join(out)


def plot_ranking(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    kinds = list(dict.fromkeys(r["trainer"] for r in rows))
    ours = [k for k in kinds if not k.startswith("saelens_")]
    for ax, metric in zip(axes, RANKING_METRICS):
        for k in kinds:
            pts = sorted((r["tokens"], r[metric]) for r in rows if r["trainer"] == k and _ok(r.get(metric)))
            if not pts:
                continue
            arch = k.removeprefix("saelens_")
            c = _colour(k, ours)
            ax.plot(*zip(*pts), marker="s" if arch != k else "o", color=c, ls="--" if arch != k else "-",
                    label=f"SAELens {arch}" if arch != k else k)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------- output
def _colour(trainer: str, ours: list[str]) -> str:
    """A saesweep type's colour; a SAELens peer takes its saesweep type's (drawn dashed), and
    SAELens's standard SAE, every type's common peer, is black."""
    from saesweep.reporting.plots import TYPE_COLORS

    arch = trainer.removeprefix("saelens_")
    twin = trainer if arch == trainer else PEER_TYPE.get(arch, "") if arch != "standard" else ""
    return TYPE_COLORS[ours.index(twin) % len(TYPE_COLORS)] if twin in ours else "black"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    kinds = list(dict.fromkeys(r["trainer"] for r in rows))
    ours = [k for k in kinds if not k.startswith("saelens_")]
    for k in kinds:
        pts = [(r["l0"], r["fvu"]) for r in rows if r["trainer"] == k and _ok(r.get("l0")) and _ok(r.get("fvu"))]
        if not pts:
            continue
        arch = k.removeprefix("saelens_")
        peer = arch != k
        c = _colour(k, ours)
        ax.scatter(*zip(*pts), color=c, s=28, alpha=0.6, marker="s" if peer else "o")
        f = frontier([r for r in rows if r["trainer"] == k])
        if f:
            ax.plot(*zip(*f), color=c, lw=2.2 if peer else 1.6, ls="--" if peer else "-",
                    label=(f"SAELens {arch} (peer)" if peer else k))
    ax.axvspan(*L0_RANGE, color="#eee", zorder=0, label=f"compared L0 range {L0_RANGE[0]:g}-{L0_RANGE[1]:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_targets(sae_type: str, base: dict, targets: list[float]) -> list[dict]:
    """``sae_type`` trained to each target L0 (one pack), then the fixed-coefficient SAEs around
    the coefficients it ended with; rows of both kinds (``trainer`` "<type>@target" for the first)."""
    from saesweep.config.experiment import parse_config
    from saesweep.training.run import run_pack

    cfgs = [parse_config({**base, "sae_type": sae_type, "target_l0": t}) for t in targets]
    t0 = time.perf_counter()
    res = run_pack(cfgs, show_progress=False)
    wall = time.perf_counter() - t0
    rows, finals = [], []
    for t, r in zip(targets, res):
        m = r.metrics if r.ok else {}
        rows.append({**row_of(f"{sae_type}@target", t, m, wall / len(targets)),
                     "l0_error": m.get("l0_error"), "final_coeff": m.get("final_sparsity_coeff")})
        if m.get("final_sparsity_coeff"):
            finals.append(m["final_sparsity_coeff"])
        log(f"{sae_type} target {t}: L0 {m.get('l0', float('nan')):.2f} ({m.get('l0_error', float('nan')):+.1%}) "
            f"FVU {m.get('fvu', float('nan')):.4f} c {m.get('final_sparsity_coeff', float('nan')):.4g}")
    from saesweep import saes

    if saes.get(sae_type).l0_rule == "pi":  # the held coefficients are the frontier's neighbourhood
        coeffs = sorted({float(f"{c * k:.3g}") for c in finals for k in (2 / 3, 1.0, 1.5)})
    else:  # the quadratic rule's final coefficient is a gradient factor, not a fixed objective's
        coeffs = FRONTIER_COEFFS
    return rows + (run_saesweep(sae_type, base, coeffs, []) if coeffs else [])


def target_table(rows: list[dict], types: list[str]) -> str:
    out = ["| type | target | L0 | l0_error | FVU | fixed-coefficient FVU at that L0 | vs_fixed | final coeff |",
           "|---|---|---|---|---|---|---|---|"]
    for t in types:
        front = frontier([r for r in rows if r["trainer"] == t])
        for r in (r for r in rows if r["trainer"] == f"{t}@target"):
            ref = interp(front, r["l0"]) if _ok(r.get("l0")) else None
            rel = f"{r['fvu'] / ref - 1:+.1%}" if ref and _ok(r.get("fvu")) else "outside the fixed runs' L0s"
            err = f"{r['l0_error']:+.1%}" if _ok(r.get("l0_error")) else "-"
            out.append(f"| {t} | {r['coeff']:g} | {r.get('l0') or float('nan'):.2f} | {err} | "
                       f"{r.get('fvu') or float('nan'):.4f} | {ref if ref is not None else float('nan'):.4f} | {rel} | "
                       f"{r.get('final_coeff') or float('nan'):.4g} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    # speed is benchmarks/run.py's business: train_s stays in quality.json only
    cols = ["trainer", "coeff", "l0", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "feature_f1",
            "feature_mcc", "absorption", "decoder_frac_cos90"]
    have = [c for c in cols if any(r.get(c) is not None for r in rows)]
    out = ["| " + " | ".join(have) + " |", "|" + "---|" * len(have)]
    for r in rows:
        cells = []
        for c in have:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def conditions_table(comps: list[tuple[str, dict]]) -> str:
    """One row per (condition, type, peer): the mean FVU ratio at equal L0 and both sides' dead fractions."""
    out = ["| condition | type | SAELens peer | mean FVU ratio | dead, saesweep / SAELens |", "|---|---|---|---|---|"]
    for label, c in comps:
        peer = c.get("peer", "saelens_standard").removeprefix("saelens_")
        ratio = f"{c['mean_ratio']:.3f}" if c.get("points") else "no L0 overlap"
        out.append(f"| {label} | {c['kind']} | {peer} | {ratio} | {c.get('dead', math.nan):.3f} / "
                   f"{c.get('peer_dead', math.nan):.3f} |")
    return "\n".join(out)


def summary(comparisons: list[dict]) -> str:
    out = ["| type | SAELens peer | L0 range compared | mean FVU - peer FVU | max | mean FVU ratio | dead (ours) |",
           "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        peer = c.get("peer", "saelens_standard").removeprefix("saelens_")
        if not c.get("points"):
            out.append(f"| {c['kind']} | {peer} | (frontiers do not overlap in L0 {L0_RANGE[0]:g}-{L0_RANGE[1]:g}) | | | | |")
            continue
        out.append(f"| {c['kind']} | {peer} | {c['l0_from']:.1f}-{c['l0_to']:.1f} | {c['mean_delta_fvu']:+.4f} | "
                   f"{c['max_delta_fvu']:+.4f} | {c['mean_ratio']:.3f} | {c.get('dead', float('nan')):.3f} |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="500K tokens and three coefficients")
    p.add_argument("--sources", default="stories260k,synthetic", help="comma-separated: stories260k, synthetic")
    p.add_argument("--types", default=",".join(TYPES), help="saesweep SAE types to train")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default: the config default)")
    p.add_argument("--coeffs", default=None, help="comma-separated sparsity coefficients")
    p.add_argument("--ks", default=None, help="comma-separated k values for the TopK types")
    p.add_argument("--no-peer", action="store_true", help="skip SAELens")
    p.add_argument("--targets", default=None, help="comma-separated target L0s: check target_l0 against the "
                   "fixed-coefficient frontier (coefficient-driven types only)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="saesweep's training dtype (default auto, as a user gets; SAELens trains in float32)")
    p.add_argument("--world", default=None, help="synthetic world as FEATURES,D_IN,TRUE_L0 (default "
                   f"{WORLD['n_features']},{WORLD['d_in']},{WORLD['true_l0']:g}; SynthSAEBench's is 16384,768,25)")
    p.add_argument("--hook", default="blocks.2.hook_resid_pre", help="stories260K hook point")
    p.add_argument("--batch", type=int, default=None, help="train.batch_size (default: the config default)")
    p.add_argument("--ratio", type=float, default=None, help="dict_size_ratio (default 16; the world's own on synthetic)")
    p.add_argument("--conditions", default=None, help="comma-separated HOOK@BATCH@TOKENS: stories260K under "
                   "each (e.g. blocks.3.hook_resid_post@4096@1000000,blocks.3.hook_resid_post@512@1900000)")
    p.add_argument("--ranking", default=None, help="comma-separated token budgets (e.g. 3000000,6000000,12000000): "
                   "rank the types on the synthetic world at convergence (default types: " + ",".join(RANKING_TYPES) + ")")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/quality-<time>)")
    args = p.parse_args(argv)
    world = dict(WORLD)
    if args.world:
        try:
            f, d, l0 = args.world.split(",")
            world = {"n_features": int(f), "d_in": int(d), "true_l0": float(l0)}
        except ValueError:
            p.error(f"--world: expected FEATURES,D_IN,TRUE_L0, got {args.world!r}")
    from saesweep import saes

    types = [t for t in args.types.split(",") if t]
    for t in types:
        if t not in saes.names():
            p.error(f"--types: unknown SAE type {t!r}; choose from {', '.join(saes.names())}")
    sources = [s for s in args.sources.split(",") if s]
    for s in sources:
        if s not in ("stories260k", "synthetic"):
            p.error(f"--sources: {s!r} is not stories260k or synthetic")
    coeffs = [float(c) for c in args.coeffs.split(",")] if args.coeffs else (QUICK_COEFFS if args.quick else COEFFS)
    tokens = args.tokens or (500_000 if args.quick else None)
    out = Path(args.out) if args.out else RESULTS / f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)

    ks = [int(k) for k in args.ks.split(",")] if args.ks else (QUICK_KS if args.quick else KS)
    result: dict[str, Any] = {"coeffs": coeffs, "ks": ks, "types": types, "tokens": tokens, "sources": {}}
    text = [f"# SAE quality: saesweep vs SAELens ({time.strftime('%Y-%m-%d %H:%M')})", "",
            f"`python benchmarks/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace("  ", " "), ""]
    if args.ranking:
        try:
            budgets = sorted(int(float(b)) for b in args.ranking.split(","))
        except ValueError:
            p.error(f"--ranking: expected comma-separated token counts, got {args.ranking!r}")
        kinds = types if args.types != ",".join(TYPES) else list(RANKING_TYPES)
        base = base_config("synthetic", budgets[0], out / "synthetic", args.dtype, world, batch=args.batch)
        rows = run_ranking(base, kinds, budgets, world["true_l0"], not args.no_peer, out / "ranking_rows.json")
        result["ranking"] = rows
        label = f"{world['n_features']:,} features in d {world['d_in']}, true L0 {world['true_l0']:g}, width {int(base['dict_size_ratio'] * world['d_in'])}"
        plot_ranking(rows, out / "ranking.png", f"F1 against training tokens: {label}")
        text += [f"## Ranking at convergence: {label}", "", ranking_table(rows, budgets), "", "![ranking](ranking.png)", ""]
        (out / "quality.json").write_text(json.dumps(result, indent=1))
        (out / "table.md").write_text("\n".join(text))
        print("\n".join(text))
        log(f"wrote {out}")
        return 0
    runs = [(s, s, args.hook, args.batch, tokens) for s in sources]
    if args.conditions:  # stories260K under each (hook, batch, tokens)
        runs = []
        for c in args.conditions.split(","):
            try:
                hook, batch, n = c.split("@")
                runs.append((f"stories260k {hook} batch {batch} {int(n):,} tokens", "stories260k", hook, int(batch),
                             int(n)))
            except ValueError:
                p.error(f"--conditions: expected HOOK@BATCH@TOKENS, got {c!r}")
    everywhere: list[tuple[str, dict]] = []
    for label, source, hook, batch, n_tokens in runs:
        if source == "stories260k" and not (MODEL.is_dir() and DATA.is_dir()):
            log(f"skipping stories260k: {MODEL} or {DATA} not found")
            continue
        folder = out / (source if label == source else f"{hook}-{batch}-{n_tokens}")
        base = base_config(source, n_tokens, folder, args.dtype, world, hook, batch, args.ratio)
        if args.targets:
            targets = [float(x) for x in args.targets.split(",")]
            steered = [t for t in types if saes.get(t).uses_sparsity_coeff]
            rows = [r for t in steered for r in run_targets(t, base, targets)]
            result["sources"][label] = {"target_rows": rows}
            text += [f"## {label}: target_l0 against the fixed-coefficient frontier", "", target_table(rows, steered), ""]
            (out / "quality.json").write_text(json.dumps(result, indent=1))
            (out / "table.md").write_text("\n".join(text))
            continue
        rows: list[dict] = []
        for t in types:
            rows += run_saesweep(t, base, coeffs, ks)
        if not args.no_peer:
            try:
                for arch in ["standard", *(a for t in types for a in PEERS.get(t, []) if a != "standard")]:
                    values = ks if arch in K_PEERS else L0_COEFFS[arch] if arch in L0_PEERS else coeffs
                    rows += run_saelens(base, values, arch)
            except ImportError as e:
                log(f"SAELens not installed ({e}); pip install 'saesweep[bench]'")
        comps = [compare(rows, t) for t in types]
        comps += [compare(rows, t, f"saelens_{a}") for t in types for a in PEERS.get(t, [])
                  if a != "standard" and any(r["trainer"] == f"saelens_{a}" for r in rows)]
        extra: list[str] = []
        if source == "synthetic":
            base_rows = synthetic_baselines(base, world["true_l0"])
            result.setdefault("baselines", base_rows)
            extra = [ranking(rows, world["true_l0"], base_rows), ""]
        png = f"frontier_{folder.name}.png"
        plot(rows, out / png, f"{label}: L0 vs FVU, ratio {base['dict_size_ratio']:g}, lr 1e-3")
        result["sources"][label] = {"rows": rows, "vs_saelens": comps}
        everywhere += [(label, c) for c in comps]
        text += [f"## {label}", "", table(rows), "", "Frontier vs SAELens (negative: saesweep better):", "",
                 summary(comps), "", *extra, f"![frontier]({png})", ""]
        (out / "quality.json").write_text(json.dumps(result, indent=1))
        (out / "table.md").write_text("\n".join(text))
    if len(runs) > 1 and everywhere:
        text += ["## Every condition", "", conditions_table(everywhere), ""]
        (out / "table.md").write_text("\n".join(text))
    print("\n".join(text))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
