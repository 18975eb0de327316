"""PrototypeScorer: the path it builds from a head's options, inference against training
scores, and every fast training path (fused, streamed) against the one reference of the
per-pixel PPC and PPD terms (the loss modules' ``per_pixel``) and of the class scores (max
over K): values and gradients, fp32 and fp64, with ignored pixels and C*K > 255; inside a
head, the fused and streamed paths against the eager one."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_head, make_samples, take_statistics

from mmseg_proto.models.losses import (PixelPrototypeContrastLoss,
                                       PixelPrototypeDistanceLoss)
from mmseg_proto.models.utils import FusedPrototypeScores, PrototypeScorer
from mmseg_proto.models.utils.prototype_similarity import similarity_column
from mmseg_proto.models.utils import prototype_scorer as scorer_module
from mmseg_proto.models.utils.prototype_scorer import FusedScores, StreamedScores


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
            impl = cls(x, protos, labels, 255, c, k, 1.0 / temperature, **extra)
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

    def scores_step(emb, protos, labels, targets):
        scores = FusedScores(emb, protos, labels, 255, c, k, 10.0)
        class_scores, terms = scores.terms(targets)
        return class_scores.sum() + terms['ppc'].sum() + terms['ppd'].sum(), scores.own

    # The labelled pixels are found with nonzero (a data-dependent size, as in any
    # segmentation loss with ignored pixels): captured as a dynamic shape, not a break.
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = torch._dynamo.explain(scores_step)(emb, protos, labels, targets)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize('temperature,columns,shifted', [(1.0, 1500, False), (0.1, 8470, False),
                                                         (0.0125, 1500, True)])
def test_exp_shift_is_decided_by_temperature_and_columns(temperature, columns, shifted):
    from mmseg_proto.models.utils.autograd_functions import needs_shift
    assert needs_shift(1.0 / temperature, columns) is shifted


# ------------------------------------------------------------- the scorer --

STANDARD = [PixelPrototypeContrastLoss(temperature=0.1), PixelPrototypeDistanceLoss()]


@pytest.mark.parametrize('options,path', [
    (dict(), 'fused'),
    (dict(fused_losses=False), 'eager'),
    (dict(distance='huberized'), 'eager'),  # the fused path computes the cosine only
    (dict(similarity_chunk=64), 'streamed'),
    (dict(similarity_chunk=64, fused_losses=False), 'streamed'),
    (dict(losses=STANDARD + [PixelPrototypeDistanceLoss()]), 'eager'),  # not standard
])
def test_path_is_chosen_once_from_the_options(options, path):
    options = dict(dict(distance='cosine', huber_delta=1.0, fused_losses=True,
                        similarity_chunk=None, losses=STANDARD), **options)
    scorer = PrototypeScorer.from_options(options['distance'], options['huber_delta'],
                                          options['fused_losses'],
                                          options['similarity_chunk'], options['losses'])
    assert scorer.path == path and scorer.distance == options['distance']
    assert scorer.inv_temperature == 10.0  # the PPC's temperature, folded into the scores
    assert scorer.chunk == options['similarity_chunk']


def test_a_chunk_goes_with_the_streamed_path_only():
    with pytest.raises(ValueError, match="a chunk goes with 'streamed' only"):
        PrototypeScorer(path='fused', chunk=8)
    with pytest.raises(ValueError, match='one of'):
        PrototypeScorer(path='slab')


@pytest.mark.parametrize('distance', ['cosine', 'standard', 'huberized'])
def test_inference_slab_loop_equals_the_whole_matrix(distance):
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(2, 5, 4, 8, generator=g), dim=-1)
    protos = F.normalize(torch.randn(6, 3, 8, generator=g), dim=-1)  # C = 6, K = 3
    scorer = PrototypeScorer(distance, huber_delta=0.5)
    by_hand = torch.einsum('bhwd,ckd->bhwck', emb, protos)  # buffer order (c, k)
    torch.testing.assert_close(scorer.cosines(emb, protos), by_hand)
    torch.testing.assert_close(scorer.class_cosines(emb, protos), by_hand.amax(-1))
    torch.testing.assert_close(scorer.class_scores(emb, protos),
                               scorer.similarity(by_hand.amax(-1)))
    assert not scorer.class_cosines(emb.requires_grad_(), protos).requires_grad


# ------------------------------------------------ inference: slabs and blocks --

def independent_class_cosines(emb, protos):
    """(..., C) max over K of the cosines, straight from the (C, K, D) buffer's order."""
    c, k, d = protos.shape
    return F.linear(emb, protos.reshape(c * k, d)).unflatten(-1, (c, k)).amax(-1)


