"""Let torch >= 2.6 load mmengine checkpoints without turning checks off.

torch 2.6 made ``torch.load(..., weights_only=True)`` the default, and
mmengine 0.10.x calls ``torch.load`` without the argument. The checkpoints
mmengine writes hold, besides tensors, the message hub's ``HistoryBuffer``
objects and numpy arrays and scalars, which the weights-only unpickler
refuses (``Unsupported global: GLOBAL
mmengine.logging.history_buffer.HistoryBuffer``), so ``--resume``,
``load_from`` and ``mim test --checkpoint`` fail. Instead of disabling the
weights-only check for everything (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``),
:func:`allow_mmengine_checkpoint_globals` allow-lists exactly those types.
"""
import pickle
from typing import Any, List

import numpy as np
import torch


def _history_buffer_attr(obj: Any, name: str) -> Any:
    """``getattr`` as mmengine checkpoints use it, and nothing more.

    ``HistoryBuffer`` pickles its statistics methods (``HistoryBuffer.min``,
    ``.max``, ``.mean``, ``.current``) as ``getattr(HistoryBuffer, 'min')``
    under pickle protocol 2. This stands in for the ``__builtin__.getattr``
    global during weights-only loading and refuses any other use of it.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and isinstance(name, str) and \
            not name.startswith('_') and callable(
                getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'weights-only load: getattr({obj!r}, {name!r}) is not allowed; '
        'mmseg_proto only allows the HistoryBuffer statistics methods')


def mmengine_checkpoint_globals() -> List[object]:
    """The non-tensor types found in mmengine training checkpoints."""
    from mmengine.logging.history_buffer import HistoryBuffer
    multiarray = getattr(np, '_core', None) or np.core
    allowed = [
        HistoryBuffer,
        (_history_buffer_attr, '__builtin__.getattr'),
        (_history_buffer_attr, 'builtins.getattr'),
        np.ndarray,
        np.dtype,
        multiarray.multiarray._reconstruct,
        multiarray.multiarray.scalar,
    ]
    # numpy >= 1.25 pickles dtypes by their class (numpy.dtypes.Float64DType)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        allowed += [
            getattr(dtypes, name) for name in dir(dtypes)
            if name.endswith('DType') and isinstance(getattr(dtypes, name),
                                                     type)
        ]
    return allowed


def allow_mmengine_checkpoint_globals() -> bool:
    """Allow-list mmengine's checkpoint types for weights-only loading.

    Returns:
        bool: True if registered, False on a torch without
        ``torch.serialization.add_safe_globals`` (< 2.4, which does not need
        it).
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        return False
    add_safe_globals(mmengine_checkpoint_globals())
    return True
