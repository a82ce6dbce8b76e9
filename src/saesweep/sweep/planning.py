"""Planning a sweep on this host: worker slots per device (memory budgets, pack sizes), and how
trials are dealt to devices (round robin) or taken as they come (dynamic)."""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

from saesweep import packing
from saesweep.errors import ConfigError
from saesweep.config.sweep import ExecutionSpec
from saesweep.devices import GB, Slot, cpu_slots, detect, parse_devices
from saesweep.memory import estimate_pack_bytes, fmt_bytes
from saesweep.sweep.store import SweepStore

ASSIGNMENT_ATTR = "assignment"


#: share of a device's memory that packs may plan to use (allocator fragmentation, other users)
MEMORY_SAFETY = 0.85


#: what each worker process spends on a GPU before its first tensor (CUDA context, cuBLAS workspace)
CUDA_CONTEXT_BYTES = 600 * 2**20


#: workers a GPU gets by default when the largest pack fits that many times
WORKERS_PER_GPU = 2


# ----------------------------------------------------------------------- planning
def pack_estimator(configs: Optional[Sequence[Any]]) -> Optional[Callable[..., int]]:
    """``est(n, kind)``: estimated bytes of the largest pack of at most ``n`` trials among
    ``configs`` (one shape per pack group) on a device of ``kind`` (cpu, cuda, mps), or None when
    nothing can be estimated."""
    if not configs:
        return None

    shapes = [(group[0], len(group)) for group in packing.groups(configs).values()]
    if all(estimate_pack_bytes(c, 1) is None for c, _ in shapes):
        return None

    def est(n: int, kind: str = "cuda") -> int:
        return max((estimate_pack_bytes(cfg, min(n, size), device=kind) or 0) for cfg, size in shapes)

    return est


def check_fits(configs: Optional[Sequence[Any]], devices: Sequence[Any]) -> None:
    """Refuse, before anything starts, a trial that fits on none of this machine's devices even
    alone in its pack (its estimate above the largest one's memory), naming the fields that make
    it large. One that fits some device but not the ones chosen is only warned about
    (:func:`plan_lines`): the estimate is approximate, and an out-of-memory trial moves on."""
    sized = [s for s in devices if s.total_bytes]
    if not configs or not sized:
        return
    largest = max(sized, key=lambda s: s.total_bytes or 0)
    room = (largest.total_bytes or 0) * MEMORY_SAFETY
    for group in packing.groups(configs).values():
        cfg = group[0]
        need = estimate_pack_bytes(cfg, 1, device=largest.kind)
        if need is not None and need > room:
            raise ConfigError(
                f"dict_size_ratio {cfg.dict_size_ratio:g} (sae_type {cfg.sae_type}, train.batch_size "
                f"{cfg.train.batch_size}): one trial needs ~{fmt_bytes(need)} of memory, more than any device here "
                f"has ({largest.name}: {fmt_bytes(largest.total_bytes)}); lower dict_size_ratio or train.batch_size")


def _budget(slot: Slot, workers_on_device: int) -> Optional[float]:
    if not slot.total_bytes:
        return None
    per = slot.total_bytes * MEMORY_SAFETY / max(1, workers_on_device)
    return per - (CUDA_CONTEXT_BYTES if slot.kind == "cuda" else 0)


