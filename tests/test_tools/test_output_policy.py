"""The output policy of every tool that writes (mmseg_proto.utils.output_files, issue 28.1).

A tool never writes over one of its inputs, under any spelling (relative, absolute, through a
symbolic or a hard link), never replaces or deletes a file it did not write, and writes
atomically. ``test_every_tool_refuses_each_input_as_out`` finds every tool with an ``--out``
under tools/ and benchmarks/ (a new one must be listed in ``TOOLS``, so it is checked too) and
tries each input as the output: the refusal comes before any model is built, so dummy files do.
The four cases of the issue run against a real (2-iteration) model, where today's code
destroyed the file.
"""
import glob
import importlib.util
import inspect
import json
import os
import os.path as osp
import re
import shutil
import sys

import numpy as np
import pytest
from conftest import CAMVID_MINI, PROTO_CFG, REPO

from mmseg_proto.utils.output_files import (MANIFEST, OutputFolder, OutputPathError,
                                            atomic_output, check_not_input,
                                            check_output_file, read_manifest, same_file)

VAL_IMG = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))[0]
VAL_LABEL = VAL_IMG.replace('img_dir', 'ann_dir').replace('.jpg', '.png')


def load_tool(rel: str):
    """The tool's module, loaded from its file."""
    name = 'output_policy_' + re.sub(r'\W', '_', rel)
    spec = importlib.util.spec_from_file_location(name, osp.join(REPO, rel))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, osp.dirname(osp.join(REPO, rel)))  # benchmarks import each other
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(osp.dirname(osp.join(REPO, rel)))
    return module


def run_tool(module, argv, monkeypatch, capsys):
    """(exit status, message) of the tool's main on ``argv``, in this process."""
    monkeypatch.setattr(sys, 'argv', [module.__file__, *argv])
    takes_argv = bool(inspect.signature(module.main).parameters)
    try:
        status = module.main(list(argv)) if takes_argv else module.main()
        status = status if isinstance(status, int) else 0
        text = ''
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
        text = '' if isinstance(exc.code, int) or exc.code is None else str(exc.code)
    captured = capsys.readouterr()
    return status, text + captured.err + captured.out


# ---------------------------------------------------------------------------------------
# The policy itself.


def test_same_file_sees_every_spelling(tmp_path, monkeypatch):
    f = tmp_path / 'a.pth'
    f.write_bytes(b'x')
    (tmp_path / 'sub').mkdir()
    os.symlink(f, tmp_path / 'sym.pth')
    os.link(f, tmp_path / 'hard.pth')
    monkeypatch.chdir(tmp_path / 'sub')
    assert same_file(str(f), osp.join('..', 'a.pth')) == ''
    assert same_file(str(tmp_path / 'sub' / '..' / 'a.pth'), str(f)) == ''
    assert same_file(str(tmp_path / 'sym.pth'), str(f)) == ' through a symbolic link'
    assert same_file(str(tmp_path / 'hard.pth'), str(f)) == ' through a hard link'
    assert same_file(str(tmp_path / 'new.pth'), str(f)) is None
    with pytest.raises(OutputPathError, match=r'--out .*hard.pth is the checkpoint .*a.pth, '
                       r'an input of this run \(the same file through a hard link\)'):
        check_not_input(str(tmp_path / 'hard.pth'), dict(config=None, checkpoint=str(f)),
                        'tool')
    check_not_input('https://x/a.pth', dict(checkpoint='https://x/a.pth'), 'tool')  # URL
    with pytest.raises(OutputPathError, match='inside the data_root folder'):
        check_not_input(str(tmp_path / 'sub' / 'x'), dict(data_root=str(tmp_path)), 'tool')


