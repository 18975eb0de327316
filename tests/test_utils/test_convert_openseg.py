"""Conversion of the authors' openseg checkpoint, checked on the golden pair.

The reference data (/work/shared/data/protoseg_reference, see its README)
describes the authors' HRNet-W48 Cityscapes model: its state-dict keys and
shapes, and the output of their code for a deterministic state dict on a
fixed input. We rebuild that state dict, save it as their training code does
(nested under ``state_dict``, ``module.`` prefix), convert it with the tool,
load it into the model of the shipped config and compare outputs.
"""
import os
import os.path as osp
import sys
import zlib
from typing import Dict

import numpy as np
import pytest
import torch

from conftest import REPO

REF_DIR = os.environ.get('PROTOSEG_REFERENCE_DIR',
                         '/work/shared/data/protoseg_reference')
TSV = osp.join(REF_DIR, 'reference_state_dict_keys.tsv')
CONFIG = osp.join(
    REPO, 'configs/protoseg/cityscapes/'
    'protoseg_hrnet-w48-authors_4xb2-80k_cityscapes-512x1024.py')
SEED = 20220601
TOLERANCE = 1e-4

pytestmark = pytest.mark.skipif(
    not osp.isfile(TSV), reason=f'reference data not found in {REF_DIR}')


def reference_state_dict() -> Dict[str, torch.Tensor]:
    """The deterministic authors' state dict, as the reference README says."""
    state = {}
    for line in open(TSV).read().splitlines():
        key, shape_text = line.split('\t')
        shape = tuple(
            int(s) for s in shape_text.strip('()').split(',') if s.strip())
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()) ^ SEED)
        if key.endswith('num_batches_tracked'):
            value = torch.zeros(shape, dtype=torch.int64)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = torch.randn(shape, generator=gen) * fan_in**-0.5
        elif key.endswith(('running_var', 'weight')):
            value = 0.5 + torch.rand(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) * 0.1
        state[key] = value
    for key in state:
        if key.startswith('proj_head.mlp2.'):
            state[key] = state['proj_head.proj.' +
                               key[len('proj_head.mlp2.'):]]
    return state


@pytest.fixture(scope='module')
def ref_state() -> Dict[str, torch.Tensor]:
    return reference_state_dict()


@pytest.fixture(scope='module')
def model():
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmseg.registry import MODELS
    cfg = Config.fromfile(CONFIG)
    return revert_sync_batchnorm(MODELS.build(cfg.model))


@pytest.fixture(scope='module')
def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_config_is_the_authors_network(model):
    from mmseg_proto.models.backbones.hrnet_ref_align import (
        HRModuleRefAlign, HRNetRefAlign)
    assert type(model.backbone) is HRNetRefAlign
    assert all(type(m) is HRModuleRefAlign for m in model.backbone.stage4)
    head = model.decode_head
    assert head.reference_width_norm and head.projection_type == 'mlp'
    assert tuple(head.prototypes.shape) == (19, 10, 720)
    assert head.decoder.align_corners and head.align_corners
    assert head.decoder.convs[0].conv.kernel_size == (3, 3)


