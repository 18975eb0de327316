"""What a gallery (``gallery.json`` and its crops) may make the tools read and write: crop
paths stay inside the gallery's folder, a gallery with missing or mistyped entries gets a
message, and the pages' links are URL-escaped. On small hand-built galleries (no model)."""
import json
import os
import os.path as osp
import shutil
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmseg_proto.visualization.image_crops import write_png
from mmseg_proto.visualization.pixel_explanation import (ClassEvidence, PixelExplanation,
                                                         _gallery_pixels,
                                                         write_explanation_html)
from mmseg_proto.visualization.prototype_gallery import (ITEM_FIELDS, PrototypeGallery,
                                                         check_gallery, load_gallery,
                                                         resolve_crop, save_gallery)
from mmseg_proto.visualization.prototype_report_page import write_report_html
from mmseg_proto.visualization.prototypes import checked_dataset_meta
from mmseg_proto.visualization.top_n import TopN

H, W = 40, 50


def make_gallery(image_path, prototypes, per_prototype=2):
    """A gallery of one H x W image: every prototype keeps one pixel, 3 filed pixels each."""
    c, k, _ = prototypes.shape
    top = TopN(c * k, per_prototype, width=len(ITEM_FIELDS))
    slots = torch.arange(c * k)
    items = torch.stack([torch.zeros_like(slots), 5 + slots // k, 5 + slots % k,
                         slots // k, slots % k], dim=1)
    top.push(slots, torch.linspace(0.9, 0.5, c * k), items)
    counts = torch.full((c, k), 3, dtype=torch.long)
    return PrototypeGallery(
        classes=[f'class{j}' for j in range(c)], palette=[[10 * j, 0, 0] for j in range(c)],
        prototypes=F.normalize(prototypes.float(), dim=-1), counts=counts,
        similarity_sums=counts.double() * 0.7, top=top,
        images=[dict(path=image_path, height=H, width=W)])


@pytest.fixture
def gallery_dir(tmp_path):
    """A saved gallery of 3 classes x 2 prototypes: (its folder, the gallery)."""
    image = str(tmp_path / 'image.png')
    write_png(image, np.random.RandomState(0).randint(0, 255, (H, W, 3), dtype=np.uint8))
    gallery = make_gallery(image, torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0)))
    out = tmp_path / 'g'
    out.mkdir()
    save_gallery(gallery, str(out), crop_size=16)
    return out, gallery


def edit(folder, change):
    """Apply ``change`` to folder/gallery.json (in place) and return its path."""
    path = str(folder / 'gallery.json')
    data = json.load(open(path))
    change(data)
    with open(path, 'w') as f:
        json.dump(data, f)
    return path


def test_crop_paths_resolve_inside_the_gallery_folder(gallery_dir, tmp_path):
    out, _ = gallery_dir
    data = load_gallery(str(out))
    crop = data['prototypes'][0]['top'][0]['crop']
    assert resolve_crop(str(out), crop) == osp.realpath(str(out / crop))
    # A gallery reached through a link to its folder is fine: both sides are resolved.
    link = tmp_path / 'link'
    link.symlink_to(out, target_is_directory=True)
    assert load_gallery(str(link))['root'] == str(link)
    rows, _ = _gallery_pixels(load_gallery(str(link)), 0, 0)
    assert rows[0]['crop'] == osp.realpath(str(out / crop))

    outside = tmp_path / 'secret.png'
    shutil.copyfile(out / crop, outside)
    cases = {'../../../../etc/passwd': 'outside the gallery folder',
             '/etc/hostname': 'not a path relative to the gallery folder',
             '../secret.png': 'outside the gallery folder',
             'crops/../../secret.png': 'outside the gallery folder',
             7: 'must be a path relative to the gallery folder'}
    for bad, message in cases.items():
        path = edit(out, lambda d: d['prototypes'][1]['top'][0].update(crop=bad))
        with pytest.raises(ValueError, match=message) as err:
            load_gallery(path)
        assert "'prototypes'[1] 'top'[0] 'crop'" in str(err.value)
    # A crop file that is a link pointing out of the folder.
    path = edit(out, lambda d: d['prototypes'][1]['top'][0].update(crop=crop))
    target = out / crop
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ValueError, match='outside the gallery folder'):
        load_gallery(path)
    # A gallery dict that bypassed load_gallery is checked where crops are read.
    data = json.load(open(path))
    data['root'] = str(out)
    with pytest.raises(ValueError, match='outside the gallery folder'):
        _gallery_pixels(data, 0, 0)


def test_missing_crop_file_gets_a_message(gallery_dir):
    out, _ = gallery_dir
    data = load_gallery(str(out))
    os.remove(out / data['prototypes'][0]['top'][0]['crop'])
    with pytest.raises(ValueError, match='is missing from .*copy the whole report folder'):
        _gallery_pixels(data, 0, 0)


def _drop(key):
    return lambda d: d.pop(key)


