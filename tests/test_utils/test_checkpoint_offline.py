"""Issue 28, section 4: offline and locked-down machines keep working.

torch.hub's cache is used before any download; when mmseg_proto's loader cannot run (a torch
whose private unpickler differs, TORCH_FORCE_WEIGHTS_ONLY_LOAD) the refusal says why and what
to do; a trusted file is loaded through one explicit opt-in scoped to that file; a file saved
with another pickle protocol is named as such. Plus two pins of section 7.
"""
import argparse
import functools
import hashlib
import pickle
import socket
import urllib.request
import warnings

import numpy as np
import pytest
import torch
import torch._weights_only_unpickler as wou
from mmengine.logging import MessageHub
from mmengine.runner.checkpoint import _load_checkpoint

import mmseg_proto  # noqa: F401  (registers the checkpoint loaders)
from mmseg_proto.utils import checkpoint_loading
from mmseg_proto.utils.checkpoint_loading import unpickler
from mmseg_proto.utils.checkpoint_loading import (TRUSTED_VARIABLE, CheckpointRefusedError,
                                                   UnreadableCheckpointError,
                                                   http_cache_path, torch_hub_cache_path)


def mmengine_checkpoint(path):
    """What a training run's iter_N.pth holds: HistoryBuffer logs, numpy meta, tensors."""
    hub = MessageHub.get_instance('checkpoint_offline_test')
    hub.update_scalar('train/loss', 1.5)
    torch.save(dict(message_hub=hub.state_dict(), meta=dict(seed=np.int64(3)),
                    state_dict=dict(w=torch.ones(2))), str(path))
    return str(path)


