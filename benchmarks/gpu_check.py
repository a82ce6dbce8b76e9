"""What a GPU does with saesweep's paths, measured in one run (``benchmarks/gpu_check.sh`` runs it).

    python benchmarks/gpu_check.py                 # on cuda: d 768, m 24576, packs of 16
    python benchmarks/gpu_check.py --device cpu --tiny   # the same script at toy shapes, with a
                                                   # simulated out-of-memory error (what the tests run)

Sections, each a few lines of plain text on stdout:

* ``detect``: what ``saesweep devices`` finds, torch's CUDA build and the device's memory;
* ``pack``: a stacked pack of 16 against a loop over the same 16 members, ReLU at d, m, in
  float32 and bfloat16 (median step time, SAE-tokens per second, the ratios);
* ``workers``: one and two processes training the same pack shape on the device at once
  (aggregate SAE-tokens per second: does a second worker per GPU pay?);
* ``oom``: a worker claims a pack whose members do not fit together and splits it until they do
  (the real out-of-memory error on a GPU; a simulated one on the CPU, labelled so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import step_rate  # noqa: E402  (benchmarks/run.py)


def say(msg: str) -> None:
    print(msg, flush=True)


def detect_section(dev: torch.device) -> None:
    from saesweep.devices import detect, detection_lines

    say("== detect")
    say(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
    for line in detection_lines(detect()):
        say(line)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        say(f"{torch.cuda.get_device_name(dev)}: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free, "
            f"bf16 supported {torch.cuda.is_bf16_supported()}")


def pack_section(dev: torch.device, d: int, m: int, n: int, steps: int) -> dict:
    say(f"== pack: {n} ReLU SAEs, d {d}, m {m}, batch 4096: stacked pack vs a loop over the members")
    rows = {}
    for dtype in ("float32", "bfloat16"):
        for mode in ("stacked", "loop"):
            try:
                r = step_rate("relu", d, m, n, dev, dtype=dtype, mode=mode, steps=steps)
            except torch.OutOfMemoryError:
                say(f"{dtype} {mode}: out of memory")
                continue
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows[dtype, mode] = r
            say(f"{dtype:9} {mode:8} {r['step_s'] * 1e3:9.2f} ms/step  {r['tok_sae_per_s'] / 1e6:8.2f}M SAE-tok/s  "
                f"{r['gflops'] / 1e3:7.2f} TFLOP/s")
        if (dtype, "stacked") in rows and (dtype, "loop") in rows:
            say(f"{dtype}: stacked / loop = {rows[dtype, 'loop']['step_s'] / rows[dtype, 'stacked']['step_s']:.2f}x")
    for mode in ("stacked", "loop"):
        if ("float32", mode) in rows and ("bfloat16", mode) in rows:
            say(f"{mode}: bf16 / fp32 = {rows['float32', mode]['step_s'] / rows['bfloat16', mode]['step_s']:.2f}x")
    return {f"{k[0]}/{k[1]}": v["tok_sae_per_s"] for k, v in rows.items()}


def child_rate(args: argparse.Namespace) -> None:
    """``--child-rate``: train steps until ``--seconds`` pass; print SAE-tokens per second as JSON."""
    dev = torch.device(args.device)
    r = step_rate("relu", args.d, args.m, args.n, dev, dtype="float32", steps=args.steps)
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        r = step_rate("relu", args.d, args.m, args.n, dev, dtype="float32", steps=args.steps)
        done += 1
    print(json.dumps({"tok_sae_per_s": r["tok_sae_per_s"], "rounds": done}), flush=True)


def workers_section(dev: torch.device, d: int, m: int, n: int, steps: int, seconds: float) -> None:
    say(f"== workers: 1 and 2 processes on {dev}, each a pack of {n} (d {d}, m {m}, fp32)")
    base = [sys.executable, __file__, "--child-rate", "--device", str(dev), "--d", str(d), "--m", str(m),
            "--n", str(n), "--steps", str(steps), "--seconds", str(seconds)]
    env = dict(os.environ)
    if dev.type == "cpu":  # two CPU workers share the cores, as the planner gives them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    for k in (1, 2):
        procs = [subprocess.Popen(base, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
        rates = []
        for p in procs:
            out, _ = p.communicate()
            line = (out or "").strip().splitlines()
            rates.append(json.loads(line[-1])["tok_sae_per_s"] if p.returncode == 0 and line else float("nan"))
        say(f"{k} worker(s): " + " + ".join(f"{r / 1e6:.2f}M" for r in rates)
            + f" = {sum(rates) / 1e6:.2f}M SAE-tok/s")


def oom_section(dev: torch.device, tiny: bool) -> None:
    from saesweep.config.sweep import expand, parse_spec
    from saesweep.sweep import worker as worker_module
    from saesweep.sweep.store import FAIL
    from saesweep.sweep.worker import Worker, open_sweep, queue_trials

    d, ratio, n = (16, 4.0, 8) if tiny else (2048, 64.0, 16)
    say(f"== oom: a pack of {n} ReLU SAEs at d {d}, m {int(d * ratio)} claimed by one worker on {dev}")
    real = worker_module.run_pack
    sizes: list[int] = []

    def watched(configs, **kw):
        sizes.append(len(configs))
        if dev.type == "cpu" and len(configs) > 2:  # no real limit on this CPU: simulate a GPU's
            raise torch.OutOfMemoryError("CUDA out of memory (simulated on the CPU)")
        return real(configs, **kw)

    worker_module.run_pack = watched
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = parse_spec({
                "name": "oom", "sae_types": ["relu"], "output_dir": tmp,
                "base": {"source": {"kind": "synthetic", "d_in": d, "n_features": 64},
                         "train": {"tokens": 8192, "batch_size": 4096, "dtype": "float32", "device": str(dev)},
                         "eval": {"tokens": 4096, "batch_size": 4096}},
                "grids": {"relu": {"lr": [1e-4 * (i + 1) for i in range(n)], "dict_size_ratio": [ratio],
                                   "sparsity_coeff": [0.1]}},
                "execution": {"pack_size": n, "lease_s": 120, "heartbeat_s": 5}})
            store = open_sweep(spec)
            queue_trials(store, spec, expand(spec))
            t0 = time.perf_counter()
            w = Worker(store, spec.execution, device=str(dev), slot=str(dev), poll_s=0.1)
            w.run()
            splits = [t.user_attrs.get("reason") for t in store.trials([FAIL])]
            say(f"packs tried: {sizes}; complete {store.counts().get('complete', 0)}/{n}; "
                f"splits recorded {sum('pack split' in (r or '') for r in splits)}; "
                f"the worker now claims packs of {w.ex.pack_size}; {time.perf_counter() - t0:.1f}s"
                + ("  (out-of-memory simulated above 2 members: no device limit on a CPU)" if dev.type == "cpu" else ""))
    finally:
        worker_module.run_pack = real
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (d 16, m 64, packs of 4): checks the script itself")
    ap.add_argument("--sections", default="detect,pack,workers,oom")
    ap.add_argument("--child-rate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--m", type=int, default=24576)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    if args.child_rate:
        child_rate(args)
        return 0
    if args.tiny:
        args.d, args.m, args.n, args.steps, args.seconds = 16, 64, 4, 3, 0.5
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    t0 = time.perf_counter()
    if "detect" in sections:
        detect_section(dev)
    if "pack" in sections:
        pack_section(dev, args.d, args.m, args.n, args.steps)
    if "workers" in sections:
        workers_section(dev, args.d, args.m, args.n, args.steps, args.seconds)
    if "oom" in sections:
        oom_section(dev, args.tiny)
    say(f"== done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