def plan_workers(devices: Optional[str], max_parallel: Optional[int] = None, configs: Optional[Sequence[Any]] = None,
                 execution: Optional[ExecutionSpec] = None, found=None) -> list[Slot]:
    """The worker slots for ``--devices`` and ``--max_parallel`` (None: decide), with pack caps.

    * Without ``max_parallel``: one worker per listed device; a GPU gets up to
      ``WORKERS_PER_GPU`` when the sweep's largest pack (plus a CUDA context) fits that many
      times in ``MEMORY_SAFETY`` of its memory.
    * With ``max_parallel`` above the number of devices: the extra workers go to the GPUs (or
      MPS) in turn; with CPUs only, the cores are shared out among that many CPU slots.
    * Every slot whose device memory is known gets ``max_pack``, the largest pack (up to the
      sweep's ``pack_size``) whose estimate fits its share, when a full pack would not.
    """
    found = list(detect(with_free=False)) if found is None else list(found)
    base = parse_devices(devices, found)
    pack_size = execution.pack_size if execution is not None else 16
    check_fits(configs, [*found, *base])
    est = pack_estimator(configs)
    accel = [s for s in base if s.kind in ("cuda", "mps")]
    count = {s.name: 1 for s in base}
    if max_parallel is None:
        for s in base:
            if s.kind == "cuda" and est is not None and s.total_bytes:
                fits = int(s.total_bytes * MEMORY_SAFETY // (est(pack_size) + CUDA_CONTEXT_BYTES))
                count[s.name] = max(1, min(WORKERS_PER_GPU, fits))
    elif max_parallel > len(base):
        if accel:
            for i in range(max_parallel - len(base)):
                count[accel[i % len(accel)].name] += 1
        elif len(base) == 1 and base[0].name == "cpu" and base[0].threads:
            base = cpu_slots(max_parallel, found)
            count = {s.name: 1 for s in base}
        else:  # cpu:0,cpu:1 and more workers asked: more CPU slots sharing the cores
            names = [s.name for s in base] + [f"cpu:{i}" for i in range(len(base), max_parallel)]
            base = parse_devices(",".join(names), found)
            count = {s.name: 1 for s in base}
    n_workers = sum(count.values())
    cores = next((d.cores for d in found if d.kind == "cpu"), None) or 1
    cpu_workers = sum(1 for s in base if s.kind == "cpu")
    out: list[Slot] = []
    for s in base:
        k = count[s.name]
        on_device = cpu_workers if s.kind == "cpu" else k
        budget = _budget(s, on_device)
        cap, need = None, None
        if est is not None and budget is not None:
            cap = _largest_fitting(functools.partial(est, kind=s.kind), pack_size, budget)
            need = est(cap, s.kind)
            cap = cap if cap < pack_size or need > budget else None
        threads = s.threads
        if s.kind != "cpu":  # accelerator workers still feed data from the CPU: share the cores
            threads = max(1, cores // n_workers)
        for j in range(k):
            name = s.name if j == 0 else f"{s.name}#{j}"
            out.append(replace(s, name=name, threads=threads, env=dict(s.env), max_pack=cap, pack_bytes=need))
    return out


def _largest_fitting(est: Callable[[int], int], most: int, budget: float) -> int:
    """The largest pack size in [1, ``most``] whose estimate fits ``budget`` (1 when none does);
    the estimate grows with the pack size, so a bisection finds it."""
    lo, hi = 1, max(1, most)
    if est(lo) > budget:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if est(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def device_names(slots: Sequence[Slot]) -> list[str]:
    """The devices the slots are on, in order, once each (``Using devices: [...]``)."""
    return list(dict.fromkeys(s.base for s in slots))


def plan_lines(slots: Sequence[Slot], pack_size: int) -> list[str]:
    """What each device gets, when it is more than one plain worker: workers, pack cap, memory."""
    lines = []
    for dev in device_names(slots):
        mine = [s for s in slots if s.base == dev]
        s = mine[0]
        if len(mine) == 1 and s.max_pack is None and s.kind == "cpu":
            continue
        parts = [f"{len(mine)} worker{'s' if len(mine) > 1 else ''}"]
        if s.threads and s.kind == "cpu":
            parts[0] += f" x {s.threads} threads"
        pack = s.max_pack or pack_size
        if s.pack_bytes is not None:
            parts.append(f"packs of up to {pack} (~{fmt_bytes(s.pack_bytes)} each)")
        elif s.max_pack:
            parts.append(f"packs of up to {pack}")
        if s.total_bytes:
            parts.append(f"{s.total_bytes / GB:.1f}GB on the device")
        warn = ""
        if s.pack_bytes is not None and s.total_bytes and s.pack_bytes > (_budget(s, len(mine)) or 0):
            warn = "  (warning: one trial may not fit; out-of-memory trials move to another device)"
        lines.append(f"  {dev}: " + ", ".join(parts) + warn)
    over = oversubscription(slots)
    if over:
        lines.append(f"  warning: {over}")
    return lines


def oversubscription(slots: Sequence[Slot], cores: Optional[int] = None) -> Optional[str]:
    """A sentence when the CPU workers' threads outnumber the cores (they would slow each other
    down far more than they gain), else None."""
    cpu = [s for s in slots if s.kind == "cpu"]
    cores = cores or os.cpu_count() or 1
    threads = sum(s.threads or 1 for s in cpu)
    if len(cpu) < 2 or threads <= cores:
        return None
    return (f"{len(cpu)} CPU workers with {threads} threads in all on {cores} cores compete for them; "
            f"use --max_parallel {max(1, min(len(cpu), cores))} (or fewer threads per slot: cpu:K=T)")


def deal(trial_ids: Sequence[str], slots: Sequence[Slot]) -> dict[str, str]:
    """Round-robin: trial i goes to device i mod (number of devices)."""
    devs = device_names(slots)
    return {tid: devs[i % len(devs)] for i, tid in enumerate(trial_ids)}


def round_robin(store: SweepStore, slots: Sequence[Slot]) -> dict[str, str]:
    """Deal the waiting trials to the devices in turn; stored with the sweep."""
    order = [r.trial_id for r in store.records() if r.state == "waiting"]
    assignment = deal(order, slots)
    store.set_info(**{ASSIGNMENT_ATTR: assignment})
    return assignment


def distribution_lines(assignment: dict[str, str], slots: Sequence[Slot]) -> list[str]:
    counts = Counter(assignment.values())
    return ["Experiment distribution:"] + [f"  {d}: {counts.get(d, 0)} experiments" for d in device_names(slots)]


def assigned_to(assignment: dict[str, str], device: str) -> Callable[[Any], bool]:
    """A worker's filter under round_robin: its device's trials; trials dealt to nobody; and
    trials whose device ran out of memory on them (they may run anywhere else)."""

    def accept(t) -> bool:
        owner = assignment.get(t.user_attrs.get("trial_id"))
        if owner is None or owner == device:
            return True
        return owner in {a.split("#")[0] for a in t.user_attrs.get("avoid", ())}

    return accept
