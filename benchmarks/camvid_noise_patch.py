"""Does the anomaly map flag what no street holds? A square pasted into CamVid val images.

For each model, pastes a square into ``--images`` val images (every k-th of the split): of
uniform colour noise (``--fills noise``, numpy seed ``--noise-seed``, default 0) or of one
flat colour (``magenta``, ``cyan``, ``grey``), of side ``--sides`` of the image height
(default 1/3), its corner at 1/4 of the height and 1/3 of the width. It measures how well a
per-pixel score separates the square's core (its middle half) from the scene (every pixel
farther than 1/4 side from the square): the AUROC, 1.0 when every core pixel scores above
every scene pixel, 0.5 chance. Scores: ProtoSeg's anomaly map
(``ProtoEncoderDecoder(anomaly_map=True)``: 1 - max cosine to any prototype) and, for
parametric models, the energy score (``-logsumexp`` of the logits, the best parametric
score of docs/anomaly_maps.md), both at the image size.

Models:

- ``--work-dirs``: trained runs, each a folder holding its config (``*.py``) and
  ``last_checkpoint`` (e.g. the add-class base runs,
  ``benchmarks/results/camvid_add_class/work/*_s0``: 4000 iterations, one class ignored);
- ``--short-iters N --seeds ...``: the shipped CamVid configs (ProtoSeg and the parametric
  baseline) trained here for N iterations on the bundled subset (96 x 96 crops, batch 2, no
  learning-rate decay), one run per seed: the model a quick test would train.

Prints a markdown table per square (one row per model: AUROC min / mean / max over the
images), then a summary: per square, each score's mean AUROC (range over the runs) and in
how many pairs of runs (a ProtoSeg run and the parametric run of the same name) the anomaly
map is ahead.

    python benchmarks/camvid_noise_patch.py --data-root ../shared/data/camvid \
        --work-dirs benchmarks/results/camvid_add_class/work/*_s0 --short-iters 60 \
        --seeds 0 1 2 3 --fills noise magenta cyan grey --sides 0.2 0.333 0.5
"""
import argparse
import glob
import os.path as osp
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np
import torch.nn as nn

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: --fill: what the square holds besides colour noise, one flat BGR colour.
FLAT = {'magenta': (255, 0, 255), 'cyan': (255, 255, 0), 'grey': (128, 128, 128)}
PROTO_CFG = osp.join(REPO, 'configs/protoseg/camvid/'
                     'protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py')
BASELINE_CFG = osp.join(REPO, 'configs/baselines/camvid/'
                        'segformer_mit-b0_1xb4-80it_camvid-160x160.py')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-root', default=osp.join(REPO, 'data', 'camvid_mini'),
                   help='CamVid in MMSeg layout (its img_dir/val images are scored)')
    p.add_argument('--images', type=int, default=8, help='val images, evenly spaced')
    p.add_argument('--work-dirs', nargs='*', default=[],
                   help='trained runs: folders with a config and last_checkpoint')
    p.add_argument('--short-iters', type=int, default=0,
                   help='also train the shipped configs this many iterations per seed')
    p.add_argument('--seeds', type=int, nargs='*', default=[0])
    p.add_argument('--sides', type=float, nargs='+', default=[1 / 3],
                   help="the square's sides, fractions of the image height in (0, 0.75]")
    p.add_argument('--noise-seed', type=int, default=0)
    p.add_argument('--fills', nargs='+', choices=('noise', *FLAT), default=['noise'],
                   help='what the square holds: colour noise or one flat colour')
    args = p.parse_args(argv)
    if args.images < 1 or args.short_iters < 0 or not all(0 < s <= 0.75 for s in args.sides):
        p.error('--images must be >= 1, --short-iters >= 0 and --sides in (0, 0.75]')
    if not args.work_dirs and not args.short_iters:
        p.error('give --work-dirs, --short-iters, or both')
    return args


