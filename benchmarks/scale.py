"""The ``scale`` section of ``benchmarks/run.py``: saesweep at a researcher's size, without a download.

A GPT-2-small-shaped model (d 768, 12 blocks, 12 heads) with random weights and the stories260K
tokenizer is written to a temporary folder; its activations at ``blocks.6.hook_resid_pre`` on
the stories260K token data (context 128) feed everything below. Absolute rates depend on the
machine; every ratio is taken inside one run.

* activation generation: tokens per second and bytes per token for each cache dtype, and
  streaming (the LM alongside training, nothing stored);
* training: tokens per second per SAE and FLOP/s against the measured matrix peak at m = 6144 and
  24576, for one SAE and packs of 4 and 16 (as memory allows), in float32 and the auto dtype;
  SAELens's ``SAETrainer`` at the same shapes;
* one trial, and a 16-trial sweep (one LM pass), split into activations / training / eval / other,
  against 16 SAELens-style runs that each compute their own activations;
* growth: two token budgets, two widths, two pack sizes, with the slope (exponent) of each;
* an extrapolation to a 48-trial GPT-2-small sweep at 100M tokens per trial.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

D, LAYERS, HOOK, CTX = 768, 12, "blocks.6.hook_resid_pre", 128
STEP_BATCH = 1024  # tokens per step in the step-rate rows (4096 does not fit 16 x 24576 in 24 GB)


def build_model(folder: Path, tokenizer_from: Path) -> Path:
    """A random GPT-2-small-shaped causal LM with the stories260K tokenizer, saved to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(n_embd=D, n_layer=LAYERS, n_head=12, vocab_size=512, n_positions=256, bos_token_id=1,
                      eos_token_id=2)
    GPT2LMHeadModel(conf).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, folder / f)
    return folder


def _cfg(model: Path, data: Path, cache: Path, out: Path, *, tokens: int, ratio: float = 8.0, eval_tokens: int = 65_536,
         ce_tokens: int = 16_384, **source: Any):
    from saesweep.config.experiment import parse_config

    return parse_config({
        "sae_type": "relu", "lr": 3e-4, "dict_size_ratio": ratio, "sparsity_coeff": 0.1,
        "source": {"kind": "hf", "model": str(model), "dataset": str(data), "hook": HOOK, "context_length": CTX,
                   **source},
        "train": {"tokens": tokens, "batch_size": 512, "dtype": "float32", "device": "cpu"},
        "eval": {"tokens": eval_tokens, "ce_tokens": ce_tokens},
        "cache_dir": str(cache), "output_dir": str(out)})


def _slope(x1: float, y1: float, x2: float, y2: float) -> float:
    """Exponent k of y ~ x^k through two points (1: linear)."""
    return math.log(y2 / y1) / math.log(x2 / x1)


def activations_part(model: Path, data: Path, work: Path, tokens: int, log: Callable[[str], None]) -> dict:
    """Cache builds in each dtype, and the streamed rate, on ``tokens`` training tokens."""
    from saesweep.data import lm_activations

    rows = {}
    for dtype in ("float32", "bfloat16", "float16"):
        cfg = _cfg(model, data, work / f"cache-{dtype}", work / "runs", tokens=tokens, eval_tokens=2048, ce_tokens=0,
                   cache_dtype=dtype, streaming=False)
        t = time.perf_counter()
        acts = lm_activations.open_hf(cfg, progress=False)
        secs = time.perf_counter() - t
        m = acts.entry.manifest
        shard = sum(s["bytes"] for s in m["train"]["shards"])
        total_tokens = m["train"]["tokens"] + m["heldout"]["tokens"]
        rows[dtype] = {"tok_per_s": total_tokens / secs, "bytes_per_token": shard / m["train"]["tokens"],
                       "seconds": secs, "tokens": total_tokens}
        log(f"scale activations {dtype}: {rows[dtype]['tok_per_s']:.0f} tok/s, {rows[dtype]['bytes_per_token']:.0f} B/token")
        acts.close()
    # streaming: the LM alongside training (its prefix and held-out rows come from the float32 entry)
    from saesweep.data import cache

    cfg = _cfg(model, data, work / "cache-float32", work / "runs", tokens=tokens, eval_tokens=2048, ce_tokens=0,
               streaming=True, cache_dtype="float32", stream_buffer_tokens=8192)
    acts = lm_activations.open_hf(cfg, progress=False)
    assert isinstance(acts, lm_activations.StreamedHFActivations)
    t = time.perf_counter()
    n = 0
    for batch in acts.train_batches(512, seed=0):
        n += batch.shape[0]
        if n >= tokens:
            break
    secs = time.perf_counter() - t
    rows["stream"] = {"tok_per_s": n / secs, "bytes_per_token": 0.0, "seconds": secs, "tokens": n,
                      "cached_prefix_tokens": min(tokens, cache.NORM_TOKENS)}
    log(f"scale activations stream: {rows['stream']['tok_per_s']:.0f} tok/s, nothing stored per training token")
    acts.close()
    return rows


