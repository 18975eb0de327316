from .checkpoint_loading import (checkpoint_safe_globals, load_with_checkpoint_globals,
                                 register_checkpoint_loader)
from .stack_check import check_mmseg_stack

__all__ = ['checkpoint_safe_globals', 'load_with_checkpoint_globals',
           'register_checkpoint_loader', 'check_mmseg_stack']
