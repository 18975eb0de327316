"""One local file: what kind of file it is, the trusted-file opt-in, and which loader runs."""
import hashlib
import os
import os.path as osp
import pickle
import re
import tarfile
import zipfile
from typing import Any, Callable, Optional, Set

import torch

from .errors import (REFUSED, TRUSTED_DOC, TRUSTED_VARIABLE, CheckpointRefusedError,
                     UnreadableCheckpointError)
from .unpickler import (checkpoint_loader_problem, fallback_reason, load_with_stand_ins,
                        refusal_of_torch_message, weights_only_forced)

ZIP_MAGIC = b'PK\x03\x04'
PICKLE_PROTO = 0x80


def _describe_start(head: bytes) -> str:
    text = head.lstrip()[:1]
    if text == b'<':
        return ' (an HTML or XML page?)'
    try:
        head.decode('utf-8')
        return ' (a text file?)'
    except UnicodeDecodeError:
        return ''


def check_checkpoint_format(file, name: str) -> bool:
    """Raise :class:`UnreadableCheckpointError` unless ``file`` (open, binary, at its start)
    is what ``torch.save`` writes: a complete zip archive that is not TorchScript, or a
    legacy (torch < 1.6) pickle. The file is left at its start.

    Args:
        file: The open file.
        name (str): How messages name the file (a path, or a URL and a path).

    Returns:
        bool: True for a zip archive, False for the legacy format.
    """
    head = file.read(64)
    file.seek(0)
    if not head:
        raise UnreadableCheckpointError(f'{name} is empty: not a readable checkpoint')
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(file) as archive:
                records = {entry.partition('/')[2] for entry in archive.namelist()}
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise UnreadableCheckpointError(
                f'{name} is not a readable checkpoint: a truncated or damaged zip archive '
                f'({str(error).splitlines()[0] if str(error) else type(error).__name__})'
            ) from None
        file.seek(0)
        if 'constants.pkl' in records:  # what torch.jit.save writes, torch.save never
            raise UnreadableCheckpointError(
                f'{name} is a TorchScript archive (torch.jit.save), not a checkpoint: '
                'load it with torch.jit.load, and only if you trust it')
        return True
    try:
        with tarfile.open(fileobj=file, mode='r:'):
            is_tar = True
    except tarfile.TarError:
        is_tar = False
    file.seek(0)
    if is_tar:
        raise UnreadableCheckpointError(
            f'{name} is in torch\'s legacy tar format (torch < 0.4), which this loader does '
            'not read: load it once with an old torch you trust and save it again')
    if head[0] != PICKLE_PROTO:
        raise UnreadableCheckpointError(
            f'{name} is not a readable checkpoint: torch.save writes a zip archive (or, '
            f'before torch 1.6, a pickle), but this file starts with {head[:16]!r}'
            f'{_describe_start(head)}')
    return False


def trusted_checkpoint_digests() -> Set[str]:
    """The SHA-256 digests listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS`` (read at each load).

    The variable lists the digests (64 hex digits, as ``sha256sum FILE`` prints them),
    separated by commas or white space, of files the user trusts: those, and only those,
    load with torch's full unpickler. Files are named by content, never by path, so a file
    replaced at the same path is not trusted.

    Returns:
        set[str]: Lower-case digests; empty when the variable is unset or empty.

    Raises:
        ValueError: An entry is not a SHA-256 digest (the message names it).
    """
    entries = [entry for entry in re.split(r'[\s,]+', os.getenv(TRUSTED_VARIABLE, '')) if entry]
    for entry in entries:
        if not re.fullmatch(r'[0-9a-fA-F]{64}', entry):
            raise ValueError(
                f'mmseg_proto: {TRUSTED_VARIABLE} lists {entry[:80]!r}, which is not a SHA-256 '
                'digest: it takes the digests (64 hex digits, as `sha256sum FILE` prints '
                'them) of the checkpoint files you trust, separated by commas or spaces, '
                f'never paths ({TRUSTED_DOC})')
    return {entry.lower() for entry in entries}


def _sha256(file) -> str:
    """SHA-256 of an open binary file, read from its start; the file is left at its start."""
    file.seek(0)
    digest = hashlib.sha256()
    for block in iter(lambda: file.read(1 << 20), b''):
        digest.update(block)
    file.seek(0)
    return digest.hexdigest()


