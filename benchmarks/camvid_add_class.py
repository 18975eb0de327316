"""Adding a class to a trained model from a few labelled images: CamVid, generalized
few-shot segmentation protocol (GFS-Seg, CVPR 2022; DIaM and POP, CVPR 2023).

For each held-out class (``--held-out``) and head (ProtoSeg, parametric SegFormer), the base
model is trained with that class's pixels ignored (``IgnoreClasses``; the ``protoseg
no-CLASS`` / ``parametric no-CLASS`` runs of ``camvid_benchmark.py``, same backbone, decoder,
data, schedule and seed as the oracle of ``benchmarks/results/camvid_4000``), then its
never-trained slot for the class is dropped (a 10-class model) and the class is added back
with :func:`mmseg_proto.apis.add_classes` from 1, 5 or 10 support images of the train
split, drawn ``--draws`` times with fixed seeds among the images that hold at least
``--min-pixels`` pixels of the class (binary masks of the class). Every added model is
evaluated on all of val with the 11 classes at once: novel-class IoU, base-class mIoU (the
other 10) and its change from the base model, their harmonic mean, all-class mIoU.

Rows: ProtoSeg with K clustered prototypes, ProtoSeg with one mean prototype, parametric
imprinting, each with the calibrated offset (the package's default) and with the plain one
(the mean of the trained classes' offsets: plain imprinting).

The val pass is the model's own: features at the decoder's resolution are computed once per
base model; each added model's head turns them into logits, and MMSeg's own
``predict_by_feat`` and ``postprocess_result`` resize them to the label size.

    python benchmarks/camvid_add_class.py --data-root ../shared/data/camvid --iters 4000 \
        --held-out car pedestrian bicyclist sidewalk --out benchmarks/results/camvid_add_class

Resumable: each base run keeps its ``record.json`` (and, while it trains, a checkpoint every
500 iterations); each evaluated base model keeps ``add_class.json`` beside it.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

import numpy as np

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'benchmarks'))
from camvid_benchmark import CLASSES, read_record, run_dir, write_json  # noqa: E402

BENCH = osp.join(REPO, 'benchmarks', 'camvid_benchmark.py')
HEADS = ('protoseg', 'parametric')
# The figure shows this row's first draw at this shot count.
FIGURE_ROW = dict(protoseg='ProtoSeg, K prototypes, held-out offset',
                  parametric='parametric, imprinting, held-out bias')
FIGURE_SHOTS = 5
# add_classes(num_prototypes=HEAD_K): the head's own K (the add_classes default is 1).
HEAD_K = 'head'
# row name -> (head, add_classes options)
ROWS = {
    # The package's default offset: calibrated on the support pixels (in-sample).
    'ProtoSeg, K prototypes': ('protoseg', dict(num_prototypes=HEAD_K)),
    'ProtoSeg, one mean prototype': ('protoseg', dict(num_prototypes=1)),
    'parametric, imprinting': ('parametric', dict()),
    # Each support image scored by the class placed from the other images only.
    'ProtoSeg, K prototypes, held-out offset': (
        'protoseg', dict(num_prototypes=HEAD_K, held_out_calibration=True)),
    'ProtoSeg, one mean prototype, held-out offset': (
        'protoseg', dict(num_prototypes=1, held_out_calibration=True)),
    'parametric, imprinting, held-out bias': ('parametric', dict(held_out_calibration=True)),
    # The plain offset: the mean of the trained classes' (plain imprinting).
    'ProtoSeg, K prototypes, plain offset': ('protoseg',
                                             dict(num_prototypes=HEAD_K, calibrate=False)),
    'ProtoSeg, one mean prototype, plain offset': ('protoseg',
                                                   dict(num_prototypes=1, calibrate=False)),
    'parametric, imprinting, plain bias': ('parametric', dict(calibrate=False)),
    # The same small refinement budget for both heads: 50 Adam steps (lr 0.01) on the new
    # class's own parameters over the support images (after the held-out offset).
    'ProtoSeg, K prototypes, held-out offset, refined': (
        'protoseg', dict(num_prototypes=HEAD_K, held_out_calibration=True, refine_steps=50)),
    'ProtoSeg, one mean prototype, held-out offset, refined': (
        'protoseg', dict(num_prototypes=1, held_out_calibration=True, refine_steps=50)),
    'parametric, imprinting, held-out bias, refined': (
        'parametric', dict(held_out_calibration=True, refine_steps=50)),
}


def support_pool(data_root: str, held: int, min_pixels: int) -> list:
    """Train images holding at least ``min_pixels`` pixels of class ``held`` (sorted)."""
    import mmcv
    pool = []
    for ann in sorted(glob.glob(osp.join(data_root, 'ann_dir', 'train', '*.png'))):
        if int((mmcv.imread(ann, flag='unchanged') == held).sum()) >= min_pixels:
            img = osp.join(data_root, 'img_dir', 'train',
                           osp.basename(ann)[:-4] + '.jpg')
            pool.append((img, ann))
    return pool


def draw(pool: list, shots: int, held: int, draw_index: int) -> list:
    """The ``draw_index``-th draw of ``shots`` support pairs: the same for both heads."""
    rng = np.random.default_rng(10_000 * held + 100 * shots + draw_index)
    return [pool[i] for i in sorted(rng.choice(len(pool), size=shots, replace=False))]


def drop_class(model, index: int):
    """The model without class ``index`` (its never-trained slot): a base model of C - 1
    classes, the others in their order."""
    import torch
    import torch.nn as nn
    head = model.decode_head
    keep = [c for c in range(head.num_classes) if c != index]
    with torch.no_grad():
        if hasattr(head, 'prototypes'):
            head.bank.prototypes = head.prototypes[keep].clone()
            norm = nn.LayerNorm(len(keep)).to(head.mask_norm.weight)
            norm.weight.copy_(head.mask_norm.weight[keep])
            norm.bias.copy_(head.mask_norm.bias[keep])
            head.mask_norm = norm
        else:
            old = head.conv_seg
            conv = nn.Conv2d(old.in_channels, len(keep), 1).to(old.weight)
            conv.weight.copy_(old.weight[keep])
            conv.bias.copy_(old.bias[keep])
            head.conv_seg, head.out_channels = conv, len(keep)
    head.num_classes = model.num_classes = model.out_channels = len(keep)
    model.cfg.model.decode_head.num_classes = len(keep)
    meta = dict(model.dataset_meta)
    meta['classes'] = tuple(meta['classes'][c] for c in keep)
    meta['palette'] = [meta['palette'][c] for c in keep]
    model.dataset_meta = meta
    return model


class ValCache:
    """Each val image's features at the decoder's resolution under the base model, its
    metas and its label map (classes renumbered: the held-out class last)."""

    def __init__(self, model, adapter, data_root: str, held: int) -> None:
        import mmcv
        import torch
        from mmcv.transforms import Compose
        pipeline = Compose([dict(t) for t in model.cfg.test_pipeline
                            if t['type'] != 'LoadAnnotations'])
        remap = np.full(256, 255, np.uint8)
        order = [c for c in range(len(CLASSES)) if c != held] + [held]
        remap[order] = np.arange(len(CLASSES))
        self.items = []
        self.images = sorted(glob.glob(osp.join(data_root, 'img_dir', 'val', '*.jpg')))
        for img in self.images:
            ann = img.replace('img_dir', 'ann_dir')[:-4] + '.png'
            data = pipeline(dict(img_path=img))
            batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                                 data_samples=[data['data_samples']]),
                                            False)
            with torch.no_grad():
                feats = adapter.features(model, batch['inputs'])
            label = remap[mmcv.imread(ann, flag='unchanged')]
            self.items.append((feats, batch['data_samples'], torch.from_numpy(label)))

    def predict(self, model, adapter, index: int):
        """(H, W) prediction of val image ``index`` through the model's head and MMSeg's
        predict_by_feat + postprocess_result."""
        import torch
        feats, samples, _ = self.items[index]
        with torch.no_grad():
            seg = model.decode_head.predict_by_feat(adapter.logits(feats),
                                                    [s.metainfo for s in samples])
            pred = model.postprocess_result(seg, [s.clone() for s in samples])
        return pred[0].pred_sem_seg.data[0]

    def confusion(self, model, adapter, num_classes: int):
        """(C, C) confusion over val (rows: label, columns: prediction)."""
        import torch
        conf = torch.zeros(num_classes * num_classes, dtype=torch.long)
        with torch.no_grad():
            for index, (_, _, label) in enumerate(self.items):
                pred = self.predict(model, adapter, index)
                valid = label != 255
                conf += torch.bincount(label[valid].long() * num_classes + pred[valid],
                                       minlength=num_classes * num_classes)
        return conf.view(num_classes, num_classes)


def ious(conf) -> np.ndarray:
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return (inter / union.clamp(min=1) * 100).numpy()


def scores(conf, num_base: int) -> dict:
    """novel IoU (the last class), base mIoU, harmonic mean, all-class mIoU."""
    iou = ious(conf)
    novel, base = float(iou[-1]), float(iou[:num_base].mean())
    hm = 2 * novel * base / (novel + base) if novel + base > 0 else 0.0
    return dict(novel=novel, base=base, hm=hm, all=float(iou.mean()))


def evaluate(work_dir: str, data_root: str, held: int, head: str, shots: list,
             draws: int, min_pixels: int) -> dict:
    """The base model's and every row's scores for one (held-out class, head) base run."""
    import torch
    from mmengine.config import Config
    from mmseg.apis import init_model

    import mmseg_proto  # noqa: F401
    from mmseg_proto.apis import add_classes
    from mmseg_proto.apis.head_adapters import head_adapter
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    config = glob.glob(osp.join(work_dir, '*.py'))[0]
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    model = drop_class(init_model(Config.fromfile(config), checkpoint, device='cpu'), held)
    adapter = head_adapter(model)
    cache = ValCache(model, adapter, data_root, held)
    n = len(CLASSES)
    # The base model: the held-out class is never predicted; its pixels count against
    # the base classes they are taken for (the protocol's base-model row).
    base_conf = cache.confusion(model, adapter, n)  # predictions in [0, n - 1)
    out = dict(held_out=CLASSES[held], head=head, base=scores(base_conf, n - 1),
               base_per_class=ious(base_conf).tolist(), rows=[],
               support_pool=0, min_pixels=min_pixels)
    # The README figure: the val image with the most pixels of the class, before and after.
    figure_index = int(np.argmax([int((label == n - 1).sum()) for _, _, label in cache.items]))
    figure = dict(image=cache.images[figure_index],
                  base=cache.predict(model, adapter, figure_index))
    pool = support_pool(data_root, held, min_pixels)
    out['support_pool'] = len(pool)
    for row, (row_head, options) in ROWS.items():
        if row_head != head:
            continue
        if options.get('num_prototypes') == HEAD_K:
            options = dict(options, num_prototypes=model.decode_head.num_prototypes)
        for shot in shots:
            for d in range(draws):
                support = draw(pool, shot, held, d)
                t0 = time.perf_counter()
                added, report = add_classes(model, [CLASSES[held]], [support],
                                            mask_values=[held], **options)
                seconds = time.perf_counter() - t0
                conf = cache.confusion(added, head_adapter(added), n)
                rec = dict(row=row, shots=shot, draw=d, seconds=seconds,
                           support=[osp.basename(i) for i, _ in support],
                           offset=report.classes[0].offset,
                           support_iou=report.classes[0].support_iou,
                           pixels=report.classes[0].pixels, **scores(conf, n - 1))
                out['rows'].append(rec)
                if row == FIGURE_ROW[head] and shot == FIGURE_SHOTS and d == 0:
                    figure['added'] = cache.predict(added, head_adapter(added), figure_index)
                print(f'[camvid_add_class] {CLASSES[held]} {row} {shot}-shot draw {d}: '
                      f'novel {rec["novel"]:.1f} base {rec["base"]:.1f}', flush=True)
    if 'added' in figure:  # predictions in the renumbered order (the class last)
        np.savez_compressed(osp.join(work_dir, 'figure.npz'), image=figure['image'],
                            base=figure['base'].numpy().astype(np.uint8),
                            added=figure['added'].numpy().astype(np.uint8))
    return out


def table(records: list, oracle: dict) -> str:
    """Mean ± std over draws (and seeds) per row, shot count and held-out class."""
    lines = ['| held-out class | row | shots | novel IoU | oracle IoU | base mIoU (change) | '
             'HM | all-class mIoU | s to add |', '|' + '---|' * 9]

    def ms(x):
        x = np.asarray(x, float)
        return f'{x.mean():.1f} ± {x.std(ddof=1) if len(x) > 1 else 0:.1f}'

    for rec in records:
        held, head = rec['held_out'], rec['head']
        orc = oracle.get(head, {}).get(held)
        lines.append(f"| {held} | {head} base model | - | - | "
                     f"{'-' if orc is None else f'{orc:.1f}'} | {rec['base']['base']:.1f} | - | "
                     f"{rec['base']['all']:.1f} | - |")
        for row in [row for row in ROWS if any(r['row'] == row for r in rec['rows'])]:
            for shot in sorted({r['shots'] for r in rec['rows'] if r['row'] == row}):
                rs = [r for r in rec['rows'] if r['row'] == row and r['shots'] == shot]
                change = np.mean([r['base'] for r in rs]) - rec['base']['base']
                lines.append(
                    f"| {held} | {row} | {shot} | {ms([r['novel'] for r in rs])} | "
                    f"{'-' if orc is None else f'{orc:.1f}'} | "
                    f"{ms([r['base'] for r in rs])} ({change:+.1f}) | "
                    f"{ms([r['hm'] for r in rs])} | {ms([r['all'] for r in rs])} | "
                    f"{np.median([r['seconds'] for r in rs]):.2f} |")
    return '\n'.join(lines)


def summary(records: list) -> str:
    """Per row and shot count: the mean over held-out classes of each class's mean."""
    lines = ['| row | shots | classes | novel IoU | base mIoU change | HM |',
             '|' + '---|' * 6]
    rows = [row for row in ROWS if any(r['row'] == row for rec in records
                                       for r in rec['rows'])]
    for row in rows:
        for shot in sorted({r['shots'] for rec in records for r in rec['rows']}):
            per = []
            for rec in records:
                rs = [r for r in rec['rows'] if r['row'] == row and r['shots'] == shot]
                if rs:
                    per.append((np.mean([r['novel'] for r in rs]),
                                np.mean([r['base'] for r in rs]) - rec['base']['base'],
                                np.mean([r['hm'] for r in rs])))
            if per:
                p = np.array(per)
                lines.append(f'| {row} | {shot} | {len(per)} | {p[:, 0].mean():.1f} | '
                             f'{p[:, 1].mean():+.1f} | {p[:, 2].mean():.1f} |')
    return '\n'.join(lines)


