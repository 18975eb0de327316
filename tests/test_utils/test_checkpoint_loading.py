"""mmengine checkpoints load on torch >= 2.6, and nothing else becomes loadable.

Every crafted file is built here with ``__reduce__`` and pickled by ``torch.save``; each is
loaded by plain ``torch.load`` after ``import mmseg_proto`` (torch must refuse it, as without
the import) and through mmengine's checkpoint loader (mmseg_proto's stand-ins must refuse it
with an ``UnpicklingError`` naming what was refused, without crashing or changing anything).
"""
import collections
import io
import os
import pickle
import sys
import threading

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import _load_checkpoint

import mmseg_proto  # noqa: F401  (wraps mmengine's local checkpoint loader)


def admitted_outside_a_load():
    """Entries of torch's process-wide allow-list that concern mmengine checkpoints."""
    return [g for g in torch.serialization.get_safe_globals()
            if any(word in repr(g) for word in ('mmseg_proto', 'numpy', 'mmengine', 'getattr'))]


def save(tmp_path, obj, name='ckpt.pth'):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def mmengine_like_checkpoint():
    hub = MessageHub.get_instance('checkpoint_loading_test')
    for i in range(5):
        hub.update_scalar('train/loss', float(i))
    hub.update_info('iter', 5)
    return dict(
        message_hub=hub.state_dict(),
        meta=dict(seed=np.int64(3), mean=np.float64(0.5), flag=np.bool_(True),
                  arr=np.arange(4, dtype=np.float32), c=np.complex64(1 + 2j)),
        state_dict=dict(w=torch.ones(2)))


def test_mmengine_checkpoint_loads_through_mmengine(tmp_path):
    path = save(tmp_path, mmengine_like_checkpoint())
    out = _load_checkpoint(path, map_location='cpu')
    buf = out['message_hub']['log_scalars']['train/loss']
    assert type(buf) is HistoryBuffer  # not the loading stand-in
    assert buf.mean() == pytest.approx(2.0)
    assert buf.statistics('mean') == pytest.approx(2.0)
    assert buf.statistics('max') == 4.0
    assert out['meta']['seed'] == 3 and out['meta']['flag']
    assert out['meta']['c'] == np.complex64(1 + 2j)
    np.testing.assert_array_equal(out['meta']['arr'], np.arange(4))
    # A resumed buffer pickles again under mmengine's own name.
    assert b'mmseg_proto' not in pickle.dumps(buf, protocol=2)


def test_plain_torch_load_is_unchanged_by_the_import(tmp_path):
    path = save(tmp_path, mmengine_like_checkpoint())
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(path)
    with pytest.raises(pickle.UnpicklingError, match='numpy'):
        torch.load(save(tmp_path, dict(a=np.arange(3)), 'np.pth'))
    assert not admitted_outside_a_load()


class ObjectArrayFromBytes:
    """``ndarray((1,), dtype('O'), b'A' * 8)``: a forged pointer 0x4141414141414141."""

    def __reduce__(self):
        return np.ndarray, ((1, ), np.dtype('O'), b'A' * 8)


class ObjectArrayByName:
    """The same with the dtype given as the string 'O'."""

    def __reduce__(self):
        return np.ndarray, ((1, ), 'O', b'A' * 8)


class ForgedVoidDtype:
    """A void dtype whose state gives it an object field."""

    def __reduce__(self):
        return np.dtype, ('V8', False, True), (3, '|', None, ('a', ), {
            'a': (np.dtype('f8'), 0)}, 8, 1, 0x3f)


class ArrayOfForgedDtype:

    def __reduce__(self):
        return np.ndarray, ((1, ), ForgedVoidDtype(), b'A' * 8)


class ReconstructObjectArray:

    def __reduce__(self):
        return np.core.multiarray._reconstruct, (np.ndarray, (1, ), 'O')


class ObjectScalar:

    def __reduce__(self):
        return np.core.multiarray.scalar, (np.dtype('O'), b'A' * 8)


def forged_history(**extra):
    """A real HistoryBuffer that pickles a forged state."""
    state = dict(max_length=10, _log_history=np.array([1., 2., 3.]),
                 _count_history=np.ones(3))
    state.update(extra)
    buf = HistoryBuffer()
    buf.__getstate__ = lambda: state  # pickle asks the instance for its state
    return buf


class Getattr:

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)


FORBIDDEN_GETATTR = [(HistoryBuffer, name) for name in (
    'update', 'register_statistics', 'statistics', '__init__', '_set_default_statistics',
    '_statistics_methods', '__class__')] + [
    (collections.OrderedDict, 'fromkeys'), (collections.OrderedDict, '__init__'),
    (torch.Size, 'count')]

