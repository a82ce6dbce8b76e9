import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def tiny_cfg(tmp_path):
    """A fast synthetic experiment writing under tmp_path."""
    from saesweep.config.experiment import ExperimentConfig

    def make(**kw):
        base = dict(
            sae_type="relu", lr=3e-3, dict_size_ratio=4, sparsity_coeff=0.1,
            source={"kind": "synthetic", "d_in": 16, "n_features": 32, "sparsity": 0.05},
            # float32, not auto: results must not depend on whether this CPU has native bf16
            train={"tokens": 100_000, "batch_size": 512, "log_every": 10, "dtype": "float32"},
            eval={"tokens": 4096}, output_dir=str(tmp_path / "runs"),
        )
        for k, v in kw.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
        from saesweep import saes

        if "sparsity_coeff" not in kw and not saes.get(base["sae_type"]).uses_sparsity_coeff:
            del base["sparsity_coeff"]  # TopK types refuse it by name
        return ExperimentConfig(**base)

    return make


@pytest.fixture
def stop_after():
    """``stop_after(n)``: a ``should_stop`` callback for ``train_pack`` that stops it after n steps."""
    def make(n: int):
        calls = {"n": 0}

        def stop() -> bool:
            calls["n"] += 1
            return calls["n"] > n

        return stop

    return make


from fixtures_lm import *  # noqa: E402,F401,F403  (tiny LM, corpus and stories260K fixtures)
