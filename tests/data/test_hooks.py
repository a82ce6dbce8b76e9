"""Hook points beyond the residual stream: each TransformerLens name reads the tensor it names
(checked by the block's own arithmetic), a splice replaces exactly that tensor, module paths, and
hooks a model does not have are refused with the ones it has."""

from __future__ import annotations

import pytest
import torch
from fixtures_lm import *  # noqa: F401,F403
from pydantic import ValidationError

from saesweep.config.experiment import ConfigError, HFSource
from saesweep.data import hf, hooks, lm, lm_activations
from saesweep.metrics.downstream import downstream_metrics, spliced_metrics

HOOKS = ("resid_pre", "resid_mid", "resid_post", "mlp_in", "mlp_out", "attn_out", "z")


def _model(kind: str) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=64, bos_token_id=1, eos_token_id=2)
    if kind == "llama":  # head_dim 16 x 4 heads: hook_z is 64 wide in a 32-wide model
        c = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, initializer_range=0.3, **common)
    elif kind == "gpt2":
        c = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3, **common)
    elif kind == "gpt_neo":
        c = T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                           attention_types=[[["global", "local"], 1]], window_size=8, **common)
    elif kind == "neox":
        c = T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            use_parallel_residual=False, initializer_range=0.3, **common)
    elif kind == "neox_parallel":
        c = T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **common)
    else:
        c = T.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, initializer_range=0.3, **common)
    return T.AutoModelForCausalLM.from_config(c).eval().requires_grad_(False)


IDS = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))


def grab(model, names, layer=0):
    got = lm.HookedLM(model, 0).capture_layers(IDS, [f"blocks.{layer}.hook_{h}" for h in names])
    return {k.split(".hook_")[1]: v for k, v in got.items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neo", "neox", "gemma2"])
def test_each_hook_reads_the_tensor_it_names(kind):
    model = _model(kind)
    t = grab(model, HOOKS)
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states
    block = hooks.find_blocks(model)[0]
    torch.testing.assert_close(t["resid_pre"], hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(t["resid_post"], hidden[1], rtol=0, atol=0)
    # the block's arithmetic: mid = pre + attention, post = mid + MLP, the MLP reads norm(mid)
    attn = t["attn_out"] if kind != "gemma2" else block.post_attention_layernorm(t["attn_out"])
    torch.testing.assert_close(t["resid_mid"], t["resid_pre"] + attn, rtol=1e-5, atol=1e-5)
    mlp = t["mlp_out"] if kind != "gemma2" else block.post_feedforward_layernorm(t["mlp_out"])
    torch.testing.assert_close(t["resid_post"], t["resid_mid"] + mlp, rtol=1e-5, atol=1e-5)
    norm = dict(block.named_children())[next(n for n in hooks.MID_NORM if hasattr(block, n))]
    torch.testing.assert_close(t["mlp_in"], norm(t["resid_mid"]), rtol=1e-5, atol=1e-5)
    # z is what the output projection turns into the attention output
    proj = hooks.block_hooks(model, 0)["blocks.0.hook_z"].module
    torch.testing.assert_close(proj(t["z"]), t["attn_out"], rtol=1e-5, atol=1e-5)
    assert t["z"].shape[-1] == (64 if kind == "llama" else 32)
    # the width the planner uses, from a forward on the meta device, is the real one
    for h in HOOKS:
        assert hf.site_width(model.config, f"blocks.0.hook_{h}") == t[h].shape[-1]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "neox"])
@pytest.mark.parametrize("hook", ["resid_mid", "mlp_out", "attn_out", "z", "mlp_in"])
def test_a_splice_replaces_exactly_that_tensor(kind, hook):
    """Doubling the tensor at the hook (all positions but the first) changes what the block
    computes from it the way the block's arithmetic says, and nothing before it."""
    model = _model(kind)
    clean = grab(model, HOOKS)
    hooked = lm.HookedLM(model, f"blocks.0.hook_{hook}")

    def double(h):
        return torch.cat([h[:, :1], 2 * h[:, 1:]], 1)

    with hooked._hooked(double):
        edited = grab(model, HOOKS)
    block = hooks.find_blocks(model)[0]
    torch.testing.assert_close(edited["resid_pre"], clean["resid_pre"], rtol=0, atol=0)
    want = double(clean[hook])
    if hook in ("mlp_in", "mlp_out"):  # upstream of the edit unchanged (resid_mid shifts the attention output)
        torch.testing.assert_close(edited["attn_out"], clean["attn_out"], rtol=0, atol=0)
    if hook == "resid_mid":  # what the MLP reads and what the block returns follow the new residual
        norm = dict(block.named_children())[next(n for n in hooks.MID_NORM if hasattr(block, n))]
        torch.testing.assert_close(edited["mlp_in"], norm(want), rtol=1e-5, atol=1e-5)
    elif hook == "mlp_out":
        mlp = want if kind != "gemma2" else block.post_feedforward_layernorm(want)
        torch.testing.assert_close(edited["resid_post"], clean["resid_mid"] + mlp, rtol=1e-5, atol=1e-5)
    elif hook == "attn_out":
        attn = want if kind != "gemma2" else block.post_attention_layernorm(want)
        torch.testing.assert_close(edited["resid_mid"], clean["resid_pre"] + attn, rtol=1e-5, atol=1e-5)
    elif hook == "z":
        proj = hooks.block_hooks(model, 0)["blocks.0.hook_z"].module
        torch.testing.assert_close(edited["attn_out"], proj(want), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(edited["mlp_out"], dict(block.named_children())["mlp"](want), rtol=1e-5, atol=1e-5)
    # the identity splice leaves the logits as they were, the zero one changes them
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    torch.testing.assert_close(hooked.logits(IDS, lambda h: h), logits, rtol=0, atol=0)
    assert not torch.allclose(hooked.logits(IDS, torch.zeros_like), logits)


def test_spliced_metrics_at_a_hook_equal_a_replacement_by_hand():
    """CE with mlp_out replaced, from spliced_metrics, against a forward whose MLP output is
    replaced by a hand-written forward hook, and CE computed by hand."""
    model = _model("llama")
    f = lambda x: 0.5 * x  # noqa: E731  (a 'reconstruction')
    out, _ = spliced_metrics(lm.HookedLM(model, "blocks.1.hook_mlp_out"), IDS.numpy(), [f], batch_rows=8,
                             skip_first=True)
    mlp = model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda m, a, o: torch.cat([o[:, :1], 0.5 * o[:, 1:]], 1))
    try:
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
    finally:
        handle.remove()
    lp = logits.log_softmax(-1)[:, 1:-1]
    ce = -lp.gather(-1, IDS[:, 2:, None]).mean().item()
    assert out[0]["ce_sae"] == pytest.approx(ce, rel=1e-6)
    assert out[0]["ce_tokens"] == IDS[:, 2:].numel()


