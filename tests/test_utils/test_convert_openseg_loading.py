"""What the openseg converter says about files it cannot convert (issue 21, item 13).

The converter loads its input through the package's safe loader: a file that is not a
checkpoint is called that, an mmengine checkpoint is called that, and neither is told to
rerun with ``--trust-pickle`` (which would load it with ``weights_only=False``).
"""
import importlib.util
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub

from conftest import REPO

TOOL = osp.join(REPO, 'tools', 'model_converters', 'convert_openseg_protoseg.py')


def run_tool(monkeypatch, capsys, *args):
    """(exit status, stderr) of the converter's CLI, run in this process."""
    spec = importlib.util.spec_from_file_location('convert_openseg_protoseg_cli', TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, 'argv', [TOOL, *map(str, args)])
    status = tool.main()
    return status, capsys.readouterr().err


def mmengine_checkpoint():
    """What an mmengine Runner saves: message hub, numpy meta, MMSeg keys."""
    hub = MessageHub.get_instance('convert_openseg_loading_test')
    hub.update_scalar('train/loss', 1.0)
    return dict(meta=dict(seed=np.int64(0), mmengine_version='0.10.7', iter=np.int64(80)),
                message_hub=hub.state_dict(),
                state_dict={'decode_head.conv_seg.weight': torch.zeros(2, 4, 1, 1)})


class SystemCall:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


@pytest.mark.parametrize('kind', ['text', 'truncated', 'empty'])
def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path, monkeypatch, capsys, kind):
    src = tmp_path / 'src.pth'
    if kind == 'text':
        src.write_text('not a checkpoint\n')
    elif kind == 'truncated':
        torch.save(dict(state_dict={'module.prototypes': torch.ones(19, 10, 720)}), src)
        src.write_bytes(src.read_bytes()[:5000])
    else:
        src.write_bytes(b'')
    status, err = run_tool(monkeypatch, capsys, src, tmp_path / 'out.pth')
    assert status == 1
    assert err.startswith(f'convert_openseg_protoseg: error: {src} is ')
    assert {'text': "is not a readable checkpoint: torch.save writes a zip archive",
            'truncated': 'is not a readable checkpoint: a truncated or damaged zip archive',
            'empty': 'is empty: not a readable checkpoint'}[kind] in err
    assert 'trust-pickle' not in err and 'weights_only' not in err
    assert not (tmp_path / 'out.pth').exists()


def test_an_mmengine_checkpoint_is_named_so(tmp_path, monkeypatch, capsys):
    src = tmp_path / 'iter_80.pth'
    torch.save(mmengine_checkpoint(), src)
    status, err = run_tool(monkeypatch, capsys, src, tmp_path / 'out.pth')
    assert status == 1
    assert f"{src} is an mmengine checkpoint, not the authors' release (it holds a " \
           'message_hub' in err
    assert 'needs no conversion' in err and 'trust-pickle' not in err


def test_converter_output_and_bare_mmseg_state_dicts_are_named_too(tmp_path):
    from mmseg_proto.utils.convert_openseg import (OpensegConversionError,
                                                   convert_openseg_protoseg,
                                                   load_openseg_checkpoint)
    converted = tmp_path / 'converted.pth'
    torch.save(dict(state_dict={'backbone.conv1.weight': torch.zeros(1)},
                    meta=dict(converter='mmseg_proto.utils.convert_openseg')), converted)
    with pytest.raises(OpensegConversionError, match=r'an mmengine checkpoint, not the '
                       r"authors' release \(this converter wrote it\)"):
        load_openseg_checkpoint(str(converted))
    with pytest.raises(OpensegConversionError, match=r"MMSeg's decode_head\.\* keys"):
        convert_openseg_protoseg({'decode_head.conv_seg.bias': torch.zeros(2)})


def test_a_crafted_file_is_refused_and_never_run(tmp_path, monkeypatch, capsys):
    marker = tmp_path / 'ran'
    src = tmp_path / 'evil.pth'
    torch.save(dict(state_dict={}, meta=SystemCall(marker)), src)
    status, err = run_tool(monkeypatch, capsys, src, tmp_path / 'out.pth')
    assert status == 1 and not marker.exists()
    assert f'mmseg_proto refused to load this checkpoint ({src}): it names ' in err
    assert 'will likely succeed' not in err
    # --trust-pickle is offered, for a file one trusts, only where the loader refused.
    assert '--trust-pickle loads it with torch.load(weights_only=False): use it only for a ' \
           'file you trust' in err


def test_an_authors_style_file_still_loads(tmp_path):
    from mmseg_proto.utils.convert_openseg import load_openseg_checkpoint
    src = tmp_path / 'openseg.pth'
    state = {'module.prototypes': torch.randn(2, 3, 4), 'module.cls_head.0.bias': torch.ones(5)}
    torch.save(dict(state_dict=state, iters=80000), src)
    loaded = load_openseg_checkpoint(str(src))
    assert loaded['iters'] == 80000
    assert torch.equal(loaded['state_dict']['module.prototypes'], state['module.prototypes'])
