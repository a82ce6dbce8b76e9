"""Recovery of a synthetic world's true features, judged by what the latents do on held-out
tokens, not only by where the decoder points.

Latents are matched to true features one to one by the Hungarian algorithm on the cosine
between decoder rows and true directions (``scipy.optimize.linear_sum_assignment``); a greedy
variant gives each true feature its best-cosine latent (several features may share one). For
a matched pair (latent l, feature f) on the held-out tokens, with "l fires" (its code is not 0)
against "f is active":

* precision = P(f active | l fires), recall = P(l fires | f active), F1 their harmonic mean
  (0 when the latent never fires or the feature is never active);
* MCC, the Matthews correlation of the two binary series.

``feature_f1`` is the mean F1 over true features when the SAE is at least as wide as the true
dictionary (an unmatched feature scores 0), and over latents when it is narrower (each latent's
one-to-one matched feature). ``feature_f1_greedy`` is the same with greedy matching,
``feature_mcc`` the mean MCC over matched pairs, ``frac_f1_50`` the share of true features
whose matched latent reaches F1 >= 0.5. ``absorption``: over the world's hierarchies, how often
a parent's latent stays silent on tokens where one of its children is active (and so is the
parent), averaged over parents. The decoder-only figures keep names that say so:
``decoder_mmcs`` (mean over true features of the best cosine with a decoder row) and
``decoder_frac_cos90`` (share of true features with a decoder row at cosine > 0.9).

SynthSAEBench's own classification metrics are reported beside these, under their own names
(``sae_lens.synthetic.evals.compute_classification_metrics`` and ``feature_uniqueness``, tested
equal): each latent is scored against its best ``|cosine|`` true feature, duplicates allowed, and
the means are over all latents (one that never fires scores 0): ``synthsaebench_f1``,
``synthsaebench_precision``, ``synthsaebench_recall``; ``synthsaebench_uniqueness`` is the number
of distinct best features over the number of latents. Published SynthSAEBench F1s compare with
``synthsaebench_f1``, not with ``feature_f1``: an SAE whose latents duplicate each other scores
high on the first and is penalised on the second.

``probe_f1`` is the ceiling a supervised linear probe reaches on the same world (a logistic
probe per feature, trained on labelled activations): an SAE's ``feature_f1`` reads against it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

RECOVERED_COSINE = 0.9
GOOD_F1 = 0.5


def _f1(tp: Tensor, fires: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    precision = torch.where(fires > 0, tp / fires.clamp_min(1), torch.zeros(()))
    recall = torch.where(active > 0, tp / active.clamp_min(1), torch.zeros(()))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros(()))
    return precision, recall, f1


def _mcc(tp: Tensor, fires: Tensor, active: Tensor, n: int) -> Tensor:
    fp, fn = fires - tp, active - tp
    tn = n - tp - fp - fn
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).clamp_min(0).sqrt()
    return torch.where(den > 0, (tp * tn - fp * fn) / den.clamp_min(1e-12), torch.zeros(()))


def match(cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching on cosines ``[n_true, n_latents]``: ``(feature ids, latent ids)`` of the
    pairs, as many as the smaller side, maximising the summed cosine."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cos, maximize=True)
    return rows, cols


@torch.no_grad()
def recovery_metrics(
    codes: Sequence[Tensor],
    truth: Tensor,
    decoders: Sequence[Tensor],
    ground_truth: Tensor,
    hierarchy: Sequence[tuple[int, Sequence[int]]] = (),
) -> list[dict[str, float]]:
    """The recovery metrics of each SAE (module doc) from its held-out codes.

    ``codes[i]``: member i's firing ``[N, m]`` (bool, or any codes: not 0 = fires) on the
    held-out tokens; ``truth``: which true features are active ``[N, F]`` (bool);
    ``decoders[i]``: member i's decoder rows ``[m, d]``; ``ground_truth``: ``[F, d]``.
    """
    active = truth.float()
    n = active.shape[0]
    active_n = active.sum(0).double()  # [F]
    gt = ground_truth.float()
    gt = gt / gt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    parents = [p for p, _ in hierarchy]
    if hierarchy:
        any_child = torch.stack([truth[:, list(cs)].any(-1) for _, cs in hierarchy], -1).float()  # [N, P]
    out = []
    for fires_i, dec in zip(codes, decoders):
        fired = (fires_i != 0).float()  # [N, m]
        fire_n = fired.sum(0).double()  # [m]
        co = (fired.T @ active).double()  # [m, F] tokens where latent and feature are both on
        dec = dec.float()
        dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (gt @ dec.T).double()  # [F, m]
        best = cos.max(dim=1)
        F, m = cos.shape
        f_ids, l_ids = match(cos.numpy())
        f_t, l_t = torch.as_tensor(f_ids), torch.as_tensor(l_ids)
        tp = co[l_t, f_t]
        _, _, f1 = _f1(tp, fire_n[l_t], active_n[f_t])
        mcc = _mcc(tp, fire_n[l_t], active_n[f_t], n)
        per_feature = torch.zeros(F, dtype=torch.float64)
        per_feature[f_t] = f1
        feature_f1 = float(per_feature.mean()) if m >= F else float(f1.mean())
        latent_best = cos.abs().argmax(dim=0)  # [m]: SynthSAEBench's match, duplicates allowed
        s_prec, s_rec, s_f1 = _f1(co[torch.arange(m), latent_best], fire_n, active_n[latent_best])
        g_tp = co[best.indices, torch.arange(F)]
        _, _, g_f1 = _f1(g_tp, fire_n[best.indices], active_n)
        row = {
            "feature_f1": feature_f1,
            "feature_f1_greedy": float(g_f1.mean()),
            "feature_mcc": float(mcc.mean()) if len(mcc) else 0.0,
            "frac_f1_50": float((per_feature >= GOOD_F1).double().mean()),
            "decoder_mmcs": float(best.values.mean()),
            "decoder_frac_cos90": float((best.values > RECOVERED_COSINE).double().mean()),
            "synthsaebench_f1": float(s_f1.mean()),
            "synthsaebench_precision": float(s_prec.mean()),
            "synthsaebench_recall": float(s_rec.mean()),
            "synthsaebench_uniqueness": len(latent_best.unique()) / m,
        }
        if hierarchy:
            latent_of = {int(f): int(ll) for f, ll in zip(f_ids, l_ids)}
            rates = []
            co_child = (fired.T @ any_child).double()  # [m, P]
            child_n = any_child.sum(0).double()
            for j, p in enumerate(parents):
                if p in latent_of and child_n[j] > 0:
                    rates.append(float(1 - co_child[latent_of[p], j] / child_n[j]))
            row["absorption"] = float(np.mean(rates)) if rates else float("nan")
        out.append(row)
    return out


def probe_f1(x_train: Tensor, truth_train: Tensor, x_eval: Tensor, truth_eval: Tensor, *, steps: int = 300,
             seed: int = 0) -> float:
    """The supervised ceiling: a logistic probe per true feature (one linear layer ``[d, F]``,
    class-balanced, trained with Adam on labelled activations), its F1 on held-out tokens, mean
    over features (a feature never active in the held-out tokens counts as 1 when the probe
    never fires for it, else 0)."""
    g = torch.Generator().manual_seed(seed)
    d, F = x_train.shape[1], truth_train.shape[1]
    w = (torch.randn(d, F, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(F, requires_grad=True)
    y = truth_train.float()
    freq = y.mean(0).clamp(1e-4, 1 - 1e-4)
    pos_weight = (1 - freq) / freq
    opt = torch.optim.Adam([w, b], lr=0.05)
    batch = min(8192, x_train.shape[0])
    for _ in range(steps):
        idx = torch.randint(0, x_train.shape[0], (batch,), generator=g)
        logits = x_train[idx] @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        # the balanced probe's threshold sits at the prior; F1 wants it near the posterior 0.5
        logits = x_eval @ w + b
        pred = logits > torch.log(pos_weight)
        act = truth_eval
        tp = (pred & act).sum(0).double()
        _, _, f1 = _f1(tp, pred.sum(0).double(), act.sum(0).double())
        never = act.sum(0) == 0
        f1 = torch.where(never, (pred.sum(0) == 0).double(), f1)
    return float(f1.mean())


def latent_codes(sae, x_eval: Tensor, member: int, batch_size: int = 4096) -> Tensor:
    """Member ``member``'s evaluation codes on ``x_eval`` as a bool firing matrix ``[N, m]``."""
    view = sae.member(member)
    parts = []
    for start in range(0, x_eval.shape[0], batch_size):
        x = x_eval[start : start + batch_size].to(view.device_, torch.float32)
        parts.append((view.encode(x, train=False)[0] != 0).cpu())
    return torch.cat(parts)


_PROBES: dict[tuple[str, int], float] = {}  # probe ceiling per world (and held-out size), per process


def world_probe_f1(data) -> float:
    """The supervised ceiling of a synthetic source ``data`` (:func:`probe_f1`): logistic probes
    trained on labelled tokens of a stream of their own, scored on the held-out tokens.
    Computed once per world and process."""
    key = data.world_key
    if key not in _PROBES:
        x, truth = data.probe_training_set()
        _PROBES[key] = probe_f1(x, truth, data.eval_activations(), data.eval_truth())
    return _PROBES[key]


def world_recovery(sae, data, batch_size: int = 4096, probe: Optional[float] = None) -> list[dict[str, float]]:
    """:func:`recovery_metrics` of every member of ``sae`` on a synthetic source ``data``."""
    x = data.eval_activations()
    truth = data.eval_truth()
    codes = [latent_codes(sae, x, i, batch_size) for i in range(sae.n)]
    decs = [sae.W_dec[i].detach().float().cpu() for i in range(sae.n)]
    rows = recovery_metrics(codes, truth, decs, data.ground_truth, data.hierarchy)
    for r in rows:
        r["true_l0"] = float(data.true_l0)
        if probe is not None:
            r["probe_f1"] = probe
    return rows
