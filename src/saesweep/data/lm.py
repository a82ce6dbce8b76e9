"""Activations of a Hugging Face causal language model at a hook point, and the model with an
SAE's reconstruction spliced in there.

Conventions (they hold for training, held-out and spliced metrics alike):

* **Hook point.** :mod:`.hooks` says where each ``source.hook`` reads. On the residual stream
  between blocks (:attr:`HFSource.site` an int) it is the input of that block
  (``blocks.L.hook_resid_pre`` -> L, ``blocks.L.hook_resid_post`` -> L+1; L = n_layers is the
  last block's output). Capturing stops the forward pass once every hook asked for is read (a
  hook raises ``_Stop``): later blocks and the LM head never run.
* **Token rows, held-out rows, data sources**: :mod:`.corpus`; the model's config, tokenizer
  and the checks before any work: :mod:`.hf`.
* **BOS position.** With ``prepend_bos`` position 0 is left out everywhere: it is not a
  training or held-out activation (the same vector in every row, and an outlier), the splice
  leaves it unchanged, and its prediction is not scored. A row then gives
  ``context_length - 1`` activations and ``context_length - 2`` scored predictions
  (``context_length`` and ``context_length - 1`` without ``prepend_bos``).
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig, HFSource
from saesweep.data.corpus import token_rows
from saesweep.data.hf import check_source, load_tokenizer, model_path, quiet_hf
from saesweep.data.hooks import (
    Site,
    capture_sites,
    find_blocks,
    first_tensor,
    output_tensor,
    resolve,
    with_input,
    with_output,
)


# ----------------------------------------------------------------------------- model


def load_lm(source: HFSource, device: str | torch.device = "cpu", *, tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)``: the causal LM in eval mode on ``device`` in ``source.lm_dtype``."""
    from transformers import AutoModelForCausalLM

    kw = {"revision": source.revision} if source.revision else {}
    try:
        with quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(model_path(source), dtype=getattr(torch, source.lm_dtype), **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"source.model: cannot load {source.model!r} ({e})") from None
    model.eval().requires_grad_(False).to(device)
    return model, (load_tokenizer(source) if tokenizer else None)


class Tail:
    """What follows the hook point, for one batch: the blocks from the hook on, called as the
    clean forward called them but for the residual, then the final norm and the unembedding.
    ``residual`` is the clean residual at the hook point."""

    def __init__(self, blocks: list, calls: list, final: Optional[nn.Module], head: nn.Module, residual: Tensor):
        self.blocks, self.calls, self.final, self.head, self.residual = blocks, calls, final, head, residual

    @torch.inference_mode()
    def __call__(self, h: Tensor) -> Tensor:
        for block, (args, kwargs) in zip(self.blocks, self.calls):
            a, k = with_input(args, kwargs, h)
            h = output_tensor(block(*a, **k))
        if self.final is not None:
            h = self.final(h)
        return self.head(h)


