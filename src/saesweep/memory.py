"""The device memory a pack of ``n`` trials needs (:func:`estimate_pack_bytes`): parameters,
gradients, Adam moments, optimiser temporaries, the ``[n, batch, d_sae]`` activations of the
forward and backward pass, the batch, evaluation. The scheduler uses it to decide how many
workers a GPU gets and how large a pack may be there. Nothing polls free memory to decide.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

from saesweep.devices import GB

FLOAT = 4  # bytes: parameters, optimiser state and activations are float32
#: ``[n, batch, d_in]`` tensors per member (centred input, reconstruction, their difference and grads)
NARROW = 8


@functools.lru_cache(maxsize=64)
def _param_poly(sae_type: str, hparams_json: str) -> tuple[float, float, float, float]:
    """Parameters per member as ``a*d*m + b*m + c*d + e`` (d = d_in, m = d_sae), found by
    building small SAEs of the type on the CPU (so a new architecture needs no table entry)."""
    import numpy as np
    import torch

    from saesweep import saes

    cls = saes.get(sae_type)
    hp = json.loads(hparams_json)
    rows, counts = [], []
    for d, m in ((2, 3), (2, 5), (4, 3), (4, 5), (3, 7)):
        with torch.device("cpu"):
            sae = cls(d, m, [hp], [0], device="cpu")
        counts.append(sum(p.numel() for p in sae.parameters()) + sum(b.numel() for b in sae.buffers()))
        rows.append([d * m, m, d, 1])
    coef, *_ = np.linalg.lstsq(np.array(rows, float), np.array(counts, float), rcond=None)
    return tuple(float(round(c)) for c in coef)  # type: ignore[return-value]


def param_count(cfg, d_in: int, d_sae: int) -> int:
    """Parameters (and per-member buffers) of one member of ``cfg``'s SAE."""
    a, b, c, e = _param_poly(cfg.sae_type, json.dumps(cfg.sae_hparams, sort_keys=True, default=str))
    return int(a * d_in * d_sae + b * d_sae + c * d_in + e)


def _local_config(src: dict) -> Any:
    """The AutoConfig of an HF source's model from its config.json when it is on this machine (a
    local folder, or the Hugging Face cache: planning never downloads)."""
    from transformers import AutoConfig

    from saesweep.data.hf import is_local_model

    name = src["model"]
    path = str(Path(name).expanduser()) if is_local_model(name) else name
    kw = {"revision": src["revision"]} if src.get("revision") else {}
    return AutoConfig.from_pretrained(path, local_files_only=True, **kw)


@functools.lru_cache(maxsize=32)
def _hf_shape(source_json: str) -> Optional[tuple[int, int, int]]:
    """(d_model, layers, vocabulary) of an HF source's model, when its config is on this machine."""
    try:
        from saesweep.data.hf import d_model
        from saesweep.data.hooks import num_layers

        conf = _local_config(json.loads(source_json))
        return d_model(conf), int(num_layers(conf)), int(getattr(conf, "vocab_size", 0) or 0)
    except Exception:
        return None


def source_width(cfg) -> Optional[int]:
    """d_in of ``cfg``'s activations without loading them (None when it cannot be known here)."""
    if cfg.source.kind == "synthetic":
        return cfg.source.d_in
    if not isinstance(cfg.source.site, int):
        return _hook_width(json.dumps(cfg.source.model_dump(mode="json"), sort_keys=True))
    shape = _hf_shape(json.dumps(cfg.source.model_dump(mode="json"), sort_keys=True))
    return shape[0] if shape else None


@functools.lru_cache(maxsize=32)
def _hook_width(source_json: str) -> Optional[int]:
    """The width at a hook other than the residual stream (:func:`saesweep.data.hf.site_width`),
    when the model's config is on this machine."""
    try:
        from saesweep.data.hf import site_width

        src = json.loads(source_json)
        return site_width(_local_config(src), src["hook"])
    except Exception:
        return None


def _lm_bytes(cfg) -> int:
    """The language model a worker puts on its device for the spliced CE/KL metrics, and its logits."""
    if cfg.source.kind != "hf" or not cfg.eval.ce_tokens:
        return 0
    shape = _hf_shape(json.dumps(cfg.source.model_dump(mode="json"), sort_keys=True))
    if not shape:
        return 0
    d, layers, vocab = shape
    weight = 2 if cfg.source.lm_dtype == "bfloat16" else FLOAT
    params = 12 * layers * d * d + 2 * vocab * d
    logits = 3 * cfg.source.lm_batch_size * cfg.source.context_length * vocab * FLOAT
    return params * weight + logits


def estimate_pack_bytes(cfg, n: int, d_in: Optional[int] = None, device: str = "cuda") -> Optional[int]:
    """Device memory (bytes) to train and evaluate a pack of ``n`` trials shaped like ``cfg`` on a
    ``device`` of that kind (cpu, cuda, mps); None when the activation width is unknown (an HF
    model whose config cannot be read here).

    parameters + gradients + two Adam moments (4 x P per member), optimiser and gradient-clipping
    temporaries (2 x the largest parameter), plus the larger of: the training step's
    activations (the architecture's ``train_wide`` tensors of ``[rows, tokens, d_sae]`` and
    ``NARROW`` of ``[rows, tokens, d_in]``, the batch itself) and evaluation's (its ``eval_wide``
    of the same shape at the eval batch, the fired-feature masks, the dictionary-recovery
    cosines). ``rows`` and ``tokens`` follow the step plan the trainer will use
    (:func:`saesweep.saes.kernels.plan_for`): on a CPU the fused step runs one member at a time,
    a token chunk at a time; the autograd step (an architecture without a fused one, or
    ``SAESWEEP_STEP=autograd``) and accelerators hold the whole pack's batch.
    """
    d = d_in or source_width(cfg)
    if not d:
        return None
    m = max(1, int(round(d * cfg.dict_size_ratio)))
    n = max(1, int(n))
    p = param_count(cfg, d, m)
    state = 4 * n * p + 2 * n * d * m
    b, be = cfg.train.batch_size, cfg.eval.batch_size
    from saesweep import saes

    arch = saes.get(cfg.sae_type)
    rows, tok, rows_e, tok_e, wide = n, b, n, be, arch.train_wide
    if device.split(":")[0] == "cpu":
        import torch

        from saesweep.saes.kernels import plan_for

        cpu = torch.device("cpu")
        plan = plan_for(cpu, n, d, m, b)
        if plan.kernel == "fused" and arch.fused:
            rows, tok = (1 if plan.mode == "loop" else n), min(b, plan.chunk or b)
            wide = arch.fused_wide or arch.train_wide
        ev = plan_for(cpu, n, d, m, be)  # evaluation: per member on CPU, chunked like training
        rows_e, tok_e = (1 if ev.mode == "loop" else n), min(be, ev.chunk or be)
    train = rows * tok * (wide * m + NARROW * d) + 2 * b * d
    recovery = 2 * cfg.source.n_features * m if cfg.source.kind == "synthetic" else 0
    evals = rows_e * tok_e * (arch.eval_wide * m + NARROW * d) + 2 * be * d + 2 * n * m + recovery
    return FLOAT * (state + max(train, evals)) + _lm_bytes(cfg)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit, div in (("PB", 2**50), ("TB", 2**40), ("GB", GB), ("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{int(n)}B"
