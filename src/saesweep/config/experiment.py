"""Experiment configuration: frozen pydantic models that reject unknown keys; YAML in and out.

One :class:`ExperimentConfig` describes one trial: which SAE and its hyperparameters (flat,
with the names of the classic sweep scripts: ``sae_type``, ``lr``, ``dict_size_ratio``, ``sparsity_coeff`` and the
architecture-specific ``initial_beta``, ``final_beta``, ``input_dependent_gates``,
``aux_coeff``), where the activations come from (``source``), how to train (``train``) and
evaluate (``eval``). Architecture-specific fields are declared by the architectures in
:mod:`saesweep.saes` (looked up in its registry when a config is validated, so importing this
module loads no torch); setting one that the chosen ``sae_type`` does not take is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from saesweep import saes
from saesweep.errors import ConfigError  # noqa: F401  (re-exported: saesweep.ConfigError, plugins)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


PosInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

#: hf source fields that say how activations reach the trainer, not which they are (left out of
#: trial ids; a pack shares them)
DELIVERY_FIELDS = ("cache_dtype", "streaming", "cache_max_gb", "stream_buffer_tokens")

#: TransformerLens-style hook names of a block (see :mod:`saesweep.data.hooks` for where each
#: sits in an HF model) and module paths with the side read (``model.layers.6.mlp:out``)
BLOCK_HOOKS = ("resid_pre", "resid_mid", "resid_post", "mlp_in", "mlp_out", "attn_out", "z")
BLOCK_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(" + "|".join(BLOCK_HOOKS) + r")$")
MODULE_HOOK_RE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*:(in|out)$")
HOOK_HELP = ("blocks.L.hook_<name> with <name> one of " + ", ".join(BLOCK_HOOKS)
             + ", or a module path of the model with the side read, e.g. model.layers.6.mlp:out or :in")


class SyntheticSource(Strict):
    """Activations made of sparse combinations of known ground-truth directions: a world where
    an SAE can be scored against the truth (:mod:`saesweep.data.synthetic`). Nothing is
    downloaded or stored; the world is fixed by ``seed`` and its sizes.

    ``world: realistic`` (the default) has the structure of real activations, after
    SynthSAEBench's design: heavy-tailed (Zipf) feature frequencies, a low-rank correlation
    between features, hierarchies (a child fires only with its parent, siblings exclude each
    other), per-feature magnitudes that vary per token, and superposition set by
    ``n_features / d_in``. Its mean L0 is ``n_features * sparsity``.

    ``world: toy`` is the easy world: every feature independent, active with probability
    ``sparsity``, magnitude uniform in [``min_magnitude``, ``max_magnitude``]; the fields of the
    realistic world do not apply to it.
    """

    kind: Literal["synthetic"] = "synthetic"
    world: Literal["realistic", "toy"] = Field(
        "realistic", description="realistic: Zipf frequencies, correlations, hierarchies; toy: independent features")
    d_in: Annotated[int, Field(ge=2, description="activation dimension d")] = 64
    n_features: Annotated[int, Field(ge=1, description="number of ground-truth features")] = 256
    sparsity: Annotated[
        float, Field(gt=0.0, le=1.0, description="mean probability that a feature is active on a token "
                     "(true mean L0 = n_features * sparsity)")
    ] = 0.016
    min_magnitude: Annotated[float, Field(gt=0.0, description="smallest (mean) magnitude of an active feature")] = 1.0
    max_magnitude: Annotated[float, Field(gt=0.0, description="largest (mean) magnitude of an active feature")] = 2.0
    noise_std: Annotated[float, Field(ge=0.0)] = 0.0
    seed: Annotated[int, Field(ge=0, description="seed of the ground-truth dictionary")] = 0
    zipf_exponent: Annotated[float, Field(ge=0.0, description="realistic: feature frequency ~ (rank + 10)^-exponent")] = 1.0
    max_frequency: Annotated[float, Field(gt=0.0, le=1.0, description="realistic: no feature fires more often")] = 0.25
    correlation_rank: Annotated[int, Field(ge=0, description="realistic: rank of the feature correlation (0: none)")] = 8
    correlation_scale: Annotated[
        float, Field(ge=0.0, lt=1.0, description="realistic: share of a feature's firing drive that is shared")] = 0.3
    hierarchy_parents: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description="realistic: parent features (the most frequent ones); default n_features // 16")
    children_per_parent: Annotated[int, Field(ge=1, description="realistic: mutually exclusive children each")] = 4
    child_probability: Annotated[
        float, Field(gt=0.0, le=1.0, description="realistic: chance that one child fires with an active parent")] = 0.5
    magnitude_std: Annotated[float, Field(ge=0.0, description="realistic: per-token log-normal spread of magnitudes")] = 0.3

    @model_validator(mode="after")
    def _magnitudes(self) -> "SyntheticSource":
        if self.max_magnitude < self.min_magnitude:
            raise ValueError(f"source.max_magnitude ({self.max_magnitude}) is below source.min_magnitude ({self.min_magnitude})")
        if self.world == "toy":
            own = [k for k in REALISTIC_FIELDS if getattr(self, k) != type(self).model_fields[k].default]
            if own:
                raise ValueError(f"source.{own[0]}: applies to world: realistic only (this source is world: toy)")
        elif self.parents * (1 + self.children_per_parent) > self.n_features:
            raise ValueError(f"source.hierarchy_parents: {self.parents} parents with "
                             f"{self.children_per_parent} children each need more than n_features = {self.n_features}")
        return self

    @property
    def parents(self) -> int:
        """The realistic world's number of parent features."""
        return self.n_features // 16 if self.hierarchy_parents is None else self.hierarchy_parents

    @property
    def true_l0(self) -> float:
        """The expected number of active true features per token."""
        return self.n_features * self.sparsity


