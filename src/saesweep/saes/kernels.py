"""The fused training step's machinery: plans (loop or stacked, token chunks), workspaces,
and the few batched-matmul helpers the architectures' hand-written gradients use.

Why a hand-written step. An SAE step is five matrix products over ``[B, d] x [d, m]`` and a
handful of elementwise passes over ``[B, m]`` tensors. Autograd runs every elementwise op as its
own pass over memory, keeps every intermediate alive for the backward pass, allocates them
afresh each step and sums bias gradients in separate passes; on a CPU at d = 64 that left the
matrix units idle most of the time (15-20 % of the matrix peak measured in benchmarks/). The
architectures therefore write their gradients out by hand (``PackedSAE._fused_rows``), checked
against autograd in tests/saes/test_fused.py, with three tricks:

* **bias folding**: the centred input gets a column of ones and the encoder weight the bias as
  an extra row, so ``x W + b`` is one product and the bias gradient is the extra row of the
  weight gradient (no broadcast pass, no column-sum pass); the decoder gets a column of ones,
  so the decode also returns ``sum_i f_i`` per token (the L1 penalty) for free, and the
  backward product ``e W_dec^T`` adds the sparsity gradient constant through the same column;
* **token chunks** on CPU: the batch is processed ``chunk`` tokens at a time with gradients
  accumulated, so the ``[chunk, m]`` intermediates stay in cache between passes;
* **persistent workspaces**: the intermediates live in buffers reused every step (no
  allocator traffic; glibc would otherwise map and unmap them each step).

Loop or stacked. A pack of ``n`` members is either processed one member at a time (views
``p[i:i+1]`` of the stacked parameters, plain matrix products) or all at once (batched
products over the member axis). On CPU the loop is used: with these fused steps the two were
within about 10 % of each other at every width measured (stacked a little ahead at m <= 1024,
the loop 14-17 % ahead at m >= 2048 in benchmarks/run.py's ``modes`` section, and the sign
flipping between repeated runs on a shared 2-core machine), the large widths are where a sweep
spends its time, and the loop's memory is one member's intermediates whatever the pack size.
On GPUs stacking is expected to win for small SAEs (one kernel launch per op for the whole pack
instead of n): that is what the policy encodes for CUDA/MPS, an expectation rather than a
measurement (no GPU was available when it was written; ``benchmarks/run.py --device cuda``
measures both wherever it runs). ``SAESWEEP_PACK_MODE=loop|stacked`` overrides the rule, and
``SAESWEEP_STEP=autograd`` selects the reference autograd step instead of the fused one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from saesweep.settings import env

#: elements of one ``[chunk, m]`` intermediate on CPU. Measured (benchmarks/run.py ``modes``
#: and A/B runs, d = 64, m = 512..4096, B = 4096, packs of 4-16): 2^22 elements (chunks of
#: 1024 tokens at m = 4096, the whole batch at m <= 1024) was the best or within a few % of it
#: for every width; 2^20 - 2^21 were 5-10 % slower at m = 4096 and the whole batch 10-15 %.
CPU_CHUNK_ELEMENTS = 2**22
#: on CPU a chunk also has at least ``CPU_CHUNK_PER_D * d`` tokens (rounded up to a power of
#: two): a chunk's token count is the inner dimension of the two weight-gradient products, and
#: at d >= 512 the products lose more to a short inner dimension (and to one accumulation per
#: chunk) than the cache gains. Measured in benchmarks/README.md ("Token chunks at d >= 512").
#: At d = 64 the floor is below the element rule at every width, which stays as it was.
CPU_CHUNK_PER_D = 2
#: on GPUs the whole batch is one chunk unless the stacked intermediates would exceed this
GPU_CHUNK_ELEMENTS = 2**28
MIN_CHUNK = 128


@dataclass(frozen=True)
class StepPlan:
    """How one training step is computed."""

    kernel: str = "fused"  # fused | autograd
    mode: str = "loop"  # loop | stacked
    chunk: Optional[int] = None  # tokens per chunk (None: the whole batch)


def plan_for(device: torch.device, n: int, d_in: int, d_sae: int, batch_size: int) -> StepPlan:
    """The step plan for a pack of ``n`` SAEs ``d_in -> d_sae`` on ``device`` (rule from
    benchmarks/; env vars override)."""
    kernel = env("SAESWEEP_STEP")
    if kernel not in ("fused", "autograd"):
        raise ValueError(f"SAESWEEP_STEP must be 'fused' or 'autograd', not {kernel!r}")
    mode = env("SAESWEEP_PACK_MODE") or ("loop" if device.type == "cpu" else "stacked")
    if mode not in ("loop", "stacked"):
        raise ValueError(f"SAESWEEP_PACK_MODE must be 'loop' or 'stacked', not {mode!r}")
    env_chunk = env("SAESWEEP_CHUNK")
    if env_chunk:
        chunk = int(env_chunk)
    else:
        rows = 1 if mode == "loop" else n
        budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
        chunk = max(MIN_CHUNK, budget // max(1, rows * d_sae))
        if device.type == "cpu":
            chunk = max(chunk, 1 << max(0, CPU_CHUNK_PER_D * d_in - 1).bit_length())
    chunk = None if chunk >= batch_size else chunk
    return StepPlan(kernel, mode, chunk)


class Workspace:
    """Named buffers reused from step to step (reallocated only when a shape changes)."""

    def __init__(self) -> None:
        self._buf: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        t = self._buf.get(name)
        if t is None or t.shape != torch.Size(shape) or t.dtype != dtype or t.device != device:
            t = self._buf[name] = torch.empty(shape, dtype=dtype, device=device)
        return t

    def clear(self) -> None:
        self._buf.clear()


# --------------------------------------------------------------------- batched products
#: in-place backward of ReLU (zero the gradient where the forward output is <= 0) and of a clamp
threshold_backward = torch.ops.aten.threshold_backward.grad_input
hardtanh_backward = torch.ops.aten.hardtanh_backward.grad_input


def bmm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` for ``[k, *, *]`` operands; plain ``mm`` when k == 1 (faster on CPU)."""
    if a.shape[0] == 1:
        torch.mm(a[0], b[0], out=out[0])
    else:
        torch.bmm(a, b, out=out)
    return out


