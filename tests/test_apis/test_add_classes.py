"""mmseg_proto.apis.add_classes (and its steps' modules beside it) and
tools/analysis_tools/add_class.py: new prototypes and imprinted rows against hand
computations, trained classes untouched, the written config and checkpoint through MMSeg's
own loaders, and every bad input refused before anything is written."""
import glob
import os
import os.path as osp
import subprocess
import sys

import mmcv
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BASELINE_CFG, CAMVID_MINI, PROTO_CFG, REPO

from mmseg_proto.apis import (AddClassError, add_classes, calibrate_offset, imprint_weight,
                              place_prototypes)
from mmseg_proto.models.decode_heads.proto_head import BaseClassesLayerNorm

TOOL = osp.join(REPO, 'tools', 'analysis_tools', 'add_class.py')
TRAIN = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'train', '*.jpg')))
VAL = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))
CAR = 8


def label_of(image):
    return image.replace('img_dir', 'ann_dir')[:-4] + '.png'


def car_images(n):
    """The first n bundled train images holding at least 2000 car pixels."""
    out = [i for i in TRAIN if (mmcv.imread(label_of(i), 'unchanged') == CAR).sum() >= 2000]
    assert len(out) >= n
    return out[:n]


@pytest.fixture(scope='module')
def protoseg(camvid_protoseg):
    """(config, checkpoint, model) of 2 iterations of the shipped CamVid ProtoSeg config
    (conftest's session-wide checkpoint)."""
    from mmseg.apis import init_model
    ckpt = camvid_protoseg[0]
    return PROTO_CFG, ckpt, init_model(PROTO_CFG, ckpt, device='cpu')


@pytest.fixture(scope='module')
def parametric(tmp_path_factory):
    """(config, checkpoint, model) of the parametric baseline, random weights, saved as an
    mmengine checkpoint with CamVid's dataset_meta."""
    from mmseg.apis import init_model
    from mmseg_proto.datasets import CamVidDataset
    torch.manual_seed(0)
    model = init_model(BASELINE_CFG, None, device='cpu')
    path = str(tmp_path_factory.mktemp('param') / 'param.pth')
    torch.save(dict(meta=dict(dataset_meta=dict(CamVidDataset.METAINFO)),
                    state_dict=model.state_dict()), path)
    return BASELINE_CFG, path, init_model(BASELINE_CFG, path, device='cpu')


def support_of(images, tmp_path):
    """(image, binary car mask path) pairs, masks written as 0/255 PNGs."""
    pairs = []
    for i, image in enumerate(images):
        mask = (mmcv.imread(label_of(image), 'unchanged') == CAR).astype(np.uint8) * 255
        path = str(tmp_path / f'mask{i}.png')
        mmcv.imwrite(mask, path)
        pairs.append((image, path))
    return pairs


# ---------------------------------------------------------------- the maths, by hand
def test_mean_prototype_is_the_normalised_mean():
    emb = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    protos, distinct = place_prototypes(emb, 1)
    hand = emb.numpy().mean(0)
    hand /= np.linalg.norm(hand)
    np.testing.assert_allclose(protos[0].numpy(), hand, rtol=1e-5, atol=1e-6)
    assert distinct == 1


