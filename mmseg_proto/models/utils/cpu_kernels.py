"""Optional one-pass C kernels of :class:`FusedPrototypeScores` on CPU.

The kernels (``csrc/prototype_scores_cpu.c``, plain C with OpenMP) are
compiled on first use with the system C compiler into a cache folder and
loaded with ctypes; nothing is compiled at install time and no PyTorch
headers are needed (the build takes about a second). Without a compiler,
or when the build fails, a warning is issued once and the eager PyTorch
path is used: the same results, more passes over memory.

Environment:
    MMSEG_PROTO_CPU_KERNELS=0: never build or use the kernels.
    MMSEG_PROTO_CACHE: cache folder (default ``~/.cache/mmseg_proto``).
    CC: the C compiler (default ``gcc``, else ``cc``).
"""
import ctypes
import hashlib
import os
import os.path as osp
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional

SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc',
                  'prototype_scores_cpu.c')
_COMMON = ['-O3', '-fPIC', '-shared', '-fno-trapping-math', '-fno-math-errno']
_FLAG_SETS = (_COMMON + ['-fopenmp'],
              _COMMON + ['-fopenmp-simd'],  # no OpenMP runtime: one thread
              _COMMON)
_state = {'tried': False, 'lib': None}


def _flag_sets():
    """Compiler flags to try in turn; AVX2+FMA code where torch sees them
    (part of the cache key, so a shared cache never serves it elsewhere)."""
    import torch
    arch = ['-march=haswell'] if torch.backends.cpu.get_cpu_capability() in (
        'AVX2', 'AVX512') else []
    return [arch + flags for flags in _FLAG_SETS] + (
        list(_FLAG_SETS) if arch else [])


def enabled() -> bool:
    """Whether the kernels may be used (MMSEG_PROTO_CPU_KERNELS != 0)."""
    return os.environ.get('MMSEG_PROTO_CPU_KERNELS', '1') != '0'


def _cache_dir() -> str:
    return os.environ.get('MMSEG_PROTO_CACHE') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.expanduser('~/.cache'),
        'mmseg_proto')


def _build(compiler: str, flags, source: bytes) -> str:
    """Compile (or find cached) and return the shared library's path."""
    key = hashlib.sha256(source + ' '.join([compiler] + flags).encode())
    folder = _cache_dir()
    path = osp.join(folder, f'prototype_scores_cpu_{key.hexdigest()[:16]}.so')
    if osp.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=folder)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, SOURCE, '-o', tmp, '-lm'],
                       check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, path)  # atomic: concurrent processes are safe
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return path


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.proto_scores_forward.argtypes = [p, i64, i64, i64, p, p, p, p, i32]
    lib.proto_scores_forward.restype = None
    lib.proto_scores_backward.argtypes = [
        p, i64, i64, i64, p, p, p, p, p, i32]
    lib.proto_scores_backward.restype = None
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The kernels' library, or None (disabled, or no working compiler)."""
    if not enabled():
        return None
    if _state['tried']:
        return _state['lib']
    _state['tried'] = True
    compiler = os.environ.get('CC') or shutil.which('gcc') or shutil.which(
        'cc')
    problem = 'no C compiler found (set CC)'
    if compiler:
        with open(SOURCE, 'rb') as f:
            source = f.read()
        for flags in _flag_sets():
            try:
                _state['lib'] = _declare(
                    ctypes.CDLL(_build(compiler, flags, source)))
                return _state['lib']
            except (OSError, subprocess.SubprocessError) as e:
                problem = (getattr(e, 'stderr', None) or str(e)).strip()
                problem = problem.splitlines()[-1] if problem else repr(e)
    warnings.warn(
        'mmseg_proto: the CPU kernels of FusedPrototypeScores could not be '
        f'built ({problem}); using the PyTorch path (same results, slower '
        'on CPU). Set MMSEG_PROTO_CPU_KERNELS=0 to silence this.')
    return None
