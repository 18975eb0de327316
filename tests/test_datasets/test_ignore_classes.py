"""IgnoreClasses: the listed classes become the ignore index and nothing else changes, for
ignore indices the label map's dtype cannot hold too; its argument checks; classes that cannot
occur are an error where that can be known, a warning once per instance otherwise."""
import warnings

import numpy as np
import pytest
import torch
from conftest import CAMVID_MINI

from mmseg_proto import IgnoreClasses

VOID = 255


def label_map(seed=0, shape=(7, 9)):
    """A uint8 CamVid-like label map: classes 0..10 and the void label 255."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([*range(11), VOID], np.uint8), size=shape)


def expected(seg, classes, ignore_index):
    """Pixel by pixel, independently of the transform's vectorised code."""
    out = np.empty(seg.shape, np.int64)
    for idx, value in np.ndenumerate(seg):
        out[idx] = ignore_index if int(value) in classes else int(value)
    return out


@pytest.mark.parametrize('classes', [[3, 8], [0], 10, (1, 2, 7)])
def test_listed_classes_become_the_ignore_index_and_the_rest_stay(classes):
    seg = label_map()
    before = seg.copy()
    out = IgnoreClasses(classes=classes)(dict(gt_seg_map=seg))['gt_seg_map']
    listed = [classes] if isinstance(classes, int) else list(classes)
    assert out.dtype == np.uint8  # 255 fits: MMSeg's label maps keep their dtype
    np.testing.assert_array_equal(out, expected(before, listed, VOID))
    assert not np.isin(out, listed).any() and (out == VOID).sum() > (before == VOID).sum()
    np.testing.assert_array_equal(seg, before)  # the input map is not written in place


@pytest.mark.parametrize('ignore_index,dtype', [(-1, np.int16), (300, np.uint16),
                                                (-40000, np.int32), (0, np.uint8)])
def test_an_ignore_index_beyond_the_label_dtype_widens_the_map(ignore_index, dtype):
    seg = label_map(1)
    classes = [1, 4] if ignore_index else [5]
    out = IgnoreClasses(classes=classes, ignore_index=ignore_index)(
        dict(gt_seg_map=seg))['gt_seg_map']
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected(seg, classes, ignore_index))
    assert (out == VOID).sum() == (seg == VOID).sum()  # the void label stays 255


