from .checkpoint_loading import (CheckpointRefusedError, UnreadableCheckpointError,
                                 checkpoint_safe_globals, http_cache_path,
                                 load_checkpoint_file, load_with_checkpoint_globals,
                                 register_checkpoint_loader)
from .stack_check import check_mmseg_stack

__all__ = ['CheckpointRefusedError', 'UnreadableCheckpointError', 'checkpoint_safe_globals',
           'http_cache_path', 'load_checkpoint_file', 'load_with_checkpoint_globals',
           'register_checkpoint_loader', 'check_mmseg_stack']
