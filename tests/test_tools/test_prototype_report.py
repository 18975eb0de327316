"""tools/analysis_tools/prototype_report.py and explain_pixel.py on the small CamVid model,
and the report page as headless Chromium shows it (skipped where Chromium is absent;
``bash tools/dev/check_report_browser.sh`` installs Debian's chromium and runs it)."""
import glob
import importlib.util
import json
import os
import os.path as osp
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import BASELINE_CFG, CAMVID_MINI, PROTO_CFG, REPO, without_validation

NUM_IMAGES = 3
PER_PROTOTYPE = 2
VAL_IMG = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))[0]
# Filled by the page on load: every <img> (src, naturalWidth/Height, rendered size) and every
# prototype row (data attributes, crop srcs). Injected into a copy of the page next to it.
CHECK_SCRIPT = """<pre id="browser-check" hidden></pre><script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (im) {
    return {src: im.getAttribute('src'), w: im.naturalWidth, h: im.naturalHeight,
            shown: im.getBoundingClientRect().width};
  });
  var rows = Array.prototype.map.call(document.querySelectorAll('tr.prototype'), function (r) {
    return {c: +r.dataset.class, k: +r.dataset.prototype,
            crops: Array.prototype.map.call(r.querySelectorAll('img.crop'),
                                            function (im) { return im.getAttribute('src'); })};
  });
  document.getElementById('browser-check').textContent =
      JSON.stringify({images: imgs, rows: rows});
});
</script>"""


