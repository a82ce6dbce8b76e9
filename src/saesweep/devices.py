"""Device detection and device specs.

Detection lists each CUDA GPU (name, total and free memory; through NVML when
``nvidia-ml-py`` is installed, else through torch), Apple MPS, and the CPU (cores, RAM).

A device spec is ``auto`` or a comma-separated list of slots:

* ``cuda:N`` -- GPU N (a worker process sees only it, through ``CUDA_VISIBLE_DEVICES``);
* ``mps`` -- the Apple GPU;
* ``cpu`` -- the CPU with all its cores;
* ``cpu:K`` -- CPU slot K: the cores are shared out among the CPU slots;
* ``cpu:K=T`` -- CPU slot K with T threads.

``auto`` means every GPU if there is one (else MPS, else the CPU).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .config import ConfigError


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # cuda:0 | mps | cpu
    kind: str  # cuda | mps | cpu
    label: str
    total_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    cores: Optional[int] = None

    def line(self) -> str:
        if self.kind == "cuda":
            return f"Found CUDA device: {self.name} ({(self.total_bytes or 0) / 2**30:.1f}GB) - {self.label}"
        if self.kind == "mps":
            return f"Found MPS device: {self.name} - {self.label}"
        ram = f", {(self.total_bytes or 0) / 2**30:.1f}GB RAM" if self.total_bytes else ""
        return f"Found CPU device ({self.cores} cores{ram}) - {self.label}"


@dataclass(frozen=True)
class Slot:
    """Where one worker runs."""

    name: str  # as the user wrote it: cuda:1, cpu:0, cpu
    device: str  # what the worker passes to torch (cuda:0 inside its CUDA_VISIBLE_DEVICES)
    kind: str
    threads: Optional[int] = None
    env: dict = field(default_factory=dict, hash=False)
    total_bytes: Optional[int] = None


def _cpu_info() -> DeviceInfo:
    import platform

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    label = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                label = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return DeviceInfo("cpu", "cpu", label, total_bytes=ram, cores=cores)


def _cuda_infos() -> list[DeviceInfo]:
    out: list[DeviceInfo] = []
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible else range(pynvml.nvmlDeviceGetCount())
        for rank, idx in enumerate(indices):
            h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            out.append(DeviceInfo(f"cuda:{rank}", "cuda", name, int(mem.total), int(mem.free)))
        return out
    except Exception:
        pass
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except Exception:
                free, total = None, props.total_memory
            out.append(DeviceInfo(f"cuda:{i}", "cuda", props.name, int(total), free))
    except Exception:
        return []
    return out


def _mps_info() -> Optional[DeviceInfo]:
    try:
        import torch

        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return DeviceInfo("mps", "mps", "Apple Metal (MPS)")
    except Exception:
        pass
    return None


def detect() -> list[DeviceInfo]:
    """Every device on this machine: GPUs first, then MPS, then the CPU."""
    devs = _cuda_infos()
    mps = _mps_info()
    if mps:
        devs.append(mps)
    devs.append(_cpu_info())
    return devs


_SLOT = re.compile(r"^(cuda:(\d+)|cuda|mps|cpu(?::(\d+))?(?:=(\d+))?)$")


def parse_devices(spec: str, found: Optional[list[DeviceInfo]] = None) -> list[Slot]:
    """Slots for a device spec; an unknown or absent device is a ConfigError listing what exists."""
    found = detect() if found is None else found
    names = [d.name for d in found]
    cpu = next(d for d in found if d.kind == "cpu")
    spec = (spec or "auto").strip()
    if spec == "auto":
        gpus = [d for d in found if d.kind in ("cuda", "mps")]
        items = [d.name for d in gpus] or ["cpu"]
    else:
        items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"--devices {spec!r}: empty; devices found: {', '.join(names)}")
    slots: list[Slot] = []
    cpu_items = [s for s in items if s.startswith("cpu")]
    for item in items:
        m = _SLOT.match(item)
        if not m:
            raise ConfigError(f"--devices: {item!r} is not a device; use auto, cuda:N, mps, cpu, cpu:K or cpu:K=T (found: {', '.join(names)})")
        if item.startswith("cuda"):
            name = item if ":" in item else "cuda:0"
            info = next((d for d in found if d.name == name), None)
            if info is None:
                raise ConfigError(f"--devices: {name} is not available; devices found: {', '.join(names)}")
            idx = name.split(":")[1]
            phys = _physical_index(int(idx))
            slots.append(Slot(name, "cuda:0", "cuda", env={"CUDA_VISIBLE_DEVICES": phys}, total_bytes=info.total_bytes))
        elif item == "mps":
            if "mps" not in names:
                raise ConfigError(f"--devices: mps is not available; devices found: {', '.join(names)}")
            slots.append(Slot("mps", "mps", "mps"))
        else:
            threads = int(m.group(4)) if m.group(4) else max(1, (cpu.cores or 1) // len(cpu_items))
            if threads < 1:
                raise ConfigError(f"--devices: {item!r} needs at least 1 thread")
            slots.append(Slot(item.split("=")[0], "cpu", "cpu", threads=threads, env={"CUDA_VISIBLE_DEVICES": ""}, total_bytes=cpu.total_bytes))
    seen = [s.name for s in slots]
    dup = {n for n in seen if seen.count(n) > 1}
    if dup:
        raise ConfigError(f"--devices: {', '.join(sorted(dup))} listed twice; to run several workers on a CPU use cpu:0,cpu:1")
    return slots


def _physical_index(rank: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        if rank < len(ids):
            return ids[rank]
    return str(rank)


def cpu_slots(n: int, found: Optional[list[DeviceInfo]] = None) -> list[Slot]:
    """``n`` CPU slots sharing the cores (what ``--max_parallel N`` means on a CPU)."""
    if n <= 1:
        return parse_devices("cpu", found)
    return parse_devices(",".join(f"cpu:{i}" for i in range(n)), found)
