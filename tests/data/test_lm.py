"""The hf activation source: capture, stopping the forward, datasets, held-out rows, metrics."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from fixtures_lm import *  # noqa: F401,F403  (until tests/conftest.py imports it)

from saesweep.config.experiment import ConfigError, HFSource
from saesweep.data import corpus, hf, lm, lm_activations
from saesweep.metrics.downstream import downstream_metrics, spliced_metrics


def ref_rows(docs_ids: list[list[int]], ctx: int, bos: int | None) -> list[list[int]]:
    """Reference chunking, written plainly: BOS + next ctx-1 stream ids, no doubled BOS."""
    stream = [t for d in docs_ids for t in d]
    rows, i = [], 0
    body = ctx - 1 if bos is not None else ctx
    while True:
        if bos is not None:
            while i < len(stream) and stream[i] == bos:
                i += 1
        if len(stream) - i < body:
            return rows
        rows.append(([bos] if bos is not None else []) + stream[i : i + body])
        i += body


def src(model, dataset, **kw) -> HFSource:
    return HFSource(model=str(model), dataset=str(dataset), hook=kw.pop("hook", "blocks.1.hook_resid_pre"), **kw)


def doc_ids(tokenizer, docs):
    return [[tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]


@pytest.fixture(scope="module")
def tiny_model(tiny_lm):
    return lm.load_lm(src(tiny_lm, "x.jsonl"), "cpu")


# ----------------------------------------------------------------------------- capture
def test_capture_equals_full_forward_hidden_states(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states
        seen = []
        handle = model.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        model(input_ids=ids)
        handle.remove()
    n = lm.HookedLM(model, 0).n_layers
    for layer in range(n):  # hidden_states[L] is the input of block L
        torch.testing.assert_close(lm.HookedLM(model, layer).capture(ids), full[layer], rtol=0, atol=0)
    # layer n = the input of the final norm (hidden_states[-1] is after the norm)
    torch.testing.assert_close(lm.HookedLM(model, n).capture(ids), seen[0], rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_capture_stops_the_forward(tiny_model, layer):
    model, _ = tiny_model
    hooked = lm.HookedLM(model, layer)
    calls: dict[str, int] = {}

    def counter(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [b.register_forward_hook(counter(f"block{i}")) for i, b in enumerate(hooked.blocks)]
    handles += [model.model.norm.register_forward_hook(counter("norm")),
                model.lm_head.register_forward_hook(counter("lm_head"))]
    try:
        hooked.capture(torch.randint(3, 60, (2, 16)))
    finally:
        for h in handles:
            h.remove()
    assert calls == {f"block{i}": 1 for i in range(layer)}  # nothing at or after the hook point
    assert "lm_head" not in calls and "norm" not in calls


def test_other_architectures(tiny_other_lm, tiny_tokens_parquet, make_cfg):
    """GPT-Neo / GPT-2: blocks found generically, capture and splice as for Llama."""
    model, _ = lm.load_lm(src(tiny_other_lm, tiny_tokens_parquet), "cpu", tokenizer=False)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
    for layer in (0, 1):
        torch.testing.assert_close(lm.HookedLM(model, layer).capture(ids), full.hidden_states[layer], rtol=0, atol=0)
    out, _ = spliced_metrics(lm.HookedLM(model, 2), ids.numpy(), [lambda x: x.clone(), torch.zeros_like],
                                batch_rows=8)
    assert out[0]["kl"] == pytest.approx(0, abs=1e-6) and out[0]["ce_sae"] == out[0]["ce_clean"]
    assert out[1]["ce_sae"] == out[1]["ce_zero"]
    acts = lm_activations.open_hf(make_cfg(tiny_other_lm, tiny_tokens_parquet, hook="blocks.1.hook_resid_post"))
    assert acts.d_in == 32 and acts.eval_activations().shape == (300, 32)


# ----------------------------------------------------------------------------- datasets
def test_text_and_pretokenised_give_the_same_rows(tmp_path, tiny_lm, tiny_text_jsonl, tiny_tokens_parquet, tiny_docs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    expected = ref_rows(doc_ids(tok, tiny_docs), 16, tok.bos_token_id)
    for ds in (tiny_text_jsonl, tiny_tokens_parquet):
        source = src(tiny_lm, ds, context_length=16, eval_split=None)
        rows = corpus.token_rows(source, 40, 5, datasets_cache=tmp_path)
        train = np.stack(list(rows.train))
        assert train.shape == (40, 16) and (train[:, 0] == tok.bos_token_id).all()
        assert train.tolist() == expected[:40]


def test_activations_are_the_hooked_residual(
    tmp_path, tiny_lm, tiny_text_jsonl, tiny_tokens_parquet, tiny_model, make_cfg
):
    model, _ = tiny_model
    text = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl))
    toks = lm_activations.open_hf(make_cfg(tiny_lm, tiny_tokens_parquet))
    assert text.d_in == 32 and text.entry.train_tokens >= 2000
    # the same documents give the same training activations either way
    np.testing.assert_array_equal(text.entry.gather(np.arange(0, 2000)), toks.entry.gather(np.arange(0, 2000)))
    # and they are the residual entering block 1, BOS position left out
    source = text.source
    first = np.stack(list(itertools.islice(corpus.token_rows(source, 3, 1, datasets_cache=tmp_path).train, 3)))
    h = lm.HookedLM(model, 1).capture(torch.from_numpy(first))[:, 1:].reshape(-1, 32)
    np.testing.assert_allclose(text.entry.gather(np.arange(0, 45)), h.numpy(), rtol=1e-5, atol=1e-5)
    # held-out activations are those of the held-out rows
    ids = text.entry.heldout_token_ids(2)
    h = lm.HookedLM(model, 1).capture(torch.from_numpy(ids))[:, 1:].reshape(-1, 32)
    np.testing.assert_allclose(text.entry.heldout_activations(30), h.numpy(), rtol=1e-5, atol=1e-5)


def test_heldout_rows_from_the_end_are_disjoint_from_training(tmp_path, tiny_lm):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # document i is BOS followed by five copies of token 3 + i: every id names its document
    docs = [[1] + [3 + i] * 5 for i in range(60)]
    path = tmp_path / "marked.parquet"
    pq.write_table(pa.table({"input_ids": docs}), path)
    source = src(tiny_lm, path, context_length=8, eval_split="validation")
    rows = corpus.token_rows(source, 20, 10, datasets_cache=tmp_path)
    assert rows.heldout_from.startswith("the end")
    train = np.stack(list(rows.train))
    doc_of = lambda a: set(a[a != 1].tolist())  # noqa: E731
    train_docs, heldout_docs = doc_of(train), doc_of(rows.heldout)
    assert not train_docs & heldout_docs
    assert max(heldout_docs) == 3 + 59 and min(train_docs) == 3  # held-out from the end
    # asking for more training rows than the documents before the held-out ones hold fails
    with pytest.raises(ConfigError, match="training rows"):
        list(corpus.token_rows(source, 50, 10, datasets_cache=tmp_path).train)


@pytest.mark.parametrize("streaming", [False, True])
def test_eval_split_and_last_shard(tmp_path, tiny_lm, tiny_split_dir, tiny_sharded_dir, tiny_docs, streaming):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    source = src(tiny_lm, tiny_split_dir, context_length=16)
    rows = corpus.token_rows(source, 10, 5, streaming=streaming, datasets_cache=tmp_path)
    assert rows.heldout_from == "split 'validation'"
    assert rows.heldout.tolist() == ref_rows(doc_ids(tok, tiny_docs[500:]), 16, 1)[:5]
    assert np.stack(list(rows.train)).tolist() == ref_rows(doc_ids(tok, tiny_docs[:500]), 16, 1)[:10]

    source = src(tiny_lm, tiny_sharded_dir, context_length=16)
    rows = corpus.token_rows(source, 10, 5, streaming=streaming, datasets_cache=tmp_path)
    train = np.stack(list(rows.train)).tolist()
    assert train == ref_rows(doc_ids(tok, tiny_docs[:300]), 16, 1)[:10]
    if streaming:  # a streamed split without an eval split holds out its last data file
        assert rows.heldout_from.startswith("the last data file")
        assert rows.heldout.tolist() == ref_rows(doc_ids(tok, tiny_docs[300:]), 16, 1)[:5]
    else:
        assert rows.heldout_from.startswith("the end")
        assert not {tuple(r) for r in rows.heldout.tolist()} & {tuple(r) for r in train}


def test_save_to_disk_folder_and_no_bos(tmp_path, tiny_lm, tiny_docs):
    import datasets
    from transformers import AutoTokenizer

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"story": tiny_docs[:100]}),
        "validation": datasets.Dataset.from_dict({"story": tiny_docs[100:120]}),
    }).save_to_disk(tmp_path / "saved")
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    source = src(tiny_lm, tmp_path / "saved", context_length=12, text_column="story", prepend_bos=False)
    rows = corpus.token_rows(source, 8, 3, datasets_cache=tmp_path)
    assert rows.heldout.tolist() == ref_rows(doc_ids(tok, tiny_docs[100:120]), 12, None)[:3]
    assert np.stack(list(rows.train)).tolist() == ref_rows(doc_ids(tok, tiny_docs[:100]), 12, None)[:8]
    with pytest.raises(ConfigError, match="source.text_column"):
        corpus.token_rows(source.model_copy(update={"text_column": "nope"}), 8, 3, datasets_cache=tmp_path)
    with pytest.raises(ConfigError, match="source.split"):
        corpus.token_rows(source.model_copy(update={"split": "test"}), 8, 3, datasets_cache=tmp_path)


# ----------------------------------------------------------------------------- normalisation, metrics
def test_normalisation_and_mean(tiny_lm, tiny_text_jsonl, make_cfg):
    acts = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl))
    x = torch.from_numpy(acts.entry.gather(np.arange(0, acts.n_train))) * acts.scale
    assert x.pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-4)  # unit mean squared norm
    torch.testing.assert_close(acts.mean(), x.mean(0), rtol=1e-4, atol=1e-5)
    batch = next(acts.train_batches(64, seed=0))
    assert batch.shape == (64, 32) and batch.dtype == torch.float32
    ev = acts.eval_activations()
    assert ev.shape == (300, 32) and 0.5 < ev.pow(2).sum(-1).mean() < 2


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"])
def test_spliced_metrics_identity_and_zero(tiny_lm, tiny_text_jsonl, make_cfg, hook):
    acts = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, hook=hook))
    noisy = lambda x: x + 0.3 * torch.randn_like(x)  # noqa: E731
    ident, zero, noise = downstream_metrics(acts, [lambda x: x.clone(), torch.zeros_like, noisy])
    assert ident["ce_sae"] == ident["ce_clean"] and ident["kl"] == pytest.approx(0, abs=1e-6)
    assert ident["ce_loss_score"] == 1.0 and ident["kl_div_score"] == pytest.approx(1.0)
    # an SAE that outputs zeros leaves the BOS position as it was; the ablation zeroes it too
    # (SAELens's run_evals), so the two need not score the same
    assert zero["kl"] > 0 and all(math.isfinite(v) for v in zero.values())
    assert noise["kl"] > 0 and all(math.isfinite(v) for v in noise.values())
    assert set(ident) == {"ce_clean", "ce_sae", "ce_zero", "ce_loss_score", "kl", "kl_zero", "kl_div_score",
                          "ce_tokens"}
    assert ident["ce_clean"] == zero["ce_clean"] == noise["ce_clean"]
    # a second evaluation reuses the zero-ablated baseline and agrees
    again = downstream_metrics(acts, [lambda x: x.clone()])[0]
    assert again == ident


def test_bfloat16_lm(tiny_lm, tiny_text_jsonl, make_cfg):
    acts = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, lm_dtype="bfloat16"))
    assert next(acts.train_batches(32, seed=0)).dtype == torch.float32
    ident, zero = downstream_metrics(acts, [lambda x: x, torch.zeros_like])
    assert ident["ce_sae"] == ident["ce_clean"] and zero["kl"] > 0
    assert acts.entry.key != lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl)).entry.key


def test_reconstructor_sees_raw_activations(tiny_lm, tiny_text_jsonl, make_cfg):
    acts = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, eval={"ce_tokens": 14}))
    seen = []
    downstream_metrics(acts, [lambda x: seen.append(x.clone()) or x])
    # one row, every position through the reconstruction (the BOS one is put back after): the BOS
    # residual, then the 15 raw residuals of the first held-out row that the cache holds
    assert seen[0].shape == (16, 32)
    np.testing.assert_allclose(seen[0][1:].numpy(), acts.entry.heldout_activations(15), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- checks
def test_bad_hook_layer_and_missing_dataset(tiny_lm, tiny_text_jsonl, tmp_path):
    ok = src(tiny_lm, tiny_text_jsonl, hook="blocks.3.hook_resid_pre")
    hf.check_source(ok)  # 3 blocks: the input of the final norm is allowed
    hf.check_source(ok.model_copy(update={"hook": "blocks.2.hook_resid_post"}))
    for bad in ("blocks.4.hook_resid_pre", "blocks.3.hook_resid_post"):
        with pytest.raises(ConfigError, match=r"source\.hook.*0\.\.3") as e:
            hf.check_source(src(tiny_lm, tiny_text_jsonl, hook=bad))
        assert "\n" not in str(e.value)
    missing_ones = (tmp_path / "nope.jsonl", tmp_path / "no-folder", f"{tiny_text_jsonl},{tmp_path}/x.parquet")
    for missing in missing_ones:
        with pytest.raises(ConfigError, match="source.dataset"):
            hf.check_source(src(tiny_lm, missing))
    with pytest.raises(ConfigError, match="source.model"):
        hf.check_source(src(tmp_path / "no-model", tiny_text_jsonl))


def test_open_hf_checks_before_building(tiny_lm, tmp_path, make_cfg):
    cfg = make_cfg(tiny_lm, tmp_path / "absent.jsonl", hook="blocks.9.hook_resid_pre")
    with pytest.raises(ConfigError, match="source.hook"):
        lm_activations.open_hf(cfg)
    assert not (tmp_path / "cache" / "activations").exists()  # nothing written


# ----------------------------------------------------------------------------- real model
def test_stories260k_end_to_end(stories260k, make_cfg):
    model, data = stories260k
    cfg = make_cfg(model, data, context_length=64, hook="blocks.2.hook_resid_pre", eval_split="validation",
                   lm_batch_size=32, train={"tokens": 4096}, eval={"tokens": 1024, "ce_tokens": 2048})
    acts = lm_activations.open_hf(cfg)
    assert acts.d_in == 64 and acts.describe()["heldout_from"] == "split 'validation'"
    clean, zero = downstream_metrics(acts, [lambda x: x, torch.zeros_like])
    assert all(math.isfinite(v) for v in {**clean, **zero}.values())
    assert clean["ce_clean"] < clean["ce_zero"] and clean["ce_clean"] < 3.0
    assert clean["ce_loss_score"] == 1.0 and zero["ce_loss_score"] < 0.5  # (zeros after an intact BOS)
    manifest = json.loads((acts.entry.path / "manifest.json").read_text())
    assert manifest["source"]["hook"] == "blocks.2.hook_resid_pre"
