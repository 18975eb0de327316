"""Every option check of ProtoHead and PrototypeUpdateHook (one message naming every key at
fault, combinations included), and fine-tuning from a checkpoint with another class set when
asked to."""
import re

import pytest
import torch
from conftest import make_head
from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint

from mmseg_proto.engine.hooks import PrototypeUpdateHook


@pytest.mark.parametrize('key,value', [
    ('num_classes', 1), ('num_classes', 0), ('num_classes', 2.0), ('num_classes', '4'),
    ('momentum', '0.9'), ('momentum', None), ('momentum', True), ('momentum', 1.5),
    ('sinkhorn_epsilon', '0.05'), ('sinkhorn_epsilon', 0), ('sinkhorn_iters', 3.0),
    ('sinkhorn_iters', '3'), ('num_prototypes', True), ('num_prototypes', '10'),
    ('embed_dims', 8.0), ('embed_dims', 0), ('projection', 'conv'),
    ('sync_sinkhorn', 'yes'), ('fused_losses', 1), ('similarity_chunk', 0),
    ('similarity_chunk', 64.0), ('reference_width_norm', None), ('load_prototypes', 'no'),
    ('huber_delta', float('inf')), ('huber_delta', float('nan')), ('huber_delta', -1.0),
    ('huber_delta', True), pytest.param('huber_delta', 10**400, id='huber_delta-10**400'),
])
def test_bad_option_gets_a_proto_head_message_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf'ProtoHead: invalid {key}=') as err:
        make_head(**{key: value})
    assert 'must be' in str(err.value)


@pytest.mark.parametrize('value', [float('inf'), float('nan'), 2.001, 16.0, 1e3, 1e6])
def test_huber_delta_must_be_in_its_useful_range(value):
    """Issue 28: 1e3 and 1e6 were accepted and collapsed the class scores as inf did."""
    with pytest.raises(ValueError, match=rf'ProtoHead: invalid huber_delta={value!r} '
                                         r'\(must be a finite number in \(0, 2\], e\.g\. 1\.0: '
                                         'distances between unit vectors are at most 2'):
        make_head(distance='huberized', huber_delta=value)
    for fine in (1e-3, 1.0, 2, 2.0):
        assert make_head(distance='huberized', huber_delta=fine).scorer.huber_delta == fine


def test_above_two_the_huberized_distance_is_a_shrunk_cosine_whose_scores_collapse():
    """Why the bound is 2, against hand computations: beyond it every distance between unit
    vectors is on the quadratic branch, 1 - s = d^2 / (2 delta) = (1 - cos) / delta, and the
    LayerNorm over classes flattens what is left (logit spread measured at 1e3 and 1e6)."""
    from mmseg_proto.models.utils.prototype_similarity import similarity_from_cosine
    cos = torch.linspace(-1, 1, 101)
    for delta in (2.0, 3.0, 1e3):
        s = similarity_from_cosine(cos, 'huberized', delta)
        torch.testing.assert_close(s, 1 - (1 - cos) / delta, atol=1e-6, rtol=0)
    # Below 2 the linear branch is used: at cos = -1 (d = 2), delta 1 gives 2 - 1/2.
    assert similarity_from_cosine(torch.tensor([-1.0]), 'huberized', 1.0).item() == \
        pytest.approx(1 - 1.5)
    torch.manual_seed(0)
    head = make_head(num_classes=11, channels=32, num_prototypes=10, distance='huberized')
    cos = torch.rand(2, 8, 8, 11, 10) * 2 - 1  # cosines of unit vectors, any layout
    spread = {}
    for delta in (1.0, 1e3, 1e6):
        sim = similarity_from_cosine(cos, 'huberized', delta).amax(-1)
        spread[delta] = head.mask_norm(sim).std(-1).mean().item()
    assert spread[1.0] > 0.9 and spread[1e3] < 0.1 * spread[1.0] and spread[1e6] < 1e-3


def test_one_class_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match='num_classes=2'):
        make_head(num_classes=1)


@pytest.mark.parametrize('decoder', [
    dict(type='ResNetV1c', depth=18),  # a backbone
    dict(type='CrossEntropyLoss'),  # a loss
])
def test_decoder_that_is_not_a_decode_head(decoder):
    with pytest.raises(TypeError, match='is not an MMSeg decode head.*BaseDecodeHead'):
        make_head(decoder=decoder)

@pytest.mark.parametrize('kwargs,match', [
    (dict(num_prototypes=0), 'num_prototypes'),
    (dict(momentum=1.5), 'momentum'),
    (dict(sinkhorn_epsilon=0.0), 'sinkhorn_epsilon'),
    (dict(sinkhorn_iters=0), 'sinkhorn_iters'),
    (dict(projection='conv3'), 'projection'),
    (dict(embed_dims=16), 'embed_dims=16'),
    (dict(decoder=dict(type='NoSuchHead')), 'NoSuchHead'),
    (dict(loss_decode=dict(type='PixelPrototypeContrastLoss')), 'pixel loss'),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        make_head(**kwargs)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_prototypes=2.5), 'num_prototypes'),
    (dict(num_prototypes=-3), 'num_prototypes'),
    (dict(momentum=-0.1), 'momentum'),
    (dict(momentum=float('nan')), 'momentum'),
    (dict(sinkhorn_epsilon=-0.05), 'sinkhorn_epsilon'),
    (dict(sinkhorn_epsilon=float('nan')), 'sinkhorn_epsilon'),
    (dict(sinkhorn_iters=-1), 'sinkhorn_iters'),
    (dict(decoder='FCNHead'), 'decoder'),
    (dict(decoder=dict(in_channels=8)), 'decoder'),
    (dict(out_channels=1), 'out_channels=1'),
    (dict(out_channels=3), 'out_channels=3'),
])
def test_more_bad_config_values(kwargs, match):
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        make_head(**kwargs)


