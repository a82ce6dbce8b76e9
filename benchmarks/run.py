#!/usr/bin/env python
"""saesweep throughput benchmarks: one command, a table on stdout, JSON on disk.

    python benchmarks/run.py            # full run (~25 min on 2 cores)
    python benchmarks/run.py --quick    # a few minutes: fewer shapes, smaller token budget

Sections (``--sections`` picks some; see benchmarks/README.md for what each row means):

* ``peak``     matrix peak of this machine, fp32 and bf16 (best large square matmul)
* ``flops``    SAE training FLOP/s (12 d m per token per SAE) vs that peak, d = 64 and 512,
               fp32 and bf16, saesweep's fused step and the plain autograd step
* ``modes``    packs: loop vs stacked members and the CPU chunk size (the rule in saes/kernels.py)
* ``alloc``    glibc allocator tuning on/off (child processes)
* ``types``    every registered architecture's training step, fused vs autograd, a pack of 4 at
               d = 64, m = 1024 (and 4096 in a full run), fp32 and bf16: where a fused step pays
* ``sweep``    the seed's 48-trial ReLU grid on stories260K layer-2 activations (d = 64):
               (a) one process per trial recomputing activations, (b) sequential with the
               cache, (c) packed, (d) packed + bf16; bf16-vs-fp32 metric agreement
* ``efficiency`` the packed seed ReLU sweep end to end, split into activations, training, eval
               and overhead, training FLOP/s as a share of the dtype's matrix peak, and the eval
               share with the pack-wide splice against a full LM forward per SAE
* ``saelens``  the same 48 configs trained with SAELens's SAETrainer on the same activations
* ``share``    the activation-generation share of the full 912-trial seed sweep (extrapolated
               from measured per-type, per-width packed throughput)
* ``scale``    a GPT-2-small-shaped random model (d = 768, 12 blocks, the stories260K tokenizer):
               activation generation per cache dtype and streamed, training per SAE and per pack
               at m = 6144 / 24576 against SAELens's SAETrainer, one trial and a 16-trial sweep
               split by phase, growth exponents, and a 48-trial 100M-token extrapolation
               (benchmarks/scale.py)

Results go to benchmarks/results/<time>.json and benchmarks/results/latest.json. Sections that
need ../shared/models/stories260K and ../shared/data/stories260K-sampled are skipped, with a
message, when those folders are absent. Timings on a shared machine are noisy: rates are the
median over repeated steps, and every comparison is a ratio taken within one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "stories260K-sampled"
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = ("peak", "flops", "modes", "chunks", "alloc", "types", "sweep", "efficiency", "saelens", "share", "eval", "scale")
BATCH = 4096

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> Optional[list[float]]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def cpu_busy(seconds: float = 2.0) -> Optional[float]:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat), None where unavailable."""
    def read():
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


WAIT_QUIET_S = 0.0


def wait_quiet(what: str, threshold: float = 0.2) -> Optional[float]:
    """Wait (up to ``--wait-quiet`` seconds) until other processes leave the CPUs idle."""
    busy = cpu_busy(1.0)
    deadline = time.time() + WAIT_QUIET_S
    while busy is not None and busy > threshold and time.time() < deadline:
        log(f"CPUs {100 * busy:.0f}% busy with other work; waiting before {what}")
        time.sleep(15)
        busy = cpu_busy(2.0)
    return busy


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], reps: int, dev: torch.device, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return out


# ============================================================================ peak
def matrix_peak(dev: torch.device, quick: bool) -> dict:
    """Best GFLOP/s of a large square matmul (the machine's practical matrix peak)."""
    wait_quiet("the matrix peak")
    from saesweep.devices import native_bf16

    out = {}
    sizes = (1024, 2048) if quick else (1024, 2048, 4096)
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        best, per = 0.0, {}
        # an emulated bf16 product can be hundreds of times slower: one small size says so
        for n in sizes if name == "float32" or native_bf16(dev.type) else (512,):
            a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
            c = torch.empty(n, n, device=dev, dtype=dt)
            ts = timed(lambda: torch.mm(a, b, out=c), 5 if quick else 9, dev)
            per[n] = 2 * n**3 / min(ts) / 1e9
            best = max(best, per[n])
        out[name] = {"gflops": best, "by_size": per}
        log(f"peak {name}: {best:.0f} GFLOP/s")
    return out


# ============================================================================ steps
def make_pack(sae_type: str, d: int, m: int, n: int, dev: torch.device, extra: Optional[dict] = None):
    from saesweep import saes
    from saesweep.training.optim import PackedAdam

    hp = {"sparsity_coeff": 0.03, **(extra or {})}
    own = saes.get(sae_type).hyperparams
    for k, v in own.items():
        hp.setdefault(k, v.default)
    hp = {k: v for k, v in hp.items() if v is not None}
    sae = saes.get(sae_type)(d, m, [dict(hp) for _ in range(n)], list(range(n)), device=dev)
    opt = PackedAdam(sae.named_parameters(), torch.full((n,), 3e-4))
    return sae, opt


def step_rate(sae_type: str, d: int, m: int, n: int, dev: torch.device, *, dtype: str = "float32",
              kernel: str = "fused", mode: Optional[str] = None, chunk: Any = "rule", steps: int = 8,
              extra: Optional[dict] = None) -> dict:
    """Seconds per training step of a pack (what the trainer does per step: fused or autograd
    gradients, finiteness check, per-member clipping, Adam, decoder renormalisation)."""
    from saesweep.saes.kernels import StepPlan, plan_for
    from saesweep.training.optim import clip_grad_norm_per_member

    sae, opt = make_pack(sae_type, d, m, n, dev, extra)
    rule = plan_for(dev, n, d, m, BATCH)
    plan = StepPlan(kernel, mode or rule.mode, rule.chunk if chunk == "rule" else chunk)
    x = torch.randn(BATCH, d, device=dev)

    def one() -> None:
        losses = sae.train_step(x, progress=0.5, sparsity_scale=1.0, plan=plan, dtype=dtype, stats=False)
        bool(torch.isfinite(losses.total).all())
        clip_grad_norm_per_member(sae.parameters(), 1.0)
        opt.step(1.0)
        sae.after_step()

    ts = timed(one, steps, dev, warmup=2)
    med, best = statistics.median(ts), min(ts)
    flop = 12 * d * m * BATCH * n
    return {"step_s": med, "step_s_min": best, "tok_sae_per_s": BATCH * n / med, "tok_sae_per_s_best": BATCH * n / best,
            "gflops": flop / med / 1e9, "gflops_best": flop / best / 1e9, "plan": plan.__dict__}


