"""The prototype gallery (mmseg_proto.visualization.prototype_gallery), pinned against a
brute-force recomputation from ``head.embed`` and ``head.prototypes`` on the small CamVid
model of ``train_camvid_protoseg``."""
import copy
import math
import os.path as osp
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROTO_CFG

from mmseg_proto.evaluation import nearest_prototype_usage
from mmseg_proto.visualization import collect_embeddings, load_model
from mmseg_proto.visualization.image_crops import crop_around
from mmseg_proto.visualization.pixel_explanation import explain_pixel
from mmseg_proto.visualization.prototype_gallery import (build_gallery, build_split_dataset,
                                                         load_gallery, near_duplicates,
                                                         save_gallery)
from mmseg_proto.visualization.prototype_report_page import report_rows, write_report_html
from mmseg_proto.visualization.top_n import TopN

NUM_IMAGES = 3
PER_PROTOTYPE = 2


@pytest.fixture(scope='module')
def setup(camvid_protoseg):
    """(model, train dataset with the test pipeline, gallery of its first 3 images, N=2) of
    conftest's session-wide 2-iteration CamVid ProtoSeg checkpoint (64 x 64 crops)."""
    ckpt = camvid_protoseg[0]
    model = load_model(PROTO_CFG, ckpt)
    dataset = build_split_dataset(model.cfg, 'train')
    gallery = build_gallery(model, dataset, PER_PROTOTYPE, NUM_IMAGES)
    return model, dataset, gallery


@torch.no_grad()
def brute_force(model, dataset, num_images):
    """Per (c, k): every labelled feature-grid cell whose nearest own-class prototype is k,
    as (cosine, image, grid y, grid x), from ``head.embed`` and ``head.prototypes``."""
    head = model.decode_head
    protos = head.prototypes
    c, k, _ = protos.shape
    filed = {(ci, ki): [] for ci in range(c) for ki in range(k)}
    for i in range(num_images):
        item = dataset[i]
        data = model.data_preprocessor(
            dict(inputs=[item['inputs']], data_samples=[item['data_samples']]), False)
        inputs = data['inputs']
        # No padding at test time here, so the feature grid covers exactly the image.
        assert tuple(inputs.shape[-2:]) == tuple(data['data_samples'][0].img_shape[:2])
        emb = head.embed(model.extract_feat(inputs))[0]  # (h, w, D)
        gt = item['data_samples'].gt_sem_seg.data.float()[None]
        lab = F.interpolate(gt, size=emb.shape[:2], mode='nearest')[0, 0].long()
        for gy, gx in zip(*torch.nonzero(lab < c, as_tuple=True)):
            cls = int(lab[gy, gx])
            sims = protos[cls] @ emb[gy, gx]
            filed[(cls, int(sims.argmax()))].append(
                (float(sims.max()), i, int(gy), int(gx)))
    return filed


def test_topn_keeps_the_best_n_and_never_grows():
    gen = torch.Generator().manual_seed(0)
    slots, n = 5, 3
    top = TopN(slots, n, width=2)
    offered = {s: [] for s in range(slots)}
    for step in range(6):  # several batches, each with more than N candidates per slot
        m = 40
        slot = torch.randint(0, slots - 1, (m,), generator=gen)  # the last slot gets none
        score = torch.rand(m, generator=gen)
        items = torch.stack([torch.full((m,), step), torch.arange(m)], dim=1)
        top.push(slot, score, items)
        assert top.scores.shape == (slots, n) and top.items.shape == (slots, n, 2)
        assert int(top.counts().max()) <= n
        for s, sc, it in zip(slot.tolist(), score.tolist(), items.tolist()):
            offered[s].append((sc, it))
    for s in range(slots):
        expected = sorted(offered[s], key=lambda t: -t[0])[:n]
        got = top.entries(s)
        assert [it for _, it in got] == [it for _, it in expected]
        assert [sc for sc, _ in got] == pytest.approx([sc for sc, _ in expected])
    assert top.entries(slots - 1) == []
    # Ties keep the earlier candidate.
    tie = TopN(1, 1, width=1)
    tie.push(torch.tensor([0, 0]), torch.tensor([0.5, 0.5]), torch.tensor([[1], [2]]))
    tie.push(torch.tensor([0]), torch.tensor([0.5]), torch.tensor([[3]]))
    assert tie.entries(0) == [(0.5, [1])]
    with pytest.raises(ValueError, match='n >= 1'):
        TopN(2, 0)


def test_topn_limit_takes_a_slots_best_candidates_of_one_push():
    top = TopN(2, 3, width=1)
    top.push(torch.tensor([0, 0, 0, 1]), torch.tensor([0.1, 0.9, 0.5, 0.2]),
             torch.tensor([[0], [1], [2], [3]]), limit=1)
    assert top.entries(0) == [(pytest.approx(0.9), [1])]
    top.push(torch.tensor([0, 0]), torch.tensor([0.3, 0.8]), torch.tensor([[4], [5]]), limit=1)
    assert [it for _, it in top.entries(0)] == [[1], [5]]
    assert [it for _, it in top.entries(1)] == [[3]]