def test_all_config_problems_reported_at_once():
    with pytest.raises(ValueError) as err:
        make_head(num_prototypes=0, momentum=2.0, sinkhorn_epsilon=0.0)
    for key in ('num_prototypes', 'momentum', 'sinkhorn_epsilon'):
        assert key in str(err.value)


def test_distance_options_are_checked():
    with pytest.raises(ValueError, match=r"distance='l1' \(must be one of"):
        make_head(distance='l1')
    with pytest.raises(ValueError, match='huber_delta=0'):
        make_head(distance='huberized', huber_delta=0)


# ----------------------------------------------------------- combinations --

def test_similarity_chunk_needs_standard_losses_and_the_cosine():
    with pytest.raises(ValueError, match='similarity_chunk'):
        make_head(similarity_chunk=0)
    with pytest.raises(ValueError, match='similarity_chunk=64 needs the standard'):
        make_head(similarity_chunk=64, loss_decode=[
            dict(type='CrossEntropyLoss'),
            dict(type='PixelPrototypeContrastLoss'),
            dict(type='PixelPrototypeContrastLoss', loss_name='loss_ppc2')])
    with pytest.raises(ValueError, match="needs distance='cosine'"):
        make_head(distance='standard', similarity_chunk=64)


def test_embed_dims_must_match_the_decoder_without_projection():
    with pytest.raises(ValueError, match="embed_dims=16 does not match the decoder's "
                                         "channels=8; with projection='none'"):
        make_head(embed_dims=16)
    assert make_head(embed_dims=16, projection='linear').prototypes.shape[-1] == 16


# ------------------------------------------------------ PrototypeUpdateHook --

@pytest.mark.parametrize('kwargs, shown', [
    (dict(log_interval=-1), 'log_interval=-1'),
    (dict(reseed_interval=-1), 'reseed_interval=-1'),
    (dict(reseed_min_share=0), 'reseed_min_share=0'),
    (dict(reseed_interval=True), 'reseed_interval=True'),
    (dict(reseed_interval=2.0), 'reseed_interval=2.0'),
    (dict(reseed_min_share=True), 'reseed_min_share=True'),
    (dict(reseed_min_share=float('nan')), 'reseed_min_share=nan'),
    (dict(log_interval=2.5), 'log_interval=2.5'),
    (dict(log_interval=True), 'log_interval=True'),
    (dict(log_interval=None), 'log_interval=None'),
    (dict(per_class_entropy='no'), "per_class_entropy='no'"),
    (dict(per_class_entropy=1), 'per_class_entropy=1'),
])
def test_hook_option_types_are_checked_as_protohead_does(kwargs, shown):
    with pytest.raises(ValueError, match=r'^PrototypeUpdateHook: invalid '
                       + re.escape(shown) + r' \(must be '):
        PrototypeUpdateHook(**kwargs)


def test_every_bad_hook_option_is_named_in_one_message():
    with pytest.raises(ValueError) as err:
        PrototypeUpdateHook(log_interval=None, per_class_entropy='no')
    assert str(err.value) == (
        'PrototypeUpdateHook: invalid log_interval=None (must be an integer '
        ">= 0; 0 disables logging); per_class_entropy='no' (must be True or "
        'False)')
    with pytest.raises(ValueError, match=r'reseed_interval=-1 \(must be an integer >= 0'):
        PrototypeUpdateHook(reseed_interval=-1)
    with pytest.raises(ValueError, match=r'reseed_min_share=0 \(must be a number in \(0, 1\]'):
        PrototypeUpdateHook(reseed_min_share=0)
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=3,
                               reseed_min_share=1, per_class_entropy=False)
    assert (hook.log_interval, hook.reseed_interval, hook.reseed_min_share,
            hook.per_class_entropy) == (0, 3, 1.0, False)


def test_fine_tune_to_another_class_set(tmp_path):
    torch.manual_seed(0)
    source = make_head(num_classes=4, num_prototypes=3)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    path = str(tmp_path / 'four_classes.pth')
    save_checkpoint(source.state_dict(), path)

    target = make_head(num_classes=6, num_prototypes=2)
    with pytest.raises(RuntimeError, match='load_prototypes=False'):
        load_checkpoint(target, path, strict=False)

    torch.manual_seed(1)
    target = make_head(num_classes=6, num_prototypes=2, load_prototypes=False)
    fresh = target.prototypes.clone()
    load_checkpoint(target, path, strict=False)  # what `load_from` does
    assert torch.equal(target.prototypes, fresh)
    assert torch.equal(target.feat_norm.weight, source.feat_norm.weight)
    assert torch.equal(target.mask_norm.weight, torch.ones(6))  # mismatched: kept
    for name, value in source.decoder.state_dict().items():
        assert torch.equal(target.decoder.state_dict()[name], value), name
