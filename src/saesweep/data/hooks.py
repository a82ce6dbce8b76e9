"""Hook points of a Hugging Face causal LM: where ``source.hook`` reads and where an SAE's
reconstruction is spliced back in.

A hook names a tensor in the forward pass, either TransformerLens-style (``blocks.L.hook_*``) or
as a module of the model with the side read (``model.layers.6.mlp:out``, ``...:in``). It resolves
to a :class:`Site`: the module whose input (a forward pre-hook: its first positional argument,
else ``hidden_states``) or output (a forward hook: the output, or its first element when a
tuple) is the tensor. Reading and replacing use the same place, so what is trained on is what is
replaced.

The TransformerLens names map onto a block's children by the names HF models use (the table
below: Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX, Phi and others with the same layout):

==================  ============================================================================
``hook_resid_pre``  the block's input (``resid_post`` of L is ``resid_pre`` of L+1; of the last
                    block, its output)
``hook_resid_mid``  the residual after attention: the input of the norm before the MLP
                    (``pre_feedforward_layernorm``, ``ln_2``, ``post_attention_layernorm``); not
                    for parallel-residual blocks (GPT-NeoX's default, GPT-J), which have none
``hook_mlp_in``     the MLP module's input (after its norm)
``hook_mlp_out``    the MLP module's output
``hook_attn_out``   the attention module's output (after its output projection)
``hook_z``          the input of the attention's output projection (``o_proj``, ``c_proj``,
                    ``dense``, ``out_proj``): every head's output, concatenated
==================  ============================================================================

Replacing ``hook_resid_mid`` goes through the module whose output is added to the residual (the
attention, or Gemma's post-attention norm): its output is shifted by the change asked for, so the
residual the MLP and the rest of the model see is the replacement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from saesweep.config.experiment import BLOCK_HOOK_RE, BLOCK_HOOKS, HOOK_HELP, MODULE_HOOK_RE
from saesweep.errors import ConfigError

ATTENTION = ("self_attn", "attn", "attention", "self_attention")
MLP = ("mlp", "feed_forward", "ffn")
OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")
MID_NORM = ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm")


@dataclass(frozen=True)
class Site:
    """The tensor a hook names: ``module``'s input (``side`` "in") or output ("out"). For
    ``hook_resid_mid``, ``addend`` is the module whose output is added to the block's input to
    give it (replacing the residual shifts that output) and ``block`` the block."""

    hook: str
    module: nn.Module
    side: str
    addend: Optional[nn.Module] = None
    block: Optional[nn.Module] = None


def num_layers(config: Any) -> int:
    """How many blocks a model config has."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    raise ConfigError(f"source.model: cannot tell how many blocks {type(config).__name__} has")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the outermost ModuleList of n_layers modules."""
    n = num_layers(model.config)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"source.model: found no list of {n} blocks in {type(model).__name__}")


def _child(module: nn.Module, names: Sequence[str]) -> Optional[tuple[str, nn.Module]]:
    children = dict(module.named_children())
    return next(((n, children[n]) for n in names if n in children), None)


def _parallel(model: nn.Module) -> bool:
    c = model.config
    return bool(getattr(c, "use_parallel_residual", False) or getattr(c, "parallel_attn", False)
                or type(c).__name__ in ("GPTJConfig", "PhiConfig", "CohereConfig"))


def block_hooks(model: nn.Module, layer: int) -> dict[str, Site]:
    """The TransformerLens hooks block ``layer`` has, by name."""
    blocks = find_blocks(model)
    block = blocks[layer]
    name = f"blocks.{layer}.hook_"
    out = {name + "resid_pre": Site(name + "resid_pre", block, "in")}
    if layer == len(blocks) - 1:
        out[name + "resid_post"] = Site(name + "resid_post", block, "out")
    else:
        out[name + "resid_post"] = Site(name + "resid_post", blocks[layer + 1], "in")
    attn, mlp = _child(block, ATTENTION), _child(block, MLP)
    if attn is not None:
        out[name + "attn_out"] = Site(name + "attn_out", attn[1], "out")
        # the output projection, a child of the attention or of a module inside it (GPT-Neo)
        proj = next((m for p, m in attn[1].named_modules() if p.rsplit(".", 1)[-1] in OUT_PROJ), None)
        if proj is not None:
            out[name + "z"] = Site(name + "z", proj, "in")
    if mlp is not None:
        out[name + "mlp_in"] = Site(name + "mlp_in", mlp[1], "in")
        out[name + "mlp_out"] = Site(name + "mlp_out", mlp[1], "out")
    norm = _child(block, MID_NORM)
    if norm is not None and attn is not None and not _parallel(model):
        children = dict(block.named_children())
        # Gemma normalises the attention output before adding it: that norm is the addend
        addend = children["post_attention_layernorm"] if norm[0] == "pre_feedforward_layernorm" else attn[1]
        out[name + "resid_mid"] = Site(name + "resid_mid", norm[1], "in", addend=addend, block=block)
    return out


