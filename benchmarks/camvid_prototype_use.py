"""Prototype use against mIoU for ProtoSeg variants trained by camvid_benchmark.py.

For every (variant, seed) run found under --out/work, measures prototype health on the CamVid
val split (``mmseg_proto.evaluation.prototype_health``: effective prototypes per class, the
exp-entropy of their use, pairwise cosines) and prints a Markdown table beside the run's val
mIoU: mean over seeds, per-seed values in brackets. Train the runs first, e.g.

    python benchmarks/camvid_benchmark.py --iters 1000 --seeds 0 1 --jobs 2 --out DIR \
        --variants protoseg 'protoseg PPC T=0.1' 'protoseg reseed' 'protoseg momentum=0.99'
    python benchmarks/camvid_prototype_use.py --out DIR --variants protoseg ...
"""
import argparse
import glob
import json
import os
import os.path as osp
import re
import sys
from typing import Optional

import numpy as np
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def health_of_run(work_dir: str, data_root: str) -> dict:
    """Mean over classes of the health figures of one run's final checkpoint."""
    from mmseg.registry import DATASETS

    from mmseg_proto.evaluation import nearest_prototype_usage, prototype_health
    from mmseg_proto.visualization.prototypes import (collect_embeddings, load_model,
                                                      proto_head)
    config = glob.glob(osp.join(work_dir, '*.py'))[0]
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    model = load_model(config, checkpoint, 'cpu')
    loader = model.cfg.val_dataloader or model.cfg.test_dataloader
    loader['dataset']['data_root'] = data_root
    dataset = DATASETS.build(loader['dataset'])
    head = proto_head(model)
    emb, labels = collect_embeddings(model, dataset, range(head.num_classes),
                                     num_images=len(dataset), per_class=10**12)
    protos = head.prototypes.detach().cpu()
    health = prototype_health(protos, nearest_prototype_usage(emb, labels, protos))
    # How far the prototypes moved from their random start towards the class's data: the
    # mean cosine of a class's prototypes with its mean val embedding (about 0 for a random
    # direction in D dimensions).
    keep = labels != 255
    c = head.num_classes
    sums = torch.zeros(c, emb.shape[1]).index_add_(0, labels[keep], emb[keep].float())
    centre = torch.nn.functional.normalize(sums, dim=1)
    health['to_class_mean'] = (protos.float() * centre[:, None]).sum(-1).mean(1).double()
    present = health['pixels'] > 0
    return {key: float(value[present].mean()) for key, value in health.items()}


def finished_runs(out: str, variants: list, iters: Optional[int] = None) -> dict:
    """variant -> [(run folder, checked record)] of the runs of ``variants`` under ``out``;
    ValueError (naming the file or the schedules) if a record is unusable, or the runs are
    of several schedules and ``iters`` does not say which one."""
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    from camvid_benchmark import read_record, run_dir
    runs = {}
    for variant in variants:
        prefix = run_dir(out, variant, 0)[:-1]  # '<out>/work/<variant>_s'
        folders = sorted(f for f in glob.glob(glob.escape(prefix) + '*')
                         if re.fullmatch(r'-?\d+', f[len(prefix):]))
        found = [(f, read_record(osp.join(f, 'record.json'))) for f in folders
                 if osp.exists(osp.join(f, 'record.json'))]
        runs[variant] = [(f, r) for f, r in found if iters is None or r['iters'] == iters]
    schedules = sorted({r['iters'] for found in runs.values() for _, r in found})
    if len(schedules) > 1:
        raise ValueError(f'{out} holds runs of {schedules} iterations for these variants: '
                         'pass --iters to say which schedule to report')
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', required=True, help="camvid_benchmark.py's --out")
    p.add_argument('--variants', nargs='+', required=True)
    p.add_argument('--data-root', default=os.environ.get(
        'MMSEG_PROTO_CAMVID', osp.join(REPO, '..', 'shared', 'data', 'camvid')))
    p.add_argument('--iters', type=int,
                   help='the schedule to report, when --out holds runs of several')
    args = p.parse_args()
    from mmseg_proto.utils.output_files import (OutputPathError, check_not_input,
                                                write_text_atomic)
    try:  # --out (the benchmark's folder) never is, nor lies in, the data it reads
        check_not_input(args.out, dict(data_root=args.data_root), 'camvid_prototype_use')
    except OutputPathError as err:
        p.error(str(err))
    if not osp.isdir(osp.join(args.out, 'work')):
        p.error(f"--out {args.out}: no 'work' folder of camvid_benchmark.py runs; give the "
                "--out of camvid_benchmark.py")
    try:  # before the long health pass: every record is usable
        runs = finished_runs(args.out, args.variants, args.iters)
    except ValueError as err:
        p.error(str(err))
    if not any(runs.values()):
        p.error(f'no finished run of {args.variants} in {args.out}/work'
                + (f' at --iters {args.iters}' if args.iters else ''))
    rows = ['| variant | seeds | val mIoU | effective prototypes / class | exp-entropy of use '
            '| mean pairwise cosine | prototype to class-mean cosine |', '|' + '---|' * 7]
    records = []
    for variant in args.variants:
        if not runs[variant]:
            print(f'[camvid_prototype_use] no finished run of {variant!r}, left out')
            continue
        found = []
        for run, record in runs[variant]:
            record['health'] = health_of_run(run, args.data_root)
            found.append(record)
        records += found

        def cell(values, fmt='.2f'):
            v = np.array(values)
            return f"{v.mean():{fmt}} ({', '.join(f'{x:{fmt}}' for x in v)})"
        rows.append(f'| {variant} | {len(found)} | ' + ' | '.join([
            cell([r['mIoU'] for r in found]),
            cell([r['health']['effective'] for r in found], '.1f'),
            cell([r['health']['exp_entropy'] for r in found]),
            cell([r['health']['cos_mean'] for r in found]),
            cell([r['health']['to_class_mean'] for r in found])]) + ' |')
    write_text_atomic(osp.join(args.out, 'prototype_use.json'),
                      json.dumps(records, indent=1))
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
