"""The stand-ins a checkpoint's names reach while it loads, each checking what it builds.

``numpy.dtype``, numpy's ``_reconstruct`` and ``scalar``, ``HistoryBuffer``, ``getattr`` (its
four statistics methods only) and ``bytes`` (``bytes()`` only): :func:`checkpoint_safe_globals`
lists them under the names mmengine checkpoints write. ``numpy.ndarray`` and the dtype under
construction (:func:`fill_only_types`) may receive state but no name reaches them.
"""
import functools
import threading
from typing import Any, Callable, List, Set, Tuple

import numpy as np

from .errors import CheckpointRefusedError, refuse, unsupported

NUMERIC_KINDS = 'biufc'  # bool, signed, unsigned, float, complex
ADMITTED_KINDS = NUMERIC_KINDS + 'SU'  # ... and fixed-size byte / unicode strings
KIND_NAMES = {'O': 'object', 'V': 'void or structured', 'M': 'datetime64',
              'm': 'timedelta64', 'T': 'variable-length string (StringDType)'}
HISTORY_STATISTICS = ('min', 'max', 'mean', 'current')
# numpy dtype flags of items that hold objects or pointers (NPY_ITEM_REFCOUNT, NPY_LIST_PICKLE,
# NPY_ITEM_IS_POINTER, NPY_NEEDS_PYAPI, NPY_USE_GETITEM, NPY_USE_SETITEM).
OBJECT_FLAGS = 0x01 | 0x02 | 0x04 | 0x10 | 0x20 | 0x40
_multiarray = getattr(np, '_core', None) or np.core


def computed_once(func: Callable[[], Any]) -> Callable[[], Any]:
    """``func()`` computed by the first caller only, even with threads calling at once (two
    stand-in classes from two first calls would not recognise each other's instances)."""
    lock = threading.Lock()
    result: List[Any] = []

    @functools.wraps(func)
    def once() -> Any:
        if not result:
            with lock:
                if not result:
                    result.append(func())
        return result[0]

    once.reset = result.clear  # type: ignore[attr-defined]  # computed again (tests)
    return once


#: ``LOADING.unpickler``: the unpickler of the load running in this thread, if any.
LOADING = threading.local()


def current_unpickler(what: str) -> Any:
    """The unpickler of this thread's load; outside a load, a stand-in refuses to act."""
    unpickler = getattr(LOADING, 'unpickler', None)
    if unpickler is None:
        refuse(f'{what} outside mmseg_proto\'s checkpoint loader')
    return unpickler


# --- numpy stand-ins -------------------------------------------------------------------------


def _kind_name(dtype: np.dtype) -> str:
    if dtype.fields is not None or dtype.subdtype is not None:
        return 'structured or subarray'
    return KIND_NAMES.get(dtype.kind, f'kind {dtype.kind!r}')


def _admitted_dtype(spec: Any) -> np.dtype:
    """The dtype numpy names ``spec`` (``'f8'``, ``'U5'``, ...), if it is admitted."""
    if not isinstance(spec, str):
        refuse(f'numpy.dtype({spec!r}) (numpy names a pickled dtype by a string)')
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError):
        refuse(f'numpy dtype {spec!r} (not a dtype numpy knows)')
    if dtype.kind not in ADMITTED_KINDS or dtype.hasobject or dtype.fields is not None or \
            dtype.subdtype is not None:
        why = ('numpy object arrays can hold any Python object, and unpickling those can '
               'run code; ' if dtype.kind == 'O' else '')
        raise CheckpointRefusedError(unsupported(
            f'it holds numpy dtype {spec!r} ({_kind_name(dtype)})',
            f'{why.capitalize()}Convert the value to a bool, integer, float, complex or '
            'string array, a tensor or a plain Python value before saving.'))
    if dtype.itemsize == 0:
        refuse(f'numpy dtype {spec!r} of size 0')
    return dtype


