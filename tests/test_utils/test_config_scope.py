"""mmseg_proto_config_scope: mmseg_proto:: resolves inside the block only."""
import pytest
from mmengine.config import Config
from mmengine.config import utils as config_utils

from mmseg_proto.utils.config_scope import mmseg_proto_config_scope


def test_entry_exists_only_inside_the_block():
    assert 'mmseg_proto' not in config_utils.MODULE2PACKAGE
    with mmseg_proto_config_scope():
        assert config_utils.MODULE2PACKAGE['mmseg_proto'] == 'mmseg_proto'
    assert 'mmseg_proto' not in config_utils.MODULE2PACKAGE


def test_an_entry_already_there_is_left_alone():
    config_utils.MODULE2PACKAGE['mmseg_proto'] = 'someone-elses'
    try:
        with mmseg_proto_config_scope():
            assert config_utils.MODULE2PACKAGE['mmseg_proto'] == 'someone-elses'
        assert config_utils.MODULE2PACKAGE['mmseg_proto'] == 'someone-elses'
    finally:
        del config_utils.MODULE2PACKAGE['mmseg_proto']


def test_removed_even_when_parsing_fails(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("_base_ = ['mmseg_proto::protoseg/no_such_config.py']\n")
    with pytest.raises(Exception):
        with mmseg_proto_config_scope():
            Config.fromfile(str(bad))
    assert 'mmseg_proto' not in config_utils.MODULE2PACKAGE


def test_the_scope_registry_finds_mmseg_and_our_classes():
    """What mmengine does with a dict marked _scope_='mmseg_proto' (a base inherited through
    mmseg_proto::): the lookup starts in our child registry and ends in MMSeg's."""
    from mmseg.registry import HOOKS, METRICS, MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmseg_proto'):
        assert MODELS.get('ProtoHead').__name__ == 'ProtoHead'
        assert MODELS.get('EncoderDecoder').__name__ == 'EncoderDecoder'
        assert HOOKS.get('SegVisualizationHook').__name__ == 'SegVisualizationHook'
        assert METRICS.get('IoUMetric').__name__ == 'IoUMetric'
    head = MODELS.build(dict(type='FCNHead', _scope_='mmseg_proto', in_channels=4,
                             channels=4, num_convs=0, concat_input=False, num_classes=3))
    assert type(head).__name__ == 'FCNHead'



def test_onedl_mmseg_entry_is_scoped(monkeypatch):
    """On the OneDL line the scope points `mmseg` at onedl-mmsegmentation and puts it back."""
    from mmengine.config import utils as config_utils

    from mmseg_proto.utils import stack_check
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    table = getattr(config_utils, 'MODULE2PACKAGE', None) or config_utils.PKG2PROJECT
    monkeypatch.setitem(table, 'mmseg', 'mmsegmentation')
    monkeypatch.setattr(stack_check, 'module_distributions',
                        lambda module: ['onedl-mmsegmentation'])
    with mmseg_proto_config_scope():
        assert table['mmseg'] == 'onedl-mmsegmentation'
    assert table['mmseg'] == 'mmsegmentation'


def test_importing_the_package_changes_nothing_process_wide():
    """Importing mmseg_proto registers modules and the checkpoint loader, nothing else:
    mmengine's scope table, torch's weights-only allow-list and the environment are as
    MMSeg's own imports leave them."""
    import subprocess
    import sys
    code = (
        # What MMSeg itself changes when imported is not ours: import it first.
        'import os, torch, mmengine.config.utils as u, mmengine.runner, mmseg.apis\n'
        'import mmseg.models, mmseg.datasets, mmseg.engine, mmseg.evaluation\n'
        'table = getattr(u, "MODULE2PACKAGE", None) or u.PKG2PROJECT\n'
        'before = (dict(table), list(torch.serialization.get_safe_globals()), dict(os.environ))\n'
        'import mmseg_proto\n'
        'after = (dict(table), list(torch.serialization.get_safe_globals()), dict(os.environ))\n'
        'assert before == after, [b == a for b, a in zip(before, after)]\n'
        'print("unchanged")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0 and 'unchanged' in out.stdout, out.stderr[-2000:]


# --- issue 28: mmseg_proto:: in an editable install, a source checkout of mmseg ---------------

CAMVID = 'protoseg/camvid/protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py'


def write_user_config(tmp_path):
    path = tmp_path / 'my_camvid.py'
    path.write_text(f"_base_ = ['mmseg_proto::{CAMVID}']\n"
                    'model = dict(decode_head=dict(num_prototypes=3))\n')
    return str(path)


def mmengine_config_state():
    from mmengine.config import config as config_module
    table = getattr(config_utils, 'MODULE2PACKAGE', None) or config_utils.PKG2PROJECT
    return dict(table), config_module.get_installed_path


def test_package_scope_reads_the_imported_package_in_an_editable_install(tmp_path,
                                                                          monkeypatch):
    """Issue 28: with `pip install -e` (the README's set-up) the distribution's location is
    site-packages, the package stays in the clone; mmengine looked for
    site-packages/mmseg_proto/.mim/model-index.yml and failed with a raw FileNotFoundError.
    The scope reads the configs of the package that was imported."""
    from mmengine.config import config as config_module
    site = tmp_path / 'site-packages'
    site.mkdir()
    # What mmengine's lookup gives for an editable install: <dist location>/mmseg_proto.
    real = config_module.get_installed_path
    monkeypatch.setattr(config_module, 'get_installed_path', lambda package: str(
        site / package) if package == 'mmseg_proto' else real(package))
    before = mmengine_config_state()
    with mmseg_proto_config_scope():
        cfg = Config.fromfile(write_user_config(tmp_path))
    assert mmengine_config_state() == before
    head = cfg.model.decode_head
    assert (head.type, head.num_prototypes, head.num_classes) == ('ProtoHead', 3, 11)


def test_package_scope_works_with_the_installed_environment(tmp_path):
    """The same without simulation: however this environment installed mmseg_proto."""
    before = mmengine_config_state()
    with mmseg_proto_config_scope():
        cfg = Config.fromfile(write_user_config(tmp_path))
    assert cfg.model.decode_head.num_prototypes == 3
    assert mmengine_config_state() == before


def test_a_copy_without_its_mim_folder_says_how_to_create_it(tmp_path, monkeypatch):
    """A source checkout that was never installed has no mmseg_proto/.mim: a message that
    names the folder and `pip install -e`, not a raw FileNotFoundError of a yml file."""
    import mmseg_proto
    clone = tmp_path / 'clone'
    (clone / 'mmseg_proto').mkdir(parents=True)
    monkeypatch.setattr(mmseg_proto, '__file__', str(clone / 'mmseg_proto' / '__init__.py'))
    before = mmengine_config_state()
    with pytest.raises(FileNotFoundError) as info:
        with mmseg_proto_config_scope():
            Config.fromfile(write_user_config(tmp_path))
    message = str(info.value)
    assert message.startswith('mmseg_proto: `mmseg_proto::` configs are read from '
                              f'{clone / "mmseg_proto" / ".mim"}')
    assert f'pip install -e {clone}' in message
    assert 'model-index.yml' not in message
    assert mmengine_config_state() == before


def test_scope_works_when_mmseg_is_a_source_checkout(tmp_path, monkeypatch):
    """Issue 28, section 7: `mmseg` imported from a source checkout that no installed
    distribution provides (module_distributions gives none): the scope leaves mmengine's
    `mmseg` entry alone, still resolves mmseg_proto::, and leaves nothing behind."""
    from mmseg_proto.utils import stack_check
    monkeypatch.setattr(stack_check, 'module_distributions', lambda module: [])
    before = mmengine_config_state()
    with mmseg_proto_config_scope():
        table = getattr(config_utils, 'MODULE2PACKAGE', None) or config_utils.PKG2PROJECT
        assert table['mmseg'] == before[0]['mmseg']
        assert table['mmseg_proto'] == 'mmseg_proto'
        cfg = Config.fromfile(write_user_config(tmp_path))
    assert cfg.model.decode_head.type == 'ProtoHead'
    assert mmengine_config_state() == before
    assert 'mmseg_proto' not in before[0]


def test_nested_scopes_restore_mmengine_once(tmp_path):
    """A tool that enters the scope inside another (vis_embedding does) restores mmengine
    when the outer block ends, not earlier."""
    from mmengine.config import config as config_module
    before = mmengine_config_state()
    with mmseg_proto_config_scope():
        with mmseg_proto_config_scope():
            pass
        assert config_module.get_installed_path is not before[1]
        Config.fromfile(write_user_config(tmp_path))
    assert mmengine_config_state() == before


def test_the_suites_metafile_memo_answers_as_mmengine():
    """conftest memoises mmengine's metafile lookup for the suite: for a model-zoo name and
    for a ``_base_`` path (not in any metafile: the ValueError after which mmengine reads the
    base file) it answers what mmengine answers, a copy each time."""
    from mmengine.utils import get_installed_path
    memo = getattr(config_utils, '_get_cfg_metainfo', None)
    if memo is None:
        pytest.skip('this mmengine has no _get_cfg_metainfo: conftest memoises nothing')
    original = memo.uncached  # AttributeError: conftest did not install the memo
    mmseg_root = get_installed_path('mmseg')
    name = 'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py'
    expected = original(mmseg_root, name)
    assert memo(mmseg_root, name) == expected and memo(mmseg_root, name) == expected
    memo(mmseg_root, name)['Config'] = 'changed by a caller'
    assert memo(mmseg_root, name) == expected
    with pytest.raises(ValueError) as mmengine_error:
        original(mmseg_root, '_base_/models/segformer_mit-b0')
    for _ in range(2):
        with pytest.raises(ValueError) as memo_error:
            memo(mmseg_root, '_base_/models/segformer_mit-b0')
        assert str(memo_error.value) == str(mmengine_error.value)