def flops_section(dev: torch.device, peak: dict, quick: bool) -> dict:
    shapes = [(64, 4096), (512, 4096)] if quick else [(64, 1024), (64, 4096), (512, 4096)]
    rows = []
    for (d, m), dtype, kernel in itertools.product(shapes, ("float32", "bfloat16"), ("fused", "autograd")):
        wait_quiet(f"flops d={d} m={m} {dtype} {kernel}")
        steps = 6 if quick else (10 if d == 512 else 16)
        r = step_rate("relu", d, m, 1, dev, dtype=dtype, kernel=kernel, steps=steps)
        r.update(d=d, m=m, dtype=dtype, kernel=kernel, pct_of_peak=100 * r["gflops"] / peak[dtype]["gflops"],
                 pct_of_peak_best=100 * r["gflops_best"] / peak[dtype]["gflops"],
                 pct_of_fp32_peak=100 * r["gflops_best"] / peak["float32"]["gflops"])
        rows.append(r)
        log(f"flops relu d={d} m={m} {dtype} {kernel}: {r['gflops_best']:.0f} GFLOP/s best, {r['gflops']:.0f} median "
            f"({r['pct_of_peak_best']:.0f}% of {dtype} peak)")
    for r in rows:  # bf16 speed-up over fp32 of the same step
        if r["dtype"] == "bfloat16":
            f = next(q for q in rows if (q["d"], q["m"], q["kernel"], q["dtype"]) == (r["d"], r["m"], r["kernel"], "float32"))
            r["speedup_vs_fp32"] = r["gflops_best"] / f["gflops_best"]
            r["speedup_vs_fp32_median"] = r["gflops"] / f["gflops"]
    for r in rows:  # fused over autograd
        if r["kernel"] == "fused":
            a = next(q for q in rows if (q["d"], q["m"], q["dtype"], q["kernel"]) == (r["d"], r["m"], r["dtype"], "autograd"))
            r["speedup_vs_autograd"] = r["gflops_best"] / a["gflops_best"]
    return {"rows": rows}


def types_section(dev: torch.device, quick: bool, n: int = 4) -> dict:
    """Each architecture's step, fused and autograd, in one run (ratios, not absolute times)."""
    from saesweep import saes

    rows = []
    widths = (1024,) if quick else (1024, 4096)
    for sae_type, m, dtype in itertools.product(saes.names(), widths, ("float32", "bfloat16")):
        wait_quiet(f"types {sae_type} m={m} {dtype}")
        row = {"sae_type": sae_type, "d": 64, "m": m, "n": n, "dtype": dtype, "fused_kernel": saes.get(sae_type).fused}
        for kernel in ("fused", "autograd") if row["fused_kernel"] else ("autograd",):
            r = step_rate(sae_type, 64, m, n, dev, dtype=dtype, kernel=kernel, steps=5 if quick else 9)
            row[f"{kernel}_ms"] = r["step_s"] * 1e3
        if row["fused_kernel"]:
            row["speedup"] = row["autograd_ms"] / row["fused_ms"]
        rows.append(row)
        log(f"types {sae_type} m={m} {dtype}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("_ms"))
            + (f" ({row['speedup']:.2f}x)" if "speedup" in row else ""))
    return {"rows": rows, "batch": BATCH}


def modes_section(dev: torch.device, quick: bool) -> dict:
    """Loop vs stacked packs and the token-chunk size, ReLU d = 64, a pack of n members."""
    n = 4 if quick else 16
    widths = (512, 4096) if quick else (512, 1024, 2048, 4096)
    chunks = (512, None) if quick else (256, 512, 1024, 2048, None)
    rows = []
    for m in widths:
        wait_quiet(f"modes m={m}")
        for mode, chunk in itertools.product(("loop", "stacked"), chunks):
            r = step_rate("relu", 64, m, n, dev, mode=mode, chunk=chunk, steps=3 if quick else 5)
            r.update(m=m, n=n, mode=mode, chunk=chunk or BATCH)
            rows.append(r)
            log(f"modes m={m} n={n} {mode} chunk={chunk or BATCH}: {r['tok_sae_per_s'] / 1e3:.0f}K tok*SAE/s")
    best = {}
    for m in widths:
        sub = [r for r in rows if r["m"] == m]
        b = max(sub, key=lambda r: r["tok_sae_per_s"])
        loop = max((r for r in sub if r["mode"] == "loop"), key=lambda r: r["tok_sae_per_s"])
        stacked = max((r for r in sub if r["mode"] == "stacked"), key=lambda r: r["tok_sae_per_s"])
        best[m] = {"best_mode": b["mode"], "best_chunk": b["chunk"], "loop_over_stacked": loop["tok_sae_per_s"] / stacked["tok_sae_per_s"]}
    return {"rows": rows, "best": best, "pack": n}