def _tool(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, 'tools', 'analysis_tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_recording_prototypes(work_dir, iters=2, crop=64, seed=1):
    """conftest.train_camvid_protoseg (``iters`` iterations on ``crop`` x ``crop`` crops, no
    validation),
    seeded ``seed``; returns (checkpoint, the prototypes the runner initialised, the trained
    prototypes)."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(PROTO_CFG)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = iters
    without_validation(cfg)
    cfg.default_hooks.checkpoint.interval = iters
    cfg.default_hooks.logger.interval = iters
    cfg.model.data_preprocessor.size = (crop, crop)
    cfg.train_dataloader.batch_size = 1
    for t in cfg.train_dataloader.dataset.pipeline:
        if t['type'] == 'RandomCrop':
            t['crop_size'] = (crop, crop)
    cfg.randomness = dict(seed=seed)
    runner = Runner.from_cfg(cfg)
    initial = runner.model.decode_head.prototypes.detach().clone()
    runner.train()
    return (osp.join(str(work_dir), f'iter_{iters}.pth'), initial,
            runner.model.decode_head.prototypes.detach().clone())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(ProtoSeg checkpoint of 2 iterations, its initial and its trained prototypes)."""
    return train_recording_prototypes(tmp_path_factory.mktemp('train'))


@pytest.fixture(scope='module')
def models(trained, tmp_path_factory):
    """(ProtoSeg checkpoint of 2 iterations, untrained parametric baseline checkpoint)."""
    root = tmp_path_factory.mktemp('report')
    from mmseg.apis import init_model
    base = init_model(BASELINE_CFG, None, device='cpu')
    torch.save({'state_dict': base.state_dict()}, root / 'base.pth')
    return trained[0], str(root / 'base.pth')


@pytest.fixture(scope='module')
def report(models, tmp_path_factory):
    """The report tool's output folder and returned gallery (3 train images, N = 2)."""
    out = tmp_path_factory.mktemp('out') / 'report'
    data = _tool('prototype_report').main(
        [PROTO_CFG, models[0], '--out', str(out), '--num-images', str(NUM_IMAGES),
         '--per-prototype', str(PER_PROTOTYPE), '--crop-size', '48'])
    return out, data


def chromium():
    """The Chromium executable ($CHROMIUM, /usr/bin/chromium or chromium on PATH)."""
    for exe in (os.environ.get('CHROMIUM'), '/usr/bin/chromium', shutil.which('chromium'),
                shutil.which('chromium-browser')):
        if exe and osp.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    fail = pytest.fail if os.environ.get('PROTO_REPORT_REQUIRE_BROWSER') else pytest.skip
    fail('headless Chromium not found (/usr/bin/chromium or chromium on PATH; set '
                '$CHROMIUM): install Debian\'s chromium package, e.g. with '
                'bash tools/dev/check_report_browser.sh, which then runs this check')


def run_chromium(exe, args, profile):
    cmd = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
           '--no-first-run', f'--user-data-dir={profile}', *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def browser_check(exe, page, profile):
    """Open a copy of ``page`` (same folder) with CHECK_SCRIPT from disk; its result."""
    html = open(page, encoding='utf-8').read()
    check = osp.join(osp.dirname(page), '_browser_check.html')
    with open(check, 'w', encoding='utf-8') as f:
        f.write(html.replace('</body>', CHECK_SCRIPT + '</body>'))
    try:
        dom = run_chromium(exe, ['--virtual-time-budget=10000', '--dump-dom',
                                 'file://' + check], profile)
    finally:
        os.remove(check)

    class Grab(HTMLParser):
        text, inside = None, False

        def handle_starttag(self, tag, attrs):
            self.inside = dict(attrs).get('id') == 'browser-check'

        def handle_data(self, data):
            if self.inside:
                self.text = (self.text or '') + data

        def handle_endtag(self, tag):
            self.inside = False

    grab = Grab()
    grab.feed(dom)
    assert grab.text, 'the page did not run its load handler: ' + dom[-2000:]
    return json.loads(grab.text)


def test_report_tool_outputs(report, capsys):
    out, data = report
    assert json.load(open(out / 'gallery.json')) == {k: v for k, v in data.items()
                                                     if k != 'root'}
    assert data['root'] == str(out)
    assert (out / 'index.html').is_file()
    assert data['split'] == 'train' and data['pipeline'] == 'test'
    assert data['num_images'] == NUM_IMAGES and data['per_prototype'] == PER_PROTOTYPE
    assert len(data['prototypes']) == data['num_classes'] * data['num_prototypes']
    for rec in data['prototypes']:
        sims = [e['similarity'] for e in rec['top']]
        assert sims == sorted(sims, reverse=True)
        assert len(rec['top']) == min(PER_PROTOTYPE, rec['pixels'])
        assert rec['dead'] == (rec['pixels'] == 0)
        for e in rec['top']:
            assert (out / e['crop']).is_file()
    assert sum(r['pixels'] for r in data['prototypes']) == sum(data['class_pixels']) > 0
    # The images are CamVid train images, in dataset order.
    assert [osp.basename(i['path']) for i in data['images']] == sorted(
        os.listdir(osp.join(CAMVID_MINI, 'img_dir', 'train')))[:NUM_IMAGES]


def test_report_in_headless_chromium(report, tmp_path):
    exe = chromium()
    out, data = report
    result = browser_check(exe, str(out / 'index.html'), str(tmp_path / 'profile'))
    images = result['images']
    crops = [e['crop'] for r in data['prototypes'] for e in r['top']]
    assert len(images) == len(crops) > 0
    broken = [im['src'] for im in images if im['w'] <= 0]
    assert not broken, f'images that did not load: {broken[:5]}'
    assert all(im['w'] == im['h'] == data['crop_size'] and im['shown'] > 0 for im in images)
    rows = {(r['c'], r['k']): r['crops'] for r in result['rows']}
    assert len(result['rows']) == len(rows) == len(data['prototypes'])
    for rec in data['prototypes']:
        assert rows[(rec['class'], rec['prototype'])] == [e['crop'] for e in rec['top']]
    shot = tmp_path / 'report.png'
    run_chromium(exe, [f'--screenshot={shot}', '--window-size=1200,900',
                       'file://' + str(out / 'index.html')], str(tmp_path / 'profile'))
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1200, 900)
        assert float(np.asarray(im.convert('L')).std()) > 10, 'blank screenshot'
    keep = os.environ.get('PROTO_REPORT_SCREENSHOT')
    if keep:
        shutil.copyfile(shot, keep)


