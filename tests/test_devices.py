"""Device detection, device specs, the pack memory estimate and worker planning.

No GPU is needed: NVML is replaced by tests/fake_gpu/pynvml.py (the interface saesweep calls,
behaving as NVML's documentation says) and torch's CUDA functions are patched where the torch
path is checked. The CPU is detected for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sweep_helpers import REPO, env

from saesweep import devices
from saesweep.config.experiment import ConfigError, ExperimentConfig
from saesweep.devices import DeviceInfo, parse_devices
from saesweep.memory import estimate_pack_bytes, param_count, source_width
from saesweep.sweep.local import _worker_command, worker_env
from saesweep.sweep.planning import (
    CUDA_CONTEXT_BYTES,
    MEMORY_SAFETY,
    pack_estimator,
    plan_lines,
    plan_workers,
)

FAKE = Path(__file__).parent / "fake_gpu"
GB = 2**30


@pytest.fixture
def fake_nvml(monkeypatch):
    """Two fake 24 GB RTX 4090s through NVML (set FAKE_NVML_GPUS for others)."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE / "pynvml.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return mod


@pytest.fixture
def cuda_torch(monkeypatch):
    """Pretend this torch was built with CUDA (it is the CPU build)."""
    monkeypatch.setattr(devices, "_torch_cuda_built", lambda: None)


def gpu(i, total=24, label="NVIDIA RTX 4090"):
    return DeviceInfo(f"cuda:{i}", "cuda", label, int(total * GB), int(total * GB), uuid=f"GPU-{i:08d}", index=str(i))


CPU = DeviceInfo("cpu", "cpu", "Test CPU", 64 * GB, 60 * GB, cores=8)
TWO_GPUS = [gpu(0), gpu(1), CPU]


# ------------------------------------------------------------------------- detection
def test_cpu_is_detected_for_real():
    found = devices.detect()
    cpu = found[-1]
    assert cpu.kind == "cpu" and cpu.cores == len(os.sched_getaffinity(0)) and cpu.total_bytes > 0
    assert re.fullmatch(r"Found CPU device \(\d+ cores, \d+\.\dGB RAM, \d+\.\dGB free\) - .+", cpu.line())


def test_nvml_detection_in_the_seeds_style(fake_nvml, cuda_torch):
    found = devices.detect()
    lines = [d.line() for d in found]
    assert lines[0] == "Found CUDA device: cuda:0 (24.0GB, 23.0GB free) - NVIDIA RTX 4090"
    assert lines[1] == "Found CUDA device: cuda:1 (24.0GB, 23.0GB free) - NVIDIA RTX 4090"
    assert lines[2].startswith("Found CPU device (")
    assert found[1].uuid == "GPU-00000001-fake-0001"
    assert parse_devices("cuda:1", found)[0].env == {"CUDA_VISIBLE_DEVICES": "GPU-00000001-fake-0001"}
    assert fake_nvml.calls[-1] == "shutdown"  # NVML is released after detection


