"""Checkpoints written by earlier versions of mmseg_proto load unchanged.

The assets in ``tests/data`` were written by the old code (``tests/data/make_old_checkpoints.py``
says how): ``protohead_db4df33.pth`` by the ProtoHead that held its prototypes itself (before
the PrototypeBank), ``protoseg_tiny_a942733_iter_3.pth`` by the runner of the version whose
PrototypeUpdateHook kept the re-seeding window and pending statistics itself,
``protoseg_tiny_c1838bf_iter_3.pth`` by the runner of the version whose hook saved them in its
own checkpoint entry (version 1; since issue 30 each bank's state is in the state dict), both
saved in the middle of an accumulated optimizer step and of a re-seeding window.

The db4df33 and a942733 assets were written on a 2-core AMD EPYC, the c1838bf one on a 2-core
Intel Xeon. What a checkpoint holds must load bit for bit
anywhere; outputs and a resumed run's final weights are bit-identical on that CPU, while
another CPU (an Intel Xeon of the same machine kind) rounds its matmuls differently: they are
compared within ``CLOSE`` (float32 rounding, far below any change of behaviour).
"""
import importlib.util
import os.path as osp

import pytest
import torch
from conftest import REPO, make_head
from mmengine.config import Config
from mmengine.runner import Runner
from mmengine.runner.checkpoint import load_checkpoint

DATA = osp.join(REPO, 'tests', 'data')
# Float32 rounding across CPUs (observed on an Intel Xeon against the EPYC-written assets:
# logits within 1e-6, a resumed run's weights within 1e-5 after 5 iterations).
CLOSE = dict(rtol=1e-4, atol=1e-5)
HEAD_ASSET = osp.join(DATA, 'protohead_db4df33.pth')
SEGMENTOR_ASSETS = [osp.join(DATA, f'protoseg_tiny_{commit}_iter_3.pth')
                    for commit in ('a942733', 'c1838bf')]
segmentor_assets = pytest.mark.parametrize('asset', SEGMENTOR_ASSETS,
                                           ids=lambda path: osp.basename(path)[14:21])


def make_old_checkpoints():
    spec = importlib.util.spec_from_file_location(
        'make_old_checkpoints', osp.join(DATA, 'make_old_checkpoints.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('strict', [True, False])
def test_head_state_dict_of_the_old_head_loads_with_its_prototypes_and_outputs(strict):
    old = torch.load(HEAD_ASSET, weights_only=True)
    assert list(old['state_dict'])[0] == 'prototypes'
    torch.manual_seed(123)  # other initial prototypes than the old head's
    head = make_head(num_classes=4, channels=8, num_prototypes=3)
    assert not torch.equal(head.prototypes, old['state_dict']['prototypes'])
    result = head.load_state_dict(old['state_dict'], strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(head.prototypes, old['state_dict']['prototypes'])
    assert head.state_dict().keys() == old['state_dict'].keys()
    for key, value in head.state_dict().items():
        assert torch.equal(value, old['state_dict'][key]), key
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head([old['inputs']]), old['logits'], **CLOSE)
    torch.testing.assert_close(head([old['inputs']]).detach(), old['logits_autograd'],
                               **CLOSE)


@segmentor_assets
def test_old_segmentor_checkpoint_loads_strictly_with_its_outputs(tmp_path, asset):
    make = make_old_checkpoints()
    model = Runner.from_cfg(Config(make.tiny_config(str(tmp_path), make.MAX_ITERS))).model
    checkpoint = load_checkpoint(model, asset, map_location='cpu', strict=True)
    expected = checkpoint['expected']
    assert torch.equal(model.decode_head.prototypes,
                       checkpoint['state_dict']['decode_head.prototypes'])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(expected['inputs'], mode='tensor'),
                                   expected['logits'], **CLOSE)


@segmentor_assets
def test_old_checkpoint_resumes_mid_step_and_mid_window_bit_for_bit(tmp_path, one_thread,
                                                                     asset):
    """The old run, interrupted after iteration 3 (half an accumulated step, half a
    re-seeding window), resumed by the current code, ends where the old run ended."""
    make = make_old_checkpoints()
    cfg = Config(make.tiny_config(str(tmp_path), make.MAX_ITERS))
    cfg.resume, cfg.load_from = True, asset
    # Its own message hub (named after the experiment), whatever ran in the same second.
    cfg.experiment_name = f'resume_{osp.basename(asset)}_{osp.basename(str(tmp_path))}'
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == make.MAX_ITERS
    reseeded = runner.message_hub.get_scalar('train/proto_reseeded').data[0]
    assert len(reseeded) == 1 and reseeded[0] >= 1  # after iteration 4, from the window
    expected = torch.load(asset, weights_only=False)['expected']
    final = runner.model.state_dict()
    assert final.keys() == expected['final_state_dict'].keys()
    # Bit for bit on the CPU that wrote the asset (the assets that say which).
    same_cpu = expected.get('cpu') == make.cpu_name()
    for key, value in expected['final_state_dict'].items():
        if same_cpu:
            assert torch.equal(final[key], value), key
        else:
            torch.testing.assert_close(final[key], value, **CLOSE, msg=key)
