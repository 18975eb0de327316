"""Turn the labels of chosen classes into ignore_index (classes held out of training)."""
from typing import Sequence, Union

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS


@TRANSFORMS.register_module()
class IgnoreClasses(BaseTransform):
    """Set the pixels of some classes to ``ignore_index`` in ``gt_seg_map``.

    For training a model that never sees those classes (its loss ignores their pixels) while
    the class list, and so the model's outputs, stay the dataset's: the held-out classes can
    then serve as anomalies at test time (see ``benchmarks/camvid_anomaly.py``). Put it in the
    training pipeline after ``LoadAnnotations``.

    Args:
        classes (Sequence[int]): Label values to ignore (class indices in the dataset).
        ignore_index (int): The value written. Default: 255, MMSeg's ignore index.

    Required keys: ``gt_seg_map``. Modified keys: ``gt_seg_map``.
    """

    def __init__(self, classes: Union[int, Sequence[int]], ignore_index: int = 255) -> None:
        classes = [classes] if isinstance(classes, int) else list(classes)
        if not classes or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                  for c in classes):
            raise ValueError(f'IgnoreClasses: classes={classes!r} must be one or more '
                             'non-negative class indices (label values), e.g. classes=[8]')
        if ignore_index in classes:
            raise ValueError(f'IgnoreClasses: ignore_index={ignore_index} is among the '
                             f'classes to ignore {classes}')
        self.classes = classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        if 'gt_seg_map' not in results:
            raise KeyError("IgnoreClasses needs 'gt_seg_map': put it after "
                           "dict(type='LoadAnnotations') in the pipeline")
        seg = results['gt_seg_map']
        seg = np.where(np.isin(seg, self.classes), np.asarray(self.ignore_index, seg.dtype), seg)
        results['gt_seg_map'] = seg
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(classes={self.classes}, '
                f'ignore_index={self.ignore_index})')
