"""2-D map of pixel embeddings and prototypes (paper Fig. 5).

Takes the labelled pixels of the chosen classes from the first validation
images of the (ProtoSeg) config's val set, keeps a random subset per class,
and plots their ProtoHead embeddings in 2-D (PCA or t-SNE) coloured by the
dataset palette, the class prototypes marked by stars. With
``--parametric-config/--parametric-checkpoint``, a parametric model's
decoder features (the input of its ``conv_seg`` classifier, taken by a
forward hook) on the same pixels are drawn in a second panel.

Example::

    python tools/visualization/vis_embedding.py PROTO_CONFIG PROTO_CKPT \\
        --parametric-config BASELINE_CONFIG --parametric-checkpoint BASE_CKPT \\
        --method tsne --classes road car building tree sky --out emb.png
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

LEGEND = 1.4  # width of the legend column, inches


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Plot pixel embeddings and prototypes of a ProtoSeg '
        'model in 2-D, optionally beside a parametric model.')
    parser.add_argument('config', help='ProtoSeg model config file')
    parser.add_argument('checkpoint', help='ProtoSeg checkpoint file')
    parser.add_argument('--parametric-config', default=None,
                        help='config of a parametric model to show beside')
    parser.add_argument('--parametric-checkpoint', default=None,
                        help='its checkpoint')
    parser.add_argument('--method', choices=['tsne', 'pca'], default='pca',
                        help='2-D projection; tsne needs scikit-learn '
                        '(default: pca)')
    parser.add_argument('--classes', nargs='+', default=None,
                        help='class names to plot (default: all)')
    parser.add_argument('--out', required=True, help='output PNG file')
    parser.add_argument('--num-images', type=int, default=20,
                        help='use the first N val images (default: 20)')
    parser.add_argument('--points-per-class', type=int, default=300,
                        help='random pixels kept per class (default: 300)')
    parser.add_argument('--seed', type=int, default=0,
                        help='subsampling / t-SNE seed (default: 0)')
    parser.add_argument('--device', default='cpu', help="e.g. 'cpu', 'cuda'")
    parser.add_argument('--panel-size', type=float, default=4.0,
                        help='size of one (square) panel in inches '
                        '(default: 4.0)')
    parser.add_argument('--dpi', type=int, default=100,
                        help='resolution of the PNG (default: 100)')
    parser.add_argument('--png-colors', type=int, default=0,
                        help='save an 8-bit palette PNG with at most this '
                        'many colours (2-256); 0 keeps full RGB (default: 0)')
    args = parser.parse_args(argv)
    from mmseg_proto.utils.output_files import OutputPathError, check_output_file
    try:  # first: never over an input or a file not ours
        args.out_folder = check_output_file(args.out, 'vis_embedding', dict(
            config=args.config, checkpoint=args.checkpoint,
            parametric_config=args.parametric_config,
            parametric_checkpoint=args.parametric_checkpoint))
    except OutputPathError as err:
        parser.error(str(err))
    if (args.parametric_config is None) != (args.parametric_checkpoint is
                                            None):
        parser.error('--parametric-config and --parametric-checkpoint go '
                     'together')
    if args.num_images < 1 or args.points_per_class < 1:
        parser.error('--num-images and --points-per-class must be >= 1')
    if args.panel_size <= 0 or args.dpi <= 0:
        parser.error('--panel-size and --dpi must be > 0')
    if args.png_colors and not 2 <= args.png_colors <= 256:
        parser.error('--png-colors must be 0 or in [2, 256]')
    return args


def figure_size(num_panels: int, panel: float) -> Tuple[float, float]:
    """Figure (width, height) in inches: square panels plus a legend."""
    return num_panels * panel + LEGEND, panel + 0.3


def build_val_dataset(cfg):
    """The val (else test) dataset of a config, with its test pipeline."""
    from mmseg.registry import DATASETS
    loader = cfg.get('val_dataloader') or cfg.get('test_dataloader')
    if not loader:
        raise ValueError('The config has no val_dataloader/test_dataloader '
                         'to take labelled images from')
    return DATASETS.build(loader['dataset'])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    files = [args.config, args.checkpoint]
    if args.parametric_config:
        files += [args.parametric_config, args.parametric_checkpoint]
    for path in files:
        if not osp.isfile(path):
            print(f'error: no such file: {path}', file=sys.stderr)
            return 2
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from matplotlib.lines import Line2D

    import mmseg_proto  # noqa: F401
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    from mmseg_proto.visualization import (class_indices, collect_embeddings,
                                           load_model, proto_head, reduce_2d)

    with mmseg_proto_config_scope():  # configs may inherit mmseg_proto::
        model = load_model(args.config, args.checkpoint, device=args.device)
        head = proto_head(model)
        classes, palette = (model.dataset_meta['classes'],
                            model.dataset_meta['palette'])
        ids = class_indices(args.classes, classes)
        dataset = build_val_dataset(model.cfg)

    # (title, points (N, 2), labels (N,), prototypes (M, 2) or None, ...)
    panels: List[tuple] = []
    feats, labels = collect_embeddings(model, dataset, ids, args.num_images,
                                       args.points_per_class, 'proto',
                                       args.seed)
    protos = head.prototypes[ids].reshape(-1, head.prototypes.shape[-1])
    proto_labels = torch.tensor(ids).repeat_interleave(head.num_prototypes)
    pts, pro = reduce_2d(feats.cpu(), protos.float().cpu(), args.method,
                         args.seed)
    panels.append(('ProtoSeg: ProtoHead embeddings', pts, labels.cpu(), pro,
                   proto_labels))
    del model
    if args.parametric_config:
        with mmseg_proto_config_scope():
            param = load_model(args.parametric_config,
                               args.parametric_checkpoint, device=args.device)
        if list(param.dataset_meta['classes']) != list(classes):
            raise ValueError('The two models have different classes: '
                             f"{param.dataset_meta['classes']} vs {classes}")
        pfeats, plabels = collect_embeddings(param, dataset, ids,
                                             args.num_images,
                                             args.points_per_class, 'auto',
                                             args.seed)
        ppts, _ = reduce_2d(pfeats.cpu(), None, args.method, args.seed)
        panels.append((f'parametric: {type(param.decode_head).__name__} '
                       'features', ppts, plabels.cpu(), None, None))

    width, height = figure_size(len(panels), args.panel_size)
    fig = plt.figure(figsize=(width, height), dpi=args.dpi)
    grid = fig.add_gridspec(
        1, len(panels), left=0.01, right=1 - LEGEND / width, top=1 - 0.3 /
        height, bottom=0.01, wspace=0.04)
    colour = {c: np.array(palette[c]) / 255.0 for c in ids}
    for i, (title, pts, lab, pro, pro_lab) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        for c in ids:
            sel = lab == c
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=4, alpha=0.6,
                           color=colour[c], linewidths=0, rasterized=True)
        if pro is not None:
            for c in ids:
                sel = pro_lab == c
                ax.scatter(pro[sel, 0], pro[sel, 1], s=90, marker='*',
                           color=colour[c], edgecolors='black',
                           linewidths=0.7, zorder=3)
        ax.set_title(f'{title} ({args.method.upper()})', fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    present = set(torch.cat([p[2] for p in panels]).unique().tolist())
    handles = [Line2D([], [], marker='o', ls='', color=colour[c],
                      label=classes[c]) for c in ids if c in present]
    handles.append(Line2D([], [], marker='*', ls='', markersize=10,
                          color='white', markeredgecolor='black',
                          label='prototype'))
    fig.legend(handles=handles, loc='center right', fontsize=7,
               frameon=False)
    with args.out_folder.atomic(osp.basename(args.out)) as tmp:
        fig.savefig(tmp, dpi=args.dpi)
        plt.close(fig)
        if args.png_colors:
            from PIL import Image
            with Image.open(tmp) as img:
                small = img.convert('RGB').quantize(colors=args.png_colors)
            small.save(tmp, optimize=True)
    counts = {classes[c]: int((panels[0][2] == c).sum()) for c in ids}
    print(f'{args.out}: {args.method}, pixels per class {counts}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