def test_clustered_prototypes_find_balanced_clusters():
    """Three tight, equal clusters on the sphere: the K=3 prototypes are their normalised
    means (computed by hand), whatever pixels the clustering starts from."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=1)
    emb = F.normalize(centres.repeat_interleave(40, 0) + 0.05 * torch.randn(120, 16,
                                                                          generator=g), dim=1)
    for seed in range(3):
        protos, distinct = place_prototypes(emb, 3, seed=seed)
        assert distinct == 3
        np.testing.assert_allclose(protos.norm(dim=1).numpy(), 1, atol=1e-6)
        for c in range(3):
            hand = emb[40 * c:40 * (c + 1)].numpy().mean(0)
            hand /= np.linalg.norm(hand)
            assert float((protos @ torch.from_numpy(hand)).max()) > 0.9999


def test_fewer_pixels_than_prototypes_repeat_each_pixel():
    emb = F.normalize(torch.randn(3, 8), dim=1)
    protos, distinct = place_prototypes(emb, 10)
    assert distinct == 3 and protos.shape == (10, 8)
    for row in protos:
        assert any(torch.allclose(row, e) for e in emb)


def test_imprinted_row_by_hand():
    feats = torch.tensor([[3.0, 0.0, 4.0], [1.0, 2.0, 0.0]])
    weight = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]])  # norms 2 and 4: mean 3
    mean = np.array([2.0, 1.0, 2.0])  # |mean| = 3
    np.testing.assert_allclose(imprint_weight(feats, weight).numpy(), mean / 3 * 3)


def test_calibrated_offset_by_hand():
    """Pixels with t = max(base) - new score: positives at t = 1, 2, 5; others at t = 3, 4,
    6. Admitting t <= 2 gives IoU 2/3; t <= 5 gives 3/5: the offset is midway between 2 and
    the next t (3)."""
    base = torch.tensor([[1.0], [2.0], [5.0], [3.0], [4.0], [6.0]])
    new = torch.zeros(6)
    positive = torch.tensor([True, True, True, False, False, False])
    offset, iou = calibrate_offset(new, base, positive, torch.ones(6, dtype=torch.bool))
    assert offset == pytest.approx(2.5) and iou == pytest.approx(2 / 3)
    # an unknown (void) pixel at t = 2.2 is neither counted nor a boundary
    base = torch.cat([base, torch.tensor([[2.2]])])
    known = torch.tensor([True] * 6 + [False])
    offset, _ = calibrate_offset(torch.zeros(7), base, torch.cat([positive, torch.tensor(
        [False])]), known)
    assert offset == pytest.approx(2.5)


def test_base_classes_layer_norm_by_hand():
    norm = BaseClassesLayerNorm(5, 3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.4, -1.0]))
    x = torch.tensor([[0.2, 0.5, 0.8, 0.9, -0.3]])
    out = norm(x)[0].detach().numpy()
    base = np.array([0.2, 0.5, 0.8])
    mu, sd = base.mean(), np.sqrt(base.var() + 1e-5)
    w, b = norm.weight.detach().numpy(), norm.bias.detach().numpy()
    np.testing.assert_allclose(out, (x[0].numpy() - mu) / sd * w + b, rtol=1e-5)
    ref = F.layer_norm(x[:, :3], (3, ), norm.weight[:3], norm.bias[:3])
    assert torch.equal(norm(x)[:, :3], ref)  # the trained classes' logits bit-identical


# ---------------------------------------------------------------- the API on real models
def _logits(model, image):
    from mmseg.apis import inference_model
    return inference_model(model, image).seg_logits.data


@pytest.mark.parametrize('which', ['protoseg', 'parametric'])
def test_added_class_leaves_trained_classes_untouched(which, request, tmp_path):
    _, _, model = request.getfixturevalue(which)
    support = support_of(car_images(2), tmp_path)
    new, report = add_classes(model, ['mystery'], [support])
    assert new.decode_head.num_classes == 12 and model.decode_head.num_classes == 11
    assert new.dataset_meta['classes'][-1] == 'mystery'
    assert len(new.dataset_meta['palette']) == 12
    assert report.classes[0].pixels > 0 and report.classes[0].index == 11
    for image in VAL[:3]:
        before, after = _logits(model, image), _logits(new, image)
        assert after.shape[0] == 12
        assert torch.equal(before, after[:11])  # bit-identical trained classes
        pred, pred_before = after.argmax(0), before.argmax(0)
        changed = pred != pred_before
        assert bool((pred[changed] == 11).all())  # only where the new class wins


@pytest.mark.parametrize('options', [{}, dict(num_prototypes=1)], ids=['default', 'k1'])
def test_new_prototypes_against_an_independent_computation(protoseg, tmp_path, options):
    """K = 1, the default: the new prototype is the normalised mean of the support pixels'
    embeddings, computed here through the head's own modules by hand (decoder -> LayerNorm
    -> L2), with the mask resized as MMSeg resizes labels."""
    from mmcv.transforms import Compose
    _, _, model = protoseg
    image = car_images(1)[0]
    support = support_of([image], tmp_path)
    new, report = add_classes(model, ['mystery'], [support], **options)
    head = model.decode_head
    pipeline = Compose([t for t in model.cfg.test_pipeline if t['type'] != 'LoadAnnotations'])
    data = pipeline(dict(img_path=image))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    with torch.no_grad():
        feats = head.decoder(model.extract_feat(batch['inputs']))  # (1, D, h, w)
        emb = F.normalize(head.feat_norm(feats.permute(0, 2, 3, 1)), dim=-1)[0]
    mask = mmcv.imread(support[0][1], 'unchanged') > 0
    h, w = data['data_samples'].img_shape
    mask = mmcv.imresize(mask.astype(np.uint8), (w, h), interpolation='nearest')
    mask = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=emb.shape[:2],
                         mode='nearest')[0, 0].bool()
    hand = F.normalize(emb[mask].double().mean(0), dim=0)
    got = new.decode_head.prototypes[-1]
    assert int(mask.sum()) == report.classes[0].pixels
    torch.testing.assert_close(got.double(), hand.expand_as(got), atol=1e-5, rtol=0)
    torch.testing.assert_close(new.decode_head.prototypes[:11], head.prototypes)
    assert new.decode_head.mask_norm.weight[-1].item() == pytest.approx(
        head.mask_norm.weight.mean().item())


def test_fewer_prototypes_than_the_head_holds_fill_its_slots_in_order(protoseg, tmp_path):
    """num_prototypes=3 of the head's K: the new class's K slots hold the 3 prototypes
    place_prototypes gives for its support embeddings, slot k prototype k mod 3, and the
    report counts 3 distinct prototypes of K."""
    from mmseg_proto.apis.head_adapters import head_adapter
    from mmseg_proto.apis.support_images import read_support, support_features
    _, _, model = protoseg
    support = support_of(car_images(2), tmp_path)
    new, report = add_classes(model, ['mystery'], [support], num_prototypes=3)
    adapter, emb = head_adapter(model), []
    for image, mask in support:
        img, p, k = read_support(image, mask)
        f, (p, _) = support_features(model, adapter, img, [p, k])
        emb.append(f[p])
    placed, distinct = place_prototypes(torch.cat(emb), 3)
    k = model.decode_head.num_prototypes
    assert k > 3
    torch.testing.assert_close(new.decode_head.prototypes[-1], placed[torch.arange(k) % 3],
                               rtol=0, atol=0)
    assert report.classes[0].prototypes == distinct == 3
    assert f'3 distinct prototypes of {k}' in report.classes[0].notes[0]


def test_calibrated_offset_classifies_most_support_pixels(parametric, tmp_path):
    _, _, model = parametric
    support = support_of(car_images(2), tmp_path)
    _, calibrated = add_classes(model, ['mystery'], [support])
    _, plain = add_classes(model, ['mystery'], [support], calibrate=False)
    assert plain.classes[0].offset == pytest.approx(
        model.decode_head.conv_seg.bias.mean().item())
    assert calibrated.classes[0].support_iou >= plain.classes[0].support_iou


@pytest.mark.parametrize('which', ['protoseg', 'parametric'])
def test_refinement_moves_only_the_new_class(which, request, tmp_path):
    _, _, model = request.getfixturevalue(which)
    support = support_of(car_images(2), tmp_path)
    plain, _ = add_classes(model, ['mystery'], [support])
    refined, report = add_classes(model, ['mystery'], [support], refine_steps=10)
    assert 'refined: 10 steps' in report.classes[0].notes
    before, after = plain.state_dict(), refined.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved  # the new class's parameters moved
    for key in moved:  # ... and only its entries (the last along the class axis)
        assert torch.equal(before[key][:-1], after[key][:-1]), key
    torch.testing.assert_close(_logits(refined, VAL[0])[:11], _logits(model, VAL[0]),
                               rtol=0, atol=0)
    if which == 'protoseg':
        torch.testing.assert_close(refined.decode_head.prototypes[-1].norm(dim=-1),
                                   torch.ones(10))


SLIDE = {'model.test_cfg': dict(mode='slide', crop_size=(96, 96), stride=(64, 64))}


@pytest.mark.parametrize('which', ['protoseg', 'parametric'])
def test_support_features_under_slide_inference_are_mmsegs_windows(which, request,
                                                                    tmp_path):
    """Under ``test_cfg.mode='slide'`` the class is placed from the features of the
    windows MMSeg's own slide inference decodes (recorded from ``inference_model``), one
    after the other; the trained classes' slide logits stay bit-identical."""
    from mmseg.apis import init_model
    from mmseg_proto.apis.head_adapters import head_adapter
    from mmseg_proto.apis.support_images import read_support, support_features
    cfg, ckpt, _ = request.getfixturevalue(which)
    model = init_model(cfg, ckpt, device='cpu', cfg_options=SLIDE)
    adapter = head_adapter(model)
    (image, mask), = support_of(car_images(1), tmp_path)
    img, positive, _ = read_support(image, mask)
    everywhere = np.ones(positive.shape, bool)
    feats, (pos, all_true, none) = support_features(model, adapter, img,
                                                    [positive, everywhere, ~everywhere])
    crops, decode = [], model.encode_decode
    model.encode_decode = lambda inputs, metas: crops.append(inputs) or decode(inputs, metas)
    try:
        _logits(model, image)  # MMSeg reads the file as read_support does
    finally:
        del model.encode_decode
    assert len(crops) > 1  # windows, not the whole image
    expected = torch.cat([adapter.features(model, c)[0].flatten(0, 1) for c in crops])
    assert torch.equal(feats, expected)
    assert pos.shape == all_true.shape == none.shape == feats.shape[:1]
    assert bool(all_true.all()) and not bool(none.any()) and 0 < int(pos.sum()) < pos.numel()
    new, report = add_classes(model, ['mystery'], [[(image, mask)]])
    assert report.classes[0].pixels == int(pos.sum())
    assert torch.equal(_logits(new, VAL[0])[:11], _logits(model, VAL[0]))


