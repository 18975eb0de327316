"""``http(s)://`` checkpoints: this loader's cache (one entry per URL), then torch.hub's, then
a download kept only if it is complete and a checkpoint; each then loads as a local file.
"""
import hashlib
import http.client
import os
import os.path as osp
import re
import tempfile
import urllib.error
import urllib.request
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from .errors import CheckpointRefusedError, UnreadableCheckpointError
from .files import check_checkpoint_format, file_sha256, load_checkpoint_file

DOWNLOAD_TIMEOUT_S = 60
#: torch.hub's convention for a SHA-256 prefix in a file name (``NAME-<hex>.pth``).
HUB_HASH_IN_NAME = re.compile(r'-([a-f0-9]*)\.')


def _default_model_dir() -> str:
    torch_home = os.getenv('TORCH_HOME', osp.join(os.getenv('XDG_CACHE_HOME', '~/.cache'),
                                                  'torch'))
    return osp.join(osp.expanduser(torch_home), 'checkpoints')


def _url_file_name(url: str) -> str:
    """The file name at the end of ``url``'s path (what torch.hub names its copy)."""
    path = urlparse(url).path
    name = osp.basename(path)
    if name in ('', '.', '..'):
        where = f'its path {path!r} ends with {"/" if not name else name!r}' if path else \
            'it has no path'
        raise ValueError(
            f'mmseg_proto: the checkpoint URL {url} names no file ({where}): give the URL of '
            'the checkpoint file itself, e.g. https://host/path/model.pth')
    return name