#: synthetic source fields of the realistic world only (a toy world's trial ids leave them out)
REALISTIC_FIELDS = ("zipf_exponent", "max_frequency", "correlation_rank", "correlation_scale", "hierarchy_parents",
                    "children_per_parent", "child_probability", "magnitude_std")


class HFSource(Strict):
    """Residual-stream activations of a Hugging Face causal LM on a text or token dataset."""

    kind: Literal["hf"] = "hf"
    model: str = Field("roneneldan/TinyStories-1M", description="hub name or local folder")
    revision: Optional[str] = None
    dataset: str = Field(
        "roneneldan/TinyStories",
        description="hub name, local folder, or .parquet/.jsonl/.json/.txt file(s) (comma-separated)",
    )
    split: str = "train"
    eval_split: Optional[str] = Field(
        "validation",
        description="held-out split for evaluation; if absent, held-out rows come from the end of `split`",
    )
    text_column: str = "text"
    context_length: Annotated[int, Field(ge=2)] = 128
    hook: str = Field(
        "blocks.4.hook_resid_pre",
        description="where activations are read: blocks.L.hook_resid_pre (the residual stream entering "
        "block L), hook_resid_mid (after its attention), hook_resid_post, hook_mlp_in (the MLP's input, "
        "after its norm), hook_mlp_out, hook_attn_out, hook_z (the heads' outputs before the output "
        "projection, concatenated); or any module by its path, input or output: model.layers.6.mlp:out",
    )
    prepend_bos: bool = True
    lm_batch_size: PosInt = 32
    lm_dtype: Literal["float32", "bfloat16"] = "float32"
    cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="how cached activations are stored: auto = float32 for a cache entry up to "
        "1 GiB in float32, else bfloat16 (half the bytes per token); held-out activations and training "
        "batches are float32 either way"
    )
    streaming: Union[bool, Literal["auto"]] = Field(
        "auto", description="true: the LM runs alongside training and its activations pass through a "
        "shuffling buffer, never all stored (only the held-out rows and the normalisation prefix are "
        "cached); auto: stream when the training cache would exceed cache_max_gb or the free disk"
    )
    cache_max_gb: Optional[Annotated[float, Field(gt=0.0)]] = Field(
        None, description="disk budget of one training cache entry in GB (10^9 bytes); larger jobs "
        "stream (streaming: auto) or are refused (streaming: false). Default: the free disk space"
    )
    stream_buffer_tokens: Annotated[int, Field(ge=1024)] = Field(
        262_144, description="streaming: activations shuffled together (a window of this many tokens, "
        "shuffled, then served in batches)"
    )

    @field_validator("hook")
    @classmethod
    def _check_hook(cls, hook: str) -> str:
        if not (BLOCK_HOOK_RE.match(hook) or MODULE_HOOK_RE.match(hook)):
            raise ValueError(f"{hook!r} is not a hook point; use {HOOK_HELP}")
        return hook

    @property
    def site(self) -> Union[int, str]:
        """Where the hook reads: for the residual stream between blocks, the index of the block
        whose *input* it is (resid_post of L = resid_pre of L+1, n_layers = the last block's
        output); any other hook is its own name."""
        m = BLOCK_HOOK_RE.match(self.hook)
        if m and m.group(2) in ("resid_pre", "resid_post"):
            return int(m.group(1)) + (1 if m.group(2) == "resid_post" else 0)
        return self.hook

    @property
    def layer(self) -> Optional[int]:
        """The block a ``blocks.L.*`` hook belongs to (the one whose input a residual hook is), or
        None for a module path."""
        m = BLOCK_HOOK_RE.match(self.hook)
        if m is None:
            return None
        return int(m.group(1)) + (1 if m.group(2) == "resid_post" else 0)


