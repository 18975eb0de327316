from .ignore_classes import IgnoreClasses

__all__ = ['IgnoreClasses']