def test_report_tool_refuses_bad_arguments(models, tmp_path, capsys):
    ckpt, base = models
    tool = _tool('prototype_report')
    out = str(tmp_path / 'never')

    def refused(args, message):
        with pytest.raises(SystemExit) as exc:
            tool.main(args)
        text = str(exc.value.code) + capsys.readouterr().err
        assert message in text, text
        assert not osp.exists(out)

    refused([PROTO_CFG, ckpt, '--out', out, '--per-prototype', '0'],
            'argument --per-prototype: got 0, must be >= 1')
    refused([PROTO_CFG, ckpt, '--out', out, '--num-images', '0'],
            'argument --num-images: got 0, must be >= 1')
    refused([PROTO_CFG, ckpt, '--out', out, '--per-image', '-1'],
            'argument --per-image: got -1, must be >= 0')
    refused([PROTO_CFG, ckpt, '--out', out, '--duplicate-cosine', '1.5'],
            'a cosine must be in [-1, 1]')
    refused([PROTO_CFG, ckpt + '.missing', '--out', out], 'no such checkpoint file')
    afile = tmp_path / 'afile.txt'
    afile.write_text('x')
    refused([PROTO_CFG, ckpt, '--out', str(afile)], 'is a file; give a folder')
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.txt').write_text('x')
    refused([PROTO_CFG, ckpt, '--out', str(other)], 'give a new or empty folder')
    refused([BASELINE_CFG, base, '--out', out], 'not a ProtoHead')
    refused([PROTO_CFG, base, '--out', out], 'does not fit the model')


def test_explain_pixel_tool(models, report, tmp_path):
    ckpt, _ = models
    out, data = report
    tool = _tool('explain_pixel')
    png = tmp_path / 'why.png'
    expl = tool.main([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '200', '300', '--gallery',
                      str(out / 'gallery.json'), '--out', str(png), '--dpi', '40'])
    assert expl.pixel == (200, 300) and len(expl.runners_up) == 2
    k = data['num_prototypes']
    for ev in [expl.predicted] + expl.runners_up:
        rec = data['prototypes'][ev.class_id * k + ev.prototype]
        assert [e['crop'] for e in ev.gallery] == [str(out / t['crop']) for t in rec['top']]
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    w, h, _ = tool.figure_size(PER_PROTOTYPE, 3, 360 / 480)
    assert abs(img.shape[1] - w * 40) <= 1 and abs(img.shape[0] - h * 40) <= 1
    assert float(np.std(img[..., :3])) > 0.05
    page = tmp_path / 'why.html'
    tool.main([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '200', '300', '--gallery',
               str(out / 'gallery.json'), '--out', str(page), '--runners-up', '1'])
    text = page.read_text()
    assert f'Pixel (y 200, x 300): {expl.predicted.class_name}' in text
    assert text.count('class="evidence"') == 2
    files = os.listdir(tmp_path / 'why_files')
    assert 'image.png' in files and 'query.png' in files
    assert len(files) == 2 + len(expl.predicted.gallery) + len(
        expl.runners_up[0].gallery)
    if os.environ.get('PROTO_REPORT_REQUIRE_BROWSER') or shutil.which('chromium') or \
            osp.isfile('/usr/bin/chromium'):
        result = browser_check(chromium(), str(page), str(tmp_path / 'profile'))
        assert result['images'] and all(im['w'] > 0 for im in result['images'])


def test_explain_pixel_tool_refuses_bad_arguments(models, report, tmp_path, capsys):
    ckpt, base = models
    out, data = report
    tool = _tool('explain_pixel')
    gallery = str(out / 'gallery.json')
    png = str(tmp_path / 'never.png')

    def refused(args, message):
        with pytest.raises(SystemExit) as exc:
            tool.main(args)
        text = str(exc.value.code) + capsys.readouterr().err
        assert message in text, text
        assert not osp.exists(png)

    refused([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '360', '10', '--gallery', gallery,
             '--out', png], 'outside the 360x480 image (H x W): y must be in [0, 359]')
    refused([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '0', '-1', '--gallery', gallery,
             '--out', png], 'x in [0, 479]')
    refused([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '0', '480', '--gallery', gallery,
             '--out', png], 'outside the 360x480 image (H x W): y must be in [0, 359] and x '
            'in [0, 479]')
    refused([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '0', '0', '--gallery', gallery,
             '--out', str(tmp_path / 'x.jpg')], 'give a .png (figure) or .html (page)')
    refused([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '0', '0', '--gallery',
             str(tmp_path / 'nope.json'), '--out', png], 'no such gallery file')
    refused([BASELINE_CFG, base, VAL_IMG, '--pixel', '0', '0', '--gallery', gallery,
             '--out', png], 'not a ProtoHead')
    # A gallery of another checkpoint: its prototypes differ.
    other = json.load(open(gallery))
    other['prototype_fingerprint'] = '0' * 16
    with tempfile.TemporaryDirectory() as d:
        path = osp.join(d, 'gallery.json')
        json.dump(other, open(path, 'w'))
        refused([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '0', '0', '--gallery', path,
                 '--out', png], 'built from another checkpoint')


