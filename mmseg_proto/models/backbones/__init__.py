from .hrnet_ref_align import HRNetRefAlign

__all__ = ['HRNetRefAlign']