def file_sha256(filename: str) -> str:
    with open(filename, 'rb') as file:
        return _sha256(file)


def _trust_advice(filename: str) -> str:
    """How to load ``filename`` anyway, if the user trusts it."""
    if weights_only_forced():
        return ''
    return (f' If you trust this file (an official release from its publisher, or a file you '
            'saved yourself), you can let mmseg_proto load this file, and only this file, '
            f'with torch\'s full unpickler: set {TRUSTED_VARIABLE}={file_sha256(filename)} '
            f'(its SHA-256; {TRUSTED_DOC}).')


def _load_trusted(file, filename: str, map_location: Any) -> Any:
    """Load a file whose SHA-256 the user listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS``
    with torch's full unpickler (from the very bytes that were hashed)."""
    if weights_only_forced():
        raise CheckpointRefusedError(
            f'{REFUSED} ({filename}): its SHA-256 is listed in {TRUSTED_VARIABLE}, but '
            'TORCH_FORCE_WEIGHTS_ONLY_LOAD is set too, which makes torch load tensors and '
            'plain Python values only: unset one of the two', honest=True)
    from mmengine.logging import print_log
    print_log(f'mmseg_proto: loading {filename} with torch\'s full unpickler: its SHA-256 is '
              f'listed in {TRUSTED_VARIABLE}', logger='current')
    return torch.load(file, map_location=map_location, weights_only=False)


def _saved_protocol(filename: str) -> Optional[int]:
    """The pickle protocol a checkpoint was written with (None if it names none)."""
    try:
        with open(filename, 'rb') as file:
            head = file.read(4)
            file.seek(0)
            if head.startswith(ZIP_MAGIC):
                with zipfile.ZipFile(file) as archive:
                    names = [name for name in archive.namelist()
                             if name == 'data.pkl' or name.endswith('/data.pkl')]
                    if not names:
                        return None
                    with archive.open(names[0]) as data:
                        head = data.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) >= 2 and head[0] == PICKLE_PROTO else None


def _protocol_refusal(filename: str, protocol: int, opcode: int) -> CheckpointRefusedError:
    return CheckpointRefusedError(
        f'{REFUSED} ({filename}): it was saved with pickle protocol {protocol} '
        f'(torch.save(..., pickle_protocol={protocol})), and torch\'s weights-only unpickler, '
        f'which this loader runs, does not read that protocol\'s opcode {opcode} '
        f'({chr(opcode)!r}); it reads torch.save\'s default, protocol 2. Nothing shows the '
        'file is damaged: save it again without pickle_protocol (the default).'
        f'{_trust_advice(filename)}', honest=True, opcode=opcode)


def _with_filename(error: CheckpointRefusedError, filename: str) -> CheckpointRefusedError:
    """``error`` naming ``filename``, with the protocol of the file where an opcode was
    refused and, for what an honest file may hold, how to load a file one trusts."""
    if error.opcode is not None:
        protocol = _saved_protocol(filename)
        if protocol is not None and protocol > 2:
            return _protocol_refusal(filename, protocol, error.opcode)
    text = str(error).replace(REFUSED, f'{REFUSED} ({filename})', 1)
    if error.honest and TRUSTED_VARIABLE not in text:
        text += _trust_advice(filename)
    return CheckpointRefusedError(text, honest=error.honest, opcode=error.opcode)