def noise_patch_images(data_root: str, count: int, side: float = 1 / 3,
                       noise_seed: int = 0, fill: str = 'noise'
                       ) -> List[Tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, BGR image with the square, core mask, scene mask) for ``count`` val images;
    ``fill`` 'noise' (uniform colour noise) or a name of :data:`FLAT` (one flat colour)."""
    import mmcv
    paths = sorted(glob.glob(osp.join(data_root, 'img_dir', 'val', '*')))
    if not paths:
        raise SystemExit(f'no images in {osp.join(data_root, "img_dir", "val")}')
    paths = paths[::max(1, len(paths) // count)][:count]
    rng = np.random.default_rng(noise_seed)
    out = []
    for path in paths:
        img = mmcv.imread(path)
        h, w = img.shape[:2]
        top, left, size = h // 4, w // 3, max(4, int(h * side))
        img[top:top + size, left:left + size] = (
            rng.integers(0, 256, (size, size, 3), np.uint8) if fill == 'noise' else
            np.array(FLAT[fill], np.uint8))
        core = np.zeros((h, w), bool)
        core[top + size // 4:top + 3 * size // 4, left + size // 4:left + 3 * size // 4] = True
        scene = np.ones((h, w), bool)
        m = size // 4
        scene[max(0, top - m):top + size + m, max(0, left - m):left + size + m] = False
        out.append((osp.basename(path), img, core, scene))
    return out


def load_scored_model(config: str, checkpoint: str) -> Tuple[nn.Module, bool]:
    """(model, whether it has prototypes): ProtoSeg with its anomaly map switched on, every
    tensor from ``checkpoint``."""
    from mmengine.runner import load_checkpoint
    from mmseg.apis import init_model

    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    if not osp.isfile(checkpoint):
        raise SystemExit(f'{checkpoint}: no such checkpoint')
    with mmseg_proto_config_scope():
        probe = init_model(config, None, device='cpu')
    prototypes = hasattr(probe.decode_head, 'prototypes')
    options = ({'model.type': 'ProtoEncoderDecoder', 'model.anomaly_map': True}
               if prototypes else None)
    with mmseg_proto_config_scope():
        model = init_model(config, None, device='cpu', cfg_options=options)
    try:  # every tensor from the checkpoint (init_model alone would leave misfits random)
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    except RuntimeError as err:
        raise SystemExit(f'{checkpoint} does not fit the model of {config} (a checkpoint '
                         f'of another config?): {str(err).splitlines()[0]}') from err
    return model, prototypes


def image_aurocs(model: nn.Module, prototypes: bool, images) -> List[float]:
    """AUROC of the square's core against the scene, per image: the anomaly map of a
    ProtoSeg model, the energy score of a parametric one."""
    import torch
    from mmseg.apis import inference_model

    from mmseg_proto.evaluation.anomaly_metrics import anomaly_metrics
    from mmseg_proto.evaluation.anomaly_scores import energy_score
    aurocs = []
    for _, img, core, scene in images:
        with torch.no_grad():
            result = inference_model(model, img)
        if prototypes:
            score = result.anomaly_map.data[0].numpy()
        else:
            score = energy_score(result.seg_logits.data).numpy()  # (C, H, W) -> (H, W)
        keep = core | scene
        aurocs.append(anomaly_metrics(score[keep], core[keep])['auroc'])
    return aurocs


def last_checkpoint(work_dir: str) -> Tuple[str, str]:
    """(config, checkpoint) of a finished run folder."""
    configs = sorted(glob.glob(osp.join(work_dir, '*.py')))
    pointer = osp.join(work_dir, 'last_checkpoint')
    if len(configs) != 1 or not osp.isfile(pointer):
        raise SystemExit(f'{work_dir}: expected one config (*.py) and last_checkpoint')
    with open(pointer) as f:
        name = osp.basename(f.read().strip())
    return configs[0], osp.join(work_dir, name)


def train_short(config: str, iters: int, seed: int, work_dir: str) -> str:
    """``config`` trained ``iters`` iterations on the bundled subset; its checkpoint."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(config)
    cfg.work_dir = work_dir
    cfg.train_cfg.max_iters = iters
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint.interval = iters
    cfg.default_hooks.logger.interval = iters
    cfg.model.data_preprocessor.size = (96, 96)
    cfg.train_dataloader.batch_size = 2
    for t in cfg.train_dataloader.dataset.pipeline:
        if t['type'] == 'RandomCrop':
            t['crop_size'] = (96, 96)
    cfg.randomness = dict(seed=seed)
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.experiment_name = f'noise_patch_{osp.basename(config)}_{seed}'
    Runner.from_cfg(cfg).train()
    return osp.join(work_dir, f'iter_{iters}.pth')


