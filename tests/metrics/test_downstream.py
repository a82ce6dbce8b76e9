"""The downstream metrics equal SAELens's own (``sae_lens.evals.get_recons_loss``, what
SAEBench core reports) on the same SAE, language model and tokens."""

import math

import pytest

from saesweep import metric_registry as registry
import torch

from saesweep import saes
from saesweep.config.experiment import parse_config
from saesweep.data import lm
from saesweep.metrics.downstream import kl_sum, spliced_metrics
from saesweep.metrics.reconstruction import raw_reconstructor
from saesweep.sae_files import export_member

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.evals import get_recons_loss  # noqa: E402
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402

HOOK = "blocks.1.hook_resid_pre"


class HFAsHooked:
    """The two calls get_recons_loss makes of a TransformerLens model, over a Hugging Face LM."""

    def __init__(self, model):
        self.model = model

    def _run(self, tokens, edit=None, layer=None):
        logits = lm.HookedLM(self.model, layer if layer is not None else 0).logits(tokens, edit)
        lp = logits.float().log_softmax(-1)
        loss = -lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        return logits, loss

    def __call__(self, tokens, return_type="both", loss_per_token=True):
        assert return_type == "both" and loss_per_token
        return self._run(tokens)

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True):
        assert return_type == "both" and loss_per_token and len(fwd_hooks) == 1
        (name, fn), = fwd_hooks
        layer = int(name.split(".")[1])
        return self._run(tokens, lambda h: fn(h, None), layer)


@pytest.mark.parametrize("bos", [True, False])
def test_spliced_metrics_equal_sae_lens_get_recons_loss(tiny_lm, tmp_path, bos):
    model, _ = lm.load_lm(parse_config({"source": {"kind": "hf", "model": str(tiny_lm), "dataset": "x.jsonl"}}).source,
                          "cpu", tokenizer=False)
    tokens = torch.randint(3, 60, (6, 16), generator=torch.Generator().manual_seed(1))
    if bos:  # rows that start with BOS: SAELens's run_evals leaves its position out (exclude_special_tokens)
        tokens[:, 0] = 1
    # a trained-looking ReLU SAE: random weights, a data-scale that is not 1 (folded into the export)
    sae = saes.get("relu")(32, 64, [{"sparsity_coeff": 0.1}], [0])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    scale = 0.37
    cfg = parse_config({"source": {"kind": "hf", "model": str(tiny_lm), "dataset": "x.jsonl", "hook": HOOK},
                        "output_dir": str(tmp_path)})
    export_member(sae, 0, cfg, scale, tmp_path / "sae")
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")

    ignore = [1] if bos else None
    ref = get_recons_loss(peer, HFAsHooked(model), ActivationScaler(), tokens, compute_kl=True,
                          compute_ce_loss=True, hook_name=HOOK, ignore_tokens=ignore)
    keep = tokens != 1  # what get_downstream_reconstruction_metrics averages over
    ref = {k: v[keep[:, : v.shape[1]]].mean().item() for k, v in ref.items()}
    ours, _ = spliced_metrics(lm.HookedLM(model, 1), tokens.numpy(), [raw_reconstructor(sae, scale)], batch_rows=4,
                              skip_first=bos)
    ours = ours[0]
    assert ours["ce_tokens"] == 6 * (14 if bos else 15)
    assert ours["ce_clean"] == pytest.approx(ref["ce_loss_without_sae"], rel=1e-5)
    assert ours["ce_sae"] == pytest.approx(ref["ce_loss_with_sae"], rel=1e-5)
    assert ours["ce_zero"] == pytest.approx(ref["ce_loss_with_ablation"], rel=1e-5)
    assert ours["kl"] == pytest.approx(ref["kl_div_with_sae"], rel=1e-5)
    assert ours["kl_zero"] == pytest.approx(ref["kl_div_with_ablation"], rel=1e-5)
    score = (ref["ce_loss_with_ablation"] - ref["ce_loss_with_sae"]) / (
        ref["ce_loss_with_ablation"] - ref["ce_loss_without_sae"])
    kl_score = (ref["kl_div_with_ablation"] - ref["kl_div_with_sae"]) / ref["kl_div_with_ablation"]
    assert ours["ce_loss_score"] == pytest.approx(score, abs=1e-6)
    assert ours["kl_div_score"] == pytest.approx(kl_score, abs=1e-6)
    assert 0 < ours["kl"] and math.isfinite(ours["ce_loss_score"])
    computed = set(ours) - {"n_pred", "n_pos"}  # (the counts behind the means)
    for name in computed:  # the registry knows every language-model metric, and where it comes from
        assert registry.METRICS[name].computed_in == "saesweep.metrics.downstream", name
    assert computed == {n for n, m in registry.METRICS.items() if m.computed_in == "saesweep.metrics.downstream"}