@pytest.mark.parametrize('test_cfg', [dict(mode='slide', crop_size=(96, 96)),
                                      dict(mode='slide', crop_size=(96, 96), stride=(0, 64)),
                                      dict(mode='slide', crop_size=96, stride=(64, 64)),
                                      dict(mode='slide', crop_size=(96., 96.), stride=(64, 64))])
def test_a_slide_test_cfg_without_its_windows_is_refused(test_cfg, protoseg, tmp_path):
    import copy
    _, _, model = protoseg
    model = copy.deepcopy(model)
    model.test_cfg = test_cfg
    with pytest.raises(AddClassError, match='crop_size=.h, w. and stride=.h, w.'):
        add_classes(model, ['mystery'], [support_of(car_images(1), tmp_path)])


def test_held_out_calibration_by_hand(parametric, tmp_path):
    """Two support images: each is scored by the row imprinted from the other one, and
    the offset is the IoU-maximising one over both (computed here from the features);
    the final row is imprinted from both."""
    from mmseg_proto.apis.head_adapters import head_adapter
    from mmseg_proto.apis.support_images import read_support, support_features
    _, _, model = parametric
    support = support_of(car_images(2), tmp_path)
    new, report = add_classes(model, ['mystery'], [support], held_out_calibration=True)
    adapter = head_adapter(model)
    feats, pos, known = [], [], []
    for image, mask in support:
        img, p, k = read_support(image, mask)
        f, (p, k) = support_features(model, adapter, img, [p, k])
        feats.append(f), pos.append(p), known.append(k | p)
    weight, bias = model.decode_head.conv_seg.weight.flatten(1), model.decode_head.conv_seg.bias
    scale = weight.norm(dim=1).mean()
    held, base = [], []
    for i in range(2):
        other = feats[1 - i][pos[1 - i]]
        row = other.mean(0) / other.mean(0).norm() * scale
        held.append(feats[i] @ row)
        base.append(feats[i] @ weight.T + bias)
    offset, _ = calibrate_offset(torch.cat(held), torch.cat(base), torch.cat(pos),
                                 torch.cat(known))
    assert report.classes[0].offset == pytest.approx(offset, rel=1e-5, abs=1e-6)
    both = torch.cat([f[p] for f, p in zip(feats, pos)]).mean(0)
    torch.testing.assert_close(new.decode_head.conv_seg.weight[-1].flatten(),
                               both / both.norm() * scale)
    # The reported support IoU: the final row's scores at that offset against the trained
    # classes' best logit, intersection over union of the support pixels.
    pred = torch.cat(feats) @ (both / both.norm() * scale) + report.classes[0].offset \
        > torch.cat(base).max(dim=1).values
    positive = torch.cat(pos)
    iou = int((pred & positive).sum()) / int((pred | positive).sum())
    assert report.classes[0].support_iou == pytest.approx(iou, rel=1e-6)
    _, in_sample = add_classes(model, ['mystery'], [support])  # the default
    assert in_sample.classes[0].offset != pytest.approx(offset)