def test_atomic_output_leaves_the_old_file_when_interrupted(tmp_path):
    out = tmp_path / 'table.md'
    out.write_text('old\n')
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(str(out)) as tmp:
            assert tmp.endswith('.md') and osp.dirname(tmp) == str(tmp_path)
            with open(tmp, 'w') as f:
                f.write('half')
            raise KeyboardInterrupt
    assert out.read_text() == 'old\n' and os.listdir(tmp_path) == ['table.md']
    with atomic_output(str(out)) as tmp:
        with open(tmp, 'w') as f:
            f.write('new\n')
    assert out.read_text() == 'new\n' and os.listdir(tmp_path) == ['table.md']


def test_a_file_is_replaced_only_by_the_tool_that_wrote_it(tmp_path):
    mine = tmp_path / 'notes.md'
    mine.write_text('my notes\n')
    with pytest.raises(OutputPathError, match=r'notes.md exists and was not written by '
                       r'prototype_health \(it is not listed in'):
        check_output_file(str(mine), 'prototype_health', {})
    out = check_output_file(str(tmp_path / 'health.md'), 'prototype_health', {})
    for text in ('first\n', 'second\n'):  # its own file: replaced on the next run
        out = check_output_file(str(tmp_path / 'health.md'), 'prototype_health', {})
        with out.atomic('health.md') as tmp:
            with open(tmp, 'w') as f:
                f.write(text)
    assert (tmp_path / 'health.md').read_text() == 'second\n'
    assert read_manifest(str(tmp_path)) == {'health.md': 'prototype_health'}
    with pytest.raises(OutputPathError, match="lists it as written by prototype_health"):
        check_output_file(str(tmp_path / 'health.md'), 'vis_embedding', {})
    with pytest.raises(OutputPathError, match='is a folder; give a file name'):
        check_output_file(str(tmp_path), 'prototype_health', {})
    with pytest.raises(OutputPathError, match='list of files this package writes'):
        check_output_file(str(tmp_path / MANIFEST), 'prototype_health', {})
    assert mine.read_text() == 'my notes\n'


def test_a_manifest_names_only_files_inside_its_folder(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(dict(
        format='mmseg_proto tool outputs', version=1,
        files={'../x': 't', '/etc/hostname': 't', 'a/../b': 't', 'ok.png': 't'})))
    assert read_manifest(str(tmp_path)) == {'ok.png': 't'}
    (tmp_path / MANIFEST).write_text('{"files": {"ok.png": "t"}}')  # not ours
    assert read_manifest(str(tmp_path)) is None


def test_a_report_folder_replaces_only_its_own_files(tmp_path):
    folder = OutputFolder(str(tmp_path / 'rep'), 'prototype_report')
    check = dict(inputs={}, names=['gallery.json', 'index.html'], subfolders=['crops'],
                 exclusive=True)
    folder.check(**check)
    for crops in (['a.png', 'b.png'], ['a.png']):
        with folder.staged() as staging:
            os.makedirs(osp.join(staging, 'crops'))
            for name in ['gallery.json', 'index.html'] + [f'crops/{c}' for c in crops]:
                with open(osp.join(staging, name), 'w') as f:
                    f.write(name)
            folder.commit(staging, replace_subfolders=['crops'])
        folder = OutputFolder(str(tmp_path / 'rep'), 'prototype_report')
        (tmp_path / 'rep' / 'notes.txt').write_text('mine')  # not in its way: kept
        folder.check(**check)
    assert sorted(os.listdir(tmp_path / 'rep')) == [MANIFEST, 'crops', 'gallery.json',
                                                    'index.html', 'notes.txt']
    assert os.listdir(tmp_path / 'rep' / 'crops') == ['a.png']  # b.png: its own, stale
    (tmp_path / 'rep' / 'crops' / 'mine.png').write_bytes(b'user')
    with pytest.raises(OutputPathError, match=r'crops/mine.png exists and was not written'):
        folder.check(**check)


# ---------------------------------------------------------------------------------------
# Every tool with an --out: each input as the output, under every spelling.

