"""Load mmengine checkpoints on torch >= 2.6 without making any other load less safe.

torch 2.6 made ``torch.load(..., weights_only=True)`` the default and mmengine 0.10.x calls
``torch.load`` without the argument. Besides tensors, the checkpoints mmengine writes hold the
message hub's ``HistoryBuffer`` objects (with references to their statistics methods) and numpy
arrays, dtypes and scalars, which the weights-only unpickler refuses, so ``--resume``,
``load_from``, ``mim test --checkpoint`` and ``mmseg.apis.init_model`` fail.

:func:`register_checkpoint_loader` makes :func:`load_local_checkpoint` mmengine's loader of
local files (the scheme every local path goes through), and :func:`load_http_checkpoint` its
loader of ``http://`` / ``https://`` URLs (downloaded as mmengine does, then loaded as a local
file): it loads with ``weights_only=True``
and, *during that load only*, the weights-only unpickler also admits stand-ins for exactly
what mmengine writes, each of which checks what it builds:

- ``numpy.dtype``: numeric dtypes only (bool, integers, floats, complex); object, void,
  structured and string dtypes are refused;
- ``numpy ... _reconstruct`` / ``numpy.ndarray`` / ``numpy ... scalar``: arrays and scalars
  of those dtypes only (an object array built from raw bytes is a pointer forgery);
- ``HistoryBuffer``: rebuilt from its numeric history and ``max_length`` alone; the statistics
  methods a file names are checked and never copied into the class-level registry;
- ``getattr``: only ``HistoryBuffer.min / max / mean / current``.

Anything else gets one ``pickle.UnpicklingError`` naming what was refused. Plain
``torch.load`` elsewhere in the process keeps torch's own allow-list: nothing is added to it
at import time. (torch keeps the allow-list in one process-wide set, so a ``torch.load`` in
another thread *while* a checkpoint is being loaded sees the same stand-ins; they are safe for
any file.)
"""
import functools
import os
import os.path as osp
import pickle
from typing import Any, Callable, List, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import torch

NUMERIC_KINDS = 'biufc'  # bool, signed, unsigned, float, complex
HISTORY_STATISTICS = ('min', 'max', 'mean', 'current')
_multiarray = getattr(np, '_core', None) or np.core


REFUSED = 'mmseg_proto refused to load this checkpoint'


def _refuse(what: str) -> None:
    raise pickle.UnpicklingError(
        f'{REFUSED}: {what}. mmengine checkpoints hold only '
        'tensors, numeric numpy arrays/scalars and HistoryBuffer logs; this file is damaged '
        'or was crafted.')


def _numeric_dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
    """Stand-in for ``numpy.dtype`` in a pickle: numeric dtypes only."""
    if not isinstance(spec, str):
        _refuse(f'numpy.dtype({spec!r}) (only dtypes named by a string are written by numpy)')
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject or dtype.fields is not None:
        _refuse(f'numpy dtype {spec!r} (only bool, integer, float and complex dtypes)')
    return dtype


class NdarrayName:
    """What ``numpy.ndarray`` names in a checkpoint: only the subtype argument of
    ``_reconstruct``; calling it builds nothing."""

    def __new__(cls, *args, **kwargs):
        _refuse('a call of numpy.ndarray (arrays are rebuilt by _reconstruct only)')


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """Stand-in for numpy's ``_reconstruct``: a plain ndarray of a numeric dtype, whose data
    ``ndarray.__setstate__`` then fills (with a dtype that ``_numeric_dtype`` made)."""
    if subtype is not NdarrayName:
        _refuse(f'numpy _reconstruct of {subtype!r} (only numpy.ndarray)')
    if not isinstance(dtype, (bytes, str)) or np.dtype(dtype).kind not in NUMERIC_KINDS:
        _refuse(f'numpy _reconstruct with dtype {dtype!r}')
    return _multiarray.multiarray._reconstruct(np.ndarray, shape, dtype)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for numpy's ``scalar``: numeric scalars from raw bytes only."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS or \
            dtype.hasobject or not isinstance(data, bytes):
        _refuse(f'numpy scalar of dtype {dtype!r} from {type(data).__name__}')
    return _multiarray.multiarray.scalar(dtype, data)