class ForgedFlagsDtype:
    """A float64 dtype whose state flags it as holding objects (numpy takes the flags)."""

    def __reduce__(self):
        return np.dtype, ('f8', False, True), (3, '<', None, None, None, -1, -1, 0x3f)


class ArrayOfForgedFlagsDtype:
    """Bytes read as object pointers through a float64 dtype flagged as holding objects."""

    def __reduce__(self):
        return np.core.multiarray._reconstruct, (np.ndarray, (0, ), b'b'), (
            1, (1, ), ForgedFlagsDtype(), False, b'A' * 8)


class FieldOutsideItem:
    """A float64 dtype whose state gives it a field 1 MiB past its 8-byte item."""

    def __reduce__(self):
        return np.dtype, ('f8', False, True), (3, '|', None, ('a', ), {
            'a': (np.dtype('f8'), 1 << 20)}, 8, 1, 0)


class HugeReconstruct:
    """numpy's own _reconstruct asked for a 1 Mi-element array (numpy writes shape (0,))."""

    def __reduce__(self):
        return np.core.multiarray._reconstruct, (np.ndarray, (1 << 20, ), b'b')


class ScalarFromTooFewBytes:

    def __reduce__(self):
        return np.core.multiarray.scalar, (np.dtype('f8'), b'A')


class ArrayStateOfWrongSize:
    """An array state whose bytes do not fill its shape."""

    def __reduce__(self):
        return np.core.multiarray._reconstruct, (np.ndarray, (0, ), b'b'), (
            1, (1000, ), np.dtype('f8'), False, b'A' * 8)


CRAFTED = {
    'object array from bytes': ObjectArrayFromBytes(),
    'object array, dtype by name': ObjectArrayByName(),
    'forged void dtype': ForgedVoidDtype(),
    'array of forged dtype': ArrayOfForgedDtype(),
    'reconstructed object array': ReconstructObjectArray(),
    'object scalar': ObjectScalar(),
    'statistics methods from the file': forged_history(
        statistics_methods={'mean': HistoryBuffer.max}),
    'class-level state key': forged_history(_statistics_methods={}),
    'non-numeric history': forged_history(_log_history=[1.0, 2.0, 3.0]),
    'object-dtype history': forged_history(_count_history=ObjectArrayFromBytes()),
    # issue 21, item 21: value and count histories of different lengths.
    'histories of different lengths': forged_history(_count_history=np.ones(2)),
    # issue 21, item 2: numpy's own dtype.__setstate__ takes these on a float64 dtype.
    'forged dtype flags': ForgedFlagsDtype(),
    'array of a dtype flagged as objects': ArrayOfForgedFlagsDtype(),
    'dtype field outside its item': FieldOutsideItem(),
    'reconstruct of a large array': HugeReconstruct(),
    'scalar from too few bytes': ScalarFromTooFewBytes(),
    'array state of the wrong size': ArrayStateOfWrongSize(),
    **{f'getattr({o.__name__}, {n!r})': Getattr(o, n) for o, n in FORBIDDEN_GETATTR},
}


@pytest.mark.parametrize('name', sorted(CRAFTED))
def test_crafted_file_is_refused(tmp_path, name):
    methods_before = dict(HistoryBuffer._statistics_methods)
    path = save(tmp_path, dict(meta=dict(evil=CRAFTED[name]), state_dict={}))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # plain torch after the import
    with pytest.raises(pickle.UnpicklingError, match='mmseg_proto refused|Unsupported global'):
        _load_checkpoint(path, map_location='cpu')
    assert HistoryBuffer._statistics_methods == methods_before
    assert not admitted_outside_a_load()  # nothing left admitted
    # The class-level statistics still compute what they say.
    buf = HistoryBuffer([1, 2, 3], [1, 1, 1])
    assert buf.statistics('mean') == 2.0 and buf.statistics('max') == 3.0


def test_refusal_names_what_was_refused(tmp_path):
    path = save(tmp_path, dict(meta=ObjectArrayFromBytes()))
    with pytest.raises(pickle.UnpicklingError, match=r"numpy dtype 'O8'"):
        _load_checkpoint(path, map_location='cpu')
    path = save(tmp_path, dict(meta=Getattr(HistoryBuffer, 'register_statistics')))
    with pytest.raises(pickle.UnpicklingError,
                       match=r"getattr\(HistoryBuffer, 'register_statistics'\)"):
        _load_checkpoint(path, map_location='cpu')


def small_cfg(work_dir, max_iters):
    from conftest import PROTO_CFG, without_validation
    from mmengine.config import Config
    cfg = Config.fromfile(PROTO_CFG)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = max_iters
    without_validation(cfg)
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.train_dataloader.batch_size = 1
    for t in cfg.train_dataloader.dataset.pipeline:
        if t['type'] == 'RandomCrop':
            t['crop_size'] = (64, 64)
    cfg.default_hooks.checkpoint.interval = 1
    return cfg


