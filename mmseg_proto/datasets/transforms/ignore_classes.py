"""Turn the labels of chosen classes into ignore_index (classes held out of training)."""
import warnings
from typing import Optional, Sequence, Set, Union

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS

# ignore_index must fit the int32 range: the label map is widened to hold it, and a wider
# map (uint32, int64) is one that MMSeg's later transforms (cv2 resize, rotate) refuse.
_INDEX_RANGE = (-2**31, 2**31 - 1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@TRANSFORMS.register_module()
class IgnoreClasses(BaseTransform):
    """Set the pixels of some classes to ``ignore_index`` in ``gt_seg_map``.

    For training a model that never sees those classes (its loss ignores their pixels) while
    the class list, and so the model's outputs, stay the dataset's: the held-out classes can
    then serve as anomalies at test time (see ``benchmarks/camvid_anomaly.py``). Put it in the
    training pipeline after ``LoadAnnotations``.

    The label map keeps its dtype when that holds ``ignore_index`` (MMSeg's uint8 maps and the
    default 255). Otherwise it is widened to the smallest dtype holding both, e.g. int16 for
    ``ignore_index=-1`` and uint16 for 300 on uint8 maps: MMSeg's later transforms (resize,
    crop, flip, pad) handle those, and ``PackSegInputs`` makes int64 labels anyway.

    A class that cannot occur is an error where that can be known: with ``num_classes``, a
    class ``>= num_classes`` when the transform is built; a class the label map's dtype cannot
    hold (300 in uint8 maps) on the first sample. Otherwise each instance (each dataloader
    worker has its own) warns once if, in its first :attr:`WARN_AFTER` label maps, a listed
    class never occurred and is above every class label that did (``classes=[99]`` on an
    11-class dataset): the transform ignores nothing for it.

    Args:
        classes (int | Sequence[int]): Label values to ignore (0-based class indices of the
            dataset, after ``reduce_zero_label`` if the dataset uses it).
        ignore_index (int): The value written, as the loss's ``ignore_index``.
            Default: 255, MMSeg's ignore index.
        num_classes (int, optional): The dataset's number of classes; when given, every class
            must be below it. Default: None (not checked when built; see above).

    Required keys: ``gt_seg_map``. Modified keys: ``gt_seg_map`` (values, and dtype as above).
    """

    #: Label maps an instance looks at before warning about a listed class that never occurred.
    WARN_AFTER = 100

    def __init__(self, classes: Union[int, Sequence[int]], ignore_index: int = 255,
                 num_classes: Optional[int] = None) -> None:
        if _is_int(classes):
            classes = [classes]
        elif isinstance(classes, Sequence) and not isinstance(classes, str):
            classes = list(classes)
        if not isinstance(classes, list) or not classes or not all(
                _is_int(c) and c >= 0 for c in classes):
            raise ValueError(f'IgnoreClasses: invalid classes={classes!r} (must be one or more '
                             'non-negative class indices (label values), e.g. classes=[8])')
        if not _is_int(ignore_index) or not _INDEX_RANGE[0] <= ignore_index <= _INDEX_RANGE[1]:
            raise ValueError(f'IgnoreClasses: invalid ignore_index={ignore_index!r} (must be an '
                             f'integer in [{_INDEX_RANGE[0]}, {_INDEX_RANGE[1]}], the '
                             "loss's ignore_index; MMSeg's default is 255)")
        if ignore_index in classes:
            raise ValueError(f'IgnoreClasses: ignore_index={ignore_index} is among the '
                             f'classes to ignore {classes}')
        if num_classes is not None:
            if not _is_int(num_classes) or num_classes < 1:
                raise ValueError(f'IgnoreClasses: invalid num_classes={num_classes!r} (must '
                                 "be the dataset's number of classes, an integer >= 1)")
            beyond = [c for c in classes if c >= num_classes]
            if beyond:
                raise ValueError(
                    f'IgnoreClasses: classes {beyond} cannot occur in a dataset of '
                    f'num_classes={num_classes} (class indices 0..{num_classes - 1}); '
                    'check classes against the dataset\'s class list')
        self.classes = classes
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        # Classes not seen yet, while watching the first label maps (None: not watching).
        self._unseen: Optional[Set[int]] = None if num_classes is not None else set(classes)
        self._maps_seen = 0
        self._largest_label = -1

    def transform(self, results: dict) -> dict:
        """Write ``ignore_index`` over the listed classes of ``results['gt_seg_map']``.

        Args:
            results (dict): The pipeline's results, with ``gt_seg_map``.

        Returns:
            dict: ``results``, ``gt_seg_map`` replaced.
        """
        if 'gt_seg_map' not in results:
            raise KeyError("IgnoreClasses needs 'gt_seg_map': put it after "
                           "dict(type='LoadAnnotations') in the pipeline")
        seg = np.asarray(results['gt_seg_map'])
        if seg.dtype.kind in 'ui':
            high = np.iinfo(seg.dtype).max
            impossible = [c for c in self.classes if c > high]
            if impossible:
                raise ValueError(
                    f'IgnoreClasses: classes {impossible} cannot occur in {seg.dtype} label '
                    f'maps (values up to {high}); check classes={self.classes} against the '
                    "dataset's class indices")
        if self._unseen is not None:
            self._watch(seg)
        dtype = np.promote_types(seg.dtype, np.min_scalar_type(self.ignore_index))
        seg = np.where(np.isin(seg, self.classes), np.asarray(self.ignore_index, dtype),
                       seg.astype(dtype, copy=False))
        results['gt_seg_map'] = seg
        return results

    def _watch(self, seg: np.ndarray) -> None:
        """Note which listed classes and how large a class label occur in ``seg``; warn once
        after :attr:`WARN_AFTER` maps about listed classes above every label that occurred."""
        if seg.dtype.kind == 'u' and seg.dtype.itemsize <= 2:
            values = np.flatnonzero(np.bincount(seg.ravel()))
        else:
            values = np.unique(seg)
        if values.dtype.kind in 'ui':  # compare with -1 or 300 as numbers, not in uint8
            values = values.astype(np.int64)
        self._unseen.difference_update(values[np.isin(values, self.classes)].tolist())
        labels = values[(values != 255) & (values != self.ignore_index)]
        if labels.size:
            self._largest_label = max(self._largest_label, int(labels.max()))
        self._maps_seen += 1
        if not self._unseen:
            self._unseen = None
        elif self._maps_seen >= self.WARN_AFTER:
            absent = sorted(c for c in self._unseen if c > self._largest_label)
            self._unseen = None
            if absent:
                largest = self._largest_label if self._largest_label >= 0 else 'none'
                warnings.warn(
                    f'IgnoreClasses: classes {absent} of classes={self.classes} did not occur '
                    f'in the first {self._maps_seen} label maps, whose largest class label is '
                    f'{largest} (255 and ignore_index aside): nothing is ignored for them. '
                    'Classes are 0-based label values of the dataset (after '
                    'reduce_zero_label); check them, or pass num_classes to check them when '
                    'the transform is built', UserWarning, stacklevel=2)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(classes={self.classes}, '
                f'ignore_index={self.ignore_index}, num_classes={self.num_classes})')
