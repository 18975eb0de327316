"""Every fast prototype-scores path against the one reference of the per-pixel PPC and PPD
terms (the loss modules' ``per_pixel``) and of the class scores (max over K): values and
gradients, fp32 and fp64, with ignored pixels and C*K > 255."""
import pytest
import torch

from mmseg_proto.models.losses import (PixelPrototypeContrastLoss,
                                       PixelPrototypeDistanceLoss)
from mmseg_proto.models.utils.prototype_index import similarity_column
from mmseg_proto.models.utils.prototype_scores import FusedScores, StreamedScores


def make_inputs(c, k, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(k * c, d, generator=g, dtype=dtype),
                                           dim=1)
    labels = torch.randint(0, c, (n, ), generator=g)
    labels[::7] = 255  # ignored pixels
    valid = torch.nonzero(labels != 255).squeeze(1)
    assign = torch.randint(0, k, (valid.numel(), ), generator=g)
    targets = torch.full_like(labels, -1)
    targets[valid] = similarity_column(labels[valid], assign, c)
    weights = torch.rand(3, n, generator=g, dtype=dtype)
    return emb, protos, labels, valid, targets, weights


def reference(emb, protos, targets, c, k, temperature):
    sims = emb @ protos.T
    class_scores = sims.view(-1, k, c).max(dim=1).values
    ppc = PixelPrototypeContrastLoss(temperature=temperature).per_pixel(sims, targets)
    ppd = PixelPrototypeDistanceLoss().per_pixel(sims, targets)
    return class_scores, ppc, ppd


@pytest.mark.parametrize('path', ['fused', 'streamed'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('c,k', [(5, 3), (30, 10)])  # 30 x 10 = 300 > 255 columns
@pytest.mark.parametrize('temperature', [1.0, 0.1])
def test_fast_paths_equal_the_reference_terms(path, dtype, c, k, temperature):
    n, d = 64, 16
    emb, protos, labels, valid, targets, weights = make_inputs(c, k, n, d, dtype)
    outs = []
    for use_path in (path, 'reference'):
        x = emb.clone().requires_grad_()
        if use_path == 'reference':
            scores, ppc, ppd = reference(x, protos, targets, c, k, temperature)
        else:
            cls = FusedScores if path == 'fused' else StreamedScores
            extra = dict(chunk=13) if path == 'streamed' else {}
            impl = cls(x, protos, labels, valid, c, k, 1.0 / temperature, **extra)
            scores, terms = impl.terms(targets)
            ppc, ppd = terms['ppc'], terms['ppd']
            own = (x.detach() @ protos.T).view(-1, k, c)[valid, :, labels[valid]]
            torch.testing.assert_close(impl.own, own)
        total = (weights[0][:, None] * scores).sum() + (weights[1] * ppc).sum() + \
            (weights[2] * ppd).sum()
        total.backward()
        outs.append((scores, ppc, ppd, x.grad))
    # The PPC/PPD terms are computed in fp32 on every path (fp64 inputs too).
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-5, atol=2e-6)
    for a, b in zip(*outs):  # class scores, PPC, PPD, gradient
        torch.testing.assert_close(a.to(b.dtype), b, **tol)
    assert (outs[0][1][labels == 255] == 0).all() and (outs[0][2][labels == 255] == 0).all()


def test_fused_path_has_no_graph_break_for_torch_compile():
    # What MMEngine's compile=True needs of the fused path: dynamo traces the scores step,
    # the fused autograd function included, as one graph (no host sync such as .tolist()).
    c, k = 5, 3
    emb, protos, labels, valid, targets, _ = make_inputs(c, k, 64, 8, torch.float32)
    emb.requires_grad_()

    def scores_step(emb, protos, labels, valid, targets):
        scores = FusedScores(emb, protos, labels, valid, c, k, 10.0)
        class_scores, terms = scores.terms(targets)
        return class_scores.sum() + terms['ppc'].sum() + terms['ppd'].sum(), scores.own

    explained = torch._dynamo.explain(scores_step)(emb, protos, labels, valid, targets)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize('temperature,columns,shifted', [(1.0, 1500, False), (0.1, 8470, False),
                                                         (0.0125, 1500, True)])
def test_exp_shift_is_decided_by_temperature_and_columns(temperature, columns, shifted):
    from mmseg_proto.models.utils.fused_prototype_scores import needs_shift
    assert needs_shift(1.0 / temperature, columns) is shifted