def steps_part(peak: dict, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """Training step rates at d 768 (batch STEP_BATCH): m 6144 and 24576, packs of 1/4/16, fp32 and auto."""
    import run as bench
    from saesweep.devices import resolve_dtype

    auto = resolve_dtype("auto", "cpu")
    old, bench.BATCH = bench.BATCH, STEP_BATCH
    out = []
    try:
        shapes = [(6144, 1), (6144, 4), (24576, 1)] if quick else [(6144, 1), (6144, 4), (6144, 16), (24576, 1), (24576, 4)]
        dtypes = ("float32",) if auto == "float32" else ("float32", auto)
        for (m, n), dtype in [(s, dt) for s in shapes for dt in dtypes]:
            r = bench.step_rate("relu", D, m, n, torch.device("cpu"), dtype=dtype, steps=2 if quick else 3)
            row = {"m": m, "n": n, "dtype": dtype, "step_s": r["step_s"], "tok_per_s_per_sae": r["tok_sae_per_s"] / n,
                   "tok_sae_per_s": r["tok_sae_per_s"], "gflops": r["gflops"],
                   "pct_of_peak": 100 * r["gflops"] / peak[dtype]["gflops"]}
            out.append(row)
            log(f"scale step m={m} n={n} {dtype}: {row['tok_per_s_per_sae']:.0f} tok/s per SAE, "
                f"{row['gflops']:.0f} GFLOP/s ({row['pct_of_peak']:.0f}% of peak)")
    finally:
        bench.BATCH = old
    return out


def _saelens_fit(d: int, m: int, samples: int, batch: int, batches) -> None:
    """Train one SAELens ``StandardTrainingSAE`` (fp32, CPU) with its ``SAETrainer`` on ``batches``."""
    from sae_lens import LoggingConfig, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=0.1, dtype="float32",
                                                        device="cpu"))
    tcfg = SAETrainerConfig(total_training_samples=samples, train_batch_size_samples=batch, lr=3e-4,
                            lr_scheduler_name="constant", lr_warm_up_steps=0, lr_end=3e-4, device="cpu", autocast=False,
                            logger=LoggingConfig(log_to_wandb=False), save_final_checkpoint=False, n_checkpoints=0)
    SAETrainer(tcfg, sae, batches).fit()


def _have_saelens() -> Optional[str]:
    try:
        import sae_lens  # noqa: F401
    except ImportError as e:
        return f"sae_lens is not installed ({e})"
    return None


def saelens_steps(shapes: list[int], log: Callable[[str], None]) -> dict:
    """SAELens's SAETrainer (StandardTrainingSAE, fp32) at d 768, batch STEP_BATCH: tokens/s per SAE."""
    if (missing := _have_saelens()) is not None:
        return {"skipped": missing}
    out = {}
    x = torch.randn(STEP_BATCH, D)
    for m in shapes:
        steps = 4
        times: list[float] = []

        def provider():
            while True:
                times.append(time.perf_counter())
                yield x

        t = time.perf_counter()
        _saelens_fit(D, m, steps * STEP_BATCH, STEP_BATCH, provider())
        total = time.perf_counter() - t
        per = statistics.median(np.diff(times)) if len(times) > 2 else total / steps
        out[m] = {"step_s": per, "tok_per_s": STEP_BATCH / per}
        log(f"scale saelens m={m}: {out[m]['tok_per_s']:.0f} tok/s per SAE")
    return out


