"""ProtoHead off the fp32 main path: inference under CPU bf16 autocast (the slab loop's
autocast branch) against fp32, and ``load_prototypes=False`` with a strict load of another
model's state dict."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_head
from mmengine.config import ConfigDict
from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict

# bf16 keeps 8 significant bits (relative error 2^-9 per rounding): cosines of unit vectors
# (|cos| <= 1) through a 12-term dot product stay within 2e-2 (5e-3 to 8e-3 seen). The
# LayerNorm over classes divides by the class scores' spread (a few hundredths at some pixels),
# which multiplies those errors ~20 times in the logits (0.05 to 0.12 seen, of logits up to 2).
COS_ATOL = 2e-2
LOGIT_ATOL = 2.5e-1


def conv_head(**kwargs):
    """A head whose decoder and projection run convolutions (bf16 under autocast), with
    K = 4 prototypes per class: the inference loop takes 3 slabs after the first."""
    decoder = dict(type='FCNHead', in_channels=8, channels=16, num_convs=1, kernel_size=3,
                   concat_input=False, dropout_ratio=0.0, in_index=0)
    head = make_head(num_classes=5, channels=8, num_prototypes=4, decoder=decoder,
                     projection='linear', embed_dims=12, **kwargs)
    return head.eval()


def fp32_reference(head, x):
    """Max cosine per class, seg logits and anomaly map in fp32, by the full
    (pixels x C*K) similarity matrix (the training path), not the slab loop."""
    with torch.no_grad():
        emb = head.embed(x)
        cos = torch.einsum('bhwd,ckd->bhwck', emb, head.prototypes).amax(-1)
    with torch.enable_grad():  # the training forward: the whole similarity matrix
        logits = head(x).detach()
    return cos, logits, 1.0 - cos.amax(-1)


@pytest.mark.parametrize('distance', ['cosine', 'huberized'])
def test_bf16_autocast_inference_matches_fp32(distance, seeded):
    head = conv_head(distance=distance, huber_delta=0.5)
    x = [torch.randn(2, 8, 9, 7)]
    with torch.no_grad():  # spread the prototypes over the embeddings: every slab matters
        emb = head.embed(x).reshape(-1, 12)
        head.prototypes.copy_(F.normalize(
            emb[torch.randperm(emb.shape[0])[:20]] + 0.3 * torch.randn(20, 12),
            dim=-1).view(5, 4, 12))
    cos32, logits32, anomaly32 = fp32_reference(head, x)
    per_slab = torch.einsum('bhwd,ckd->bhwck', head.embed(x), head.prototypes).argmax(-1)
    assert all((per_slab == k).any() for k in range(4))  # each slab gives some maxima
    metas = [dict(img_shape=(9, 7), ori_shape=(9, 7), pad_shape=(9, 7))] * 2
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        cos16 = head.class_cosines(x)
        logits16 = head(x)
        stacked16 = head.predict_with_anomaly(x, metas, ConfigDict())
    assert cos16.dtype == torch.bfloat16  # autocast ran: the loop's autocast branch
    torch.testing.assert_close(cos16.float(), cos32, atol=COS_ATOL, rtol=0)
    torch.testing.assert_close(logits16.float(), logits32, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(stacked16[:, 5].float(), anomaly32, atol=COS_ATOL, rtol=0)
    torch.testing.assert_close(stacked16[:, :5].float(), logits32, atol=LOGIT_ATOL, rtol=0)
    # The bound is tight enough to matter: a max over one slab fewer is well outside it.
    cos_fewer = torch.einsum('bhwd,ckd->bhwck', head.embed(x), head.prototypes[:, :3])
    assert (cos_fewer.amax(-1) - cos32).abs().max() > 5 * COS_ATOL


def another_model_state(num_prototypes):
    torch.manual_seed(7)
    source = make_head(num_classes=4, num_prototypes=num_prototypes)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.rand_like(p))
    return source.state_dict()


@pytest.mark.parametrize('num_prototypes', [3, 5], ids=['same-K', 'another-K'])
@pytest.mark.parametrize('loader', ['torch', 'mmengine'])
def test_load_prototypes_false_strict_load_keeps_the_fresh_prototypes(num_prototypes, loader):
    state = another_model_state(num_prototypes)
    torch.manual_seed(1)
    target = make_head(num_classes=4, num_prototypes=3, load_prototypes=False)
    model = torch.nn.ModuleDict(dict(decode_head=target))  # keys as in a segmentor
    fresh = target.prototypes.clone()
    assert not torch.equal(state['prototypes'][:, :3], fresh)
    full = {f'decode_head.{k}': v for k, v in state.items()}
    if loader == 'torch':
        result = model.load_state_dict(full, strict=True)
        assert result.missing_keys == [] and result.unexpected_keys == []
    else:  # what mmengine's load_checkpoint(..., strict=True) does
        mmengine_load_state_dict(model, full, strict=True)
    assert torch.equal(target.prototypes, fresh)
    for name, value in state.items():
        if name != 'prototypes':
            assert torch.equal(target.state_dict()[name], value), name
    assert target.state_dict()['prototypes'].data_ptr() != state['prototypes'].data_ptr()