@pytest.fixture(scope='module')
def real_checkpoint(tmp_path_factory):
    """A checkpoint written by a real Runner (1 iteration of the CamVid config)."""
    from mmengine.runner import Runner
    work = tmp_path_factory.mktemp('real_ckpt')
    Runner.from_cfg(small_cfg(work, 1)).train()
    ckpt = _load_checkpoint(str(work / 'iter_1.pth'), map_location='cpu')
    assert type(ckpt['message_hub']['log_scalars']['train/loss']) is HistoryBuffer
    return ckpt


# Every crafted object (one shared Runner makes a case cost a torch.save and a refused load;
# the 7 cases of issue 21 used to be left out here, when each case built its own Runner).
RESUME_CASES = sorted(CRAFTED)


def crafted_real_checkpoint(real_checkpoint, name, path):
    """``real_checkpoint`` with ``CRAFTED[name]`` added to its meta, saved at ``path``."""
    torch.save(dict(real_checkpoint, meta=dict(real_checkpoint['meta'], evil=CRAFTED[name])),
               path)
    return str(path)


@pytest.fixture(scope='module')
def resuming_runner(tmp_path_factory):
    """One Runner of the 2-iteration config (about 2 s to build), shared by the resume cases:
    a refused file stops ``Runner.resume`` in the loader, before the Runner changes."""
    from mmengine.runner import Runner
    return Runner.from_cfg(small_cfg(tmp_path_factory.mktemp('resumed'), 2))


@pytest.mark.parametrize('name', RESUME_CASES)
def test_crafted_meta_in_a_real_checkpoint_stops_a_runner_resume(tmp_path, name,
                                                                 real_checkpoint,
                                                                 resuming_runner):
    """The attack the issue measured: a crafted object in a real checkpoint's meta.
    The Runner's resume (``Runner.resume``, which ``train()`` calls with ``resume=True``;
    that call is test_crafted_meta_stops_a_runner_train_with_resume) gets a clear error
    instead of a crash or a silent change."""
    path = crafted_real_checkpoint(real_checkpoint, name, tmp_path / 'iter_1.pth')
    methods_before = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(pickle.UnpicklingError, match='mmseg_proto refused'):
        resuming_runner.resume(path)
    assert HistoryBuffer._statistics_methods == methods_before
    assert resuming_runner.iter == 0  # nothing of the file was applied


def test_crafted_meta_stops_a_runner_train_with_resume(tmp_path, real_checkpoint):
    """The same attack through a fresh Runner's ``train()`` with ``resume=True`` and
    ``load_from`` (as ``tools/train.py --resume`` runs it)."""
    from mmengine.runner import Runner
    name = 'statistics methods from the file'
    path = crafted_real_checkpoint(real_checkpoint, name, tmp_path / 'iter_1.pth')
    cfg = small_cfg(tmp_path / 'resumed', 2)
    cfg.resume, cfg.load_from = True, path
    methods_before = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(pickle.UnpicklingError, match='mmseg_proto refused'):
        Runner.from_cfg(cfg).train()
    assert HistoryBuffer._statistics_methods == methods_before


def test_stand_ins_admit_only_listed_kinds():
    from mmseg_proto.utils.checkpoint_loading import ADMITTED_KINDS, checkpoint_safe_globals
    names = [name for _, name in checkpoint_safe_globals()]
    assert 'numpy.ndarray' in names and 'numpy.dtype' in names
    assert set(ADMITTED_KINDS) == set('biufcSU')  # no object, void, datetime


