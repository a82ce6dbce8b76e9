"""The packed Adam and per-member clipping equal torch's own, member by member."""

import pytest
import torch

from saesweep.training.optim import PackedAdam, clip_grad_norm_per_member


def test_packed_adam_matches_torch_adam_per_member():
    torch.manual_seed(0)
    lrs = [1e-3, 3e-2, 0.1]
    w0 = torch.randn(3, 5, 4)
    packed = torch.nn.Parameter(w0.clone())
    opt = PackedAdam([("w", packed)], torch.tensor(lrs), betas=(0.9, 0.99))
    singles = [torch.nn.Parameter(w0[i].clone()) for i in range(3)]
    topts = [torch.optim.Adam([p], lr=lr, betas=(0.9, 0.99), foreach=False) for p, lr in zip(singles, lrs)]
    for step in range(20):
        g = torch.randn(3, 5, 4)
        packed.grad = g.clone()
        factor = 0.5 + step / 40  # a schedule factor multiplies every member's lr
        opt.step(factor)
        for i, (p, o) in enumerate(zip(singles, topts)):
            p.grad = g[i].clone()
            for group in o.param_groups:
                group["lr"] = lrs[i] * factor
            o.step()
    for i in range(3):
        torch.testing.assert_close(packed[i].detach(), singles[i].detach(), rtol=1e-5, atol=1e-7)


def test_clip_per_member_matches_clip_grad_norm():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.zeros(2, 3, 3))
    b = torch.nn.Parameter(torch.zeros(2, 3))
    a.grad, b.grad = torch.randn(2, 3, 3) * torch.tensor([10.0, 0.01]).view(2, 1, 1), torch.randn(2, 3)
    ref = []
    for i in range(2):
        pa, pb = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
        pa.grad, pb.grad = a.grad[i].clone(), b.grad[i].clone()
        torch.nn.utils.clip_grad_norm_([pa, pb], 1.0)
        ref.append((pa.grad, pb.grad))
    clip_grad_norm_per_member([a, b], 1.0)
    for i in range(2):
        torch.testing.assert_close(a.grad[i], ref[i][0])
        torch.testing.assert_close(b.grad[i], ref[i][1])


@pytest.mark.parametrize("fused", [True, False])
def test_lr_scale_multiplies_the_named_parameters_step(fused):
    torch.manual_seed(2)
    lrs = [1e-3, 3e-2]
    a0, b0 = torch.randn(2, 4, 3), torch.randn(2, 3)
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    opt = PackedAdam([("a", a), ("b", b)], torch.tensor(lrs), lr_scale={"a": 10.0})
    opt.use_fused = fused and opt.use_fused
    singles = [(torch.nn.Parameter(a0[i].clone()), torch.nn.Parameter(b0[i].clone())) for i in range(2)]
    topts = [torch.optim.Adam([{"params": [pa], "lr": 10 * lr}, {"params": [pb], "lr": lr}], foreach=False)
             for (pa, pb), lr in zip(singles, lrs)]
    for _ in range(10):
        ga, gb = torch.randn(2, 4, 3), torch.randn(2, 3)
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        for i, ((pa, pb), o) in enumerate(zip(singles, topts)):
            pa.grad, pb.grad = ga[i].clone(), gb[i].clone()
            o.step()
    for i in range(2):
        torch.testing.assert_close(a[i].detach(), singles[i][0].detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b[i].detach(), singles[i][1].detach(), rtol=1e-5, atol=1e-7)
