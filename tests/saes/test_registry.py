"""An architecture is one file: a throwaway one, registered here at test time, trains as a
2-member pack, expands in a grid, exports and loads back, with no other file edited."""

import json

import pytest
import torch
from torch import Tensor

from saesweep.packing import pack_key
from saesweep import saes
from saesweep.config.experiment import parse_config
from saesweep.config.sweep import expand, parse_spec, sweepable
from saesweep.export import load_sae
from saesweep.saes.base import PackedSAE, Step
from saesweep.saes.registry import HyperParam, register, unregister
from saesweep.training.run import run_pack


class TopKLite(PackedSAE):
    """ReLU codes, then only the k largest per token are kept; no sparsity penalty."""

    name = "topk_lite"
    saelens_architecture = "topk"
    hyperparams = {"k": HyperParam(int, 4, "active features per token", per_member=False)}

    def _init_parameters(self) -> None:
        self._init_decoder_and_encoder("W_enc")
        self._param("b_enc", self._zeros(self.d_sae))

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        pre = torch.relu(torch.matmul(self.centered(x), self.W_enc) + self.b_enc[:, None, :])
        k = int(self.hp[0]["k"])
        top = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        return Step(f, x.new_zeros(self.n))

    def saelens_extra_cfg(self, i: int) -> dict:
        return {"k": int(self.hp[i]["k"])}


@pytest.fixture
def topk_lite():
    register(TopKLite)
    yield TopKLite
    unregister(TopKLite.name)


def test_a_new_architecture_needs_only_its_own_file(topk_lite, tmp_path):
    assert "topk_lite" in saes.names() and "k" in sweepable()
    spec = parse_spec({
        "name": "plug", "sae_types": ["topk_lite"], "output_dir": str(tmp_path),
        "grids": {"topk_lite": {"lr": [1e-3, 3e-3], "k": [2, 4], "dict_size_ratio": [4.0]}},
        "base": {"source": {"kind": "synthetic", "d_in": 16, "n_features": 32},
                 "train": {"tokens": 4096, "batch_size": 256}, "eval": {"tokens": 1024}},
    })
    configs = expand(spec)
    assert len(configs) == 4 and {c.k for c in configs} == {2, 4}
    pack = [c for c in configs if c.k == 2]
    assert len({pack_key(c) for c in pack}) == 1  # lr is per member, k is not
    assert len({pack_key(c) for c in configs}) == 2
    results = run_pack(pack, show_progress=False)
    assert [r.status for r in results] == ["complete", "complete"]
    for r in results:
        assert r.metrics["l0"] <= 2.0 + 1e-6
        sae = load_sae(r.run_dir)
        x = torch.randn(8, 16)
        assert ((sae.encode(x) != 0).sum(-1) <= 2).all()
    with pytest.raises(Exception, match="does not apply"):
        parse_config({"sae_type": "relu", "k": 3})


def test_the_cached_declarations_are_what_the_modules_declare(tmp_path, monkeypatch):
    """What configs read without importing torch is what the architecture classes say, in display
    order; a damaged cache file is derived again."""
    from saesweep.saes import declare, registry

    monkeypatch.setenv("SAESWEEP_CACHE", str(tmp_path))
    declare.declarations.cache_clear()
    try:
        first = registry.declarations()
        (cached,) = (tmp_path / "declarations").glob("*.json")
        assert cached.stem == declare.source_digest()
        assert list(first) == [c.name for c in declare.discover(registry.registered)]
        for name in first:
            assert registry._declared(name) == registry._declaration_of(registry.get(name))
        cached.write_text("{not json")
        declare.declarations.cache_clear()
        assert registry.declarations() == first
        assert json.loads(cached.read_text()) == first
    finally:
        declare.declarations.cache_clear()
