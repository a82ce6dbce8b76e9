"""The two ways to add an architecture, as a contributor follows them, end to end through the CLI:
a built-in is one new module in the package and nothing else; a plugin is an
installed package with an entry point in ``saesweep.architectures``."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sweep_helpers import REPO, TINY_BASE

#: a throwaway architecture: ReLU codes under an L^p penalty, one hyperparameter with a grid
MODULE = textwrap.dedent('''
    """ReLU codes under an L^p penalty on the codes (``p_exponent``)."""

    import torch

    from saesweep.saes.base import HyperParam, PackedSAE, Step
    from saesweep.saes.registry import register


    @register
    class PLite(PackedSAE):
        name = "p_lite"
        saelens_architecture = "standard"
        hyperparams = {"p_exponent": HyperParam(float, 1.0, "exponent of the L^p penalty")}
        grid = {"p_exponent": [0.5, 1.0]}

        def _init_parameters(self):
            self._init_decoder_and_encoder("W_enc")
            self._param("b_enc", self._zeros(self.d_sae))

        def _forward(self, x, *, train, progress):
            f = torch.relu(torch.matmul(self.centered(x), self.W_enc) + self.b_enc[:, None, :])
            p = torch.tensor([float(h["p_exponent"]) for h in self.hp], device=x.device)[:, None, None]
            return Step(f, (f + 1e-6).pow(p).sum(-1).mean(-1))
''')

LOAD = ("import sys, pathlib, torch\n"
        "from saesweep.export import load_sae\n"
        "runs = [p.parent for p in pathlib.Path(sys.argv[1]).rglob('cfg.json')]\n"
        "assert len(runs) == 2, runs\n"
        "for r in runs:\n"
        "    sae = load_sae(r)\n"
        "    assert sae.encode(torch.randn(4, 8)).shape == (4, 16)\n"
        "print('loaded', len(runs))\n")


def _run(args, cwd, pythonpath: Path, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1", SAESWEEP_CACHE=str(cwd / "cache"))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _sweep_and_export(tmp_path: Path, pythonpath: Path) -> None:
    """``saesweep grid`` shows the type's default grid; a sweep trains it; its runs load back."""
    out = _run(["-m", "saesweep", "grid", "--sae_types", "p_lite"], tmp_path, pythonpath).stdout
    assert "p_exponent: [0.5, 1.0]" in out and "p_lite: 3 x 4 x 4 x 2 = 96 experiments" in out
    spec = {"name": "plug", "sae_types": ["p_lite"], "base": TINY_BASE, "output_dir": str(tmp_path / "runs"),
            "grids": {"p_lite": {"lr": [1e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1],
                                 "p_exponent": [0.5, 1.0]}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    _run(["-m", "saesweep", "sweep", "--spec", "spec.yaml"], tmp_path, pythonpath)
    assert "loaded 2" in _run(["-c", LOAD, str(tmp_path / "runs")], tmp_path, pythonpath).stdout


def _changed(a: Path, b: Path) -> list[str]:
    """Files that differ between two trees (caches ignored), relative to them."""
    out = []
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])

    def walk(c, prefix=""):
        out.extend(prefix + n for n in c.left_only + c.right_only + c.diff_files)
        for name, sub in c.subdirs.items():
            walk(sub, prefix + name + "/")

    walk(cmp)
    return sorted(out)


@pytest.mark.slow
def test_a_built_in_architecture_is_one_file(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(REPO / "src" / "saesweep", copy / "saesweep", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "saesweep" / "saes" / "p_lite.py").write_text(MODULE)
    _sweep_and_export(tmp_path, copy)
    assert _changed(REPO / "src" / "saesweep", copy / "saesweep") == ["saes/p_lite.py"]


@pytest.mark.slow
def test_an_installed_plugin_reaches_every_command(tmp_path):
    pkg = tmp_path / "plugin"
    (pkg / "p_lite_plugin").mkdir(parents=True)
    (pkg / "p_lite_plugin" / "__init__.py").write_text(MODULE)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "p-lite-plugin"
        version = "0.1"

        [project.entry-points."saesweep.architectures"]
        p_lite = "p_lite_plugin"
    '''))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=300)
    _sweep_and_export(tmp_path, Path(os.pathsep.join([str(site), str(REPO / "src")])))
