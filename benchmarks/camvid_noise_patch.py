"""Does the anomaly map flag what no street holds? A colour-noise square pasted into CamVid.

For each model, pastes a square of uniform colour noise (side ``--side`` of the image height,
default 1/3, its corner at 1/4 of the height and 1/3 of the width; numpy seed
``--noise-seed``, default 0) into ``--images`` val images
(every k-th of the split) and measures how well a per-pixel score separates the square's core
(its middle half) from the scene (every pixel farther than 1/4 side from the square): the
AUROC, 1.0 when every core pixel scores above every scene pixel, 0.5 chance. Scores: ProtoSeg's
anomaly map (``ProtoEncoderDecoder(anomaly_map=True)``: 1 - max cosine to any prototype) and,
for parametric models, the energy score (``-logsumexp`` of the logits, the best parametric
score of docs/anomaly_maps.md), both at the image size.

Models:

- ``--work-dirs``: trained runs, each a folder holding its config (``*.py``) and
  ``last_checkpoint`` (e.g. the add-class base runs,
  ``benchmarks/results/camvid_add_class/work/*_s0``: 4000 iterations, one class ignored);
- ``--short-iters N --seeds ...``: the shipped CamVid configs (ProtoSeg and the parametric
  baseline) trained here for N iterations on the bundled subset (96 x 96 crops, batch 2, no
  learning-rate decay), one run per seed: the model a quick test would train.

Prints a markdown table (one row per model: AUROC min / mean / max over the images).

    python benchmarks/camvid_noise_patch.py --data-root ../shared/data/camvid \
        --work-dirs benchmarks/results/camvid_add_class/work/*_s0 --short-iters 60 \
        --seeds 0 1 2 3
"""
import argparse
import glob
import os.path as osp
import sys
import tempfile
from typing import List, Tuple

import numpy as np

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
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
    p.add_argument('--side', type=float, default=1 / 3,
                   help="the square's side, a fraction of the image height in (0, 0.75]")
    p.add_argument('--noise-seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.short_iters < 0 or not 0 < args.side <= 0.75:
        p.error('--images must be >= 1, --short-iters >= 0 and --side in (0, 0.75]')
    if not args.work_dirs and not args.short_iters:
        p.error('give --work-dirs, --short-iters, or both')
    return args


def noise_patch_images(data_root: str, count: int, side: float = 1 / 3,
                       noise_seed: int = 0) -> List[Tuple[str, np.ndarray, np.ndarray,
                                                          np.ndarray]]:
    """(name, BGR image with the square, core mask, scene mask) for ``count`` val images."""
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
        img[top:top + size, left:left + size] = rng.integers(0, 256, (size, size, 3), np.uint8)
        core = np.zeros((h, w), bool)
        core[top + size // 4:top + 3 * size // 4, left + size // 4:left + 3 * size // 4] = True
        scene = np.ones((h, w), bool)
        m = size // 4
        scene[max(0, top - m):top + size + m, max(0, left - m):left + size + m] = False
        out.append((osp.basename(path), img, core, scene))
    return out


def scores_of(config: str, checkpoint: str, images) -> Tuple[str, List[float]]:
    """(score name, AUROC per image) of one model."""
    import torch
    from mmseg.apis import inference_model, init_model

    from mmseg_proto.evaluation.anomaly_metrics import anomaly_metrics
    from mmseg_proto.evaluation.anomaly_scores import energy_score
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    from mmengine.runner import load_checkpoint
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
    return ('anomaly map (1 - max cosine)' if prototypes else 'energy'), aurocs


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


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    import mmseg_proto  # noqa: F401
    images = noise_patch_images(args.data_root, args.images, args.side, args.noise_seed)
    rows = []
    for work_dir in args.work_dirs:
        config, ckpt = last_checkpoint(work_dir)
        score, aurocs = scores_of(config, ckpt, images)
        rows.append((osp.basename(osp.normpath(work_dir)), score, aurocs))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds if args.short_iters else []:
            for name, config in (('protoseg', PROTO_CFG), ('parametric', BASELINE_CFG)):
                ckpt = train_short(config, args.short_iters, seed,
                                   osp.join(tmp, f'{name}_{seed}'))
                score, aurocs = scores_of(config, ckpt, images)
                rows.append((f'{name}, {args.short_iters} it, seed {seed}', score, aurocs))
    print(f'\n{len(images)} val images of {args.data_root}, colour-noise square of side '
          f'{args.side:.2f} x the image height (noise seed {args.noise_seed}), AUROC core vs '
          'scene (%)\n')
    print('| model | score | min | mean | max |\n|---|---|---|---|---|')
    for name, score, aurocs in rows:
        a = 100 * np.asarray(aurocs)
        print(f'| {name} | {score} | {a.min():.1f} | {a.mean():.1f} | {a.max():.1f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
