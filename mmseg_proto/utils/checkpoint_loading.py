"""Load mmengine checkpoints on torch >= 2.6 without making any other load less safe.

torch 2.6 made ``torch.load(..., weights_only=True)`` the default and mmengine 0.10.x calls
``torch.load`` without the argument. Besides tensors, the checkpoints mmengine writes hold the
message hub's ``HistoryBuffer`` objects (with references to their statistics methods) and numpy
arrays, dtypes and scalars, which the weights-only unpickler refuses, so ``--resume``,
``load_from``, ``mim test --checkpoint`` and ``mmseg.apis.init_model`` fail.

:func:`register_checkpoint_loader` makes :func:`load_local_checkpoint` mmengine's loader of
local files (the scheme every local path goes through), and :func:`load_http_checkpoint` its
loader of ``http://`` / ``https://`` URLs (downloaded, checked, then loaded as a local file).
Both load through :func:`load_checkpoint_file`, which runs torch's own weights-only unpickling
loop (the one ``torch.load(weights_only=True)`` runs) with an allow-list of its own: torch's
process-wide list (``torch.serialization.get_safe_globals()``) is never changed, so loads in
several threads do not interfere and a plain ``torch.load`` anywhere else never sees the
names below. That allow-list adds to torch's defaults stand-ins for exactly what mmengine
writes, each of which checks what it builds:

- ``numpy.dtype``: dtypes of kinds bool, integer, float, complex and fixed-size strings
  (``np.str_`` / ``np.bytes_``), rebuilt from their name and byte order alone; object, void,
  structured, datetime dtypes, and states that would add fields, a subarray or object flags,
  are refused (numpy's own ``dtype.__setstate__`` would accept them: a float64 dtype flagged as
  holding objects, or with a field outside its item, reads or frees memory it does not own);
- ``numpy ... _reconstruct`` / ``numpy ... scalar``: arrays and scalars of those dtypes only,
  arrays created empty and filled from the file's bytes (so no allocation larger than the
  file); ``numpy.ndarray`` is only the class argument of ``_reconstruct``, never callable;
- ``HistoryBuffer``: rebuilt from its numeric history and ``max_length`` alone; the statistics
  methods a file names are checked and never copied into the class-level registry;
- ``getattr``: only ``HistoryBuffer.min / max / mean / current``;
- ``bytes``: only ``bytes()`` (the data of an empty array).

Types that are only ever *filled* (``numpy.ndarray`` and the dtype under construction) can
receive their state but have no name in the allow-list, so no name a file writes reaches
them. An object whose state a file never sets, or uses before setting it, is refused too.

Every refusal is a :class:`CheckpointRefusedError` (an ``UnpicklingError``) whose message
starts with ``mmseg_proto refused to load this checkpoint``, names the file and what was
refused, and never advises retrying with ``weights_only=False``. What an honest file may hold
(another class, a pickle protocol other than torch.save's default 2) is named as such, with
what to do; only what no ``torch.save`` writes is called damaged or crafted. A file that is
not a checkpoint at all (empty, text, HTML, truncated, a TorchScript archive, the legacy tar
format) is an :class:`UnreadableCheckpointError` that says so.

Where the loop cannot run (torch < 2.4, a torch whose private unpickler is not the one this
module was written for, found by a self-check at import that warns once, or
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``), files load with torch's own weights-only loader (tensors
and plain values only), and a refusal says why that loader ran and what to do.

One explicit opt-in, scoped to named files, loads a file the user trusts with torch's full
unpickler: its SHA-256 listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS`` (docs/install.md, "Trusted
checkpoints"). Files are named by content, never by path, and nothing else changes.

``http(s)`` checkpoints are read, in this order, from this module's cache (one entry per URL),
from torch.hub's cache (``<torch.hub.get_dir()>/checkpoints/<file name>``, where torch.hub and
mmengine put them), and only then downloaded, so an offline node uses what is there.
"""
import functools
import hashlib
import http.client
import io
import os
import os.path as osp
import pickle
import re
import struct
import tarfile
import tempfile
import threading
import types
import urllib.error
import urllib.request
import warnings
import zipfile
from typing import Any, Callable, Dict, List, NoReturn, Optional, Set, Tuple
from urllib.parse import urlparse

import numpy as np
import torch
import torch._weights_only_unpickler as _wou

__all__ = [
    'CheckpointRefusedError', 'UnreadableCheckpointError', 'checkpoint_safe_globals',
    'fill_only_types', 'check_checkpoint_format', 'load_checkpoint_file',
    'load_with_checkpoint_globals', 'load_local_checkpoint', 'load_http_checkpoint',
    'http_cache_path', 'torch_hub_cache_path', 'register_checkpoint_loader',
    'checkpoint_loader_problem', 'trusted_checkpoint_digests', 'TRUSTED_VARIABLE'
]

NUMERIC_KINDS = 'biufc'  # bool, signed, unsigned, float, complex
ADMITTED_KINDS = NUMERIC_KINDS + 'SU'  # ... and fixed-size byte / unicode strings
KIND_NAMES = {'O': 'object', 'V': 'void or structured', 'M': 'datetime64',
              'm': 'timedelta64', 'T': 'variable-length string (StringDType)'}
HISTORY_STATISTICS = ('min', 'max', 'mean', 'current')
_multiarray = getattr(np, '_core', None) or np.core

REFUSED = 'mmseg_proto refused to load this checkpoint'
ADMITTED = ('tensors, numpy arrays and scalars of bool, integer, float, complex and string '
            'dtypes, and mmengine HistoryBuffer logs')
NEVER_UNSAFE = ('do not load it with torch.load(weights_only=False), which runs whatever '
                'a file names, unless you made the file yourself')