def sha256(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@pytest.fixture
def offline(monkeypatch):
    """Every network access raises (as on a node without network)."""
    def refuse(*args, **kwargs):
        raise OSError('network access in an offline test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    monkeypatch.setattr(urllib.request, 'urlopen', refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / 'torch_home'
    monkeypatch.setenv('TORCH_HOME', str(home))
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    return home


# --- torch.hub's cache before any download ----------------------------------------------------


def test_a_pretrained_file_in_torch_hubs_cache_loads_offline(torch_home, offline, tmp_path):
    """Issue 28: a file torch.hub (or mmengine without mmseg_proto) left in
    $TORCH_HOME/hub/checkpoints/<file name> loads without any network access; mmseg_proto
    used to skip it and fail with URLError."""
    source = mmengine_checkpoint(tmp_path / 'release.pth')
    name = f'mit_b0_20220624-{sha256(source)[:8]}.pth'
    hub_file = torch_home / 'hub' / 'checkpoints' / name
    hub_file.write_bytes(open(source, 'rb').read())
    url = f'https://download.example.org/pretrain/{name}'
    assert torch_hub_cache_path(url) == str(hub_file) == \
        str(torch_home / 'hub' / 'checkpoints' / name)
    out = _load_checkpoint(url, map_location='cpu')
    assert out['meta']['seed'] == 3 and torch.equal(out['state_dict']['w'], torch.ones(2))
    # torch.hub keys by file name: a query string names the same copy, as in torch.hub.
    assert _load_checkpoint(url + '?download=1', map_location='cpu')['meta']['seed'] == 3
    # Nothing was downloaded or written into mmseg_proto's own cache.
    assert not (torch_home / 'checkpoints').exists()


def test_a_parametric_models_pretrained_backbone_loads_offline(torch_home, offline):
    """Issue 28: the same through a model's init_cfg=dict(type='Pretrained', ...), as the
    parametric configs' backbones load their weights."""
    from mmengine.model import BaseModule

    class Backbone(BaseModule):
        def __init__(self, init_cfg=None):
            super().__init__(init_cfg)
            self.conv = torch.nn.Conv2d(3, 4, 1)

    weights = {'conv.weight': torch.full((4, 3, 1, 1), 0.25), 'conv.bias': torch.arange(4.)}
    torch.save(dict(state_dict=weights), str(torch_home / 'hub' / 'checkpoints' / 'b.pth'))
    model = Backbone(init_cfg=dict(type='Pretrained',
                                   checkpoint='https://download.example.org/b.pth'))
    model.init_weights()
    assert torch.equal(model.conv.weight, weights['conv.weight'])
    assert torch.equal(model.conv.bias, weights['conv.bias'])


def test_a_hub_copy_that_is_not_the_named_file_is_not_loaded(torch_home, offline, tmp_path):
    """torch.hub keys its cache by file name alone: a copy whose name promises a SHA-256
    prefix it does not have is refused with its path, never loaded silently."""
    hub_file = torch_home / 'hub' / 'checkpoints' / 'model-0123abcd.pth'
    torch.save(dict(state_dict=dict(w=torch.zeros(1))), str(hub_file))
    with pytest.raises(UnreadableCheckpointError) as info:
        _load_checkpoint('https://example.org/model-0123abcd.pth', map_location='cpu')
    assert str(hub_file) in str(info.value) and 'not the 0123abcd' in str(info.value)
    assert 'Delete it' in str(info.value)


def test_offline_without_any_copy_still_says_the_download_failed(torch_home, offline):
    with pytest.raises(RuntimeError, match='downloading the checkpoint https://example.org/'
                       'none.pth failed: OSError: network access in an offline test'):
        _load_checkpoint('https://example.org/none.pth', map_location='cpu')


def test_urls_differing_in_host_or_query_never_share_a_cache_file(tmp_path):
    """Issue 28, section 7: mmseg_proto's cache is keyed by the whole URL."""
    urls = ['https://a.example.org/m/model.pth', 'https://b.example.org/m/model.pth',
            'https://a.example.org/m/model.pth?v=1', 'https://a.example.org/m/model.pth?v=2',
            'https://a.example.org:8443/m/model.pth', 'http://a.example.org/m/model.pth']
    paths = [http_cache_path(url, str(tmp_path)) for url in urls]
    assert len(set(paths)) == len(urls)
    assert all(path.endswith('/model.pth') for path in paths)


# --- when mmseg_proto's loader cannot run -----------------------------------------------------


@pytest.fixture
def recheck_loader():
    """The loader's once-per-process checks are computed again for this test, and again
    after it (with torch restored)."""
    def reset():
        for once in (unpickler._unpickling_loop, unpickler._self_check_problem,
                     unpickler.warn_if_loader_unusable):
            once.reset()
    reset()
    yield
    reset()


def assert_says_what_happened(message):
    assert 'names mmengine.logging.history_buffer.HistoryBuffer' in message
    assert 'which this loader does not admit' not in message  # the old contradiction
    assert 'damaged or' not in message and 'crafted' not in message
    assert 'Nothing shows that the file is damaged' in message
    assert 'weights_only=False' not in message


def test_a_changed_private_unpickler_is_reported_once_and_explained(tmp_path, monkeypatch,
                                                                     recheck_loader):
    """Issue 28: with torch's private Unpickler.load not the one the loader clones (here
    wrapped), the user's own checkpoint was refused as 'not admitted (it admits ...
    HistoryBuffer logs)' ... 'damaged or crafted'. Now: one warning at registration, and a
    refusal naming the torch version, the tested pin and the trusted-file opt-in."""
    original = wou.Unpickler.load

    @functools.wraps(original)
    def wrapped(self):
        return original(self)

    monkeypatch.setattr(wou.Unpickler, 'load', wrapped)
    with pytest.warns(UserWarning, match='private weights-only unpickler') as record:
        checkpoint_loading.register_checkpoint_loader()
        checkpoint_loading.register_checkpoint_loader()
    assert len([w for w in record if 'mmseg_proto' in str(w.message)]) == 1
    assert 'requirements/constraints.txt' in str(record[0].message)
    path = mmengine_checkpoint(tmp_path / 'iter_2.pth')
    with pytest.raises(CheckpointRefusedError) as info:
        _load_checkpoint(path, map_location='cpu')
    message = str(info.value)
    assert_says_what_happened(message)
    assert f'torch {torch.__version__}' in message and 'torch 2.13.0' in message
    assert 'requirements/constraints.txt' in message
    assert f'{TRUSTED_VARIABLE}={sha256(path)}' in message
    # Issue 30: one message. The refusal says what the warning said (what happened, what it
    # means for --resume, the supported versions, what to do), with this file's digest for
    # the opt-in in place of the warning's general form of it.
    warned = str(record[0].message)
    assert warned.startswith('mmseg_proto: ') and 'torch >= 2.4' in warned
    assert warned.removeprefix('mmseg_proto: ').split('; or, for a checkpoint you trust')[0] \
        in message
    assert message.count('--resume') == warned.count('--resume') == 1
    # The opt-in it names works, for this file.
    monkeypatch.setenv(TRUSTED_VARIABLE, sha256(path))
    assert _load_checkpoint(path, map_location='cpu')['meta']['seed'] == 3


def test_a_self_check_failure_is_reported(monkeypatch, recheck_loader):
    """A loop that runs but does not give mmengine's data back is found at import, too."""
    monkeypatch.setattr(unpickler, '_self_check',
                        lambda: (_ for _ in ()).throw(TypeError('changed stack handling')))
    problem = checkpoint_loading.checkpoint_loader_problem()
    assert 'self-check' in problem and 'TypeError: changed stack handling' in problem


def test_torch_force_weights_only_load_at_import_is_not_a_changed_torch(monkeypatch,
                                                                       recheck_loader):
    """Issue 30: with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 at import, torch refuses the
    self-check's pickle_module; that was reported as a changed private unpickler. The
    self-check now waits for a load without the variable."""
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert checkpoint_loading.warn_if_loader_unusable() is None
    monkeypatch.delenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD')
    assert checkpoint_loading.checkpoint_loader_problem() is None


def test_torch_force_weights_only_load_is_named(tmp_path, monkeypatch):
    """Issue 28: with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, --resume of the user's own checkpoint
    says that the variable is why, and to unset it."""
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    path = mmengine_checkpoint(tmp_path / 'iter_2.pth')
    with pytest.raises(CheckpointRefusedError) as info:
        _load_checkpoint(path, map_location='cpu')
    message = str(info.value)
    assert_says_what_happened(message)
    assert 'TORCH_FORCE_WEIGHTS_ONLY_LOAD is set' in message
    assert 'Unset TORCH_FORCE_WEIGHTS_ONLY_LOAD' in message
    monkeypatch.delenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD')
    assert _load_checkpoint(path, map_location='cpu')['meta']['seed'] == 3


# --- a trusted file: one explicit opt-in, scoped to that file --------------------------------


def namespace_checkpoint(path, lr=0.01):
    torch.save(dict(args=argparse.Namespace(lr=lr, arch='mit_b0'),
                    state_dict=dict(w=torch.ones(2))), str(path))
    return str(path)


def test_a_trusted_file_holding_a_namespace_loads_through_the_opt_in(tmp_path, monkeypatch):
    """Issue 28: official releases that hold argparse.Namespace were refused with no
    documented way through. The refusal names the opt-in with the file's SHA-256; listing it
    loads that file, and only that file; nothing process-wide changes."""
    monkeypatch.delenv(TRUSTED_VARIABLE, raising=False)
    path = namespace_checkpoint(tmp_path / 'release.pth')
    with pytest.raises(CheckpointRefusedError) as info:
        _load_checkpoint(path, map_location='cpu')
    message = str(info.value)
    assert 'it names argparse.Namespace' in message and 'crafted' not in message
    assert f'set {TRUSTED_VARIABLE}={sha256(path)}' in message
    assert 'docs/install.md, "Trusted checkpoints"' in message

    before = list(torch.serialization.get_safe_globals())
    monkeypatch.setenv(TRUSTED_VARIABLE, f'  {"0" * 64}, {sha256(path).upper()} ')
    out = _load_checkpoint(path, map_location='cpu')
    assert out['args'] == argparse.Namespace(lr=0.01, arch='mit_b0')
    assert list(torch.serialization.get_safe_globals()) == before
    # Another file of the same kind (other bytes) is still refused, at another path or the
    # same one (trust names content, never a path).
    other = namespace_checkpoint(tmp_path / 'other.pth', lr=0.02)
    with pytest.raises(CheckpointRefusedError, match='argparse.Namespace'):
        _load_checkpoint(other, map_location='cpu')
    namespace_checkpoint(tmp_path / 'release.pth', lr=0.03)
    with pytest.raises(CheckpointRefusedError, match='argparse.Namespace'):
        _load_checkpoint(path, map_location='cpu')
    # torch.load and mmseg_proto's loader elsewhere are unchanged.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(other, weights_only=True)


def test_the_opt_in_takes_digests_only(tmp_path, monkeypatch):
    path = namespace_checkpoint(tmp_path / 'release.pth')
    monkeypatch.setenv(TRUSTED_VARIABLE, path)
    with pytest.raises(ValueError) as info:
        _load_checkpoint(path, map_location='cpu')
    assert f'{TRUSTED_VARIABLE} lists' in str(info.value)
    assert 'not a SHA-256 digest' in str(info.value) and 'never paths' in str(info.value)


def test_a_crafted_file_gets_no_opt_in_advice(tmp_path):
    class SystemCall:
        def __reduce__(self):
            import os
            return os.system, ('true', )

    torch.save(dict(meta=SystemCall()), str(tmp_path / 'evil.pth'))
    with pytest.raises(CheckpointRefusedError) as info:
        _load_checkpoint(str(tmp_path / 'evil.pth'), map_location='cpu')
    assert 'damaged or was crafted' in str(info.value)
    assert TRUSTED_VARIABLE not in str(info.value)


# --- other pickle protocols -------------------------------------------------------------------


@pytest.mark.parametrize('protocol', [4, 5])
@pytest.mark.parametrize('zip_format', [True, False])
def test_a_file_saved_with_another_pickle_protocol_is_named_as_such(tmp_path, protocol,
                                                                    zip_format):
    """Issue 28: torch.save(..., pickle_protocol=4 or 5) was 'damaged or crafted'."""
    path = str(tmp_path / f'p{protocol}.pth')
    torch.save(dict(state_dict=dict(w=torch.ones(2))), path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zip_format)
    with pytest.warns(UserWarning, match='pickle protocol'):  # torch's own note
        with pytest.raises(CheckpointRefusedError) as info:
            _load_checkpoint(path, map_location='cpu')
    message = str(info.value)
    assert f'it was saved with pickle protocol {protocol} ' \
        f'(torch.save(..., pickle_protocol={protocol}))' in message
    assert 'crafted' not in message and 'damaged or' not in message
    assert 'save it again without pickle_protocol' in message
    assert f'{TRUSTED_VARIABLE}={sha256(path)}' in message


# --- section 7 pin: a forged dtype with numpy's dtype admitted torch-wide ---------------------


class ForgedFlagsDtype:
    """A float64 dtype whose state flags it as holding objects (numpy takes the flags)."""

    def __reduce__(self):
        return np.dtype, ('f8', False, True), (3, '<', None, None, None, -1, -1, 0x3f)


class ArrayOfForgedFlagsDtype:
    """Bytes read as object pointers through that dtype."""

    def __reduce__(self):
        return np.core.multiarray._reconstruct, (np.ndarray, (0, ), b'b'), (
            1, (1, ), ForgedFlagsDtype(), False, b'A' * 8)


@pytest.mark.parametrize('admitted', [
    [np.dtype],
    # What torch's documentation suggests for numpy data.
    [np.core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float64DType],
], ids=['dtype', 'torch-doc-list'])
@pytest.mark.parametrize('forged', [ForgedFlagsDtype, ArrayOfForgedFlagsDtype])
def test_a_forged_dtype_is_refused_even_with_numpy_admitted_torch_wide(tmp_path, admitted,
                                                                       forged):
    """Issue 28, section 7: the program's own safe_globals never reach past the dtype
    checks (the stand-ins take precedence over torch's process-wide list)."""
    path = str(tmp_path / 'forged.pth')
    torch.save(dict(meta=forged()), path)
    with torch.serialization.safe_globals(admitted):
        with pytest.raises(CheckpointRefusedError) as info:
            _load_checkpoint(path, map_location='cpu')
    assert 'with flags 63 in its state' in str(info.value)
