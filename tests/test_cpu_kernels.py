import shutil

import pytest
import torch
import torch.nn.functional as F

from mmseg_proto.models.utils import FusedPrototypeScores, cpu_kernels

needs_compiler = pytest.mark.skipif(
    shutil.which('gcc') is None and shutil.which('cc') is None,
    reason='no C compiler')


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A private cache folder and a fresh load() state."""
    monkeypatch.setenv('MMSEG_PROTO_CACHE', str(tmp_path))
    monkeypatch.setitem(cpu_kernels._state, 'tried', False)
    monkeypatch.setitem(cpu_kernels._state, 'lib', None)
    return tmp_path


def run_fused(emb, protos, targets, c, k, temperature, nan_row=None):
    x = emb.clone().requires_grad_()
    scaled_p = protos / temperature
    scaled = (x @ scaled_p.T).detach()
    if nan_row is not None:
        scaled[nan_row, 0] = float('nan')
    scores, ppc, ppd = FusedPrototypeScores.apply(x, scaled, scaled_p,
                                                  targets, c, k,
                                                  1.0 / temperature)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(scores.shape, generator=g)
    ((scores * w).sum() + 0.7 * ppc.sum() + 0.3 * ppd.sum()).backward()
    return scores, ppc, ppd, x.grad


def inputs(n=300, c=7, k=5, d=16):
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(k * c, d, generator=g), dim=1)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=1)
    targets = torch.randint(0, k * c, (n, ), generator=g)
    targets[::4] = -1
    return emb, protos, targets, c, k


@needs_compiler
def test_kernels_build_once_and_are_cached(fresh_kernels):
    lib = cpu_kernels.load()
    assert lib is not None
    assert len(list(fresh_kernels.glob('prototype_scores_cpu_*.so'))) == 1
    assert cpu_kernels.load() is lib


@needs_compiler
@pytest.mark.parametrize('temperature', [1.0, 0.1, 0.005])
def test_kernels_equal_pytorch_path(fresh_kernels, monkeypatch, temperature):
    emb, protos, targets, c, k = inputs()
    emb[:3] = protos[:3]  # similarity 1: exp(200) unless shifted
    out = {}
    for flag in ('1', '0'):
        monkeypatch.setenv('MMSEG_PROTO_CPU_KERNELS', flag)
        out[flag] = run_fused(emb, protos, targets, c, k, temperature)
    assert cpu_kernels.load() is None  # disabled by the variable
    for a, b in zip(out['1'], out['0']):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_kernels_propagate_nan(fresh_kernels):
    emb, protos, targets, c, k = inputs()
    targets[5] = 2
    _, ppc, _, grad = run_fused(emb, protos, targets, c, k, 0.1, nan_row=5)
    assert torch.isnan(ppc[5]) and torch.isfinite(ppc[6:]).all()
    assert torch.isnan(grad[5]).any()


def test_missing_compiler_warns_once_and_falls_back(fresh_kernels,
                                                    monkeypatch):
    monkeypatch.setenv('CC', str(fresh_kernels / 'no-such-compiler'))
    with pytest.warns(UserWarning, match='could not be built'):
        assert cpu_kernels.load() is None
    assert cpu_kernels.load() is None  # no second attempt, no warning
    emb, protos, targets, c, k = inputs()
    monkeypatch.setenv('MMSEG_PROTO_CPU_KERNELS', '0')
    ref = run_fused(emb, protos, targets, c, k, 0.1)
    monkeypatch.delenv('MMSEG_PROTO_CPU_KERNELS')
    for a, b in zip(run_fused(emb, protos, targets, c, k, 0.1), ref):
        torch.testing.assert_close(a, b)