def test_nvml_respects_cuda_visible_devices(fake_nvml, cuda_torch, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_GPUS", json.dumps([{"name": "A", "total_gb": 16, "free_gb": 1},
                                                     {"name": "B", "total_gb": 80, "free_gb": 79}]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    [b, cpu] = devices.detect()
    assert (b.name, b.label, b.index, b.total_bytes) == ("cuda:0", "B", "1", 80 * GB)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000001-fake-0001,0")
    assert [(d.name, d.label) for d in devices.detect()[:2]] == [("cuda:0", "B"), ("cuda:1", "A")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CUDA's meaning: no GPU at all
    assert [d.kind for d in devices.detect()] == ["cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at the first invalid entry
    assert [d.label for d in devices.detect() if d.kind == "cuda"] == ["A"]


def test_gpus_unusable_with_a_cpu_only_torch(fake_nvml):
    """NVML sees GPUs but this torch (the CPU build here) cannot drive them: listed, not used."""
    found = devices.detect()
    assert "not usable: torch" in found[0].line() and "without CUDA" in found[0].line()
    assert [s.name for s in parse_devices("auto", found)] == ["cpu"]
    with pytest.raises(ConfigError, match=r"cuda:0 cannot be used: torch .* without CUDA; devices found: cuda:0"):
        parse_devices("cuda:0", found)


def test_torch_fallback_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    asked_free = []

    def mem_get_info(i):
        asked_free.append(i)
        return (int(10.5 * GB), 40 * GB)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="NVIDIA A100-SXM4-40GB", total_memory=40 * GB, uuid=f"abcd-{i}"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = devices.detect(with_free=False)  # what the scheduler asks: no CUDA context in the parent
    assert asked_free == [] and found[0].free_bytes is None
    assert found[0].line() == "Found CUDA device: cuda:0 (40.0GB) - NVIDIA A100-SXM4-40GB"
    found = devices.detect()
    assert found[1].line() == "Found CUDA device: cuda:1 (40.0GB, 10.5GB free) - NVIDIA A100-SXM4-40GB"
    assert found[1].uuid == "GPU-abcd-1"
    slots = parse_devices("cuda:1", found)
    assert slots[0].env == {"CUDA_VISIBLE_DEVICES": "GPU-abcd-1"} and slots[0].device == "cuda:0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234,5")  # the parent's own names are passed on as they are
    assert [parse_devices(f"cuda:{i}", devices.detect())[0].env for i in (0, 1)] == \
        [{"CUDA_VISIBLE_DEVICES": "MIG-1234"}, {"CUDA_VISIBLE_DEVICES": "5"}]


def test_mps_detection(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * GB)
    found = devices.detect()
    assert found[0].line() == "Found MPS device: mps (16.0GB) - Apple Metal (MPS)"
    assert [s.name for s in parse_devices("auto", found)] == ["mps"]
    assert [s.device for s in parse_devices("mps,cpu", found)] == ["mps", "cpu"]


# ----------------------------------------------------------------------- device specs
def test_device_specs():
    slots = parse_devices("cuda:0,cuda:1,cpu", TWO_GPUS)
    assert [(s.name, s.device, s.kind) for s in slots] == [("cuda:0", "cuda:0", "cuda"), ("cuda:1", "cuda:0", "cuda"),
                                                           ("cpu", "cpu", "cpu")]
    assert slots[1].env == {"CUDA_VISIBLE_DEVICES": "GPU-00000001"}  # the worker sees that GPU alone
    assert slots[2].env == {"CUDA_VISIBLE_DEVICES": ""} and slots[2].threads == 8
    assert [s.name for s in parse_devices("auto", TWO_GPUS)] == ["cuda:0", "cuda:1"]
    assert [s.name for s in parse_devices("auto,cpu", TWO_GPUS)] == ["cuda:0", "cuda:1", "cpu"]
    assert [s.name for s in parse_devices("cuda", TWO_GPUS)] == ["cuda:0"]
    assert [s.name for s in parse_devices("auto", [CPU])] == ["cpu"]
    assert [(s.name, s.threads) for s in parse_devices("cpu:0,cpu:1", [CPU])] == [("cpu:0", 4), ("cpu:1", 4)]
    assert [(s.name, s.threads) for s in parse_devices("cpu:0=6,cpu:1=2", [CPU])] == [("cpu:0", 6), ("cpu:1", 2)]
    no_uuid = [DeviceInfo("cuda:0", "cuda", "X", GB, index="3"), CPU]
    assert parse_devices("cuda:0", no_uuid)[0].env == {"CUDA_VISIBLE_DEVICES": "3"}


@pytest.mark.parametrize("spec, message", [
    ("cuda:2", "cuda:2 is not on this machine"),
    ("cuda:0,cuda:7,cpu", "cuda:7 is not on this machine"),
    ("gpu", "'gpu' is not a device; use auto, cuda:N, mps, cpu, cpu:K or cpu:K=T"),
    ("mps", "mps is not on this machine"),
    ("cpu:0,cpu:0", "cpu:0 listed twice"),
    ("cpu,cpu:1", "either as cpu or as slots"),
    ("cuda:0,,cpu", "empty entry"),
    ("", "empty entry"),
    ("cpu:0=0", "needs at least 1 thread"),
])
def test_bad_device_specs(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_devices(spec, TWO_GPUS)
    assert message in str(e.value)
    if "listed twice" not in message and "either" not in message and "thread" not in message:
        assert "devices found: cuda:0 (NVIDIA RTX 4090, 24.0GB), cuda:1 (NVIDIA RTX 4090, 24.0GB), cpu (8 cores)" in str(e.value)


def test_bad_devices_on_the_command_line_exit_2_and_write_nothing(tmp_path):
    e = {**env(), "CUDA_VISIBLE_DEVICES": ""}  # no GPU here, whatever the machine has
    for cmd in (["-m", "saesweep", "sweep", "--sae_types", "relu", "--devices", "cuda:1"],
                [str(REPO / "scripts" / "run_multi_device_sweep.py"), "--devices", "cuda:0,cuda:1,cpu", "--limit", "20"],
                [str(REPO / "scripts" / "run_device_aware_sweep.py"), "--sae_types", "relu", "--devices", "tpu:0"]):
        p = subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and "--devices" in err[0] and re.search(r"devices found: cpu \(\d+ cores\)", err[0]), err
    assert list(tmp_path.iterdir()) == []  # nothing started or written


def test_show_devices_through_the_seed_scripts_with_fake_nvml(tmp_path):
    """The real scripts in real processes, NVML answering for two GPUs that are not there."""
    e = {**env(), "PYTHONPATH": f"{FAKE}{os.pathsep}{env()['PYTHONPATH']}"}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    for script in ("run_multi_device_sweep.py", "run_device_aware_sweep.py"):
        p = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--show_devices"], cwd=tmp_path, env=e,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0].startswith("Found CUDA device: cuda:0 (24.0GB, 23.0GB free) - NVIDIA RTX 4090")
        assert lines[1].startswith("Found CUDA device: cuda:1 (24.0GB, 23.0GB free) - NVIDIA RTX 4090")
        assert lines[2].startswith("Found CPU device (")
    p = subprocess.run([sys.executable, "-m", "saesweep", "devices"], cwd=tmp_path, env=e, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.count("Found CUDA device") == 2


def test_seed_dry_run_on_two_fake_gpus(fake_nvml, cuda_torch, tmp_path, monkeypatch, capsys):
    """The seed's example output: 100 experiments over cuda:0, cuda:1 and the CPU as 34/33/33."""
    from saesweep.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--sae_types", "relu,hard_concrete", "--devices", "cuda:0,cuda:1,cpu", "--limit", "100",
                 "--policy", "round_robin", "--dry_run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Found CUDA device: cuda:0 (24.0GB, 23.0GB free) - NVIDIA RTX 4090" in out
    assert "Using devices: ['cuda:0', 'cuda:1', 'cpu']" in out
    assert "Experiment distribution:\n  cuda:0: 34 experiments\n  cuda:1: 33 experiments\n  cpu: 33 experiments" in out
    # the seed grid's largest pack (16 x dict_size_ratio 64 at d_in 64) fits twice in 24 GB
    assert re.search(r"cuda:0: 2 workers, packs of up to 16 \(~[\d.]+[MG]B each\), 24.0GB on the device", out)
    assert list(tmp_path.iterdir()) == []
    code = main(["sweep", "--sae_types", "relu", "--devices", "auto", "--dry_run"])
    out = capsys.readouterr().out
    assert "Using devices: ['cuda:0', 'cuda:1']" in out and "cuda:0: 24 experiments" in out


# ------------------------------------------------------------------- memory estimate
def cfg_of(sae_type="relu", d_in=64, ratio=16.0, batch=2048, **kw):
    return ExperimentConfig(sae_type=sae_type, dict_size_ratio=ratio, source={"kind": "synthetic", "d_in": d_in},
                            train={"batch_size": batch, "tokens": 3 * batch, "log_every": 1, "device": "cpu"},
                            eval={"batch_size": batch, "tokens": batch}, **kw)


@pytest.mark.parametrize("sae_type, extra", [("relu", {}), ("gated", {}), ("hard_concrete", {"input_dependent_gates": True}),
                                             ("hard_concrete", {"input_dependent_gates": False}), ("gated_hard_concrete", {})])
def test_param_count_matches_the_modules(sae_type, extra):
    from saesweep import saes

    cfg = cfg_of(sae_type, **extra)
    sae = saes.get(sae_type)(24, 40, [cfg.sae_hparams], [0])
    real = sum(p.numel() for p in sae.parameters()) + sum(b.numel() for b in sae.buffers())
    assert param_count(cfg, 24, 40) == real


def _malloc_in_use():
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def in_use():
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return in_use


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2 measures the peak")
@pytest.mark.parametrize("step", ["autograd", "fused-stacked", "fused"])
def test_memory_estimate_bounds_the_measured_peak(step, monkeypatch):
    """Train and evaluate real packs on the CPU, sampling the C heap after every torch op: the CPU
    estimate is above the measured peak for every way the trainer may compute a step (the
    autograd reference, the fused step stacked over the whole batch as on a GPU, the default CPU
    plan), within 1.3x of it for the default CPU plan and not wildly above it for the autograd
    step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from saesweep.data.base import Activations
    from saesweep.metrics.reconstruction import evaluate
    from saesweep.training.trainer import train_pack

    try:
        in_use = _malloc_in_use()
    except (OSError, AttributeError):
        pytest.skip("no glibc mallinfo2")
    if step == "autograd":
        monkeypatch.setenv("SAESWEEP_STEP", "autograd")
    elif step == "fused-stacked":
        monkeypatch.setenv("SAESWEEP_PACK_MODE", "stacked")
        monkeypatch.setenv("SAESWEEP_CHUNK", "1024")

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.peak = in_use()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    class Fixed(Activations):  # one batch in memory: only the SAE's own memory is measured
        def __init__(self, d, b):
            self.d_in, self.scale, self.ground_truth = d, 1.0, None
            self.x = torch.randn(b, d)

        def train_batches(self, batch_size, seed, start=0):
            while True:
                yield self.x

        def eval_activations(self):
            return self.x

        def mean(self):
            return torch.zeros(self.d_in)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for sae_type, extra, n in [("relu", {}, 1), ("relu", {}, 3), ("gated_hard_concrete", {}, 2),
                                   ("hard_concrete", {"input_dependent_gates": True}, 2), ("gated", {}, 2)]:
            cfgs = [cfg_of(sae_type, d_in=32, ratio=16.0, batch=1024, lr=1e-3 * (i + 1), **extra) for i in range(n)]
            data = Fixed(32, 1024)
            with Peak():  # warm-up: one-time allocations (of torch and of the dispatch mode)
                train_pack(cfgs, data, device="cpu", show_progress=False)
            base = in_use()
            with Peak() as p:
                res = train_pack(cfgs, data, device="cpu", show_progress=False)
                evaluate(res.sae, data, 1024)
            measured = p.peak - base
            est = estimate_pack_bytes(cfgs[0], n, device="cpu")
            assert measured < est, (step, sae_type, n, measured, est)
            if step == "autograd":
                assert est < 2.5 * measured, (step, sae_type, n, measured, est)
            if step == "fused":  # the CPU's own plan, what the planner sizes CPU packs by
                assert est < 1.3 * measured, (step, sae_type, n, measured, est)
    finally:
        torch.set_num_threads(threads)


def test_estimate_grows_with_pack_and_width():
    small = estimate_pack_bytes(cfg_of(ratio=8.0), 1)
    assert estimate_pack_bytes(cfg_of(ratio=8.0), 4) > 3 * small * 0.9
    assert estimate_pack_bytes(cfg_of(ratio=64.0), 1) > 6 * small
    assert estimate_pack_bytes(cfg_of("hard_concrete", input_dependent_gates=True), 1) > estimate_pack_bytes(cfg_of(), 1)
    hf = ExperimentConfig(source={"kind": "hf", "model": "/nonexistent/model"})
    assert estimate_pack_bytes(hf, 1) is None  # width unknown here: no plan is made from it


def test_estimate_for_the_local_hf_model():
    model = REPO.parent / "shared" / "models" / "stories260K"
    if not (model / "config.json").exists():
        pytest.skip("no local model")
    cfg = ExperimentConfig(source={"kind": "hf", "model": str(model), "dataset": "x.jsonl"}, dict_size_ratio=8.0)
    assert source_width(cfg) == 64
    assert estimate_pack_bytes(cfg, 2) > estimate_pack_bytes(cfg_of(d_in=64, ratio=8.0, batch=4096), 2)


# --------------------------------------------------------------------------- planning
def test_small_packs_get_two_workers_per_gpu():
    cfgs = [cfg_of(lr=1e-3 * (i + 1)) for i in range(32)]
    slots = plan_workers("cuda:0,cuda:1,cpu", None, cfgs, None, found=TWO_GPUS)
    assert [s.name for s in slots] == ["cuda:0", "cuda:0#1", "cuda:1", "cuda:1#1", "cpu"]
    assert all(s.max_pack is None for s in slots)
    assert slots[1].env == {"CUDA_VISIBLE_DEVICES": "GPU-00000000"} and slots[1].base == "cuda:0"
    assert worker_env(slots[3])["CUDA_VISIBLE_DEVICES"] == "GPU-00000001"
    assert worker_env(slots[4])["CUDA_VISIBLE_DEVICES"] == "" and worker_env(slots[4])["OMP_NUM_THREADS"] == "8"
    assert slots[0].threads == 8 // 5  # GPU workers share the cores
    capped = [s for s in plan_workers("cuda:0", 3, [cfg_of(d_in=2048, ratio=32.0, batch=4096)] * 2,
                                      None, found=TWO_GPUS)]
    cmd = _worker_command(SimpleNamespace(url="j", name="n"), capped[1], "round_robin", 3, "r")
    assert cmd[cmd.index("--slot") + 1] == "cuda:0#1" and cmd[cmd.index("--max_pack") + 1] == str(capped[1].max_pack)
    assert "--assigned" in cmd and cmd[cmd.index("--device") + 1] == "cuda:0"
    # no sweep to size by: one worker per device
    assert [s.name for s in plan_workers("cuda:0,cuda:1", None, None, None, found=TWO_GPUS)] == ["cuda:0", "cuda:1"]


def test_big_packs_get_one_worker_and_a_pack_cap():
    from saesweep.config.sweep import ExecutionSpec

    ex = ExecutionSpec(pack_size=16)
    cfgs = [cfg_of(d_in=2048, ratio=32.0, batch=4096, lr=1e-4 * (i + 1)) for i in range(16)]
    est = pack_estimator(cfgs)
    budget = 24 * GB * MEMORY_SAFETY - CUDA_CONTEXT_BYTES
    slots = plan_workers("cuda:0", None, cfgs, ex, found=TWO_GPUS)
    assert len(slots) == 1
    cap = slots[0].max_pack
    assert cap is not None and 1 <= cap < 16
    assert est(cap) <= budget < est(cap + 1)
    assert slots[0].pack_bytes == est(cap)
    # on a 4 GB card not even one such trial fits: packs of one and a warning
    small = plan_workers("cuda:0", None, cfgs, ex, found=[gpu(0, total=4), CPU])
    assert small[0].max_pack == 1
    assert "may not fit" in plan_lines(small, 16)[0]


def test_max_parallel_adds_workers_to_gpus_or_splits_the_cpu():
    cfgs = [cfg_of(d_in=2048, ratio=32.0, batch=4096)]
    slots = plan_workers("cuda:0,cuda:1,cpu", 6, cfgs, None, found=TWO_GPUS)
    assert [s.name for s in slots] == ["cuda:0", "cuda:0#1", "cuda:0#2", "cuda:1", "cuda:1#1", "cpu"]
    one = plan_workers("cuda:0", None, cfgs, None, found=TWO_GPUS)[0]
    assert slots[0].pack_bytes <= one.pack_bytes  # three workers share the GPU: smaller packs fit each
    assert [(s.name, s.threads) for s in plan_workers("cpu", 4, None, None, found=[CPU])] == \
        [("cpu:0", 2), ("cpu:1", 2), ("cpu:2", 2), ("cpu:3", 2)]
    assert [s.name for s in plan_workers("cpu:0,cpu:1", 3, None, None, found=[CPU])] == ["cpu:0", "cpu:1", "cpu:2"]
    assert [s.name for s in plan_workers("cpu:0,cpu:1", 1, None, None, found=[CPU])] == ["cpu:0", "cpu:1"]


def test_more_cpu_threads_than_cores_is_named_in_the_plan():
    from saesweep.devices import Slot
    from saesweep.sweep.planning import oversubscription

    four = [Slot(f"cpu:{i}", "cpu", "cpu", threads=1) for i in range(4)]
    msg = oversubscription(four, cores=2)
    assert msg and "4 CPU workers with 4 threads in all on 2 cores" in msg and "--max_parallel 2" in msg
    assert oversubscription(four[:2], cores=2) is None
    assert oversubscription([Slot("cpu:0", "cpu", "cpu", threads=3), Slot("cpu:1", "cpu", "cpu", threads=3)], cores=4)


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),  # Sapphire Rapids and later
    ({"avx512f", "avx512_bf16"}, "bfloat16"),  # Zen 4, Cooper Lake
    ({"avx512f", "avx512bw"}, "float32"),  # AVX-512 without BF16: bf16 would be emulated
    (set(), "float32"),  # no /proc/cpuinfo
])
def test_dtype_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    from saesweep import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: set(flags))
    assert devices.resolve_dtype("auto", "cpu") == expected
    assert devices.resolve_dtype("float32", "cpu") == "float32"  # a fixed dtype is kept
    assert devices.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert devices.resolve_dtype("auto", "mps") == "float32"


def test_dtype_auto_on_cuda_asks_torch(monkeypatch):
    import torch

    from saesweep import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.resolve_dtype("auto", "cuda:1") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.resolve_dtype("auto", "cuda") == "float32"


@pytest.mark.parametrize("flags, expected", [({"amx_bf16"}, "bfloat16"), ({"avx2"}, "float32")])
def test_a_run_records_the_dtype_auto_chose(tiny_cfg, monkeypatch, flags, expected):
    import saesweep
    from saesweep import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: set(flags))
    r = saesweep.run(tiny_cfg(train={"tokens": 4096, "device": "cpu", "dtype": "auto"}))
    assert r.config.train.dtype == "auto" and r.metrics["dtype"] == expected


def test_gpt2_small_packs_on_an_h200_and_on_a_24_gb_card():
    """The memory plan at a researcher's scale (d 768, m 24576, batch 4096), fed with the
    memory of an H200 (141 GB) and of a 24 GB card: what each slot may claim."""
    from saesweep.config.sweep import ExecutionSpec

    ex = ExecutionSpec(pack_size=16)
    cfgs = [cfg_of(d_in=768, ratio=32.0, batch=4096, lr=1e-4 * (i + 1)) for i in range(16)]
    est = pack_estimator(cfgs)
    h200 = gpu(0, total=141, label="NVIDIA H200")
    big = plan_workers("cuda:0", None, cfgs, ex, found=[h200, CPU])
    # a full pack of 16 fits twice: two workers, no cap
    assert [s.name for s in big] == ["cuda:0", "cuda:0#1"] and all(s.max_pack is None for s in big)
    assert 2 * (est(16) + CUDA_CONTEXT_BYTES) <= 141 * GB * MEMORY_SAFETY
    small = plan_workers("cuda:0", None, cfgs, ex, found=[gpu(0, total=24), CPU])
    assert len(small) == 1
    cap = small[0].max_pack
    budget = 24 * GB * MEMORY_SAFETY - CUDA_CONTEXT_BYTES
    assert cap is not None and 1 <= cap < 16 and est(cap) <= budget < est(cap + 1)
    # the estimate is the same linear cost per member the planner divides by
    per_member = est(2) - est(1)
    assert est(16) - est(1) == pytest.approx(15 * per_member, rel=1e-6)