def test_golden_output_through_cli(ref_state, model, tmp_path, monkeypatch, capsys):
    """Convert with the command (its ``main`` on ``sys.argv``, in this process), load like a
    runner, match the authors' output."""
    import importlib.util

    from mmengine.runner import load_checkpoint
    src, dst = tmp_path / 'openseg.pth', tmp_path / 'mmseg.pth'
    torch.save(
        dict(
            state_dict={'module.' + k: v
                        for k, v in ref_state.items()},
            iters=80000), src)
    script = osp.join(REPO, 'tools/model_converters/convert_openseg_protoseg.py')
    spec = importlib.util.spec_from_file_location('convert_openseg_protoseg_tool', script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, 'argv', [script, str(src), str(dst), '--config', CONFIG])
    assert tool.main() == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert 'read 1850 openseg keys (71.17M parameters)' in stdout
    assert 'wrote 1845 MMSeg keys' in stdout
    assert 'dropped: 4 alias keys' in stdout

    checkpoint = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(checkpoint) == {'state_dict', 'meta'}
    assert len(checkpoint['meta']['dataset_meta']['classes']) == 19
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    model.eval()
    inputs = torch.from_numpy(np.load(osp.join(REF_DIR, 'golden_input.npy')))
    golden = torch.from_numpy(np.load(osp.join(REF_DIR,
                                               'golden_output.npy')))
    with torch.no_grad():
        out = model(inputs, mode='tensor')
    assert out.shape == golden.shape == (1, 19, 32, 64)
    diff = (out - golden).abs().max().item()
    print(f'max abs diff to the golden output: {diff:.3g}')
    assert diff <= TOLERANCE, f'max abs diff {diff:.3g} > {TOLERANCE}'

    # MMSeg's own HRNet fusion (align_corners=False) is measurably different:
    # the reason HRNetRefAlign exists.
    from mmseg.models.backbones.hrnet import HRModule
    from mmseg_proto.models.backbones.hrnet_ref_align import HRModuleRefAlign
    stages = [model.backbone.stage2, model.backbone.stage3,
              model.backbone.stage4]
    try:
        for module in (m for stage in stages for m in stage):
            module.__class__ = HRModule
        with torch.no_grad():
            stock = model(inputs, mode='tensor')
    finally:
        for module in (m for stage in stages for m in stage):
            module.__class__ = HRModuleRefAlign
    stock_diff = (stock - golden).abs().max().item()
    print(f'with MMSeg HRNet fusion (align_corners=False): {stock_diff:.3g}')
    assert stock_diff > 100 * TOLERANCE


def test_bare_state_dict_without_prefix(ref_state, shapes):
    from mmseg_proto.utils.convert_openseg import convert_openseg_protoseg
    result = convert_openseg_protoseg(ref_state, shapes)
    assert set(result.state_dict) == set(shapes)
    assert result.folded == ['cls_head.0.bias']
    assert len(result.dropped) == 4
    bn = 'decode_head.decoder.convs.0.bn.running_mean'
    torch.testing.assert_close(
        result.state_dict[bn], ref_state['cls_head.1.0.running_mean'] -
        ref_state['cls_head.0.bias'])
    torch.testing.assert_close(
        result.state_dict['decode_head.prototypes'],
        torch.nn.functional.normalize(ref_state['prototypes'], dim=-1))


def test_unknown_key_fails_clearly(ref_state, shapes):
    from mmseg_proto.utils.convert_openseg import (OpensegConversionError,
                                                   convert_openseg_protoseg)
    state = {'module.' + k: v for k, v in ref_state.items()}
    state['module.aux_head.0.weight'] = torch.zeros(19, 720, 1, 1)
    with pytest.raises(OpensegConversionError,
                       match=r"does not know how to map: \['aux_head"):
        convert_openseg_protoseg(dict(state_dict=state), shapes)


def test_wrong_shape_fails_clearly(ref_state, shapes):
    from mmseg_proto.utils.convert_openseg import (OpensegConversionError,
                                                   convert_openseg_protoseg)
    state = dict(ref_state)
    state['prototypes'] = torch.zeros(19, 5, 720)
    with pytest.raises(
            OpensegConversionError,
            match=r"'prototypes' has shape \(19, 5, 720\) but the model's "
            r"'decode_head.prototypes' has shape \(19, 10, 720\)"):
        convert_openseg_protoseg(state, shapes)


def test_missing_key_and_bad_alias_fail(ref_state, shapes):
    from mmseg_proto.utils.convert_openseg import (OpensegConversionError,
                                                   convert_openseg_protoseg)
    state = dict(ref_state)
    del state['mask_norm.bias']
    with pytest.raises(OpensegConversionError,
                       match='does not provide.*mask_norm.bias'):
        convert_openseg_protoseg(state, shapes)
    state = dict(ref_state)
    state['proj_head.mlp2.0.bias'] = state['proj_head.mlp2.0.bias'] + 1
    with pytest.raises(OpensegConversionError, match='differs from'):
        convert_openseg_protoseg(state, shapes)


def test_test_step_predicts_full_resolution(model):
    """The `mim test` path: preprocess, predict, upsample to the image."""
    from mmseg.structures import SegDataSample
    model.eval()
    image = torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8)
    sample = SegDataSample(metainfo=dict(
        img_shape=(64, 128), ori_shape=(64, 128), pad_shape=(64, 128)))
    with torch.no_grad():
        out = model.test_step(dict(inputs=[image], data_samples=[sample]))
    assert out[0].seg_logits.data.shape == (19, 64, 128)
    assert out[0].pred_sem_seg.data.shape == (1, 64, 128)