def test_gallery_matches_brute_force(setup):
    model, dataset, gallery = setup
    filed = brute_force(model, dataset, NUM_IMAGES)
    head = model.decode_head
    c, k, _ = head.prototypes.shape
    assert gallery.counts.shape == (c, k) and gallery.per_prototype == PER_PROTOTYPE
    assert gallery.top.scores.shape == (c * k, PER_PROTOTYPE)  # bounded, whatever was seen
    over = 0
    for (ci, ki), cells in filed.items():
        assert int(gallery.counts[ci, ki]) == len(cells)
        entries = gallery.entries(ci, ki)
        assert len(entries) == min(PER_PROTOTYPE, len(cells))
        over += len(cells) > PER_PROTOTYPE
        sims = [e['similarity'] for e in entries]
        assert sims == sorted(sims, reverse=True)  # most similar first
        best = sorted((s for s, *_ in cells), reverse=True)[:PER_PROTOTYPE]
        assert sims == pytest.approx(best, abs=1e-5)
        if cells:
            mean = sum(s for s, *_ in cells) / len(cells)
            assert float(gallery.mean_similarity()[ci, ki]) == pytest.approx(mean, abs=1e-5)
        else:
            assert math.isnan(float(gallery.mean_similarity()[ci, ki]))
        keys = {(i, gy, gx) for _, i, gy, gx in cells}
        for e in entries:  # filed under the prototype that is its nearest
            assert (e['image'], e['grid_y'], e['grid_x']) in keys
    assert over > 0, 'no prototype had more than N pixels: the bound was not exercised'
    # The use shares are those of the prototype-health tool's rule.
    emb, labels = collect_embeddings(model, dataset, range(c), num_images=NUM_IMAGES,
                                     per_class=10**9)
    assert torch.equal(gallery.counts,
                       nearest_prototype_usage(emb, labels, head.prototypes.detach()))
    share = gallery.use_share()
    present = gallery.class_pixels() > 0
    assert torch.allclose(share[present].sum(dim=1), torch.ones(int(present.sum()),
                                                                dtype=share.dtype))


def test_gallery_per_image_limit(setup):
    model, dataset, _ = setup
    gallery = build_gallery(model, dataset, PER_PROTOTYPE, NUM_IMAGES, per_image=1)
    filed = brute_force(model, dataset, NUM_IMAGES)
    capped = 0
    for (ci, ki), cells in filed.items():
        best_of_image = {}
        for cell in sorted(cells, key=lambda t: -t[0]):
            best_of_image.setdefault(cell[1], cell)
        expected = sorted(best_of_image.values(), key=lambda t: -t[0])[:PER_PROTOTYPE]
        entries = gallery.entries(ci, ki)
        assert [e['image'] for e in entries] == [t[1] for t in expected]
        assert len({e['image'] for e in entries}) == len(entries)  # one pixel per image
        assert [e['similarity'] for e in entries] == pytest.approx(
            [t[0] for t in expected], abs=1e-5)
        capped += len({t[1] for t in cells}) < min(len(cells), PER_PROTOTYPE)
        assert int(gallery.counts[ci, ki]) == len(cells)  # use counts all pixels
    assert capped > 0, 'the per-image limit changed nothing: not exercised'


@torch.no_grad()
def test_gallery_pixels_are_their_nearest_prototypes_in_the_original_image(setup):
    model, dataset, gallery = setup
    head = model.decode_head
    c, k, _ = head.prototypes.shape
    for i in range(NUM_IMAGES):
        item = dataset[i]
        data = model.data_preprocessor(
            dict(inputs=[item['inputs']], data_samples=[item['data_samples']]), False)
        emb = head.embed(model.extract_feat(data['inputs']))[0]
        gt = item['data_samples'].gt_sem_seg.data[0]  # labels at the original size
        assert tuple(gt.shape) == tuple(item['data_samples'].ori_shape[:2])
        assert gallery.images[i]['path'] == item['data_samples'].img_path
        for ci in range(c):
            for ki in range(k):
                for e in gallery.entries(ci, ki):
                    if e['image'] != i:
                        continue
                    sims = head.prototypes[ci] @ emb[e['grid_y'], e['grid_x']]
                    assert int(sims.argmax()) == ki
                    assert float(sims.max()) == pytest.approx(e['similarity'], abs=1e-5)
                    assert int(gt[e['y'], e['x']]) == ci  # the position is a pixel of c


def test_near_duplicates():
    protos = F.normalize(torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1)),
                         dim=-1)
    protos[2, 3] = F.normalize(protos[0, 1] + 0.05 * protos[2, 3], dim=0)
    protos[1, 2] = protos[1, 0]
    pairs = near_duplicates(protos, 0.95)
    assert [(a, b, cc, d) for a, b, cc, d, _ in pairs] == [(0, 1, 2, 3), (1, 0, 1, 2)]
    assert pairs[1][4] == pytest.approx(1.0)
    assert near_duplicates(protos, 1.0) == []