def _dtype_with_state(spec: str, dtype: np.dtype, state: Any) -> np.dtype:
    """``dtype`` with the byte order of a pickled dtype state; any other content of the
    state (fields, subarray, metadata, another size) is refused, and flags are not taken."""
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        refuse(f'numpy dtype {spec!r} with the state {state!r:.80}')
    endian, subarray, names, fields, elsize, alignment, flags = state[1:8]
    metadata = state[8] if len(state) == 9 else None
    if subarray is not None or names is not None or fields is not None or \
            metadata is not None:
        refuse(f'numpy dtype {spec!r} whose state adds fields, a subarray or metadata')
    if endian not in ('<', '>', '|', '='):
        refuse(f'numpy dtype {spec!r} with byte order {endian!r}')
    expected = (dtype.itemsize, dtype.alignment) if dtype.kind in 'SU' else (-1, -1)
    if (elsize, alignment) != expected:
        refuse(f'numpy dtype {spec!r} with size {elsize!r} and alignment {alignment!r} in '
                f'its state (numpy writes {expected[0]} and {expected[1]})')
    if type(flags) is not int or flags & OBJECT_FLAGS & ~dtype.flags:
        refuse(f'numpy dtype {spec!r} with flags {flags!r} in its state (flags of object '
                'or pointer items)')
    if endian in '<>' and dtype.byteorder != '|':
        dtype = dtype.newbyteorder(endian)
    return dtype


class DtypeUnderConstruction:
    """What ``numpy.dtype(name, align, copy)`` gives while a checkpoint loads. Its state
    (the BUILD numpy writes right after) turns it into the admitted dtype, in place on the
    unpickler's stack and memo; a file can neither name nor call this class."""

    __slots__ = ('spec', 'dtype')

    def __init__(self, spec: str, dtype: np.dtype) -> None:
        self.spec, self.dtype = spec, dtype

    def __setstate__(self, state: Any) -> None:
        dtype = _dtype_with_state(self.spec, self.dtype, state)
        current_unpickler(f'numpy dtype {self.spec!r}').state_set(self, dtype)


def _dtype_stand_in(spec: Any, align: Any = False, copy: Any = True) -> DtypeUnderConstruction:
    """Stand-in for ``numpy.dtype`` in a pickle: admitted dtypes, completed by their state."""
    unpickler = current_unpickler(f'numpy dtype {spec!r}')
    pending = DtypeUnderConstruction(spec, _admitted_dtype(spec))
    unpickler.expect_state(pending, f'a numpy dtype {spec!r}')
    return pending


class NdarrayName:
    """What ``numpy.ndarray`` names in a checkpoint: only the subtype argument of
    ``_reconstruct``; calling it builds nothing."""

    def __new__(cls, *args, **kwargs):
        refuse('a call of numpy.ndarray (numpy rebuilds arrays with _reconstruct only)')


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """Stand-in for numpy's ``_reconstruct``: an empty plain ndarray, as numpy pickles it,
    which ``ndarray.__setstate__`` then fills from the file's bytes with an admitted dtype."""
    if subtype is not NdarrayName:
        refuse(f'numpy _reconstruct of {subtype!r} (only numpy.ndarray)')
    if type(shape) is not tuple or shape != (0, ):
        refuse(f'numpy _reconstruct with shape {shape!r} (numpy writes (0,))')
    if not isinstance(typecode, (bytes, str)):
        refuse(f'numpy _reconstruct with dtype {typecode!r}')
    _admitted_dtype(typecode.decode('latin1') if isinstance(typecode, bytes) else typecode)
    return _multiarray.multiarray._reconstruct(np.ndarray, (0, ), typecode)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for numpy's ``scalar``: scalars of admitted dtypes from raw bytes only."""
    if type(dtype) is DtypeUnderConstruction:
        refuse(f'numpy scalar of dtype {dtype.spec!r} before the dtype state is set')
    if not isinstance(dtype, np.dtype) or dtype.kind not in ADMITTED_KINDS or \
            dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or \
            not isinstance(data, bytes):
        refuse(f'numpy scalar of dtype {dtype!r} from {type(data).__name__}')
    return _multiarray.multiarray.scalar(dtype, data)