# tool -> (argv with {name} for each input and {out} for the output, input files, kind of
# output: 'file' or 'folder').
TOOLS = {
    'tools/analysis_tools/prototype_health.py': (
        ['{config}', '{checkpoint}', '--out', '{out}'], ['config', 'checkpoint'], 'file'),
    'tools/analysis_tools/explain_pixel.py': (
        ['{config}', '{checkpoint}', '{image}', '--pixel', '1', '1', '--gallery',
         '{gallery}', '--out', '{out}'], ['config', 'checkpoint', 'image', 'gallery'], 'file'),
    'tools/analysis_tools/prototype_report.py': (
        ['{config}', '{checkpoint}', '--out', '{out}'], ['config', 'checkpoint'], 'folder'),
    'tools/visualization/vis_anomaly_map.py': (
        ['{config}', '{checkpoint}', '{image}', '--label', '{label}', '--out', '{out}'],
        ['config', 'checkpoint', 'image', 'label'], 'file'),
    'tools/visualization/vis_embedding.py': (
        ['{config}', '{checkpoint}', '--parametric-config', '{config2}',
         '--parametric-checkpoint', '{checkpoint2}', '--out', '{out}'],
        ['config', 'checkpoint', 'config2', 'checkpoint2'], 'file'),
    'tools/visualization/vis_prototype_similarity.py': (
        ['{config}', '{checkpoint}', '{image}', '--out-dir', '{out}'],
        ['config', 'checkpoint', 'image'], 'folder'),
    'tools/deployment/pytorch2onnx.py': (
        ['{config}', '{checkpoint}', '--shape', '32', '32', '--verify', '{image}', '--out',
         '{out}'], ['config', 'checkpoint', 'image'], 'file'),
    'tools/model_converters/convert_openseg_protoseg.py': (
        ['{checkpoint}', '{out}', '--config', '{config}'], ['checkpoint', 'config'], 'file'),
    'tools/dev/record_training_trace.py': (
        ['--iters', '1', '--out', '{out}'], ['config'], 'file'),
    'benchmarks/camvid_benchmark.py': (
        ['--data-root', '{data}', '--iters', '1', '--variants', 'parametric', '--seeds', '0',
         '--out', '{out}'], ['data'], 'folder'),
    'benchmarks/camvid_anomaly.py': (
        ['--data-root', '{data}', '--iters', '1', '--seeds', '0', '--models', 'parametric',
         '--out', '{out}'], ['data'], 'folder'),
    'tools/analysis_tools/add_class.py': (
        ['{config}', '{checkpoint}', '--name', 'kerb', '--support', '{support}', '--out',
         '{out}'], ['config', 'checkpoint', 'support'], 'folder'),
    'benchmarks/camvid_add_class.py': (
        ['--data-root', '{data}', '--iters', '1', '--held-out', 'car', '--heads',
         'parametric', '--seeds', '0', '--out', '{out}'], ['data'], 'folder'),
    'benchmarks/camvid_prototype_use.py': (
        ['--data-root', '{data}', '--variants', 'protoseg', '--out', '{out}'], ['data'],
        'folder'),
}
OUT_ARG = re.compile(r"""add_argument\(\s*['"]--out(-dir)?['"]""")


def test_every_tool_with_an_out_is_checked():
    found = set()
    for path in glob.glob(osp.join(REPO, 'tools', '**', '*.py'), recursive=True) + glob.glob(
            osp.join(REPO, 'benchmarks', '**', '*.py'), recursive=True):
        with open(path, encoding='utf-8') as f:
            if OUT_ARG.search(f.read()):
                found.add(osp.relpath(path, REPO).replace(os.sep, '/'))
    assert found, 'no tool with an --out found: the scan is broken'
    missing = sorted(found - set(TOOLS))
    assert not missing, (f'{missing} write(s) files: add it to TOOLS in this test, and check '
                         'its outputs with mmseg_proto.utils.output_files')
    assert all(osp.isfile(osp.join(REPO, t)) for t in TOOLS)


