"""Where a tool writes: never over its inputs, never over files it did not write, atomically.

The one output policy of every tool of this package that writes files (``tools/``,
``benchmarks/``):

- An output is never one of the run's inputs (checkpoint, config, image, label, gallery,
  data folder), whatever the spelling of either path: relative or absolute, through a
  symbolic or a hard link. Nor does an output lie inside an input folder.
- An existing file is replaced, and a stale one deleted, only if the same tool wrote it:
  each folder a tool writes to holds a manifest (:data:`MANIFEST`, a JSON file) that lists
  the files this package's tools wrote there, and which tool wrote each. Any other file in
  the way is refused with a message, never touched. (A benchmark's ``--out`` is its own work
  folder: it rebuilds its tables there from the runs the folder holds.)
- Every file is written to a temporary file in its folder and renamed over the final name
  once complete (:func:`atomic_output`): an interrupted run leaves no half file where a later
  run would trust it.

A tool checks its outputs first thing after parsing its arguments (before building a
model), so a mistaken command fails at once and writes nothing::

    out = check_output_file(args.out, 'prototype_health',
                            dict(config=args.config, checkpoint=args.checkpoint))
    ...
    with out.atomic(osp.basename(args.out)) as tmp:
        write_the_table(tmp)
"""
import contextlib
import json
import os
import os.path as osp
import shutil
import tempfile
import uuid
from typing import (Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Union)

#: The manifest of a folder: the files this package's tools wrote in it.
MANIFEST = '.mmseg_proto_outputs.json'
MANIFEST_FORMAT = 'mmseg_proto tool outputs'
MANIFEST_VERSION = 1

#: ``name -> path`` (or several paths, or None for an option not given).
Inputs = Mapping[str, Union[None, str, Sequence[str]]]


class OutputPathError(ValueError):
    """An output path a tool refuses, with what to do instead."""


def _input_items(inputs: Inputs) -> List[tuple]:
    """``(name, path)`` for every local input path; URLs and None are skipped."""
    items = []
    for name, value in inputs.items():
        paths = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
        for path in paths:
            path = os.fspath(path)
            if path and '://' not in path:
                items.append((name, path))
    return items


def same_file(a: str, b: str) -> Optional[str]:
    """How ``a`` and ``b`` name the same file, or None if they do not.

    Args:
        a (str): A path (it need not exist).
        b (str): Another path.

    Returns:
        str or None: ``''`` for the same path under another spelling, ``' through a symbolic
        link'``, ``' through a hard link'`` (same device and inode under another real path),
        or None.
    """
    real_a, real_b = osp.realpath(a), osp.realpath(b)
    if real_a == real_b:
        linked = osp.islink(a) or osp.islink(b)
        return ' through a symbolic link' if linked else ''
    try:
        st_a, st_b = os.stat(a), os.stat(b)
    except OSError:  # one of them does not exist (yet)
        return None
    if (st_a.st_dev, st_a.st_ino) == (st_b.st_dev, st_b.st_ino):
        return ' through a hard link'
    return None


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder`` (real paths)."""
    real, top = osp.realpath(path), osp.realpath(folder)
    return real.startswith(top.rstrip(os.sep) + os.sep)


def check_not_input(out: str, inputs: Inputs, tool: str, option: str = '--out',
                    run: str = 'run') -> None:
    """Refuse an output path that is one of the run's inputs, or lies inside an input folder.

    Args:
        out (str): The path the tool would write (a file or a folder).
        inputs (Mapping): ``name -> path`` (or a list of paths, or None) of everything the
            run reads, e.g. ``dict(config=..., checkpoint=..., image=...)``. URLs are
            skipped.
        tool (str): The tool's name, for the message.
        option (str): How the user gave ``out``. Default: '--out'.
        run (str): What a run of the tool is called in the message. Default: 'run'.

    Raises:
        OutputPathError: naming the input and what to do instead.
    """
    for name, path in _input_items(inputs):
        how = same_file(out, path)
        if how is not None:
            same = f' (the same file{how})' if how else ''
            raise OutputPathError(
                f'{tool}: {option} {out} is the {name} {path}, an input of this {run}{same}; '
                f'writing there would destroy it. Give {option} another path')
        if osp.isdir(path) and _inside(out, path):
            raise OutputPathError(
                f'{tool}: {option} {out} is inside the {name} folder {path}, an input of this '
                f'{run}; writing there would change it. Give {option} a path outside it')


def atomic_output(path: str) -> 'contextlib.AbstractContextManager[str]':
    """Context manager: a temporary path to write, renamed to ``path`` once complete.

    The temporary file is hidden, in the folder of ``path`` (so the rename is atomic) and
    keeps its extension (so writers that infer the format from it, such as matplotlib's
    ``savefig``, still do). When the block raises, or writes nothing, ``path`` is left as
    it was and the temporary file is removed.

    Args:
        path (str): The final file.

    Yields:
        str: The temporary path to write.
    """
    return _atomic_output(path)


@contextlib.contextmanager
def _atomic_output(path: str, before_replace: Optional[Callable[[], None]] = None
                   ) -> Iterator[str]:
    folder = osp.dirname(osp.abspath(path))
    stem, ext = osp.splitext(osp.basename(path))
    tmp = osp.join(folder, f'.{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{ext}')
    try:
        yield tmp
        if not osp.isfile(tmp):
            raise OutputPathError(f'{path}: nothing was written; left as it was')
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        if osp.lexists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)


def _clean_name(name: object) -> Optional[str]:
    """A manifest entry as a relative path inside its folder, or None if it is not one."""
    if not isinstance(name, str) or not name or '\\' in name or osp.isabs(name):
        return None
    parts = name.split('/')
    if any(p in ('', '.', '..') for p in parts):
        return None
    return name


def read_manifest(folder: str) -> Optional[Dict[str, str]]:
    """``relative path -> tool`` of the files the package's tools wrote in ``folder``.

    Args:
        folder (str): A folder.

    Returns:
        dict or None: None when the folder has no manifest or one this package did not
        write (not JSON, another format); entries that are not plain relative paths inside
        the folder are dropped.
    """
    path = osp.join(folder, MANIFEST)
    if not osp.isfile(path) or osp.islink(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get('format') != MANIFEST_FORMAT or \
            not isinstance(data.get('files'), dict):
        return None
    return {name: str(tool) for name, tool in data['files'].items()
            if _clean_name(name) is not None}


def _write_manifest(folder: str, files: Mapping[str, str]) -> None:
    data = dict(format=MANIFEST_FORMAT, version=MANIFEST_VERSION,
                note='files written here by mmseg_proto tools; they may replace only these',
                files=dict(sorted(files.items())))
    write_text_atomic(osp.join(folder, MANIFEST), json.dumps(data, indent=1) + '\n')


def _files_under(folder: str) -> List[str]:
    """Every entry under ``folder``, relative, '/'-separated; links are not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = osp.relpath(root, folder)
        for name in files + [d for d in dirs if osp.islink(osp.join(root, d))]:
            found.append(name if rel == '.' else f'{rel}/{name}'.replace(os.sep, '/'))
    return found