def test_report_flags_prototypes_training_never_updated(trained, report):
    """A class absent from the 2 training crops (or never classified right there) keeps its
    random prototypes: the report flags them and gives the class no health figures, while
    its pixels in the report's images are still filed under them (the issue's case)."""
    _, initial, final = trained
    out, data = report
    # Independent expectation: what the training run itself did to each prototype.
    expected = (final == initial).all(dim=-1)
    assert expected.any() and not expected.all()
    assert [r['untrained'] for r in data['prototypes']] == expected.flatten().tolist()
    assert 'seed 1' in data['untrained_check']
    never = [c for c in range(data['num_classes']) if bool(expected[c].all())]
    assert data['untrained_classes'] == never
    held_out = [c for c in never if data['class_pixels'][c] > 0]
    assert held_out, 'no class with pixels that training never updated: change the seed'
    for c in range(data['num_classes']):
        figures = [data['health'][key][c] for key in ('effective', 'exp_entropy')]
        if c in never:
            assert figures == [None, None]
        elif data['class_pixels'][c]:
            assert None not in figures
    page = (out / 'index.html').read_text()
    assert page.count('class="note untrained-class"') == len(never)
    assert page.count('class="flag dead untrained"') == int(expected.sum())


def test_report_with_per_image_above_per_prototype(models, report, tmp_path):
    """--per-image larger than --per-prototype never binds: the gallery is the unlimited
    one of the ``report`` fixture (same checkpoint, images and N)."""
    out, data = report
    got = _tool('prototype_report').main(
        [PROTO_CFG, models[0], '--out', str(tmp_path / 'r'), '--num-images', str(NUM_IMAGES),
         '--per-prototype', str(PER_PROTOTYPE), '--per-image', str(PER_PROTOTYPE + 3),
         '--crop-size', '48', '--no-progress'])
    assert got['per_image'] == PER_PROTOTYPE + 3
    assert [r['top'] for r in got['prototypes']] == [r['top'] for r in data['prototypes']]
    assert any(len(r['top']) == PER_PROTOTYPE for r in got['prototypes'])


def test_report_repairs_integer_class_names_and_a_short_palette(models, tmp_path):
    """A checkpoint whose meta has integer class names and a short palette: the tool warns
    and uses str() names and a generated palette, before it writes anything."""
    ckpt = torch.load(models[0], map_location='cpu', weights_only=False)
    c = len(ckpt['meta']['dataset_meta']['classes'])
    ckpt['meta']['dataset_meta'] = dict(classes=list(range(c)), palette=[[1, 2, 3]])
    path = str(tmp_path / 'int_names.pth')
    torch.save(ckpt, path)
    with pytest.warns(UserWarning) as caught:
        data = _tool('prototype_report').main(
            [PROTO_CFG, path, '--out', str(tmp_path / 'r'), '--num-images', '1',
             '--per-prototype', '1', '--crop-size', '16', '--no-progress'])
    text = ' '.join(str(w.message) for w in caught)
    assert 'not all strings' in text and 'generated palette' in text
    assert data['classes'] == [str(j) for j in range(c)]
    assert len(data['palette']) == c and len({tuple(p) for p in data['palette']}) > 1
    assert (tmp_path / 'r' / 'index.html').is_file()


def _rotated_jpeg(path):
    """VAL_IMG (360 x 480) stored as is, with EXIF orientation 6 (shown rotated 90 degrees
    clockwise, 480 x 360), as phones write them."""
    from PIL import Image
    with Image.open(VAL_IMG) as img:
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, quality=95, exif=exif)
    return str(path)


