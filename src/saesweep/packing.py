"""How trials are packed: which trials may train together, and how a pack is named.

A *pack* is up to ``pack_size`` trials trained as one model (one packed SAE, one pass over the
activations). Trials may share a pack when they differ only in per-member fields: ``lr``,
``sparsity_coeff``, ``target_l0``, ``initial_coeff`` and every architecture hyperparameter declared
``per_member=True``. Everything else (the type, the dictionary size, the source, the training
budget, how the activations are delivered) is the *pack key*: equal keys, one pack.

Everything about packing lives here: the per-member fields (:func:`per_member_fields`), the key
(:func:`pack_key`), the check a pack passes before training (:func:`check_pack`), grouping
configs (:func:`groups`, what the memory plan and the sampled search use), choosing what one
claim takes from the queue (:func:`choose_claim`) and a pack's checkpoint name
(:func:`checkpoint_name`).

The key is stored with each queued trial together with :data:`PACK_RULE`. A trial queued under
another rule (or under none) has its key derived again from its config when it is claimed, so a
change of the rule regroups the queue at once, with no failed attempt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Mapping, TypeVar

from saesweep import saes
from saesweep.config.experiment import DELIVERY_FIELDS, ExperimentConfig, HFSource, TrainConfig

#: the version of the rule below: bump it whenever :func:`pack_key` changes what it groups
PACK_RULE = 1

#: fields every architecture lets a member set on its own
COMMON_PER_MEMBER = ("lr", "sparsity_coeff", "target_l0", "initial_coeff")

T = TypeVar("T")


def per_member_fields(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Fields a member of ``cfg``'s pack may set on its own; everything else must match."""
    own = saes.declaration(cfg.sae_type).hyperparams
    return (*COMMON_PER_MEMBER, *(k for k, hp in own.items() if hp.per_member))


def pack_key(cfg: ExperimentConfig) -> str:
    """Configs with equal keys can train together in one pack."""
    ident = cfg.identity()
    for k in per_member_fields(cfg):
        ident.pop(k, None)
    if ident["train"].get("target_l0_hold_frac") == TrainConfig.model_fields["target_l0_hold_frac"].default:
        del ident["train"]["target_l0_hold_frac"]  # members with and without a target train together
    if isinstance(cfg.source, HFSource):  # members share one stream, so one way of delivering it
        delivery = {k: getattr(cfg.source, k) for k in DELIVERY_FIELDS
                    if getattr(cfg.source, k) != HFSource.model_fields[k].default}
        if delivery:
            ident["delivery"] = delivery
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return f"{cfg.sae_type}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def check_pack(configs: Sequence[ExperimentConfig]) -> None:
    """Refuse configs that cannot train as one pack, naming what members may differ in."""
    if len({pack_key(c) for c in configs}) != 1:
        raise ValueError("configs of one pack must share everything but " + ", ".join(per_member_fields(configs[0])))


def groups(configs: Iterable[ExperimentConfig]) -> dict[str, list[ExperimentConfig]]:
    """``configs`` by pack key, in first-seen order."""
    out: dict[str, list[ExperimentConfig]] = {}
    for c in configs:
        out.setdefault(pack_key(c), []).append(c)
    return out


def stored_attrs(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a queued trial records about its pack."""
    return {"pack_key": pack_key(cfg), "pack_rule": PACK_RULE}


def key_of_stored(attrs: Mapping[str, Any], config: Callable[[], ExperimentConfig]) -> str:
    """A queued trial's pack key: the stored one when it was made under this rule, else derived
    from its config (``config()``) now."""
    if attrs.get("pack_rule") == PACK_RULE and attrs.get("pack_key"):
        return str(attrs["pack_key"])
    return pack_key(config())


def choose_claim(waiting: Sequence[T], key: Callable[[T], str], checkpoint: Callable[[T], str | None],
                 max_members: int, share: int = 1) -> list[T]:
    """What one claim takes from the queue (``waiting``, in queue order).

    Trials interrupted in a pack come first, with the others of that pack (they resume from its
    checkpoint together). Otherwise the first trial's pack group, in queue order: at most
    ``max_members``, and at most 1/``share`` of the group, so that with ``share`` workers on the
    queue one does not take all the work while the others idle.
    """
    if not waiting:
        return []
    resuming = [t for t in waiting if checkpoint(t)]
    if resuming:
        ckpt = checkpoint(resuming[0])
        return [t for t in resuming if checkpoint(t) == ckpt][:max_members]
    first = key(waiting[0])
    group = [t for t in waiting if key(t) == first]
    return group[: min(max_members, -(-len(group) // max(1, share)))]


def checkpoint_name(trial_ids: Iterable[str]) -> str:
    """The file a pack of these trials checkpoints to (the same members, the same name)."""
    return hashlib.sha1(",".join(sorted(trial_ids)).encode()).hexdigest()[:16] + ".safetensors"