@pytest.mark.parametrize('change,message', [
    (_drop('prototype_fingerprint'), "'prototype_fingerprint' is missing"),
    (_drop('prototypes'), "'prototypes' is missing"),
    (_drop('classes'), "'classes' is missing"),
    (lambda d: d['classes'].pop(), "'classes' has 2 entries, the gallery says 3"),
    (lambda d: d.update(num_classes='3'), "'num_classes' must be an integer"),
    (lambda d: d.update(num_prototypes=True), "'num_prototypes' must be an integer"),
    (lambda d: d['palette'].pop(), "'palette' has 2 entries"),
    (lambda d: d['palette'].__setitem__(0, [1, 2]), r"'palette'\[0\] must be \[R, G, B\]"),
    (lambda d: d['classes'].__setitem__(1, 4), "'classes' must be a list of class names"),
    (lambda d: d['health']['effective'].pop(), "'health' 'effective' has 2 entries"),
    (lambda d: d['health'].pop('cos_max'), "'health' 'cos_max' is missing"),
    (lambda d: d.update(images={}), "'images' must be a list"),
    (lambda d: d['prototypes'].pop(), "'prototypes' has 5 entries, the gallery says 6"),
    (lambda d: d['prototypes'][2].pop('top'), r"'prototypes'\[2\] 'top' is missing"),
    (lambda d: d['prototypes'][2].update(prototype=1), 'buffer order puts class 1 prototype 0'),
    (lambda d: d['prototypes'][3]['top'][0].update(image=1),
     r"'prototypes'\[3\] 'top'\[0\] 'image' must be an integer in \[0, 0\]"),
    (lambda d: d['prototypes'][3]['top'][0].update(y='5'), "'y' must be an integer"),
    (lambda d: d['prototypes'][3]['top'][0].update(similarity=None),
     "'similarity' must be a number"),
    (lambda d: d['prototypes'][0].update(duplicates=[dict(prototype=0)]),
     r"'duplicates'\[0\] 'class' is missing"),
    (lambda d: d['prototypes'][0].update(untrained='no'), "'untrained' must be true"),
    (lambda d: d['prototypes'].__setitem__(0, []), r"'prototypes'\[0\] must be a JSON object"),
])
def test_gallery_with_missing_or_mistyped_entries_gets_a_message(gallery_dir, change, message):
    out, _ = gallery_dir
    path = edit(out, change)
    with pytest.raises(ValueError, match=message) as err:
        load_gallery(path)
    assert 'rebuild the gallery' in str(err.value)


def test_report_page_checks_the_gallery_before_writing(gallery_dir):
    out, _ = gallery_dir
    data = load_gallery(str(out))
    del data['classes']
    with pytest.raises(ValueError, match="'classes' is missing"):
        write_report_html(data, str(out))
    assert not (out / 'index.html').exists()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == 'img':
            self.srcs.append(dict(attrs)['src'])


def _resolves(page, src):
    """The file a relative ``src`` of ``page`` loads (a browser's reading of the URL)."""
    url = urlparse(src)
    assert not (url.scheme or url.netloc or url.query or url.fragment), src
    return osp.join(osp.dirname(page), unquote(url.path))


def test_report_page_links_are_url_escaped(gallery_dir):
    out, _ = gallery_dir
    data = load_gallery(str(out))
    crop = data['prototypes'][0]['top'][0]['crop']
    os.rename(out / crop, out / 'crops' / 'a #1?.png')
    path = edit(out, lambda d: d['prototypes'][0]['top'][0].update(crop='crops/a #1?.png'))
    page = write_report_html(load_gallery(path), str(out))
    links = _Links()
    links.feed(open(page, encoding='utf-8').read())
    assert 'crops/a%20%231%3F.png' in links.srcs
    for src in links.srcs:
        assert osp.isfile(_resolves(page, src)), src


@pytest.mark.parametrize('stem', ['why #1', 'why?2', 'a%20b'])
def test_explanation_page_links_are_url_escaped(gallery_dir, tmp_path, stem):
    out, _ = gallery_dir
    data = load_gallery(str(out))
    rows, record = _gallery_pixels(data, 1, 0)
    ev = ClassEvidence(class_id=1, class_name='class1', score=1.0, prototype=0,
                       similarity=0.5, gallery=rows, pixels=record['pixels'])
    expl = PixelExplanation(image=None, pixel=(3, 4), image_shape=(H, W), predicted=ev,
                            runners_up=[])
    folder = tmp_path / 'pages'
    folder.mkdir()
    page = write_explanation_html(expl, str(folder / f'{stem}.html'),
                                  image=np.zeros((H, W, 3), np.uint8), crop_size=16)
    links = _Links()
    links.feed(open(page, encoding='utf-8').read())
    assert len(links.srcs) == 2 + len(rows)
    for src in links.srcs:
        assert osp.isfile(_resolves(page, src)), src
        assert osp.dirname(_resolves(page, src)) == str(folder / f'{stem}_files')