def test_explain_pixel_on_an_exif_rotated_jpeg(models, report, tmp_path, capsys):
    """The pixel is checked against the image the model sees (rotated); the prediction at
    a pixel valid only in the rotated image is MMSeg's own inference there."""
    ckpt, _ = models
    out, _ = report
    image = _rotated_jpeg(tmp_path / 'phone.jpg')
    tool = _tool('explain_pixel')
    gallery = str(out / 'gallery.json')
    png = tmp_path / 'why.png'
    expl = tool.main([PROTO_CFG, ckpt, image, '--pixel', '400', '10', '--gallery', gallery,
                      '--out', str(png), '--dpi', '30'])
    assert expl.image_shape == (480, 360) and png.is_file()
    from mmseg.apis import inference_model
    from mmseg_proto.visualization import load_model
    model = load_model(PROTO_CFG, ckpt)
    result = inference_model(model, image)
    assert tuple(result.pred_sem_seg.data.shape[-2:]) == (480, 360)
    assert expl.predicted.class_id == int(result.pred_sem_seg.data[0, 400, 10])
    with pytest.raises(SystemExit) as exc:
        tool.main([PROTO_CFG, ckpt, image, '--pixel', '10', '400', '--gallery', gallery,
                   '--out', str(tmp_path / 'never.png')])
    text = str(exc.value.code) + capsys.readouterr().err
    assert 'outside the 480x360 image (H x W)' in text and 'x in [0, 359]' in text
    from mmseg_proto.visualization.pixel_explanation import explain_pixel
    with pytest.raises(ValueError, match=r'x in \[0, 359\]'):
        explain_pixel(model, image, (10, 400), gallery)


def test_explain_pixel_refuses_galleries_that_read_outside_their_folder(models, report,
                                                                        tmp_path, capsys):
    """A received or hand-edited gallery.json never makes explain_pixel copy a file from
    outside the gallery's folder into its output, and a broken one gets a message."""
    ckpt, _ = models
    out, data = report
    tool = _tool('explain_pixel')
    folder = tmp_path / 'received'
    shutil.copytree(out, folder)
    original = json.load(open(out / 'gallery.json'))
    secret = tmp_path / 'secret.png'
    shutil.copyfile(VAL_IMG, secret)

    def run_with(change, message):
        gallery = json.loads(json.dumps(original))
        change(gallery)
        with open(folder / 'gallery.json', 'w') as f:
            json.dump(gallery, f)
        page = tmp_path / 'share' / 'why.html'
        with pytest.raises(SystemExit) as exc:
            tool.main([PROTO_CFG, ckpt, VAL_IMG, '--pixel', '200', '300', '--gallery',
                       str(folder / 'gallery.json'), '--out', str(page)])
        text = str(exc.value.code) + capsys.readouterr().err
        assert message in text, text
        assert 'Traceback' not in text
        assert not (tmp_path / 'share' / 'why_files').exists()

    def every_crop(crop):
        def change(g):
            for rec in g['prototypes']:
                for e in rec['top']:
                    e['crop'] = crop
        return change

    run_with(every_crop('../../../../etc/passwd'), 'outside the gallery folder')
    run_with(every_crop('/etc/hostname'), 'not a path relative to the gallery folder')
    link = folder / 'crops' / 'link.png'
    link.symlink_to(secret)
    run_with(every_crop('crops/link.png'), 'outside the gallery folder')
    run_with(lambda g: g.pop('prototype_fingerprint'), "'prototype_fingerprint' is missing")
    run_with(lambda g: g.update(classes=g['classes'][:1]),
             f"'classes' has 1 entries, the gallery says {data['num_classes']}")

    def fewer_classes(g):  # a consistent gallery of one class less than the model
        c, k = g['num_classes'] - 1, g['num_prototypes']
        g.update(num_classes=c, classes=g['classes'][:c], palette=g['palette'][:c],
                 class_pixels=g['class_pixels'][:c], prototypes=g['prototypes'][:c * k],
                 health={key: v[:c] for key, v in g['health'].items()})

    run_with(fewer_classes, f"The gallery has {data['num_classes'] - 1} classes x")
