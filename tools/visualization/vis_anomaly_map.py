"""Image, prediction and prototype anomaly map of a ProtoSeg model, side by side.

The anomaly map is ``ProtoEncoderDecoder(anomaly_map=True)``'s: ``1 - max cosine`` of each
pixel's embedding to any prototype (docs/anomaly_maps.md). With ``--label`` a third panel
shows the ground truth, so a class held out of training can be compared with the map.

    python tools/visualization/vis_anomaly_map.py CONFIG CHECKPOINT IMAGE --out fig.png \\
        [--label LABEL.png] [--device cpu]
"""
import argparse
import os.path as osp
from typing import Optional, Sequence

import numpy as np


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('image')
    p.add_argument('--out', required=True, help='PNG file to write')
    p.add_argument('--label', help='ground-truth label map of the image (optional)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--dpi', type=int, default=90)
    args = p.parse_args(argv)
    from mmseg_proto.utils.output_files import OutputPathError, check_output_file
    try:  # first: never over an input (the label map included) or a file not ours
        args.out_folder = check_output_file(args.out, 'vis_anomaly_map', dict(
            config=args.config, checkpoint=args.checkpoint, image=args.image,
            label=args.label))
    except OutputPathError as err:
        p.error(str(err))
    for name in ('config', 'checkpoint', 'image', 'label'):
        path = getattr(args, name)
        if path is not None and not osp.isfile(path):
            p.error(f'{name} {path!r} is not a file')
    if not args.out.lower().endswith('.png'):
        p.error(f'--out {args.out!r} must name a .png file')
    if args.dpi < 10:
        p.error('--dpi must be >= 10')
    return args


def colourise(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; labels outside the palette black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[np.clip(labels, 0, 255).astype(np.int64)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import mmcv
    from mmseg.apis import inference_model

    from mmengine.config import Config
    from mmseg.apis import init_model

    import mmseg_proto  # noqa: F401
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope

    with mmseg_proto_config_scope():
        cfg = Config.fromfile(args.config)
        if cfg.model.decode_head.get('type') != 'ProtoHead':
            raise SystemExit(f"{args.config}: the decode head is "
                             f"{cfg.model.decode_head.get('type')}, not a ProtoHead")
        cfg.model.type, cfg.model.anomaly_map = 'ProtoEncoderDecoder', True
        model = init_model(cfg, args.checkpoint, device=args.device)
    result = inference_model(model, args.image)
    image = mmcv.imread(args.image, channel_order='rgb')
    pred = result.pred_sem_seg.data[0].cpu().numpy()
    anomaly = result.anomaly_map.data[0].cpu().numpy()
    palette = model.dataset_meta['palette']
    panels = [('image', image, None), ('prediction', colourise(pred, palette), None)]
    if args.label:
        panels.append(('ground truth', colourise(mmcv.imread(args.label, 'unchanged'),
                                                 palette), None))
    panels.append(('anomaly map: 1 - max cosine', anomaly, 'inferno'))
    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) * w / max(h, w) + 0.6,
                                                      3.2 * h / max(h, w) + 0.4))
    for ax, (title, data, cmap) in zip(axes, panels):
        shown = ax.imshow(data, cmap=cmap)
        ax.set_title(title, fontsize=9)
        ax.axis('off')
        if cmap:
            fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.02)
    fig.tight_layout()
    with args.out_folder.atomic(osp.basename(args.out)) as tmp:
        fig.savefig(tmp, dpi=args.dpi)
    plt.close(fig)
    print(f'wrote {args.out}: anomaly map {anomaly.min():.3f} to {anomaly.max():.3f}')


if __name__ == '__main__':
    main()