@pytest.mark.parametrize('inference', ['slabs', 'blocks', None])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('c,k,n', [(6, 3, 40), (30, 10, 1001)])  # 300 > 255 columns
def test_inference_paths_equal_the_independent_reference(inference, dtype, c, k, n,
                                                         monkeypatch):
    # 1001 pixels: 3 blocks of 256 (the smallest block) and a last one of 233.
    monkeypatch.setattr(scorer_module, 'BLOCK_BYTES', 1)
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(n, 16, generator=g, dtype=dtype), dim=-1)
    protos = F.normalize(torch.randn(c, k, 16, generator=g, dtype=dtype), dim=-1)
    got = PrototypeScorer(inference=inference).class_cosines(emb.view(1, n, 16), protos)
    want = independent_class_cosines(emb, protos)
    assert got.shape == (1, n, c) and got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0], want, rtol=0, atol=16 * eps)  # GEMM rounding only
    assert torch.equal(got[0].argmax(-1), want.argmax(-1))


def test_inference_blocks_take_the_max_of_each_class_exactly():
    # Prototype (c, k) = e_{c*K+k} scaled so that its cosine with pixel p is distinct:
    # each class's max is one exact value, which a wrong slab order would misplace.
    c, k, n = 7, 4, 300
    protos = torch.eye(c * k).view(c, k, c * k)
    emb = torch.rand(n, c * k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for inference in ('slabs', 'blocks'):
        got = PrototypeScorer(inference=inference).class_cosines(emb, protos)
        assert torch.equal(got, emb.view(n, c, k).amax(-1)), inference


def test_inference_block_is_bounded_and_empty_inputs_work():
    assert scorer_module.pixel_block(110, 4) == scorer_module.BLOCK_BYTES // 440
    assert scorer_module.pixel_block(8470, 4) == scorer_module.MIN_BLOCK_PIXELS
    emb, protos = torch.zeros(0, 8), F.normalize(torch.randn(3, 2, 8), dim=-1)
    for inference in ('slabs', 'blocks'):
        assert PrototypeScorer(inference=inference).class_cosines(emb, protos).shape == (0, 3)


@pytest.mark.parametrize('device,threads,path', [
    ('cpu', 1, 'blocks'),  # measured: 1.1-1.9x at every shape
    ('cpu', 2, 'blocks'),  # 1.23-1.46x on a quiet 2-core Xeon (docs/benchmarks.md)
    ('cpu', 4, 'slabs'),  # not measured
    ('cuda', 1, 'slabs'),  # not measured
    ('meta', 1, 'slabs'),
])
def test_inference_path_is_chosen_from_the_shapes(device, threads, path, monkeypatch):
    monkeypatch.setattr(torch, 'get_num_threads', lambda: threads)
    for c, k, d in [(11, 10, 256), (150, 10, 256), (150, 10, 768), (847, 10, 256)]:
        assert scorer_module.inference_path(c, k, d, torch.device(device)) == path
        assert scorer_module.inference_path(c, k, d, torch.device(device), threads) == path
        assert PrototypeScorer().inference_path(c, k, d, torch.device(device)) == path
        for forced in ('slabs', 'blocks'):
            assert PrototypeScorer(inference=forced).inference_path(
                c, k, d, torch.device(device)) == forced
    with pytest.raises(ValueError, match='inference='):
        PrototypeScorer(inference='whole')


@pytest.mark.parametrize('inference', ['slabs', 'blocks'])
def test_inference_paths_trace_and_export_for_any_image_size(inference, tmp_path):
    # A pixel-block loop would be unrolled for the traced size: while exporting, the slabs.
    c, k = 30, 10
    protos = F.normalize(torch.randn(c, k, 8), dim=-1)
    scorer = PrototypeScorer(inference=inference)

    class Scores(torch.nn.Module):

        def forward(self, emb):
            return scorer.class_cosines(emb, protos)

    small, large = (F.normalize(torch.randn(1, h, 9, 8), dim=-1) for h in (3, 70))
    traced = torch.jit.trace(Scores(), small)
    torch.testing.assert_close(traced(large), independent_class_cosines(large, protos))
    ort = pytest.importorskip('onnxruntime')
    path = str(tmp_path / 'scores.onnx')
    torch.onnx.export(Scores(), (small, ), path, input_names=['emb'], dynamo=False,
                      dynamic_axes={'emb': {1: 'h'}})
    got = ort.InferenceSession(path).run(None, {'emb': large.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), independent_class_cosines(large, protos))


@pytest.mark.parametrize('inference', ['slabs', 'blocks'])
def test_inference_paths_under_autocast(inference):
    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(600, 16, generator=g), dim=-1)
    protos = F.normalize(torch.randn(30, 10, 16, generator=g), dim=-1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = PrototypeScorer(inference=inference).class_cosines(emb, protos)
        want = independent_class_cosines(emb, protos)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_cosines_keep_the_buffer_order():
    protos = torch.eye(4).view(2, 2, 4)  # prototype (c, k) = unit vector 2c + k
    cos = PrototypeScorer.cosines(torch.eye(4), protos)  # (4 pixels, C, K)
    for pixel in range(4):
        assert cos[pixel].flatten().argmax() == pixel


# ------------------------------------------- fused and streamed in a head --

def feats(b=2, c=8, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g)]