def test_support_iou_leaves_void_pixels_out_in_every_branch(parametric):
    """Label maps with void (255) as the masks: the reported support IoU counts the known
    pixels only, whichever way the offset was set (by hand from the features, over the
    pixels that are not void)."""
    from mmseg_proto.apis.head_adapters import head_adapter
    from mmseg_proto.apis.support_images import read_support, support_features
    _, _, model = parametric
    images = car_images(2)
    adapter = head_adapter(model)
    feats, pos, known = [], [], []
    for image in images:
        img, positive, k = read_support(image, label_of(image), CAR)
        assert 0 < int((~k).sum())  # void pixels in this label map
        f, (p, k) = support_features(model, adapter, img, [positive, k])
        feats.append(f), pos.append(p), known.append(k | p)
    feats, pos, known = torch.cat(feats), torch.cat(pos), torch.cat(known)
    head = model.decode_head.conv_seg
    base = feats @ head.weight.flatten(1).T + head.bias
    support = [(image, label_of(image)) for image in images]
    for options in (dict(calibrate=False), dict(refine_steps=3), dict(),
                    dict(held_out_calibration=True)):
        new, report = add_classes(model, ['mystery'], [support], [CAR], **options)
        new_head = new.decode_head.conv_seg
        logits = feats @ new_head.weight.flatten(1).T + new_head.bias
        pred = logits.argmax(dim=1) == 11 if options.get('refine_steps') else \
            logits[:, 11] > base.max(dim=1).values
        p, y = pred[known], pos[known]
        hand = int((p & y).sum()) / int((p | y).sum())
        assert report.classes[0].support_iou == pytest.approx(hand, rel=1e-6), options
        everywhere = int((pred & pos).sum()) / int((pred | pos).sum())
        assert everywhere != pytest.approx(hand, rel=1e-6)  # void pixels were predicted


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('case', ['empty', 'size', 'name', 'vanishes', 'unreadable',
                                  'head', 'values'])
def test_bad_input_is_refused_with_a_message(case, protoseg, tmp_path):
    _, _, model = protoseg
    image = car_images(1)[0]
    mask = np.zeros(mmcv.imread(image).shape[:2], np.uint8)
    mask[100:200, 100:200] = 255
    name, message = 'mystery', None
    if case == 'empty':
        mask[:] = 0
        message = 'no pixel of the class'
    elif case == 'size':
        mask = mask[:-1]
        message = 'must be the same size'
    elif case == 'name':
        name, message = 'car', 'already a class'
    elif case == 'vanishes':
        mask[:] = 0
        mask[1, 1] = 255
        message = "no support pixel is left at the decoder's resolution"
    elif case == 'values':
        mask[0, 0] = 7
        message = 'binary mask'
    path = str(tmp_path / 'm.png')
    mmcv.imwrite(mask, path)
    support = [(image, path)]
    if case == 'unreadable':
        support = [(str(tmp_path / 'missing.jpg'), path)]
        message = 'cannot read the image'
    target = model
    if case == 'head':
        import copy
        target = copy.deepcopy(model)
        target.decode_head = torch.nn.Identity()
        message = 'cannot take a class'
    with pytest.raises(AddClassError, match=message):
        add_classes(target, [name], [support])