def test_torch_save_roundtrip_in_memory_still_refuses_numpy():
    buf = io.BytesIO()
    torch.save(np.arange(3), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf)


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """(folder served over HTTP on localhost, its URL); TORCH_HOME in tmp_path."""
    import functools
    import http.server
    import threading
    served = tmp_path / 'served'
    served.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_http_checkpoint_loads_through_our_loader(http_dir, tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader

    from mmseg_proto.utils.checkpoint_loading import load_http_checkpoint
    assert CheckpointLoader._get_checkpoint_loader('https://x/y.pth') is load_http_checkpoint
    served, url = http_dir
    torch.save(mmengine_like_checkpoint(), served / 'iter_5.pth')
    out = _load_checkpoint(f'{url}/iter_5.pth', map_location='cpu')
    assert type(out['message_hub']['log_scalars']['train/loss']) is HistoryBuffer
    assert out['meta']['seed'] == 3
    # Cached under $TORCH_HOME/checkpoints, in a folder of its own URL, and reused.
    from mmseg_proto.utils.checkpoint_loading import http_cache_path
    cached = http_cache_path(f'{url}/iter_5.pth')
    assert cached.startswith(str(tmp_path / 'torch_home' / 'checkpoints' / 'mmseg_proto'))
    assert cached.endswith('iter_5.pth') and os.path.isfile(cached)
    (served / 'iter_5.pth').unlink()
    assert _load_checkpoint(f'{url}/iter_5.pth', map_location='cpu')['meta']['seed'] == 3


@pytest.mark.parametrize('name', ['object scalar', 'statistics methods from the file'])
def test_crafted_file_over_http_is_refused(http_dir, name):
    served, url = http_dir
    torch.save(dict(meta=dict(evil=CRAFTED[name]), state_dict={}), served / 'evil.pth')
    methods_before = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(pickle.UnpicklingError, match='mmseg_proto refused'):
        _load_checkpoint(f'{url}/evil.pth', map_location='cpu')
    assert HistoryBuffer._statistics_methods == methods_before
    assert not admitted_outside_a_load()


# --- issue 21 ----------------------------------------------------------------------------------


def test_concurrent_loads_succeed_and_admit_nothing_process_wide(tmp_path):
    """Item 1: threads loading checkpoints at once all succeed, and torch's process-wide
    allow-list is never changed (watched while they run, and compared after)."""
    path = save(tmp_path, mmengine_like_checkpoint())
    before = set(torch.serialization.get_safe_globals())
    changed, errors, means = [], [], []
    loading = threading.Event()
    done = threading.Event()

    def watch():
        while not done.is_set():
            now = set(torch.serialization.get_safe_globals())
            if now != before:
                changed.append(now - before)

    def load_many():
        loading.wait(10)
        for _ in range(25):
            try:
                out = _load_checkpoint(path, map_location='cpu')
                means.append(out['message_hub']['log_scalars']['train/loss'].mean())
            except Exception as error:  # noqa: BLE001  (every failure is reported)
                errors.append(f'{type(error).__name__}: {error}')

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, inside loads too
    watcher = threading.Thread(target=watch, daemon=True)
    loaders = [threading.Thread(target=load_many, daemon=True) for _ in range(4)]
    try:
        watcher.start()
        for thread in loaders:
            thread.start()
        loading.set()
        for thread in loaders:
            thread.join(60)
    finally:
        done.set()
        sys.setswitchinterval(interval)
        watcher.join(10)
    assert not any(thread.is_alive() for thread in loaders)
    assert errors == []
    assert means == [2.0] * 100
    assert changed == []
    assert set(torch.serialization.get_safe_globals()) == before


class UserPoint:
    """A class of the user's, pickled with its __dict__."""

    def __init__(self, x):
        self.x = x


def test_process_wide_additions_still_apply(tmp_path):
    """A type the user admits with torch's own safe_globals loads through mmengine too, as
    with torch.load; without that it is named (not called tampering)."""
    path = save(tmp_path, dict(meta=dict(point=UserPoint(3))))
    name = f'{UserPoint.__module__}.UserPoint'
    with pytest.raises(pickle.UnpicklingError) as info:
        _load_checkpoint(path, map_location='cpu')
    assert f'it names {name}, which this loader does not admit' in str(info.value)
    assert 'add_safe_globals' in str(info.value) and 'crafted' not in str(info.value)
    with torch.serialization.safe_globals([UserPoint]):
        assert _load_checkpoint(path, map_location='cpu')['meta']['point'].x == 3


def legacy_file(tmp_path, payload: bytes, name='raw.pth') -> str:
    """A checkpoint in torch's pre-1.6 format whose object is the raw protocol-2 pickle
    ``payload`` (without PROTO and STOP): how a crafted file writes any name it likes."""
    path = tmp_path / name
    with open(path, 'wb') as file:
        for value in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                      dict(protocol_version=1001, little_endian=True,
                           type_sizes=dict(short=2, int=4, long=4))):
            pickle.dump(value, file, protocol=2)
        file.write(b'\x80\x02' + payload + b'.')
        pickle.dump([], file, protocol=2)
    return str(path)


def call(module: str, name: str, *args) -> bytes:
    """Pickle opcodes calling ``module.name(*args)`` (GLOBAL, the argument tuple, REDUCE)."""
    return (b'c' + module.encode() + b'\n' + name.encode() + b'\n' +
            pickle.dumps(args, protocol=2)[2:-1] + b'R')


def test_legacy_file_helper_writes_what_torch_reads(tmp_path):
    payload = pickle.dumps(dict(a=1, b=(2.5, 'x')), protocol=2)[2:-1]
    assert torch.load(legacy_file(tmp_path, payload), weights_only=True) == dict(a=1, b=(2.5, 'x'))
    assert _load_checkpoint(legacy_file(tmp_path, payload), map_location='cpu') == dict(
        a=1, b=(2.5, 'x'))