def chunks_section(dev: torch.device, peak: dict, quick: bool) -> dict:
    """The CPU token chunk at d >= 512: one SAE's step at the rule's chunk and at fixed ones,
    as % of the six-matmul floor (12*d*m flops per token at the dtype's matrix peak). bf16 only
    where the CPU multiplies it natively."""
    from saesweep.devices import native_bf16

    shapes = [(768, 6144)] if quick else [(64, 4096), (512, 16384), (768, 6144), (768, 24576)]
    dtypes = ["float32"] + (["bfloat16"] if native_bf16(dev.type) else [])
    rows = []
    for (d, m), dtype in itertools.product(shapes, dtypes):
        wait_quiet(f"chunks d={d} m={m} {dtype}")
        row: dict[str, Any] = {"d": d, "m": m, "dtype": dtype, "by_chunk": {}}
        for chunk in ("rule", 170, 1024, 2048, None):
            r = step_rate("relu", d, m, 1, dev, dtype=dtype, chunk=chunk, steps=3 if quick else 5)
            got = r["plan"]["chunk"] or BATCH
            pct = 100 * r["gflops"] / peak[dtype]["gflops"]
            if chunk == "rule":
                row["rule_chunk"], row["rule_pct"] = got, pct
            else:
                row["by_chunk"][got] = pct
        old = max(MIN_OLD_CHUNK, 2**22 // m)
        row["old_rule_chunk"] = old if old < BATCH else BATCH
        rows.append(row)
        log(f"chunks d={d} m={m} {dtype}: rule chunk {row['rule_chunk']} {row['rule_pct']:.0f}% of floor; "
            + ", ".join(f"{c}: {v:.0f}%" for c, v in row["by_chunk"].items()))
    widths: dict = {}
    for dtype in dtypes:  # width exponent of the rule's step time per token, d = 768
        w = [r for r in rows if r["d"] == 768 and r["dtype"] == dtype]
        if len(w) == 2:
            a, b = sorted(w, key=lambda r: r["m"])
            widths[dtype] = math.log((b["m"] / a["m"]) * a["rule_pct"] / b["rule_pct"]) / math.log(b["m"] / a["m"])
    return {"rows": rows, "width_exponent": widths, "batch": BATCH}


#: the chunk rule before the d-dependent floor (elements only), for the report's comparison
MIN_OLD_CHUNK = 128


def child_step(args: list[str]) -> None:
    """``--child-step KERNEL D M``: print the median step time (run under a chosen environment)."""
    from saesweep.training.allocator import tune_allocator

    kernel, d, m = args[0], int(args[1]), int(args[2])
    tuned = tune_allocator()
    r = step_rate("relu", d, m, 1, torch.device("cpu"), kernel=kernel, steps=8)
    print(json.dumps({"step_s": r["step_s"], "tuned": tuned}))


def alloc_section(quick: bool) -> dict:
    rows = []
    for kernel, (d, m) in itertools.product(("fused", "autograd"), [(64, 4096)] if quick else [(64, 1024), (64, 4096)]):
        res = {}
        for tune in ("1", "0"):
            env = {**os.environ, "SAESWEEP_MALLOC_TUNE": tune}
            for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
                env.pop(k, None)
            wait_quiet(f"alloc {kernel}")
            p = subprocess.run([sys.executable, __file__, "--child-step", kernel, str(d), str(m)],
                               capture_output=True, text=True, env=env, check=True)
            res[tune] = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append({"kernel": kernel, "d": d, "m": m, "tuned_step_s": res["1"]["step_s"],
                     "default_step_s": res["0"]["step_s"], "speedup": res["0"]["step_s"] / res["1"]["step_s"],
                     "applied": res["1"]["tuned"]})
        log(f"alloc {kernel} d={d} m={m}: tuned {rows[-1]['speedup']:.2f}x")
    return {"rows": rows}


# ============================================================================ sweep
def have_stories() -> bool:
    return MODEL.is_dir() and DATA.is_dir()


DEVICE = "cpu"  # --device, for the sweep sections too


def base_config(tokens: int, quick: bool) -> dict:
    return {
        "sae_type": "relu",
        "source": {"kind": "hf", "model": str(MODEL), "dataset": str(DATA), "split": "train",
                   "eval_split": "validation", "context_length": 256, "hook": "blocks.2.hook_resid_pre"},
        "train": {"tokens": tokens, "batch_size": BATCH, "device": DEVICE},
        "eval": {"tokens": 16_384 if quick else 65_536, "ce_tokens": 4_096 if quick else 16_384},
    }


def relu_grid(tokens: int, quick: bool, dtype: str = "float32") -> list[dict]:
    from saesweep.config.sweep import SEED_GRIDS

    g = SEED_GRIDS["relu"]
    out = []
    for lr, ratio, sc in itertools.product(g["lr"], g["dict_size_ratio"], g["sparsity_coeff"]):
        c = base_config(tokens, quick)
        c.update(lr=lr, dict_size_ratio=ratio, sparsity_coeff=sc)
        c["train"] = {**c["train"], "dtype": dtype}
        out.append(c)
    return out


def configs_for(dicts: list[dict], cache_dir: Path, out_dir: Path):
    from saesweep.config.experiment import parse_config

    return [parse_config({**d, "cache_dir": str(cache_dir), "output_dir": str(out_dir)}) for d in dicts]


def subset(n: int, k: int) -> list[int]:
    """k of the 48 grid trials (order lr x width x sparsity, 3 x 4 x 4) spread over the grid:
    widths cycle fastest, then learning rates; sparsities rotate."""
    if k >= n:
        return list(range(n))
    out: list[int] = []
    for i in itertools.count():
        w, lr, sc = i % 4, (i // 4) % 3, (i + i // 4 + i // 12) % 4
        j = lr * 16 + w * 4 + sc
        if j not in out:
            out.append(j)
        if len(out) == k:
            return sorted(out)
    return out


def extrapolate(per_trial: dict[int, float], configs: list, n_total: int) -> float:
    """Total seconds for all n_total trials from measured ones: mean per width times trials per width."""
    by_w: dict[float, list[float]] = {}
    for i, s in per_trial.items():
        by_w.setdefault(configs[i].dict_size_ratio, []).append(s)
    total = 0.0
    for c in configs[:n_total]:
        vals = by_w.get(c.dict_size_ratio) or list(per_trial.values())
        total += statistics.mean(vals)
    return total


def run_a(dicts: list[dict], work: Path, trials: list[int], step: str = "autograd") -> dict:
    """(a): every trial in its own process (``saesweep train``) with a fresh cache, so the LM
    forward runs for every trial, like the seed's scripts; ``step`` "autograd" is the plain
    PyTorch step (the seed's way), "fused" saesweep's own."""
    import yaml

    per = {}
    env = {**os.environ, "SAESWEEP_STEP": step}
    for i in trials:
        tdir = work / f"a-{step}-{i}"
        tdir.mkdir(parents=True)
        wait_quiet(f"(a) trial {i}")
        cfg = {**dicts[i], "cache_dir": str(tdir / "cache"), "output_dir": str(tdir / "runs")}
        (tdir / "config.yaml").write_text(yaml.safe_dump(cfg))
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "saesweep", "train", str(tdir / "config.yaml")],
                           capture_output=True, text=True, cwd=REPO, env=env)
        per[i] = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(f"(a) trial {i} failed: {p.stderr[-2000:]}")
        shutil.rmtree(tdir, ignore_errors=True)
        log(f"(a, {step} step) trial {i}: {per[i]:.1f} s")
    return per