def make_inputs(root):
    """Dummy input files (and a data folder): the refusal comes before they are read."""
    from PIL import Image
    root.mkdir()
    files = {'config': 'cfg.py', 'config2': 'base_cfg.py', 'checkpoint': 'ck.pth',
             'checkpoint2': 'base.pth', 'image': 'street.png', 'label': 'lab.png',
             'gallery': 'g.json', 'support': 'support.txt'}
    paths = {name: root / file for name, file in files.items()}
    paths['config'].write_text("model = dict(type='Nothing')\n")
    paths['config2'].write_text("model = dict(type='Nothing2')\n")
    paths['checkpoint'].write_bytes(b'\x00checkpoint bytes' * 10)
    paths['checkpoint2'].write_bytes(b'\x01other checkpoint' * 10)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(paths['image'])
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 11).save(paths['label'])
    paths['gallery'].write_text('{"format": "mmseg_proto prototype gallery"}\n')
    paths['support'].write_text('street.png lab.png\n')
    paths['data'] = root / 'camvid'
    (paths['data'] / 'img_dir').mkdir(parents=True)
    (paths['data'] / 'img_dir' / 'a.png').write_bytes(b'png')
    return paths


def snapshot(root):
    """Every file under ``root`` with its bytes."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            path = osp.join(dirpath, name)
            out[osp.relpath(path, root)] = (open(path, 'rb').read() if osp.isfile(path)
                                            and not osp.islink(path) else 'dir/link')
    return out


SPELLINGS = ['relative', 'absolute', 'symlink', 'hardlink']


@pytest.mark.parametrize('rel', sorted(TOOLS))
def test_every_tool_refuses_each_input_as_out(rel, tmp_path, monkeypatch, capsys):
    module = load_tool(rel)
    template, inputs, kind = TOOLS[rel]
    paths = make_inputs(tmp_path / 'in')
    if rel.endswith('record_training_trace.py'):  # it trains the shipped config: a copy
        monkeypatch.setattr(module, 'CONFIG', str(paths['config']))
    for name in inputs:
        target = paths[name]
        for spelling in SPELLINGS:
            if spelling == 'hardlink' and target.is_dir():
                continue  # folders have no hard links; 'inside' below instead
            monkeypatch.chdir(tmp_path)
            values = {k: str(v) for k, v in paths.items()}
            rel_target = osp.relpath(target, tmp_path)
            if spelling == 'relative':
                out = osp.join('in', '..', rel_target)  # the input itself given absolute
            elif spelling == 'absolute':
                values[name] = rel_target  # the input given relative, --out absolute
                out = str(target)
            else:
                out = str(tmp_path / f'{spelling}{target.suffix}')
                (os.symlink if spelling == 'symlink' else os.link)(target, out)
            before = snapshot(tmp_path / 'in')
            argv = [a.format(out=out, **values) for a in template]
            status, text = run_tool(module, argv, monkeypatch, capsys)
            where = f'{rel} --out {spelling} {name}: exit {status}: {text[-600:]}'
            assert status not in (0, None), where
            expected = ('an input of this', 'is a file; give a folder')
            assert any(e in text for e in expected) and out in text, where
            assert snapshot(tmp_path / 'in') == before, where
            if spelling in ('symlink', 'hardlink'):
                os.remove(out)
            assert sorted(os.listdir(tmp_path)) == ['in'], where  # nothing written
        if target.is_dir():  # a folder inside the input folder
            out = str(target / 'results')
            argv = [a.format(out=out, **{k: str(v) for k, v in paths.items()})
                    for a in template]
            status, text = run_tool(module, argv, monkeypatch, capsys)
            assert status not in (0, None) and 'inside the data_root folder' in text, text
            assert not osp.exists(out)


# ---------------------------------------------------------------------------------------
# The four cases of the issue, with a real model (today's code destroyed the file).


@pytest.fixture(scope='module')
def trained(tmp_path_factory, camvid_protoseg):
    """A 2-iteration CamVid ProtoSeg checkpoint (conftest's session-wide one) and a 1-image
    gallery of it."""
    root = tmp_path_factory.mktemp('output_policy')
    ckpt = camvid_protoseg[0]
    report = root / 'report'
    load_tool('tools/analysis_tools/prototype_report.py').main(
        [PROTO_CFG, ckpt, '--out', str(report), '--num-images', '1', '--per-prototype', '1',
         '--no-progress'])
    return ckpt, str(report / 'gallery.json')


def refused(rel, argv, monkeypatch, capsys):
    status, text = run_tool(load_tool(rel), argv, monkeypatch, capsys)
    assert status == 2, text
    return text


def test_prototype_health_never_writes_over_its_checkpoint(trained, tmp_path, monkeypatch,
                                                           capsys):
    ck = tmp_path / 'ck.pth'
    shutil.copy(trained[0], ck)
    before = ck.read_bytes()
    text = refused('tools/analysis_tools/prototype_health.py',
                   [PROTO_CFG, str(ck), '--out', str(ck), '--num-images', '1'],
                   monkeypatch, capsys)
    assert f'--out {ck} is the checkpoint {ck}, an input of this run' in text
    assert ck.read_bytes() == before


def test_explain_pixel_never_writes_over_its_image(trained, tmp_path, monkeypatch, capsys):
    street = tmp_path / 'street.png'
    from PIL import Image
    Image.open(VAL_IMG).save(street)
    before = street.read_bytes()
    text = refused('tools/analysis_tools/explain_pixel.py',
                   [PROTO_CFG, trained[0], str(street), '--pixel', '10', '10', '--gallery',
                    trained[1], '--out', str(street)], monkeypatch, capsys)
    assert f'--out {street} is the image {street}, an input of this run' in text
    assert street.read_bytes() == before


def test_vis_anomaly_map_never_writes_over_the_label(trained, tmp_path, monkeypatch, capsys):
    lab = tmp_path / 'lab.png'
    shutil.copy(VAL_LABEL, lab)
    before = lab.read_bytes()
    text = refused('tools/visualization/vis_anomaly_map.py',
                   [PROTO_CFG, trained[0], VAL_IMG, '--label', str(lab), '--out', str(lab)],
                   monkeypatch, capsys)
    assert f'--out {lab} is the label {lab}, an input of this run' in text
    assert lab.read_bytes() == before


def test_prototype_report_never_deletes_a_folder_it_did_not_write(trained, tmp_path,
                                                                  monkeypatch, capsys):
    user = tmp_path / 'holiday'
    (user / 'crops').mkdir(parents=True)
    (user / 'crops' / 'beach.png').write_bytes(b'my photo')
    (user / 'gallery.json').write_text('{"my": "gallery"}')
    (user / 'index.html').write_text('<p>my page</p>')
    before = snapshot(user)
    text = refused('tools/analysis_tools/prototype_report.py',
                   [PROTO_CFG, trained[0], '--out', str(user), '--num-images', '1'],
                   monkeypatch, capsys)
    assert f'--out {user} is a folder with files this tool did not write' in text
    assert snapshot(user) == before


def test_prototype_report_rerun_replaces_only_its_own_report(trained, tmp_path, monkeypatch,
                                                             capsys):
    tool = 'tools/analysis_tools/prototype_report.py'
    out = tmp_path / 'rep'
    argv = [PROTO_CFG, trained[0], '--out', str(out), '--num-images', '1',
            '--per-prototype', '1', '--no-progress']
    assert run_tool(load_tool(tool), argv, monkeypatch, capsys)[0] == 0
    (out / 'notes.txt').write_text('mine')
    assert run_tool(load_tool(tool), argv, monkeypatch, capsys)[0] == 0  # its own: replaced
    assert (out / 'notes.txt').read_text() == 'mine'
    assert not [n for n in os.listdir(out) if n.startswith('.prototype_report.tmp')]
    crops = sorted(os.listdir(out / 'crops'))
    (out / 'crops' / 'beach.png').write_bytes(b'my photo')
    text = refused(tool, argv, monkeypatch, capsys)
    assert 'crops/beach.png exists and was not written by prototype_report' in text
    assert sorted(os.listdir(out / 'crops')) == sorted(crops + ['beach.png'])
