"""What an ``hf`` source names, read before any work: the model's config and tokenizer (not its
weights), the dataset's files, and the checks that fail fast (:func:`check_source`)."""


from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union


from saesweep.errors import ConfigError
from saesweep.config.experiment import HFSource


DATA_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


def dataset_files(spec: str) -> Optional[list[Path]]:
    """The files of a comma-separated data-file list, or None when ``spec`` is not one."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if parts and all(Path(p).suffix.lower() in DATA_BUILDERS for p in parts):
        return [Path(p).expanduser() for p in parts]
    return None


def looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def is_local_dataset(spec: str) -> bool:
    return dataset_files(spec) is not None or looks_local(spec)


def is_local_model(name: str) -> bool:
    return looks_local(name)


def d_model(config: Any) -> int:
    """The residual-stream width of a model config (``hidden_size``, or GPT-2's ``n_embd``)."""
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise ConfigError(f"source.model: cannot tell the residual width of {type(config).__name__}")


def hook_width(source: HFSource, config: Any) -> int:
    """The width of the activations ``source.hook`` reads (the residual width for residual hooks;
    otherwise from the model's structure, :func:`site_width`); a ConfigError when the model has
    no such hook."""
    if isinstance(source.site, int):
        from saesweep.data.hooks import num_layers

        n = num_layers(config)
        if not 0 <= source.site <= n:
            raise ConfigError(
                f"source.hook: {source.hook!r} is out of range for {source.model} ({n} blocks); use "
                f"blocks.L.hook_resid_pre with L in 0..{n} or blocks.L.hook_resid_post with L in 0..{n - 1}"
            )
        return d_model(config)
    try:
        return site_width(config, source.site)
    except ConfigError as e:
        raise ConfigError(f"{e} ({source.model})") from None


def lm_config(source: HFSource) -> Any:
    """The model's ``AutoConfig`` (reads config.json only)."""
    from transformers import AutoConfig

    if is_local_model(source.model) and not Path(source.model).expanduser().is_dir():
        raise ConfigError(f"source.model: no such model folder: {source.model}")
    try:
        kw = {"revision": source.revision} if source.revision else {}
        return AutoConfig.from_pretrained(model_path(source), **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"source.model: cannot load the config of {source.model!r} ({first})") from None


def check_source(source: HFSource) -> Any:
    """Cheap checks before any work; returns the model config. Raises :class:`ConfigError`."""
    config = lm_config(source)
    hook_width(source, config)  # a hook the model does not have is refused with the ones it has
    longest = max_positions(config)
    if longest is not None and source.context_length > longest:
        raise ConfigError(f"source.context_length: {source.context_length} is above {source.model}'s maximum of "
                          f"{longest} positions; use at most {longest}")
    files = dataset_files(source.dataset)
    if files is not None:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"source.dataset: no such file: {', '.join(missing)}")
        kinds = {DATA_BUILDERS[f.suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise ConfigError("source.dataset: the files mix formats; list .parquet or .jsonl/.json or .txt files")
        if "text_column" in source.model_fields_set and "input_ids" in peek_columns(files[0]):
            raise ConfigError(f"source.text_column: {files[0]} is pre-tokenised (its input_ids column is used as it "
                              "is), so text_column does not apply; remove it")
    elif looks_local(source.dataset) and not Path(source.dataset).expanduser().is_dir():
        raise ConfigError(f"source.dataset: no such file or folder: {source.dataset}")
    if source.prepend_bos and bos_id(config, None) is None:
        raise ConfigError(f"source.prepend_bos: {source.model} defines no BOS token; set prepend_bos: false")
    return config


def peek_columns(path: Path) -> list[str]:
    """The columns of a local .parquet or .jsonl file, read from its schema or first row ([] when
    that cannot be told cheaply)."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if path.suffix.lower() in (".jsonl", ".json"):
            import json

            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline() or "{}")
            return list(first) if isinstance(first, dict) else []
    except (OSError, ValueError, UnicodeDecodeError, ImportError):
        return []
    except Exception:  # pyarrow's own errors on a damaged file: the reader reports it later
        return []
    return []


def max_positions(config: Any) -> Optional[int]:
    """The longest sequence the model takes (its position table), when its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _first_id(value: Any) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def bos_id(config: Any, tokenizer: Any) -> Optional[int]:
    """The model config's ``bos_token_id``, else the tokenizer's."""
    bos = _first_id(getattr(config, "bos_token_id", None))
    if bos is None and tokenizer is not None:
        bos = _first_id(tokenizer.bos_token_id)
    return bos


def separator_id(config: Any, tokenizer: Any) -> Optional[int]:
    sep = bos_id(config, tokenizer)
    if sep is None:
        sep = _first_id(getattr(config, "eos_token_id", None))
    if sep is None and tokenizer is not None:
        sep = _first_id(tokenizer.eos_token_id)
    return sep


def model_path(source: HFSource) -> str:
    return str(Path(source.model).expanduser()) if is_local_model(source.model) else source.model


def load_tokenizer(source: HFSource) -> Any:
    from transformers import AutoTokenizer

    kw = {"revision": source.revision} if source.revision else {}
    try:
        return AutoTokenizer.from_pretrained(model_path(source), **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"source.model: no usable tokenizer for {source.model!r}, needed for a text dataset ({e})"
        ) from None


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Hide the datasets/transformers progress bars (split generation, weight loading) while
    loading: saesweep shows its own bar for the work that takes time, the activation build."""
    import datasets
    from transformers.utils import logging as tf_logging

    ds_on, tf_on = datasets.utils.logging.is_progress_bar_enabled(), tf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if ds_on:
            datasets.enable_progress_bars()
        if tf_on:
            tf_logging.enable_progress_bar()


_META: dict[str, Any] = {}


def meta_model(config: Any) -> Any:
    """The model of ``config`` with no weights (on the meta device): its modules and the shapes
    of its forward pass, at no cost in memory or time (the last few are kept)."""
    import torch
    from transformers import AutoModelForCausalLM

    key = config.to_json_string(use_diff=False)
    if key not in _META:
        with quiet_hf(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config).eval()
        while len(_META) >= 4:
            _META.pop(next(iter(_META)))
        _META[key] = model
    return _META[key]


def site_width(config: Any, hook: Union[int, str]) -> int:
    """The width of the tensor at ``hook`` (a ConfigError naming what the model has when it has
    no such hook), from a forward pass of two tokens on the meta device."""
    import torch

    from saesweep.data.hooks import capture_sites, resolve

    model = meta_model(config)
    site = resolve(model, hook)
    ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
    with torch.inference_mode():  # with a cache, no mask inference that reads values
        return int(capture_sites(model, ids, [site], use_cache=True)[site.hook].shape[-1])