def _empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes`` (protocol 2 pickles ``b''``, the data of an empty array, as
    ``bytes()``): that call only, never an allocation of a size the file names."""
    if args:
        refuse(f'bytes() called with {len(args)} argument(s) (pickle writes only bytes())')
    return b''


# --- HistoryBuffer stand-ins -----------------------------------------------------------------


def history_buffer_class():
    from mmengine.logging.history_buffer import HistoryBuffer
    return HistoryBuffer


@computed_once
def _make_checkpoint_history_buffer():
    history_buffer = history_buffer_class()

    class CheckpointHistoryBuffer(history_buffer):
        """Stands in for ``HistoryBuffer`` while a checkpoint is unpickled: the instance is
        created bare (never called: no ``__init__`` on a file's arguments) and
        ``__setstate__`` keeps only the numeric history, then turns it into a plain
        ``HistoryBuffer``."""

        def __new__(cls, *args, **kwargs):
            if args or kwargs:
                refuse('HistoryBuffer created with arguments')
            unpickler = current_unpickler('HistoryBuffer')
            instance = super().__new__(cls)
            unpickler.expect_state(instance, 'a HistoryBuffer')
            return instance

        def __init__(self, *args, **kwargs):
            refuse('a call of HistoryBuffer (a checkpoint only sets its state)')

        def __setstate__(self, state: Any) -> None:
            if not isinstance(state, dict):
                refuse(f'HistoryBuffer state of type {type(state).__name__}')
            allowed = {'max_length', '_log_history', '_count_history', 'statistics_methods'}
            if set(state) - allowed or not {'max_length', '_log_history',
                                            '_count_history'} <= set(state):
                refuse(f'HistoryBuffer state with keys {sorted(map(str, state))}')
            methods = state.get('statistics_methods', {})
            if not isinstance(methods, dict) or any(
                    getattr(history_buffer, str(name), None) is not method
                    or name not in HISTORY_STATISTICS for name, method in methods.items()):
                refuse('HistoryBuffer statistics methods other than '
                        f'{"/".join(HISTORY_STATISTICS)}')
            max_length = state['max_length']
            if type(max_length) is not int or max_length < 1:
                refuse(f'HistoryBuffer max_length={max_length!r}')
            logs, counts = state['_log_history'], state['_count_history']
            for array in (logs, counts):
                if type(array) is not np.ndarray or array.ndim != 1 or \
                        array.dtype.kind not in NUMERIC_KINDS:
                    refuse('HistoryBuffer history that is not a 1-d numeric array')
            if logs.shape != counts.shape:
                refuse(f'HistoryBuffer histories of different lengths ({len(logs)} values, '
                        f'{len(counts)} counts)')
            if len(logs) > max_length:
                refuse(f'HistoryBuffer history of {len(logs)} entries, more than its '
                        f'max_length={max_length}')
            current_unpickler('HistoryBuffer').state_set(self)
            self.__class__ = history_buffer
            self._set_default_statistics()  # the class's own, never the file's
            self.__dict__.update(max_length=max_length, _log_history=logs,
                                 _count_history=counts)

    return CheckpointHistoryBuffer


def _history_statistic(obj: Any, name: Any) -> Callable:
    """Stand-in for ``getattr`` (protocol 2 pickles ``HistoryBuffer.mean`` as
    ``getattr(HistoryBuffer, 'mean')``): those four methods and nothing else."""
    history_buffer = history_buffer_class()
    if isinstance(obj, type) and issubclass(obj, history_buffer) and \
            name in HISTORY_STATISTICS:
        return getattr(history_buffer, name)
    owner = 'HistoryBuffer' if isinstance(obj, type) and issubclass(obj, history_buffer) \
        else getattr(obj, '__name__', type(obj).__name__)
    refuse(f'getattr({owner}, {name!r})')


# --- the allow-list of one load --------------------------------------------------------------


@computed_once
def named_stand_ins() -> Tuple[Tuple[Any, str], ...]:
    pairs: List[Tuple[Any, str]] = [
        (_make_checkpoint_history_buffer(), 'mmengine.logging.history_buffer.HistoryBuffer'),
        (_history_statistic, 'builtins.getattr'),
        (_history_statistic, '__builtin__.getattr'),
        (_dtype_stand_in, 'numpy.dtype'),
        (NdarrayName, 'numpy.ndarray'),
        (_empty_bytes, 'builtins.bytes'),
        (_empty_bytes, '__builtin__.bytes'),
    ]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        pairs += [(_reconstruct, f'{module}._reconstruct'), (_scalar, f'{module}.scalar')]
    return tuple(pairs)


def checkpoint_safe_globals() -> List[Tuple[Any, str]]:
    """(object, pickled name) of every name the loader adds to torch's weights-only
    defaults while a checkpoint loads (nothing else can be named)."""
    return list(named_stand_ins())


def fill_only_types() -> Tuple[type, ...]:
    """Types whose instances a checkpoint may fill (BUILD) but never name or call."""
    return (np.ndarray, DtypeUnderConstruction)


def stand_in_names() -> Set[str]:
    """The pickled names only this loader admits, also as torch's messages write them
    (``builtins.getattr`` as ``getattr``)."""
    names = {name for _, name in named_stand_ins()}
    return names | {name.split('.', 1)[1] for name in names if name.startswith('builtins.')}