def run_b(configs) -> tuple[float, list[list]]:
    """(b): one trial after another in this process, all reading the shared cache."""
    from saesweep import run

    t = time.perf_counter()
    units = [[run(c, show_progress=False)] for c in configs]
    return time.perf_counter() - t, units


def run_packed(configs, pack_size: int = 16) -> tuple[float, list[list]]:
    """(c)/(d): packs of compatible trials (the engine's pack groups, at most pack_size members)."""
    from saesweep import packing, run_pack

    groups = packing.groups(configs)
    t = time.perf_counter()
    units = []
    for group in groups.values():
        for s in range(0, len(group), pack_size):
            units.append(run_pack(group[s : s + pack_size], show_progress=False))
    return time.perf_counter() - t, units


def summarize(units: list[list]) -> dict:
    """Totals over trials (b) or packs (c, d): a pack's members share one training and eval time."""
    results = [r for u in units for r in u]
    ok = [r for r in results if r.ok]
    firsts = [next((r for r in u if r.ok), None) for u in units]
    firsts = [r for r in firsts if r is not None]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "units": len(units),
        "train_s": sum(r.metrics["train_time_s"] for r in firsts),
        "eval_s": sum(r.metrics["eval_time_s"] for r in firsts),
        "data_s": sum(r.metrics["data_time_s"] for r in firsts),
    }


def efficiency_section(tokens: int, quick: bool, work: Path, peak: dict) -> dict:
    """The packed seed ReLU grid (48 trials) end to end, as a user runs it: the activation build,
    then packs of 16. Wall time split into activations, training, eval and the rest; training
    FLOP/s (12 d m per token per SAE) against the dtype's matrix peak; the same sweep with a full
    LM forward per SAE in the spliced metrics (SAESWEEP_SPLICE=full, the path before the
    pack-wide splice), for the eval share before and after."""
    from saesweep.data import open_source

    rows = {}
    for name, dtype, splice in (("packed_fp32", "float32", "tail"), ("packed_fp32_full_splice", "float32", "full"),
                                ("packed_bf16", "bfloat16", "tail")):
        vdir = work / f"eff-{name}"
        wait_quiet(name)
        cfgs = configs_for(relu_grid(tokens, quick, dtype), vdir / "cache", vdir / "runs")
        t0 = time.perf_counter()
        data = open_source(cfgs[0])
        build_s = time.perf_counter() - t0
        d = data.d_in
        data.close()
        old = os.environ.get("SAESWEEP_SPLICE")
        os.environ["SAESWEEP_SPLICE"] = splice
        try:
            wall, units = run_packed(cfgs)
        finally:
            if old is None:
                os.environ.pop("SAESWEEP_SPLICE", None)
            else:
                os.environ["SAESWEEP_SPLICE"] = old
        s = summarize(units)
        total = wall + build_s
        flop = sum(12 * d * round(d * r.config.dict_size_ratio) * r.config.train.tokens
                   for u in units for r in u if r.ok)
        gflops = flop / s["train_s"] / 1e9
        row = {"dtype": dtype, "splice": splice, "wall_s": total, "activations_s": build_s, "train_s": s["train_s"],
               "eval_s": s["eval_s"], "overhead_s": total - build_s - s["train_s"] - s["eval_s"],
               "completed": s["completed"], "train_gflops": gflops, "pct_of_peak": 100 * gflops / peak[dtype]["gflops"]}
        for k in ("activations", "train", "eval", "overhead"):
            row[f"{k}_share"] = row[f"{k}_s"] / total
        rows[name] = row
        log(f"efficiency {name}: {total:.1f} s = activations {build_s:.1f} + train {s['train_s']:.1f} + eval "
            f"{s['eval_s']:.1f} + other {row['overhead_s']:.1f}; training {gflops:.0f} GFLOP/s "
            f"({row['pct_of_peak']:.0f}% of {dtype} peak)")
    return {"tokens_per_trial": tokens, "trials": len(relu_grid(tokens, quick)), "rows": rows}


def sweep_section(tokens: int, quick: bool, a_trials: int, a_fused_trials: int, work: Path) -> dict:
    from saesweep.data import open_source

    dicts = relu_grid(tokens, quick)
    out: dict[str, Any] = {"tokens_per_trial": tokens, "trials": len(dicts)}
    # (b) (c) (d): each with its own fresh cache, so each pays one activation build
    variants = {}
    for name, dtype, packed in (("b_sequential_cache", "float32", False), ("c_packed", "float32", True),
                                ("d_packed_bf16", "bfloat16", True)):
        vdir = work / name
        wait_quiet(name)
        cfgs = configs_for(relu_grid(tokens, quick, dtype), vdir / "cache", vdir / "runs")
        t0 = time.perf_counter()
        data = open_source(cfgs[0])  # the activation build, timed on its own (the runs reuse it)
        build_s = time.perf_counter() - t0
        manifest = data.entry.manifest
        data.close()
        wall, units = run_packed(cfgs) if packed else run_b(cfgs)
        results = [r for u in units for r in u]
        v = {"wall_s": wall + build_s, "build_s": build_s, **summarize(units),
             "build_tokens": manifest["train"]["tokens"] + manifest["heldout"]["tokens"]}
        v["metrics"] = {r.config.trial_id: {k: r.metrics.get(k) for k in ("fvu", "l0", "ce_loss_score", "dead_fraction")}
                        for r in results if r.ok}
        v["order"] = [r.config.trial_id for r in results]
        variants[name] = v
        log(f"{name}: {v['wall_s']:.1f} s (build {build_s:.1f} s, train {v['train_s']:.1f} s, eval {v['eval_s']:.1f} s)")
        if name == "b_sequential_cache":
            out["activation_rate_tok_s"] = v["build_tokens"] / build_s
    # (a): a subset, extrapolated per width to the 48 trials; (a') the same with the fused step
    cfgs = configs_for(dicts, work / "unused", work / "unused")
    for name, step, k in (("a_process_per_trial", "autograd", a_trials), ("a2_process_per_trial_fused", "fused", a_fused_trials)):
        if k <= 0:
            continue
        idx = subset(len(dicts), k)
        per = run_a(dicts, work / "a", idx, step)
        variants[name] = {"wall_s": extrapolate(per, cfgs, len(dicts)), "measured_trials": len(idx), "step": step,
                          "measured_s": sum(per.values()), "per_trial_s": per, "extrapolated": len(idx) < len(dicts)}
    out["variants"] = variants
    a = variants["a_process_per_trial"]["wall_s"]
    out["speedup_vs_a"] = {k: a / v["wall_s"] for k, v in variants.items()}
    out["bf16_agreement"] = bf16_agreement(variants["c_packed"], variants["d_packed_bf16"], relu_grid(tokens, quick))
    out["cache_dir"] = str(work / "c_packed" / "cache")  # reused by the SAELens section
    return out


