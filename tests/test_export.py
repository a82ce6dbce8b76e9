"""Exported SAEs of every type load in SAELens (its own architectures, or the classes
``saesweep.export.register_saelens()`` registers for the hard-concrete types) and in saesweep,
with the codes the trained SAE gives."""

import json

import pytest
import torch

import saesweep
from saesweep.data import open_source
from saesweep.export import load_sae, load_sae_pack, register_saelens

register_saelens()


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


def raw_and_normalised(cfg):
    data = open_source(cfg)
    x_norm = data.eval_activations()[:256]
    return x_norm / data.scale, x_norm


def trained_member_codes(result, x_norm):
    """Codes of the trained model on normalised input (what training saw)."""
    from saesweep.training.trainer import train_pack

    data = open_source(result.config)
    pack = train_pack([result.config], data, show_progress=False)
    pack.sae.after_training(data.eval_activations())  # as a run does before it exports (a calibrated threshold)
    return pack.sae.encode(x_norm, train=False)[0]


SAELENS = [("relu", "standard", {}), ("gated", "gated", {}),
           ("hard_concrete", "hard_concrete", {}), ("gated_hard_concrete", "gated_hard_concrete", {}),
          ("topk", "topk", {"k": 4, "sparsity_coeff": None}), ("batchtopk", "jumprelu", {"k": 4, "sparsity_coeff": None}),
          ("jumprelu", "jumprelu", {}), ("matryoshka", "jumprelu", {"k": 4, "sparsity_coeff": None})]


@pytest.mark.parametrize("sae_type, arch, extra", SAELENS, ids=[t for t, _, _ in SAELENS])
def test_saelens_loads_its_architectures_with_identical_codes(tiny_cfg, sae_lens, sae_type, arch, extra):
    # 80 steps: enough for every type to reconstruct (gated hard concrete, whose magnitudes start
    # at the projection, was at FVU 0.50 after 40), so the raw-unit check below means something
    r = saesweep.run(tiny_cfg(sae_type=sae_type, train={"tokens": 40_000}, **extra))
    assert json.loads((r.run_dir / "cfg.json").read_text())["architecture"] == arch
    sl = sae_lens.SAE.load_from_disk(str(r.run_dir), device="cpu")
    x_raw, x_norm = raw_and_normalised(r.config)
    ours = trained_member_codes(r, x_norm)
    theirs = sl.encode(x_raw)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs != 0).any()
    # the reconstruction is in raw units: decode(encode(x)) ~ x for a trained SAE
    fvu = (sl.decode(theirs) - x_raw).pow(2).sum() / (x_raw - x_raw.mean(0)).pow(2).sum()
    assert fvu < 0.5


@pytest.mark.parametrize("sae_type", saesweep.saes.names())
def test_load_sae_roundtrip_every_type(tiny_cfg, sae_type):
    extra = {} if saesweep.saes.get(sae_type).uses_sparsity_coeff else {"k": 4, "sparsity_coeff": None}
    r = saesweep.run(tiny_cfg(sae_type=sae_type, train={"tokens": 20_000}, **extra))
    cfg = json.loads((r.run_dir / "cfg.json").read_text())
    assert cfg["metadata"]["sae_type"] == sae_type and cfg["d_sae"] == 64
    conv = cfg["metadata"]["loss_convention"]  # the convention the SAE was trained under
    assert conv["version"] == saesweep.saes.LOSS_CONVENTION == 2 and conv["penalty_scale"] > 0
    loaded = load_sae(r.run_dir)
    x_raw, x_norm = raw_and_normalised(r.config)
    codes = loaded.encode(x_raw)  # one SAE, shaped as in SAELens
    enc = getattr(loaded, loaded.pack.encoder_weights[0])  # W_enc (W_mag, W_gate for hard concrete)
    assert codes.shape == (256, 64) and enc.shape == (16, 64) and loaded.W_dec.shape == (64, 16)
    torch.testing.assert_close(codes, trained_member_codes(r, x_norm), rtol=1e-4, atol=1e-5)
    assert loaded.decode(codes).shape == (256, 16) and loaded(x_raw[:3, None]).shape == (3, 1, 16)
    torch.testing.assert_close(loaded(x_raw), loaded.decode(codes))
    pack = load_sae_pack(r.run_dir)  # the pack form
    assert pack.n == 1 and pack.W_dec.shape == (1, 64, 16)


def test_importing_export_leaves_saelens_alone():
    import subprocess
    import sys

    code = ("import sae_lens.registry as r; import saesweep.export as e; "
            "assert 'hard_concrete' not in r.SAE_CLASS_REGISTRY; e.register_saelens(); "
            "assert 'hard_concrete' in r.SAE_CLASS_REGISTRY")
    subprocess.run([sys.executable, "-c", code], check=True)
