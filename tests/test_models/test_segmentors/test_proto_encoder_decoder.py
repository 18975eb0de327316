"""ProtoEncoderDecoder: the per-pixel anomaly map through MMSeg's inference APIs (whole and
slide inference), its shape, range and alignment with the image (against the head's cosines
by hand). Under test-time augmentation (flip): ProtoSegTTAModel averages the passes' maps
(flipped back); MMSeg's SegTTAModel, which would keep the last pass's map only, gets none,
with a warning.

What the map flags is measured, not tested: a briefly trained model (60 iterations) ranked a
pasted colour-noise square above the scene on some seeds and below it on another, a trained
one (4000 iterations) on every image (benchmarks/camvid_noise_patch.py, docs/anomaly_maps.md).
These tests read conftest's 2-iteration checkpoint."""
import glob
import os.path as osp

import mmcv
import pytest
import torch
from conftest import BASELINE_CFG, CAMVID_MINI, PROTO_CFG
from mmengine.config import Config

VAL_IMAGES = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))
ANOMALY = {'model.type': 'ProtoEncoderDecoder', 'model.anomaly_map': True}


@pytest.fixture(scope='module')
def checkpoint(camvid_protoseg):
    """conftest's session-wide ProtoSeg checkpoint (2 iterations of the shipped CamVid
    config)."""
    return camvid_protoseg[0]


def init(checkpoint, **options):
    from mmseg.apis import init_model
    return init_model(PROTO_CFG, checkpoint, device='cpu', cfg_options={**ANOMALY, **options})


def test_off_by_default_and_predictions_unchanged_when_on(checkpoint):
    from mmseg.apis import inference_model, init_model
    plain = init_model(PROTO_CFG, checkpoint, device='cpu')
    with_map = init(checkpoint)
    a, b = inference_model(plain, VAL_IMAGES[0]), inference_model(with_map, VAL_IMAGES[0])
    assert 'anomaly_map' not in a
    torch.testing.assert_close(b.seg_logits.data, a.seg_logits.data)
    assert torch.equal(b.pred_sem_seg.data, a.pred_sem_seg.data)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_anomaly_map_field_shape_range(checkpoint, mode):
    from mmseg.apis import inference_model
    options = {} if mode == 'whole' else {'model.test_cfg': dict(
        mode='slide', crop_size=(128, 128), stride=(96, 96))}
    result = inference_model(init(checkpoint, **options), VAL_IMAGES[0])
    h, w = mmcv.imread(VAL_IMAGES[0]).shape[:2]
    amap = result.anomaly_map.data
    assert amap.shape == (1, h, w) and amap.dtype == torch.float32
    assert result.seg_logits.data.shape == (11, h, w)
    assert torch.isfinite(amap).all()
    assert amap.min() >= -1e-4 and amap.max() <= 2.0 + 1e-4  # 1 - cosine
    assert amap.std() > 0


def test_anomaly_map_equals_one_minus_max_cosine_at_the_image_size(checkpoint):
    # Independent of the post-processing: the head's class scores at feature resolution,
    # 1 - their max, resized like the logits (to the input, then to the original size).
    import torch.nn.functional as F
    from mmseg.apis import inference_model
    from mmseg.apis.utils import _preprare_data  # MMSeg's own test pipeline
    model = init(checkpoint)
    result = inference_model(model, VAL_IMAGES[1])
    img = mmcv.imread(VAL_IMAGES[1])
    data = model.data_preprocessor(_preprare_data(VAL_IMAGES[1], model)[0], False)['inputs']
    assert data.shape[2:] != img.shape[:2]  # the config's test pipeline resizes
    with torch.no_grad():
        scores = model.decode_head.class_cosines(model.extract_feat(data))
    amap = (1.0 - scores.amax(dim=-1))[:, None]
    amap = F.interpolate(amap, size=data.shape[2:], mode='bilinear', align_corners=False)
    amap = F.interpolate(amap, size=img.shape[:2], mode='bilinear', align_corners=False)
    torch.testing.assert_close(result.anomaly_map.data, amap[0], atol=1e-5, rtol=1e-5)


def test_inferencer_returns_the_anomaly_map(checkpoint):
    from mmseg.apis import MMSegInferencer
    cfg = Config.fromfile(PROTO_CFG)
    cfg.model.type, cfg.model.anomaly_map = 'ProtoEncoderDecoder', True
    inferencer = MMSegInferencer(model=cfg, weights=checkpoint, device='cpu')
    out = inferencer(VAL_IMAGES[:2], return_datasamples=True, batch_size=2)
    h, w = mmcv.imread(VAL_IMAGES[0]).shape[:2]
    assert [o.anomaly_map.data.shape for o in out] == [(1, h, w)] * 2


