"""configs/protoseg/metafile.yaml and model-index.yml: MMSeg's model-zoo format, in step
with the configs."""
import glob
import importlib.util
import os.path as osp

import yaml

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def load(path):
    with open(osp.join(REPO, path)) as f:
        return yaml.safe_load(f)


def test_metafile_is_what_the_generator_writes_from_the_configs():
    """What ``python tools/dev/make_metafile.py --check`` compares, in this process."""
    spec = importlib.util.spec_from_file_location(
        'make_metafile', osp.join(REPO, 'tools', 'dev', 'make_metafile.py'))
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    with open(generator.METAFILE) as f:
        written = f.read()
    assert written == generator.metafile_text(), (
        'configs/protoseg/metafile.yaml is stale: run python tools/dev/make_metafile.py')


def test_model_index_imports_the_metafile_and_every_zoo_config_is_listed():
    index = load('model-index.yml')
    assert index['Import'] == ['configs/protoseg/metafile.yaml']
    models = load('configs/protoseg/metafile.yaml')['Models']
    listed = {m['Config'] for m in models}
    on_disk = {osp.relpath(p, REPO) for p in glob.glob(
        osp.join(REPO, 'configs', 'protoseg', '**', '*.py'), recursive=True)}
    assert on_disk - listed == {
        'configs/protoseg/camvid/protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py'}
    assert listed <= on_disk
    for m in models:
        assert m['Name'] == osp.splitext(osp.basename(m['Config']))[0]
        for key in ('Training Data', 'Batch Size', 'Crop Size', 'Lr schd', 'Architecture'):
            assert key in m['Metadata'], (m['Name'], key)


def test_figures_are_marked_as_the_papers_or_the_authors():
    models = {m['Name']: m for m in load('configs/protoseg/metafile.yaml')['Models']}
    for name, m in models.items():
        for result in m.get('Results', []):
            assert set(result['Metrics']) <= {'mIoU(paper)', 'baseline mIoU(paper)',
                                              'mIoU(authors)'}, name
        assert 'Weights' not in m, name  # no checkpoint of ours is released
    authors = models['protoseg_hrnet-w48-authors_4xb2-80k_cityscapes-512x1024']
    assert authors['Results'][0]['Metrics'] == {'mIoU(authors)': 80.1}
    assert 'convert_openseg_protoseg.py' in authors['Converted From']['Conversion']
    b2 = models['protoseg_segformer_mit-b2_8xb2-160k_ade20k-512x512']
    assert b2['Results'][0]['Metrics'] == {'mIoU(paper)': 46.4}
    assert b2['Metadata']['Batch Size'] == 16 and b2['Metadata']['Lr schd'] == 160000