# numpy dtype flags of items that hold objects or pointers (NPY_ITEM_REFCOUNT, NPY_LIST_PICKLE,
# NPY_ITEM_IS_POINTER, NPY_NEEDS_PYAPI, NPY_USE_GETITEM, NPY_USE_SETITEM).
OBJECT_FLAGS = 0x01 | 0x02 | 0x04 | 0x10 | 0x20 | 0x40
ZIP_MAGIC = b'PK\x03\x04'
PICKLE_PROTO = 0x80
DOWNLOAD_TIMEOUT_S = 60
#: torch.hub's convention for a SHA-256 prefix in a file name (``NAME-<hex>.pth``).
HUB_HASH_IN_NAME = re.compile(r'-([a-f0-9]*)\.')
#: The explicit opt-in: SHA-256 digests of files to load with torch's full unpickler.
TRUSTED_VARIABLE = 'MMSEG_PROTO_TRUSTED_CHECKPOINTS'
TRUSTED_DOC = 'docs/install.md, "Trusted checkpoints"'
#: The torch this release is tested with (requirements/constraints.txt).
TORCH_PIN = ('torch 2.13.0, the version requirements/constraints.txt pins (`pip install -c '
             'requirements/constraints.txt torch`)')


class CheckpointRefusedError(pickle.UnpicklingError):
    """A checkpoint holding something the loader does not admit (the message says what).

    Attributes:
        honest (bool): Whether an honest file may hold what was refused (another class, a
            pickle protocol other than 2); False for what no ``torch.save`` writes.
        opcode (int, optional): The pickle opcode torch's unpickler does not read, if that
            was the refusal.
    """

    def __init__(self, message: str, honest: bool = False,
                 opcode: Optional[int] = None) -> None:
        super().__init__(message)
        self.honest, self.opcode = honest, opcode


class UnreadableCheckpointError(RuntimeError):
    """A file that is not a checkpoint ``torch.save`` wrote, or one that is cut short."""


def _crafted(what: str) -> str:
    return (f'{REFUSED}: {what}. No torch.save of {ADMITTED} writes this: the file is damaged '
            f'or was crafted; {NEVER_UNSAFE}.')


def _unsupported(what: str, advice: str) -> str:
    return (f'{REFUSED}: {what}, which this loader does not admit (it admits {ADMITTED}). '
            f'{advice}')


def _refuse(what: str) -> NoReturn:
    """Refuse what no ``torch.save`` of admitted data writes: a damaged or crafted file."""
    raise CheckpointRefusedError(_crafted(what))


def _refuse_unsupported(what: str, advice: str) -> NoReturn:
    """Refuse a value an honest file may hold but this loader does not admit."""
    raise CheckpointRefusedError(_unsupported(what, advice))


def _our_names() -> Set[str]:
    """The pickled names only this module's loader admits, also as torch's messages write
    them (``builtins.getattr`` as ``getattr``)."""
    names = {name for _, name in _named_stand_ins()}
    return names | {name.split('.', 1)[1] for name in names if name.startswith('builtins.')}


def _refusal_of_torch_message(
        message: str, fallback: Optional[Tuple[str, str]] = None) -> CheckpointRefusedError:
    """Our refusal for an ``UnpicklingError`` of torch's weights-only unpickling loop.

    Args:
        message (str): torch's message.
        fallback (tuple[str, str], optional): Why torch's own weights-only loader ran
            instead of this module's, and what to do (:func:`_torch_defaults_reason`); None
            when this module's loop ran.
    """
    first = message.strip().split('\n')[0].strip()
    named = re.search(r'GLOBAL (\S+?)(?: whose | was |\.?$)', first)
    operand = re.match(r'Unsupported operand (\d+)', first)
    if named and 'is blocked' in first:
        return CheckpointRefusedError(
            _crafted(f'it names {named.group(1)}, from a module that is never admitted'))
    if named and 'not an allowed global' in first:
        name = named.group(1)
        if fallback is not None:
            return CheckpointRefusedError(_fallback_refusal(name, fallback), honest=True)
        return CheckpointRefusedError(_unsupported(
            f'it names {name}',
            f'If the file is yours and {name} is a plain data class of yours, admit it with '
            f'torch.serialization.add_safe_globals([{name}]) before loading; otherwise save '
            'plain values instead.'), honest=True)
    if operand:
        code = int(operand.group(1))
        return CheckpointRefusedError(
            _crafted(f'pickle opcode {code} ({chr(code)!r}), which torch.save (pickle '
                     'protocol 2) never writes'), opcode=code)
    return CheckpointRefusedError(_crafted(first.rstrip('.')))


def _fallback_refusal(name: str, reason: Tuple[str, str]) -> str:
    """The refusal of ``name`` by torch's own weights-only loader, which ran because of
    ``reason`` = (why, what to do)."""
    why, advice = reason
    if name in _our_names():
        held = ('mmengine\'s training log, held by every checkpoint mmengine saves'
                if name.endswith('HistoryBuffer') else 'data mmengine checkpoints hold')
        return (f'{REFUSED}: it names {name}: {held}. mmseg_proto\'s loader admits it (it '
                f'admits {ADMITTED}), but did not run because {why}; torch\'s own '
                'weights-only loader ran instead, and it admits tensors and plain Python '
                f'values only. Nothing is wrong with the file. {advice}')
    return (f'{REFUSED}: it names {name}, which neither mmseg_proto\'s loader nor torch\'s '
            f'own weights-only loader admits (the latter ran because {why}). If the file is '
            f'yours and {name} is a plain data class of yours, admit it with '
            f'torch.serialization.add_safe_globals([{name}]) before loading; otherwise save '
            'plain values instead.')


def _computed_once(func: Callable[[], Any]) -> Callable[[], Any]:
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


# --- numpy stand-ins -------------------------------------------------------------------------


def _kind_name(dtype: np.dtype) -> str:
    if dtype.fields is not None or dtype.subdtype is not None:
        return 'structured or subarray'
    return KIND_NAMES.get(dtype.kind, f'kind {dtype.kind!r}')


def _admitted_dtype(spec: Any) -> np.dtype:
    """The dtype numpy names ``spec`` (``'f8'``, ``'U5'``, ...), if it is admitted."""
    if not isinstance(spec, str):
        _refuse(f'numpy.dtype({spec!r}) (numpy names a pickled dtype by a string)')
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError):
        _refuse(f'numpy dtype {spec!r} (not a dtype numpy knows)')
    if dtype.kind not in ADMITTED_KINDS or dtype.hasobject or dtype.fields is not None or \
            dtype.subdtype is not None:
        why = ('numpy object arrays can hold any Python object, and unpickling those can '
               'run code; ' if dtype.kind == 'O' else '')
        _refuse_unsupported(
            f'it holds numpy dtype {spec!r} ({_kind_name(dtype)})',
            f'{why.capitalize()}Convert the value to a bool, integer, float, complex or '
            'string array, a tensor or a plain Python value before saving.')
    if dtype.itemsize == 0:
        _refuse(f'numpy dtype {spec!r} of size 0')
    return dtype


