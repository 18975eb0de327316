"""mmengine checkpoints load on torch >= 2.6, and nothing else becomes loadable.

Every crafted file is built here with ``__reduce__`` and pickled by ``torch.save``; each is
loaded by plain ``torch.load`` after ``import mmseg_proto`` (torch must refuse it, as without
the import) and through mmengine's checkpoint loader (mmseg_proto's stand-ins must refuse it
with an ``UnpicklingError`` naming what was refused, without crashing or changing anything).
"""
import collections
import io
import pickle

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
    from conftest import PROTO_CFG
    from mmengine.config import Config
    cfg = Config.fromfile(PROTO_CFG)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = 100
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


@pytest.mark.parametrize('name', sorted(CRAFTED))
def test_crafted_meta_in_a_real_checkpoint_stops_a_runner_resume(tmp_path, name,
                                                                 real_checkpoint):
    """The attack the issue measured: a crafted object in a real checkpoint's meta.
    The Runner's resume gets a clear error instead of a crash or a silent change."""
    from mmengine.runner import Runner
    path = tmp_path / 'iter_1.pth'
    torch.save(dict(real_checkpoint, meta=dict(real_checkpoint['meta'],
                                               evil=CRAFTED[name])), path)
    cfg = small_cfg(tmp_path / 'resumed', 2)
    cfg.resume, cfg.load_from = True, str(path)
    methods_before = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(pickle.UnpicklingError, match='mmseg_proto refused'):
        Runner.from_cfg(cfg).train()
    assert HistoryBuffer._statistics_methods == methods_before


def test_stand_ins_admit_only_numeric_kinds():
    from mmseg_proto.utils.checkpoint_loading import checkpoint_safe_globals
    names = [name for _, name in checkpoint_safe_globals()]
    assert 'numpy.ndarray' in names and 'numpy.dtype' in names
    build_only = [obj for obj, name in checkpoint_safe_globals() if '.build_only.' in name]
    kinds = {cls().kind for cls in build_only if cls is not np.ndarray}
    assert kinds <= set('biufc') and {'b', 'i', 'u', 'f', 'c'} <= kinds
    assert np.dtypes.ObjectDType not in build_only and np.dtypes.VoidDType not in build_only


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
    # Cached where mmengine's load_url caches, and reused.
    assert (tmp_path / 'torch_home' / 'checkpoints' / 'iter_5.pth').is_file()
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
