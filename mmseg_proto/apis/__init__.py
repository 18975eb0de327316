"""Python APIs beside MMSeg's ``mmseg.apis``: adding classes to a trained model."""
from .add_classes import AddClassError, AddClassReport, AddedClass, add_classes
from .class_placement import calibrate_offset, imprint_weight, place_prototypes

__all__ = ['add_classes', 'AddClassError', 'AddClassReport', 'AddedClass',
           'calibrate_offset', 'imprint_weight', 'place_prototypes']