def http_cache_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where :func:`load_http_checkpoint` caches ``url``: ``MODEL_DIR/mmseg_proto/<first 16
    hex digits of the URL's SHA-256>/<file name>``, so two URLs with the same file name
    (other hosts, folders or query strings) never share an entry. ``MODEL_DIR`` defaults to
    ``$TORCH_HOME/checkpoints``.

    Args:
        url (str): The checkpoint URL.
        model_dir (str, optional): The cache folder. Default: None (torch's).

    Returns:
        str: The cache path.
    """
    name = _url_file_name(url)
    key = hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]
    return osp.join(model_dir or _default_model_dir(), 'mmseg_proto', key, name)


def torch_hub_cache_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where torch.hub (``load_state_dict_from_url``) and mmengine's own http loader keep
    ``url``: ``<model_dir or torch.hub.get_dir()/checkpoints>/<file name of the URL>``
    (``$TORCH_HOME/hub/checkpoints/NAME`` by default). :func:`load_http_checkpoint` reads a
    file there before downloading, and never writes there.

    Args:
        url (str): The checkpoint URL.
        model_dir (str, optional): The folder given to the loader. Default: None
            (torch.hub's).

    Returns:
        str: The path torch.hub would use.
    """
    return osp.join(model_dir or osp.join(torch.hub.get_dir(), 'checkpoints'),
                    _url_file_name(url))


def _check_hub_copy(url: str, path: str) -> None:
    """A torch.hub copy whose file name carries a SHA-256 prefix (torch.hub's
    ``NAME-<hex>.pth`` convention, 8 digits or more) must match it: torch.hub keys its cache
    by file name alone, so another file of the same name may be there."""
    match = HUB_HASH_IN_NAME.search(osp.basename(path))
    prefix = match.group(1) if match else ''
    if len(prefix) < 8:
        return
    digest = file_sha256(path)
    if not digest.startswith(prefix):
        raise UnreadableCheckpointError(
            f'mmseg_proto: {path}, torch.hub\'s cached copy of {url}, has the SHA-256 '
            f'{digest[:16]}..., not the {prefix} its file name promises: it is another file of '
            'the same name, or damaged. Delete it (or move it away) to download the URL again')


def _download(url: str, cached: str) -> None:
    """Download ``url`` to ``cached`` through a temporary file in the same folder, kept only
    if it has the announced size and is a checkpoint."""
    folder = osp.dirname(cached)
    os.makedirs(folder, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=folder, prefix=osp.basename(cached) + '.',
                                           suffix='.partial')
    try:
        with os.fdopen(descriptor, 'wb') as out:
            request = urllib.request.Request(url, headers={'User-Agent': 'mmseg_proto'})
            try:
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    announced = response.headers.get('Content-Length')
                    content_type = response.headers.get('Content-Type') or 'unknown'
                    received = 0
                    while True:
                        chunk = response.read(1 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
                        received += len(chunk)
            except urllib.error.HTTPError as error:
                raise RuntimeError(f'mmseg_proto: downloading the checkpoint {url} failed: '
                                   f'HTTP {error.code} {error.reason}') from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                raise RuntimeError(f'mmseg_proto: downloading the checkpoint {url} failed: '
                                   f'{type(error).__name__}: {error}; nothing was kept at '
                                   f'{cached}') from None
        if announced is not None and announced.isdigit() and received != int(announced):
            raise UnreadableCheckpointError(
                f'mmseg_proto: the download of {url} stopped after {received} of '
                f'{announced} bytes; nothing was kept at {cached}: run again to retry')
        with open(partial, 'rb') as file:
            try:
                check_checkpoint_format(file, f'the file served at {url}')
            except UnreadableCheckpointError as error:
                raise UnreadableCheckpointError(
                    f'mmseg_proto: {error} (Content-Type {content_type}, {received} bytes); '
                    f'nothing was kept at {cached}') from None
        os.replace(partial, cached)
    finally:
        if osp.exists(partial):
            os.remove(partial)


def load_http_checkpoint(filename: str, map_location=None,
                         model_dir: Optional[str] = None) -> Any:
    """mmengine's loader of ``http(s)://`` checkpoints (``load_from``, ``--checkpoint``,
    ``init_cfg=dict(type='Pretrained', checkpoint=URL)``), loading as
    :func:`load_checkpoint_file` does.

    Uses, in this order, this loader's copy (:func:`http_cache_path`, one entry per URL),
    then torch.hub's (:func:`torch_hub_cache_path`, where torch.hub and mmengine keep it: an
    offline node loads what is there), and only then downloads, as mmengine's
    ``load_from_http`` does (process 0 first, the others after a barrier, into the same
    cache), into :func:`http_cache_path`, keeping a download only if it is complete and a
    checkpoint. Every error about the cached
    file names its path. It replaces mmengine's loader rather than wrapping it:
    onedl-mmengine's falls back to ``weights_only=False`` when weights-only loading fails,
    and OpenMMLab's refuses the numpy and HistoryBuffer data of whole mmengine checkpoints on
    torch >= 2.6.

    Args:
        filename (str): The URL.
        map_location: As in ``torch.load``. Default: None.
        model_dir (str, optional): The cache folder, also where torch.hub's copy is looked
            for (as torch.hub's ``model_dir``). Default: None (``$TORCH_HOME/checkpoints``
            for this loader's copies, ``torch.hub.get_dir()/checkpoints`` for torch.hub's).
    """
    from mmengine.dist import get_dist_info
    cached = http_cache_path(filename, model_dir)
    if not osp.isfile(cached):
        hub_copy = torch_hub_cache_path(filename, model_dir)
        if osp.isfile(hub_copy):  # already there, as torch.hub or mmengine left it
            _check_hub_copy(filename, hub_copy)
            return _load_copy(filename, hub_copy, f'in torch.hub\'s cache at {hub_copy}',
                              map_location)
    rank, world_size = get_dist_info()
    downloaded = False
    if rank == 0 and not osp.isfile(cached):
        _download(filename, cached)
        downloaded = True
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0 and not osp.isfile(cached):
            _download(filename, cached)
            downloaded = True
    try:
        return _load_copy(filename, cached, f'cached at {cached}', map_location)
    except UnreadableCheckpointError as error:
        if not downloaded:
            raise
        # e.g. a legacy-format file cut short without a Content-Length
        os.remove(cached)
        message = str(error).split(' [the copy of ')[0]
        raise UnreadableCheckpointError(
            f'{message} [downloaded from {filename}; nothing was kept at {cached}]') from None


def _load_copy(url: str, path: str, where: str, map_location: Any) -> Any:
    """Load the local copy ``path`` of ``url``; every error names the copy (``where``)."""
    try:
        return load_checkpoint_file(path, map_location=map_location)
    except UnreadableCheckpointError as error:
        raise UnreadableCheckpointError(
            f'{error} [the copy of {url} {where}; delete it to download it again]') from None
    except CheckpointRefusedError as error:
        raise CheckpointRefusedError(f'{error} [the copy of {url} {where}]',
                                     honest=error.honest) from None
    except Exception as error:
        raise RuntimeError(f'mmseg_proto: loading the copy of {url} {where} failed: '
                           f'{type(error).__name__}: {error}') from error
