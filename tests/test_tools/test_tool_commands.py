"""Every script under tools/ starts as the command the docs show (``python tools/X.py``).

The tests of what each tool computes call its ``main`` in this process (no interpreter start
per case); this one runs every script as ``__main__`` with ``--help``, the way ``python
tools/X.py --help`` does (the script's folder first on ``sys.path``), from an empty folder,
all in one fresh interpreter: a script that fails to import, breaks its ``__main__`` block
or cannot parse its own arguments is named."""
import glob
import os
import os.path as osp
import subprocess
import sys

from conftest import REPO

TOOLS = sorted(glob.glob(osp.join(REPO, 'tools', '**', '*.py'), recursive=True))

RUN_AS_COMMANDS = r'''
import os.path as osp
import runpy
import sys

for path in sys.argv[1:]:
    sys.argv, sys.path[0] = [path, '--help'], osp.dirname(path)
    try:
        runpy.run_path(path, run_name='__main__')
        outcome = 'returned without printing its usage'
    except SystemExit as exit_:
        outcome = 'ok' if exit_.code in (0, None) else f'exit status {exit_.code}'
    except BaseException as err:  # noqa: B902  (any failure is reported, per tool)
        outcome = f'{type(err).__name__}: {err}'
    print(f'TOOL {path} -> {outcome}', flush=True)
'''


def test_every_tool_starts_as_a_command_and_prints_its_usage(tmp_path):
    assert len(TOOLS) >= 15 and osp.join(REPO, 'tools', 'train.py') in TOOLS
    env = dict(os.environ, MPLBACKEND='Agg')
    env.pop('PYTHONPATH', None)
    proc = subprocess.run([sys.executable, '-c', RUN_AS_COMMANDS, *TOOLS], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    report = {osp.relpath(line.split(' -> ')[0][5:], REPO): line.split(' -> ', 1)[1]
              for line in proc.stdout.splitlines() if line.startswith('TOOL ')}
    assert proc.returncode == 0 and len(report) == len(TOOLS), proc.stderr[-3000:]
    failed = {tool: outcome for tool, outcome in report.items() if outcome != 'ok'}
    assert not failed, failed
    assert proc.stdout.count('usage:') >= len(TOOLS)