def trial_part(model: Path, data: Path, work: Path, tokens: int, log: Callable[[str], None]) -> dict:
    """One trial (m 6144, default eval) split by phase, with the CE/KL budget and without."""
    import saesweep

    out = {}
    for name, frac in (("budget", 0.1), ("full_ce", None)):
        cfg = _cfg(model, data, work / "cache-trial", work / f"runs-{name}", tokens=tokens)
        cfg = cfg.with_updates(**{"eval.ce_time_frac": frac})
        t = time.perf_counter()
        (r,) = saesweep.run_pack([cfg])
        wall = time.perf_counter() - t
        m = r.metrics
        parts = {"activations": m["data_time_s"], "training": m["train_time_s"], "eval": m["eval_time_s"]}
        parts["other"] = max(0.0, wall - sum(parts.values()))
        out[name] = {"wall_s": wall, **{f"{k}_s": v for k, v in parts.items()}, "ce_tokens": m.get("ce_tokens"),
                     "fvu": m["fvu"], "ce_loss_score": m.get("ce_loss_score")}
        log(f"scale trial ({name}): " + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items())
            + f", ce_tokens {m.get('ce_tokens')}")
    # a default-length trial (2M tokens): training and activations grow with the tokens; the
    # evaluation is at most what every CE token costs (measured above)
    big = 2_000_000
    b, f = out["budget"], out["full_ce"]
    lm_rate = (tokens + 65_536) / max(b["activations_s"], 1e-9)  # the entry built by the first run
    train, act = f["training_s"] * big / tokens, (big + 65_536) / lm_rate
    out["default_trial"] = {"tokens": big, "training_s": train, "activations_s": act, "eval_s_at_most": f["eval_s"],
                            "eval_share_at_most": f["eval_s"] / (train + act + f["eval_s"]),
                            "eval_share_of_training_and_eval_at_most": f["eval_s"] / (train + f["eval_s"])}
    return out