def _history_buffer_class():
    from mmengine.logging.history_buffer import HistoryBuffer
    return HistoryBuffer


@functools.lru_cache(maxsize=None)
def _make_checkpoint_history_buffer():
    history_buffer = _history_buffer_class()

    class CheckpointHistoryBuffer(history_buffer):
        """Stands in for ``HistoryBuffer`` while a checkpoint is unpickled: the instance is
        created bare and ``__setstate__`` keeps only the numeric history, then turns it into
        a plain ``HistoryBuffer``."""

        def __setstate__(self, state: Any) -> None:
            if not isinstance(state, dict):
                _refuse(f'HistoryBuffer state of type {type(state).__name__}')
            allowed = {'max_length', '_log_history', '_count_history', 'statistics_methods'}
            if set(state) - allowed or not {'max_length', '_log_history',
                                            '_count_history'} <= set(state):
                _refuse(f'HistoryBuffer state with keys {sorted(map(str, state))}')
            methods = state.get('statistics_methods', {})
            if not isinstance(methods, dict) or any(
                    getattr(history_buffer, str(name), None) is not method
                    or name not in HISTORY_STATISTICS for name, method in methods.items()):
                _refuse('HistoryBuffer statistics methods other than '
                        f'{"/".join(HISTORY_STATISTICS)}')
            max_length = state['max_length']
            if type(max_length) is not int or max_length < 1:
                _refuse(f'HistoryBuffer max_length={max_length!r}')
            logs, counts = state['_log_history'], state['_count_history']
            for array in (logs, counts):
                if type(array) is not np.ndarray or array.ndim != 1 or \
                        array.dtype.kind not in NUMERIC_KINDS:
                    _refuse('HistoryBuffer history that is not a 1-d numeric array')
            if logs.shape != counts.shape:
                _refuse('HistoryBuffer histories of different lengths')
            self.__class__ = history_buffer
            self._set_default_statistics()  # the class's own, never the file's
            self.__dict__.update(max_length=max_length, _log_history=logs,
                                 _count_history=counts)

    return CheckpointHistoryBuffer


def _history_statistic(obj: Any, name: Any) -> Callable:
    """Stand-in for ``getattr`` (protocol 2 pickles ``HistoryBuffer.mean`` as
    ``getattr(HistoryBuffer, 'mean')``): those four methods and nothing else."""
    history_buffer = _history_buffer_class()
    if isinstance(obj, type) and issubclass(obj, history_buffer) and \
            name in HISTORY_STATISTICS:
        return getattr(history_buffer, name)
    owner = 'HistoryBuffer' if isinstance(obj, type) and issubclass(obj, history_buffer) \
        else getattr(obj, '__name__', type(obj).__name__)
    _refuse(f'getattr({owner}, {name!r})')


def _numeric_dtype_classes() -> List[type]:
    """numpy's DType classes of numeric dtypes (``type(np.dtype('f8'))`` etc.)."""
    return sorted({type(np.dtype(code)) for code in np.typecodes['All']
                   if np.dtype(code).kind in NUMERIC_KINDS}, key=lambda c: c.__name__)


@functools.lru_cache(maxsize=None)
def _safe_globals() -> Tuple[Tuple[Any, str], ...]:
    pairs: List[Tuple[Any, str]] = [
        (_make_checkpoint_history_buffer(), 'mmengine.logging.history_buffer.HistoryBuffer'),
        (_history_statistic, 'builtins.getattr'),
        (_history_statistic, '__builtin__.getattr'),
        (_numeric_dtype, 'numpy.dtype'),
        (NdarrayName, 'numpy.ndarray'),
    ]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        pairs += [(_reconstruct, f'{module}._reconstruct'), (_scalar, f'{module}.scalar')]
    # The weights-only unpickler runs BUILD (``__setstate__``) only on instances of admitted
    # types. These names are not numpy's, so a file cannot call these types; it can only
    # fill arrays made by _reconstruct and (no-op) set the state of numeric dtypes.
    build_only = [np.ndarray] + _numeric_dtype_classes()
    pairs += [(cls, f'mmseg_proto.checkpoint_loading.build_only.{cls.__name__}')
              for cls in build_only]
    return tuple(pairs)