def _dtype_with_state(spec: str, dtype: np.dtype, state: Any) -> np.dtype:
    """``dtype`` with the byte order of a pickled dtype state; any other content of the
    state (fields, subarray, metadata, another size) is refused, and flags are not taken."""
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        _refuse(f'numpy dtype {spec!r} with the state {state!r:.80}')
    endian, subarray, names, fields, elsize, alignment, flags = state[1:8]
    metadata = state[8] if len(state) == 9 else None
    if subarray is not None or names is not None or fields is not None or \
            metadata is not None:
        _refuse(f'numpy dtype {spec!r} whose state adds fields, a subarray or metadata')
    if endian not in ('<', '>', '|', '='):
        _refuse(f'numpy dtype {spec!r} with byte order {endian!r}')
    expected = (dtype.itemsize, dtype.alignment) if dtype.kind in 'SU' else (-1, -1)
    if (elsize, alignment) != expected:
        _refuse(f'numpy dtype {spec!r} with size {elsize!r} and alignment {alignment!r} in '
                f'its state (numpy writes {expected[0]} and {expected[1]})')
    if type(flags) is not int or flags & OBJECT_FLAGS & ~dtype.flags:
        _refuse(f'numpy dtype {spec!r} with flags {flags!r} in its state (flags of object '
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
        _current_unpickler(f'numpy dtype {self.spec!r}').state_set(self, dtype)


def _dtype_stand_in(spec: Any, align: Any = False, copy: Any = True) -> DtypeUnderConstruction:
    """Stand-in for ``numpy.dtype`` in a pickle: admitted dtypes, completed by their state."""
    unpickler = _current_unpickler(f'numpy dtype {spec!r}')
    pending = DtypeUnderConstruction(spec, _admitted_dtype(spec))
    unpickler.expect_state(pending, f'a numpy dtype {spec!r}')
    return pending


class NdarrayName:
    """What ``numpy.ndarray`` names in a checkpoint: only the subtype argument of
    ``_reconstruct``; calling it builds nothing."""

    def __new__(cls, *args, **kwargs):
        _refuse('a call of numpy.ndarray (numpy rebuilds arrays with _reconstruct only)')


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """Stand-in for numpy's ``_reconstruct``: an empty plain ndarray, as numpy pickles it,
    which ``ndarray.__setstate__`` then fills from the file's bytes with an admitted dtype."""
    if subtype is not NdarrayName:
        _refuse(f'numpy _reconstruct of {subtype!r} (only numpy.ndarray)')
    if type(shape) is not tuple or shape != (0, ):
        _refuse(f'numpy _reconstruct with shape {shape!r} (numpy writes (0,))')
    if not isinstance(typecode, (bytes, str)):
        _refuse(f'numpy _reconstruct with dtype {typecode!r}')
    _admitted_dtype(typecode.decode('latin1') if isinstance(typecode, bytes) else typecode)
    return _multiarray.multiarray._reconstruct(np.ndarray, (0, ), typecode)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for numpy's ``scalar``: scalars of admitted dtypes from raw bytes only."""
    if type(dtype) is DtypeUnderConstruction:
        _refuse(f'numpy scalar of dtype {dtype.spec!r} before the dtype state is set')
    if not isinstance(dtype, np.dtype) or dtype.kind not in ADMITTED_KINDS or \
            dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or \
            not isinstance(data, bytes):
        _refuse(f'numpy scalar of dtype {dtype!r} from {type(data).__name__}')
    return _multiarray.multiarray.scalar(dtype, data)


def _empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes`` (protocol 2 pickles ``b''``, the data of an empty array, as
    ``bytes()``): that call only, never an allocation of a size the file names."""
    if args:
        _refuse(f'bytes() called with {len(args)} argument(s) (pickle writes only bytes())')
    return b''


# --- HistoryBuffer stand-ins -----------------------------------------------------------------


def _history_buffer_class():
    from mmengine.logging.history_buffer import HistoryBuffer
    return HistoryBuffer


@_computed_once
def _make_checkpoint_history_buffer():
    history_buffer = _history_buffer_class()

    class CheckpointHistoryBuffer(history_buffer):
        """Stands in for ``HistoryBuffer`` while a checkpoint is unpickled: the instance is
        created bare (never called: no ``__init__`` on a file's arguments) and
        ``__setstate__`` keeps only the numeric history, then turns it into a plain
        ``HistoryBuffer``."""

        def __new__(cls, *args, **kwargs):
            if args or kwargs:
                _refuse('HistoryBuffer created with arguments')
            unpickler = _current_unpickler('HistoryBuffer')
            instance = super().__new__(cls)
            unpickler.expect_state(instance, 'a HistoryBuffer')
            return instance

        def __init__(self, *args, **kwargs):
            _refuse('a call of HistoryBuffer (a checkpoint only sets its state)')

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
                _refuse(f'HistoryBuffer histories of different lengths ({len(logs)} values, '
                        f'{len(counts)} counts)')
            if len(logs) > max_length:
                _refuse(f'HistoryBuffer history of {len(logs)} entries, more than its '
                        f'max_length={max_length}')
            _current_unpickler('HistoryBuffer').state_set(self)
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


# --- the allow-list of one load --------------------------------------------------------------


@_computed_once
def _named_stand_ins() -> Tuple[Tuple[Any, str], ...]:
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
    return list(_named_stand_ins())


def fill_only_types() -> Tuple[type, ...]:
    """Types whose instances a checkpoint may fill (BUILD) but never name or call."""
    return (np.ndarray, DtypeUnderConstruction)


class _AllowedGlobals(dict):
    """Name -> object of one load: torch's process-wide additions, then ours. ``values()``
    (which torch's loop asks to decide what may be called, created or filled) also holds
    the fill-only types, which no key names."""

    def values(self):  # type: ignore[override]
        return list(super().values()) + list(fill_only_types())


def _allowed_during_load() -> _AllowedGlobals:
    allowed = _AllowedGlobals(_wou._get_user_allowed_globals())
    allowed.update({name: obj for obj, name in _named_stand_ins()})
    return allowed


@_computed_once
def _unpickling_loop() -> Optional[Callable]:
    """torch's weights-only ``Unpickler.load``, reading our allow-list instead of torch's
    process-wide one (the same code object with another global namespace), or None where
    this torch's loop has no allow-list to replace (torch < 2.4)."""
    load = getattr(getattr(_wou, 'Unpickler', None), 'load', None)
    code = getattr(load, '__code__', None)
    if code is None or '_get_user_allowed_globals' not in code.co_names or \
            not callable(getattr(_wou, '_get_user_allowed_globals', None)):
        return None
    namespace = dict(vars(_wou))
    namespace['_get_user_allowed_globals'] = _allowed_during_load
    return types.FunctionType(code, namespace, load.__name__, load.__defaults__,
                              load.__closure__)


class _NeverAdmitted:
    """A class no allow-list names: the self-check's loop must refuse it."""


def _self_check() -> None:
    """Load, in memory, what mmengine writes (a HistoryBuffer, numpy arrays and scalars,
    tensors) through this module's loader, and a class nobody admits; raise if the loop
    does not give them back, or does not refuse the class."""
    history = _history_buffer_class()([1.0, 3.0], [1, 1], max_length=4)
    saved = dict(h=history, a=np.arange(3, dtype=np.float32), s=np.int64(3),
                 t=torch.ones(2))
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    out = torch.load(buffer, map_location='cpu', pickle_module=PICKLE_MODULE,
                     weights_only=False, mmap=False)
    if type(out['h']) is not type(history) or out['h'].mean() != 2.0 or \
            out['a'].tolist() != [0.0, 1.0, 2.0] or out['s'] != 3 or \
            not torch.equal(out['t'], saved['t']):
        raise RuntimeError('the loaded values differ from the saved ones')
    buffer = io.BytesIO()
    torch.save(dict(c=_NeverAdmitted), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, pickle_module=PICKLE_MODULE, weights_only=False, mmap=False)
    except CheckpointRefusedError:
        return
    raise RuntimeError('a class no allow-list names was loaded')


def _missing_loop_reason() -> str:
    """Why :func:`_unpickling_loop` found no loop to clone."""
    if not callable(getattr(_wou, '_get_user_allowed_globals', None)):
        return (f'torch {torch.__version__} has no per-load allow-list in its weights-only '
                'unpickler (torch < 2.4)')
    return (f'torch {torch.__version__}\'s private weights-only unpickler '
            '(torch._weights_only_unpickler.Unpickler.load) is not the one mmseg_proto was '
            'written for')


def _loader_unusable() -> bool:
    return _unpickling_loop() is None or checkpoint_loader_problem() is not None


@_computed_once
def checkpoint_loader_problem() -> Optional[str]:
    """Why this module's loader cannot run with this torch (None when it can): checked once
    per process, cheaply (the loop's code, then a self-check in memory of a few ms).

    Returns:
        str | None: A sentence naming the torch version and what is wrong.
    """
    if _unpickling_loop() is None:
        return _missing_loop_reason()
    try:
        _self_check()
    except Exception as error:  # whatever the changed loop does, it is reported, once
        detail = str(error).strip().split('\n')[0][:200]
        return (f'torch {torch.__version__}\'s private weights-only unpickler '
                '(torch._weights_only_unpickler.Unpickler.load) is not the one mmseg_proto '
                'was written for: its self-check (a small mmengine-style checkpoint, in '
                f'memory) failed with {type(error).__name__}: {detail}')
    return None


def _torch_defaults_reason() -> Tuple[str, str]:
    """(why torch's own weights-only loader runs instead of this module's, what to do)."""
    if _weights_only_unpickling_forced():
        return ('TORCH_FORCE_WEIGHTS_ONLY_LOAD is set in the environment (it asks torch, and '
                'mmseg_proto with it, for weights-only loading)',
                'Unset TORCH_FORCE_WEIGHTS_ONLY_LOAD for this run: mmseg_proto\'s loader then '
                'loads the file, each admitted value checked.')
    problem = _missing_loop_reason() if _unpickling_loop() is None else \
        checkpoint_loader_problem()
    return (problem or 'mmseg_proto\'s loader is unavailable',
            f'Use the torch this mmseg_proto is tested with, {TORCH_PIN}, and the file loads '
            'as it is.')


@_computed_once
def warn_if_loader_unusable() -> Optional[str]:
    """Warn, once per process, when this module's loader cannot run with this torch
    (:func:`checkpoint_loader_problem`); :func:`register_checkpoint_loader` calls it at
    import. Returns the problem, or None."""
    problem = checkpoint_loader_problem()
    if problem is not None:
        warnings.warn(
            f'mmseg_proto: {problem}. Checkpoints will load with torch\'s own weights-only '
            'loader (tensors and plain Python values only), which refuses mmengine\'s '
            'training logs and numpy values: --resume and load_from of whole mmengine '
            f'checkpoints will fail. Use the torch this mmseg_proto is tested with, '
            f'{TORCH_PIN}.', UserWarning, stacklevel=3)
    return problem


_LOADING = threading.local()


def _current_unpickler(what: str) -> '_CheckpointUnpickler':
    unpickler = getattr(_LOADING, 'unpickler', None)
    if unpickler is None:
        _refuse(f'{what} outside mmseg_proto\'s checkpoint loader')
    return unpickler


class _Pending:
    __slots__ = ('obj', 'what', 'memo_keys')

    def __init__(self, obj: Any, what: str) -> None:
        self.obj, self.what, self.memo_keys = obj, what, []


class _Memo(dict):
    """The unpickler's memo: it will not hand out an object whose state is still unset."""

    def __init__(self, pending: Dict[int, _Pending]) -> None:
        super().__init__()
        self.pending = pending

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        entry = self.pending.get(id(value))
        if entry is not None and entry.obj is value:
            entry.memo_keys.append(key)

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        entry = self.pending.get(id(value))
        if entry is not None and entry.obj is value:
            _refuse(f'{entry.what} used before its state is set')
        return value


class _CheckpointUnpickler(_wou.Unpickler):
    """torch's weights-only unpickler with the allow-list of :func:`checkpoint_safe_globals`
    for this load only (torch's process-wide list is read, never changed)."""

    def __init__(self, file, *, encoding: str = 'bytes') -> None:
        super().__init__(file, encoding=encoding)
        self.pending: Dict[int, _Pending] = {}
        self.memo = _Memo(self.pending)

    def expect_state(self, obj: Any, what: str) -> None:
        """Record ``obj``, which the file must complete with a BUILD before using it."""
        self.pending[id(obj)] = _Pending(obj, what)

    def state_set(self, obj: Any, replacement: Any = None) -> None:
        """``obj`` got its state; ``replacement`` (if given) takes its place on the stack
        and in the memo."""
        entry = self.pending.pop(id(obj), None)
        if entry is None or entry.obj is not obj:
            _refuse(f'a second state for {type(obj).__name__}')
        if replacement is not None:
            if not self.stack or self.stack[-1] is not obj:
                _refuse(f'{entry.what} completed off the unpickler stack')
            self.stack[-1] = replacement
            for key in entry.memo_keys:
                if dict.get(self.memo, key) is obj:
                    dict.__setitem__(self.memo, key, replacement)

    def load(self) -> Any:
        loop = _unpickling_loop()
        if loop is None:
            raise RuntimeError('mmseg_proto: _CheckpointUnpickler needs torch >= 2.4')
        previous = getattr(_LOADING, 'unpickler', None)
        _LOADING.unpickler = self
        try:
            result = loop(self)
        except CheckpointRefusedError:
            raise
        except pickle.UnpicklingError as error:
            raise _refusal_of_torch_message(str(error)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
                struct.error) as error:  # an admitted call or opcode given what no save writes
            raise CheckpointRefusedError(_crafted(
                f'unpickling failed with {type(error).__name__}: {error}')) from None
        finally:
            _LOADING.unpickler = previous
        if self.pending:
            _refuse(f'{next(iter(self.pending.values())).what} whose state the file never '
                    'sets')
        return result


def _pickle_load(file, *, encoding: str = 'ASCII', **kwargs) -> Any:
    return _CheckpointUnpickler(file, encoding=encoding).load()


PICKLE_MODULE = types.ModuleType(
    'mmseg_proto_checkpoint_pickle',
    'The pickle_module torch.load gets from load_checkpoint_file: torch\'s weights-only '
    'unpickler with the allow-list of one checkpoint load.')
PICKLE_MODULE.Unpickler = _CheckpointUnpickler  # type: ignore[attr-defined]
PICKLE_MODULE.load = _pickle_load  # type: ignore[attr-defined]


# --- loading a file --------------------------------------------------------------------------


def _describe_start(head: bytes) -> str:
    text = head.lstrip()[:1]
    if text == b'<':
        return ' (an HTML or XML page?)'
    try:
        head.decode('utf-8')
        return ' (a text file?)'
    except UnicodeDecodeError:
        return ''


def check_checkpoint_format(file, name: str) -> bool:
    """Raise :class:`UnreadableCheckpointError` unless ``file`` (open, binary, at its start)
    is what ``torch.save`` writes: a complete zip archive that is not TorchScript, or a
    legacy (torch < 1.6) pickle. The file is left at its start.

    Args:
        file: The open file.
        name (str): How messages name the file (a path, or a URL and a path).

    Returns:
        bool: True for a zip archive, False for the legacy format.
    """
    head = file.read(64)
    file.seek(0)
    if not head:
        raise UnreadableCheckpointError(f'{name} is empty: not a readable checkpoint')
    if head.startswith(ZIP_MAGIC):
        try:
            archive = torch.serialization._open_zipfile_reader(file)
        except (RuntimeError, OSError) as error:
            raise UnreadableCheckpointError(
                f'{name} is not a readable checkpoint: a truncated or damaged zip archive '
                f'({str(error).splitlines()[0]})') from None
        with archive as reader:
            if torch.serialization._is_torchscript_zip(reader):
                raise UnreadableCheckpointError(
                    f'{name} is a TorchScript archive (torch.jit.save), not a checkpoint: '
                    'load it with torch.jit.load, and only if you trust it')
        file.seek(0)
        return True
    try:
        with tarfile.open(fileobj=file, mode='r:'):
            is_tar = True
    except tarfile.TarError:
        is_tar = False
    file.seek(0)
    if is_tar:
        raise UnreadableCheckpointError(
            f'{name} is in torch\'s legacy tar format (torch < 0.4), which this loader does '
            'not read: load it once with an old torch you trust and save it again')
    if head[0] != PICKLE_PROTO:
        raise UnreadableCheckpointError(
            f'{name} is not a readable checkpoint: torch.save writes a zip archive (or, '
            f'before torch 1.6, a pickle), but this file starts with {head[:16]!r}'
            f'{_describe_start(head)}')
    return False


def _weights_only_unpickling_forced() -> bool:
    return os.getenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '0').lower() in ('1', 'y', 'yes', 'true')


def trusted_checkpoint_digests() -> Set[str]:
    """The SHA-256 digests listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS`` (read at each load).

    The variable lists the digests (64 hex digits, as ``sha256sum FILE`` prints them),
    separated by commas or white space, of files the user trusts: those, and only those,
    load with torch's full unpickler. Files are named by content, never by path, so a file
    replaced at the same path is not trusted.

    Returns:
        set[str]: Lower-case digests; empty when the variable is unset or empty.

    Raises:
        ValueError: An entry is not a SHA-256 digest (the message names it).
    """
    entries = [entry for entry in re.split(r'[\s,]+', os.getenv(TRUSTED_VARIABLE, '')) if entry]
    for entry in entries:
        if not re.fullmatch(r'[0-9a-fA-F]{64}', entry):
            raise ValueError(
                f'mmseg_proto: {TRUSTED_VARIABLE} lists {entry[:80]!r}, which is not a SHA-256 '
                'digest: it takes the digests (64 hex digits, as `sha256sum FILE` prints '
                'them) of the checkpoint files you trust, separated by commas or spaces, '
                f'never paths ({TRUSTED_DOC})')
    return {entry.lower() for entry in entries}


def _sha256(file) -> str:
    """SHA-256 of an open binary file, read from its start; the file is left at its start."""
    file.seek(0)
    digest = hashlib.sha256()
    for block in iter(lambda: file.read(1 << 20), b''):
        digest.update(block)
    file.seek(0)
    return digest.hexdigest()


def _file_sha256(filename: str) -> str:
    with open(filename, 'rb') as file:
        return _sha256(file)


def _trust_advice(filename: str) -> str:
    """How to load ``filename`` anyway, if the user trusts it."""
    if _weights_only_unpickling_forced():
        return ''
    return (f' If you trust this file (an official release from its publisher, or a file you '
            'saved yourself), you can let mmseg_proto load this file, and only this file, '
            f'with torch\'s full unpickler: set {TRUSTED_VARIABLE}={_file_sha256(filename)} '
            f'(its SHA-256; {TRUSTED_DOC}).')


def _load_trusted(file, filename: str, map_location: Any) -> Any:
    """Load a file whose SHA-256 the user listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS``
    with torch's full unpickler (from the very bytes that were hashed)."""
    if _weights_only_unpickling_forced():
        raise CheckpointRefusedError(
            f'{REFUSED} ({filename}): its SHA-256 is listed in {TRUSTED_VARIABLE}, but '
            'TORCH_FORCE_WEIGHTS_ONLY_LOAD is set too, which makes torch load tensors and '
            'plain Python values only: unset one of the two', honest=True)
    from mmengine.logging import print_log
    print_log(f'mmseg_proto: loading {filename} with torch\'s full unpickler: its SHA-256 is '
              f'listed in {TRUSTED_VARIABLE}', logger='current')
    return torch.load(file, map_location=map_location, weights_only=False)


def _saved_protocol(filename: str) -> Optional[int]:
    """The pickle protocol a checkpoint was written with (None if it names none)."""
    try:
        with open(filename, 'rb') as file:
            head = file.read(4)
            file.seek(0)
            if head.startswith(ZIP_MAGIC):
                with zipfile.ZipFile(file) as archive:
                    names = [name for name in archive.namelist()
                             if name == 'data.pkl' or name.endswith('/data.pkl')]
                    if not names:
                        return None
                    with archive.open(names[0]) as data:
                        head = data.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) >= 2 and head[0] == PICKLE_PROTO else None


def _protocol_refusal(filename: str, protocol: int, opcode: int) -> CheckpointRefusedError:
    return CheckpointRefusedError(
        f'{REFUSED} ({filename}): it was saved with pickle protocol {protocol} '
        f'(torch.save(..., pickle_protocol={protocol})), and torch\'s weights-only unpickler, '
        f'which this loader runs, does not read that protocol\'s opcode {opcode} '
        f'({chr(opcode)!r}); it reads torch.save\'s default, protocol 2. Nothing shows the '
        'file is damaged: save it again without pickle_protocol (the default).'
        f'{_trust_advice(filename)}', honest=True, opcode=opcode)


def _with_filename(error: CheckpointRefusedError, filename: str) -> CheckpointRefusedError:
    """``error`` naming ``filename``, with the protocol of the file where an opcode was
    refused and, for what an honest file may hold, how to load a file one trusts."""
    if error.opcode is not None:
        protocol = _saved_protocol(filename)
        if protocol is not None and protocol > 2:
            return _protocol_refusal(filename, protocol, error.opcode)
    text = str(error).replace(REFUSED, f'{REFUSED} ({filename})', 1)
    if error.honest and TRUSTED_VARIABLE not in text:
        text += _trust_advice(filename)
    return CheckpointRefusedError(text, honest=error.honest, opcode=error.opcode)


def load_checkpoint_file(filename: str, map_location: Any = None) -> Any:
    """Load a local checkpoint file with the allow-list described in the module docstring,
    for this load only (safe to call from several threads at once).

    A file whose SHA-256 is listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS``
    (:func:`trusted_checkpoint_digests`) loads with torch's full unpickler instead.

    Args:
        filename (str): The file.
        map_location: As in ``torch.load``. Default: None.

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: No such file.
        UnreadableCheckpointError: Not a checkpoint ``torch.save`` wrote, or cut short.
        CheckpointRefusedError: It holds something that is not admitted.
        ValueError: ``MMSEG_PROTO_TRUSTED_CHECKPOINTS`` lists something else than digests.
    """
    filename = osp.expanduser(str(filename))
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if filename.endswith('.safetensors'):  # torch reads these without unpickling
        return torch.load(filename, map_location=map_location, weights_only=True)
    trusted = trusted_checkpoint_digests()
    ends_early = ('is not a readable checkpoint: its data ends early (a truncated file?)')
    try:
        with open(filename, 'rb') as file:
            is_zip = check_checkpoint_format(file, filename)
            if trusted and _sha256(file) in trusted:
                return _load_trusted(file, filename, map_location)
            # A zip archive cut short fails the check above; a legacy file can only show it
            # while it is read, so the reads note where the file ends.
            source = file if is_zip else _EndNoting(file)
            try:
                if _weights_only_unpickling_forced() or _loader_unusable():
                    return _load_with_torch_defaults(source, map_location)
                return torch.load(source, map_location=map_location,
                                  pickle_module=PICKLE_MODULE, weights_only=False, mmap=False)
            except Exception:
                if getattr(source, 'ended', False):
                    raise UnreadableCheckpointError(f'{filename} {ends_early}') from None
                raise
    except CheckpointRefusedError as error:
        raise _with_filename(error, filename) from None
    except EOFError:
        raise UnreadableCheckpointError(f'{filename} {ends_early}') from None
    except RuntimeError as error:  # a record of the zip archive that cannot be read
        if 'PytorchStreamReader' not in str(error):
            raise
        raise UnreadableCheckpointError(
            f'{filename} is not a readable checkpoint: a damaged zip archive '
            f'({str(error).splitlines()[0]})') from None


class _EndNoting:
    """A binary file for torch's legacy-format reader that notes a read reaching its end
    (a complete legacy file never asks for more than it holds)."""

    def __init__(self, file) -> None:
        self.file, self.ended = file, False

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        if size is not None and 0 <= size and len(data) < size:
            self.ended = True
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self.file.readline(size)
        if not line.endswith(b'\n') and (size is None or size < 0 or len(line) < size):
            self.ended = True
        return line

    def readinto(self, buffer) -> int:
        count = self.file.readinto(buffer)
        if count < memoryview(buffer).nbytes:
            self.ended = True
        return count

    def seek(self, *args) -> int:
        return self.file.seek(*args)

    def tell(self) -> int:
        return self.file.tell()

    def seekable(self) -> bool:
        return True


def _load_with_torch_defaults(file, map_location: Any) -> Any:
    """torch < 2.4 (no allow-list to pass), a torch whose private unpickler is not the one
    this module was written for, or TORCH_FORCE_WEIGHTS_ONLY_LOAD: torch's own weights-only
    load (tensors only), with a refusal that says why this loader ran and what to do."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps its unpickler's message in advice to retry with weights_only=False,
        # the one advice that runs a crafted file: keep only the unpickler's message.
        message = str(error)
        if 'WeightsUnpickler error:' in message:
            message = message.split('WeightsUnpickler error:')[-1]
        elif '\n\n' in message:
            message = message.split('\n\n', 1)[1]
        raise _refusal_of_torch_message(
            message.strip().replace('Weights only load failed. ', ''),
            fallback=_torch_defaults_reason()) from None


def load_with_checkpoint_globals(load: Callable, *args, **kwargs) -> Any:
    """Kept for callers of earlier versions: ``load_with_checkpoint_globals(torch.load,
    FILE, map_location=...)`` is :func:`load_checkpoint_file` of ``FILE``.

    Args:
        load (Callable): Must be ``torch.load``.
        *args: ``torch.load``'s file and, optionally, ``map_location``.
        **kwargs: ``map_location`` only.

    Returns:
        The loaded object.
    """
    if load is not torch.load or not 1 <= len(args) <= 2 or set(kwargs) - {'map_location'}:
        raise TypeError('load_with_checkpoint_globals: call it as (torch.load, FILE[, '
                        'map_location]); it no longer admits anything around another '
                        'function: use load_checkpoint_file(FILE, map_location)')
    map_location = args[1] if len(args) == 2 else kwargs.get('map_location')
    return load_checkpoint_file(args[0], map_location=map_location)


def load_local_checkpoint(filename: str, map_location=None) -> Any:
    """mmengine's loader of local checkpoint files: :func:`load_checkpoint_file`.

    It replaces the loader mmengine registers for local paths rather than wrapping it: the
    OneDL fork's loader (onedl-mmengine 0.10.12) admits the real ``getattr``, ``numpy.dtype``
    and ``numpy.ndarray`` and, when weights-only loading fails, falls back to
    ``weights_only=False``, i.e. runs whatever a crafted file contains.

    Args:
        filename (str): The file.
        map_location: As in ``torch.load``. Default: None.
    """
    return load_checkpoint_file(filename, map_location=map_location)


# --- http(s) ---------------------------------------------------------------------------------


def _default_model_dir() -> str:
    torch_home = os.getenv('TORCH_HOME', osp.join(os.getenv('XDG_CACHE_HOME', '~/.cache'),
                                                  'torch'))
    return osp.join(osp.expanduser(torch_home), 'checkpoints')


def _url_file_name(url: str) -> str:
    """The file name at the end of ``url``'s path (what torch.hub names its copy)."""
    path = urlparse(url).path
    name = osp.basename(path)
    if name in ('', '.', '..'):
        where = f'its path {path!r} ends with {"/" if not name else name!r}' if path else \
            'it has no path'
        raise ValueError(
            f'mmseg_proto: the checkpoint URL {url} names no file ({where}): give the URL of '
            'the checkpoint file itself, e.g. https://host/path/model.pth')
    return name


def http_cache_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where :func:`load_http_checkpoint` caches ``url``: ``MODEL_DIR/mmseg_proto/<first 16
    hex digits of the URL's SHA-256>/<file name>``, so two URLs with the same file name
    (other hosts, folders or query strings) never share an entry. ``MODEL_DIR`` defaults to
    ``$TORCH_HOME/checkpoints``.

    Args:
        url (str): The checkpoint URL.
        model_dir (str, optional): The cache folder. Default: None (torch's).

    Returns:
        str: The cache path.
    """
    name = _url_file_name(url)
    key = hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]
    return osp.join(model_dir or _default_model_dir(), 'mmseg_proto', key, name)


def torch_hub_cache_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where torch.hub (``load_state_dict_from_url``) and mmengine's own http loader keep
    ``url``: ``<model_dir or torch.hub.get_dir()/checkpoints>/<file name of the URL>``
    (``$TORCH_HOME/hub/checkpoints/NAME`` by default). :func:`load_http_checkpoint` reads a
    file there before downloading, and never writes there.

    Args:
        url (str): The checkpoint URL.
        model_dir (str, optional): The folder given to the loader. Default: None
            (torch.hub's).

    Returns:
        str: The path torch.hub would use.
    """
    return osp.join(model_dir or osp.join(torch.hub.get_dir(), 'checkpoints'),
                    _url_file_name(url))


def _check_hub_copy(url: str, path: str) -> None:
    """A torch.hub copy whose file name carries a SHA-256 prefix (torch.hub's
    ``NAME-<hex>.pth`` convention, 8 digits or more) must match it: torch.hub keys its cache
    by file name alone, so another file of the same name may be there."""
    match = HUB_HASH_IN_NAME.search(osp.basename(path))
    prefix = match.group(1) if match else ''
    if len(prefix) < 8:
        return
    digest = _file_sha256(path)
    if not digest.startswith(prefix):
        raise UnreadableCheckpointError(
            f'mmseg_proto: {path}, torch.hub\'s cached copy of {url}, has the SHA-256 '
            f'{digest[:16]}..., not the {prefix} its file name promises: it is another file of '
            'the same name, or damaged. Delete it (or move it away) to download the URL again')


def _download(url: str, cached: str) -> None:
    """Download ``url`` to ``cached`` through a temporary file in the same folder, kept only
    if it has the announced size and is a checkpoint."""
    folder = osp.dirname(cached)
    os.makedirs(folder, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=folder, prefix=osp.basename(cached) + '.',
                                           suffix='.partial')
    try:
        with os.fdopen(descriptor, 'wb') as out:
            request = urllib.request.Request(url, headers={'User-Agent': 'mmseg_proto'})
            try:
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    announced = response.headers.get('Content-Length')
                    content_type = response.headers.get('Content-Type') or 'unknown'
                    received = 0
                    while True:
                        chunk = response.read(1 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
                        received += len(chunk)
            except urllib.error.HTTPError as error:
                raise RuntimeError(f'mmseg_proto: downloading the checkpoint {url} failed: '
                                   f'HTTP {error.code} {error.reason}') from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                raise RuntimeError(f'mmseg_proto: downloading the checkpoint {url} failed: '
                                   f'{type(error).__name__}: {error}; nothing was kept at '
                                   f'{cached}') from None
        if announced is not None and announced.isdigit() and received != int(announced):
            raise UnreadableCheckpointError(
                f'mmseg_proto: the download of {url} stopped after {received} of '
                f'{announced} bytes; nothing was kept at {cached}: run again to retry')
        with open(partial, 'rb') as file:
            try:
                check_checkpoint_format(file, f'the file served at {url}')
            except UnreadableCheckpointError as error:
                raise UnreadableCheckpointError(
                    f'mmseg_proto: {error} (Content-Type {content_type}, {received} bytes); '
                    f'nothing was kept at {cached}') from None
        os.replace(partial, cached)
    finally:
        if osp.exists(partial):
            os.remove(partial)


def load_http_checkpoint(filename: str, map_location=None,
                         model_dir: Optional[str] = None) -> Any:
    """mmengine's loader of ``http(s)://`` checkpoints (``load_from``, ``--checkpoint``,
    ``init_cfg=dict(type='Pretrained', checkpoint=URL)``), loading as
    :func:`load_checkpoint_file` does.

    Uses, in this order, this loader's copy (:func:`http_cache_path`, one entry per URL),
    then torch.hub's (:func:`torch_hub_cache_path`, where torch.hub and mmengine keep it: an
    offline node loads what is there), and only then downloads, as mmengine's
    ``load_from_http`` does (process 0 first, the others after a barrier, into the same
    cache), into :func:`http_cache_path`, keeping a download only if it is complete and a
    checkpoint. Every error about the cached
    file names its path. It replaces mmengine's loader rather than wrapping it:
    onedl-mmengine's falls back to ``weights_only=False`` when weights-only loading fails,
    and OpenMMLab's refuses the numpy and HistoryBuffer data of whole mmengine checkpoints on
    torch >= 2.6.

    Args:
        filename (str): The URL.
        map_location: As in ``torch.load``. Default: None.
        model_dir (str, optional): The cache folder, also where torch.hub's copy is looked
            for (as torch.hub's ``model_dir``). Default: None (``$TORCH_HOME/checkpoints``
            for this loader's copies, ``torch.hub.get_dir()/checkpoints`` for torch.hub's).
    """
    from mmengine.dist import get_dist_info
    cached = http_cache_path(filename, model_dir)
    if not osp.isfile(cached):
        hub_copy = torch_hub_cache_path(filename, model_dir)
        if osp.isfile(hub_copy):  # already there, as torch.hub or mmengine left it
            _check_hub_copy(filename, hub_copy)
            return _load_copy(filename, hub_copy, f'in torch.hub\'s cache at {hub_copy}',
                              map_location)
    rank, world_size = get_dist_info()
    downloaded = False
    if rank == 0 and not osp.isfile(cached):
        _download(filename, cached)
        downloaded = True
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0 and not osp.isfile(cached):
            _download(filename, cached)
            downloaded = True
    try:
        return _load_copy(filename, cached, f'cached at {cached}', map_location)
    except UnreadableCheckpointError as error:
        if not downloaded:
            raise
        # e.g. a legacy-format file cut short without a Content-Length
        os.remove(cached)
        message = str(error).split(' [the copy of ')[0]
        raise UnreadableCheckpointError(
            f'{message} [downloaded from {filename}; nothing was kept at {cached}]') from None


def _load_copy(url: str, path: str, where: str, map_location: Any) -> Any:
    """Load the local copy ``path`` of ``url``; every error names the copy (``where``)."""
    try:
        return load_checkpoint_file(path, map_location=map_location)
    except UnreadableCheckpointError as error:
        raise UnreadableCheckpointError(
            f'{error} [the copy of {url} {where}; delete it to download it again]') from None
    except CheckpointRefusedError as error:
        raise CheckpointRefusedError(f'{error} [the copy of {url} {where}]',
                                     honest=error.honest) from None
    except Exception as error:
        raise RuntimeError(f'mmseg_proto: loading the copy of {url} {where} failed: '
                           f'{type(error).__name__}: {error}') from error


def register_checkpoint_loader() -> None:
    """Make :func:`load_local_checkpoint` mmengine's loader of local files and
    :func:`load_http_checkpoint` its loader of http(s) URLs (every ``load_from``,
    ``--resume``, ``--checkpoint``, ``init_model`` and pretrained ``init_cfg`` with such a
    path goes through them). Other schemes (``open-mmlab://``, ``torchvision://``, ...) keep
    mmengine's loaders. Warns once per process when this torch's private unpickler is not
    the one the loader was written for (:func:`checkpoint_loader_problem`). Idempotent."""
    from mmengine.runner.checkpoint import CheckpointLoader
    warn_if_loader_unusable()
    if CheckpointLoader._schemes.get('') is not load_local_checkpoint:
        CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint,
                                         force=True)
    if CheckpointLoader._schemes.get('https://') is not load_http_checkpoint:
        CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                         loader=load_http_checkpoint, force=True)
