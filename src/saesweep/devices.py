"""Device detection and device specs (the memory a pack needs is :mod:`saesweep.memory`'s).

Detection lists each CUDA GPU (name, total and free memory; through NVML when
``nvidia-ml-py`` is installed and the driver answers, else through torch), Apple MPS, and the
CPU (cores, RAM). GPUs are numbered as ``nvidia-smi`` numbers them (PCI bus order), within
``CUDA_VISIBLE_DEVICES`` when it is set; a worker for ``cuda:N`` is handed that GPU alone
through ``CUDA_VISIBLE_DEVICES=<its UUID>``, so the numbering cannot shift under it.

A device spec is ``auto`` or a comma-separated list of:

* ``auto`` -- every usable GPU (else MPS, else the CPU); ``auto,cpu`` adds the CPU;
* ``cuda:N`` (or ``cuda`` = ``cuda:0``) -- GPU N;
* ``mps`` -- the Apple GPU;
* ``cpu`` -- the CPU with all its cores;
* ``cpu:K`` -- CPU slot K: the cores are shared out among the CPU slots;
* ``cpu:K=T`` -- CPU slot K with T threads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from saesweep.errors import ConfigError

GB = 2**30


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # cuda:0 | mps | cpu
    kind: str  # cuda | mps | cpu
    label: str  # GPU or CPU model
    total_bytes: Optional[int] = None  # GPU memory, or RAM for the CPU
    free_bytes: Optional[int] = None
    cores: Optional[int] = None
    uuid: Optional[str] = None  # GPU-...
    index: Optional[str] = None  # the GPU's entry in this process's CUDA_VISIBLE_DEVICES, or its index
    problem: Optional[str] = None  # why this device cannot be used here (None: usable)
    #: the environment that shows a worker this GPU alone (CUDA_VISIBLE_DEVICES, maybe CUDA_DEVICE_ORDER)
    select: Optional[dict] = field(default=None, hash=False, compare=False)

    def line(self) -> str:
        """One line per device: ``Found CUDA device: cuda:0 (24.0GB) - NVIDIA RTX 4090``."""
        note = f" [not usable: {self.problem}]" if self.problem else ""
        if self.kind == "cuda":
            free = f", {self.free_bytes / GB:.1f}GB free" if self.free_bytes is not None else ""
            return f"Found CUDA device: {self.name} ({(self.total_bytes or 0) / GB:.1f}GB{free}) - {self.label}{note}"
        if self.kind == "mps":
            mem = f" ({self.total_bytes / GB:.1f}GB)" if self.total_bytes else ""
            return f"Found MPS device: {self.name}{mem} - {self.label}{note}"
        ram = f", {self.total_bytes / GB:.1f}GB RAM" if self.total_bytes else ""
        free = f", {self.free_bytes / GB:.1f}GB free" if self.free_bytes is not None else ""
        return f"Found CPU device ({self.cores} cores{ram}{free}) - {self.label}"

    def short(self) -> str:
        """``cuda:0 (NVIDIA RTX 4090, 24.0GB)`` -- for error messages."""
        if self.kind == "cpu":
            return f"cpu ({self.cores} cores)"
        mem = f", {self.total_bytes / GB:.1f}GB" if self.total_bytes else ""
        bad = f", not usable: {self.problem}" if self.problem else ""
        return f"{self.name} ({self.label}{mem}{bad})"


@dataclass(frozen=True)
class Slot:
    """Where one worker runs."""

    name: str  # cuda:1, cuda:1#1 (a second worker on cuda:1), cpu:0, cpu, mps
    device: str  # what the worker passes to torch (cuda:0 inside its CUDA_VISIBLE_DEVICES)
    kind: str  # cuda | mps | cpu
    threads: Optional[int] = None  # torch / OpenMP threads of the worker
    env: dict = field(default_factory=dict, hash=False, compare=False)
    total_bytes: Optional[int] = None  # the device's memory
    max_pack: Optional[int] = None  # most trials in one pack on this slot (None: the sweep's pack_size)
    pack_bytes: Optional[int] = None  # estimated memory of the largest pack this slot will run

    @property
    def base(self) -> str:
        """The device this slot is on: ``cuda:1`` for ``cuda:1#1``."""
        return self.name.split("#")[0]