def test_crop_marks_the_centre_and_pads_outside():
    img = np.full((20, 30, 3), 200, dtype=np.uint8)
    crop = crop_around(img, 0, 29, size=16)
    assert crop.shape == (16, 16, 3)
    assert (crop[0, 0] == 128).all()  # above/right of the image: grey
    assert (crop[12, 2] == 200).all()  # inside the image
    assert (crop[8, 8 - 3] == (255, 255, 0)).all() and (crop[8, 8 - 4] == 0).all()


class _PageParser(HTMLParser):
    """Prototype rows (class, prototype, pixels) and their crop srcs, in page order."""

    def __init__(self):
        super().__init__()
        self.rows, self.flags = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'tr' and 'prototype' in (a.get('class') or '').split():
            self.rows.append(dict(c=int(a['data-class']), k=int(a['data-prototype']),
                                  pixels=int(a['data-pixels']), crops=[]))
            self.flags.append('dead-row' in a['class'].split())
        elif tag == 'img' and 'crop' in (a.get('class') or '').split():
            self.rows[-1]['crops'].append(a['src'])


def test_json_page_and_crops_agree(setup, tmp_path):
    _, _, gallery = setup
    out = tmp_path / 'report'
    out.mkdir()
    saved = save_gallery(gallery, str(out), crop_size=32, duplicate_cosine=0.9,
                         meta=dict(split='train', checkpoint='x.pth', config='y.py'))
    data = load_gallery(str(out / 'gallery.json'))
    assert data['root'] == saved['root'] == str(out)
    assert data == saved
    c, k = gallery.num_classes, gallery.num_prototypes
    assert len(data['prototypes']) == c * k and data['num_images'] == NUM_IMAGES
    page = write_report_html(data, str(out))
    parser = _PageParser()
    parser.feed(open(page, encoding='utf-8').read())
    assert len(parser.rows) == c * k
    from PIL import Image
    for ci in range(c):
        rows = [r for r in parser.rows if r['c'] == ci]
        expected = report_rows(data, ci)
        assert [r['k'] for r in rows] == [r['prototype'] for r in expected]
        assert [r['pixels'] for r in rows] == sorted((r['pixels'] for r in rows),
                                                     reverse=True)  # sorted by use
        for row, rec in zip(rows, expected):
            assert row['crops'] == [e['crop'] for e in rec['top']]
            assert rec['pixels'] == int(gallery.counts[ci, rec['prototype']])
            assert rec['dead'] == (rec['pixels'] == 0)
            assert len(rec['top']) == min(PER_PROTOTYPE, rec['pixels'])
            for e, g in zip(rec['top'], gallery.entries(ci, rec['prototype'])):
                assert (e['image'], e['y'], e['x']) == (g['image'], g['y'], g['x'])
                with Image.open(out / e['crop']) as im:
                    assert im.size == (32, 32)
    assert parser.flags == [r['pixels'] == 0 for r in parser.rows]
    crops = sorted(p.name for p in (out / 'crops').iterdir())
    assert crops == sorted(osp.basename(e['crop']) for r in data['prototypes']
                           for e in r['top'])  # crops for the kept top-N only


def test_explain_pixel(setup, tmp_path):
    model, dataset, gallery = setup
    out = tmp_path / 'g'
    out.mkdir()
    data = save_gallery(gallery, str(out))
    path = dataset[0]['data_samples'].img_path
    y, x = 300, 100
    expl = explain_pixel(model, path, (y, x), str(out / 'gallery.json'), runners_up=2)
    # The prediction of MMSeg's own inference (which edits model.cfg: restore it).
    from mmseg.apis import inference_model
    cfg = copy.deepcopy(model.cfg)
    try:
        result = inference_model(model, path)
    finally:
        model.cfg = cfg
    assert expl.predicted.class_id == int(result.pred_sem_seg.data[0, y, x])
    scores = result.seg_logits.data[:, y, x]
    ranked = [expl.predicted] + expl.runners_up
    assert [e.class_id for e in ranked] == scores.argsort(descending=True)[:3].tolist()
    assert [e.score for e in ranked] == pytest.approx(
        scores.sort(descending=True).values[:3].tolist(), abs=1e-4)
    from mmseg_proto.visualization import prototype_similarity
    sims = prototype_similarity(model, path)[:, :, y, x]
    for e in ranked:
        assert e.prototype == int(sims[e.class_id].argmax())
        assert e.similarity == pytest.approx(float(sims[e.class_id].max()), abs=1e-5)
        rec = data['prototypes'][e.class_id * gallery.num_prototypes + e.prototype]
        assert [g['crop'] for g in e.gallery] == [str(out / t['crop']) for t in rec['top']]
        assert e.pixels == rec['pixels']
    assert expl.to_dict()['predicted']['class_id'] == expl.predicted.class_id
    with pytest.raises(ValueError, match=r'outside the 360x480 image'):
        explain_pixel(model, path, (360, 0), data)
    other = dict(data, prototype_fingerprint='0' * 16)
    with pytest.raises(ValueError, match='another checkpoint'):
        explain_pixel(model, path, (0, 0), other)