def train_once(head, labels):
    """Losses, gradient of the input and statistics of one training batch."""
    x = [t.clone().requires_grad_() for t in feats()]
    losses = head.loss(x, make_samples(labels), None)
    sum(v for n, v in losses.items() if n.startswith('loss')).backward()
    return losses, x[0].grad, take_statistics(head)


def assert_same_training(a, b):
    """Two heads' :func:`train_once` agree up to float rounding."""
    for key in ('loss_ce', 'loss_ppc', 'loss_ppd', 'acc_seg'):
        torch.testing.assert_close(a[0][key], b[0][key])
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[2].sums, b[2].sums)
    torch.testing.assert_close(a[2].counts, b[2].counts)


def prototype_losses(temperature):
    """CE + PPC + PPD with non-default weights and the given temperature."""
    return [
        dict(type='CrossEntropyLoss', loss_weight=1.0),
        dict(type='PixelPrototypeContrastLoss', loss_weight=0.3,
             temperature=temperature),
        dict(type='PixelPrototypeDistanceLoss', loss_weight=0.2),
    ]


# 0.01: exp(s / T) would overflow unshifted, the fused path shifts.
@pytest.mark.parametrize('temperature', [1.0, 0.5, 0.1, 0.01])
def test_fused_losses_equal_unfused_values_and_gradients(temperature):
    losses_cfg = prototype_losses(temperature)
    heads = {}
    for fused in (True, False):
        torch.manual_seed(0)
        heads[fused] = make_head(num_classes=5, num_prototypes=3,
                                 fused_losses=fused, loss_decode=losses_cfg)
    assert heads[True].scorer.path == 'fused' and heads[False].scorer.path == 'eager'
    heads[False].load_state_dict(heads[True].state_dict())
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (2, 12, 10), generator=g)
    labels[1, :4] = 255
    assert_same_training(*(train_once(head, labels) for head in heads.values()))