def test_module_paths_read_inputs_and_outputs():
    model = _model("llama")
    t = grab(model, ["mlp_in", "mlp_out"], layer=1)
    got = lm.HookedLM(model, 0).capture_layers(IDS, ["model.layers.1.mlp:in", "model.layers.1.mlp:out",
                                                     "model.layers.1.mlp.down_proj:in"])
    torch.testing.assert_close(got["model.layers.1.mlp:in"], t["mlp_in"], rtol=0, atol=0)
    torch.testing.assert_close(got["model.layers.1.mlp:out"], t["mlp_out"], rtol=0, atol=0)
    assert got["model.layers.1.mlp.down_proj:in"].shape[-1] == 64  # the MLP's hidden layer
    assert hf.site_width(model.config, "model.layers.1.mlp.down_proj:in") == 64


def test_capture_stops_after_the_last_hook():
    model = _model("llama")
    calls = []
    handles = [model.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append("mlp1")),
               model.model.norm.register_forward_hook(lambda *a: calls.append("norm"))]
    try:
        lm.HookedLM(model, 0).capture_layers(IDS, ["blocks.0.hook_mlp_out", "blocks.1.hook_attn_out"])
    finally:
        for h in handles:
            h.remove()
    assert calls == []  # block 1's MLP and everything after it never ran


def test_hooks_a_model_lacks_are_refused_with_the_ones_it_has():
    with pytest.raises(ConfigError, match=r"parallel.*blocks\.L\.\{hook_resid_pre.*hook_mlp_out") as e:
        hooks.resolve(_model("neox_parallel"), "blocks.0.hook_resid_mid")
    assert "\n" not in str(e.value)
    model = _model("llama")
    with pytest.raises(ConfigError, match=r"blocks 0\.\.1.*hook_resid_mid"):
        hooks.resolve(model, "blocks.5.hook_mlp_out")
    with pytest.raises(ConfigError, match=r"no module 'model\.layers\.0\.mlpp'.*model\.layers\.0\.mlp:out"):
        hooks.resolve(model, "model.layers.0.mlpp:out")
    for bad in ("blocks.0.hook_mlp", "model.layers.0.mlp", "model.layers.0.mlp:both", "blocks.x.hook_z"):
        with pytest.raises(ValidationError, match="source.hook|hook point"):
            HFSource(hook=bad)


def test_hf_source_at_a_hook_end_to_end(tiny_lm, tiny_text_jsonl, make_cfg, tmp_path):
    """check_source refuses a hook before any work; a cache entry per hook from one LM pass, its
    activations the captured tensor, its width the hook's, and spliced metrics at the hook."""
    with pytest.raises(ConfigError, match="source.hook.*no module"):
        hf.check_source(HFSource(model=str(tiny_lm), dataset=str(tiny_text_jsonl), hook="model.nothing:out"))
    cfg = make_cfg(tiny_lm, tiny_text_jsonl, hook="blocks.1.hook_z")
    acts = lm_activations.open_hf(cfg, hooks=["blocks.1.hook_z", "blocks.1.hook_mlp_out"])
    assert acts.d_in == 32
    mlp = lm_activations.open_hf(cfg.with_updates(**{"source.hook": "blocks.1.hook_mlp_out"}))
    assert mlp.entry.manifest["built_with"] == acts.entry.manifest["built_with"]  # one LM pass
    assert mlp.entry.key != acts.entry.key
    model, _ = lm.load_lm(cfg.source, "cpu", tokenizer=False)
    rows = acts.entry.heldout_token_ids(2)
    z = lm.HookedLM(model, "blocks.1.hook_z").capture(torch.from_numpy(rows))[:, 1:].reshape(-1, 32)
    torch.testing.assert_close(torch.from_numpy(acts.entry.heldout_activations(30)), z, rtol=1e-5, atol=1e-5)
    ident, zero = downstream_metrics(acts, [lambda x: x.clone(), torch.zeros_like])
    assert ident["ce_sae"] == ident["ce_clean"] and zero["kl"] > 0