class OutputFolder:
    """A folder a tool writes files into, under the policy of this module.

    Call :meth:`check` once, before any work; then write each file with :meth:`atomic`, or
    a set of files (a report) with :meth:`staged` and :meth:`commit`.

    Args:
        folder (str): The folder (created when the first file is written).
        tool (str): The tool's name, recorded in the manifest and used in messages.
        option (str): The option that named the output, for messages. Default: '--out'.
    """

    def __init__(self, folder: str, tool: str, option: str = '--out') -> None:
        self.folder = folder or '.'
        self.tool = tool
        self.option = option
        self.files: Dict[str, str] = {}

    def _refuse(self, message: str) -> None:
        raise OutputPathError(f'{self.tool}: {message}')

    def check(self, inputs: Inputs, names: Iterable[str] = (),
              subfolders: Iterable[str] = (), exclusive: bool = False,
              shown: Optional[str] = None) -> None:
        """Refuse the output before anything is done, with a message naming what to change.

        Refused: a folder that is a file or an input (or inside an input folder); a file it
        would write (``names``, or any file under ``subfolders``) that is an input or exists
        without being listed in the folder's manifest as this tool's; with ``exclusive``, a
        folder holding anything while it has no manifest (a folder this package did not
        write).

        Args:
            inputs (Mapping): ``name -> path(s)`` the run reads (see :func:`check_not_input`).
            names (Iterable[str]): Files (relative to the folder) the tool will write.
            subfolders (Iterable[str]): Folders whose content the tool will replace: every
                file in them must be listed in the manifest as this tool's.
            exclusive (bool): The folder is the tool's own (a report). Default: False.
            shown (str, optional): The path as the user gave it, for messages. Default: the
                folder.
        """
        folder, option = self.folder, self.option
        shown = shown or folder
        if osp.lexists(folder) and not osp.isdir(folder):
            self._refuse(f'{option} {shown} is a file; give a folder')
        names = list(names)
        if MANIFEST in names:
            self._refuse(f'{option} {shown}: {MANIFEST} is the list of files this package '
                         'writes in a folder; give another name')
        check_not_input(folder, inputs, self.tool, option)
        manifest = read_manifest(folder) if osp.isdir(folder) else None
        self.files = dict(manifest or {})
        entries = [e for e in os.listdir(folder) if e != MANIFEST] if osp.isdir(folder) else []
        if exclusive and entries and manifest is None:
            self._refuse(
                f'{option} {shown} is a folder with files this tool did not write in it '
                f'(no {MANIFEST} of an earlier run, e.g. {sorted(entries)[0]}): give a new or '
                'empty folder (a report written before this check: delete it first)')
        replaced = [n for n in names if osp.lexists(osp.join(folder, n))]
        for sub in subfolders:
            path = osp.join(folder, sub)
            if not osp.lexists(path):
                continue
            if osp.islink(path) or not osp.isdir(path):
                self._refuse(f'{option} {shown}: {path} is not a folder this tool wrote '
                             '(a file or a link); not replacing it. Move it or give '
                             f'another {option}')
            replaced += [f'{sub}/{n}' for n in _files_under(path)]
        for name in replaced:
            path = osp.join(folder, name)
            check_not_input(path, inputs, self.tool, option)
            owner = self.files.get(name)
            if owner != self.tool:
                why = (f'{osp.join(folder, MANIFEST)} lists it as written by {owner}'
                       if owner else f'it is not listed in {osp.join(folder, MANIFEST)}')
                self._refuse(
                    f'{option} {shown}: {path} exists and was not written by {self.tool} '
                    f'({why}); not replacing it. Move or delete it, or give another {option}')

    def _record(self, names: Iterable[str]) -> None:
        """Add ``names`` to the manifest (before they are written: always listed)."""
        self.files.update({n: self.tool for n in names})
        _write_manifest(self.folder, self.files)

    @contextlib.contextmanager
    def atomic(self, name: str) -> Iterator[str]:
        """Write one file of the folder: yields a temporary path, renamed to ``name``.

        Args:
            name (str): The file, relative to the folder (checked by :meth:`check`).

        Yields:
            str: The temporary path to write (same folder and extension).
        """
        path = osp.join(self.folder, name)
        os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
        # Listed once complete, just before the rename: never a file of ours unlisted.
        with _atomic_output(path, lambda: self._record([name])) as tmp:
            yield tmp

    @contextlib.contextmanager
    def staged(self) -> Iterator[str]:
        """A hidden temporary folder inside the folder, removed afterwards.

        Write the files there under their final relative names, then :meth:`commit` them.
        """
        os.makedirs(self.folder, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f'.{self.tool}.tmp', dir=self.folder)
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: str, replace_subfolders: Iterable[str] = ()) -> List[str]:
        """Move every file of ``staging`` into the folder, each by an atomic rename.

        Files of ``replace_subfolders`` the manifest lists as this tool's that ``staging`` lacks
        (an earlier run's, e.g. more crops) are deleted; nothing else is. The manifest lists
        every file before it is moved in, so an interrupted commit leaves only listed files.

        Args:
            staging (str): From :meth:`staged`.
            replace_subfolders (Iterable[str]): Folders whose earlier files are replaced as
                a whole.

        Returns:
            list[str]: The files written, relative to the folder.
        """
        new = sorted(_files_under(staging))
        subs = [s.rstrip('/') + '/' for s in replace_subfolders]
        stale = [n for n, tool in self.files.items() if tool == self.tool
                 and any(n.startswith(s) for s in subs) and n not in new]
        self._record(new)
        for name in new:
            target = osp.join(self.folder, name)
            os.makedirs(osp.dirname(osp.abspath(target)), exist_ok=True)
            os.replace(osp.join(staging, name), target)
        for name in stale:
            path = osp.join(self.folder, name)
            if _inside(path, self.folder) or osp.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            self.files.pop(name, None)
        if stale:
            _write_manifest(self.folder, self.files)
        return new


def check_output_file(out: str, tool: str, inputs: Inputs, option: str = '--out') -> OutputFolder:
    """Check a single output file; returns its :class:`OutputFolder` to write it with.

    Refused (:class:`OutputPathError`): ``out`` is a folder, one of ``inputs`` under any
    spelling or link, inside an input folder, or an existing file this tool did not write.

    Args:
        out (str): The file to write.
        tool (str): The tool's name, for the manifest and messages.
        inputs (Mapping): ``name -> path(s)`` the run reads.
        option (str): The option that named ``out``. Default: '--out'.

    Returns:
        OutputFolder: Write with ``folder.atomic(osp.basename(out))``.
    """
    if osp.isdir(out) or not osp.basename(out):
        raise OutputPathError(f'{tool}: {option} {out} is a folder; give a file name')
    check_not_input(out, inputs, tool, option)
    folder = OutputFolder(osp.dirname(out), tool, option)
    folder.check(inputs, names=[osp.basename(out)], shown=out)
    return folder
