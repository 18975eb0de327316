"""Anomaly maps on real data: CamVid with one class held out of training, for several classes.

For each held-out class (``--held-out car pedestrian sign pole``) trains ProtoSeg and the
parametric baseline with that class's pixels ignored (``IgnoreClasses`` in the training
pipeline; same backbone, decoder, schedule and seeds as ``camvid_benchmark.py``, which runs
the training), then scores, on the val split, the pixels labelled with the held-out class as
anomalies against every other labelled pixel, with every score of
``mmseg_proto.evaluation.anomaly_scores`` that the model supports:

- parametric and ProtoSeg: ``max softmax``, ``max logit``, ``energy`` (over the logits) and
  ``class-normalised logit`` (the predicted class's logit against that class's mean and
  standard deviation over correctly classified training pixels);
- ProtoSeg only: ``prototype`` (1 - max cosine to any prototype, ``ProtoEncoderDecoder``'s
  map), ``prototype energy`` (energy over all C x K cosines, T = 0.1), ``class-normalised
  prototype`` (the cosine to the nearest prototype of the predicted class against that class's
  training statistics) and ``class-normalised prototype + logit`` (the mean of the two
  class-normalised scores).

The training statistics come from one pass over the training split with the test pipeline
(held-out pixels skipped). Metrics: AUROC, AUPR (held-out class = positive) and FPR at 95%
TPR, per held-out class (mean and spread over seeds) and the mean over held-out classes, plus
the mIoU of the seen classes and ProtoSeg's prototype health on val. Logits and cosines are
computed at the decoder's resolution and resized bilinearly to the label size. Writes
``anomaly_results.md`` and ``anomaly_records.json`` to --out; finished evaluations are kept
(resumable, as the training is).

    python benchmarks/camvid_anomaly.py --data-root ../shared/data/camvid --iters 1000 \
        --held-out car pedestrian sign pole --seeds 0 1 --jobs 2 --out work_dirs/camvid_anomaly
"""
import argparse
import glob
import os
import os.path as osp
import subprocess
import sys

import numpy as np

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BENCH = osp.join(REPO, 'benchmarks', 'camvid_benchmark.py')
MODELS = ('protoseg', 'parametric')


def _items(dataset, pipeline_from):
    """(inputs, labels) of every image of ``dataset`` through the test pipeline."""
    import mmcv
    from mmcv.transforms import Compose
    pipeline = Compose([t for t in pipeline_from if t['type'] != 'LoadAnnotations'])
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        gt = mmcv.imread(info['seg_map_path'], flag='unchanged')
        yield pipeline(dict(img_path=info['img_path'], seg_fields=[],
                            reduce_zero_label=False)), gt


def _outputs(model, item, size):
    """Logits (C, H, W), class cosines (C, H, W), all cosines (C*K, H, W) at ``size`` and the
    embeddings (h*w, D) of ProtoSeg (None for the parametric model)."""
    import torch
    import torch.nn.functional as F
    data = model.data_preprocessor(dict(inputs=[item['inputs']],
                                        data_samples=[item['data_samples']]), False)
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
        head = model.decode_head
        logits = head.forward(feats).float()  # (1, C, h, w)
        up = lambda x: F.interpolate(x, size=size, mode='bilinear', align_corners=False)[0]
        if not hasattr(head, 'prototypes'):
            return up(logits), None, None, None
        emb = head.embed(feats)  # (1, h, w, D)
        cos = head.scorer.cosines(emb, head.prototypes).float()  # (1, h, w, C, K)
        class_cos = cos.amax(dim=-1).permute(0, 3, 1, 2)  # (1, C, h, w)
        cos = cos.flatten(-2).permute(0, 3, 1, 2)  # (1, C*K, h, w)
        return up(logits), up(class_cos), up(cos), emb[0]