class HookedLM:
    """A causal LM with the tensor at one hook point readable and replaceable
    (:mod:`saesweep.data.hooks`: ``site`` is a residual layer index or a hook name)."""

    def __init__(self, model: nn.Module, site: Union[int, str]) -> None:
        self.model = model
        self.blocks = find_blocks(model)
        self.n_layers = len(self.blocks)
        self.site = resolve(model, site)
        #: the block whose input is the hook point, for residual hooks (the tail shortcut)
        self.layer: Optional[int] = site if isinstance(site, int) else None
        self._tail_ok: Optional[bool] = None  # whether clean_and_tail's shortcut reproduces the model
        self._resolved: dict[Union[int, str], Site] = {}

    @contextlib.contextmanager
    def _hooked(self, fn: Callable[[Tensor], Optional[Tensor]]) -> Iterator[None]:
        """Replace the tensor at the hook point by ``fn`` of it (``fn`` may return None: keep it)."""
        site = self.site
        handles = []
        if site.addend is not None:  # the mid residual: shift what is added to the block's input
            assert site.block is not None
            box: dict[str, Tensor] = {}

            def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
                box["pre"] = first_tensor(args, kwargs)

            def shift(module: nn.Module, args: tuple, out: Any) -> Any:
                h = output_tensor(out)
                mid = box["pre"] + h
                new = fn(mid)
                return None if new is None else with_output(out, h + (new - mid))

            handles.append(site.block.register_forward_pre_hook(keep_input, with_kwargs=True))
            handles.append(site.addend.register_forward_hook(shift))
        elif site.side == "in":

            def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                new = fn(first_tensor(args, kwargs))
                return None if new is None else with_input(args, kwargs, new)

            handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(module: nn.Module, args: tuple, out: Any) -> Any:
                new = fn(output_tensor(out))
                return None if new is None else with_output(out, new)

            handles.append(site.module.register_forward_hook(post))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def capture(self, ids: Tensor) -> Tensor:
        """The tensor ``[batch, ctx, d]`` at the hook point; nothing after it is computed."""
        return capture_sites(self.model, ids, [self.site])[self.site.hook]

    @torch.inference_mode()
    def capture_layers(self, ids: Tensor, sites: Sequence[Union[int, str]]) -> dict[Union[int, str], Tensor]:
        """The tensor at each of ``sites`` (as :attr:`HFSource.site` gives them), all from one
        forward pass that stops once the last of them is read."""
        for key in sites:  # resolved once per HookedLM, not per LM batch
            if key not in self._resolved:
                self._resolved[key] = resolve(self.model, key)
        resolved = {key: self._resolved[key] for key in dict.fromkeys(sites)}
        got = capture_sites(self.model, ids, list(resolved.values()))
        return {key: got[site.hook] for key, site in resolved.items()}

    @torch.inference_mode()
    def clean_and_tail(self, ids: Tensor) -> tuple[Tensor, Optional[Tail]]:
        """Clean logits of ``ids``, and (when this model allows it) a :class:`Tail` that turns a
        replaced residual at the hook point into logits by running only what follows the hook.

        During the clean forward every block from the hook on records its call (arguments
        other than the residual: masks, position embeddings), and the modules outside the
        blocks record what they were given and returned, which finds the final norm between the
        last block and the unembedding. The first time, the tail is checked: on the clean
        residual it must give the clean logits (else, e.g. for a model that post-processes its
        logits, every edit falls back to a full forward).
        """
        if self.layer is None:  # not the residual stream: every edit is a full forward
            return self.model(input_ids=ids, use_cache=False).logits, None
        calls: list[tuple[tuple, dict]] = []
        seen: dict[nn.Module, tuple[Any, Any]] = {}
        handles = []

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))

        for block in list(self.blocks)[self.layer:]:
            handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
        last_out: list[Tensor] = []
        handles.append(self.blocks[-1].register_forward_hook(
            lambda m, a, out: last_out.append(out[0] if isinstance(out, tuple) else out)))
        head = self.model.get_output_embeddings()
        inside = {id(m) for b in self.blocks for m in b.modules()}
        for module in self.model.modules():
            if id(module) not in inside and module is not head and not list(module.children()):
                handles.append(module.register_forward_hook(
                    lambda m, a, out: seen.__setitem__(m, (a[0] if a else None, out))))
        head_in: list[Tensor] = []
        handles.append(head.register_forward_pre_hook(lambda m, a: head_in.append(a[0])))
        try:
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        if self._tail_ok is False or not last_out or not head_in:
            return logits, None
        final = None
        if not torch.equal(last_out[0], head_in[0]):
            final = next((m for m, (a, out) in seen.items() if isinstance(a, Tensor) and isinstance(out, Tensor)
                          and a.shape == last_out[0].shape and torch.equal(a, last_out[0])
                          and torch.equal(out, head_in[0])), None)
            if final is None:
                self._tail_ok = False
                return logits, None
        if calls:
            args, kwargs = calls[0]
            residual = first_tensor(args, kwargs)
        else:
            residual = last_out[0]
        tail = Tail(list(self.blocks)[self.layer:], calls, final, head, residual)
        if self._tail_ok is None:
            self._tail_ok = bool(torch.allclose(tail(residual), logits, rtol=1e-5, atol=1e-5))
        return logits, tail if self._tail_ok else None

    @torch.inference_mode()
    def logits(self, ids: Tensor, edit: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """Full forward; ``edit`` maps the residual at the hook point to its replacement."""
        ctx = self._hooked(edit) if edit is not None else contextlib.nullcontext()
        with ctx:
            return self.model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------- activations
def tokens_per_row(source: HFSource) -> int:
    """Activations per token row (the BOS position is left out with ``prepend_bos``)."""
    return source.context_length - (1 if source.prepend_bos else 0)


def predictions_per_row(source: HFSource) -> int:
    """Scored next-token predictions per row in the CE/KL metrics (every position but the last,
    and but the BOS one with ``prepend_bos``)."""
    return source.context_length - (2 if source.prepend_bos else 1)


class ActivationProducer:
    """Token rows and the LM that turns them into activations (what the cache builds from)."""

    def __init__(
        self,
        source: HFSource,
        n_train_rows: int,
        n_heldout_rows: int,
        *,
        device: str | torch.device = "cpu",
        datasets_cache: Optional[Path] = None,
        streaming: Optional[bool] = None,
    ) -> None:
        config = check_source(source)
        self.source = source
        self.rows = token_rows(
            source, n_train_rows, n_heldout_rows, datasets_cache=datasets_cache, streaming=streaming, config=config
        )
        self.device = torch.device(device)
        model, _ = load_lm(source, self.device, tokenizer=False)
        self.lm = HookedLM(model, source.site)
        self.start = 1 if source.prepend_bos else 0

    def activations(self, rows: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """float32 ``[rows_in_batch * tokens_per_row, d]`` per LM batch of ``lm_batch_size`` rows."""
        for acts in self.activations_by_site(rows, [self.source.site]):
            yield acts[self.source.site]

    def activations_by_site(self, rows: Iterable[np.ndarray],
                            sites: Sequence[Union[int, str]]) -> Iterator[dict[Union[int, str], np.ndarray]]:
        """The same for several hook sites at once (:attr:`HFSource.site`), from one forward pass
        per LM batch."""
        it = iter(rows)
        while True:
            batch = list(itertools.islice(it, self.source.lm_batch_size))
            if not batch:
                return
            ids = torch.from_numpy(np.stack(batch)).to(self.device)
            out = {}
            for site, h in self.lm.capture_layers(ids, sites).items():
                h = h[:, self.start :]
                out[site] = h.reshape(-1, h.shape[-1]).float().cpu().numpy()
            yield out


def needed_rows(cfg: ExperimentConfig) -> tuple[int, int]:
    """``(training rows, held-out rows)`` of ``context_length`` ids that ``cfg`` needs."""
    source = cfg.source
    per = tokens_per_row(source)
    heldout = -(-cfg.eval.tokens // per)
    if cfg.eval.ce_tokens:
        heldout = max(heldout, -(-cfg.eval.ce_tokens // predictions_per_row(source)))
    return -(-cfg.train.tokens // per), heldout