def fill_only_names():
    """Every name a file could give to a type the loader lets a file fill but not call:
    the names earlier versions admitted them under, and each type's own module path."""
    dtype_classes = sorted({type(np.dtype(code)) for code in np.typecodes['All']},
                           key=lambda cls: cls.__name__)
    names = {('mmseg_proto.checkpoint_loading.build_only', cls.__name__)
             for cls in [np.ndarray] + dtype_classes}
    names |= {(cls.__module__, cls.__qualname__) for cls in [np.ndarray] + dtype_classes}
    names |= {('numpy', 'ndarray'), ('numpy.core.multiarray', 'ndarray')}
    names |= {(module, cls) for cls in ('NdarrayName', 'DtypeUnderConstruction')
              for module in ('mmseg_proto.utils.checkpoint_loading',
                             'mmseg_proto.utils.checkpoint_loading.stand_ins')}
    return sorted(names)


@pytest.mark.parametrize('module,name', fill_only_names())
@pytest.mark.parametrize('args', [((4, ), 'f8'), ((2, ), 'U3'), ('f8', )],
                         ids=['float array', 'string array', 'one argument'])
def test_fill_only_types_cannot_be_called_by_any_name(tmp_path, module, name, args):
    """Item 2: the array and dtype types a file may fill can not be called, by any name."""
    path = legacy_file(tmp_path, call(module, name, *args))
    with pytest.raises(pickle.UnpicklingError, match='mmseg_proto refused'):
        _load_checkpoint(path, map_location='cpu')
    assert not admitted_outside_a_load()


def test_no_name_reaches_a_fill_only_type():
    from mmseg_proto.utils.checkpoint_loading import checkpoint_safe_globals, fill_only_types
    named = [obj for obj, _ in checkpoint_safe_globals()]
    numpy_types = {np.ndarray, np.dtype} | {type(np.dtype(c)) for c in np.typecodes['All']}
    assert not any(obj in set(fill_only_types()) | numpy_types for obj in named)
    assert np.ndarray in fill_only_types()


@pytest.mark.parametrize('payload,match', [
    (call('mmengine.logging.history_buffer', 'HistoryBuffer', [1.0], [1], 5),
     'HistoryBuffer created with arguments'),
    (call('mmengine.logging.history_buffer', 'HistoryBuffer'), 'a call of HistoryBuffer'),
    (call('builtins', 'bytes', 1 << 30), r'bytes\(\) called with 1 argument'),
    (call('numpy', 'dtype', 'f8', False, True), 'whose state the file never sets'),
    (call('numpy', 'dtype', 'f8', False, True) + b'q\x32h\x32\x86',
     'used before its state is set'),
], ids=['HistoryBuffer(args)', 'HistoryBuffer()', 'bytes(size)', 'dtype without state',
        'dtype used before its state'])
def test_crafted_call_sequences_are_refused(tmp_path, payload, match):
    with pytest.raises(pickle.UnpicklingError, match=f'mmseg_proto refused.*{match}'):
        _load_checkpoint(legacy_file(tmp_path, payload), map_location='cpu')


class SystemCall:
    """The classic crafted pickle: os.system through __reduce__."""

    def __reduce__(self):
        return os.system, ('echo crafted',)


def test_os_system_pickle_gets_our_refusal_only(tmp_path):
    """Item 11: our message, never torch's advice to retry with weights_only=False."""
    path = save(tmp_path, dict(meta=SystemCall(), state_dict={}))
    with pytest.raises(pickle.UnpicklingError) as info:
        _load_checkpoint(path, map_location='cpu')
    message = str(info.value)
    assert message.startswith(f'mmseg_proto refused to load this checkpoint ({path}): it '
                              'names posix.system') or 'names nt.system' in message
    assert 'damaged or was crafted' in message
    assert 'will likely succeed' not in message and 'Weights only load failed' not in message
    assert 'add_safe_globals' not in message


def test_unknown_class_is_named_not_called_crafted(tmp_path):
    path = save(tmp_path, dict(meta=dict(d=collections.Counter(a=1)),
                               state_dict={}))  # admitted by torch: loads
    assert _load_checkpoint(path, map_location='cpu')['meta']['d'] == collections.Counter(a=1)
    path = save(tmp_path, dict(meta=dict(d=io.BytesIO)), 'cls.pth')
    with pytest.raises(pickle.UnpicklingError) as info:
        _load_checkpoint(path, map_location='cpu')
    assert "it names _io.BytesIO, which this loader does not admit" in str(info.value)
    assert 'crafted' not in str(info.value) and 'will likely succeed' not in str(info.value)