def sweep_part(model: Path, data: Path, work: Path, tokens: int, n: int, log: Callable[[str], None]) -> dict:
    """``n`` trials (one pack, one LM pass) split by phase; and SAELens-style runs that each
    compute their own activations (the LM pass measured here plus SAELens's trainer, per run)."""
    import saesweep
    from saesweep.data import lm_activations

    cfgs = [_cfg(model, data, work / "cache-sweep", work / "runs-sweep", tokens=tokens, ratio=4.0, eval_tokens=4096,
                 ce_tokens=2048).with_updates(lr=3e-4 * (1 + i % 4), sparsity_coeff=0.03 * (1 + i // 4))
            for i in range(n)]
    t = time.perf_counter()
    acts = lm_activations.open_hf(cfgs[0], progress=False)
    data_s = time.perf_counter() - t
    lm_tok_s = (acts.entry.train_tokens + acts.entry.manifest["heldout"]["tokens"]) / max(data_s, 1e-9)
    results = saesweep.run_pack(cfgs, data=acts)
    wall = time.perf_counter() - t
    m = results[0].metrics
    parts = {"activations": data_s, "training": m["train_time_s"], "eval": m["eval_time_s"]}
    parts["other"] = max(0.0, wall - sum(parts.values()))
    log(f"scale sweep of {n}: " + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items()))
    # the peer: each run makes its own activations (the same LM work as one cache build of these
    # tokens) and trains one SAE with SAETrainer at the same shape and step count
    peer = saelens_run(D, int(D * 4.0), tokens, 512)
    acts.close()
    out = {"n": n, "tokens": tokens, "wall_s": wall, **{f"{k}_s": v for k, v in parts.items()},
           "lm_tok_per_s": lm_tok_s}
    if peer is not None:
        own_lm = tokens / lm_tok_s
        out["saelens_run_s"] = own_lm + peer
        out["saelens_train_s"] = peer
        out["saelens_total_s"] = n * (own_lm + peer)
        out["ratio"] = out["saelens_total_s"] / wall
        log(f"scale sweep: SAELens-style {n} runs ~{out['saelens_total_s']:.0f}s vs saesweep {wall:.0f}s "
            f"({out['ratio']:.1f}x)")
    return out


def saelens_run(d: int, m: int, tokens: int, batch: int) -> Optional[float]:
    """Seconds SAELens's SAETrainer takes for one run of ``tokens`` at batch ``batch`` (random inputs)."""
    if _have_saelens() is not None:
        return None
    x = torch.randn(tokens, d)

    def provider():
        while True:
            for s in range(0, tokens - batch + 1, batch):
                yield x[s : s + batch]

    t = time.perf_counter()
    _saelens_fit(d, m, tokens, batch, provider())
    return time.perf_counter() - t


def growth_part(model: Path, data: Path, work: Path, tokens: int, steps: list[dict], log: Callable[[str], None]) -> dict:
    """Training time at two token budgets (one SAE, m 3072, measured end to end), and the step
    rows' two widths and two pack sizes; the exponent of each."""
    import saesweep
    from saesweep.data import lm_activations

    times = {}
    for t_ in (tokens, 2 * tokens):
        cfg = _cfg(model, data, work / "cache-growth", work / f"runs-growth-{t_}", tokens=t_, ratio=4.0,
                   eval_tokens=2048, ce_tokens=0)
        acts = lm_activations.open_hf(cfg, progress=False)
        (r,) = saesweep.run_pack([cfg], data=acts)
        times[t_] = r.metrics["train_time_s"]
        acts.close()
    out = {"tokens": {"x": [tokens, 2 * tokens], "train_s": [times[tokens], times[2 * tokens]],
                      "slope": _slope(tokens, times[tokens], 2 * tokens, times[2 * tokens])}}
    f32 = [r for r in steps if r["dtype"] == "float32"]
    w = {r["m"]: r["step_s"] for r in f32 if r["n"] == 1}
    if 6144 in w and 24576 in w:
        out["width"] = {"x": [6144, 24576], "step_s": [w[6144], w[24576]], "slope": _slope(6144, w[6144], 24576, w[24576])}
    p = {r["n"]: r["step_s"] for r in f32 if r["m"] == 6144}
    big = max(p) if p else None
    if big and 1 in p and big > 1:
        out["pack"] = {"x": [1, big], "step_s": [p[1], p[big]], "slope": _slope(1, p[1], big, p[big])}
    for k, v in out.items():
        log(f"scale growth {k}: exponent {v['slope']:.2f}")
    return out


def storage_agreement(work: Path, quick: bool, log: Callable[[str], None]) -> dict:
    """ReLU SAEs on stories260K (d 64, m 1024) trained from a float32, a bfloat16 and a float16
    cache, and streamed through a buffer smaller than the data; seed 1 on float32 for the
    seed-to-seed noise. FVU and L0 per coefficient, and the worst relative gap to float32."""
    import run as bench

    import saesweep

    tokens = 200_000 if quick else 1_000_000
    coeffs = (0.03, 0.1, 0.3)

    def cfgs(name: str, seed: int = 0, **source: Any):
        from saesweep.config.experiment import parse_config

        return [parse_config({
            "sae_type": "relu", "lr": 1e-3, "dict_size_ratio": 16, "sparsity_coeff": c,
            "source": {"kind": "hf", "model": str(bench.MODEL), "dataset": str(bench.DATA), "hook": "blocks.2.hook_resid_pre",
                       "context_length": 256, **source},
            "train": {"tokens": tokens, "batch_size": 512, "dtype": "float32", "seed": seed},
            "eval": {"tokens": 65_536, "ce_tokens": 0}, "cache_dir": str(work / f"agree-cache-{name}"),
            "output_dir": str(work / f"agree-runs-{name}")}) for c in coeffs]

    variants = {
        "float32": cfgs("float32", cache_dtype="float32"),
        "bfloat16": cfgs("bfloat16", cache_dtype="bfloat16"),
        "float16": cfgs("float16", cache_dtype="float16"),
        "stream": cfgs("stream", streaming=True, stream_buffer_tokens=65_536),
        "float32_seed1": cfgs("float32", seed=1, cache_dtype="float32"),
    }
    out: dict[str, Any] = {"tokens": tokens, "coeffs": list(coeffs), "runs": {}}
    for name, group in variants.items():
        results = saesweep.run_pack(group)
        out["runs"][name] = [{"fvu": r.metrics["fvu"], "l0": r.metrics["l0"], "ok": r.ok} for r in results]
        log(f"scale agreement {name}: " + ", ".join(f"c={c}: fvu {r['fvu']:.4f} l0 {r['l0']:.2f}"
                                                     for c, r in zip(coeffs, out["runs"][name])))
    ref = out["runs"]["float32"]
    out["max_rel_gap"] = {
        name: {k: max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(rows, ref)) for k in ("fvu", "l0")}
        for name, rows in out["runs"].items() if name != "float32"}
    return out


