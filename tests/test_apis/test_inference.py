"""MMSeg's inference APIs on a ProtoHead checkpoint: init_model / inference_model and
MMSegInferencer (one image, a folder, saved visualisations)."""
import glob
import os
import os.path as osp

import numpy as np
import pytest
import torch
from conftest import CAMVID_MINI, PROTO_CFG

VAL_DIR = osp.join(CAMVID_MINI, 'img_dir', 'val')


@pytest.fixture(scope='module')
def checkpoint(camvid_protoseg):
    """(ProtoSeg checkpoint from 2 iterations of the shipped CamVid config, its prototypes):
    conftest's session-wide one."""
    return camvid_protoseg


def test_init_model_and_inference_model(checkpoint):
    from mmseg.apis import inference_model, init_model
    ckpt, prototypes = checkpoint
    model = init_model(PROTO_CFG, ckpt, device='cpu')
    assert torch.equal(model.decode_head.prototypes, prototypes)  # loaded, not re-initialised
    image = sorted(glob.glob(osp.join(VAL_DIR, '*.jpg')))[0]
    result = inference_model(model, image)
    import mmcv
    h, w = mmcv.imread(image).shape[:2]
    assert result.pred_sem_seg.data.shape == (1, h, w)
    assert result.seg_logits.data.shape == (11, h, w)
    torch.testing.assert_close(result.pred_sem_seg.data[0],
                               result.seg_logits.data.argmax(0))
    results = inference_model(model, sorted(glob.glob(osp.join(VAL_DIR, '*.jpg')))[:2])
    assert len(results) == 2


def test_mmseg_inferencer_on_an_image_and_a_folder(checkpoint, tmp_path):
    from mmseg.apis import MMSegInferencer
    ckpt, _ = checkpoint
    inferencer = MMSegInferencer(model=PROTO_CFG, weights=ckpt, device='cpu')
    image = sorted(glob.glob(osp.join(VAL_DIR, '*.jpg')))[0]
    out = inferencer(image, return_datasamples=True)
    assert out.pred_sem_seg.data.shape[0] == 1
    # A folder of 3 of the val images in batches of 2 (one full batch, one partial).
    folder = tmp_path / 'images'
    folder.mkdir()
    for path in sorted(glob.glob(osp.join(VAL_DIR, '*.jpg')))[:3]:
        os.symlink(path, folder / osp.basename(path))
    out = inferencer(str(folder), out_dir=str(tmp_path / 'out'), batch_size=2)
    n = 3
    preds = out['predictions']
    assert len(preds) == n and isinstance(preds[0], np.ndarray)
    assert set(np.unique(np.concatenate([p.ravel() for p in preds]))) <= set(range(11))
    saved = (glob.glob(osp.join(tmp_path, 'out', 'vis', '*'))
             + glob.glob(osp.join(tmp_path, 'out', 'pred', '*')))
    assert len(saved) >= n