def test_numpy_strings_in_meta_load(tmp_path):
    """Item 12: np.str_, np.bytes_ and string arrays cannot run code: they load."""
    meta = dict(name=np.str_('héllo'), raw=np.bytes_(b'ab\x00c'),
                names=np.array(['a', 'bcd']), raws=np.array([b'x', b'yz']),
                wide=np.array([['ab'], ['c']], dtype='>U2'), empty=np.zeros((2, 0)))
    out = _load_checkpoint(save(tmp_path, dict(meta=meta)), map_location='cpu')['meta']
    assert type(out['name']) is np.str_ and out['name'] == 'héllo'
    assert type(out['raw']) is np.bytes_ and out['raw'] == b'ab\x00c'
    assert out['names'].tolist() == ['a', 'bcd'] and out['names'].dtype == np.dtype('<U3')
    assert out['raws'].tolist() == [b'x', b'yz'] and out['raws'].dtype == np.dtype('S2')
    assert out['wide'].tolist() == [['ab'], ['c']] and out['wide'].shape == (2, 1)
    assert out['empty'].shape == (2, 0) and out['empty'].dtype == np.float64


def test_unsupported_numpy_dtype_is_named_not_called_crafted(tmp_path):
    """Item 12: a numpy type the loader does not admit is named, not called tampering."""
    path = save(tmp_path, dict(meta=dict(when=np.array([1], dtype='M8[s]'))))
    with pytest.raises(pickle.UnpicklingError) as info:
        _load_checkpoint(path, map_location='cpu')
    message = str(info.value)
    assert "it holds numpy dtype 'M8' (datetime64), which this loader does not admit" in message
    assert 'crafted' not in message and 'damaged' not in message
    path = save(tmp_path, dict(meta=dict(objs=np.array([1, 'a'], dtype=object))), 'o.pth')
    with pytest.raises(pickle.UnpicklingError, match=r"numpy dtype 'O8' \(object\), which"):
        _load_checkpoint(path, map_location='cpu')


@pytest.mark.parametrize('content,match', [
    (b'', 'is empty'),
    (b'hello, world\n', r"starts with b'hello, world\\n' \(a text file\?\)"),
    (b'<!DOCTYPE html><html>', r'\(an HTML or XML page\?\)'),
], ids=['empty', 'text', 'html'])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content, match):
    from mmseg_proto.utils.checkpoint_loading import UnreadableCheckpointError
    path = tmp_path / 'not.pth'
    path.write_bytes(content)
    with pytest.raises(UnreadableCheckpointError, match=f'{path}.*{match}'):
        _load_checkpoint(str(path), map_location='cpu')


def test_truncated_and_torchscript_files_say_so(tmp_path):
    from mmseg_proto.utils.checkpoint_loading import UnreadableCheckpointError
    whole = open(save(tmp_path, mmengine_like_checkpoint()), 'rb').read()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnreadableCheckpointError, match='truncated or damaged zip archive'):
        _load_checkpoint(str(cut), map_location='cpu')
    legacy = io.BytesIO()
    torch.save(mmengine_like_checkpoint(), legacy, _use_new_zipfile_serialization=False)
    for cut in range(1, len(legacy.getvalue()), 97):  # torch < 1.6 format, cut anywhere
        cut_legacy = tmp_path / f'legacy_{cut}.pth'
        cut_legacy.write_bytes(legacy.getvalue()[:cut])
        with pytest.raises(UnreadableCheckpointError, match=f'{cut_legacy} is not a readable '
                           r'checkpoint: its data ends early \(a truncated file\?\)'):
            _load_checkpoint(str(cut_legacy), map_location='cpu')
    (tmp_path / 'legacy.pth').write_bytes(legacy.getvalue())
    assert _load_checkpoint(str(tmp_path / 'legacy.pth'), map_location='cpu')['meta'][
        'seed'] == 3
    import zipfile
    whole = bytearray(open(save(tmp_path, dict(w=torch.arange(100.)), 'w.pth'), 'rb').read())
    [record] = [info for info in zipfile.ZipFile(io.BytesIO(whole)).infolist()
                if info.filename.endswith('data/0')]
    whole[record.header_offset:record.header_offset + 4] = b'XXXX'  # a damaged record
    damaged = tmp_path / 'damaged.pth'
    damaged.write_bytes(bytes(whole))
    with pytest.raises(UnreadableCheckpointError,
                       match=f'{damaged} is not a readable checkpoint: a damaged zip archive'):
        _load_checkpoint(str(damaged), map_location='cpu')
    scripted = tmp_path / 'scripted.pt'
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(scripted))
    with pytest.raises(UnreadableCheckpointError, match='is a TorchScript archive'):
        _load_checkpoint(str(scripted), map_location='cpu')


