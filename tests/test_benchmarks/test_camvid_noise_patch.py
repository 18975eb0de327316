"""benchmarks/camvid_noise_patch.py: the pasted square, its core and scene masks, and the
AUROC it prints, against MMSeg's inference and a rank count by hand."""
import importlib.util
import os
import os.path as osp
import sys

import mmcv
import numpy as np
import pytest
from conftest import CAMVID_MINI, PROTO_CFG, REPO

SCRIPT = osp.join(REPO, 'benchmarks', 'camvid_noise_patch.py')


def bench():
    spec = importlib.util.spec_from_file_location('camvid_noise_patch', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_square_its_core_and_the_scene_around_it():
    (name, img, core, scene), = bench().noise_patch_images(CAMVID_MINI, 1, side=0.25)
    original = mmcv.imread(osp.join(CAMVID_MINI, 'img_dir', 'val', name))
    h, w = original.shape[:2]
    top, left, size = h // 4, w // 3, int(h * 0.25)
    changed = (img != original).any(-1)
    square = np.zeros((h, w), bool)
    square[top:top + size, left:left + size] = True
    assert not changed[~square].any() and changed[square].mean() > 0.95
    assert core.sum() == (size // 2) ** 2 and square[core].all()
    margin = size // 4
    near = np.zeros((h, w), bool)
    near[top - margin:top + size + margin, left - margin:left + size + margin] = True
    assert not (scene & near).any() and (scene | near).all()


def auroc_by_hand(positive, negative):
    """P(a positive scores above a negative), ties counted half."""
    pos, neg = np.sort(positive), np.sort(negative)
    below = np.searchsorted(neg, pos, side='left')
    ties = np.searchsorted(neg, pos, side='right') - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


def test_printed_auroc_is_mmsegs_map_ranked_by_hand(camvid_protoseg, capsys):
    from mmseg.apis import inference_model, init_model
    work_dir = osp.dirname(camvid_protoseg[0])
    module = bench()
    assert module.main(['--data-root', CAMVID_MINI, '--images', '2', '--work-dirs',
                        work_dir]) == 0
    printed = capsys.readouterr().out
    row = [line for line in printed.splitlines()
           if line.startswith(f'| {osp.basename(work_dir)} |')]
    assert len(row) == 1 and 'anomaly map (1 - max cosine)' in row[0]
    assert f'\n2 val images of {CAMVID_MINI}, noise square' in printed
    low, mean, high = (float(v) for v in row[0].strip('| ').split(' | ')[2:])
    model = init_model(PROTO_CFG, camvid_protoseg[0], device='cpu', cfg_options={
        'model.type': 'ProtoEncoderDecoder', 'model.anomaly_map': True})
    expected = []
    for _, img, core, scene in module.noise_patch_images(CAMVID_MINI, 2):
        amap = inference_model(model, img).anomaly_map.data[0].numpy()
        expected.append(100 * auroc_by_hand(amap[core], amap[scene]))
    assert (low, mean, high) == pytest.approx(
        (min(expected), np.mean(expected), max(expected)), abs=0.051)


def test_the_image_count_printed_is_the_count_scored(camvid_protoseg, capsys):
    """--images above the split's size: the header says how many were scored."""
    val = len(os.listdir(osp.join(CAMVID_MINI, 'img_dir', 'val')))
    assert bench().main(['--data-root', CAMVID_MINI, '--images', str(val + 5), '--work-dirs',
                         osp.dirname(camvid_protoseg[0])]) == 0
    assert f'\n{val} val images of' in capsys.readouterr().out


@pytest.mark.parametrize('argv', [['--images', '0', '--short-iters', '1'],
                                  ['--sides', '0.3', '0.9', '--short-iters', '1'],
                                  ['--images', '2']])
def test_refuses_counts_sizes_and_nothing_to_score(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', [SCRIPT])
    with pytest.raises(SystemExit) as stop:
        bench().main(argv)
    assert stop.value.code == 2 and 'error:' in capsys.readouterr().err


def test_a_run_folder_whose_checkpoint_is_another_models_is_refused(camvid_protoseg, tmp_path,
                                                                     capsys):
    """A parametric config beside a ProtoSeg checkpoint: one message, not a model scored with
    random weights where the checkpoint does not fit (what ``init_model`` alone would do)."""
    import shutil

    from conftest import BASELINE_CFG
    folder = tmp_path / 'mixed'
    folder.mkdir()
    (folder / 'baseline.py').write_text(f'_base_ = [{BASELINE_CFG!r}]\n')
    shutil.copy(camvid_protoseg[0], folder / 'iter_2.pth')
    (folder / 'last_checkpoint').write_text(str(folder / 'iter_2.pth'))
    with pytest.raises(SystemExit, match='does not fit the model of'):
        bench().main(['--data-root', CAMVID_MINI, '--images', '1', '--work-dirs',
                      str(folder)])
    (folder / 'iter_2.pth').unlink()
    with pytest.raises(SystemExit, match='no such checkpoint'):
        bench().main(['--data-root', CAMVID_MINI, '--images', '1', '--work-dirs',
                      str(folder)])


def test_summary_pairs_each_protoseg_run_with_the_parametric_run_of_its_name():
    runs = [('protoseg_a', 'map', [0.9, 0.7]), ('parametric_a', 'energy', [0.6, 0.6]),
            ('protoseg_b', 'map', [0.5]), ('parametric_b', 'energy', [0.55]),
            ('protoseg_c', 'map', [0.99]),  # no parametric run named c: not a pair
            ('segformer_d', 'energy', [0.1])]  # a parametric run by its kind, not its name
    row, = bench().summary_rows({('noise', 0.5): runs})
    assert row == '| noise | 0.50 | 50.0-99.0 | 10.0-60.0 | 1 of 2 |'


def test_a_parametric_run_is_scored_by_the_energy_of_mmsegs_logits(tmp_path, capsys):
    """A parametric run folder (random weights): its row is the energy score, -logsumexp
    of MMSeg's logits, ranked by hand; magenta squares."""
    import torch
    from mmseg.apis import inference_model, init_model

    from conftest import BASELINE_CFG
    folder = tmp_path / 'parametric_r'
    folder.mkdir()
    (folder / 'baseline.py').write_text(f'_base_ = [{BASELINE_CFG!r}]\n')
    torch.manual_seed(0)
    model = init_model(BASELINE_CFG, None, device='cpu')
    torch.save(dict(meta=dict(), state_dict=model.state_dict()), folder / 'iter_1.pth')
    (folder / 'last_checkpoint').write_text(str(folder / 'iter_1.pth'))
    module = bench()
    assert module.main(['--data-root', CAMVID_MINI, '--images', '2', '--fills', 'magenta',
                        '--work-dirs', str(folder)]) == 0
    row, = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith('| parametric_r |')]
    assert '| energy |' in row
    low, mean, high = (float(v) for v in row.strip('| ').split(' | ')[2:])
    model = init_model(str(folder / 'baseline.py'), str(folder / 'iter_1.pth'), device='cpu')
    expected = []
    for _, img, core, scene in module.noise_patch_images(CAMVID_MINI, 2, fill='magenta'):
        logits = inference_model(model, img).seg_logits.data.double()
        energy = (-torch.logsumexp(logits, dim=0)).numpy()
        expected.append(100 * auroc_by_hand(energy[core], energy[scene]))
    assert (low, mean, high) == pytest.approx(
        (min(expected), np.mean(expected), max(expected)), abs=0.051)