def checkpoint_safe_globals() -> List[Tuple[Any, str]]:
    """(object, pickled name) pairs admitted while an mmengine checkpoint loads."""
    return list(_safe_globals())


def load_with_checkpoint_globals(load: Callable, *args, **kwargs) -> Any:
    """Call ``load(*args, **kwargs)`` (which calls ``torch.load``) with the stand-ins of
    :func:`checkpoint_safe_globals` admitted for that call only."""
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    if safe_globals is None:  # torch < 2.5: weights_only is off by default there
        return load(*args, **kwargs)
    try:
        with safe_globals(checkpoint_safe_globals()):
            return load(*args, **kwargs)
    except pickle.UnpicklingError as error:
        # torch wraps the unpickler's message in advice to retry with weights_only=False,
        # which is the wrong advice for a crafted file: keep only what was refused.
        message = str(error)
        start = message.find(REFUSED)
        if start >= 0:
            raise pickle.UnpicklingError(message[start:].split('\n')[0]) from None
        raise


def load_local_checkpoint(filename: str, map_location=None) -> Any:
    """mmengine's loader of local checkpoint files, with weights-only loading and the
    stand-ins above admitted for the duration of the load.

    It replaces the loader mmengine registers for local paths rather than wrapping it: the
    OneDL fork's loader (onedl-mmengine 0.10.12) admits the real ``getattr``, ``numpy.dtype``
    and ``numpy.ndarray`` and, when weights-only loading fails, falls back to
    ``weights_only=False``, i.e. runs whatever a crafted file contains.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return load_with_checkpoint_globals(torch.load, filename, map_location=map_location,
                                        weights_only=True)


def _download(url: str, model_dir: Optional[str]) -> str:
    """The cached copy of ``url``, downloaded if missing: mmengine's ``load_url`` place
    (``$TORCH_HOME/checkpoints/<file name>``), so files it cached are reused."""
    if model_dir is None:
        torch_home = os.getenv('TORCH_HOME', osp.join(os.getenv('XDG_CACHE_HOME', '~/.cache'),
                                                      'torch'))
        model_dir = osp.join(osp.expanduser(torch_home), 'checkpoints')
    os.makedirs(model_dir, exist_ok=True)
    cached = osp.join(model_dir, osp.basename(urlparse(url).path))
    if not osp.exists(cached):
        torch.hub.download_url_to_file(url, cached, progress=False)
    return cached


def load_http_checkpoint(filename: str, map_location=None,
                         model_dir: Optional[str] = None) -> Any:
    """mmengine's loader of ``http(s)://`` checkpoints (``load_from``, ``--checkpoint``,
    ``init_cfg=dict(type='Pretrained', checkpoint=URL)``), loading as
    :func:`load_local_checkpoint` does.

    Downloads as mmengine's ``load_from_http`` does (process 0 first, the others after a
    barrier, into the same cache), then loads the file like a local one. It replaces
    mmengine's loader rather than wrapping it: onedl-mmengine's falls back to
    ``weights_only=False`` when weights-only loading fails, and OpenMMLab's refuses the numpy
    and HistoryBuffer data of whole mmengine checkpoints on torch >= 2.6.
    """
    from mmengine.dist import get_dist_info
    rank, world_size = get_dist_info()
    if rank == 0:
        path = _download(filename, model_dir)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = _download(filename, model_dir)
    return load_local_checkpoint(path, map_location=map_location)


def register_checkpoint_loader() -> None:
    """Make :func:`load_local_checkpoint` mmengine's loader of local files and
    :func:`load_http_checkpoint` its loader of http(s) URLs (every ``load_from``,
    ``--resume``, ``--checkpoint``, ``init_model`` and pretrained ``init_cfg`` with such a
    path goes through them). Other schemes (``open-mmlab://``, ``torchvision://``, ...) keep
    mmengine's loaders. Idempotent."""
    from mmengine.runner.checkpoint import CheckpointLoader
    if CheckpointLoader._schemes.get('') is not load_local_checkpoint:
        CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint,
                                         force=True)
    if CheckpointLoader._schemes.get('https://') is not load_http_checkpoint:
        CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                         loader=load_http_checkpoint, force=True)