@pytest.mark.parametrize('how', ['torch < 2.4', 'TORCH_FORCE_WEIGHTS_ONLY_LOAD'])
def test_without_our_allow_list_torch_defaults_apply(tmp_path, monkeypatch, how):
    """Where the allow-list cannot be passed, torch's own weights-only load runs (tensors
    only), still with our refusal message."""
    from mmseg_proto.utils.checkpoint_loading import unpickler
    if how == 'torch < 2.4':
        monkeypatch.setattr(unpickler, '_unpickling_loop', lambda: None)
    else:
        monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    path = save(tmp_path, dict(state_dict=dict(w=torch.ones(2))))
    assert torch.equal(_load_checkpoint(path, map_location='cpu')['state_dict']['w'],
                       torch.ones(2))
    with pytest.raises(pickle.UnpicklingError) as info:
        _load_checkpoint(save(tmp_path, dict(meta=SystemCall()), 'evil.pth'),
                         map_location='cpu')
    assert str(info.value).startswith('mmseg_proto refused to load this checkpoint (')
    assert 'will likely succeed' not in str(info.value)


def test_load_with_checkpoint_globals_is_load_checkpoint_file(tmp_path):
    from mmseg_proto.utils import load_with_checkpoint_globals
    path = save(tmp_path, mmengine_like_checkpoint())
    out = load_with_checkpoint_globals(torch.load, path, map_location='cpu')
    assert out['meta']['seed'] == 3
    with pytest.raises(TypeError, match='load_checkpoint_file'):
        load_with_checkpoint_globals(lambda f: None, path)


# --- http(s): item 10, and the URL part of item 14 ---------------------------------------------


@pytest.fixture
def http_routes(tmp_path, monkeypatch):
    """(routes, base URL): a localhost server answering GET PATH from ``routes[PATH] =
    (body, content type, Content-Length to announce or None, bytes to send)``; 404
    otherwise. It stops at the end of the test; every socket wait is bounded."""
    import http.server

    from mmseg_proto.utils.checkpoint_loading import http_cache
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setattr(http_cache, 'DOWNLOAD_TIMEOUT_S', 10)
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10

        def do_GET(self):  # noqa: N802
            if self.path not in routes:
                self.send_error(404)
                return
            body, content_type, announced, sent = routes[self.path]
            self.send_response(200)
            self.send_header('Content-Type', content_type)
            if announced is not None:
                self.send_header('Content-Length', str(announced))
            self.end_headers()
            self.wfile.write(body[:sent])
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.1),
                              daemon=True)
    thread.start()
    yield routes, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()
    thread.join(10)


def cache_folder_files(tmp_path):
    root = tmp_path / 'torch_home' / 'checkpoints'
    return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file()) \
        if root.exists() else []


@pytest.mark.parametrize('case', ['shorter than Content-Length', 'truncated, no length',
                                  'legacy format truncated, no length',
                                  'HTML page with status 200'])
