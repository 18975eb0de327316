from .pixel_prototype_contrast_loss import PixelPrototypeContrastLoss
from .pixel_prototype_distance_loss import PixelPrototypeDistanceLoss

__all__ = ['PixelPrototypeContrastLoss', 'PixelPrototypeDistanceLoss']