def bf16_agreement(c: dict, d: dict, dicts: list[dict]) -> dict:
    """Relative differences of the bf16 trials' metrics from their fp32 twins (same hyperparameters)."""
    from saesweep.config.experiment import parse_config

    pairs = []
    for dd in dicts:
        f32 = parse_config(dd).trial_id
        bf = parse_config({**dd, "train": {**dd["train"], "dtype": "bfloat16"}}).trial_id
        if f32 in c["metrics"] and bf in d["metrics"]:
            pairs.append((c["metrics"][f32], d["metrics"][bf]))
    out = {"pairs": len(pairs)}
    for k in ("fvu", "l0", "ce_loss_score"):
        rel = [abs(b[k] - a[k]) / max(abs(a[k]), 1e-12) for a, b in pairs if a.get(k) is not None and b.get(k) is not None]
        if rel:
            out[k] = {"median_rel": statistics.median(rel), "max_rel": max(rel),
                      "within_2pct": sum(r <= 0.02 for r in rel) / len(rel)}
    return out


# ============================================================================ SAELens
def saelens_section(tokens: int, quick: bool, cache_dir: Path, max_trials: Optional[int]) -> dict:
    """The same 48 ReLU configs trained with SAELens's own trainer on the same activations."""
    try:
        import sae_lens  # noqa: F401
        from sae_lens import (
            LoggingConfig,
            SAETrainer,
            StandardTrainingSAE,
            StandardTrainingSAEConfig,
        )
        from sae_lens.config import SAETrainerConfig
    except ImportError as e:
        return {"skipped": f"sae_lens is not installed ({e}); pip install 'saesweep[bench]'"}
    from saesweep.data import open_source

    dicts = relu_grid(tokens, quick)
    cfgs = configs_for(dicts, cache_dir, cache_dir.parent / "saelens-runs")
    data = open_source(cfgs[0])
    # the whole normalised training set in RAM: the cheapest possible data provider for the peer
    acts = torch.from_numpy(data.entry.gather(np.arange(tokens))).mul_(data.scale)
    d = acts.shape[1]
    idx = subset(len(cfgs), max_trials) if max_trials else list(range(len(cfgs)))
    per = {}
    for i in idx:
        c = cfgs[i]
        m = int(d * c.dict_size_ratio)
        steps = c.train.steps
        gen = torch.Generator().manual_seed(c.train.seed)

        def provider():
            while True:
                perm = torch.randperm(acts.shape[0], generator=gen)
                for s in range(0, acts.shape[0] - BATCH + 1, BATCH):
                    yield acts[perm[s : s + BATCH]]

        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=d, d_sae=m, l1_coefficient=c.sparsity_coeff, l1_warm_up_steps=int(0.05 * steps),
            dtype="float32", device="cpu"))
        tcfg = SAETrainerConfig(
            total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=c.lr,
            lr_scheduler_name="cosineannealing", lr_warm_up_steps=max(1, int(0.01 * steps)), lr_end=c.lr * 0.1,
            device="cpu", autocast=False, logger=LoggingConfig(log_to_wandb=False), save_final_checkpoint=False,
            n_checkpoints=0)
        trainer = SAETrainer(tcfg, sae, provider())
        wait_quiet(f"SAELens trial {i}")
        t = time.perf_counter()
        trainer.fit()
        per[i] = time.perf_counter() - t
        log(f"saelens trial {i} (m={m}): {per[i]:.1f} s")
    data.close()
    return {"wall_s": extrapolate(per, cfgs, len(cfgs)), "measured_trials": len(idx), "measured_s": sum(per.values()),
            "per_trial_s": per, "extrapolated": len(idx) < len(cfgs), "sae_lens_version": _version("sae-lens")}


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "unknown"


# ============================================================================ share
SEED_TYPES = [
    ("relu", {}, 48, 12),
    ("hard_concrete", {"input_dependent_gates": True}, 144, 16),
    ("hard_concrete", {"input_dependent_gates": False}, 144, 16),
    ("gated", {}, 144, 16),
    ("gated_hard_concrete", {}, 432, 16),
]


def share_section(dev: torch.device, quick: bool, act_rate: Optional[float], eval_s_per_trial: Optional[float]) -> dict:
    """Wall time of the full 912-trial seed sweep (2M tokens per trial, the config default)
    from measured packed throughput per (type, width), and the activation build's share of it."""
    from saesweep.config.experiment import TrainConfig

    tokens = TrainConfig().tokens
    ratios = (8, 16, 32, 64)
    rows, train_total = [], 0.0
    for (sae_type, extra, trials, pack), ratio in itertools.product(SEED_TYPES, ratios):
        m = 64 * ratio
        n = 2  # loop mode: throughput per member does not depend on the pack size
        wait_quiet(f"share {sae_type} m={m}")
        r = step_rate(sae_type, 64, m, n, dev, steps=2 if quick else 3, extra=extra)
        per_width = trials // len(ratios)
        secs = per_width * tokens / r["tok_sae_per_s"]
        train_total += secs
        rows.append({"sae_type": sae_type, **extra, "m": m, "trials": per_width, "tok_sae_per_s": r["tok_sae_per_s"],
                     "train_s": secs})
        log(f"share {sae_type} {extra} m={m}: {r['tok_sae_per_s'] / 1e3:.0f}K tok*SAE/s")
    eval_total = 912 * (eval_s_per_trial or 0.0)
    heldout = 65_536 + 16_384
    gen = (tokens + heldout) / act_rate if act_rate else None
    out = {"tokens_per_trial": tokens, "trials": 912, "train_s": train_total, "eval_s": eval_total,
           "activation_s": gen, "rows": rows}
    if gen is not None:
        out["activation_share"] = gen / (gen + train_total + eval_total)
    return out