def test_bad_download_is_never_cached(http_routes, tmp_path, case):
    """Item 10: a cut-short or non-checkpoint download is not kept, and says so."""
    routes, url = http_routes
    whole = open(save(tmp_path, mmengine_like_checkpoint()), 'rb').read()
    html = b'<!DOCTYPE html><html><body>Sign in</body></html>'
    legacy = io.BytesIO()
    torch.save(mmengine_like_checkpoint(), legacy, _use_new_zipfile_serialization=False)
    legacy = legacy.getvalue()
    routes['/m.pth'] = {
        'legacy format truncated, no length': (legacy, 'application/octet-stream', None,
                                               len(legacy) // 2),
        'shorter than Content-Length': (whole, 'application/octet-stream', len(whole),
                                        len(whole) // 2),
        'truncated, no length': (whole, 'application/octet-stream', None, len(whole) // 2),
        'HTML page with status 200': (html, 'text/html', len(html), len(html)),
    }[case]
    with pytest.raises(Exception) as info:
        _load_checkpoint(f'{url}/m.pth', map_location='cpu')
    assert cache_folder_files(tmp_path) == []  # nothing kept, no partial file either
    from mmseg_proto.utils.checkpoint_loading import (UnreadableCheckpointError,
                                                       http_cache_path)
    assert isinstance(info.value, UnreadableCheckpointError)
    message = str(info.value)
    assert f'nothing was kept at {http_cache_path(f"{url}/m.pth")}' in message
    if case == 'shorter than Content-Length':
        assert f'stopped after {len(whole) // 2} of {len(whole)} bytes' in message
    if case == 'HTML page with status 200':
        assert 'an HTML or XML page?' in message and 'Content-Type text/html' in message
    # The next run downloads again (nothing stale is reused) and loads the whole file.
    routes['/m.pth'] = (whole, 'application/octet-stream', len(whole), len(whole))
    assert _load_checkpoint(f'{url}/m.pth', map_location='cpu')['meta']['seed'] == 3


def test_errors_about_a_cached_file_name_its_path(http_routes, tmp_path):
    """Item 10: a cached copy that went bad (disk, an older downloader) is named."""
    routes, url = http_routes
    whole = open(save(tmp_path, mmengine_like_checkpoint()), 'rb').read()
    routes['/old.pth'] = (whole, 'application/octet-stream', len(whole), len(whole))
    assert _load_checkpoint(f'{url}/old.pth', map_location='cpu')['meta']['seed'] == 3
    [entry] = cache_folder_files(tmp_path)
    cached = str(tmp_path / 'torch_home' / 'checkpoints' / entry)
    with open(cached, 'wb') as file:
        file.write(whole[:len(whole) // 2])
    with pytest.raises(Exception) as info:
        _load_checkpoint(f'{url}/old.pth', map_location='cpu')
    assert str(info.value).startswith(f'{cached} is not a readable checkpoint')
    assert f'cached at {cached}; delete it to download it again' in str(info.value)
    torch.save(dict(meta=SystemCall()), cached)
    with pytest.raises(pickle.UnpicklingError) as info:
        _load_checkpoint(f'{url}/old.pth', map_location='cpu')
    assert str(info.value).startswith(f'mmseg_proto refused to load this checkpoint ({cached})')


def test_http_cache_is_keyed_by_url(http_routes, tmp_path):
    """Two URLs with the same file name get two cache entries."""
    routes, url = http_routes
    for folder, seed in (('a', 1), ('b', 2)):
        buf = io.BytesIO()
        torch.save(dict(meta=dict(seed=seed)), buf)
        routes[f'/{folder}/model.pth'] = (buf.getvalue(), 'application/octet-stream',
                                          len(buf.getvalue()), len(buf.getvalue()))
    assert _load_checkpoint(f'{url}/a/model.pth', map_location='cpu')['meta']['seed'] == 1
    assert _load_checkpoint(f'{url}/b/model.pth', map_location='cpu')['meta']['seed'] == 2
    assert len(cache_folder_files(tmp_path)) == 2


def test_http_error_names_the_url_and_status(http_routes):
    routes, url = http_routes
    with pytest.raises(RuntimeError, match=f'downloading the checkpoint {url}/missing.pth '
                       'failed: HTTP 404'):
        _load_checkpoint(f'{url}/missing.pth', map_location='cpu')


@pytest.mark.parametrize('tail', ['/checkpoints/', '', '/a/..'])
def test_url_naming_no_file_says_so(http_routes, tmp_path, tail):
    """Item 14: a checkpoint URL whose path ends with '/' names no file."""
    routes, url = http_routes
    with pytest.raises(ValueError, match=f'the checkpoint URL {url}{tail} names no file') \
            as info:
        _load_checkpoint(f'{url}{tail}', map_location='cpu')
    assert {'/checkpoints/': "(its path '/checkpoints/' ends with '/')",
            '': '(it has no path)', '/a/..': "(its path '/a/..' ends with '..')"}[tail] in \
        str(info.value)
    assert 'give the URL of the checkpoint file itself' in str(info.value)
    assert cache_folder_files(tmp_path) == []


# --- issue 30, item 5: the day torch's private unpickler changes --------------------------------

#: SHA-256 of torch/_weights_only_unpickler.py in the torch versions whose loop the clone in
#: mmseg_proto/utils/checkpoint_loading/unpickler.py was reviewed against.
REVIEWED_UNPICKLERS = {
    'd9fdcb14f255d60d440e158e006501447417db95480cdd73f66fb1880b84578b': 'torch 2.13.0',
}


def test_torchs_private_unpickler_is_the_reviewed_one():
    """Fails in CI the day torch's private weights-only unpickler changes, even where the
    import self-check still passes: the clone's safety is that of torch's loop with another
    allow-list, so a changed loop is read before it is trusted."""
    import hashlib

    import torch._weights_only_unpickler as wou
    with open(wou.__file__, 'rb') as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    assert digest in REVIEWED_UNPICKLERS, (
        f'torch {torch.__version__} ships another {wou.__file__} (SHA-256 {digest}) than the '
        f'reviewed ones ({sorted(REVIEWED_UNPICKLERS.values())}). Read its Unpickler.load: '
        'GLOBAL, NEWOBJ, REDUCE and BUILD must still consult _get_user_allowed_globals() '
        '(which the clone redirects), memo reads go through self.memo, stack writes through '
        'self.stack, and torch\'s defaults (_get_allowed_globals) must not hold a stand-in\'s '
        'name. Then add the digest here, with the torch version.')


def test_the_import_check_passes_on_this_torch():
    """The check :func:`checkpoint_loader_problem` runs at import: its self-check (what
    mmengine writes comes back; three crafted values are refused, each with its message)."""
    from mmseg_proto.utils.checkpoint_loading import checkpoint_loader_problem, unpickler
    unpickler._self_check()  # raises, saying what differs
    assert checkpoint_loader_problem() is None
