"""The crosscoder trainer's Adam runs torch's fused kernel, and its update is the default one's."""

from __future__ import annotations

import torch

from crossdiff.crosscoder.sae_trainer import use_fused_adam


def _steps(fused: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(8, 16, generator=g)),
        torch.nn.Parameter(torch.zeros(16)),
    ]
    optimizer = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.999))
    if fused:
        use_fused_adam(optimizer)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach() for p in params]


def test_fused_adam_gives_the_default_update():
    default, fused = _steps(False), _steps(True)
    for a, b in zip(default, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))  # the parameters did move


def test_fused_adam_is_switched_on_only_where_a_kernel_exists():
    cpu = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    use_fused_adam(cpu)
    assert cpu.param_groups[0]["fused"] and not cpu.param_groups[0]["foreach"]
    meta = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    use_fused_adam(meta)
    assert not meta.param_groups[0]["fused"]
