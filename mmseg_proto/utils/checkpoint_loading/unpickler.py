"""torch's weights-only unpickling loop with the allow-list of one load, and its check.

torch offers no public per-load allow-list: ``torch.serialization.safe_globals`` and
``add_safe_globals`` change one process-wide set (``_weights_only_unpickler.
_marked_safe_globals_set``), so two threads loading at once, or any plain ``torch.load``
meanwhile, would see each other's names. The one public hook is ``torch.load``'s
``pickle_module``: :data:`PICKLE_MODULE` gives it :class:`_CheckpointUnpickler`, torch's
private ``Unpickler`` whose ``load`` is the same code object run with another global
namespace, in which ``_get_user_allowed_globals`` returns this load's allow-list (torch's
process-wide additions, read through the public ``get_safe_globals``, then the stand-ins).

What the clone expects of torch's loop is checked once per process, at import
(:func:`checkpoint_loader_problem`): its code calls ``_get_user_allowed_globals``, and a
self-check in memory (a few ms) gives back what mmengine writes and refuses three crafted
values, each of which needs one of the loop's behaviours the stand-ins rely on. Where the
check fails, :func:`fallback_explanation` is the one message that says so.
"""
import io
import os
import pickle
import re
import struct
import types
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch._weights_only_unpickler as _wou

from .errors import (ADMITTED, INSTALL_PIN, REFUSED, SUPPORTED_TORCH, TRUSTED_DOC,
                     TRUSTED_VARIABLE, CheckpointRefusedError, crafted, refuse, unsupported)
from .stand_ins import (LOADING, computed_once, fill_only_types, history_buffer_class,
                        named_stand_ins, stand_in_names)

# --- the loop, with the allow-list of one load ---------------------------------------------


class _AllowedGlobals(dict):
    """Name -> object of one load: torch's process-wide additions, then ours. ``values()``
    (which torch's loop asks to decide what may be called, created or filled) also holds
    the fill-only types, which no key names."""

    def values(self):  # type: ignore[override]
        return list(super().values()) + list(fill_only_types())


def _allowed_during_load() -> _AllowedGlobals:
    """What the loop's ``_get_user_allowed_globals()`` returns during one of our loads: the
    program's own ``torch.serialization`` additions, named as torch names them, then the
    stand-ins, which take precedence over them."""
    allowed = _AllowedGlobals()
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            if len(entry) != 2 or type(entry[1]) is not str:
                raise ValueError(f'torch.serialization safe globals hold {entry!r}: a tuple '
                                 'must be (global, its full name)')
            allowed[entry[1]] = entry[0]
        else:
            allowed[f'{entry.__module__}.{entry.__qualname__}'] = entry
    allowed.update({name: obj for obj, name in named_stand_ins()})
    return allowed


