"""ProtoHead's losses pinned to an independent computation.

The reference below recomputes CE, PPC and PPD from ``head.embed``, the prototype buffer
and ``sinkhorn_knopp`` with plain tensor code in its own (class-major) prototype order, so a
wrong target column, a wrong prototype order or a wrong reduction in any loss path fails.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_head, make_samples

from mmseg_proto.models.utils.sinkhorn import sinkhorn_knopp

IGNORE = 255


def reference_losses(head, inputs, labels, w_ppc=0.01, w_ppd=0.001, temperature=1.0):
    """CE, PPC and PPD of one batch, computed independently of the head's paths."""
    c, k = head.num_classes, head.num_prototypes
    emb = head.embed(inputs)  # (B, H, W, D), labels are at this resolution
    flat = emb.reshape(-1, emb.shape[-1])
    lab = labels.reshape(-1)
    valid = lab != IGNORE
    sims = torch.einsum('nd,ckd->nck', flat, head.prototypes.to(flat.dtype))  # (N, C, K)
    own = sims[valid, lab[valid]]  # (Nv, K)
    assign, _ = sinkhorn_knopp(own.detach(), lab[valid], c, head.sinkhorn_epsilon,
                               head.sinkhorn_iters)
    target = lab[valid] * k + assign  # class-major column of each pixel's prototype
    logits = sims[valid].reshape(-1, c * k) / temperature
    ppc = F.cross_entropy(logits, target, reduction='sum') / valid.sum()
    target_sim = logits.gather(1, target[:, None]).squeeze(1) * temperature
    ppd = ((1 - target_sim)**2).sum() / valid.sum()
    class_scores = sims.max(dim=-1).values.view(*emb.shape[:3], c)
    seg_logits = F.layer_norm(class_scores, (c, ), head.mask_norm.weight,
                              head.mask_norm.bias).permute(0, 3, 1, 2)
    ce = F.cross_entropy(seg_logits, labels, ignore_index=IGNORE, reduction='none').mean()
    return dict(loss_ce=ce, loss_ppc=w_ppc * ppc, loss_ppd=w_ppd * ppd)


PATHS = {
    'fused': dict(),
    'eager': dict(fused_losses=False),
    'streamed': dict(similarity_chunk=7),
}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('num_classes,num_prototypes', [(4, 3), (30, 10)])
@pytest.mark.parametrize('path', sorted(PATHS))
@pytest.mark.parametrize('temperature', [1.0, 0.1])
def test_losses_and_gradients_equal_the_reference(path, num_classes, num_prototypes,
                                                  dtype, temperature):
    torch.manual_seed(0)
    loss_decode = [dict(type='CrossEntropyLoss', loss_weight=1.0),
                   dict(type='PixelPrototypeContrastLoss', loss_weight=0.01,
                        temperature=temperature),
                   dict(type='PixelPrototypeDistanceLoss', loss_weight=0.001)]
    head = make_head(num_classes=num_classes, num_prototypes=num_prototypes,
                     loss_decode=loss_decode, **PATHS[path]).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, 5, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, num_classes, (2, 6, 5), generator=g)
    labels[0, 0] = IGNORE
    labels[1, 2, :3] = IGNORE
    losses = head.loss([x], make_samples(labels), None)
    head.bank.discard()
    expected = reference_losses(head, [x], labels, temperature=temperature)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-8)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value.to(losses[name].dtype), **tol,
                                   msg=f'{path} {name}')
    total = sum(v for k, v in losses.items() if k.startswith('loss'))
    got = torch.autograd.grad(total, x)[0]
    want = torch.autograd.grad(sum(expected.values()), x)[0]
    torch.testing.assert_close(got, want, **tol, msg=f'{path} d(total)/dx')