def test_ignore_index_minus_one_through_an_mmseg_training_pipeline():
    """CamVid label maps (uint8) with ignore_index=-1 through resize, crop, flip, pad and
    packing: the same labels as without the transform, the class's pixels at -1."""
    from mmseg.registry import DATASETS
    tail = [dict(type='RandomResize', scale=(240, 180), ratio_range=(0.75, 1.5),
                 keep_ratio=True),
            dict(type='RandomCrop', crop_size=(160, 160)),
            dict(type='RandomFlip', prob=1.0),
            dict(type='Pad', size=(200, 200), pad_val=dict(img=0, seg=VOID)),
            dict(type='PackSegInputs')]
    load = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')]

    def first_labels(pipeline):
        dataset = DATASETS.build(dict(
            type='CamVidDataset', data_root=CAMVID_MINI, pipeline=pipeline,
            data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train')))
        np.random.seed(0)
        return dataset[0]['data_samples'].gt_sem_seg.data

    plain = first_labels(load + tail)
    ignored = first_labels(load + [dict(type='IgnoreClasses', classes=[8], ignore_index=-1)]
                           + tail)
    assert (plain == 8).any() and (plain == VOID).any()  # the frame has class 8 and void
    assert plain.dtype == ignored.dtype == torch.int64
    torch.testing.assert_close(ignored, torch.where(plain == 8, -1, plain), rtol=0, atol=0)


@pytest.mark.parametrize('kwargs', [
    dict(classes=[]), dict(classes=[-1]), dict(classes=[2.0]), dict(classes=[True]),
    dict(classes='3'), dict(classes=None), dict(classes=[1], ignore_index=1.5),
    dict(classes=[1], ignore_index=None), dict(classes=[1], ignore_index=False),
    dict(classes=[1], ignore_index=2**31), dict(classes=[1], num_classes=0),
    dict(classes=[1], num_classes=11.0),
])
def test_bad_arguments_get_a_message_naming_the_transform_and_value(kwargs):
    with pytest.raises(ValueError, match=r'IgnoreClasses: invalid \w+=') as err:
        IgnoreClasses(**kwargs)
    assert 'must be' in str(err.value)


def test_the_ignore_index_among_the_classes_is_refused():
    with pytest.raises(ValueError, match='IgnoreClasses: ignore_index=255 is among'):
        IgnoreClasses(classes=[3, 255])


def test_a_class_beyond_num_classes_is_refused_when_built():
    with pytest.raises(ValueError, match=r'IgnoreClasses: classes \[11, 99\] cannot occur in '
                                         r'a dataset of num_classes=11'):
        IgnoreClasses(classes=[1, 11, 99], num_classes=11)
    IgnoreClasses(classes=[10], num_classes=11)  # the last class is fine


def test_a_class_the_label_dtype_cannot_hold_is_refused_on_the_first_map():
    transform = IgnoreClasses(classes=[3, 300])
    with pytest.raises(ValueError, match=r'IgnoreClasses: classes \[300\] cannot occur in '
                                         r'uint8 label maps'):
        transform(dict(gt_seg_map=label_map()))
    seg = label_map().astype(np.uint16)  # a 16-bit map can hold it
    out = transform(dict(gt_seg_map=seg))['gt_seg_map']
    np.testing.assert_array_equal(out, expected(seg, [3, 300], VOID))


def test_a_class_that_never_occurs_warns_once_per_instance(monkeypatch):
    monkeypatch.setattr(IgnoreClasses, 'WARN_AFTER', 3)
    transform = IgnoreClasses(classes=[2, 99])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for seed in range(2):
            out = transform(dict(gt_seg_map=label_map(seed)))['gt_seg_map']
        assert not caught  # not before WARN_AFTER maps
        for seed in range(2, 6):
            out = transform(dict(gt_seg_map=label_map(seed)))['gt_seg_map']
    assert len(caught) == 1 and caught[0].category is UserWarning
    message = str(caught[0].message)
    assert 'IgnoreClasses: classes [99] of classes=[2, 99] did not occur in the first 3 ' \
           'label maps, whose largest class label is 10' in message
    np.testing.assert_array_equal(out, expected(label_map(5), [2, 99], VOID))
    # Another instance (another dataloader worker) warns for itself.
    other = IgnoreClasses(classes=[99])
    with pytest.warns(UserWarning, match=r'classes \[99\]'):
        for seed in range(3):
            other(dict(gt_seg_map=label_map(seed)))


@pytest.mark.parametrize('classes', [[4], [7, 9]])
def test_no_warning_for_classes_that_occur_or_lie_below_a_label_seen(classes, monkeypatch):
    monkeypatch.setattr(IgnoreClasses, 'WARN_AFTER', 2)
    maps = [np.array([[0, 4, 10, VOID]], np.uint8), np.array([[1, 10]], np.uint8)]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # any warning fails the test
        for transform in (IgnoreClasses(classes=classes),
                          IgnoreClasses(classes=[11], num_classes=12)):
            for _ in range(3):
                for seg in maps:
                    transform(dict(gt_seg_map=seg))


def test_needs_the_label_map():
    with pytest.raises(KeyError, match="IgnoreClasses needs 'gt_seg_map'.*LoadAnnotations"):
        IgnoreClasses(classes=[1])(dict(img=np.zeros((2, 2, 3), np.uint8)))


def test_ignore_index_minus_one_still_warns_about_a_class_above_every_label(monkeypatch):
    """Pin (issue 28 section 7): with ignore_index=-1 the void label 255 of the maps is not a
    class label either; a listed class above every label that occurred (99 in maps of classes
    0..10 and 255) is warned about."""
    monkeypatch.setattr(IgnoreClasses, 'WARN_AFTER', 3)
    maps = [label_map(seed) for seed in range(3)]
    assert all((m == VOID).any() for m in maps)
    largest = max(int(m[m != VOID].max()) for m in maps)  # 10
    transform = IgnoreClasses(classes=[3, 99], ignore_index=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for seg in maps:
            out = transform(dict(gt_seg_map=seg))['gt_seg_map']
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert (f'IgnoreClasses: classes [99] of classes=[3, 99] did not occur in the first 3 '
            f'label maps, whose largest class label is {largest}') in str(caught[0].message)
    np.testing.assert_array_equal(out, expected(maps[-1], [3, 99], -1))