def load_checkpoint_file(filename: str, map_location: Any = None) -> Any:
    """Load a local checkpoint file with the allow-list described in
    :mod:`mmseg_proto.utils.checkpoint_loading`,
    for this load only (safe to call from several threads at once).

    A file whose SHA-256 is listed in ``MMSEG_PROTO_TRUSTED_CHECKPOINTS``
    (:func:`trusted_checkpoint_digests`) loads with torch's full unpickler instead.

    Args:
        filename (str): The file.
        map_location: As in ``torch.load``. Default: None.

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: No such file.
        UnreadableCheckpointError: Not a checkpoint ``torch.save`` wrote, or cut short.
        CheckpointRefusedError: It holds something that is not admitted.
        ValueError: ``MMSEG_PROTO_TRUSTED_CHECKPOINTS`` lists something else than digests.
    """
    filename = osp.expanduser(str(filename))
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if filename.endswith('.safetensors'):  # torch reads these without unpickling
        return torch.load(filename, map_location=map_location, weights_only=True)
    trusted = trusted_checkpoint_digests()
    ends_early = ('is not a readable checkpoint: its data ends early (a truncated file?)')
    try:
        with open(filename, 'rb') as file:
            is_zip = check_checkpoint_format(file, filename)
            if trusted and _sha256(file) in trusted:
                return _load_trusted(file, filename, map_location)
            # A zip archive cut short fails the check above; a legacy file can only show it
            # while it is read, so the reads note where the file ends.
            source = file if is_zip else _EndNoting(file)
            try:
                if weights_only_forced() or checkpoint_loader_problem() is not None:
                    return _load_with_torch_defaults(source, map_location)
                return load_with_stand_ins(source, map_location)
            except Exception:
                if getattr(source, 'ended', False):
                    raise UnreadableCheckpointError(f'{filename} {ends_early}') from None
                raise
    except CheckpointRefusedError as error:
        raise _with_filename(error, filename) from None
    except EOFError:
        raise UnreadableCheckpointError(f'{filename} {ends_early}') from None
    except RuntimeError as error:  # a record of the zip archive that cannot be read
        if 'PytorchStreamReader' not in str(error):
            raise
        raise UnreadableCheckpointError(
            f'{filename} is not a readable checkpoint: a damaged zip archive '
            f'({str(error).splitlines()[0]})') from None


class _EndNoting:
    """A binary file for torch's legacy-format reader that notes a read reaching its end
    (a complete legacy file never asks for more than it holds)."""

    def __init__(self, file) -> None:
        self.file, self.ended = file, False

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        if size is not None and 0 <= size and len(data) < size:
            self.ended = True
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self.file.readline(size)
        if not line.endswith(b'\n') and (size is None or size < 0 or len(line) < size):
            self.ended = True
        return line

    def readinto(self, buffer) -> int:
        count = self.file.readinto(buffer)
        if count < memoryview(buffer).nbytes:
            self.ended = True
        return count

    def seek(self, *args) -> int:
        return self.file.seek(*args)

    def tell(self) -> int:
        return self.file.tell()

    def seekable(self) -> bool:
        return True


def _load_with_torch_defaults(file, map_location: Any) -> Any:
    """torch < 2.4 (no allow-list to pass), a torch whose private unpickler is not the one
    this module was written for, or TORCH_FORCE_WEIGHTS_ONLY_LOAD: torch's own weights-only
    load (tensors only), with a refusal that says why this loader ran and what to do."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps its unpickler's message in advice to retry with weights_only=False,
        # the one advice that runs a crafted file: keep only the unpickler's message.
        message = str(error)
        if 'WeightsUnpickler error:' in message:
            message = message.split('WeightsUnpickler error:')[-1]
        elif '\n\n' in message:
            message = message.split('\n\n', 1)[1]
        raise refusal_of_torch_message(
            message.strip().replace('Weights only load failed. ', ''),
            fallback=fallback_reason()) from None


def load_with_checkpoint_globals(load: Callable, *args, **kwargs) -> Any:
    """Kept for callers of earlier versions: ``load_with_checkpoint_globals(torch.load,
    FILE, map_location=...)`` is :func:`load_checkpoint_file` of ``FILE``.

    Args:
        load (Callable): Must be ``torch.load``.
        *args: ``torch.load``'s file and, optionally, ``map_location``.
        **kwargs: ``map_location`` only.

    Returns:
        The loaded object.
    """
    if load is not torch.load or not 1 <= len(args) <= 2 or set(kwargs) - {'map_location'}:
        raise TypeError('load_with_checkpoint_globals: call it as (torch.load, FILE[, '
                        'map_location]); it no longer admits anything around another '
                        'function: use load_checkpoint_file(FILE, map_location)')
    map_location = args[1] if len(args) == 2 else kwargs.get('map_location')
    return load_checkpoint_file(args[0], map_location=map_location)


#: mmengine's loader of local checkpoint files. It replaces the loader mmengine registers for
#: local paths rather than wrapping it: the OneDL fork's loader (onedl-mmengine 0.10.12)
#: admits the real ``getattr``, ``numpy.dtype`` and ``numpy.ndarray`` and, when weights-only
#: loading fails, falls back to ``weights_only=False``, i.e. runs whatever a crafted file
#: contains.
load_local_checkpoint = load_checkpoint_file