# ---------------------------------------------------------------------- detection
#: CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix products: AMX tiles, or AVX-512
#: BF16 dot products. Without them PyTorch emulates bf16 products through fp32, which is slower
#: (measured 0.6x fp32 on an AVX-512 Xeon without BF16; 2.0x on an EPYC with AVX512-BF16).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not available)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str) -> bool:
    """Whether ``device`` (cpu, cuda[:N], mps) multiplies bf16 matrices natively."""
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return any(f in cpu_flags() for f in BF16_CPU_FLAGS)
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    """``train.dtype`` for ``device``: ``auto`` is bfloat16 where the device has native bf16
    products (:func:`native_bf16`), float32 elsewhere; a fixed dtype stays as it is."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


def _cpu_info() -> DeviceInfo:
    import platform

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    free = None
    label = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    label = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    return DeviceInfo("cpu", "cpu", label, total_bytes=ram, free_bytes=free, cores=cores)


def _visible() -> Optional[list[str]]:
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    if v is None:
        return None
    out = []
    for item in v.split(","):
        item = item.strip()
        if not item or item.startswith("-"):  # CUDA stops at the first invalid entry
            break
        out.append(item)
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml_infos() -> Optional[list[DeviceInfo]]:
    """GPUs through NVML, or None when NVML cannot say (not installed, no driver, MIG entries)."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        visible = _visible()
        handles = []
        if visible is None:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handles.append((str(i), pynvml.nvmlDeviceGetHandleByIndex(i)))
        else:
            for item in visible:
                if item.isdigit():
                    handles.append((item, pynvml.nvmlDeviceGetHandleByIndex(int(item))))
                elif item.startswith("GPU-"):
                    handles.append((item, pynvml.nvmlDeviceGetHandleByUUID(item)))
                else:  # MIG-... and other forms: let torch enumerate them
                    return None
        out = []
        for rank, (index, h) in enumerate(handles):
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                uuid = _text(pynvml.nvmlDeviceGetUUID(h))
            except Exception:
                uuid = None
            # a UUID names the GPU whatever the enumeration order; an NVML index is nvidia-smi's (PCI) order
            select = {"CUDA_VISIBLE_DEVICES": uuid} if uuid else {"CUDA_VISIBLE_DEVICES": index,
                                                                   "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
            out.append(DeviceInfo(f"cuda:{rank}", "cuda", _text(pynvml.nvmlDeviceGetName(h)), int(mem.total),
                                  int(mem.free), uuid=uuid, index=index, select=select))
        return out
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _torch_cuda_infos(with_free: bool) -> list[DeviceInfo]:
    """GPUs through torch. ``with_free`` asks each GPU for its free memory, which creates a CUDA
    context there; the scheduler's parent process does not ask, so it holds no GPU memory."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        visible = _visible()
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free = total = None
            if with_free:
                try:
                    free, total = torch.cuda.mem_get_info(i)
                except Exception:
                    pass
            uuid = getattr(props, "uuid", None)  # torch's _CUuuid prints as the bare hex UUID
            uuid = None if uuid is None else str(uuid)
            if uuid and not uuid.startswith(("GPU-", "MIG-")):
                uuid = "GPU-" + uuid
            if visible is not None and i < len(visible):  # the entry that names it here (an index, GPU-..., MIG-...)
                index = visible[i]
                select = {"CUDA_VISIBLE_DEVICES": index}
            else:  # torch's own numbering; the worker inherits CUDA_DEVICE_ORDER, so an index means the same GPU
                index = str(i)
                select = {"CUDA_VISIBLE_DEVICES": uuid or index}
            out.append(DeviceInfo(f"cuda:{i}", "cuda", props.name, int(total or props.total_memory),
                                  None if free is None else int(free), uuid=uuid, index=index, select=select))
        return out
    except Exception:
        return []


def _torch_cuda_built() -> Optional[str]:
    """Why this process's torch cannot drive an NVIDIA GPU (None: it can)."""
    try:
        import torch

        if not torch.backends.cuda.is_built():
            return f"torch {torch.__version__} was built without CUDA"
    except Exception as e:  # pragma: no cover - torch always imports here
        return f"torch cannot be imported ({e})"
    return None


def _mps_info() -> Optional[DeviceInfo]:
    try:
        import torch

        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            total = None
            try:
                total = int(torch.mps.recommended_max_memory())
            except Exception:
                pass
            return DeviceInfo("mps", "mps", "Apple Metal (MPS)", total_bytes=total)
    except Exception:
        pass
    return None


def detect(with_free: bool = True) -> list[DeviceInfo]:
    """Every device of this machine: GPUs first, then MPS, then the CPU."""
    gpus = _nvml_infos()
    if gpus is None:
        gpus = _torch_cuda_infos(with_free)
    elif gpus:
        problem = _torch_cuda_built()
        if problem:
            gpus = [replace(g, problem=problem) for g in gpus]
    devs = list(gpus)
    mps = _mps_info()
    if mps:
        devs.append(mps)
    devs.append(_cpu_info())
    return devs


def detection_lines(found: Optional[Sequence[DeviceInfo]] = None) -> list[str]:
    return [d.line() for d in (detect() if found is None else found)]


# ----------------------------------------------------------------------- device specs
_ITEM = re.compile(r"^(?:auto|cuda(?::(\d+))?|mps|cpu(?::(\d+))?(?:=(\d+))?)$")
SPEC_FORMS = "auto, cuda:N, mps, cpu, cpu:K or cpu:K=T (K a slot number, T its threads)"


def _found(found: Sequence[DeviceInfo]) -> str:
    return ", ".join(d.short() for d in found)


def parse_devices(spec: Optional[str], found: Optional[Sequence[DeviceInfo]] = None) -> list[Slot]:
    """One slot per listed device; an unknown, absent or unusable device is a ConfigError that
    lists the devices found (the CLI turns it into exit code 2 before anything starts)."""
    found = list(detect(with_free=False) if found is None else found)
    cpu = next(d for d in found if d.kind == "cpu")
    spec = "auto" if spec is None else spec.strip()
    items = [s.strip() for s in spec.split(",")]
    if not spec or any(not s for s in items):
        raise ConfigError(f"--devices {spec!r}: empty entry; use {SPEC_FORMS}; devices found: {_found(found)}")
    expanded: list[str] = []
    for item in items:
        if not _ITEM.match(item):
            raise ConfigError(f"--devices: {item!r} is not a device; use {SPEC_FORMS}; devices found: {_found(found)}")
        if item == "auto":
            gpus = [d.name for d in found if d.kind in ("cuda", "mps") and not d.problem]
            cpu_listed = any(s.startswith("cpu") for s in items)
            expanded += gpus or ([] if cpu_listed else ["cpu"])
        else:
            expanded.append("cuda:0" if item == "cuda" else item)
    cpu_items = [s for s in expanded if s.startswith("cpu")]
    if "cpu" in [s.split("=")[0] for s in cpu_items] and len(cpu_items) > 1:
        raise ConfigError(f"--devices {spec!r}: give the CPU either as cpu or as slots cpu:0,cpu:1,...; not both")
    slots: list[Slot] = []
    for item in expanded:
        m = _ITEM.match(item)
        if item.startswith("cuda"):
            info = next((d for d in found if d.name == item), None)
            if info is None:
                raise ConfigError(f"--devices: {item} is not on this machine; devices found: {_found(found)}")
            if info.problem:
                raise ConfigError(f"--devices: {item} cannot be used: {info.problem}; devices found: {_found(found)}")
            env = dict(info.select or {"CUDA_VISIBLE_DEVICES": info.uuid or info.index or item.split(":")[1]})
            slots.append(Slot(item, "cuda:0", "cuda", env=env, total_bytes=info.total_bytes))
        elif item == "mps":
            info = next((d for d in found if d.kind == "mps"), None)
            if info is None:
                raise ConfigError(f"--devices: mps is not on this machine; devices found: {_found(found)}")
            slots.append(Slot("mps", "mps", "mps", total_bytes=info.total_bytes))
        else:
            threads = int(m.group(3)) if m.group(3) else max(1, (cpu.cores or 1) // len(cpu_items))
            if threads < 1:
                raise ConfigError(f"--devices: {item!r} needs at least 1 thread")
            slots.append(Slot(item.split("=")[0], "cpu", "cpu", threads=threads, env={"CUDA_VISIBLE_DEVICES": ""},
                              total_bytes=cpu.total_bytes))
    seen = [s.name for s in slots]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ConfigError(f"--devices: {', '.join(dup)} listed twice; to run several workers on a CPU use cpu:0,cpu:1")
    return slots


def cpu_slots(n: int, found: Optional[Sequence[DeviceInfo]] = None) -> list[Slot]:
    """``n`` CPU slots sharing the cores (what ``--max_parallel N`` means on a CPU)."""
    if n <= 1:
        return parse_devices("cpu", found)
    return parse_devices(",".join(f"cpu:{i}" for i in range(n)), found)