# ============================================================================ report
def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s / 3600:.2f} h" if s >= 7200 else (f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s")


def eval_section(quick: bool, pack: int = 16, repeats: int = 3) -> dict:
    """Spliced CE/KL of a pack of ``pack`` SAEs on stories260K (hook blocks.2, 16,384 held-out
    tokens; quick: 4,096): a full LM forward per SAE (the plain path) against the pack-wide
    pass (blocks before the hook once per batch, only the blocks after it per SAE). Medians of
    ``repeats``, alternated, in one run; the metrics must agree."""
    from saesweep import saes
    from saesweep.config.experiment import parse_config
    from saesweep.data import lm
    from saesweep.metrics.downstream import spliced_metrics
    from saesweep.metrics.reconstruction import raw_reconstructor

    cfg = parse_config({"source": {"kind": "hf", "model": str(MODEL), "dataset": str(DATA), "hook": "blocks.2.hook_resid_pre",
                                   "context_length": 256}})
    model, _ = lm.load_lm(cfg.source, "cpu", tokenizer=False)
    d = model.config.hidden_size
    sae = saes.get("relu")(d, 16 * d, [{"sparsity_coeff": 0.1}] * pack, list(range(pack)))
    recs = [raw_reconstructor(sae.member(i), 1.0) for i in range(pack)]
    rows = torch.randint(3, int(model.config.vocab_size), ((4_096 if quick else 16_384) // 255, 256),
                         generator=torch.Generator().manual_seed(0)).numpy()
    times: dict[str, list[float]] = {"plain": [], "pack_wide": []}
    results = {}
    for _ in range(repeats):
        for name, shortcut in (("plain", False), ("pack_wide", True)):
            hooked = lm.HookedLM(model, 2)
            wait_quiet(f"eval {name}")
            t = time.perf_counter()
            results[name] = spliced_metrics(hooked, rows, recs, batch_rows=32, shortcut=shortcut)[0]
            times[name].append(time.perf_counter() - t)
    worst = max(abs(a[k] - b[k]) for a, b in zip(results["plain"], results["pack_wide"]) for k in a)
    med = {k: statistics.median(v) for k, v in times.items()}
    log(f"eval: spliced metrics for {pack} SAEs: plain {med['plain']:.2f} s, pack-wide {med['pack_wide']:.2f} s")
    return {"pack": pack, "rows": int(rows.shape[0]), "plain_s": med["plain"], "pack_wide_s": med["pack_wide"],
            "speedup": med["plain"] / med["pack_wide"], "max_abs_difference": worst, "all_s": times}


def report(res: dict) -> str:
    lines = []
    meta = res["meta"]
    lines.append(f"saesweep benchmarks -- {meta['device']}, torch {meta['torch']}, {meta['mode']} run, "
                 f"load avg {meta['load_start']} -> {meta.get('load_end')}")
    if "peak" in res:
        p = res["peak"]
        lines.append(f"\nMatrix peak (best square matmul): fp32 {p['float32']['gflops']:.0f} GFLOP/s, "
                     f"bf16 {p['bfloat16']['gflops']:.0f} GFLOP/s (AMX: {'yes' if meta['amx'] else 'no'})")
    if "flops" in res:
        lines.append("\nSAE training FLOP/s (ReLU, 12*d*m per token, batch 4096, one SAE, full step incl. Adam;"
                     " best of N steps, median in brackets; % of the same dtype's peak)")
        lines.append(f"  {'d':>4} {'m':>5} {'dtype':9} {'step':9} {'ms/step':>8} {'GFLOP/s':>15} {'% peak':>7} {'bf16/fp32':>9}  target")
        for r in res["flops"]["rows"]:
            tgt = ""
            if r["kernel"] == "fused" and r["dtype"] == "float32":
                want = 50 if r["d"] == 64 else 80
                tgt = f">= {want}% of fp32 peak: {'MET' if r['pct_of_peak_best'] >= want else 'not met'}"
            if r["kernel"] == "fused" and r["dtype"] == "bfloat16":
                want = 2 if r["d"] == 64 else 4
                tgt = f">= {want}x fp32: {'MET' if r['speedup_vs_fp32'] >= want else 'not met'}"
            sp = f"{r['speedup_vs_fp32']:.2f}x" if "speedup_vs_fp32" in r else ""
            gf = f"{r['gflops_best']:.0f} ({r['gflops']:.0f})"
            lines.append(f"  {r['d']:>4} {r['m']:>5} {r['dtype']:9} {r['kernel']:9} {r['step_s_min'] * 1e3:8.1f} "
                         f"{gf:>15} {r['pct_of_peak_best']:6.0f}% {sp:>9}  {tgt}")
    if "chunks" in res:
        ch = res["chunks"]
        lines.append(f"\nToken chunks (ReLU, one SAE, batch {ch['batch']}): median step as % of the six-matmul floor")
        for r in ch["rows"]:
            alt = ", ".join(f"{c}: {v:.0f}%" for c, v in sorted(r["by_chunk"].items()))
            lines.append(f"  d {r['d']:>4} m {r['m']:>5} {r['dtype']:9} rule {r['rule_chunk']:>5}: {r['rule_pct']:4.0f}%"
                         f"  (old rule {r['old_rule_chunk']}; {alt})")
        for dtype, e in ch["width_exponent"].items():
            lines.append(f"  width exponent of the step per token, d 768, m 6144 -> 24576, {dtype}: {e:.2f}")
    if "modes" in res:
        mo = res["modes"]
        lines.append(f"\nPacks of {mo['pack']} (ReLU d=64): K tokens*SAE/s by mode and chunk")
        chunks = sorted({r["chunk"] for r in mo["rows"]})
        lines.append("  " + f"{'m':>5} {'mode':8}" + "".join(f"{c:>8}" for c in chunks))
        for m in sorted({r["m"] for r in mo["rows"]}):
            for mode in ("loop", "stacked"):
                vals = {r["chunk"]: r["tok_sae_per_s"] for r in mo["rows"] if r["m"] == m and r["mode"] == mode}
                lines.append("  " + f"{m:>5} {mode:8}" + "".join(f"{vals.get(c, 0) / 1e3:8.0f}" for c in chunks))
        for m, b in mo["best"].items():
            lines.append(f"  m={m}: best {b['best_mode']} chunk {b['best_chunk']}; loop/stacked {b['loop_over_stacked']:.2f}x")
    if "alloc" in res:
        lines.append("\nglibc allocator tuning (mallopt at import), median step time")
        for r in res["alloc"]["rows"]:
            lines.append(f"  {r['kernel']:9} d={r['d']} m={r['m']}: default {r['default_step_s'] * 1e3:.1f} ms, "
                         f"tuned {r['tuned_step_s'] * 1e3:.1f} ms ({r['speedup']:.2f}x)")
    if "types" in res:
        ty = res["types"]
        lines.append(f"\nEvery architecture's training step, pack of {ty['rows'][0]['n']}, d=64, batch {ty['batch']}: "
                     "median ms per step; fused over autograd")
        lines.append(f"  {'type':20} {'m':>5} {'dtype':9} {'fused':>8} {'autograd':>9} {'speed-up':>8}")
        for r in ty["rows"]:
            fu = f"{r['fused_ms']:.1f}" if "fused_ms" in r else "-"
            sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
            lines.append(f"  {r['sae_type']:20} {r['m']:>5} {r['dtype']:9} {fu:>8} {r['autograd_ms']:9.1f} {sp:>8}")
    if "sweep" in res:
        sw = res["sweep"]
        if "skipped" in sw:
            lines.append(f"\nSweep: skipped ({sw['skipped']})")
        else:
            v = sw["variants"]
            lines.append(f"\nSeed ReLU grid, {sw['trials']} trials x {sw['tokens_per_trial']:,} tokens, stories260K "
                         f"blocks.2.hook_resid_pre (d=64); activations built at {sw['activation_rate_tok_s'] / 1e3:.1f}K tok/s")
            lines.append(f"  {'variant':34} {'wall':>10} {'train':>10} {'eval':>9} {'x vs (a)':>9}")
            names = {"a_process_per_trial": "(a) process/trial, recompute", "a2_process_per_trial_fused": "(a') same, saesweep's step",
                     "b_sequential_cache": "(b) sequential, cache", "c_packed": "(c) packed", "d_packed_bf16": "(d) packed + bf16"}
            for k in names:
                if k not in v:
                    continue
                x = v[k]
                note = f" ({x['measured_trials']} measured, extrapolated)" if x.get("extrapolated") else ""
                lines.append(f"  {names[k]:34} {fmt_s(x['wall_s']):>10} {fmt_s(x.get('train_s')):>10} "
                             f"{fmt_s(x.get('eval_s')):>9} {sw['speedup_vs_a'][k]:8.1f}x{note}")
            lines.append(f"  target (d) >= 10x (a): {'MET' if sw['speedup_vs_a']['d_packed_bf16'] >= 10 else 'not met'}"
                         f"; best saesweep variant {max(sw['speedup_vs_a'][k] for k in ('b_sequential_cache', 'c_packed', 'd_packed_bf16')):.1f}x")
            ag = sw["bf16_agreement"]
            for k in ("fvu", "l0", "ce_loss_score"):
                if k in ag:
                    lines.append(f"  bf16 vs fp32 {k}: median rel diff {100 * ag[k]['median_rel']:.2f}%, max "
                                 f"{100 * ag[k]['max_rel']:.2f}%, within 2%: {100 * ag[k]['within_2pct']:.0f}% of {ag['pairs']} pairs")
    if "efficiency" in res and "rows" in res["efficiency"]:
        ef = res["efficiency"]
        lines.append(f"\nThe packed seed ReLU sweep end to end ({ef['trials']} trials x {ef['tokens_per_trial']:,} tokens, "
                     "stories260K, packs of 16): share of the wall time")
        lines.append(f"  {'variant':26} {'wall':>8} {'activations':>11} {'train':>7} {'eval':>6} {'other':>6} "
                     f"{'train GFLOP/s':>13} {'% peak':>7}")
        for name, r in ef["rows"].items():
            lines.append(f"  {name:26} {fmt_s(r['wall_s']):>8} {100 * r['activations_share']:10.1f}% "
                         f"{100 * r['train_share']:6.1f}% {100 * r['eval_share']:5.1f}% {100 * r['overhead_share']:5.1f}% "
                         f"{r['train_gflops']:13.0f} {r['pct_of_peak']:6.0f}%")
        for name in ("packed_fp32", "packed_bf16"):
            r = ef["rows"][name]
            rest = 1 - r["train_share"]
            lines.append(f"  {name}: training >= 60% of the {r['dtype']} peak: {'MET' if r['pct_of_peak'] >= 60 else 'not met'}; "
                         f"eval + activations + other <= 15% of the wall time: {'MET' if rest <= 0.15 else 'not met'} "
                         f"({100 * rest:.0f}%)")
        lines.append(f"  eval share {100 * ef['rows']['packed_fp32_full_splice']['eval_share']:.0f}% with a full forward "
                     f"per SAE -> {100 * ef['rows']['packed_fp32']['eval_share']:.0f}% pack-wide (goal <= 10%)")
    if "saelens" in res:
        sl = res["saelens"]
        if "skipped" in sl:
            lines.append(f"\nSAELens: skipped ({sl['skipped']})")
        else:
            note = f" ({sl['measured_trials']} measured, extrapolated)" if sl.get("extrapolated") else ""
            lines.append(f"\nSAELens {sl['sae_lens_version']} SAETrainer loop, same configs, activations in RAM: "
                         f"{fmt_s(sl['wall_s'])} training{note}")
            if "sweep" in res and "variants" in res["sweep"]:
                v = res["sweep"]["variants"]
                for k, label in (("c_packed", "(c)"), ("d_packed_bf16", "(d)")):
                    tr = sl["wall_s"] / v[k]["train_s"]
                    e2e = sl["wall_s"] / v[k]["wall_s"]
                    tgt = f"  target >= 3x: {'MET' if tr >= 3 else 'not met'}" if k == "d_packed_bf16" else ""
                    lines.append(f"  {label} training time {tr:.1f}x faster than SAELens; end to end (with build and "
                                 f"eval) {e2e:.1f}x{tgt}")
    if "share" in res:
        sh = res["share"]
        lines.append(f"\nFull seed sweep (912 trials x {sh['tokens_per_trial']:,} tokens, packed fp32, extrapolated): "
                     f"train {fmt_s(sh['train_s'])}, eval {fmt_s(sh['eval_s'])}, activations {fmt_s(sh['activation_s'])}")
        if "activation_share" in sh:
            lines.append(f"  activation generation share {100 * sh['activation_share']:.2f}% "
                         f"(target <= 5%: {'MET' if sh['activation_share'] <= 0.05 else 'not met'})")
        for r in sh["rows"]:
            gates = "" if "input_dependent_gates" not in r else (" dep" if r["input_dependent_gates"] else " shared")
            lines.append(f"  {r['sae_type'] + gates:24} m={r['m']:5} {r['tok_sae_per_s'] / 1e3:7.0f}K tok*SAE/s "
                         f"x{r['trials']:3} trials: {fmt_s(r['train_s'])}")
    if "eval" in res and "plain_s" in res["eval"]:
        ev = res["eval"]
        lines.append(f"\nSpliced CE/KL, pack of {ev['pack']} on stories260K ({ev['rows']} rows x 256): full forward per "
                     f"SAE {fmt_s(ev['plain_s'])}, pack-wide pass {fmt_s(ev['pack_wide_s'])} ({ev['speedup']:.2f}x; "
                     f"metrics differ by at most {ev['max_abs_difference']:.1e})")
    if "scale" in res:
        from scale import scale_report

        lines += scale_report(res["scale"])
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-step":
        child_step(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes: fewer shapes and trials, 100K tokens per trial")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--tokens", type=int, help="training tokens per trial in the sweep sections (default 400K, quick 100K)")
    ap.add_argument("--a-trials", type=int, help="trials of (a) actually run (default 8, quick 4); the rest extrapolated per width")
    ap.add_argument("--a-fused-trials", type=int, help="trials of (a') actually run (default 4, quick 0 = skip)")
    ap.add_argument("--saelens-trials", type=int, help="SAELens trials actually run (default all 48, quick 8)")
    ap.add_argument("--device", default="cpu", help="device for the step sections (cpu, cuda)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed section, wait up to S seconds for other processes to leave the CPUs idle")
    ap.add_argument("--out", type=Path, help="JSON output path (default benchmarks/results/<time>.json)")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    quick = args.quick
    tokens = args.tokens or (100_000 if quick else 400_000)
    a_trials = args.a_trials if args.a_trials is not None else (4 if quick else 8)
    a_fused = args.a_fused_trials if args.a_fused_trials is not None else (0 if quick else 4)
    sl_trials = args.saelens_trials or (8 if quick else None)
    dev = torch.device(args.device)
    global WAIT_QUIET_S, DEVICE
    WAIT_QUIET_S = args.wait_quiet
    DEVICE = args.device
    from saesweep.training.allocator import tune_allocator

    tuned = tune_allocator()  # as the CLI and workers do

    res: dict[str, Any] = {"meta": {
        "device": device_name(dev), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "amx": has_amx(), "mode": "quick" if quick else "full",
        "load_start": load_avg(), "allocator_tuned": tuned, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "gpu": torch.cuda.is_available(),
    }}
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="saesweep-bench-"))
    try:
        if "peak" in sections or "flops" in sections:
            res["peak"] = matrix_peak(dev, quick)
        if "flops" in sections:
            res["flops"] = flops_section(dev, res["peak"], quick)
        if "modes" in sections:
            res["modes"] = modes_section(dev, quick)
        if "chunks" in sections:
            res.setdefault("peak", matrix_peak(dev, quick))
            res["chunks"] = chunks_section(dev, res["peak"], quick)
        if "alloc" in sections and dev.type == "cpu":
            res["alloc"] = alloc_section(quick)
        if "types" in sections:
            res["types"] = types_section(dev, quick)
        need_lm = [s for s in ("sweep", "efficiency", "saelens", "share") if s in sections]
        cache_dir = None
        if need_lm and not have_stories():
            msg = f"stories260K model or data not found ({MODEL}, {DATA}); skipping {', '.join(need_lm)}"
            log(msg)
            for s in need_lm:
                res[s] = {"skipped": msg}
        else:
            if "sweep" in sections:
                res["sweep"] = sweep_section(tokens, quick, a_trials, a_fused, work)
                cache_dir = Path(res["sweep"]["cache_dir"])
            if "efficiency" in sections:
                if "peak" not in res:
                    res["peak"] = matrix_peak(dev, quick)
                res["efficiency"] = efficiency_section(tokens, quick, work, res["peak"])
            if "saelens" in sections:
                if cache_dir is None:
                    cache_dir = work / "saelens-cache"
                res["saelens"] = saelens_section(tokens, quick, cache_dir, sl_trials)
            if "share" in sections:
                rate = res.get("sweep", {}).get("activation_rate_tok_s")
                evs = None
                if "sweep" in res and "variants" in res["sweep"]:
                    c = res["sweep"]["variants"]["c_packed"]
                    evs = c["eval_s"] / max(1, c["completed"])  # per trial, as evaluated in packs
                if rate is None:  # measure the activation build alone
                    from saesweep.data import open_source

                    cfg = configs_for(relu_grid(tokens, quick), work / "share-cache", work / "share-runs")[0]
                    t = time.perf_counter()
                    data = open_source(cfg)
                    m = data.entry.manifest
                    rate = (m["train"]["tokens"] + m["heldout"]["tokens"]) / (time.perf_counter() - t)
                    data.close()
                res["share"] = share_section(dev, quick, rate, evs)
            if "eval" in sections:
                res["eval"] = eval_section(quick)
        if "scale" in sections:
            from scale import scale_section

            if "peak" not in res:
                res["peak"] = matrix_peak(dev, quick)
            res["scale"] = scale_section(quick, res["peak"], log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["meta"]["load_end"] = load_avg()
    res["meta"]["wall_s"] = time.perf_counter() - t_start
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}.json"
    text = json.dumps(res, indent=2, default=str)
    out.write_text(text)
    (RESULTS / ("latest-quick.json" if quick else "latest.json")).write_text(text)
    table = report(res)
    (out.with_suffix(".txt")).write_text(table + "\n")
    print(table)
    print(f"\nJSON: {out}  ({fmt_s(res['meta']['wall_s'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
