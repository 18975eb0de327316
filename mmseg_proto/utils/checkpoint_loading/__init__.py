"""Load mmengine checkpoints on torch >= 2.6 without making any other load less safe.

torch 2.6 made ``torch.load(..., weights_only=True)`` the default and mmengine 0.10.x calls
``torch.load`` without the argument. Besides tensors, the checkpoints mmengine writes hold the
message hub's ``HistoryBuffer`` objects (with references to their statistics methods) and numpy
arrays, dtypes and scalars, which the weights-only unpickler refuses, so ``--resume``,
``load_from``, ``mim test --checkpoint`` and ``mmseg.apis.init_model`` fail.

:func:`register_checkpoint_loader` makes :func:`load_local_checkpoint` mmengine's loader of
local files and :func:`load_http_checkpoint` its loader of ``http://`` / ``https://`` URLs.
Both load through :func:`load_checkpoint_file`, which runs torch's own weights-only unpickling
loop with an allow-list of its own, for that load only (:mod:`.unpickler`): torch's
process-wide list (``torch.serialization.get_safe_globals()``) is never changed, so loads in
several threads do not interfere and a plain ``torch.load`` anywhere else never sees the
names below. That allow-list adds to torch's defaults stand-ins for exactly what mmengine
writes, each of which checks what it builds (:mod:`.stand_ins`):

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
format) is an :class:`UnreadableCheckpointError` that says so (:mod:`.files`).

Where the loop cannot run (torch < 2.4, or a torch whose private unpickler is not what the
clone expects, found at import by :func:`checkpoint_loader_problem`; or
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``), files load with torch's own weights-only loader (tensors
and plain Python values only): one warning at import, and every refusal, say what happened,
which torch versions are supported and what to do (:func:`.unpickler.fallback_explanation`).

One explicit opt-in, scoped to named files, loads a file the user trusts with torch's full
unpickler: its SHA-256 listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS`` (docs/install.md, "Trusted
checkpoints"). Files are named by content, never by path, and nothing else changes.

``http(s)`` checkpoints are read, in this order, from this loader's cache (one entry per URL),
from torch.hub's cache (``<torch.hub.get_dir()>/checkpoints/<file name>``, where torch.hub and
mmengine put them), and only then downloaded, so an offline node uses what is there
(:mod:`.http_cache`).
"""
from .errors import TRUSTED_VARIABLE, CheckpointRefusedError, UnreadableCheckpointError
from .files import (check_checkpoint_format, load_checkpoint_file, load_local_checkpoint,
                    load_with_checkpoint_globals, trusted_checkpoint_digests)
from .http_cache import http_cache_path, load_http_checkpoint, torch_hub_cache_path
from .stand_ins import ADMITTED_KINDS, checkpoint_safe_globals, fill_only_types
from .unpickler import checkpoint_loader_problem, warn_if_loader_unusable

__all__ = [
    'CheckpointRefusedError', 'UnreadableCheckpointError', 'checkpoint_safe_globals',
    'fill_only_types', 'check_checkpoint_format', 'load_checkpoint_file',
    'load_with_checkpoint_globals', 'load_local_checkpoint', 'load_http_checkpoint',
    'http_cache_path', 'torch_hub_cache_path', 'register_checkpoint_loader',
    'checkpoint_loader_problem', 'warn_if_loader_unusable', 'trusted_checkpoint_digests',
    'TRUSTED_VARIABLE', 'ADMITTED_KINDS'
]


def register_checkpoint_loader() -> None:
    """Make :func:`load_local_checkpoint` mmengine's loader of local files and
    :func:`load_http_checkpoint` its loader of http(s) URLs (every ``load_from``,
    ``--resume``, ``--checkpoint``, ``init_model`` and pretrained ``init_cfg`` with such a
    path goes through them). Other schemes (``open-mmlab://``, ``torchvision://``, ...) keep
    mmengine's loaders. Warns once per process when this torch's private unpickler is not
    what the loader expects (:func:`warn_if_loader_unusable`). Idempotent."""
    from mmengine.runner.checkpoint import CheckpointLoader
    warn_if_loader_unusable()
    if CheckpointLoader._schemes.get('') is not load_local_checkpoint:
        CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint,
                                         force=True)
    if CheckpointLoader._schemes.get('https://') is not load_http_checkpoint:
        CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                         loader=load_http_checkpoint, force=True)
