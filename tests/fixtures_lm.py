"""Fixtures for language-model sources: a tiny Llama and corpora built locally, offline.

Everything is generated in a session temp folder, so no test touches the network:

* ``tiny_lm``: a 3-block Llama (d_model 32) with a word-level tokenizer, saved with
  ``save_pretrained`` (random weights with a large init, so its predictions are not flat);
* ``tiny_other_lm``: tiny random GPT-Neo and GPT-2 folders (parametrised; no tokenizer);
* ``tiny_docs``: the generated documents (short "stories" over a small vocabulary);
* ``tiny_text_jsonl``: those documents as a jsonl file of ``{"text": ...}`` rows;
* ``tiny_tokens_parquet``: the same documents tokenised, each preceded by BOS, packed into
  rows of 32 ids in an ``input_ids`` column (the layout of the stories260K data);
* ``tiny_split_dir``: a folder with ``train.jsonl`` and ``validation.jsonl`` (split inference);
* ``tiny_sharded_dir``: a folder whose train split is two jsonl files and has no validation;
* ``stories260k``: the real model and data in ``<repo>/../shared`` (skipped when absent);
* ``make_cfg``: an :class:`ExperimentConfig` for an hf source with small token counts.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

_WORDS = (
    "the a little big red blue cat dog girl boy tree ball park sun moon bird fish house "
    "ran saw liked found played jumped ate had was is happy sad very and then but so with "
    "to in on under over one day they she he it"
).split()
_PUNCT = [".", ",", "!", "?"]


def _make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 4)):
            words += rng.choices(_WORDS, k=rng.randint(3, 9)) + [rng.choice(_PUNCT)]
        docs.append(" ".join(words))
    return docs


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    return _make_docs(600)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tiny_docs) -> Path:
    """Folder with a tiny random Llama, its config and a word-level fast tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(tiny_docs, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert fast.bos_token_id == 1 and fast.eos_token_id == 2
    fast.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    assert tok.get_vocab_size() <= config.vocab_size
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["gpt_neo", "gpt2"])
def tiny_other_lm(request, tmp_path_factory) -> Path:
    """A tiny random GPT-Neo (TinyStories-1M's architecture) or GPT-2 folder, vocabulary 64."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoConfig,
        GPTNeoForCausalLM,
    )

    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    common = dict(vocab_size=64, bos_token_id=1, eos_token_id=2)
    if request.param == "gpt_neo":
        config = GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                              attention_types=[[["global", "local"], 1]], window_size=8, **common)
        cls = GPTNeoForCausalLM
    else:
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        cls = GPT2LMHeadModel
    torch.manual_seed(0)
    cls(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_jsonl(tmp_path_factory, tiny_docs) -> Path:
    path = tmp_path_factory.mktemp("tiny-text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    return path


@pytest.fixture(scope="session")
def tiny_tokens_parquet(tmp_path_factory, tiny_lm, tiny_docs) -> Path:
    """The documents as BOS-prefixed ids packed into rows of 32 (like stories260K)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    stream: list[int] = []
    for d in tiny_docs:
        stream += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"]
    rows = [stream[i : i + 32] for i in range(0, len(stream) - 31, 32)]
    path = tmp_path_factory.mktemp("tiny-tokens") / "tokens.parquet"
    pq.write_table(pa.table({"input_ids": rows}), path, row_group_size=64)
    return path


@pytest.fixture(scope="session")
def tiny_split_dir(tmp_path_factory, tiny_docs) -> Path:
    path = tmp_path_factory.mktemp("tiny-splits")
    for name, docs in (("train", tiny_docs[:500]), ("validation", tiny_docs[500:])):
        (path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory, tiny_docs) -> Path:
    path = tmp_path_factory.mktemp("tiny-shards")
    for i, docs in enumerate((tiny_docs[:300], tiny_docs[300:])):
        (path / f"train-0000{i}-of-00002.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def stories260k() -> tuple[Path, Path]:
    """(model folder, data folder) of the real stories260K model; skipped when absent."""
    model, data = SHARED / "models" / "stories260K", SHARED / "data" / "stories260K-sampled"
    if not (model / "config.json").exists() or not (data / "train.parquet").exists():
        pytest.skip(f"stories260K model or data not found under {SHARED}")
    return model, data


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(model, dataset, train={...}, eval={...}, **source_fields)``: an hf ExperimentConfig.

    Small defaults (context 16, 2000 training tokens, 300 held-out activations, 200 CE
    tokens, no eval split); the cache goes to a per-test folder unless ``cache_dir`` is given.
    """
    from saesweep.config.experiment import parse_config

    def make(model, dataset, *, cache_dir=None, train=None, eval=None, **source_fields):
        source = {"kind": "hf", "model": str(model), "dataset": str(dataset), "context_length": 16,
                  "hook": "blocks.1.hook_resid_pre", "eval_split": None, "lm_batch_size": 8, **source_fields}
        return parse_config({
            "source": source,
            "train": {"tokens": 2000, "batch_size": 64, **(train or {})},
            "eval": {"tokens": 300, "ce_tokens": 200, **(eval or {})},
            "cache_dir": str(cache_dir or tmp_path / "cache"),
        })

    return make
