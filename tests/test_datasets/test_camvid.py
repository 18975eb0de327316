"""CamVidDataset loads the embedded subset with correct labels."""
import numpy as np
from conftest import CAMVID_MINI

import mmseg_proto  # noqa: F401
from mmseg.registry import DATASETS


def build(split, pipeline):
    return DATASETS.build(
        dict(
            type='CamVidDataset',
            data_root=CAMVID_MINI,
            data_prefix=dict(
                img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'),
            pipeline=pipeline))


def test_metainfo_and_sizes():
    train = build('train', [])
    val = build('val', [])
    assert len(train) == 40 and len(val) == 20
    meta = train.metainfo
    assert meta['classes'][0] == 'sky' and meta['classes'][10] == 'bicyclist'
    assert len(meta['classes']) == 11 and len(meta['palette']) == 11
    assert meta['palette'][3] == [128, 64, 128]  # road
    assert train[0]['img_path'].endswith('.jpg')
    assert train[0]['seg_map_path'].endswith('.png')


def test_label_values_and_image_pairs():
    ds = build('val', [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations'),
    ])
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        seg = item['gt_seg_map']
        assert item['img'].shape[:2] == seg.shape == (360, 480)
        values = set(np.unique(seg).tolist())
        assert values <= set(range(11)) | {255}, values
        seen |= values
    # The subset covers the frequent classes and the void label.
    assert {0, 1, 3, 5, 8, 255} <= seen


def test_registered_in_mmseg():
    assert DATASETS.get('CamVidDataset') is mmseg_proto.CamVidDataset