def test_kl_is_the_mean_of_sum_p_log_p_over_q_over_the_positions_scored():
    # two positions, vocabulary of two: clean (0.5, 0.5) and (0.9, 0.1); edited (0.25, 0.75) and (0.9, 0.1)
    clean = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    edited = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]).log()
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_sum(clean, edited) == pytest.approx(first, rel=1e-6)
    assert kl_sum(clean, edited, first=1) == pytest.approx(0.0, abs=1e-7)  # the first position left out
    assert kl_sum(edited, clean) == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), rel=1e-6)


def _pack_reconstructors(d, n=3):
    sae = saes.get("relu")(d, 4 * d, [{"sparsity_coeff": 0.1}] * n, list(range(n)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return [raw_reconstructor(sae.member(i), 0.5) for i in range(n)]


@pytest.mark.parametrize("layer", [0, 1, 2])  # the first block, a middle one, after the last
def test_the_pack_wide_pass_equals_a_full_forward_per_sae(tiny_lm, layer):
    """Blocks before the hook run once per batch, each SAE only runs the blocks after it: the
    metrics equal the full-forward-per-SAE path's."""
    model, _ = lm.load_lm(parse_config({"source": {"kind": "hf", "model": str(tiny_lm), "dataset": "x.jsonl"}}).source,
                          "cpu", tokenizer=False)
    hooked = lm.HookedLM(model, layer)
    rows = torch.randint(3, 60, (5, 16), generator=torch.Generator().manual_seed(4)).numpy()
    recs = _pack_reconstructors(model.config.hidden_size)
    fast, base_fast = spliced_metrics(hooked, rows, recs, batch_rows=2)
    assert hooked._tail_ok is True  # the shortcut was taken
    plain, base_plain = spliced_metrics(lm.HookedLM(model, layer), rows, recs, batch_rows=2, shortcut=False)
    for a, b in zip(fast + base_fast, plain + base_plain):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k


def test_the_shortcut_runs_only_the_blocks_after_the_hook(tiny_lm):
    model, _ = lm.load_lm(parse_config({"source": {"kind": "hf", "model": str(tiny_lm), "dataset": "x.jsonl"}}).source,
                          "cpu", tokenizer=False)
    hooked = lm.HookedLM(model, 1)
    counts = [0] * hooked.n_layers
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(hooked.blocks)]
    rows = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(4)).numpy()
    spliced_metrics(hooked, rows, _pack_reconstructors(model.config.hidden_size, n=4), batch_rows=2)
    for h in handles:
        h.remove()
    # one batch: block 0 only in the clean pass; blocks >= 1 in it, the check, the ablation and 4 SAEs
    assert counts[0] == 1 and counts[1:] == [7] * (hooked.n_layers - 1)


def test_other_model_families_take_the_shortcut_or_fall_back_exactly(tiny_other_lm):
    model, _ = lm.load_lm(parse_config({"source": {"kind": "hf", "model": str(tiny_other_lm), "dataset": "x.jsonl"}}).source,
                          "cpu", tokenizer=False)
    rows = torch.randint(3, 60, (4, 12), generator=torch.Generator().manual_seed(5)).numpy()
    recs = _pack_reconstructors(model.config.hidden_size, n=2)
    fast, _ = spliced_metrics(lm.HookedLM(model, 1), rows, recs, batch_rows=2)
    plain, _ = spliced_metrics(lm.HookedLM(model, 1), rows, recs, batch_rows=2, shortcut=False)
    for a, b in zip(fast, plain):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k


def test_a_time_budget_stops_after_whole_batches_and_reuses_the_baseline(tiny_lm):
    model, _ = lm.load_lm(parse_config({"source": {"kind": "hf", "model": str(tiny_lm), "dataset": "x.jsonl"}}).source,
                          "cpu", tokenizer=False)
    hooked = lm.HookedLM(model, 1)
    rows = torch.randint(3, 60, (16, 16), generator=torch.Generator().manual_seed(5)).numpy()
    recs = _pack_reconstructors(model.config.hidden_size, n=2)
    full, base = spliced_metrics(hooked, rows, recs, batch_rows=6)
    assert full[0]["ce_tokens"] == 16 * 15 and [b["n_pos"] for b in base] == [4 * 16, 6 * 16, 6 * 16]
    first, base1 = spliced_metrics(hooked, rows, recs, batch_rows=6, budget_s=1e-9)  # the small first batch only
    assert first[0]["ce_tokens"] == 4 * 15 and len(base1) == 1
    alone, _ = spliced_metrics(hooked, rows[:4], recs, batch_rows=6)
    for a, b in zip(first, alone):
        assert a == pytest.approx(b, rel=1e-6)
    # a later call reuses the first batch's clean and zero-ablated figures and adds the rest
    again, base2 = spliced_metrics(hooked, rows, recs, batch_rows=6, baseline=base1)
    assert base2[0] is base1[0] and len(base2) == 3
    for a, b in zip(again, full):
        assert a == pytest.approx(b, rel=1e-6)
