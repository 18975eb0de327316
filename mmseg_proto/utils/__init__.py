from .torch_load_compat import (allow_mmengine_checkpoint_globals,
                                mmengine_checkpoint_globals)

__all__ = ['allow_mmengine_checkpoint_globals', 'mmengine_checkpoint_globals']