def available(model: nn.Module) -> str:
    """What :func:`resolve` accepts for ``model``, in a sentence for error messages."""
    n = len(find_blocks(model))
    names = sorted({h.rsplit(".", 1)[1] for h in block_hooks(model, 0)}, key=lambda h: BLOCK_HOOKS.index(h[5:]))
    example = next((p for p, m in model.named_modules() if p.endswith(".0.mlp") or p.endswith(".0.feed_forward")), None)
    return (f"blocks.L.{{{', '.join(names)}}} with L in 0..{n - 1}, or a module path with :in or :out"
            + (f" (e.g. {example}:out)" if example else ""))


def resolve(model: nn.Module, hook: Union[int, str]) -> Site:
    """The :class:`Site` of ``hook`` (a residual layer index as :attr:`HFSource.site` gives, or a
    hook name) in ``model``; a :class:`ConfigError` naming what the model has when it has not."""
    blocks = find_blocks(model)
    n = len(blocks)
    if isinstance(hook, int):
        if not 0 <= hook <= n:
            raise ConfigError(f"source.hook: layer {hook} is not in 0..{n}")
        if hook < n:
            return block_hooks(model, hook)[f"blocks.{hook}.hook_resid_pre"]
        return block_hooks(model, n - 1)[f"blocks.{n - 1}.hook_resid_post"]
    m = BLOCK_HOOK_RE.match(hook)
    if m is not None:
        layer = int(m.group(1))
        if not 0 <= layer < n:
            raise ConfigError(f"source.hook: {hook!r}: the model has blocks 0..{n - 1}; use {available(model)}")
        sites = block_hooks(model, layer)
        if hook not in sites:
            why = " (its blocks are parallel: attention and MLP read the same input)" \
                if m.group(2) == "resid_mid" and _parallel(model) else ""
            raise ConfigError(f"source.hook: {type(model).__name__} has no {m.group(2)} hook{why}; "
                              f"use {available(model)}")
        return sites[hook]
    if not MODULE_HOOK_RE.match(hook):
        raise ConfigError(f"source.hook: {hook!r} is not a hook point; use {HOOK_HELP}")
    path, side = hook.rsplit(":", 1)
    modules = dict(model.named_modules())
    if path not in modules:
        near = [p for p in modules if p.endswith("." + path.rsplit(".", 1)[-1])][:3]
        raise ConfigError(f"source.hook: {type(model).__name__} has no module {path!r}"
                          + (f" (modules with that name: {', '.join(near)})" if near else "")
                          + f"; use {available(model)}")
    return Site(hook, modules[path], side)


def first_tensor(args: tuple, kwargs: dict) -> Any:
    """The tensor a pre-hook reads: the first positional argument, else ``hidden_states``."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("the hooked module was called without a tensor input to read")


def output_tensor(out: Any) -> Any:
    """The tensor a forward hook reads: the output, or its first element."""
    return out[0] if isinstance(out, tuple) else out


def with_input(args: tuple, kwargs: dict, new: Any) -> tuple[tuple, dict]:
    """A pre-hook's ``(args, kwargs)`` with :func:`first_tensor` replaced by ``new``."""
    if args:
        return (new,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def with_output(out: Any, new: Any) -> Any:
    """A forward hook's output with :func:`output_tensor` replaced by ``new``."""
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass once every hook point is read."""


@torch.inference_mode()
def capture_sites(model: nn.Module, ids: Tensor, sites: Sequence[Site], **forward: Any) -> dict[str, Tensor]:
    """The tensor at each site by hook name, from one forward pass of ``ids`` stopped (a hook
    raises ``_Stop``) once every site has been read."""
    box: dict[str, Tensor] = {}
    want = {s.hook for s in sites}
    handles = []

    def grab(hook: str, h: Tensor) -> None:
        box[hook] = h
        if len(box) == len(want):
            raise _Stop

    for site in sites:
        if site.side == "in":
            def pre(module: nn.Module, args: tuple, kwargs: dict, hook: str = site.hook) -> None:
                grab(hook, first_tensor(args, kwargs))

            handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module: nn.Module, args: tuple, out: Any, hook: str = site.hook) -> None:
                grab(hook, output_tensor(out))

            handles.append(site.module.register_forward_hook(post))
    try:
        model(**{"input_ids": ids, "use_cache": False, **forward})
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(box) != len(want):
        raise RuntimeError(f"the hook points {sorted(want - set(box))} were never reached in the forward pass")
    return box
