"""PPC / PPD loss modules: a seeded fuzz over classes, K, pixel counts, ignore fractions and
dtypes against the per-pixel terms by hand, and their argument checks. (Sinkhorn, which
makes the targets in training, is tested in ``test_models/test_utils/test_sinkhorn.py``.)"""
import pytest
import torch

from mmseg_proto.models.losses import (PixelPrototypeContrastLoss,
                                       PixelPrototypeDistanceLoss)

FUZZ_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.mark.parametrize('seed', range(40))
def test_fuzz_losses_against_the_per_pixel_terms_by_hand(seed):
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1, ), generator=g))

    c, k, n = randint(1, 40), randint(1, 12), randint(0, 3000)
    dtype = FUZZ_DTYPES[seed % len(FUZZ_DTYPES)]
    ignore_frac = float(torch.rand(1, generator=g))
    # Cosine similarities, sometimes all (nearly) equal to +-1.
    sims = torch.rand(n, c * k, generator=g) * 2 - 1
    if seed % 5 == 0:
        sims = sims.sign() * (1 - 1e-3 * sims.abs())
    sims = sims.to(dtype)
    labels = torch.randint(0, c, (n, ), generator=g)
    targets = labels * k + torch.randint(0, k, (n, ), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -1
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


def test_temperature_divides_the_similarities():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(20, 6, generator=g) * 2 - 1
    targets = torch.randint(0, 6, (20, ), generator=g)
    targets[::4] = -1
    inside = targets >= 0
    by_hand = torch.nn.functional.cross_entropy(sims[inside] / 0.1, targets[inside])
    loss = PixelPrototypeContrastLoss(loss_weight=1.0, temperature=0.1)
    torch.testing.assert_close(loss(sims, targets), by_hand)
    assert loss.loss_name == 'loss_ppc'
    assert PixelPrototypeDistanceLoss().loss_name == 'loss_ppd'


@pytest.mark.parametrize('temperature', [0.0, -0.1])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match='temperature'):
        PixelPrototypeContrastLoss(temperature=temperature)