def _near_duplicate_prototypes():
    """(4, 4, 16) prototypes: class 0's four are identical (6 pairs); #0 of classes 1, 2, 3
    is at cosine 0.96, 0.975, 0.97 to them (to each other below 0.95); the rest orthogonal
    to everything. Buffer order (class 1, 2, 3) is not the order by cosine."""
    e = torch.eye(16)
    p = torch.zeros(4, 4, 16)
    p[0] = e[0]
    for c, cos in zip((1, 2, 3), (0.96, 0.975, 0.97)):
        p[c, 0] = cos * e[0] + (1 - cos ** 2) ** 0.5 * e[c]
        for j in (1, 2, 3):
            p[c, j] = e[3 + 3 * (c - 1) + j]
    return p


def test_near_duplicates_most_similar_first_and_counted_per_prototype(tmp_path):
    image = str(tmp_path / 'image.png')
    write_png(image, np.zeros((H, W, 3), np.uint8))
    protos = _near_duplicate_prototypes()
    gallery = make_gallery(image, protos)
    out = tmp_path / 'g'
    out.mkdir()
    data = save_gallery(gallery, str(out), crop_size=16, duplicate_cosine=0.95)
    # Independent expectation: the cosines of the unit vectors above, sorted by hand.
    normed = F.normalize(protos.double(), dim=-1)
    first = data['prototypes'][0]['duplicates']
    cosines = [d['cosine'] for d in first]
    assert [(d['class'], d['prototype']) for d in first] == [
        (0, 1), (0, 2), (0, 3), (2, 0), (3, 0), (1, 0)]
    assert cosines == pytest.approx([1, 1, 1, 0.975, 0.97, 0.96], abs=1e-6)
    for rec in data['prototypes']:
        got = [d['cosine'] for d in rec['duplicates']]
        assert got == sorted(got, reverse=True)
        for d in rec['duplicates']:
            assert d['cosine'] == pytest.approx(float(
                normed[rec['class'], rec['prototype']] @ normed[d['class'], d['prototype']]),
                abs=1e-6)
    page = write_report_html(data, str(out))
    text = open(page, encoding='utf-8').read()

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.health, self.flags, self.cell, self.row = {}, {}, None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == 'tr' and 'class-health' in (a.get('class') or ''):
                self.row = ('health', int(a['data-class']))
            elif tag == 'tr' and 'prototype' in (a.get('class') or '').split():
                self.row = ('proto', (int(a['data-class']), int(a['data-prototype'])))
                self.flags[self.row[1]] = []
            elif tag == 'td' and 'dup-count' in (a.get('class') or ''):
                self.cell = 'dup'
            elif (tag == 'span' and 'dup' in (a.get('class') or '').split()
                  and self.row and self.row[0] == 'proto'):
                self.cell = 'flag'

        def handle_data(self, text):
            if self.cell == 'dup':
                self.health[self.row[1]] = int(text)
            elif self.cell == 'flag':
                self.flags[self.row[1]].append(text)
            self.cell = None

    parsed = Page()
    parsed.feed(text)
    # Per class, the prototypes with a near-duplicate: 4 in class 0 (6 pairs among them,
    # 3 more with other classes), 1 in each other class.
    assert parsed.health == {0: 4, 1: 1, 2: 1, 3: 1}
    assert parsed.flags[(0, 0)] == [
        'near-duplicate of class0 #1 (1.000)', 'near-duplicate of class0 #2 (1.000)',
        'near-duplicate of class0 #3 (1.000)', 'near-duplicate of class2 #0 (0.975)',
        'near-duplicate of class3 #0 (0.970)', 'near-duplicate of class1 #0 (0.960)']


def test_checked_dataset_meta_repairs_names_and_palette_with_a_warning():
    with pytest.warns(UserWarning, match='not all strings'):
        names, palette = checked_dataset_meta(
            dict(classes=[0, 1, 'sky'], palette=[[1, 2, 3]] * 3), 3)
    assert names == ['0', '1', 'sky'] and palette == [[1, 2, 3]] * 3
    for bad in ([[1, 2, 3]], [[1, 2, 3]] * 4, [[1, 2]] * 3, [[0, 0, 256]] * 3, 'red'):
        with pytest.warns(UserWarning, match='generated palette'):
            names, palette = checked_dataset_meta(dict(classes=['a', 'b', 'c'],
                                                       palette=bad), 3)
        assert len(palette) == 3 and all(len(p) == 3 and all(0 <= v <= 255 for v in p)
                                         for p in palette)
    with pytest.raises(ValueError, match='not a list of 3 names'):
        checked_dataset_meta(dict(classes=['a', 'b'], palette=[[1, 2, 3]] * 2), 3)
    with pytest.raises(ValueError, match='not a list of 3 names'):
        checked_dataset_meta(dict(classes='abc'), 3)


def test_save_gallery_repairs_meta_before_writing(tmp_path):
    image = str(tmp_path / 'image.png')
    write_png(image, np.zeros((H, W, 3), np.uint8))
    gallery = make_gallery(image, torch.randn(3, 2, 8))
    gallery.classes, gallery.palette = [0, 1, 2], [[1, 2, 3]]
    out = tmp_path / 'g'
    out.mkdir()
    with pytest.warns(UserWarning):
        data = save_gallery(gallery, str(out), crop_size=16)
    assert data['classes'] == ['0', '1', '2'] and len(data['palette']) == 3
    check_gallery(data)
    write_report_html(data, str(out))