# ---------------------------------------------------------------- the tool
def run_tool_here(*args):
    """The tool's ``main(ARGS)`` in this process, from the repository root, reported as
    ``python add_class.py ARGS`` would be: returncode, stdout and stderr, where a SystemExit
    message goes to stderr with status 1, as the interpreter does. Saves the interpreter's
    start and imports (tests/test_tools/test_tool_commands.py starts every tool as a
    command)."""
    import contextlib
    import importlib.util
    import io
    import types
    spec = importlib.util.spec_from_file_location('add_class_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main([str(a) for a in args])
            except SystemExit as stop:
                code = stop.code
    finally:
        os.chdir(cwd)
    if code is not None and not isinstance(code, int):
        err.write(f'{code}\n')
        code = 1
    return types.SimpleNamespace(returncode=code or 0, stdout=out.getvalue(),
                                 stderr=err.getvalue())


def test_tool_writes_a_model_mmseg_loads(protoseg, tmp_path):
    from mmseg.apis import MMSegInferencer, inference_model, init_model
    cfg, ckpt, model = protoseg
    pairs = support_of(car_images(2), tmp_path)
    lst = tmp_path / 'support list.txt'
    lst.write_text('# car as a new class\n' + '\n'.join(
        f'"{i}" {osp.relpath(m, tmp_path)}' for i, m in pairs) + '\n')
    out = tmp_path / 'out'
    proc = run_tool_here(cfg, ckpt, '--name', 'mystery', '--support', lst, '--out', out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'support pixels' in proc.stdout and 'prototype(s) placed' in proc.stdout
    new_cfg = str(out / osp.basename(cfg))
    new_ckpt = str(out / osp.basename(ckpt))
    loaded = init_model(new_cfg, new_ckpt, device='cpu')
    assert loaded.dataset_meta['classes'][-1] == 'mystery'
    result = inference_model(loaded, VAL[0])
    assert result.seg_logits.data.shape[0] == 12
    assert torch.equal(result.seg_logits.data[:11], _logits(model, VAL[0]))
    out_inf = MMSegInferencer(model=new_cfg, weights=new_ckpt, device='cpu')(
        VAL[0], return_datasamples=True)
    assert out_inf.seg_logits.data.shape[0] == 12
    # MMSeg's test tool (the package's tools/test.py runs mmseg's) on the written config
    # (its first 4 val images: the class table is what is read)
    work = tmp_path / 'test_work'
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'test.py'), new_cfg,
                           new_ckpt, '--work-dir', str(work), '--cfg-options',
                           'test_dataloader.dataset.indices=4'], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'mystery' in proc.stdout + proc.stderr
    # a second run into the same folder is refused (no --force): nothing replaced
    before = open(new_ckpt, 'rb').read()
    proc = run_tool_here(cfg, ckpt, '--name', 'other', '--support', lst, '--out', out)
    assert proc.returncode != 0 and 'already holds a checkpoint' in proc.stderr
    assert open(new_ckpt, 'rb').read() == before


def test_tool_refuses_bad_input_and_writes_nothing(protoseg, tmp_path):
    cfg, ckpt, _ = protoseg
    image = car_images(1)[0]
    empty = tmp_path / 'empty.png'
    mmcv.imwrite(np.zeros(mmcv.imread(image).shape[:2], np.uint8), str(empty))
    lst = tmp_path / 'list.txt'
    lst.write_text(f'{image} {empty}\n')
    out = tmp_path / 'out'
    proc = run_tool_here(cfg, ckpt, '--name', 'mystery', '--support', lst, '--out', out)
    assert proc.returncode != 0 and 'no pixel of the class' in proc.stderr
    assert 'nothing was written' in proc.stderr
    assert not out.exists() or not os.listdir(out)
    lst.write_text(f'{image}\n')
    proc = run_tool_here(cfg, ckpt, '--name', 'mystery', '--support', lst, '--out', out)
    assert proc.returncode != 0 and 'expected IMAGE MASK' in proc.stderr
    lst.write_text(f'{image} {empty}\n')
    proc = run_tool_here(cfg, ckpt, '--name', 'mystery', '--support', lst, '--out', ckpt)
    assert proc.returncode != 0 and 'is a file' in proc.stderr
    user = tmp_path / 'user'
    user.mkdir()
    (user / osp.basename(cfg)).write_text('mine')  # the name of the config it would write
    proc = run_tool_here(cfg, ckpt, '--name', 'mystery', '--support', lst, '--out', user,
                    '--force')
    assert proc.returncode != 0 and 'not replacing it' in proc.stderr


# ---------------------------------------------------------------- attack pass (issue 29)
def test_calibrated_offset_with_ties_is_reachable():
    """An offset admits all pixels of one t or none of them: with ties (identical support
    pixels) the offset and its IoU are those of a cut between distinct t, never inside a
    run of equal ones (which would admit nothing and report an IoU it never reaches)."""
    for base, positive in (
            (torch.ones(6, 1), torch.tensor([True, True, True, False, False, False])),
            (torch.ones(6, 1), torch.tensor([False, False, False, True, True, True])),
            (torch.tensor([[1.0], [1.0], [1.0], [1.0], [5.0]]),
             torch.tensor([True, False, True, True, False]))):
        new = torch.zeros(len(base))
        offset, iou = calibrate_offset(new, base, positive, torch.ones(len(base), dtype=bool))
        pred = new + offset > base[:, 0]
        reached = float((pred & positive).sum() / (pred | positive).sum())
        assert iou == pytest.approx(reached) and reached > 0, (offset, iou, reached)
    assert offset == pytest.approx(3.0) and iou == pytest.approx(3 / 4)