def read_result(path: str, held_out: str, head: str) -> dict:
    """One evaluated base model's ``add_class.json``; SystemExit naming the file and what
    is wrong when it cannot be used."""
    try:
        with open(path) as f:
            rec = json.load(f)
        ok = (rec['held_out'] == held_out and rec['head'] == head
              and isinstance(rec['rows'], list) and isinstance(rec['base'], dict))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f'{path}: not a finished evaluation ({type(err).__name__}: {err}); '
                         'delete it to evaluate again')
    if not ok:
        raise SystemExit(f'{path} is not the evaluation of {head} without {held_out}; '
                         'delete it to evaluate again')
    return rec


def oracle_iou(path: str) -> dict:
    """head -> class -> mean IoU over seeds of the all-class model (camvid_4000)."""
    if not osp.exists(path):
        return {}
    with open(path) as f:
        recs = json.load(f)
    out = {}
    for head, variant in (('protoseg', 'protoseg'), ('parametric', 'parametric')):
        rs = [r for r in recs if r['variant'] == variant]
        if rs:
            pc = np.mean([r['per_class'] for r in rs], axis=0)
            out[head] = dict(zip(rs[0]['classes'], pc.tolist()))
    return out


def write_figure(out: str, held: int, seed: int, path: str) -> None:
    """One val image: the image, its labels, and each head's prediction before and after
    the class is added (``figure.npz`` of both base runs), coloured with CamVid's palette."""
    import mmcv
    from mmseg_proto.datasets import CamVidDataset
    palette = np.array(CamVidDataset.METAINFO['palette'] + [[0, 0, 0]] * 245, np.uint8)
    order = np.array([c for c in range(len(CLASSES)) if c != held] + [held])
    figs = {}
    for head in HEADS:
        f = osp.join(run_dir(out, f'{head} no-{CLASSES[held]}', seed), 'figure.npz')
        if not osp.exists(f):
            raise SystemExit(f'{f} is missing: evaluate both heads first')
        figs[head] = np.load(f)
    image = mmcv.imread(str(figs['protoseg']['image']))[..., ::-1]
    label = mmcv.imread(str(figs['protoseg']['image']).replace('img_dir', 'ann_dir')[:-4]
                        + '.png', flag='unchanged')
    panels = [('image', image), ('labels', palette[label])]
    for head in HEADS:
        for when in ('base', 'added'):
            name = f"{head}: {'before' if when == 'base' else 'after adding'} {CLASSES[held]}"
            panels.append((name, palette[order[figs[head][when]]]))
    h, w = image.shape[:2]
    import cv2
    canvas = np.full((2 * (h + 24), 3 * w + 8, 3), 255, np.uint8)
    for i, (name, panel) in enumerate(panels):
        r, c = divmod(i, 3)
        y, x = r * (h + 24) + 24, c * (w + 4)
        canvas[y:y + h, x:x + w] = panel
        cv2.putText(canvas, name, (x + 4, y - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0),
                    1, cv2.LINE_AA)
    from mmseg_proto.utils.output_files import check_output_file
    folder = check_output_file(path, 'camvid_add_class', dict(out=out))
    with folder.atomic(osp.basename(path)) as tmp:
        mmcv.imwrite(np.ascontiguousarray(canvas[..., ::-1]), tmp)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-root', default=os.environ.get(
        'MMSEG_PROTO_CAMVID', osp.join(REPO, '..', 'shared', 'data', 'camvid')))
    p.add_argument('--iters', type=int, default=4000)
    p.add_argument('--held-out', nargs='+', default=['car', 'pedestrian', 'bicyclist',
                                                     'sidewalk'], choices=CLASSES)
    p.add_argument('--heads', nargs='+', default=list(HEADS), choices=HEADS)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--shots', type=int, nargs='+', default=[1, 5, 10])
    p.add_argument('--draws', type=int, default=5)
    p.add_argument('--min-pixels', type=int, default=1000,
                   help='support images hold at least this many pixels of the class '
                   '(at the label size)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--train-only', action='store_true',
                   help='train the base models, evaluate nothing')
    p.add_argument('--report-only', action='store_true')
    p.add_argument('--figure', metavar='PNG',
                   help='write the before/after figure of the first --held-out class')
    p.add_argument('--out', default=osp.join(REPO, 'benchmarks', 'results',
                                             'camvid_add_class'))
    args = p.parse_args()
    if min(args.iters, args.draws, args.threads, *args.shots) < 1:
        p.error('--iters, --draws, --threads and --shots must be >= 1')
    from mmseg_proto.utils.output_files import (OutputPathError, check_not_input,
                                                write_text_atomic)
    try:  # --out never is, nor lies in, the data it reads
        check_not_input(args.out, dict(data_root=args.data_root), 'camvid_add_class')
    except OutputPathError as err:
        p.error(str(err))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    jobs = [(CLASSES.index(c), h, s) for s in args.seeds for c in args.held_out
            for h in args.heads]
    for held, head, seed in jobs:  # before anything trains: finished runs must fit
        rec = osp.join(run_dir(args.out, f'{head} no-{CLASSES[held]}', seed), 'record.json')
        if osp.exists(rec):
            try:
                read_record(rec, args.iters)
            except ValueError as err:
                p.error(str(err))
    records = []
    for held, head, seed in jobs:
        variant = f'{head} no-{CLASSES[held]}'
        work = run_dir(args.out, variant, seed)
        result = osp.join(work, 'add_class.json')
        if (not args.report_only and not osp.exists(result)
                and osp.exists(osp.join(work, 'record.json'))
                and not osp.exists(osp.join(work, 'last_checkpoint'))):
            # Only record.json is kept in git: a base run finished on another machine
            # left no checkpoint to add classes to, so it is trained again.
            print(f'[camvid_add_class] {variant} seed {seed}: its checkpoint is gone (only '
                  'record.json is kept); training it again', flush=True)
            os.remove(osp.join(work, 'record.json'))
        if not args.report_only and not osp.exists(osp.join(work, 'record.json')):
            print(f'[camvid_add_class] training {variant} seed {seed}', flush=True)
            subprocess.run([sys.executable, BENCH, '--single', variant, str(seed),
                            '--iters', str(args.iters), '--data-root', args.data_root,
                            '--out', args.out], check=True, env=env)
        if args.train_only or not osp.exists(osp.join(work, 'record.json')):
            continue
        if not osp.exists(result) and not args.report_only:
            print(f'[camvid_add_class] evaluating {variant} seed {seed}', flush=True)
            rec = evaluate(work, args.data_root, held, head, args.shots, args.draws,
                           args.min_pixels)
            rec.update(seed=seed, iters=args.iters)
            write_json(result, rec)
        if osp.exists(result):
            records.append(read_result(result, CLASSES[held], head))
    if args.figure:
        write_figure(args.out, CLASSES.index(args.held_out[0]), args.seeds[0], args.figure)
    if not records:
        return
    oracle = oracle_iou(osp.join(REPO, 'benchmarks', 'results', 'camvid_4000',
                                 'records.json'))
    write_json(osp.join(args.out, 'records.json'), records)
    text = (f'CamVid val (101 images, all 11 classes), base models at {args.iters} '
            f'iterations, supports from the train split (>= {args.min_pixels} pixels of the '
            f'class), {args.draws} draws per shot count\n\nMean over held-out classes:\n\n'
            + summary(records) + '\n\nPer held-out class (mean ± std over draws):\n\n'
            + table(records, oracle))
    write_text_atomic(osp.join(args.out, 'results.md'), text + '\n')
    print(text)


if __name__ == '__main__':
    main()
