"""A stand-in for ``nvidia-ml-py`` (module ``pynvml``) describing GPUs that are not there.

Tests put this folder first on the module path (or this module in ``sys.modules``) to check
detection and planning without a GPU. The GPUs come from ``FAKE_NVML_GPUS``: a JSON list of
``{"name": ..., "total_gb": ..., "free_gb": ...}``; default two 24 GB NVIDIA RTX 4090s.
Only the calls saesweep makes are provided; they behave as NVML's documentation says.
"""

import json
import os
from types import SimpleNamespace

GB = 2**30
calls = []


class NVMLError(Exception):
    pass


def _gpus():
    spec = os.environ.get("FAKE_NVML_GPUS")
    gpus = json.loads(spec) if spec else [{"name": "NVIDIA RTX 4090", "total_gb": 24.0, "free_gb": 23.0}] * 2
    return [SimpleNamespace(index=i, uuid=f"GPU-{i:08d}-fake-{i:04d}", **g) for i, g in enumerate(gpus)]


def nvmlInit():
    calls.append("init")


def nvmlShutdown():
    calls.append("shutdown")


def nvmlDeviceGetCount():
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(i):
    gpus = _gpus()
    if not 0 <= i < len(gpus):
        raise NVMLError("Invalid Argument")
    return gpus[i]


def nvmlDeviceGetHandleByUUID(uuid):
    for g in _gpus():
        if g.uuid == uuid:
            return g
    raise NVMLError("Not Found")


def nvmlDeviceGetName(h):
    return h.name


def nvmlDeviceGetUUID(h):
    return h.uuid


def nvmlDeviceGetMemoryInfo(h):
    total, free = int(h.total_gb * GB), int(h.free_gb * GB)
    return SimpleNamespace(total=total, free=free, used=total - free)