def test_anomaly_map_needs_a_prototype_head():
    from mmseg.registry import MODELS
    cfg = Config.fromfile(BASELINE_CFG)
    cfg.model.type, cfg.model.anomaly_map = 'ProtoEncoderDecoder', True
    with pytest.raises(TypeError, match="anomaly_map=True needs a prototype decode head"):
        MODELS.build(cfg.model)


def tta_model(checkpoint, tta_type, anomaly_map=True):
    """A test-time augmentation model around the CamVid ProtoSeg, built as MMSeg's
    ``tools/test.py --tta`` builds it (``tta_model.module = model``)."""
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS
    cfg = Config.fromfile(PROTO_CFG)
    if anomaly_map:
        cfg.merge_from_dict(ANOMALY)
    model = MODELS.build(dict(type=tta_type, module=cfg.model))
    load_checkpoint(model.module, checkpoint, map_location='cpu')
    model.module.cfg = cfg  # what mmseg.apis.inference_model reads the test pipeline from
    return model.eval()


def tta_batch(path):
    """The image through the test pipeline's resize, then unflipped and flipped (MMSeg's
    TTA pipeline with one scale)."""
    from mmengine.dataset import Compose, pseudo_collate
    cfg = Config.fromfile(PROTO_CFG)
    resize = [t for t in cfg.test_pipeline if t['type'] == 'Resize']
    pipeline = Compose([
        dict(type='LoadImageFromFile'),
        dict(type='TestTimeAug', transforms=[
            resize,
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='PackSegInputs')]])])
    return pseudo_collate([pipeline(dict(img_path=path))])


def test_tta_averages_the_anomaly_maps_of_the_passes(checkpoint):
    import torch.nn.functional as F
    from mmseg.apis import inference_model
    model = tta_model(checkpoint, 'ProtoSegTTAModel')
    data = tta_batch(VAL_IMAGES[0])
    with torch.no_grad():
        (merged, ) = model.test_step(data)
    # Independently of the post-processing: per pass, 1 - max cosine at feature resolution,
    # resized to the input then to the original size, flipped back; then the mean.
    module = model.module
    h, w = mmcv.imread(VAL_IMAGES[0]).shape[:2]
    maps = []
    for i, flipped in enumerate((False, True)):
        aug = dict(inputs=data['inputs'][i], data_samples=data['data_samples'][i])
        assert aug['data_samples'][0].flip == flipped
        x = module.data_preprocessor(aug, False)['inputs']
        with torch.no_grad():
            scores = module.decode_head.class_cosines(module.extract_feat(x))
        amap = (1.0 - scores.amax(dim=-1))[:, None]
        amap = F.interpolate(amap, size=x.shape[2:], mode='bilinear', align_corners=False)
        amap = F.interpolate(amap, size=(h, w), mode='bilinear', align_corners=False)[0]
        maps.append(amap.flip(-1) if flipped else amap)
    assert (maps[0] - maps[1]).abs().max() > 1e-3  # the passes differ: the mean matters
    assert merged.anomaly_map.data.shape == (1, h, w)
    torch.testing.assert_close(merged.anomaly_map.data, (maps[0] + maps[1]) / 2,
                               atol=1e-5, rtol=1e-5)
    # The prediction is MMSeg's merge, as without the anomaly map.
    plain = tta_model(checkpoint, 'SegTTAModel', anomaly_map=False)
    with torch.no_grad():
        (expected, ) = plain.test_step(tta_batch(VAL_IMAGES[0]))
    assert 'anomaly_map' not in expected
    assert torch.equal(merged.pred_sem_seg.data, expected.pred_sem_seg.data)
    # Plain inference with the same segmentor afterwards: its own map again.
    single = inference_model(module, VAL_IMAGES[0])
    torch.testing.assert_close(single.anomaly_map.data, maps[0], atol=1e-5, rtol=1e-5)


def test_mmseg_tta_gets_no_anomaly_map_and_a_warning(checkpoint):
    model = tta_model(checkpoint, 'SegTTAModel')
    with pytest.warns(UserWarning, match=r"no anomaly_map for a test-time flip pass.*"
                                         r"tta_model = dict\(type='ProtoSegTTAModel'\)"):
        with torch.no_grad():
            (result, ) = model.test_step(tta_batch(VAL_IMAGES[0]))
    assert 'anomaly_map' not in result
    assert result.pred_sem_seg.data.shape == (1, *mmcv.imread(VAL_IMAGES[0]).shape[:2])