def _source_kind(v: Any) -> str:
    """``kind`` selects the source; it may be left out for the synthetic default."""
    return v.get("kind", "synthetic") if isinstance(v, dict) else getattr(v, "kind", "synthetic")


Source = Annotated[
    Union[Annotated[SyntheticSource, Tag("synthetic")], Annotated[HFSource, Tag("hf")]],
    Discriminator(_source_kind, custom_error_type="source_kind", custom_error_message="source.kind must be 'synthetic' or 'hf'"),
]


class TrainConfig(Strict):
    """Optimisation: Adam with linear lr warm-up then cosine/linear decay to min_lr_factor."""

    seed: Annotated[int, Field(ge=0)] = 0
    tokens: Annotated[int, Field(ge=1, le=10**13, description="training tokens (at most 10^13)")] = 2_000_000
    batch_size: PosInt = Field(512, description="tokens per optimiser step (2M tokens: about 3,900 steps)")
    lr_warmup_frac: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.01
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_factor: Fraction = 0.1
    grad_clip: Optional[Annotated[float, Field(gt=0.0)]] = 1.0
    sparsity_warmup_frac: Fraction = 0.05
    adam_beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    adam_beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    resample_every: Fraction = Field(
        0.1, description="fraction of the steps between dead-feature resampling checks (0: never resample)"
    )
    resample_until: Optional[Fraction] = Field(
        None, description="no resampling after this fraction of the steps (default: the architecture's, "
        "0.5; 0.8 for the hard-concrete types, whose resampled features keep dying after the last check)"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype of the SAE step: auto = bfloat16 where the device has native bf16 "
        "products (CUDA with bf16, CPUs with AMX or AVX512-BF16), else float32 (bfloat16: weights stay fp32)"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    log_every: PosInt = 50
    target_l0_hold_frac: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.2, description="with target_l0: the final fraction of training that runs with the sparsity coefficient "
        "held at the value the L0 controller reached (one stationary objective to finish on)"
    )

    @property
    def steps(self) -> int:
        return max(1, -(-self.tokens // self.batch_size))


class EvalConfig(Strict):
    """Held-out evaluation."""

    tokens: Annotated[int, Field(ge=1, description="held-out activations for reconstruction metrics")] = 65_536
    ce_tokens: Annotated[
        int, Field(ge=0, description="held-out LM tokens for the spliced CE/KL metrics (hf sources)")
    ] = 16_384
    batch_size: PosInt = 4096
    ce_time_frac: Optional[Annotated[float, Field(gt=0.0)]] = Field(
        0.1, description="evaluation starts no spliced CE/KL batch that would end past this fraction of the "
        "pack's training time (the first batch always runs; metrics.json's ce_tokens says how many predictions "
        "were scored); null: always every ce_tokens"
    )


class ExperimentConfig(Strict):
    """One experiment (trial): SAE, hyperparameters, activation source, training, evaluation.

    The architecture's own hyperparameters (``aux_coeff``, ``initial_beta``...) are the extra
    fields, validated against its declaration; read them as attributes or :attr:`sae_hparams`.
    """

    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True, allow_inf_nan=False)

    name: Optional[str] = None
    sae_type: str = "relu"
    lr: Annotated[float, Field(gt=0.0, description="Adam learning rate")] = 3e-4
    dict_size_ratio: Annotated[float, Field(gt=0.0, description="dictionary size / d_in")] = 16.0
    sparsity_coeff: Optional[Annotated[float, Field(ge=0.0, description="weight of the sparsity penalty")]] = 0.03
    target_l0: Optional[Annotated[float, Field(gt=0.0)]] = Field(
        None, description="the L0 to reach, instead of sparsity_coeff (or k): TopK types take k = target_l0; the "
        "others steer their sparsity coefficient during training until the L0 of the training batches is on target"
    )
    initial_coeff: Optional[Annotated[float, Field(gt=0.0)]] = Field(
        None, description="with target_l0: the sparsity coefficient the controller starts from; for the "
        "architectures steered by the quadratic rule (JumpReLU, gated hard concrete), the penalty's stiffness "
        "(default: the architecture's)"
    )
    source: Source = Field(default_factory=SyntheticSource)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field("runs", description="folder that receives the run folder <output_dir>/<trial_id>")
    cache_dir: Optional[str] = Field(None, description="activation cache folder (default: $SAESWEEP_CACHE or ~/.cache/saesweep)")
    cache_mode: Literal["build", "wait"] = Field(
        "build", description="when the activations are not cached: build them here, or wait for another host to"
    )

    @model_validator(mode="before")
    @classmethod
    def _architecture_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sae_type = data.get("sae_type", "relu")
        if sae_type not in saes.names():
            raise ValueError(f"sae_type {sae_type!r} is not one of: {', '.join(saes.names())}")
        cls_ = saes.declaration(sae_type)
        own = cls_.hyperparams
        every = saes.all_hyperparams()
        data = dict(data)
        train = data.get("train")
        if train is None or isinstance(train, dict):  # resample_until: the architecture's default
            if (train or {}).get("resample_until") is None:
                data["train"] = {**(train or {}), "resample_until": cls_.resample_until}
        elif getattr(train, "resample_until", 0) is None:
            data["train"] = train.model_copy(update={"resample_until": cls_.resample_until})
        if not cls_.uses_sparsity_coeff:
            if data.get("sparsity_coeff") is not None:
                raise ValueError(
                    f"field 'sparsity_coeff' does not apply to sae_type {sae_type!r}: its sparsity is set by k")
            data.pop("sparsity_coeff", None)
        data = _resolve_target_l0(data, sae_type, cls_.uses_sparsity_coeff)
        for key in list(data):
            if key in cls.model_fields or key in own:
                continue
            if key in every:
                if data[key] is None:
                    del data[key]
                    continue
                allowed = ", ".join(own) or "none"
                raise ValueError(f"field {key!r} does not apply to sae_type {sae_type!r} (its own fields: {allowed})")
            known = sorted({*cls.model_fields, *own} - {"sae_type"}) + ["sae_type"]
            raise ValueError(f"{key}: unknown field (the fields of sae_type {sae_type!r}: {', '.join(known)})")
        for key, hp in own.items():
            value = data.get(key)
            if value is None:
                data[key] = None if hp.optional else hp.default
            else:
                try:
                    data[key] = TypeAdapter(hp.type).validate_python(value)
                except ValidationError as e:
                    raise ValueError(f"{key}: {e.errors()[0]['msg']}") from None
        return data

    # ------------------------------------------------------------------ helpers
    @property
    def steers_coeff(self) -> bool:
        """Whether training steers the sparsity coefficient towards ``target_l0``."""
        return self.target_l0 is not None and saes.declaration(self.sae_type).uses_sparsity_coeff

    @property
    def sae_hparams(self) -> dict[str, Any]:
        """The hyperparameters the SAE module takes, with the trainer's ones. With
        ``target_l0``, ``sparsity_coeff`` is the controller's start (None: the architecture's)."""
        own = saes.declaration(self.sae_type).hyperparams
        common = {}
        if saes.declaration(self.sae_type).uses_sparsity_coeff:
            common["sparsity_coeff"] = self.initial_coeff if self.steers_coeff else self.sparsity_coeff
        return {**common, **{k: getattr(self, k) for k in own}}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict without the fields that do not apply to this sae_type (nor the target-L0
        fields when no target is set)."""
        d = self.model_dump(mode="json")
        if not saes.declaration(self.sae_type).uses_sparsity_coeff or d.get("sparsity_coeff") is None:
            d.pop("sparsity_coeff")
        if self.target_l0 is None:
            d.pop("target_l0")
            d.pop("initial_coeff")
            d["train"].pop("target_l0_hold_frac")
        elif not self.steers_coeff:
            d.pop("initial_coeff")
            d["train"].pop("target_l0_hold_frac")
            d.pop("k", None)  # the target sets k: the dict parses back to the same config
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def identity(self) -> dict[str, Any]:
        """What defines the experiment's result: everything but names, paths, device, logging."""
        d = self.to_dict()
        for key in ("name", "output_dir", "cache_dir", "cache_mode"):
            d.pop(key, None)
        for key in ("device", "log_every"):
            d["train"].pop(key, None)
        if d["train"].get("dtype") == "auto":
            # auto picks the precision for the machine, as device picks the device: the same
            # experiment as the former default float32 (bf16 metrics agree within 0.5 %; the dtype
            # used is in metrics.json), so sweeps started before auto keep their trial ids
            d["train"]["dtype"] = "float32"
        d["eval"].pop("batch_size", None)
        d["eval"].pop("ce_time_frac", None)  # a cap on time, not another experiment
        if d["source"].get("kind") == "synthetic" and d["source"].get("world") == "toy":
            for key in ("world", *REALISTIC_FIELDS):  # the toy world's trials keep their ids
                d["source"].pop(key, None)
        if d["source"].get("kind") == "hf":
            # how the activations are delivered (batch of the LM, storage dtype, cache or stream)
            # changes where they live, not which they are: the same experiment, the same trial id
            for key in ("lm_batch_size", *DELIVERY_FIELDS):
                d["source"].pop(key, None)
        d["loss_convention"] = saes.LOSS_CONVENTION  # runs under another convention get other ids
        revision = saes.declaration(self.sae_type).revision
        if revision:
            d["sae_revision"] = revision
        return d

    @property
    def trial_id(self) -> str:
        """Stable id from the resolved config: ``<sae_type>-<10 hex digits>``."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return f"{self.sae_type}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.trial_id

    def d_sae(self, d_in: int) -> int:
        """Dictionary size for activations of dimension ``d_in``; a ConfigError unless
        ``dict_size_ratio * d_in`` is a whole number of features."""
        d_sae = round(d_in * self.dict_size_ratio)
        if d_sae < 1 or abs(d_sae - d_in * self.dict_size_ratio) > 1e-6:
            raise ConfigError(f"dict_size_ratio: {self.dict_size_ratio} times d_in {d_in} = "
                              f"{d_in * self.dict_size_ratio:g} is not a whole number of features")
        return d_sae

    def check_target(self, d_in: int) -> None:
        """A ConfigError unless ``target_l0`` (or ``k``) is reachable: at most the dictionary."""
        k = getattr(self, "k", None) if "k" in saes.declaration(self.sae_type).hyperparams else None
        if isinstance(k, (int, float)) and self.target_l0 is None and k > self.d_sae(d_in):
            raise ConfigError(f"k: {k:g} is above the dictionary size {self.d_sae(d_in)} "
                              f"(dict_size_ratio {self.dict_size_ratio:g} x d_in {d_in}); k is at most the dictionary size")
        if self.target_l0 is None:
            return
        d_sae = self.d_sae(d_in)
        if self.target_l0 > d_sae:
            raise ConfigError(f"target_l0: {self.target_l0:g} is above the dictionary size {d_sae} "
                              f"(dict_size_ratio {self.dict_size_ratio:g} x d_in {d_in}); no SAE of this size reaches it")

    @model_validator(mode="after")
    def _whole_dictionary(self) -> "ExperimentConfig":
        if self.source.kind == "synthetic":  # d_in is known here (an hf model's when it is read)
            try:
                self.d_sae(self.source.d_in)
                self.check_target(self.source.d_in)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    def with_updates(self, **updates: Any) -> "ExperimentConfig":
        """A validated copy with (dotted) fields replaced: ``with_updates(**{"train.tokens": 1000})``."""
        d = self.to_dict()
        for key, value in updates.items():
            set_dotted(d, key, value)
        return parse_config(d)


def _resolve_target_l0(data: dict[str, Any], sae_type: str, uses_coeff: bool) -> dict[str, Any]:
    """``target_l0`` is an alternative to ``sparsity_coeff`` (or ``k``): both given is an error
    naming them, a target below 1 is refused, and the TopK types take ``k = round(target_l0)``."""
    target = data.get("target_l0")
    if target is None:
        if data.get("initial_coeff") is not None:
            raise ValueError("field 'initial_coeff' is the L0 controller's start: it needs target_l0")
        if "sparsity_coeff" in data and data["sparsity_coeff"] is None:  # unset: the default
            data = {k: v for k, v in data.items() if k != "sparsity_coeff"}
        return data
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        return data  # the field's own validation names the problem
    if target < 1:
        raise ValueError(f"target_l0: {target:g} is below 1; an SAE's L0 is the number of active latents per token")
    knob = "sparsity_coeff" if uses_coeff else "k"
    if data.get(knob) is not None:
        raise ValueError(f"fields {knob!r} and 'target_l0' are alternatives: give one of them "
                         f"(target_l0 {'steers ' + knob if uses_coeff else 'sets k'})")
    data = dict(data)
    if uses_coeff:
        data["sparsity_coeff"] = None
    else:
        if data.get("initial_coeff") is not None:
            raise ValueError(f"field 'initial_coeff' does not apply to sae_type {sae_type!r}: target_l0 sets its k")
        data["k"] = max(1, int(round(target)))
    return data


# ------------------------------------------------------------------------ parsing
def get_dotted(obj: Any, key: str, default: Any = None) -> Any:
    """``obj.a.b`` for ``key`` "a.b" (a config's nested field), else ``default``."""
    for p in key.split("."):
        obj = getattr(obj, p, None)
        if obj is None:
            return default
    return obj


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field: ``train.lr: Input should be greater than 0``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("synthetic", "hf")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        field = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        if field and msg.startswith(field):  # the message already names the field
            field = ""
        lines.append(f"{field}: {msg}" if field else msg)
    return "; ".join(lines)


def parse_config(data: Any, *, where: str = "config") -> "ExperimentConfig":
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None


def stored_config(data: Any, *, where: str = "config") -> "ExperimentConfig":
    """A trial's resolved config as an earlier version stored it: a synthetic source stored
    before there were worlds was the toy world (today's default is the realistic one)."""
    if isinstance(data, dict) and isinstance(data.get("source"), dict):
        src = data["source"]
        if src.get("kind") == "synthetic" and "world" not in src and "min_magnitude" in src:
            data = {**data, "source": {**src, "world": "toy"}}
    return parse_config(data, where=where)


#: the largest spec or config file read (they are small YAML files)
MAX_YAML_BYTES = 2**20


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a ConfigError naming the file for anything that is not a small
    YAML text file (a folder, a device, binary data, more than :data:`MAX_YAML_BYTES`), and
    the line and column of a syntax error."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; give a YAML file")
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // 2**20} MiB; a spec or config is a small YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); a spec or config is YAML text") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes); a spec or config is YAML text")
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        raise ConfigError(f"{path}: malformed YAML{where}: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None


def load_config(path: str | Path) -> "ExperimentConfig":
    data = read_yaml(path)
    if data is None:
        raise ConfigError(f"{path}: empty; an experiment config needs at least sae_type (see examples/experiment.yaml)")
    return parse_config(data, where=str(path))
