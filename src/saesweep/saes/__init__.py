"""SAE architectures: one module each, behind :mod:`.registry`.

Adding an architecture (TopK, JumpReLU, ...) is one new module: subclass
:class:`~saesweep.saes.base.PackedSAE`, declare its ``hyperparams`` and default ``grid``, and
decorate it with :func:`~saesweep.saes.registry.register`. In this package it is a built-in
(nothing else to edit); in another package, an entry point in
the group ``saesweep.architectures`` makes it reachable from every command. Its
hyperparameters become config fields and grid axes automatically.
Importing this package loads no torch; :class:`PackedSAE` and friends load on first use.
"""

from __future__ import annotations

from saesweep.saes.registry import HyperParam, all_hyperparams, declaration, get, names, register

#: The loss convention (recorded in every run's cfg.json and metrics.json, and part of the
#: trial id, so runs trained under another convention are never mixed with these). Version 2,
#: dictionary_learning's and SAEBench's: activations are scaled by one recorded factor to unit
#: mean squared norm (E||x||^2 = 1), and the loss per member is
#: ``SSE + sparsity_coeff * penalty_scale * P + aux``, every term a mean over tokens of a sum
#: (SSE = ||x - x_hat||^2 summed over dimensions). ``penalty_scale`` (a class attribute of
#: each architecture: 1 for ReLU's L1 of the codes, 2 for Gated's sum of ReLU(pi_gate), 0.1 for
#: the expected-L0 counts of the hard-concrete types) is chosen so that the classic
#: coefficients 0.01-0.3 span dense to sparse on real activations (benchmarks/README.md).
#: Version 1 was ``MSE + sparsity_coeff * P / d`` on E||x||^2 = d.
LOSS_CONVENTION = 2


def __getattr__(name: str):
    if name in ("PackedSAE", "Losses"):
        from saesweep.saes import base

        return getattr(base, name)
    raise AttributeError(name)


__all__ = ["LOSS_CONVENTION", "HyperParam", "Losses", "PackedSAE", "register", "get", "names", "all_hyperparams", "declaration"]
