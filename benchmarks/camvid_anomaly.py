"""Anomaly maps on real data: CamVid with one class held out of training.

Trains ProtoSeg and the parametric baseline with the ``car`` pixels ignored (``IgnoreClasses``
in the training pipeline; same backbone, decoder, schedule and seeds as
``camvid_benchmark.py``, which runs the training), then scores, on the val split, the pixels
labelled car as anomalies against every other labelled pixel:

- ``prototype``: ProtoSeg's anomaly map, 1 - max cosine similarity to any prototype
  (``ProtoEncoderDecoder(anomaly_map=True)``);
- ``max softmax``: 1 - the largest softmax probability of the segmentation logits;
- ``max logit``: minus the largest logit;

with AUROC, AUPR (car = positive) and FPR at 95% TPR, mean and spread over seeds, and the
mIoU of the 10 classes seen in training. Writes ``results.md`` and ``records.json`` to --out.

    python benchmarks/camvid_anomaly.py --data-root ../shared/data/camvid --iters 1000 \
        --seeds 0 1 --jobs 2 --out work_dirs/camvid_anomaly
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BENCH = osp.join(REPO, 'benchmarks', 'camvid_benchmark.py')
MODELS = {'protoseg no-car': ('prototype', 'max softmax', 'max logit'),
          'parametric no-car': ('max softmax', 'max logit')}
HELD_OUT = 'car'


def evaluate(work_dir: str, data_root: str, with_prototype_score: bool) -> dict:
    """Scores of every labelled val pixel, and the metrics of each score."""
    import mmcv
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.apis import inference_model, init_model
    from mmseg.registry import DATASETS

    import mmseg_proto  # noqa: F401
    from mmseg_proto.evaluation import anomaly_metrics

    config = [p for p in glob.glob(osp.join(work_dir, '*.py'))][0]
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    cfg = Config.fromfile(config)
    cfg.test_dataloader.dataset.data_root = data_root
    if with_prototype_score:
        cfg.model.type, cfg.model.anomaly_map = 'ProtoEncoderDecoder', True
    model = init_model(cfg, checkpoint, device='cpu')
    init_default_scope('mmseg')
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    held_out = list(dataset.metainfo['classes']).index(HELD_OUT)
    scores = {name: [] for name in MODELS['protoseg no-car' if with_prototype_score
                                          else 'parametric no-car']}
    labels = []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        gt = mmcv.imread(info['seg_map_path'], flag='unchanged')
        result = inference_model(model, info['img_path'])
        logits = result.seg_logits.data
        keep = torch.from_numpy(gt != 255)
        labels.append(gt[gt != 255] == held_out)
        scores['max softmax'].append((1 - logits.softmax(0).amax(0))[keep].numpy())
        scores['max logit'].append((-logits.amax(0))[keep].numpy())
        if with_prototype_score:
            scores['prototype'].append(result.anomaly_map.data[0][keep].numpy())
    labels = np.concatenate(labels)
    return {name: anomaly_metrics(np.concatenate(s), labels) for name, s in scores.items()}


def table(records) -> str:
    lines = ['| model | score | AUROC (%) | AUPR (%) | FPR95 (%) | mIoU, 10 seen classes |',
             '|' + '---|' * 6]
    for model, names in MODELS.items():
        rs = [r for r in records if r['variant'] == model]
        if not rs:
            continue
        miou = [np.mean([iou for c, iou in zip(r['classes'], r['per_class']) if c != HELD_OUT])
                for r in rs]
        for name in names:
            cells = []
            for key in ('auroc', 'aupr', 'fpr95'):
                v = 100 * np.array([r['anomaly'][name][key] for r in rs])
                spread = f' ± {v.std(ddof=1):.1f}' if len(v) > 1 else ''
                cells.append(f"{v.mean():.1f}{spread} ({', '.join(f'{x:.1f}' for x in v)})")
            lines.append(f'| {model} | {name} | ' + ' | '.join(cells) +
                         f' | {np.mean(miou):.2f} |')
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-root', default=os.environ.get(
        'MMSEG_PROTO_CAMVID', osp.join(REPO, '..', 'shared', 'data', 'camvid')))
    p.add_argument('--iters', type=int, default=1000)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--jobs', type=int, default=1)
    p.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'camvid_anomaly'))
    args = p.parse_args()
    # Training (resumable: finished runs are kept) by the CamVid benchmark.
    subprocess.run([sys.executable, BENCH, '--data-root', args.data_root, '--iters',
                    str(args.iters), '--jobs', str(args.jobs), '--out', args.out,
                    '--seeds', *map(str, args.seeds), '--variants', *MODELS], check=True)
    records = []
    for seed in args.seeds:
        for model in MODELS:
            work = osp.join(args.out, 'work', f"{model.replace(' ', '_')}_s{seed}")
            with open(osp.join(work, 'record.json')) as f:
                record = json.load(f)
            record['anomaly'] = evaluate(work, args.data_root, model.startswith('protoseg'))
            records.append(record)
    with open(osp.join(args.out, 'anomaly_records.json'), 'w') as f:
        json.dump(records, f, indent=1)
    text = (f'CamVid val (101 images): the pixels labelled {HELD_OUT} (ignored in training) '
            f'against every other labelled pixel; {args.iters} iterations, seeds '
            f"{', '.join(map(str, args.seeds))}\n\n" + table(records))
    with open(osp.join(args.out, 'anomaly_results.md'), 'w') as f:
        f.write(text + '\n')
    print(text)


if __name__ == '__main__':
    main()
