"""Real-data benchmark: parametric SegFormer vs ProtoSeg on CamVid, from scratch, CPU.

Trains the parametric baseline and the ProtoHead model with the same backbone (MiT-B0),
decoder (SegformerHead), schedule, data and seeds, evaluates both on the val split with
MMSeg's IoUMetric, and writes a Markdown table (mIoU mean and spread over seeds, per-class
IoU, parameters, training seconds per iteration, peak memory), plus an ablation of the
paper's Table 5 items that fit the budget (PPC/PPD on or off, K in {1, 10}).

Every run is a separate process (so peak memory is per run).

    python benchmarks/camvid_benchmark.py --data-root ../shared/data/camvid \
        --iters 1000 --seeds 0 1 2 --jobs 2 --out work_dirs/camvid_bench

About 35 minutes on a 2-core CPU with --jobs 2 (two single-thread runs at a time).
"""
import argparse
import glob
import json
import os
import os.path as osp
import resource
import subprocess
import sys
import time
from typing import Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASELINE = osp.join(REPO, 'configs/baselines/camvid/'
                    'segformer_mit-b0_1xb4-80it_camvid-160x160.py')
PROTO = osp.join(REPO, 'configs/protoseg/camvid/'
                 'protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py')
CE = dict(type='CrossEntropyLoss', loss_weight=1.0)
PPC = dict(type='PixelPrototypeContrastLoss', loss_weight=0.01)
PPD = dict(type='PixelPrototypeDistanceLoss', loss_weight=0.001)

# CamVidDataset's classes, in label order.
CLASSES = ('sky', 'building', 'pole', 'road', 'sidewalk', 'tree', 'sign', 'fence',
           'car', 'pedestrian', 'bicyclist')

# name -> (config, ProtoHead overrides or None[, extra]); extra: 'held_out' (classes ignored
# in training), 'hook' (PrototypeUpdateHook overrides)
VARIANTS = {
    'parametric': (BASELINE, None),
    'protoseg': (PROTO, {}),
    'protoseg CE only': (PROTO, dict(loss_decode=[CE])),
    'protoseg CE+PPC': (PROTO, dict(loss_decode=[CE, PPC])),
    'protoseg CE+PPD': (PROTO, dict(loss_decode=[CE, PPD])),
    'protoseg K=1': (PROTO, dict(num_prototypes=1)),
    # Prototype use (docs/prototype_health.md): the paper's PPC temperature.
    'protoseg PPC T=0.1': (PROTO, dict(loss_decode=[
        CE, dict(PPC, temperature=0.1), PPD])),
    # Anomaly maps (benchmarks/camvid_anomaly.py): car pixels ignored in training.
    # Re-seeding prototypes that are nearly never the nearest one of their class.
    'protoseg reseed': (PROTO, {}, dict(hook=dict(reseed_interval=100))),
    # Momentum for a short schedule: 0.999^1000 = 37% of the random start left.
    'protoseg momentum=0.99': (PROTO, dict(momentum=0.99)),
    # The paper's Table 5(d) distance measures (cosine is 'protoseg').
    'protoseg distance=standard': (PROTO, dict(distance='standard')),
    'protoseg distance=huberized': (PROTO, dict(distance='huberized')),
}
# Anomaly maps (benchmarks/camvid_anomaly.py): one class's pixels ignored in training,
# 'parametric no-car', 'protoseg no-car', ... for every CamVid class.
for _index, _name in enumerate(CLASSES):
    VARIANTS[f'parametric no-{_name}'] = (BASELINE, None, dict(held_out=[_index]))
    VARIANTS[f'protoseg no-{_name}'] = (PROTO, {}, dict(held_out=[_index]))
MAIN = ['parametric', 'protoseg']
RESUME_INTERVAL = 500
ABLATIONS = ['protoseg CE only', 'protoseg CE+PPC', 'protoseg CE+PPD',
             'protoseg K=1']


def run_dir(out: str, variant: str, seed: int) -> str:
    """Work folder of one run (its checkpoint, logs and ``record.json``) under --out."""
    return osp.join(out, 'work', f"{variant.replace(' ', '_')}_s{seed}")


