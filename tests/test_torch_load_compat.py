"""torch >= 2.6 loads mmengine checkpoints, and only what they contain."""
import io

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub

import mmseg_proto  # noqa: F401  (registers the allow-list)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # default: weights_only=True on torch >= 2.6


def test_message_hub_and_numpy_state_loads():
    hub = MessageHub.get_instance('compat_test')
    for i in range(5):
        hub.update_scalar('train/loss', float(i))
    hub.update_info('iter', 5)
    state = dict(
        message_hub=hub.state_dict(),
        meta=dict(seed=np.int64(3), mean=np.float64(0.5),
                  arr=np.arange(4, dtype=np.float32)),
        state_dict=dict(w=torch.ones(2)))
    out = roundtrip(state)
    buf = out['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    assert buf.mean() == pytest.approx(2.0)
    assert buf.statistics('min') == 0.0
    assert out['meta']['seed'] == 3
    np.testing.assert_array_equal(out['meta']['arr'], np.arange(4))


class _Evil:

    def __reduce__(self):
        return (getattr, (HistoryBuffer, '__init__'))


class _NotAllowed:
    pass


def test_other_getattr_and_unknown_classes_stay_refused():
    with pytest.raises(Exception, match='not allowed|Unsupported|Weights'):
        roundtrip({'x': _Evil()})
    with pytest.raises(Exception, match='Unsupported|Weights'):
        roundtrip({'x': _NotAllowed()})