def summary_rows(results: Dict[Tuple[str, float], List[Tuple[str, str, List[float]]]]
                 ) -> List[str]:
    """Per square: each score's mean AUROC (range over the runs of that kind), and in how
    many pairs of runs the anomaly map is ahead: a ProtoSeg run pairs with the parametric run
    whose name is its own with 'protoseg' replaced by 'parametric' (the benchmarks' run
    folders, ``protoseg_s1`` and ``parametric_s1``)."""
    rows = []
    for (fill, side), runs in results.items():
        proto = {name: 100 * float(np.mean(a)) for name, kind, a in runs if kind != 'energy'}
        param = {name: 100 * float(np.mean(a)) for name, kind, a in runs if kind == 'energy'}
        pairs = [(m, param[name.replace('protoseg', 'parametric', 1)])
                 for name, m in proto.items()
                 if name.replace('protoseg', 'parametric', 1) in param]
        ahead = sum(p > e for p, e in pairs)
        proto, param = list(proto.values()), list(param.values())

        def span(values):
            return f'{min(values):.1f}-{max(values):.1f}' if values else '-'
        rows.append(f'| {fill} | {side:.2f} | {span(proto)} | {span(param)} | '
                    f'{ahead} of {len(pairs)} |')
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import mmseg_proto  # noqa: F401
    squares = {(fill, side): noise_patch_images(args.data_root, args.images, side,
                                                args.noise_seed, fill)
               for fill in args.fills for side in args.sides}
    results = {key: [] for key in squares}

    def score(name: str, config: str, ckpt: str) -> None:
        model, prototypes = load_scored_model(config, ckpt)
        kind = 'anomaly map (1 - max cosine)' if prototypes else 'energy'
        for key, images in squares.items():
            results[key].append((name, kind, image_aurocs(model, prototypes, images)))

    for work_dir in args.work_dirs:
        score(osp.basename(osp.normpath(work_dir)), *last_checkpoint(work_dir))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds if args.short_iters else []:
            for name, config in (('protoseg', PROTO_CFG), ('parametric', BASELINE_CFG)):
                ckpt = train_short(config, args.short_iters, seed,
                                   osp.join(tmp, f'{name}_{seed}'))
                score(f'{name}, {args.short_iters} it, seed {seed}', config, ckpt)
    for (fill, side), runs in results.items():
        count = len(squares[fill, side])  # fewer than --images where the split is smaller
        print(f'\n{count} val images of {args.data_root}, {fill} square of side '
              f'{side:.2f} x the image height (noise seed {args.noise_seed}), AUROC core vs '
              'scene (%)\n')
        print('| model | score | min | mean | max |\n|---|---|---|---|---|')
        for name, kind, aurocs in runs:
            a = 100 * np.asarray(aurocs)
            print(f'| {name} | {kind} | {a.min():.1f} | {a.mean():.1f} | {a.max():.1f} |')
    print('\nSummary: mean AUROC over the images (%), range over the runs\n')
    print('| square | side / image height | ProtoSeg anomaly map | parametric energy | '
          'runs where the map is ahead |\n|---|---|---|---|---|')
    print('\n'.join(summary_rows(results)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