def write_json(path: str, data) -> None:
    """Write JSON atomically: a run killed mid-write leaves no half file to resume from."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def _is_health(value) -> bool:
    return value is None or (isinstance(value, dict) and HEALTH_KEYS <= set(value) and all(
        _is_number(v) for v in value.values()))


def _is_anomaly(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(name, str) and isinstance(m, dict) and SCORE_KEYS <= set(m)
        and all(_is_number(x) for x in m.values()) for name, m in value.items())


HEALTH_KEYS = {'effective', 'exp_entropy', 'cos_mean'}  # what the tables read
SCORE_KEYS = {'auroc', 'aupr', 'fpr95'}
# key -> (check, what it must be): the record.json of a finished run (run_one's record)
RECORD_KEYS = {
    'variant': (lambda v: isinstance(v, str), 'a variant name'),
    'seed': (_is_int, 'an integer'),
    'iters': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'mIoU': (_is_number, 'a number'),
    'aAcc': (_is_number, 'a number'),
    'per_class': (_list_of(_is_number), 'a list of numbers, one per class'),
    'classes': (_list_of(lambda v: isinstance(v, str)), 'a list of class names'),
    'params': (_is_int, 'an integer'),
    's_per_iter': (_is_number, 'a number'),
    'peak_rss_mb': (_is_number, 'a number'),
}
# Keys a record may lack (records of earlier versions have no 'health', earlier anomaly
# scores no 'held_out' and pixel counts).
OPTIONAL_KEYS = {
    'health': (_is_health, f'null or a dict of numbers with {sorted(HEALTH_KEYS)}'),
    'held_out': (lambda v: v in CLASSES, f'a CamVid class, one of {list(CLASSES)}'),
    'anomaly_pixels': (_is_int, 'an integer'),
    'pixels': (_is_int, 'an integer'),
}
# The anomaly.json of a scored run (benchmarks/camvid_anomaly.py): the run's record and its
# scores.
ANOMALY_KEYS = dict(
    RECORD_KEYS,
    anomaly=(_is_anomaly, f'a dict: score name -> dict of numbers with {sorted(SCORE_KEYS)}'))


def record_problems(record, keys: dict) -> list:
    """What is wrong with a loaded record: missing keys, values of the wrong type, per-class
    IoU not one per class; [] when none."""
    if not isinstance(record, dict):
        return [f'it holds a JSON {type(record).__name__}, not an object']
    problems = [f"'{key}' is missing" for key in keys if key not in record]
    for key, (check, what) in {**keys, **OPTIONAL_KEYS}.items():
        if key in record and not check(record[key]):
            problems.append(f"'{key}' is {record[key]!r:.80} (must be {what})")
    if not problems and len(record['per_class']) != len(record['classes']):
        problems.append(f"'per_class' has {len(record['per_class'])} values for "
                        f"{len(record['classes'])} classes")
    return problems


def read_record(path: str, iters: Optional[int] = None, keys: dict = RECORD_KEYS,
                advice: str = 'delete its folder to run it again') -> dict:
    """A finished run's record, every key in ``keys`` checked; ValueError (naming the file,
    what is wrong and what to do) if it cannot be used: unreadable, a key missing or of
    the wrong type, the record of another run than its folder's, or (``iters`` given) a run
    at another number of iterations in the same --out.

    Args:
        path (str): ``record.json`` (or ``anomaly.json``) in a run's folder (:func:`run_dir`).
        iters (int, optional): The schedule this call asks for; None: any.
        keys (dict): Required key -> (check, what it must be). Default: :data:`RECORD_KEYS`.
        advice (str): What to do about a record that is not usable.
    """
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f'{path} is not a finished run ({type(err).__name__}: {err}); '
                         f'{advice}') from None
    if isinstance(record, dict) and 'iters' in record and keys['iters'][0](record['iters']) \
            and iters is not None and record['iters'] != iters:
        raise ValueError(f"{path} is a {record['iters']}-iteration run, this call asks for "
                         f'{iters}: use another --out for each schedule')
    problems = record_problems(record, keys)
    if problems:
        raise ValueError(f'{path} is not a finished run: ' + '; '.join(problems) +
                         f'; {advice}')
    folder = osp.basename(osp.dirname(osp.abspath(path)))
    own = osp.basename(run_dir('', record['variant'], record['seed']))
    if folder != own:
        raise ValueError(f"{path} is the record of {record['variant']!r} seed "
                         f"{record['seed']}, whose folder is {own}, not {folder}; {advice}")
    return record


def finished_records(out: str, own: list, iters: int) -> list:
    """Every record under ``out``/work, checked (:func:`read_record`); the files in ``own``
    (this call's runs) must also be ``iters``-iteration runs. ValueError names the first
    record at fault."""
    own = {osp.abspath(path) for path in own}
    return [read_record(path, iters if osp.abspath(path) in own else None)
            for path in sorted(glob.glob(osp.join(out, 'work', '*', 'record.json')))]


def run_one(variant: str, seed: int, iters: int, data_root: str,
            work_dir: str) -> dict:
    """Train and evaluate one variant in this process; return its record."""
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import METRICS

    @METRICS.register_module(force=True)
    class IoUMetricKeepClasses(IoUMetric):
        """MMSeg's IoUMetric, keeping the per-class IoU it computes."""
        per_class = None

        def compute_metrics(self, results):
            inter = sum(r[0] for r in results)
            union = sum(r[1] for r in results)
            IoUMetricKeepClasses.per_class = (inter / union * 100).tolist()
            return super().compute_metrics(results)

    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 2)))
    cfg_path, head_opts, *extra = VARIANTS[variant]
    extra = extra[0] if extra else {}
    cfg = Config.fromfile(cfg_path)
    if 'held_out' in extra:  # after LoadAnnotations: those pixels are ignored
        pipeline = cfg.train_dataloader.dataset.pipeline
        at = [t['type'] for t in pipeline].index('LoadAnnotations') + 1
        pipeline.insert(at, dict(type='IgnoreClasses',
                                 classes=extra['held_out']))
    for hook in cfg.get('custom_hooks', []):
        if hook['type'] == 'PrototypeUpdateHook':
            hook.update(extra.get('hook', {}))
    cfg.work_dir = work_dir
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root
    warm = max(1, iters // 20)
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0,
             end=warm),
        dict(type='PolyLR', eta_min=0.0, power=1.0, begin=warm, end=iters,
             by_epoch=False)
    ]
    cfg.train_cfg.max_iters = iters
    # No validation inside training (timed alone); evaluate with test().
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    # A checkpoint every RESUME_INTERVAL iterations (the last one kept): a run that was
    # stopped resumes from it (mmengine's resume) instead of starting again.
    cfg.default_hooks.checkpoint.update(interval=min(iters, RESUME_INTERVAL), max_keep_ckpts=1)
    cfg.resume = bool(glob.glob(osp.join(work_dir, 'iter_*.pth')))
    cfg.default_hooks.logger.interval = 50
    cfg.randomness = dict(seed=seed)
    cfg.test_evaluator = dict(type='IoUMetricKeepClasses',
                              iou_metrics=['mIoU'])
    if head_opts:
        cfg.model.decode_head.update(head_opts)
    runner = Runner.from_cfg(cfg)
    params = sum(p.numel() for p in runner.model.parameters())
    t0 = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - t0
    metrics = runner.test()
    health = None
    if hasattr(runner.model.decode_head, 'prototypes'):
        health = val_health(runner.model, runner.test_dataloader.dataset)
    return dict(health=health,
        variant=variant, seed=seed, iters=iters, mIoU=float(metrics['mIoU']),
        aAcc=float(metrics['aAcc']), per_class=IoUMetricKeepClasses.per_class,
        classes=list(runner.test_dataloader.dataset.metainfo['classes']),
        params=params, s_per_iter=train_s / iters,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def val_health(model, dataset) -> dict:
    """Prototype health (docs/prototype_health.md) on every val pixel, mean over classes."""
    import torch
    from mmseg_proto.evaluation import nearest_prototype_usage, prototype_health
    from mmseg_proto.visualization.prototypes import collect_embeddings
    head = model.decode_head
    emb, labels = collect_embeddings(model, dataset, range(head.num_classes),
                                     num_images=len(dataset), per_class=10**12)
    prototypes = head.prototypes.detach().cpu()
    usage = nearest_prototype_usage(emb.cpu(), labels.cpu(), prototypes)
    health = prototype_health(prototypes, usage)
    present = health['pixels'] > 0
    return {key: float(torch.nanmean(value[present].double()))
            for key, value in health.items()}


def health_table(records, variants) -> str:
    """Prototype health of the ProtoSeg runs: mean ± std over seeds."""
    import numpy as np
    lines = ['| model | seeds | effective prototypes (>= 1%) | exp-entropy of use | '
             "cosine mean between a class's prototypes |", '|---|---|---|---|---|']
    for v in variants:
        rs = [r for r in records if r['variant'] == v and r.get('health')]
        if not rs:
            continue
        cells = []
        for key, digits in (('effective', 1), ('exp_entropy', 2), ('cos_mean', 2)):
            x = np.array([r['health'][key] for r in rs], dtype=float)
            if np.isnan(x).all():  # e.g. the cosine between prototypes with K = 1
                cells.append('-')
                continue
            cells.append(f'{x.mean():.{digits}f} ± {x.std(ddof=1) if len(x) > 1 else 0:.{digits}f}')
        lines.append(f'| {v} | {len(rs)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) if len(lines) > 2 else ''


def aggregate(records, variants) -> str:
    import numpy as np
    lines = []
    classes = records[0]['classes']
    head = ('| model | seeds | mIoU (mean ± std) | aAcc | params (M) | '
            's/iter | peak RSS (MB) |')
    lines += [head, '|' + '---|' * 7]
    per_class_rows = []
    for v in variants:
        rs = [r for r in records if r['variant'] == v]
        if not rs:
            continue
        m = np.array([r['mIoU'] for r in rs])
        lines.append(
            f"| {v} | {len(rs)} | {m.mean():.2f} ± {m.std(ddof=1) if len(m) > 1 else 0:.2f}"
            f" ({', '.join(f'{x:.2f}' for x in m)}) | "
            f"{np.mean([r['aAcc'] for r in rs]):.2f} | "
            f"{rs[0]['params'] / 1e6:.3f} | "
            f"{np.median([r['s_per_iter'] for r in rs]):.3f} | "
            f"{max(r['peak_rss_mb'] for r in rs):.0f} |")
        pc = np.array([r['per_class'] for r in rs], dtype=float)
        spread = pc.std(axis=0, ddof=1) if len(rs) > 1 else None
        per_class_rows.append(f'| {v} | ' + ' | '.join(
            f'{x:.1f}' + ('' if spread is None else f' ± {spread[j]:.1f}')
            for j, x in enumerate(pc.mean(axis=0))) + ' |')
    lines += ['', 'IoU per class (mean ± std over seeds):', '',
              '| model | ' + ' | '.join(classes) + ' |',
              '|' + '---|' * (len(classes) + 1)] + per_class_rows
    health = health_table(records, variants)
    if health:
        lines += ['', 'Prototype health on val (mean over classes):', '', health]
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-root',
                   default=os.environ.get(
                       'MMSEG_PROTO_CAMVID',
                       osp.join(REPO, '..', 'shared', 'data', 'camvid')))
    p.add_argument('--iters', type=int, default=1000)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--ablation-seeds', type=int, nargs='*', default=[0])
    p.add_argument('--out', default=osp.join(REPO, 'benchmarks', 'results',
                                             'camvid'))
    p.add_argument('--jobs', type=int, default=1,
                   help='runs in parallel (each gets OMP_NUM_THREADS='
                   'threads // jobs); 2 on a 2-core machine')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS),
                   help='run these variants for every --seeds seed instead of '
                   'the main comparison and the ablations')
    p.add_argument('--single', nargs=2, metavar=('VARIANT', 'SEED'),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.iters < 1 or args.jobs < 1 or args.threads < 1:
        p.error('--iters, --jobs and --threads must be >= 1')
    if not args.single:  # --out never is, nor lies in, the data it reads
        from mmseg_proto.utils.output_files import OutputPathError, check_not_input
        try:
            check_not_input(args.out, dict(data_root=args.data_root), 'camvid_benchmark')
        except OutputPathError as err:
            p.error(str(err))
    os.makedirs(args.out, exist_ok=True)
    if args.single:
        variant, seed = args.single[0], int(args.single[1])
        work = run_dir(args.out, variant, seed)
        rec = run_one(variant, seed, args.iters, args.data_root, work)
        write_json(osp.join(work, 'record.json'), rec)
        return
    if args.variants:
        jobs = [(v, s) for s in args.seeds for v in args.variants]
    else:
        jobs = [(v, s) for s in args.seeds for v in MAIN] + [
            (v, s) for s in args.ablation_seeds for v in ABLATIONS]
    env = dict(os.environ,
               OMP_NUM_THREADS=str(max(1, args.threads // args.jobs)))

    def record_file(job):
        return osp.join(run_dir(args.out, *job), 'record.json')

    # Before training anything: every record in --out is read for the tables, and this
    # call's finished runs must be of its schedule.
    try:
        finished_records(args.out, [record_file(job) for job in jobs], args.iters)
    except ValueError as err:
        p.error(str(err))

    def run(job):
        variant, seed = job
        rec_file = record_file(job)
        if not osp.exists(rec_file):  # resumable: finished runs are kept
            print(f'[camvid_benchmark] {variant} seed {seed}', flush=True)
            subprocess.run([
                sys.executable, __file__, '--single', variant, str(seed),
                '--iters', str(args.iters), '--data-root', args.data_root,
                '--out', args.out
            ], check=True, stdout=subprocess.DEVNULL, env=env)
        return read_record(rec_file, args.iters)

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))
    # records.json and results.md hold every run finished in this --out at this schedule,
    # this call's and earlier calls' (other variants or seeds), not only this call's.
    records = [rec for rec in finished_records(args.out, [], args.iters)
               if rec['iters'] == args.iters]
    write_json(osp.join(args.out, 'records.json'), records)
    table = (f'CamVid val (101 images), {args.iters} iterations, batch 4, '
             f'crop 160x160 at half resolution, {args.jobs} run(s) at a time '
             f'with {env["OMP_NUM_THREADS"]} thread(s) each\n\n' +
             aggregate(records, [v for v in VARIANTS
                                 if any(r['variant'] == v for r in records)]))
    from mmseg_proto.utils.output_files import write_text_atomic
    write_text_atomic(osp.join(args.out, 'results.md'), table + '\n')
    print(table)


if __name__ == '__main__':
    main()