def extrapolate(res: dict) -> dict:
    """A 48-trial GPT-2-small sweep (d 768, m 24576) at 100M tokens per trial, on this machine."""
    from saesweep.config.experiment import parse_config
    from saesweep.memory import estimate_pack_bytes

    trials, tokens = 48, 100_000_000
    act = res.get("activations", {})
    disk = {k: v["bytes_per_token"] * tokens for k, v in act.items()}
    cfg = parse_config({"dict_size_ratio": 32.0, "source": {"kind": "synthetic", "d_in": D, "n_features": 16},
                        "train": {"batch_size": 4096}, "eval": {"batch_size": 4096}})
    mem = {n: estimate_pack_bytes(cfg, n) for n in (1, 4, 16)}
    rows = [r for r in res.get("steps", []) if r["m"] == 24576]
    best = max(rows, key=lambda r: r["tok_per_s_per_sae"] * r["n"]) if rows else None
    out: dict[str, Any] = {"trials": trials, "tokens_per_trial": tokens, "disk_bytes": disk, "pack_bytes": mem,
                           "train_flop": 12 * D * 24576 * tokens * trials}
    if best:
        sae_tok_s = best["tok_per_s_per_sae"] * best["n"]
        out["train_hours_cpu"] = trials * tokens / sae_tok_s / 3600
        out["train_rate_from"] = {k: best[k] for k in ("m", "n", "dtype")}
    if "float32" in act:
        lm = act["float32"]["tok_per_s"]
        out["activation_hours_cpu"] = tokens / lm / 3600  # one LM pass for the whole sweep
        out["activation_hours_per_run_cpu"] = trials * tokens / lm / 3600  # each run its own
    return out


def scale_section(quick: bool, peak: dict, log: Callable[[str], None]) -> dict:
    """Everything above in one run; ``peak`` is ``run.matrix_peak``'s result."""
    import run as bench

    if not bench.have_stories():
        return {"skipped": f"stories260K tokenizer or data not found ({bench.MODEL}, {bench.DATA})"}
    work = Path(tempfile.mkdtemp(prefix="saesweep-scale-"))
    try:
        model = build_model(work / "gpt2-small-random", bench.MODEL)
        data = bench.DATA
        res: dict[str, Any] = {"model": {"d": D, "layers": LAYERS, "hook": HOOK, "context": CTX, "vocab": 512}}
        gen_tokens = 4096 if quick else 16_384
        res["activations"] = activations_part(model, data, work, gen_tokens, log)
        res["steps"] = steps_part(peak, quick, log)
        res["saelens_steps"] = saelens_steps([6144] if quick else [6144, 24576], log)
        trial_tokens = 8192 if quick else 16_384
        res["trial"] = trial_part(model, data, work, trial_tokens, log)
        res["sweep"] = sweep_part(model, data, work, 4096 if quick else 8192, 4 if quick else 16, log)
        res["growth"] = growth_part(model, data, work, 4096 if quick else 8192, res["steps"], log)
        res["extrapolation"] = extrapolate(res)
        res["agreement"] = storage_agreement(work, quick, log)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e9:.3g} GB"