@pytest.mark.parametrize('case', ['k-float', 'k-bool', 'steps-bool', 'lr-huge', 'palette',
                                  'names-str', 'empty-support', 'flat-support', 'name-space',
                                  'no-classes', 'k-imprinting', 'nan-image'])
def test_bad_options_are_refused_with_a_message(case, protoseg, parametric, tmp_path):
    import copy
    _, _, model = protoseg
    image = car_images(1)[0]
    support = support_of([image], tmp_path)
    names, supports, kwargs = ['mystery'], [support], {}
    message = {'k-float': 'num_prototypes=2.5', 'k-bool': 'num_prototypes=True',
               'steps-bool': 'refine_steps=True', 'lr-huge': r'refine_lr=1000000.0',
               'palette': r'palette colour \[300, 0, 0\]', 'names-str': 'list of class names',
               'empty-support': 'non-empty list of', 'flat-support': 'non-empty list of',
               'name-space': 'leading or trailing spaces', 'no-classes': 'names no classes',
               'k-imprinting': 'only a ProtoHead has prototypes',
               'nan-image': 'NaN or inf'}[case]
    if case == 'k-float':
        kwargs = dict(num_prototypes=2.5)
    elif case == 'k-bool':
        kwargs = dict(num_prototypes=True)
    elif case == 'steps-bool':
        kwargs = dict(refine_steps=True)
    elif case == 'lr-huge':
        kwargs = dict(refine_steps=5, refine_lr=1e6)
    elif case == 'palette':
        kwargs = dict(palette=[[300, 0, 0]])
    elif case == 'names-str':
        names = 'mystery'
    elif case == 'empty-support':
        supports = [[]]
    elif case == 'flat-support':
        supports = support  # one (image, mask) list, not one list per class
    elif case == 'name-space':
        names = ['car ']
    elif case == 'no-classes':
        model = copy.deepcopy(model)
        del model.dataset_meta  # init_model without a checkpoint
    elif case == 'k-imprinting':
        model, kwargs = parametric[2], dict(num_prototypes=3)
    elif case == 'nan-image':
        img = mmcv.imread(image).astype(np.float32)
        img[5, 5, 1] = np.nan
        supports = [[(img, support[0][1])]]
    with pytest.raises(AddClassError, match=message):
        add_classes(model, names, supports, **kwargs)


def test_image_and_mask_arrays_and_alpha_channels(protoseg, tmp_path):
    """Arrays read like files: BGRA and grayscale images as LoadImageFromFile gives them
    (alpha dropped, gray repeated); a mask with a constant alpha channel (an editor's
    export) is its colour channels; a varying alpha is refused, not guessed."""
    _, _, model = protoseg
    image = car_images(1)[0]
    (img_path, mask_path), = support_of([image], tmp_path)
    img, mask = mmcv.imread(img_path), mmcv.imread(mask_path, 'unchanged')
    ref, _ = add_classes(model, ['mystery'], [[(img, mask)]])
    bgra = np.dstack([img, np.full(mask.shape, 7, np.uint8)])
    rgba_mask = str(tmp_path / 'rgba.png')
    mmcv.imwrite(np.dstack([mask, mask, mask, np.full(mask.shape, 255, np.uint8)]), rgba_mask)
    got, _ = add_classes(model, ['mystery'], [[(bgra, rgba_mask)]])
    torch.testing.assert_close(got.decode_head.prototypes, ref.decode_head.prototypes,
                               rtol=0, atol=0)
    gray = img[..., 1]
    a, _ = add_classes(model, ['mystery'], [[(gray, mask)]])
    b, _ = add_classes(model, ['mystery'], [[(np.repeat(gray[..., None], 3, 2), mask)]])
    torch.testing.assert_close(a.decode_head.prototypes, b.decode_head.prototypes,
                               rtol=0, atol=0)
    varying = str(tmp_path / 'alpha.png')
    mmcv.imwrite(np.dstack([mask, mask, mask, 255 - mask]), varying)
    with pytest.raises(AddClassError, match='alpha'):
        add_classes(model, ['mystery'], [[(img, varying)]])


def test_head_with_one_prototype_per_class(tmp_path):
    """K = 1: the new class gets one prototype, the normalised mean of its support
    embeddings; the trained classes' logits are bit-identical."""
    from mmseg.apis import init_model
    from mmseg_proto.datasets import CamVidDataset
    cfg = tmp_path / 'k1.py'
    cfg.write_text(f'_base_ = [{PROTO_CFG!r}]\n'
                   'model = dict(decode_head=dict(num_prototypes=1))\n')
    torch.manual_seed(0)
    model = init_model(str(cfg), None, device='cpu')
    model.dataset_meta = dict(CamVidDataset.METAINFO)
    new, report = add_classes(model, ['mystery'], [support_of(car_images(1), tmp_path)])
    assert new.decode_head.prototypes.shape[:2] == (12, 1)
    assert report.classes[0].prototypes == 1 and not report.classes[0].notes
    torch.testing.assert_close(new.decode_head.prototypes[-1].norm(dim=-1), torch.ones(1))
    assert torch.equal(_logits(model, VAL[0]), _logits(new, VAL[0])[:11])


