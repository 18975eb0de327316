"""ProtoHead refuses bad configs with one message naming the key, and fine-tunes from a
checkpoint with another class set when asked to."""
import pytest
import torch
from conftest import make_head
from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint


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


@pytest.mark.parametrize('value', [float('inf'), float('nan')])
def test_huber_delta_must_be_finite(value):
    # inf would make every huberized similarity 1: each class score the same constant.
    with pytest.raises(ValueError, match=rf'ProtoHead: invalid huber_delta={value!r} '
                                         r'\(must be a finite number > 0'):
        make_head(distance='huberized', huber_delta=value)
    assert make_head(distance='huberized', huber_delta=1e3).huber_delta == 1e3


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
