"""PPC / PPD loss modules on Sinkhorn targets: a seeded fuzz over classes, K, pixel
counts, ignore fractions, epsilons and dtypes, against the per-pixel terms by hand."""
import pytest
import torch

from mmseg_proto.models.losses import (PixelPrototypeContrastLoss,
                                       PixelPrototypeDistanceLoss)
from mmseg_proto.models.utils.sinkhorn import sinkhorn_knopp

FUZZ_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.mark.parametrize('seed', range(40))
def test_fuzz_sinkhorn_and_losses(seed):
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1, ), generator=g))

    c, k, n = randint(1, 40), randint(1, 12), randint(0, 3000)
    dtype = FUZZ_DTYPES[seed % len(FUZZ_DTYPES)]
    ignore_frac = float(torch.rand(1, generator=g))
    eps = (0.01, 0.05, 0.5)[seed % 3]
    iters = randint(1, 6)
    # Cosine similarities, sometimes all (nearly) equal to +-1.
    sims = torch.rand(n, c * k, generator=g) * 2 - 1
    if seed % 5 == 0:
        sims = sims.sign() * (1 - 1e-3 * sims.abs())
    sims = sims.to(dtype)
    labels = torch.randint(0, c, (n, ), generator=g)
    # Few classes dominate sometimes (classes with fewer pixels than K).
    if seed % 2:
        labels = labels % max(1, c // 3)
    own = sims.view(n, c, k).gather(
        1, labels.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)
    assign, transport = sinkhorn_knopp(own, labels, c, eps, iters)
    assert assign.shape == (n, ) and assign.dtype == torch.long
    assert transport.dtype == (torch.float64 if dtype == torch.float64
                               else torch.float32)
    assert torch.isfinite(transport).all()
    if n:
        torch.testing.assert_close(
            transport.sum(1), torch.ones(n, dtype=transport.dtype),
            atol=1e-4, rtol=1e-4)

    targets = labels * k + assign
    targets[torch.rand(n, generator=g) < ignore_frac] = -1
    assert n == 0 or int(targets.max()) < c * k
    logits = sims.clone().requires_grad_()
    inside = targets >= 0
    picked = sims[inside].gather(1, targets[inside, None]).squeeze(1).float()
    expected = {  # the per-pixel terms by hand, averaged over labelled pixels
        PixelPrototypeContrastLoss: 0.01 * (torch.logsumexp(
            sims[inside].float(), dim=1) - picked).mean(),
        PixelPrototypeDistanceLoss: 0.001 * ((1 - picked)**2).mean()}
    for loss_fn in (PixelPrototypeContrastLoss(),
                    PixelPrototypeDistanceLoss()):
        value = loss_fn(logits, targets)
        assert value.dim() == 0 and torch.isfinite(value), loss_fn
        if bool(inside.any()):
            torch.testing.assert_close(value.float(),
                                       expected[type(loss_fn)].float(),
                                       rtol=1e-4, atol=1e-6)
        else:
            assert float(value) == 0.0
        value.backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None
