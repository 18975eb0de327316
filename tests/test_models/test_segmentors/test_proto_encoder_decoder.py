"""ProtoEncoderDecoder: the per-pixel anomaly map through MMSeg's inference APIs (whole and
slide inference), its shape, range and alignment with the image, and that an injected
out-of-distribution patch scores higher than the scene around it on a briefly trained model."""
import glob
import os.path as osp

import mmcv
import numpy as np
import pytest
import torch
from conftest import BASELINE_CFG, CAMVID_MINI, PROTO_CFG, train_camvid_protoseg
from mmengine.config import Config

VAL_IMAGES = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))
ANOMALY = {'model.type': 'ProtoEncoderDecoder', 'model.anomaly_map': True}
TRAIN_ITERS = 60


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """ProtoSeg trained briefly (60 iterations, 96x96 crops) on the bundled CamVid images."""
    return train_camvid_protoseg(tmp_path_factory.mktemp('anomaly'), iters=TRAIN_ITERS, crop=96,
                                 batch_size=2, seed=0)[0]


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
        scores = model.decode_head._class_scores(model.extract_feat(data))
    amap = (1.0 - scores.amax(dim=-1))[:, None]
    amap = F.interpolate(amap, size=data.shape[2:], mode='bilinear', align_corners=False)
    amap = F.interpolate(amap, size=img.shape[:2], mode='bilinear', align_corners=False)
    torch.testing.assert_close(result.anomaly_map.data, amap[0], atol=1e-5, rtol=1e-5)


def test_out_of_distribution_patch_scores_higher(checkpoint):
    from mmseg.apis import inference_model
    model = init(checkpoint)
    rng = np.random.default_rng(0)
    for path in VAL_IMAGES[:3]:
        img = mmcv.imread(path)
        h, w = img.shape[:2]
        top, left, size = h // 4, w // 3, h // 3
        img[top:top + size, left:left + size] = rng.integers(
            0, 256, (size, size, 3), dtype=np.uint8)  # colour noise: nothing like a street
        amap = inference_model(model, img).anomaly_map.data[0].numpy()
        inside = np.zeros((h, w), bool)
        inside[top:top + size, left:left + size] = True
        core = np.zeros((h, w), bool)  # away from the blurred patch border
        core[top + size // 4:top + 3 * size // 4, left + size // 4:left + 3 * size // 4] = True
        ring = np.ones((h, w), bool)
        ring[max(0, top - size // 4):top + size + size // 4,
             max(0, left - size // 4):left + size + size // 4] = False
        assert np.median(amap[core]) > np.percentile(amap[ring], 90), path


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