def scale_report(s: dict) -> list[str]:
    if "skipped" in s:
        return [f"\nScale: skipped ({s['skipped']})"]
    L = [f"\nScale: GPT-2-small-shaped random model (d {D}, {LAYERS} blocks, vocab 512), {HOOK}, context {CTX}"]
    L.append("  activation generation (training + held-out tokens through the LM, stopping at the hook):")
    for k, v in s["activations"].items():
        L.append(f"    {k:9} {v['tok_per_s']:8.0f} tok/s   {v['bytes_per_token']:6.0f} bytes per training token on disk")
    L.append(f"  training step (ReLU, batch {STEP_BATCH}, full step incl. Adam; tokens/s per SAE; % of the dtype's peak):")
    for r in s["steps"]:
        L.append(f"    m {r['m']:6} pack {r['n']:2} {r['dtype']:9} {r['tok_per_s_per_sae']:8.0f} tok/s/SAE  "
                 f"{r['gflops']:6.0f} GFLOP/s  {r['pct_of_peak']:4.0f}%")
    sl = s.get("saelens_steps", {})
    if "skipped" not in sl:
        for m, v in sl.items():
            ours = next((r for r in s["steps"] if r["m"] == int(m) and r["n"] == 1 and r["dtype"] == "float32"), None)
            ratio = f"  saesweep / SAELens = {ours['tok_per_s_per_sae'] / v['tok_per_s']:.2f}x" if ours else ""
            L.append(f"    SAELens SAETrainer m {m}: {v['tok_per_s']:8.0f} tok/s/SAE{ratio}")
    for name, t in s["trial"].items():
        if name == "default_trial":
            L.append(f"  a default trial ({t['tokens']:,} tokens, projected): training {t['training_s'] / 60:.0f} min, "
                     f"activations {t['activations_s'] / 60:.0f} min, eval <= {t['eval_s_at_most']:.0f}s: "
                     f"eval <= {100 * t['eval_share_at_most']:.1f}% of the trial "
                     f"(<= {100 * t['eval_share_of_training_and_eval_at_most']:.1f}% with the activations cached)")
            continue
        parts = {k: t[f"{k}_s"] for k in ("activations", "training", "eval", "other")}
        tot = sum(parts.values())
        L.append(f"  one trial ({'eval.ce_time_frac 0.1' if name == 'budget' else 'every CE token'}): "
                 + ", ".join(f"{k} {v:.1f}s ({100 * v / tot:.0f}%)" for k, v in parts.items())
                 + f"; ce_tokens {t['ce_tokens']}")
    w = s["sweep"]
    parts = {k: w[f"{k}_s"] for k in ("activations", "training", "eval", "other")}
    tot = sum(parts.values())
    L.append(f"  {w['n']}-trial sweep, one pack, {w['tokens']:,} tokens each: "
             + ", ".join(f"{k} {v:.1f}s ({100 * v / tot:.0f}%)" for k, v in parts.items()))
    if "saelens_total_s" in w:
        L.append(f"    vs {w['n']} SAELens-style runs, each making its own activations (its LM pass at the rate "
                 f"measured here + SAELens's SAETrainer measured on the same shape; no evaluation): "
                 f"{w['saelens_total_s']:.0f}s ({w['ratio']:.1f}x saesweep's {w['wall_s']:.0f}s, which includes eval)")
    for k, v in s["growth"].items():
        L.append(f"  growth in {k}: {v['x'][0]} -> {v['x'][1]}: exponent {v['slope']:.2f}")
    a = s.get("agreement")
    if a:
        L.append(f"  storage vs float32 cache: ReLU on stories260K (d 64, m 1024, {a['tokens']:,} tokens, c = "
                 f"{', '.join(map(str, a['coeffs']))}), worst relative gap in FVU / L0:")
        for name, g in a["max_rel_gap"].items():
            what = "(seed 1 on float32: the seed-to-seed noise)" if name == "float32_seed1" else ""
            L.append(f"    {name:14} FVU {100 * g['fvu']:5.2f}%   L0 {100 * g['l0']:5.2f}%  {what}")
    e = s["extrapolation"]
    L.append(f"  extrapolated: {e['trials']} trials x {e['tokens_per_trial'] / 1e6:.0f}M tokens, d {D}, m 24576 "
             f"({e['train_flop']:.2g} training FLOP)")
    L.append("    disk for the training cache: " + ", ".join(f"{k} {_gb(v)}" for k, v in e["disk_bytes"].items()))
    L.append("    device memory per pack (batch 4096): " + ", ".join(f"{n}: {_gb(b)}" for n, b in e["pack_bytes"].items()))
    if "train_hours_cpu" in e:
        L.append(f"    training on this CPU: {e['train_hours_cpu']:.0f} h (best measured packing {e['train_rate_from']}); "
                 f"activations: {e.get('activation_hours_cpu', float('nan')):.0f} h once, "
                 f"{e.get('activation_hours_per_run_cpu', float('nan')):.0f} h if every run makes its own")
    L.append("    on one GPU: not measured (no GPU lent yet; benchmarks/gpu_check.sh measures it)")
    return L


if __name__ == "__main__":
    print(json.dumps({"usage": "python benchmarks/run.py --sections scale"}))