@pytest.fixture(scope='module')
def added_twice(protoseg, tmp_path_factory):
    """The tool run twice: C + 1 from the trained model, then C + 2 from what it wrote.
    Returns (config, checkpoint) of the C + 2 model."""
    cfg, ckpt, _ = protoseg
    folder = tmp_path_factory.mktemp('twice')
    pairs = support_of(car_images(2), folder)
    lst = folder / 'support.txt'
    lst.write_text(''.join(f'{i} {m}\n' for i, m in pairs))
    for name, out in (('first', folder / 'one'), ('second', folder / 'two')):
        proc = run_tool_here(cfg, ckpt, '--name', name, '--support', lst, '--out', out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        cfg, ckpt = str(out / osp.basename(cfg)), str(out / osp.basename(ckpt))
    return cfg, ckpt


def test_tool_adds_a_class_twice_keeping_the_trained_statistics(protoseg, added_twice):
    """The second class's LayerNorm statistics are still the ORIGINAL trained classes'
    (mask_norm_classes = 11, not 12): the 11 trained classes' logits bit-identical."""
    from mmengine.config import Config
    from mmseg.apis import init_model
    cfg, ckpt = added_twice
    head_cfg = Config.fromfile(cfg).model.decode_head
    assert head_cfg.num_classes == 13 and head_cfg.mask_norm_classes == 11
    loaded = init_model(cfg, ckpt, device='cpu')
    assert loaded.decode_head.mask_norm.num_base == 11
    assert list(loaded.dataset_meta['classes'][-2:]) == ['first', 'second']
    logits = _logits(loaded, VAL[0])
    assert logits.shape[0] == 13
    assert torch.equal(logits[:11], _logits(protoseg[2], VAL[0]))


def test_onnx_export_of_the_extended_model_matches_mmseg(added_twice, tmp_path):
    """pytorch2onnx.py on the tool's written config and checkpoint (C + 2 classes, the
    LayerNorm over the trained classes only): ONNX Runtime on a CamVid street image at its
    size gives MMSeg's inference_model logits."""
    pytest.importorskip('onnxruntime')
    import importlib.util

    from mmcv.transforms import LoadImageFromFile
    from mmseg.apis import inference_model, init_model
    cfg, ckpt = added_twice
    spec = importlib.util.spec_from_file_location(
        'pytorch2onnx', osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / 'extended.onnx')
    verified = tool.main([cfg, ckpt, '--out', out, '--shape', '360', '480',
                          '--verify', VAL[0]])
    assert verified['max_abs_diff'] <= 1e-4 and verified['argmax_agreement'] >= 0.9999
    import onnxruntime as ort
    image = LoadImageFromFile()(dict(img_path=VAL[0]))['img']
    assert image.shape == (360, 480, 3)
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    got = session.run(['seg_logits'], {'image': image.transpose(2, 0, 1)[None].astype(
        np.float32)})[0][0]
    model = init_model(cfg, ckpt, device='cpu')
    model.cfg.test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackSegInputs')]
    expected = inference_model(model, VAL[0]).seg_logits.data.numpy()
    assert got.shape == expected.shape == (13, 360, 480)
    assert float((got.argmax(0) == expected.argmax(0)).mean()) >= 0.9999
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_anomaly_map_model_with_slide_inference(protoseg, tmp_path):
    """A ProtoEncoderDecoder with anomaly_map stitches C logits + 1 anomaly channel in
    slide inference: after a class is added, C + 2 channels (not C + 1)."""
    from mmseg.apis import inference_model, init_model
    cfg, ckpt, _ = protoseg
    model = init_model(cfg, ckpt, device='cpu', cfg_options={
        'model.type': 'ProtoEncoderDecoder', 'model.anomaly_map': True,
        'model.test_cfg': dict(mode='slide', crop_size=(160, 160), stride=(120, 120))})
    new, _ = add_classes(model, ['mystery'], [support_of(car_images(1), tmp_path)])
    assert new.out_channels == model.out_channels + 1 == 13
    assert new.decode_head.out_channels == 12
    before, after = inference_model(model, VAL[0]), inference_model(new, VAL[0])
    assert after.seg_logits.data.shape[0] == 12 and after.anomaly_map.data.shape[0] == 1
    assert torch.equal(before.seg_logits.data, after.seg_logits.data[:11])


def test_identical_support_pixels_count_as_one_prototype():
    """All support pixels the same embedding: the K prototypes placed coincide, and the
    report says one distinct prototype, not K."""
    emb = F.normalize(torch.randn(1, 8), dim=1).repeat(50, 1)
    protos, distinct = place_prototypes(emb, 5)
    assert distinct == 1 and protos.shape == (5, 8)
    assert place_prototypes(emb[:3], 5)[1] == 1  # fewer pixels than K, all the same


def test_label_map_void_is_neither_the_class_nor_known():
    """With mask_value, a label map's 255 (void) pixels are unknown: not the class, and not
    counted as 'not the class' by the calibration."""
    from mmseg_proto.apis.support_images import read_support
    image = car_images(1)[0]
    label = mmcv.imread(label_of(image), 'unchanged')
    assert (label == 255).any() and (label == CAR).any()
    _, positive, known = read_support(image, label_of(image), CAR)
    np.testing.assert_array_equal(positive, label == CAR)
    np.testing.assert_array_equal(known, label != 255)
    _, positive, known = read_support(image, (label == CAR).astype(np.uint8) * 255)
    assert known.all() and (positive == (label == CAR)).all()  # binary: every pixel known


def test_model_with_an_auxiliary_head(tmp_path):
    """The auxiliary head (training only; its classifier has the old classes) is dropped
    from the model and its config: the written config builds a model whose tensors are
    exactly the extended model's, and the original keeps its auxiliary head."""
    from mmengine.config import Config
    from mmseg.apis import init_model
    from mmseg_proto.datasets import CamVidDataset
    cfg = tmp_path / 'aux.py'
    cfg.write_text(
        f'_base_ = [{BASELINE_CFG!r}]\n'
        "model = dict(auxiliary_head=dict(type='FCNHead', in_channels=160, in_index=2, "
        'channels=16, num_convs=1, concat_input=False, num_classes=11, align_corners=False, '
        "loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)))\n")
    torch.manual_seed(0)
    model = init_model(str(cfg), None, device='cpu')
    model.dataset_meta = dict(CamVidDataset.METAINFO)
    new, _ = add_classes(model, ['mystery'], [support_of(car_images(1), tmp_path)])
    assert model.auxiliary_head is not None and model.cfg.model.auxiliary_head is not None
    assert new.auxiliary_head is None and new.cfg.model.auxiliary_head is None
    written = str(tmp_path / 'written.py')
    new.cfg.dump(written)
    rebuilt = init_model(Config.fromfile(written), None, device='cpu')
    assert not rebuilt.with_auxiliary_head
    assert sorted(rebuilt.state_dict()) == sorted(new.state_dict())
    assert rebuilt.decode_head.conv_seg.out_channels == 12


def test_tool_refuses_another_models_checkpoint(protoseg, parametric, tmp_path):
    """The parametric baseline's checkpoint with the ProtoSeg config: init_model would leave
    the ProtoHead (prototypes, LayerNorms) at its random initialisation with a warning;
    the tool refuses and writes nothing."""
    cfg, _, _ = protoseg
    pairs = support_of(car_images(1), tmp_path)
    lst = tmp_path / 'list.txt'
    lst.write_text(''.join(f'{i} {m}\n' for i, m in pairs))
    out = tmp_path / 'out'
    proc = run_tool_here(cfg, parametric[1], '--name', 'mystery', '--support', lst,
                         '--out', out)
    assert proc.returncode != 0
    assert 'does not fit the config' in proc.stderr and 'decode_head.prototypes' in proc.stderr
    assert 'nothing was written' in proc.stderr
    assert not out.exists() or not os.listdir(out)


def test_fine_tuning_config_is_written_to_load_its_prototypes(protoseg, tmp_path):
    """A config with load_prototypes=False (fine-tuning) would make init_model drop the
    written checkpoint's prototypes, the new class's included: the written config loads
    them."""
    import copy

    from mmseg.apis import init_model
    _, _, model = protoseg
    model = copy.deepcopy(model)
    model.cfg.model.decode_head.load_prototypes = False
    new, _ = add_classes(model, ['mystery'], [support_of(car_images(1), tmp_path)])
    assert new.cfg.model.decode_head.load_prototypes is True
    cfg, ckpt = str(tmp_path / 'written.py'), str(tmp_path / 'written.pth')
    new.cfg.dump(cfg)
    torch.save(dict(meta=dict(dataset_meta=new.dataset_meta), state_dict=new.state_dict()),
               ckpt)
    loaded = init_model(cfg, ckpt, device='cpu')
    assert torch.equal(loaded.decode_head.prototypes, new.decode_head.prototypes)


@pytest.mark.parametrize('device, message', [('cuda', 'sees no CUDA device'),
                                             ('gpu0', 'is not a device')])
def test_tool_refuses_a_device_it_cannot_use(device, message, tmp_path):
    if device == 'cuda' and torch.cuda.is_available():
        pytest.skip('a CUDA device is present')
    proc = run_tool_here(PROTO_CFG, tmp_path / 'ck.pth', '--name', 'x', '--support',
                    tmp_path / 'l.txt', '--out', tmp_path / 'out', '--device', device)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_import_paths_of_before_the_split_still_work():
    """add_classes.py held every step before they got modules of their own: the names
    imported from it, and from mmseg_proto.apis, are still there and are the new modules'
    objects."""
    import importlib

    import mmseg_proto.apis as apis
    from mmseg_proto.apis import add_class_checks, class_placement, head_adapters
    from mmseg_proto.apis import model_extension, support_images
    old = importlib.import_module('mmseg_proto.apis.add_classes')
    home = {'AddClassError': add_class_checks, 'read_support': support_images,
            'support_features': support_images, 'ImageLike': support_images,
            'Support': support_images, 'head_adapter': head_adapters,
            'place_prototypes': class_placement, 'imprint_weight': class_placement,
            'calibrate_offset': class_placement, 'refine_new_class': class_placement,
            'distinct_colours': model_extension}
    for name, module in home.items():
        assert getattr(old, name) is getattr(module, name), name
    for name in apis.__all__:
        assert getattr(apis, name) is getattr(old, name), name
    assert set(apis.__all__) == {'add_classes', 'AddClassError', 'AddClassReport',
                                 'AddedClass', 'calibrate_offset', 'imprint_weight',
                                 'place_prototypes'}