def evaluate(work_dir: str, data_root: str, held_out: str, device: str) -> dict:
    """Every score's metrics on val, the seen-class statistics and prototype health."""
    import torch
    import torch.nn.functional as F
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.apis import init_model
    from mmseg.registry import DATASETS

    import mmseg_proto  # noqa: F401
    from mmseg_proto.evaluation import (anomaly_metrics, nearest_prototype_usage,
                                        prototype_health)
    from mmseg_proto.evaluation.anomaly_scores import (PARAMETRIC_SCORES, SCORES,
                                                       ClassValueStatistics)

    config = glob.glob(osp.join(work_dir, '*.py'))[0]
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    cfg = Config.fromfile(config)
    model = init_model(cfg, checkpoint, device=device)
    init_default_scope('mmseg')
    splits = {}
    for split in ('train', 'val'):
        ds = dict(cfg.test_dataloader.dataset, data_root=data_root,
                  data_prefix=dict(img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'))
        splits[split] = DATASETS.build(ds)
    classes = list(splits['val'].metainfo['classes'])
    num_classes, held = len(classes), classes.index(held_out)
    prototypes = hasattr(model.decode_head, 'prototypes')
    names = SCORES if prototypes else PARAMETRIC_SCORES
    stats = dict(logit=ClassValueStatistics(num_classes), cosine=ClassValueStatistics(num_classes))
    for item, gt in _items(splits['train'], cfg.test_dataloader.dataset.pipeline):
        labels = torch.from_numpy(gt.astype(np.int64)).to(device)
        labels[labels == held] = 255  # never seen in training
        logits, class_cos, _, _ = _outputs(model, item, gt.shape)
        pred = logits.argmax(dim=0)
        stats['logit'].update(logits, pred, labels)
        if prototypes:
            stats['cosine'].update(class_cos, pred, labels)
    inputs = dict(logit_statistics=stats['logit'].mean_std())
    if prototypes:
        inputs['cosine_statistics'] = stats['cosine'].mean_std()
    scores = {name: [] for name in names}
    is_anomaly, usage = [], 0
    for item, gt in _items(splits['val'], cfg.test_dataloader.dataset.pipeline):
        logits, class_cos, cos, emb = _outputs(model, item, gt.shape)
        keep = torch.from_numpy(gt != 255).to(device)
        is_anomaly.append(gt[gt != 255] == held)
        inputs.update(logits=logits, class_cosines=class_cos, cosines=cos)
        for name in names:
            scores[name].append(SCORES[name](inputs)[keep].cpu().numpy())
        if prototypes:  # health on the seen classes' pixels, at the feature grid
            grid = F.interpolate(torch.from_numpy(gt)[None, None].float(),
                                 size=emb.shape[:2], mode='nearest')[0, 0].long().to(device)
            grid[grid == held] = 255
            usage = usage + nearest_prototype_usage(
                emb.reshape(-1, emb.shape[-1]), grid.reshape(-1),
                model.decode_head.prototypes.detach()).cpu()
    labels = np.concatenate(is_anomaly)
    record = dict(anomaly={name: anomaly_metrics(np.concatenate(s), labels)
                           for name, s in scores.items()},
                  anomaly_pixels=int(labels.sum()), pixels=int(labels.size))
    if prototypes:
        health = prototype_health(model.decode_head.prototypes.detach().cpu(), usage)
        seen = [i for i in range(num_classes) if i != held]
        record['health'] = {key: float(value[seen].double().nanmean())
                            for key, value in health.items()}
    return record


def _mean_std(values, digits=1):
    v = np.asarray(values, dtype=float)
    spread = f' ± {v.std(ddof=1):.{digits}f}' if len(v) > 1 else ''
    return f'{v.mean():.{digits}f}{spread}'


def table(records, held_out) -> str:
    """Per held-out class and score: AUROC, AUPR, FPR95 (mean ± std over seeds), then the
    mean over held-out classes; the mIoU of the seen classes and prototype health."""
    lines = []
    summary = {}  # (model, score) -> {metric: [per held-out class means]}
    for cls in held_out:
        lines += [f'### {cls} held out', '',
                  '| model | score | AUROC (%) | AUPR (%) | FPR95 (%) | mIoU, seen classes |',
                  '|' + '---|' * 6]
        for model in MODELS:
            rs = [r for r in records if r['variant'] == f'{model} no-{cls}']
            if not rs:
                continue
            miou = [np.mean([iou for c, iou in zip(r['classes'], r['per_class']) if c != cls])
                    for r in rs]
            for name in rs[0]['anomaly']:
                cells = []
                for key in ('auroc', 'aupr', 'fpr95'):
                    v = [100 * r['anomaly'][name][key] for r in rs]
                    summary.setdefault((model, name), {}).setdefault(key, []).append(np.mean(v))
                    cells.append(f"{_mean_std(v)} ({', '.join(f'{x:.1f}' for x in v)})")
                lines.append(f'| {model} | {name} | ' + ' | '.join(cells) +
                             f' | {_mean_std(miou, 2)} |')
        lines.append('')
    lines += [f"### Mean over held-out classes ({', '.join(held_out)})", '',
              '| model | score | AUROC (%) | AUPR (%) | FPR95 (%) | classes |', '|' + '---|' * 6]
    for (model, name), metrics in sorted(summary.items(),
                                         key=lambda kv: -np.mean(kv[1]['auroc'])):
        lines.append(f'| {model} | {name} | ' + ' | '.join(
            f'{np.mean(metrics[k]):.1f}' for k in ('auroc', 'aupr', 'fpr95')) +
            f" | {len(metrics['auroc'])} |")
    health = [r for r in records if r.get('health')]
    if health:
        lines += ['', '### ProtoSeg prototype health on val (seen classes, mean over classes)',
                  '', '| held out | seeds | effective prototypes (>= 1%) | exp-entropy of use | '
                  'cosine mean between a class\'s prototypes |', '|---|---|---|---|---|']
        for cls in held_out:
            rs = [r for r in health if r['variant'] == f'protoseg no-{cls}']
            if rs:
                lines.append(f"| {cls} | {len(rs)} | "
                             f"{_mean_std([r['health']['effective'] for r in rs])} | "
                             f"{_mean_std([r['health']['exp_entropy'] for r in rs], 2)} | "
                             f"{_mean_std([r['health']['cos_mean'] for r in rs], 2)} |")
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-root', default=os.environ.get(
        'MMSEG_PROTO_CAMVID', osp.join(REPO, '..', 'shared', 'data', 'camvid')))
    p.add_argument('--iters', type=int, default=1000)
    p.add_argument('--held-out', nargs='+', default=['car'],
                   help='classes held out of training, one at a time (default: car)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--models', nargs='+', choices=MODELS, default=list(MODELS),
                   help='which models to train and score (default: both)')
    p.add_argument('--jobs', type=int, default=1)
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--device', default='cpu', help="evaluation device, e.g. 'cuda'")
    p.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'camvid_anomaly'))
    p.add_argument('--report-only', action='store_true',
                   help='write the tables from the runs already scored in --out; train nothing')
    p.add_argument('--evaluate', nargs=2, metavar=('WORK_DIR', 'CLASS'), help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, osp.dirname(BENCH))
    from camvid_benchmark import ANOMALY_KEYS, CLASSES, read_record, run_dir, write_json
    unknown = [c for c in args.held_out if c not in CLASSES]
    if unknown:
        p.error(f"--held-out {' '.join(unknown)}: not CamVid classes ({', '.join(CLASSES)})")
    if args.iters < 1 or args.jobs < 1:
        p.error('--iters and --jobs must be positive')
    from mmseg_proto.utils.output_files import (OutputPathError, check_not_input,
                                                write_text_atomic)
    try:  # --out never is, nor lies in, the data it reads
        check_not_input(args.out, dict(data_root=args.data_root), 'camvid_anomaly')
    except OutputPathError as err:
        p.error(str(err))
    if args.evaluate:  # one model, in its own process (see run() below)
        work, cls = args.evaluate
        try:
            record = read_record(osp.join(work, 'record.json'), args.iters)
        except ValueError as err:
            p.error(str(err))
        record.update(evaluate(work, args.data_root, cls, args.device), held_out=cls)
        write_json(osp.join(work, 'anomaly.json'), record)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // args.jobs)))
    jobs = [(c, s, m) for c in args.held_out for s in args.seeds for m in args.models]

    def work_dir(job):
        cls, seed, model = job
        return run_dir(args.out, f'{model} no-{cls}', seed)

    if args.report_only and not osp.isdir(args.out):
        p.error(f'--out {args.out}: no such folder; --report-only writes the tables of the '
                'runs scored there: give the --out of an earlier call')

    def read_scores(work, cls, iters):
        """The checked anomaly.json of the run in ``work``, held-out class ``cls``."""
        record = read_record(osp.join(work, 'anomaly.json'), iters, ANOMALY_KEYS,
                             advice='delete it to score the run again')
        if record.get('held_out', cls) != cls:
            raise ValueError(f"{osp.join(work, 'anomaly.json')} scores held-out class "
                             f"{record['held_out']!r}, its folder is a run without {cls!r}; "
                             'delete it to score the run again')
        return record

    scored = {}  # job -> its anomaly.json record
    for job in jobs:  # before training anything: finished runs must fit this call
        try:
            if osp.exists(osp.join(work_dir(job), 'record.json')):
                read_record(osp.join(work_dir(job), 'record.json'), args.iters)
            if osp.exists(osp.join(work_dir(job), 'anomaly.json')):
                scored[job] = read_scores(work_dir(job), job[0], args.iters)
        except ValueError as err:
            p.error(str(err))

    def run(job):
        """Train (camvid_benchmark.py's run) and evaluate one model; both resumable."""
        cls, seed, model = job
        variant = f'{model} no-{cls}'
        work = work_dir(job)
        if not osp.exists(osp.join(work, 'record.json')):
            print(f'[camvid_anomaly] training {variant} seed {seed}', flush=True)
            subprocess.run([sys.executable, BENCH, '--single', variant, str(seed), '--iters',
                            str(args.iters), '--data-root', args.data_root, '--out', args.out],
                           check=True, stdout=subprocess.DEVNULL, env=env)
        if not osp.exists(osp.join(work, 'anomaly.json')):
            print(f'[camvid_anomaly] scoring {variant} seed {seed}', flush=True)
            subprocess.run([sys.executable, __file__, '--evaluate', work, cls, '--iters',
                            str(args.iters), '--data-root', args.data_root, '--device',
                            args.device], check=True, stdout=subprocess.DEVNULL, env=env)
        return read_scores(work, cls, args.iters)

    from concurrent.futures import ThreadPoolExecutor
    if args.report_only:
        missing = [osp.join(work_dir(job), 'anomaly.json') for job in jobs if job not in scored]
        if len(missing) == len(jobs):
            p.error(f'--report-only: no run of this call is scored in --out {args.out} '
                    f'(at --iters {args.iters}): run it without --report-only first')
        if missing:
            print(f'[camvid_anomaly] not scored yet, left out: {missing}', flush=True)
        records = [scored[job] for job in jobs if job in scored]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            records = list(pool.map(run, jobs))
    records = [r for r in records if r['iters'] == args.iters]
    write_json(osp.join(args.out, 'anomaly_records.json'), records)
    text = (f'CamVid val (101 images): the pixels of the held-out class (ignored in training) '
            f'against every other labelled pixel; {args.iters} iterations, seeds '
            f"{', '.join(map(str, args.seeds))}\n\n" + table(records, args.held_out))
    write_text_atomic(osp.join(args.out, 'anomaly_results.md'), text + '\n')
    print(text)


if __name__ == '__main__':
    main()