@computed_once
def _unpickling_loop() -> Optional[Callable]:
    """torch's weights-only ``Unpickler.load``, reading our allow-list instead of torch's
    process-wide one (the same code object with another global namespace), or None where
    this torch's loop has no ``_get_user_allowed_globals`` call to redirect."""
    load = getattr(getattr(_wou, 'Unpickler', None), 'load', None)
    code = getattr(load, '__code__', None)
    if code is None or '_get_user_allowed_globals' not in code.co_names:
        return None
    namespace = dict(vars(_wou))
    namespace['_get_user_allowed_globals'] = _allowed_during_load
    return types.FunctionType(code, namespace, load.__name__, load.__defaults__,
                              load.__closure__)


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
            refuse(f'{entry.what} used before its state is set')
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
            refuse(f'a second state for {type(obj).__name__}')
        if replacement is not None:
            if not self.stack or self.stack[-1] is not obj:
                refuse(f'{entry.what} completed off the unpickler stack')
            self.stack[-1] = replacement
            for key in entry.memo_keys:
                if dict.get(self.memo, key) is obj:
                    dict.__setitem__(self.memo, key, replacement)

    def load(self) -> Any:
        loop = _unpickling_loop()
        if loop is None:
            raise RuntimeError('mmseg_proto: _CheckpointUnpickler needs torch >= 2.4')
        previous = getattr(LOADING, 'unpickler', None)
        LOADING.unpickler = self
        try:
            result = loop(self)
        except CheckpointRefusedError:
            raise
        except pickle.UnpicklingError as error:
            raise refusal_of_torch_message(str(error)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
                struct.error) as error:  # an admitted call or opcode given what no save writes
            raise CheckpointRefusedError(crafted(
                f'unpickling failed with {type(error).__name__}: {error}')) from None
        finally:
            LOADING.unpickler = previous
        if self.pending:
            refuse(f'{next(iter(self.pending.values())).what} whose state the file never '
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


def load_with_stand_ins(file, map_location: Any) -> Any:
    """``torch.load`` of an open checkpoint through :data:`PICKLE_MODULE`."""
    return torch.load(file, map_location=map_location, pickle_module=PICKLE_MODULE,
                      weights_only=False, mmap=False)


# --- refusals from torch's loop --------------------------------------------------------------


def refusal_of_torch_message(
        message: str, fallback: Optional[Tuple[str, str]] = None) -> CheckpointRefusedError:
    """Our refusal for an ``UnpicklingError`` of torch's weights-only unpickling loop.

    Args:
        message (str): torch's message.
        fallback (tuple[str, str], optional): Why torch's own weights-only loader ran
            instead of this module's, and what to do (:func:`fallback_reason`); None when
            this module's loop ran.
    """
    first = message.strip().split('\n')[0].strip()
    named = re.search(r'GLOBAL (\S+?)(?: whose | was |\.?$)', first)
    operand = re.match(r'Unsupported operand (\d+)', first)
    if named and 'is blocked' in first:
        return CheckpointRefusedError(
            crafted(f'it names {named.group(1)}, from a module that is never admitted'))
    if named and 'not an allowed global' in first:
        name = named.group(1)
        if fallback is not None:
            return CheckpointRefusedError(_fallback_refusal(name, fallback), honest=True)
        return CheckpointRefusedError(unsupported(
            f'it names {name}',
            f'If the file is yours and {name} is a plain data class of yours, admit it with '
            f'torch.serialization.add_safe_globals([{name}]) before loading; otherwise save '
            'plain values instead.'), honest=True)
    if operand:
        code = int(operand.group(1))
        return CheckpointRefusedError(
            crafted(f'pickle opcode {code} ({chr(code)!r}), which torch.save (pickle '
                    'protocol 2) never writes'), opcode=code)
    return CheckpointRefusedError(crafted(first.rstrip('.')))


def _fallback_refusal(name: str, reason: Tuple[str, str]) -> str:
    """The refusal of ``name`` by torch's own weights-only loader, which ran because of
    ``reason`` = (why, what to do)."""
    why, advice = reason
    if name in stand_in_names():
        held = ('mmengine\'s training log, held by every checkpoint mmengine saves'
                if name.endswith('HistoryBuffer') else 'data mmengine checkpoints hold')
        return (f'{REFUSED}: it names {name}: {held}, which mmseg_proto\'s loader admits (it '
                f'admits {ADMITTED}). Nothing shows that the file is damaged, but '
                f'mmseg_proto\'s loader did not run: {why}. {advice}')
    return (f'{REFUSED}: it names {name}, which neither mmseg_proto\'s loader nor torch\'s '
            f'own weights-only loader admits (the latter ran because {why}). '
            f'If the file is yours and {name} is a plain data class of yours, admit it with '
            f'torch.serialization.add_safe_globals([{name}]) before loading; otherwise save '
            'plain values instead.')


# --- what the clone expects of torch's loop ------------------------------------------------


class _NeverAdmitted:
    """A class no allow-list names: the loop must refuse it."""


class _ForgedDtypeFlags:
    """A float64 dtype whose state flags it as holding objects: refused only if the name
    ``numpy.dtype`` reaches the stand-in (not torch's defaults or numpy's own dtype)."""

    def __reduce__(self):
        return np.dtype, ('f8', False, True), (3, '<', None, None, None, -1, -1, 0x3f)


class _DtypeUsedBeforeItsState:
    """A dtype whose state refers to itself: refused only if the loop reads the memo
    through ``self.memo`` (the unpickler's :class:`_Memo`)."""

    def __reduce__(self):
        return np.dtype, ('f8', False, True), (self, )


#: (value, what the refusal must say): each needs one of the loop's behaviours the
#: stand-ins rely on.
_MUST_REFUSE = ((_NeverAdmitted, 'which this loader does not admit'),
                (_ForgedDtypeFlags(), 'with flags 63 in its state'),
                (_DtypeUsedBeforeItsState(), 'used before its state is set'))


def _saved_and_loaded(value: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return load_with_stand_ins(buffer, 'cpu')


def _self_check() -> None:
    """Raise, saying what differs, unless no stand-in's name is among torch's defaults
    (which the loop looks up first) and torch's loop run by :class:`_CheckpointUnpickler`
    gives back what mmengine writes (a HistoryBuffer through NEWOBJ, BUILD and ``getattr``,
    numpy arrays sharing one memoized dtype, a scalar, a tensor) and refuses
    :data:`_MUST_REFUSE`, each with its own message."""
    shadowed = {name for _, name in named_stand_ins()} & set(_wou._get_allowed_globals())
    if shadowed:
        raise RuntimeError(f'torch admits {sorted(shadowed)} by default, which the loop '
                           'looks up before the stand-ins')
    history = history_buffer_class()([1.0, 3.0], [1, 1], max_length=4)
    saved = dict(h=history, a=np.arange(3, dtype=np.float32), b=np.ones(2, np.float32),
                 s=np.int64(3), t=torch.ones(2))
    out = _saved_and_loaded(saved)
    if type(out['h']) is not type(history) or out['h'].mean() != 2.0 or \
            out['a'].tolist() != [0.0, 1.0, 2.0] or out['b'].tolist() != [1.0, 1.0] or \
            out['s'] != 3 or not torch.equal(out['t'], saved['t']):
        raise RuntimeError('the loaded values differ from the saved ones')
    for value, message in _MUST_REFUSE:
        try:
            _saved_and_loaded(dict(v=value))
        except CheckpointRefusedError as error:
            if message in str(error):
                continue
            raise RuntimeError(f'{type(value).__name__} was refused with another message: '
                               f'{error}') from None
        raise RuntimeError(f'{type(value).__name__} was loaded, not refused')


def weights_only_forced() -> bool:
    """Whether ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes every ``torch.load`` weights-only
    (so it refuses a ``pickle_module``, this loader's included)."""
    return os.getenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '0').lower() in ('1', 'y', 'yes', 'true')


@computed_once
def _self_check_problem() -> Optional[str]:
    try:
        _self_check()
    except Exception as error:  # whatever the changed loop does, it is reported, once
        detail = str(error).strip().split('\n')[0][:200]
        return (f'torch {torch.__version__}\'s private weights-only unpickler '
                '(torch._weights_only_unpickler.Unpickler.load) is not the one mmseg_proto\'s '
                'loader clones: its self-check (a small mmengine-style checkpoint, in memory) '
                f'failed with {type(error).__name__}: {detail}')
    return None


def checkpoint_loader_problem() -> Optional[str]:
    """Why this package's loader cannot run with this torch (None when it can): the loop's
    code, then (once per process, a few ms) :func:`_self_check`. The self-check waits while
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is set (torch then refuses every ``pickle_module``;
    loads fall back for that reason, which their refusals name).

    Returns:
        str | None: A sentence naming the torch version and what is wrong.
    """
    if _unpickling_loop() is None:
        if not callable(getattr(_wou, '_get_user_allowed_globals', None)):
            return (f'torch {torch.__version__} has no per-load allow-list in its '
                    'weights-only unpickler (torch < 2.4)')
        return (f'torch {torch.__version__}\'s private weights-only unpickler '
                '(torch._weights_only_unpickler.Unpickler.load) is not the one mmseg_proto\'s '
                'loader clones: it no longer calls _get_user_allowed_globals')
    if weights_only_forced():
        return None
    return _self_check_problem()


def _consequence(trust: bool) -> str:
    trusted = (f'; or, for a checkpoint you trust, list its SHA-256 in {TRUSTED_VARIABLE} '
               f'({TRUSTED_DOC}) to load that file with torch\'s full unpickler'
               if trust else '')
    return ('Checkpoints therefore load with torch\'s own weights-only loader, which admits '
            'tensors and plain Python values only: files of weights load, but whole mmengine '
            'checkpoints (--resume, or load_from of a checkpoint a run saved; they hold numpy '
            f'values and HistoryBuffer logs) are refused. Supported: {SUPPORTED_TORCH}. '
            f'Install that torch ({INSTALL_PIN}) and they load as they are{trusted}.')


def fallback_explanation(problem: str) -> str:
    """The one account of a torch this loader cannot run on: what happened (``problem``),
    what it means, which torch versions are supported, and what to do. The import warning
    is this text; a refusal under it says the same, with the file's own SHA-256 for the
    trusted-file opt-in (:func:`fallback_reason`)."""
    return f'{problem}. {_consequence(trust=True)}'


def fallback_reason() -> Tuple[str, str]:
    """(why torch's own weights-only loader runs instead of this package's, what to do)."""
    if weights_only_forced():
        return ('TORCH_FORCE_WEIGHTS_ONLY_LOAD is set in the environment (it asks torch, and '
                'mmseg_proto with it, for weights-only loading)',
                'Unset TORCH_FORCE_WEIGHTS_ONLY_LOAD for this run: mmseg_proto\'s loader then '
                'loads the file, each admitted value checked.')
    return (checkpoint_loader_problem() or 'mmseg_proto\'s loader is unavailable',
            _consequence(trust=False))


@computed_once
def warn_if_loader_unusable() -> Optional[str]:
    """Warn, once per process, when this package's loader cannot run with this torch
    (:func:`checkpoint_loader_problem`, :func:`fallback_explanation`);
    ``register_checkpoint_loader`` calls it at import. Returns the problem, or None."""
    problem = checkpoint_loader_problem()
    if problem is not None:
        warnings.warn(f'mmseg_proto: {fallback_explanation(problem)}', UserWarning,
                      stacklevel=3)
    return problem