def test_fused_class_score_ties_share_the_gradient():
    c, k = 3, 2
    protos = F.normalize(torch.randn(k * c, 4), dim=1)
    protos[c:] = protos[:c]  # prototype 1 of every class duplicates 0
    emb = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    sims = (emb @ protos.T).detach()
    scores, _, _ = FusedPrototypeScores.apply(emb, sims.clone(), protos,
                                              torch.full((5, ), -1), c, k,
                                              1.0)
    scores.sum().backward()
    # A tied max passes on the max's gradient once (whichever copy takes
    # it), not once per tied copy.
    torch.testing.assert_close(emb.grad, protos[:c].sum(0).expand(5, 4))
    torch.testing.assert_close(scores, sims[:, :c])


@pytest.mark.parametrize('temperature', [0.1, 0.005])
def test_fused_scores_match_autograd_reference(temperature):
    # T = 0.005: exp(s / T) = exp(200) overflows fp32 unless shifted.
    torch.manual_seed(0)
    c, k, n = 4, 3, 40
    protos = F.normalize(torch.randn(k * c, 6, dtype=torch.float64), dim=1)
    emb = F.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    emb[:k * c] = protos  # similarities of exactly 1
    targets = torch.randint(0, k * c, (n, ))
    targets[::5] = -1
    weights = torch.rand(3, n, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        x = emb.clone().float().requires_grad_()
        p = protos.float()
        if fused:
            scaled_p = p / temperature
            scaled = (x @ scaled_p.T).detach()
            scores, ppc, ppd = FusedPrototypeScores.apply(
                x, scaled, scaled_p, targets, c, k, 1.0 / temperature)
        else:
            sims = x @ p.T
            scores = sims.view(n, k, c).max(dim=1).values
            valid = targets >= 0
            ppc = F.cross_entropy(sims / temperature, targets.clamp(min=0),
                                  reduction='none') * valid
            target_sim = sims.gather(1, targets.clamp(min=0)[:, None])[:, 0]
            ppd = (1 - target_sim)**2 * valid
        assert torch.isfinite(ppc).all()
        total = sum((w.float()[:, None] * t if t.dim() == 2 else
                     w.float() * t).sum()
                    for w, t in zip(weights, (scores, ppc, ppd)))
        total.backward()
        grads.append((scores, ppc, ppd, x.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_backward_twice_is_refused():
    head = make_head(num_classes=4, num_prototypes=3)
    x = [t.requires_grad_() for t in feats()]
    labels = torch.randint(0, 4, (2, 6, 5))
    losses = head.loss(x, make_samples(labels), None)
    losses['loss_ppc'].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='fused_losses=False'):
        losses['loss_ppc'].backward()


def test_fused_losses_all_ignored_batch_is_finite():
    head = make_head(num_classes=4, num_prototypes=3)
    x = [t.requires_grad_() for t in feats()]
    labels = torch.full((2, 6, 5), 255)
    losses = head.loss(x, make_samples(labels), None)
    total = sum(v for n, v in losses.items() if n.startswith('loss'))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(x[0].grad).all()
    assert losses['loss_ppc'] == 0 and losses['loss_ppd'] == 0


@pytest.mark.parametrize('temperature', [1.0, 0.5])
def test_streamed_similarities_equal_fused_values_and_gradients(temperature):
    losses_cfg = prototype_losses(temperature)
    heads = {}
    for chunk in (None, 7):  # 7 pixels per block: many blocks, a ragged end
        torch.manual_seed(0)
        heads[chunk] = make_head(num_classes=5, num_prototypes=3,
                                 similarity_chunk=chunk,
                                 loss_decode=losses_cfg)
    heads[7].load_state_dict(heads[None].state_dict())
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (2, 12, 10), generator=g)
    labels[0, :3] = 255
    assert_same_training(*(train_once(head, labels) for head in heads.values()))