def bmm_acc(acc: Tensor, a: Tensor, b: Tensor, first: bool, tmp: Optional[Tensor] = None) -> None:
    """``acc (+)= a @ b``; ``acc`` may be float32 while ``a, b`` are bfloat16 (then through ``tmp``)."""
    if acc.dtype != a.dtype:
        assert tmp is not None
        bmm(a, b, tmp)
        if first:
            acc.copy_(tmp)
        else:
            acc.add_(tmp)
    elif first:
        bmm(a, b, acc)
    elif a.shape[0] == 1:
        acc[0].addmm_(a[0], b[0])
    else:
        acc.baddbmm_(a, b)


def chunks(batch: int, chunk: Optional[int]):
    """``(start, stop)`` token ranges of a batch."""
    step = chunk or batch
    for s in range(0, batch, step):
        yield s, min(batch, s + step)


def compute_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


# --------------------------------------------------------------------- training noise
#: independent random streams per member for the hard-concrete gate noise. Token row t of a
#: batch draws its uniforms from stream t % NOISE_STREAMS, so the numbers do not depend on how
#: a batch is chunked, on loop or stacked packs, or on the number of threads; on CPU the streams
#: are drawn in parallel (torch's CPU generator is serial: ~5 ns a number, which was 30 % of a
#: gated-hard-concrete step at m = 4096 with a single stream; 4 streams on 2 threads: 1.9x).
NOISE_STREAMS = 4
_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def noise_streams(seed: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """The noise generators of a member with this seed (distinct from its init generator)."""
    state = np.random.SeedSequence([int(seed), 0x6E6F697365]).generate_state(2 * NOISE_STREAMS, dtype=np.uint32)
    return [torch.Generator(device=device).manual_seed(int(state[2 * j]) << 31 | int(state[2 * j + 1]) >> 1)
            for j in range(NOISE_STREAMS)]


def _rng_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=NOISE_STREAMS, thread_name_prefix="saesweep-rng")
        return _pool


def draw_uniform(outs: Sequence[Tensor], streams: Sequence[Sequence[torch.Generator]], row0: int = 0) -> None:
    """Fill ``outs[i]`` (``[t, m]``, rows ``row0 .. row0 + t`` of a batch) with U(0, 1) numbers
    from member i's ``streams``: row r from stream (row0 + r) % S, in row order."""
    jobs = []
    for out, gens in zip(outs, streams):
        S = len(gens)
        for j, g in enumerate(gens):
            first = (j - row0) % S
            if first < out.shape[0]:
                jobs.append((out[first::S], g))
    threads = min(len(jobs), torch.get_num_threads())
    if threads > 1 and outs and outs[0].device.type == "cpu":
        for f in [_rng_pool().submit(v.uniform_, 0.0, 1.0, generator=g) for v, g in jobs]:
            f.result()
    else:
        for v, g in jobs:
            v.uniform_(0.0, 1.0, generator=g)
