from .camvid import CamVidDataset
from .transforms import IgnoreClasses

__all__ = ['CamVidDataset', 'IgnoreClasses']
